"""Blobs from the local registry's storage (local_registry.storage_root), differential: the same
requests straight at the real docker-registry and through the site, which sends the blob from the
registry's files itself. Identical status, body and headers; the same outcome for every refusal;
the registry (then the primary) for anything NGINX cannot answer as the registry does.

One stack for the module (refetch memory off: the same address fetches each blob many times here,
and a refetch is served by the registry while it is verified, by design). Without the repository
link check in NGINX, ``test_without_the_repositorys_link_the_file_is_not_sent`` fails (the file is
sent to a repository the registry refuses it to).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from test_attacks import ATTACKS, attack_tokens, claims, grant, refusal, send, signed
from test_attacks import REPO_A as ATTACKED

from geo_route.config import load_settings
from geo_route.devstack.client import AccessLogEntry, StackClient, address_of, started_stack
from geo_route.devstack.images import OciImage, build_oci_image
from geo_route.devstack.keys import load_private_key
from geo_route.devstack.processes import HttpAnswer
from geo_route.devstack.stack import READER, READER_REPOSITORY
from geo_route.index.model import BlobPresence, ContentVerified
from geo_route.storage import blob_files

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


def ask(url: str, method: str, path: str, headers: dict[str, str]) -> Answer:
    """One request on a fresh connection; a body cut short (the registry's 416 declares the blob's
    length and sends a line) is what arrived."""
    connection = http.client.HTTPConnection(address_of(url), timeout=30)
    try:
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        try:
            body = response.read()
        except http.client.IncompleteRead as short:
            body = short.partial
        return Answer(response.status, tuple(response.getheaders()), body)
    finally:
        connection.close()


def both(site: Site, method: str, path: str, headers: dict[str, str]) -> tuple[Answer, Answer, AccessLogEntry]:
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


@pytest.mark.parametrize("case", sorted(REFUSALS))
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_what_the_registry_refuses_is_refused(site: Site, case: str, method: str) -> None:
    direct, through, entry = both(site, method, f"/v2/{REPOSITORY}/blobs/{site.layer}", REFUSALS[case](site))
    assert outcome(through) == outcome(direct) == "refused 401"
    assert through.body == direct.body and entry.route == ""


def test_a_blob_of_another_repository_is_not_served_from_this_one(site: Site) -> None:
    """In storage, not linked to OTHER: the index says so, and the registry's answer is 404."""
    path = f"/v2/{OTHER}/blobs/{site.layer}"
    direct, through, entry = both(site, "GET", path, bearer(site, f"repository:{OTHER}:pull"))
    assert outcome(through) == outcome(direct) == "refused 404"
    assert not from_storage(entry) and entry.reason == "blob-not-local"


@contextlib.contextmanager
def index_claims_present(site: Site, repository: str, digest: str) -> Iterator[None]:
    site.client.index.apply([BlobPresence(repository, digest, True)])
    try:
        yield
    finally:
        site.client.index.apply([BlobPresence(repository, digest, False)])


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


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_bad_token_gets_the_local_registrys_refusal(site: Site, forged: dict[str, str], attack: str) -> None:
    token = forged[attack]
    uri = f"/v2/{ATTACKED}/blobs/{site.layer}"
    for method in ("GET", "HEAD"):
        offset = site.client.access_log_offset()
        through = refusal(sent(site.client.info.secondary_url, method, uri, token))
        direct = refusal(sent(site.client.info.local_registry_url, method, uri, token))
        assert through == direct and through[0] == 401, (attack, through, direct)
        assert [(e.route, e.upstream) for e in site.client.access_log(offset)] == [("", "")]


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
