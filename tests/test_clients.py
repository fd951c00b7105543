"""Real clients through the site (issue 14, item 1): docker (a dockerd and containerd of the test's
own, started and stopped by PID), podman, buildah and containerd's ``ctr``, next to skopeo.

One shared stack (redis-server, token service, two docker-registry 2.8, updater, auth service,
NGINX) and one small image (two variants sharing a base layer, built once with ``images.py``) for
the whole module. Each client logs in (or, ``ctr``, sends ``--user`` with every command) with the
token service's Basic credentials and gets tokens by the registry challenge, then: pushes through
the site (lands on the primary only), pulls right after (the primary serves it), the image is
replicated, pulls again (every blob and manifest ``local``), the tag is moved by another push, and
a pull gives the new digest. Before each pull the client's own store is emptied, so every blob is
fetched again. The checks are the access log's routes and the digests, not only exit codes.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest

from geo_route.client_config import primary_origin, render_client_config, site_origin
from geo_route.config import load_settings
from geo_route.devstack.client import AccessLogEntry, StackClient, started_stack
from geo_route.devstack.containers import ContainerClientError, DockerDaemon
from geo_route.devstack.images import OciImage, OciIndex, build_oci_image, build_oci_index
from geo_route.devstack.libpod import Buildah, LibpodClient, Podman
from geo_route.devstack.processes import is_gone
from geo_route.devstack.skopeo import Credentials, SkopeoError, docker_reference

pytestmark = pytest.mark.integration

IMAGE_NAME = "geo-route/clients"  # the local name of the test image in every client's store
VARIANTS = ("v1", "moved")
CLIENTS = ("docker", "podman", "buildah", "ctr", "skopeo")
LOGIN_CLIENTS = ("docker", "podman", "buildah")
PLATFORM_CLIENTS = ("docker", "podman", "buildah", "ctr")  # pull one platform of an index (skopeo: test_e2e)
REPORTS_PLATFORM_MANIFEST = {"buildah"}  # reports the platform's manifest digest, not the index's
MOUNTING_CLIENTS = ("docker", "podman")  # remember where they pushed a blob and mount it from there
ARCHITECTURE = "arm64" if platform.machine() in ("aarch64", "arm64") else "amd64"


@dataclass(frozen=True)
class ClientImage:
    """The test image, one per variant, in every form a client loads."""

    oci: dict[str, OciImage]  # variant -> image in the OCI layout (skopeo, podman, buildah)
    index: OciIndex  # an image index of two platforms in the same layout
    layout: Path
    oci_archive: Path  # the layout as a tar, both variants (ctr images import)
    docker_archives: dict[str, Path]  # variant -> docker-archive tar (docker load)


class Client(Protocol):
    """What the test asks of each client: load a variant into its store, push it, empty the store, pull."""

    def load(self, variant: str) -> str: ...

    def push(self, local: str, reference: str) -> str: ...

    def clear(self) -> None: ...

    def pull(self, reference: str) -> str: ...


class DockerClient:
    def __init__(self, daemon: DockerDaemon, image: ClientImage) -> None:
        self.daemon, self.image = daemon, image

    def load(self, variant: str) -> str:
        self.daemon.load(self.image.docker_archives[variant])
        return f"{IMAGE_NAME}:{variant}"

    def push(self, local: str, reference: str) -> str:
        self.daemon.tag(local, reference)
        return self.daemon.push(reference)

    def clear(self) -> None:
        self.daemon.remove_all_images()

    def pull(self, reference: str) -> str:
        return self.daemon.pull(reference)


class LibpodAdapter:
    """podman and buildah: the same commands on their own stores."""

    def __init__(self, client: LibpodClient, image: ClientImage) -> None:
        self.client, self.image = client, image

    def load(self, variant: str) -> str:
        return self.client.load(f"oci:{self.image.layout}:{variant}")

    def push(self, local: str, reference: str) -> str:
        return self.client.push(local, reference)

    def clear(self) -> None:
        self.client.remove_all_images()

    def pull(self, reference: str) -> str:
        return self.client.pull(reference)


class CtrClient:
    def __init__(self, daemon: DockerDaemon, image: ClientImage, credentials: Credentials) -> None:
        self.containerd, self.image, self.credentials = daemon.containerd, image, credentials

    def load(self, variant: str) -> str:
        local = f"{IMAGE_NAME}:{variant}"
        self.containerd.import_archive(self.image.oci_archive, local)
        return local

    def push(self, local: str, reference: str) -> str:
        self.containerd.tag(local, reference)
        self.containerd.push(reference, self.credentials)
        return self.containerd.image_digest(reference)  # ctr pushes the manifest as it is stored

    def clear(self) -> None:
        self.containerd.remove_all_images()

    def pull(self, reference: str) -> str:
        return self.containerd.pull(reference, self.credentials)


class SkopeoClient:
    def __init__(self, stack: StackClient, image: ClientImage, workdir: Path) -> None:
        self.stack, self.image, self.workdir = stack, image, workdir

    def load(self, variant: str) -> str:
        return variant

    def push(self, local: str, reference: str) -> str:
        return self.stack.skopeo.copy(self.image.oci[local].reference, f"docker://{reference}", dest_creds=self.creds())

    def clear(self) -> None:
        pass  # every pull goes into a fresh layout

    def pull(self, reference: str) -> str:
        layout = self.workdir / f"pull-{time.monotonic_ns()}"
        layout.mkdir(parents=True)
        return self.stack.skopeo.copy(f"docker://{reference}", f"oci:{layout}:pulled", src_creds=self.creds())

    def creds(self) -> Credentials:
        return self.stack.credentials()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackClient]:
    with started_stack(tmp_path_factory.mktemp("stack")) as client:
        yield client


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory, stack: StackClient) -> ClientImage:
    directory = tmp_path_factory.mktemp("image")
    layout = directory / "layout"
    oci = {variant: build_oci_image(layout, variant, variant=variant, layer_count=2) for variant in VARIANTS}
    index = build_oci_index(layout, "multi", variant="multi", architectures=("amd64", "arm64"))
    oci_archive = directory / "oci.tar"
    subprocess.run(["tar", "-C", str(layout), "-cf", str(oci_archive), "."], check=True)
    docker_archives = {}
    for variant in VARIANTS:  # docker 20.10 loads docker-archive tars only (no OCI archives before 25)
        docker_archives[variant] = directory / f"docker-{variant}.tar"
        target = f"docker-archive:{docker_archives[variant]}:{IMAGE_NAME}:{variant}"
        stack.skopeo.run(["copy", "--quiet", oci[variant].reference, target])
    return ClientImage(oci, index, layout, oci_archive, docker_archives)


@pytest.fixture(scope="module")
def docker_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerDaemon]:
    with DockerDaemon(tmp_path_factory.mktemp("docker")) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    return Podman(tmp_path_factory.mktemp("podman"))


@pytest.fixture(scope="module")
def buildah(tmp_path_factory: pytest.TempPathFactory) -> Buildah:
    return Buildah(tmp_path_factory.mktemp("buildah"))


@dataclass(frozen=True)
class Published:
    """An image pushed through the site and replicated: what a client on this machine pulls of it."""

    repository: str
    digest: str  # what the tag names (an index for the multi-platform image)
    platform_digest: str  # the manifest of this machine's platform (= digest for a single image)
    blobs: frozenset[str]  # that manifest's config and layers


@pytest.fixture(scope="module")
def published(stack: StackClient, image: ClientImage, docker_daemon: DockerDaemon) -> dict[str, Published]:
    """Three formats through the site, each replicated: an OCI manifest and a two-platform OCI index
    (skopeo), and a Docker schema 2 manifest (docker push: dockerd converts what it loaded)."""
    site, creds = stack.secondary, stack.credentials()
    stack.skopeo.copy(image.oci["v1"].reference, docker_reference(site, "formats/oci", "v1"), dest_creds=creds)
    stack.skopeo.copy(image.index.reference, docker_reference(site, "formats/index", "v1"), dest_creds=creds)
    docker = DockerClient(docker_daemon, image)
    docker_daemon.login(site, creds)
    schema2 = docker.push(docker.load("v1"), f"{site}/formats/docker:v1")
    single, child = image.oci["v1"].digest, image.index.children[ARCHITECTURE].digest
    pushed = {
        "oci": ("formats/oci", single, single),
        "index": ("formats/index", image.index.digest, child),
        "docker": ("formats/docker", schema2, schema2),
    }
    found = {}
    for kind, (repository, digest, platform_digest) in pushed.items():
        stack.replicate(repository, ["v1"])
        blobs = frozenset(blobs_of(stack, repository, platform_digest))
        found[kind] = Published(repository, digest, platform_digest, blobs)
    return found


def logged_in(name: str, request: pytest.FixtureRequest, stack: StackClient) -> DockerDaemon | LibpodClient:
    """The docker daemon, podman or buildah, logged in to the site with the developer's password."""
    client: DockerDaemon | LibpodClient = request.getfixturevalue("docker_daemon" if name == "docker" else name)
    client.login(stack.secondary, stack.credentials())
    return client


def client_under_test(name: str, request: pytest.FixtureRequest, stack: StackClient, image: ClientImage) -> Client:
    if name == "docker":
        daemon: DockerDaemon = request.getfixturevalue("docker_daemon")
        daemon.login(stack.secondary, stack.credentials())
        return DockerClient(daemon, image)
    if name in ("podman", "buildah"):
        libpod: LibpodClient = request.getfixturevalue(name)
        libpod.login(stack.secondary, stack.credentials())
        return LibpodAdapter(libpod, image)
    if name == "ctr":
        return CtrClient(request.getfixturevalue("docker_daemon"), image, stack.credentials())
    return SkopeoClient(stack, image, request.getfixturevalue("tmp_path"))


def registry_entries(stack: StackClient, repository: str, since: int) -> list[AccessLogEntry]:
    """The access log's requests for ``repository``'s blobs, manifests and uploads after ``since``."""
    return [e for e in stack.access_log(since) if e.uri.startswith(f"/v2/{repository}/")]


def answered(entries: list[AccessLogEntry]) -> list[AccessLogEntry]:
    """Entries that were not the registry challenge (a client's first try of a request, e.g. ctr's,
    without a token yet: 401 ``no-token``, which must be the only kind of 401)."""
    challenges = [e for e in entries if e.status == 401]
    assert {e.reason for e in challenges} <= {"no-token"}, challenges
    return [e for e in entries if e.status != 401]


def blobs_of(stack: StackClient, repository: str, digest: str) -> set[str]:
    """The config and layer digests of the manifest ``digest`` as the primary stores it."""
    raw = stack.skopeo.inspect_raw(docker_reference(stack.primary, repository, digest), stack.credentials())
    manifest = json.loads(raw)
    return {manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])}


def assert_pulled_from(entries: list[AccessLogEntry], route: str, blobs: set[str]) -> None:
    """Every blob and manifest request answered 200 by ``route``, and every blob fetched whole."""
    served = [e for e in answered(entries) if "/blobs/" in e.uri or "/manifests/" in e.uri]
    assert {(e.route, e.status) for e in served} == {(route, 200)}, served
    assert any("/manifests/" in e.uri for e in served), served
    fetched = {e.uri.partition("?")[0].rsplit("/", 1)[1] for e in served if e.method == "GET" and "/blobs/" in e.uri}
    assert fetched == blobs, f"blobs fetched {fetched}, the manifest has {blobs}"


@pytest.mark.parametrize("name", CLIENTS)
def test_push_pull_replicate_pull_move_pull(
    name: str, request: pytest.FixtureRequest, stack: StackClient, image: ClientImage
) -> None:
    client = client_under_test(name, request, stack, image)
    repository = f"clients/{name}"
    reference = f"{stack.secondary}/{repository}:v1"

    since = stack.access_log_offset()
    pushed = client.push(client.load("v1"), reference)
    assert stack.digest_at(stack.primary, repository, "v1") == pushed
    with pytest.raises(SkopeoError):
        stack.digest_at(stack.local_registry, repository, "v1")
    writes = [e for e in answered(registry_entries(stack, repository, since)) if e.method not in ("GET", "HEAD")]
    assert {e.route for e in writes} == {"primary"}
    assert {e.reason for e in writes} == {"upload", "write"}, writes
    blobs = blobs_of(stack, repository, pushed)

    client.clear()
    since = stack.access_log_offset()
    assert client.pull(reference) == pushed
    assert_pulled_from(registry_entries(stack, repository, since), "primary", blobs)

    stack.replicate(repository, ["v1"])
    client.clear()
    since = stack.access_log_offset()
    assert client.pull(reference) == pushed
    entries = registry_entries(stack, repository, since)
    assert_pulled_from(entries, "local", blobs)
    by_tag = [e for e in answered(entries) if e.uri.endswith("/manifests/v1")]
    assert by_tag and {e.reason for e in by_tag} == {"tag-pinned"}

    moved = client.push(client.load("moved"), reference)
    assert moved != pushed
    client.clear()
    assert client.pull(reference) == moved == stack.digest_at(stack.primary, repository, "v1")


@pytest.mark.parametrize("name", LOGIN_CLIENTS)
def test_login_through_the_site_uses_a_token_the_service_accepts(
    name: str, request: pytest.FixtureRequest, stack: StackClient
) -> None:
    since = stack.access_log_offset()
    logged_in(name, request, stack)
    base = [(e.status, e.route, e.reason) for e in stack.access_log(since) if e.uri == "/v2/"]
    assert (401, "", "no-token") in base and (200, "local", "base") in base, base


@pytest.mark.parametrize("name", LOGIN_CLIENTS)
def test_a_wrong_password_is_refused_without_echoing_it(
    name: str, request: pytest.FixtureRequest, stack: StackClient
) -> None:
    client = request.getfixturevalue("docker_daemon" if name == "docker" else name)
    wrong = Credentials(stack.info.username, "not-the-password-" + name)
    with pytest.raises(ContainerClientError) as caught:
        client.login(stack.secondary, wrong)
    assert wrong.password not in str(caught.value)


@pytest.mark.parametrize("name", PLATFORM_CLIENTS)
def test_every_format_is_pulled_locally_by_tag_and_by_digest(
    name: str, request: pytest.FixtureRequest, stack: StackClient, published: dict[str, Published]
) -> None:
    """Content negotiation: each client's Accept (and HEAD or GET by tag) gets an OCI manifest, a
    Docker schema 2 manifest and an OCI index with its platform's manifest from the local registry."""
    client = client_under_test(name, request, stack, request.getfixturevalue("image"))
    for kind, entry in published.items():
        by_tag = f"{stack.secondary}/{entry.repository}:v1"
        for reference in (by_tag, f"{stack.secondary}/{entry.repository}@{entry.digest}"):
            client.clear()
            since = stack.access_log_offset()
            expected = entry.platform_digest if name in REPORTS_PLATFORM_MANIFEST else entry.digest
            assert client.pull(reference) == expected, f"{kind}: {reference}"
            served = answered(registry_entries(stack, entry.repository, since))
            assert_pulled_from(served, "local", set(entry.blobs))
            if reference == by_tag:
                assert {e.reason for e in served if e.uri.endswith("/manifests/v1")} == {"tag-pinned"}
            if kind == "index":
                assert any(e.uri.endswith(f"/manifests/{entry.platform_digest}") for e in served), served


@pytest.mark.parametrize("name", MOUNTING_CLIENTS)
def test_a_cross_repository_mount_through_the_site(
    name: str, request: pytest.FixtureRequest, stack: StackClient, image: ClientImage
) -> None:
    """A second push of the same image to another repository mounts the blobs from where the client
    pushed them before (``POST …/uploads/?mount=…&from=…`` with a token for both repositories, which
    the site must accept): the primary mounts them."""
    client = client_under_test(name, request, stack, image)
    local = client.load("v1")
    first = client.push(local, f"{stack.secondary}/mounts/{name}-a:v1")
    since = stack.access_log_offset()
    second = client.push(local, f"{stack.secondary}/mounts/{name}-b:v1")
    mounts = [e for e in registry_entries(stack, f"mounts/{name}-b", since) if "mount=" in e.uri]
    assert mounts and all("from=" in e.uri for e in mounts), mounts
    assert {(e.route, e.reason, e.status) for e in mounts} == {("primary", "upload", 201)}, mounts
    assert stack.digest_at(stack.primary, f"mounts/{name}-b", "v1") == second == first


def client_config_text(stack: StackClient, client: str) -> str:
    """What ``geo-route client-config --for CLIENT`` prints for the stack's site file."""
    settings = load_settings(stack.info.site_file, environ={})
    return render_client_config(client, site_origin(settings), primary_origin(settings)).text  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ("ctr", "podman"))
def test_the_generated_client_configuration_sends_pulls_by_the_primary_name_through_the_site(
    name: str,
    request: pytest.FixtureRequest,
    stack: StackClient,
    published: dict[str, Published],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Images keep the primary's name; with ``geo-route client-config``'s file the real client pulls
    them from the site (containerd adds ``?ns=PRIMARY`` to every request to a mirror), all local."""
    entry = published["oci"]
    reference = f"{stack.primary}/{entry.repository}:v1"
    since = stack.access_log_offset()
    if name == "ctr":
        hosts = tmp_path_factory.mktemp("certs.d")
        (hosts / stack.primary).mkdir(parents=True)
        (hosts / stack.primary / "hosts.toml").write_text(client_config_text(stack, "containerd"))
        containerd = request.getfixturevalue("docker_daemon").containerd
        containerd.remove_all_images()
        assert containerd.pull(reference, stack.credentials(), hosts_dir=hosts) == entry.digest
    else:
        podman = Podman(tmp_path_factory.mktemp("pm"))
        podman.add_registries_conf(client_config_text(stack, "podman"))
        for registry in (stack.primary, stack.secondary):  # one password, both names (the file says so)
            podman.login(registry, stack.credentials())
        assert podman.pull(reference) == entry.digest
    served = answered(registry_entries(stack, entry.repository, since))
    assert_pulled_from(served, "local", set(entry.blobs))
    if name == "ctr":
        assert all(e.uri.endswith(f"?ns={stack.primary.replace(':', '%3A')}") for e in served), served


def test_a_docker_daemon_keeps_everything_in_its_directory_and_stops_by_pid(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    directory = tmp_path_factory.mktemp("dockerd")
    had_docker0 = Path("/sys/class/net/docker0").exists()
    with DockerDaemon(directory) as daemon:
        assert daemon.logged is not None and daemon.containerd.logged is not None
        pids = (daemon.logged.pid, daemon.containerd.logged.pid)
        info = json.loads(daemon.docker(["info", "--format", "{{json .}}"]))
        assert (info["Driver"], info["DockerRootDir"]) == ("vfs", str(directory / "data"))
        assert Path("/sys/class/net/docker0").exists() == had_docker0, "dockerd added docker0"
        assert (directory / "key.json").exists() and (directory / "containerd" / "root").is_dir()
    assert all(is_gone(pid) for pid in pids)
