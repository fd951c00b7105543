"""Blobs and manifests from the local registry's storage (local_registry.storage_root),
differential: the same requests straight at the real docker-registry and through the site, which
sends the blob or manifest from the registry's files itself. Identical status, body and headers;
the same outcome for every refusal; the registry (then the primary) for anything NGINX cannot
answer as the registry does. Manifests come in every format (Docker schema 2 and list, OCI
manifest and index, an OCI manifest without a mediaType), under every kind of Accept.

One stack for the module (refetch memory off: the same address fetches each blob many times here,
and a refetch is served by the registry while it is verified, by design). Without the repository
link check in NGINX, ``test_without_the_repositorys_link_the_file_is_not_sent`` fails (the file is
sent to a repository the registry refuses it to), and without the revision link check
``test_without_the_repositorys_revision_link_a_manifest_is_not_sent``.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from test_attacks import ATTACKS, VALID_ON_3, attack_tokens, claims, grant, refusal, send, signed
from test_attacks import REPO_A as ATTACKED

from geo_route.config import load_settings
from geo_route.devstack.client import AccessLogEntry, StackClient, address_of, started_stack
from geo_route.devstack.images import OciImage, build_oci_image
from geo_route.devstack.keys import load_private_key
from geo_route.devstack.processes import HttpAnswer
from geo_route.devstack.registry import registry_binary, registry_major_version
from geo_route.devstack.stack import READER, READER_REPOSITORY
from geo_route.index.model import BlobPresence, ContentVerified, ManifestPresence
from geo_route.storage import blob_files, manifest_files

pytestmark = pytest.mark.integration

REPOSITORY = "group/app"
OTHER = READER_REPOSITORY  # replicated too, with its own layers (the base layer is shared)
# Compared as the registry sends them; Date, Server and Connection are NGINX's on every answer.
LISTED = (
    "Content-Length",
    "Content-Type",
    "Content-Range",
    "Accept-Ranges",
    "Etag",
    "Cache-Control",
    "Docker-Content-Digest",
    "Docker-Distribution-Api-Version",
    "X-Content-Type-Options",
)
HOP_HEADERS = {"date", "server", "connection", "keep-alive"}


@dataclass(frozen=True)
class Answer:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def listed(self) -> dict[str, list[str]]:
        return {name: [v for k, v in self.headers if k.lower() == name.lower()] for name in LISTED}

    def names(self) -> list[str]:
        return sorted(k.lower() for k, _ in self.headers if k.lower() not in HOP_HEADERS)


@dataclass(frozen=True)
class Site:
    client: StackClient
    image: OciImage
    other: OciImage
    storage: Path

    @property
    def layer(self) -> str:
        """A layer only ``REPOSITORY`` has (layer 0 is shared with ``OTHER``)."""
        return self.image.layers[1].digest


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    directory = tmp_path_factory.mktemp("sendfile")
    storage = directory / "stack" / "secondary" / "storage"
    overrides = {
        "local_registry": {"storage_root": str(storage)},
        "routing": {"refetch_window": 0},
        "updater": {"verify_bytes_per_second": 0},
        # A loaded machine's Redis answering later than 50 ms would route a blob to the primary.
        "redis": {"socket_timeout": 0.5},
    }
    with started_stack(directory / "stack", site_overrides=overrides) as client:
        image = build_oci_image(directory / "image", "v1", layer_count=3, layer_bytes=300_000)
        other = build_oci_image(directory / "other", "v1", variant="other", layer_count=2, layer_bytes=50_000)
        client.push(image, REPOSITORY, "v1")
        client.push(other, OTHER, "v1")
        client.push(image, ATTACKED, "v1")  # test_attacks.py's tokens grant this repository
        for repository in (REPOSITORY, OTHER, ATTACKED):
            client.replicate(repository, ["v1"])
        yield Site(client, image, other, storage)


Headers = dict[str, str] | list[tuple[str, str]]  # as pairs, a name may repeat (several Accept headers)


def ask(url: str, method: str, path: str, headers: Headers, body: bytes | None = None) -> Answer:
    """One request on a fresh connection; a body cut short (the registry's 416 declares the blob's
    length and sends a line) is what arrived."""
    connection = http.client.HTTPConnection(address_of(url), timeout=30)
    try:
        connection.putrequest(method, path)
        for name, value in headers.items() if isinstance(headers, dict) else headers:
            connection.putheader(name, value)
        if body is not None:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        try:
            received = response.read()
        except http.client.IncompleteRead as short:
            received = short.partial
        return Answer(response.status, tuple(response.getheaders()), received)
    finally:
        connection.close()


def both(site: Site, method: str, path: str, headers: Headers) -> tuple[Answer, Answer, AccessLogEntry]:
    """(straight at the local registry, through the site, the site's access log entry)."""
    direct = ask(site.client.info.local_registry_url, method, path, headers)
    offset = site.client.access_log_offset()
    through = ask(site.client.info.secondary_url, method, path, headers)
    entries = site.client.access_log(offset)
    assert len(entries) == 1, entries
    return direct, through, entries[0]


def bearer(site: Site, scope: str, user: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {site.client.token(scope, user)}"}


def from_storage(entry: AccessLogEntry) -> bool:
    """NGINX answered a local blob itself: no registry was asked."""
    return entry.route == "local" and entry.reason == "blob-local" and entry.upstream == ""


BOUNDARY = re.compile(rb"boundary=([0-9a-f]+)")


def without_boundary(answer: Answer) -> Answer:
    """A multipart answer with its random boundary replaced (Go draws a new one each time)."""
    headers = tuple((k, BOUNDARY.sub(b"boundary=B", v.encode()).decode()) for k, v in answer.headers)
    match = BOUNDARY.search(next((v for k, v in answer.headers if k.lower() == "content-type"), "").encode())
    body = answer.body.replace(match.group(1), b"B") if match else answer.body
    return Answer(answer.status, headers, body)


# (method, extra request headers, served from storage): every other request is the registry's.
SERVED = [
    ("GET", {}, True),
    ("HEAD", {}, True),
    ("GET", {"Range": "bytes=0-99"}, True),  # the first bytes
    ("GET", {"Range": "bytes=-100"}, True),  # suffix
    ("GET", {"Range": "bytes=100-"}, True),  # open-ended
    ("GET", {"Range": "bytes=0-"}, True),
    ("GET", {"Range": "bytes=-99999999"}, True),  # a suffix longer than the blob: all of it, as 206
    ("GET", {"Range": "bytes=200-99999999"}, True),  # an end past the blob
    ("HEAD", {"Range": "bytes=0-99"}, True),
    ("GET", {"Range": ""}, True),  # an empty Range is no range
    ("GET", {"Range": "bytes=99999999-"}, False),  # unsatisfiable: 416
    ("GET", {"Range": "bytes=-0"}, False),
    ("GET", {"Range": "bytes=5-2"}, False),
    ("GET", {"Range": "BYTES=0-1"}, False),  # Go is case-sensitive here, NGINX is not
    ("GET", {"Range": "items=0-1"}, False),
    ("GET", {"Range": "bytes= 0-1"}, False),
    ("GET", {"Range": "bytes=0-1,5-6"}, False),  # multipart
    ("GET", {"If-None-Match": '"{digest}"'}, False),  # 304
    ("GET", {"If-None-Match": '"sha256:other"'}, False),
    ("GET", {"If-Match": '"{digest}"'}, False),
    ("GET", {"If-Range": '"{digest}"', "Range": "bytes=0-9"}, False),
    ("GET", {"If-Modified-Since": "Mon, 01 Jan 2024 00:00:00 GMT"}, False),
]


@pytest.mark.parametrize(("method", "extra", "stored"), SERVED, ids=lambda v: repr(v) if isinstance(v, dict) else v)
def test_the_site_answers_exactly_as_the_registry(site: Site, method: str, extra: dict[str, str], stored: bool) -> None:
    digest = site.layer
    headers = {**bearer(site, f"repository:{REPOSITORY}:pull")}
    headers.update({name: value.replace("{digest}", digest) for name, value in extra.items()})
    direct, through, entry = both(site, method, f"/v2/{REPOSITORY}/blobs/{digest}", headers)
    direct, through = without_boundary(direct), without_boundary(through)
    assert (through.status, through.listed(), through.names()) == (direct.status, direct.listed(), direct.names())
    assert through.body == direct.body
    assert from_storage(entry) is stored, entry


def test_every_blob_of_a_pull_comes_from_storage(site: Site, tmp_path: Path) -> None:
    offset = site.client.access_log_offset()
    assert site.client.pull(REPOSITORY, "v1", tmp_path / "pulled") == site.image.digest
    blobs = [entry for entry in site.client.access_log(offset) if "/blobs/" in entry.uri and entry.method == "GET"]
    assert len(blobs) == len(site.image.blob_digests)
    assert all(from_storage(entry) and entry.status == 200 for entry in blobs), blobs


def outcome(answer: Answer) -> str:
    return "served" if answer.status in (200, 206) else f"refused {answer.status}"


REFUSALS = {
    "no token": lambda site: {},
    "a token for another repository": lambda site: bearer(site, f"repository:{OTHER}:pull"),
    "another user's token for this repository": lambda site: bearer(site, f"repository:{REPOSITORY}:pull", READER),
    "push only": lambda site: bearer(site, f"repository:{REPOSITORY}:push"),
    "a malformed token": lambda site: {"Authorization": "Bearer not.a.token"},
}


def content_path(site: Site, repository: str, kind: str) -> str:
    """A blob only ``repository`` and ATTACKED hold, or their image's manifest by digest or tag."""
    return {
        "blob": f"/v2/{repository}/blobs/{site.layer}",
        "manifest": f"/v2/{repository}/manifests/{site.image.digest}",
        "tag": f"/v2/{repository}/manifests/v1",
    }[kind]


@pytest.mark.parametrize("kind", ["blob", "manifest", "tag"])
@pytest.mark.parametrize("case", sorted(REFUSALS))
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_what_the_registry_refuses_is_refused(site: Site, case: str, method: str, kind: str) -> None:
    headers = {**REFUSALS[case](site), "Accept": site.image.manifest.media_type}
    direct, through, entry = both(site, method, content_path(site, REPOSITORY, kind), headers)
    assert outcome(through) == outcome(direct) == "refused 401"
    assert through.body == direct.body and entry.route == ""


def test_a_blob_of_another_repository_is_not_served_from_this_one(site: Site) -> None:
    """In storage, not linked to OTHER: the index says so, and the registry's answer is 404."""
    path = f"/v2/{OTHER}/blobs/{site.layer}"
    direct, through, entry = both(site, "GET", path, bearer(site, f"repository:{OTHER}:pull"))
    assert outcome(through) == outcome(direct) == "refused 404"
    assert not from_storage(entry) and entry.reason == "blob-not-local"


@contextlib.contextmanager
def index_claims_present(
    site: Site, repository: str, digest: str, presence: type[BlobPresence | ManifestPresence] = BlobPresence
) -> Iterator[None]:
    site.client.index.apply([presence(repository, digest, True)])
    try:
        yield
    finally:
        site.client.index.apply([presence(repository, digest, False)])


def test_without_the_repositorys_link_the_file_is_not_sent(site: Site) -> None:
    """The index wrongly claims OTHER holds the blob (a lost event): the file is in storage, but
    OTHER has no link to it, so, as the registry does, it is not served to OTHER."""
    files = blob_files(OTHER, site.layer)
    assert files is not None and not (site.storage / files.link.lstrip("/")).exists()
    assert (site.storage / files.data.lstrip("/")).exists()
    with index_claims_present(site, OTHER, site.layer):
        path = f"/v2/{OTHER}/blobs/{site.layer}"
        for method in ("GET", "HEAD"):
            direct, through, entry = both(site, method, path, bearer(site, f"repository:{OTHER}:pull"))
            assert outcome(through) == outcome(direct) == "refused 404"
            assert entry.reason == "blob-local" and entry.route == "fallback", entry  # the registry, then the primary


@contextlib.contextmanager
def moved_away(path: Path) -> Iterator[None]:
    aside = path.with_name(path.name + ".aside")
    os.rename(path, aside)
    try:
        yield
    finally:
        os.rename(aside, path)


def test_a_missing_file_falls_back_to_the_registry_then_the_primary(site: Site) -> None:
    files = blob_files(REPOSITORY, site.layer)
    assert files is not None
    headers = bearer(site, f"repository:{REPOSITORY}:pull")
    with moved_away(site.storage / files.data.lstrip("/")):
        direct, through, entry = both(site, "GET", f"/v2/{REPOSITORY}/blobs/{site.layer}", headers)
    assert direct.status == 404  # the local registry has lost it too
    assert through.status == 200 and "sha256:" + hashlib.sha256(through.body).hexdigest() == site.layer
    assert (entry.route, entry.fallback_status) == ("fallback", "404")


@contextlib.contextmanager
def corrupted(path: Path) -> Iterator[None]:
    original = path.read_bytes()
    path.write_bytes(bytes(b ^ 0xFF for b in original[:64]) + original[64:])
    try:
        yield
    finally:
        path.write_bytes(original)


def test_a_quarantined_blob_is_not_sent_from_storage(site: Site) -> None:
    """The verifier found the local copy bad: the registry would still send it (2.8 does not check
    on read); the site sends the primary's."""
    digest = site.image.config.digest
    files = blob_files(REPOSITORY, digest)
    assert files is not None
    headers = bearer(site, f"repository:{REPOSITORY}:pull")
    with corrupted(site.storage / files.data.lstrip("/")):
        site.client.index.apply([ContentVerified(REPOSITORY, digest, intact=False)])
        try:
            direct, through, entry = both(site, "GET", f"/v2/{REPOSITORY}/blobs/{digest}", headers)
        finally:
            site.client.index.apply([ContentVerified(REPOSITORY, digest, intact=True)])
    assert outcome(through) == outcome(direct) == "served"
    assert "sha256:" + hashlib.sha256(direct.body).hexdigest() != digest
    assert "sha256:" + hashlib.sha256(through.body).hexdigest() == digest
    assert (entry.route, entry.reason) == ("primary", "blob-quarantined")


# -- test_attacks.py's token attacks and path tricks, against blobs sent from storage


@dataclass(frozen=True)
class Forger:
    """What ``test_attacks.attack_tokens`` needs: the stack's signing key and its certificate."""

    key: rsa.RSAPrivateKey
    certificate_pem: bytes


@pytest.fixture(scope="module")
def forger(site: Site) -> Forger:
    settings = load_settings(site.client.info.site_file, environ={})
    key = load_private_key(Path(settings.updater.signing_key))
    assert isinstance(key, rsa.RSAPrivateKey)
    return Forger(key, Path(settings.token.rootcertbundle).read_bytes())


@pytest.fixture(scope="module")
def forged(forger: Forger) -> dict[str, str]:
    """Every attack's token, made once (the outsider key is a fresh RSA key)."""
    return attack_tokens(forger)  # type: ignore[arg-type]


def sent(url: str, method: str, uri: str, token: str | None) -> HttpAnswer:
    return send(None, url, method, uri, token)  # type: ignore[arg-type]  # its site argument is unused


def test_a_valid_token_of_the_attacks_repository_gets_the_blob_from_storage(site: Site, forger: Forger) -> None:
    """The positive control: the attacks below are refused for what they forge, nothing else."""
    token = signed(forger.key, claims([grant(ATTACKED, "pull")]))
    offset = site.client.access_log_offset()
    answer = sent(site.client.info.secondary_url, "GET", f"/v2/{ATTACKED}/blobs/{site.layer}", token)
    assert answer.status == 200 and "sha256:" + hashlib.sha256(answer.body).hexdigest() == site.layer
    assert [from_storage(entry) for entry in site.client.access_log(offset)] == [True]


@pytest.mark.parametrize("kind", ["blob", "manifest"])
@pytest.mark.parametrize("attack", ATTACKS)
def test_a_bad_token_gets_the_local_registrys_refusal(
    site: Site, forged: dict[str, str], attack: str, kind: str
) -> None:
    token = forged[attack]
    uri = content_path(site, ATTACKED, kind)
    # A valid token on Distribution 3 (test_attacks.VALID_ON_3: aud as a list): served as the registry serves it.
    valid_here = attack in VALID_ON_3 and registry_major_version(registry_binary()) >= 3
    for method in ("GET", "HEAD"):
        offset = site.client.access_log_offset()
        through = refusal(sent(site.client.info.secondary_url, method, uri, token))
        direct = refusal(sent(site.client.info.local_registry_url, method, uri, token))
        assert through == direct and through[0] == (200 if valid_here else 401), (attack, through, direct)
        routes = [(e.route, e.upstream) for e in site.client.access_log(offset)]
        assert routes == ([("local", "")] if valid_here else [("", "")]), routes  # from storage, or refused


# A token for ATTACKED; URIs that try to reach a blob only OTHER holds (``{b}``).
BLOB_TRICKS = [
    "/v2/{a}/blobs/{b}",  # in storage, not linked to ATTACKED
    "/v2/{a}/../../v2/{other}/blobs/{b}",
    "/v2/{a}/blobs/../../{other}/blobs/{b}",
    "/v2/{a}/blobs/{a_blob}/../../../../{other}/blobs/{b}",
    "/v2/{a}/blobs/{b};/../../../../{other}/blobs/{b}",
    "/v2/{a}/blobs/{b}%23/../../../../{other}",
    "/v2/{a}/blobs/{b}?/../../../../{other}/blobs/{b}",
    "/v2/{other_escaped}/blobs/{b}",
    "/v2/{other}/blobs/{b}?scope=repository:{a}:pull",
    "/v2/{a}/blobs/{b}#/v2/{other}/blobs/{b}",
]


@pytest.mark.parametrize("template", BLOB_TRICKS)
def test_a_path_trick_never_gets_another_repositorys_blob(site: Site, forger: Forger, template: str) -> None:
    other_only = site.other.config.digest
    uri = template.format(
        a=ATTACKED,
        other=OTHER,
        other_escaped=OTHER.replace("/", "%2f"),
        b=other_only,
        a_blob=site.layer,
    )
    token = signed(forger.key, claims([grant(ATTACKED, "pull")]))
    offset = site.client.access_log_offset()
    answer = sent(site.client.info.secondary_url, "GET", uri, token)
    assert "sha256:" + hashlib.sha256(answer.body).hexdigest() != other_only, f"{uri} served {OTHER}'s blob"
    assert not any(from_storage(entry) for entry in site.client.access_log(offset)), uri


# -- manifests from storage (@geo_route_storage_manifest): by digest, and a tag by its pinned digest

FORMATS = "group/formats"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
ACCEPT_ALL = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))
MANIFEST_REASONS = ("manifest-local", "tag-pinned")


@dataclass(frozen=True)
class Formats:
    """Tags of FORMATS, each replicated: tag -> (digest, media type; "" for a manifest without one)."""

    tags: dict[str, tuple[str, str]]


def put_manifest(site: Site, tag: str, body: dict[str, object], content_type: str = "") -> tuple[str, int]:
    """PUT a manifest to the primary through the site; (its digest, its size)."""
    data = json.dumps(body, indent=3).encode()  # not canonical: the bytes served must be the stored ones
    content_type = content_type or str(body["mediaType"])
    headers = {**bearer(site, f"repository:{FORMATS}:push,pull"), "Content-Type": content_type}
    answer = ask(site.client.info.secondary_url, "PUT", f"/v2/{FORMATS}/manifests/{tag}", headers, data)
    assert answer.status == 201, (tag, answer.status, answer.body)
    return "sha256:" + hashlib.sha256(data).hexdigest(), len(data)


@pytest.fixture(scope="module")
def formats(site: Site) -> Formats:
    """An OCI manifest (pushed by skopeo) and, PUT by hand over the same blobs, a Docker schema 2
    manifest, a Docker manifest list, an OCI index and an OCI manifest without a mediaType."""
    image = site.image
    config = {"size": image.config.size, "digest": image.config.digest}
    layers = [{"size": layer.size, "digest": layer.digest} for layer in image.layers]
    manifests = {"oci": (site.client.push(image, FORMATS, "oci"), image.manifest.size)}
    docker = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", **config},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", **layer} for layer in layers],
    }
    manifests["docker"] = put_manifest(site, "docker", docker)
    tags = {"oci": (manifests["oci"][0], OCI_MANIFEST), "docker": (manifests["docker"][0], DOCKER_MANIFEST)}
    platform = {"architecture": "amd64", "os": "linux"}
    for tag, media_type, child, child_type in (
        ("list", DOCKER_LIST, "docker", DOCKER_MANIFEST),
        ("index", OCI_INDEX, "oci", OCI_MANIFEST),
    ):
        digest, size = manifests[child]
        entry = {"mediaType": child_type, "size": size, "digest": digest, "platform": platform}
        tags[tag] = (
            put_manifest(site, tag, {"schemaVersion": 2, "mediaType": media_type, "manifests": [entry]})[0],
            media_type,
        )
    bare = {
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer} for layer in layers],
    }
    tags["bare"] = (put_manifest(site, "bare", bare, OCI_MANIFEST)[0], "")
    site.client.replicate(FORMATS, sorted(tags))
    return Formats(tags)


def manifest_from_storage(entry: AccessLogEntry) -> bool:
    """NGINX answered a local manifest itself: no registry was asked."""
    return entry.route == "local" and entry.reason in MANIFEST_REASONS and entry.upstream == ""


# (Accept headers, whether the manifest's own type must be among them to be served from storage)
# "{type}" is the requested manifest's media type; every other request is the registry's.
ACCEPTS: list[tuple[str, list[str], bool]] = [
    ("its type", ["{type}"], True),
    ("every type", [ACCEPT_ALL], True),
    ("one header per type", [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST], True),
    ("spaces and tabs", [" \t{type}\t , text/plain"], True),
    ("a q parameter", ["{type}; q=0.5"], False),
    ("upper case", ["{TYPE}"], False),
    ("*/*", ["*/*"], False),
    ("none", [], False),
    ("another type only", ["application/json"], False),
]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize(("accept", "values", "stored"), ACCEPTS, ids=[case[0] for case in ACCEPTS])
@pytest.mark.parametrize("tag", ["oci", "docker", "list", "index", "bare"])
def test_a_manifest_by_digest_is_answered_exactly_as_the_registry(
    site: Site, formats: Formats, tag: str, accept: str, values: list[str], stored: bool, method: str
) -> None:
    """Answered from storage only when the Accept names the manifest's own mediaType, as is."""
    digest, media_type = formats.tags[tag]
    headers = bearer(site, f"repository:{FORMATS}:pull")
    pairs = list(headers.items())
    pairs += [("Accept", v.replace("{type}", media_type).replace("{TYPE}", media_type.upper())) for v in values]
    direct, through, entry = both(site, method, f"/v2/{FORMATS}/manifests/{digest}", pairs)
    assert (through.status, through.listed(), through.names()) == (direct.status, direct.listed(), direct.names())
    assert through.body == direct.body
    assert manifest_from_storage(entry) is (stored and media_type != ""), (entry, direct.status)


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("accept", ["its type", "every type", "one header per type"])
@pytest.mark.parametrize("tag", ["oci", "docker", "list", "index"])
def test_a_pinned_tag_is_answered_from_storage_exactly_as_the_registry(
    site: Site, formats: Formats, tag: str, accept: str, method: str
) -> None:
    """By tag, the site answers with the manifest the tag is pinned to, as the registry does by tag."""
    media_type = formats.tags[tag][1]
    values = next(values for name, values, _ in ACCEPTS if name == accept)
    pairs = [*bearer(site, f"repository:{FORMATS}:pull").items()]
    pairs += [("Accept", value.replace("{type}", media_type)) for value in values]
    direct, through, entry = both(site, method, f"/v2/{FORMATS}/manifests/{tag}", pairs)
    assert (through.status, through.listed(), through.names()) == (direct.status, direct.listed(), direct.names())
    assert through.body == direct.body and through.status == 200
    assert manifest_from_storage(entry) and entry.reason == "tag-pinned", entry


@pytest.mark.parametrize(
    "extra",
    [
        {"If-None-Match": '"{digest}"'},
        {"If-None-Match": '"sha256:other"'},
        {"If-Match": '"{digest}"'},
        {"If-Modified-Since": "Mon, 01 Jan 2024 00:00:00 GMT"},
    ],
    ids=repr,
)
@pytest.mark.parametrize("reference", ["digest", "tag"])
def test_a_conditional_manifest_request_is_the_registrys(
    site: Site, formats: Formats, reference: str, extra: dict[str, str]
) -> None:
    digest, media_type = formats.tags["oci"]
    pairs = [*bearer(site, f"repository:{FORMATS}:pull").items(), ("Accept", media_type)]
    pairs += [(name, value.replace("{digest}", digest)) for name, value in extra.items()]
    path = f"/v2/{FORMATS}/manifests/{digest if reference == 'digest' else 'oci'}"
    direct, through, entry = both(site, "GET", path, pairs)
    assert (through.status, through.listed(), through.names()) == (direct.status, direct.listed(), direct.names())
    assert through.body == direct.body
    assert entry.route == "local" and entry.upstream != "", entry


def test_without_the_repositorys_revision_link_a_manifest_is_not_sent(site: Site, formats: Formats) -> None:
    """The index wrongly claims OTHER holds FORMATS' manifest: its file is in storage, but OTHER has
    no revision link to it, so, as the registry does, it is not served to OTHER."""
    digest, media_type = formats.tags["oci"]
    files = manifest_files(OTHER, digest)
    assert files is not None and not (site.storage / files.link.lstrip("/")).exists()
    assert (site.storage / files.data.lstrip("/")).exists()
    with index_claims_present(site, OTHER, digest, ManifestPresence):
        for method in ("GET", "HEAD"):
            pairs = [*bearer(site, f"repository:{OTHER}:pull").items(), ("Accept", media_type)]
            direct, through, entry = both(site, method, f"/v2/{OTHER}/manifests/{digest}", pairs)
            assert outcome(through) == outcome(direct) == "refused 404"
            assert entry.reason == "manifest-local" and entry.route == "fallback", entry


def test_a_missing_manifest_file_falls_back_to_the_registry_then_the_primary(site: Site, formats: Formats) -> None:
    digest, media_type = formats.tags["docker"]
    files = manifest_files(FORMATS, digest)
    assert files is not None
    pairs = [*bearer(site, f"repository:{FORMATS}:pull").items(), ("Accept", media_type)]
    for reference in (digest, "docker"):
        with moved_away(site.storage / files.data.lstrip("/")):
            direct, through, entry = both(site, "GET", f"/v2/{FORMATS}/manifests/{reference}", pairs)
        assert direct.status != 200  # the local registry has lost it too
        assert through.status == 200 and "sha256:" + hashlib.sha256(through.body).hexdigest() == digest
        assert (entry.route, entry.upstream != "") == ("fallback", True), entry


def test_every_manifest_of_a_pull_comes_from_storage(site: Site, tmp_path: Path) -> None:
    """skopeo by tag: the tag's manifest and every blob, with no registry asked."""
    offset = site.client.access_log_offset()
    assert site.client.pull(REPOSITORY, "v1", tmp_path / "pulled") == site.image.digest
    reads = [
        e
        for e in site.client.access_log(offset)
        if e.method == "GET" and ("/blobs/" in e.uri or "/manifests/" in e.uri)
    ]
    manifests = [entry for entry in reads if "/manifests/" in entry.uri]
    assert manifests and all(manifest_from_storage(entry) for entry in manifests), manifests
    assert all(from_storage(entry) or manifest_from_storage(entry) for entry in reads), reads


@pytest.mark.parametrize(
    "extra", [{"Range": "bytes=0-9"}, {"Range": "bytes=-5"}, {"Accept-Encoding": "gzip"}], ids=repr
)
def test_a_manifest_range_or_encoding_is_ignored_as_the_registry_ignores_it(
    site: Site, formats: Formats, extra: dict[str, str]
) -> None:
    """The registry answers a manifest whole, whatever the Range or Accept-Encoding: so does NGINX."""
    digest, media_type = formats.tags["oci"]
    pairs = [*bearer(site, f"repository:{FORMATS}:pull").items(), ("Accept", media_type), *extra.items()]
    direct, through, entry = both(site, "GET", f"/v2/{FORMATS}/manifests/{digest}", pairs)
    assert (through.status, through.listed(), through.names()) == (direct.status, direct.listed(), direct.names())
    assert through.body == direct.body and through.status == 200
    assert manifest_from_storage(entry), entry
