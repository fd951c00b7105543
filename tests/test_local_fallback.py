"""Through real NGINX: a local answer that says "not from here" falls back to the primary once, and
NGINX's own 401 is the registry's 401, byte for byte.

Fallback: only GET/HEAD are ever routed to the local registry. When it answers 401 or 403 (e.g. its
token certificate bundle not rotated yet, clock skew past the leeway) or 429 (rate limiting), the
client gets the primary's answer, never the local refusal nor its challenge, and the access log
says ``fallback`` with the local status. The 401 comes from the real local registry, restarted with
a ``rootcertbundle`` that does not hold the signing key, so it refuses every valid token; Distribution
2.8 never answers 403 or 429 to a pull, so a small HTTP server of this module's own takes the local
registry's port for those. The primary's answer is final, whatever it is (no second fallback).

401 body: the registry lists the access it needed in the error's ``detail``; NGINX's 401 (made from
the auth service's answer) must be the very bytes the primary sends for the same request.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import http.server
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from geo_route.devstack.client import NOTIFICATION_WAIT, AccessLogEntry, StackClient, started_stack
from geo_route.devstack.images import OciImage, build_oci_image
from geo_route.devstack.keys import generate_signing_key
from geo_route.devstack.processes import HttpAnswer, wait_until
from geo_route.devstack.registry import bundle_jwks
from geo_route.devstack.replicate import replicate_image
from geo_route.devstack.skopeo import docker_reference
from geo_route.devstack.stack import READER, READER_REPOSITORY
from geo_route.index.model import BlobPresence, IndexQuery, QueryKind

pytestmark = pytest.mark.integration

REPOSITORY = "fallback/app"
MANIFEST_TYPES = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
LOCAL_PART = "secondary"


@dataclass(frozen=True)
class Site:
    client: StackClient
    image: OciImage
    untrusted_certificate: Path  # a certificate whose key signs no token of this stack


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("fallback")
    with started_stack(root / "stack") as client:
        built = build_oci_image(root / "image", "v1", variant="fallback", layer_count=2)
        client.push(built, REPOSITORY, "v1")
        replicate_content(client, built)
        # Positive control: with a healthy local registry every part of the pull is served locally.
        since = client.access_log_offset()
        assert pull_by_digest(client, built, root / "control") == built.digest
        assert {(e.route, e.status) for e in pulled(client, since)} == {("local", 200)}
        yield Site(client, built, generate_signing_key(root / "other-keys").certificate)


def replicate_content(client: StackClient, built: OciImage) -> None:
    """Copy the image to the local registry (GitLab Geo's job) and wait until the index, fed by the
    local registry's notifications, holds its manifest and blobs. Pulls here go by digest: what is
    routed locally then depends on local presence only, not on how tags are pinned."""
    creds = client.credentials()
    replicate_image(
        client.skopeo,
        client.primary,
        client.local_registry,
        REPOSITORY,
        ["v1"],
        source_creds=creds,
        destination_creds=creds,
    )
    wanted = [IndexQuery(QueryKind.MANIFEST, REPOSITORY, built.digest)]
    wanted += [IndexQuery(QueryKind.BLOB, REPOSITORY, digest) for digest in built.blob_digests]
    present = lambda: all(client.index.lookup(query).present for query in wanted)  # noqa: E731
    wait_until(present, NOTIFICATION_WAIT, f"the index to hold {REPOSITORY}@{built.digest[:19]} locally")


def pull_by_digest(client: StackClient, built: OciImage, layout: Path) -> str:
    """skopeo through the site, by digest; returns the digest of the manifest it wrote."""
    source = docker_reference(client.secondary, REPOSITORY, built.digest)
    return client.skopeo.copy(source, f"oci:{layout}:v1", src_creds=client.credentials())


def pulled(client: StackClient, since: int) -> list[AccessLogEntry]:
    """The blob and manifest requests of REPOSITORY logged after ``since``."""
    entries = client.access_log(since)
    return [
        e for e in entries if e.uri.startswith(f"/v2/{REPOSITORY}/") and ("/blobs/" in e.uri or "/manifests/" in e.uri)
    ]


def send(base_url: str, method: str, uri: str, token: str | None, headers: dict[str, str] | None = None) -> HttpAnswer:
    """One raw request, as curl would send it; any status is an answer."""
    connection = http.client.HTTPConnection(base_url.removeprefix("http://"), timeout=15)
    try:
        request_headers = {"Accept": MANIFEST_TYPES, **(headers or {})}
        if token is not None:
            request_headers["Authorization"] = f"Bearer {token}"
        if method in ("POST", "PUT", "PATCH"):
            request_headers["Content-Length"] = "0"
        connection.request(method, uri, headers=request_headers)
        response = connection.getresponse()
        return HttpAnswer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


def last_status(entry: AccessLogEntry) -> str:
    """The local registry's final answer in ``fallback_status`` ("502, 401" after a dead keep-alive connection)."""
    return entry.fallback_status.replace(" : ", ", ").split(", ")[-1]


# -- the local registry made to refuse: really (401), or by a stand-in on its port (403, 429)


@contextlib.contextmanager
def local_registry_trusting(site: Site, certificate: Path) -> Iterator[None]:
    """The local registry restarted with ``certificate`` as its token ``rootcertbundle`` (and, for a
    Distribution 3, which trusts its ``auth.token.jwks`` keys too, a JWKS of that certificate alone);
    restored after."""
    stack = site.client.stack
    assert stack is not None
    config = Path(site.client.info.directory) / LOCAL_PART / f"{LOCAL_PART}.yml"
    original = config.read_bytes()
    changed = yaml.safe_load(original)
    changed["auth"]["token"]["rootcertbundle"] = str(certificate)
    if "jwks" in changed["auth"]["token"]:
        changed["auth"]["token"]["jwks"] = str(bundle_jwks(certificate, certificate.with_suffix(".jwks")))
    stack.kill_part(LOCAL_PART)
    config.write_text(yaml.safe_dump(changed, sort_keys=False), encoding="utf-8")
    try:
        stack.restart_part(LOCAL_PART)
        yield
    finally:
        if stack.processes[LOCAL_PART].is_running():
            stack.kill_part(LOCAL_PART)
        config.write_bytes(original)
        stack.restart_part(LOCAL_PART)


class Refusing(http.server.ThreadingHTTPServer):
    """Answers every request with one status and a registry-style error body; records what it got.

    One request per connection: a kept-alive connection would outlive ``shutdown`` and keep
    answering NGINX after the registry is back.
    """

    daemon_threads = True

    def __init__(self, address: str, status: int, body: bytes, headers: dict[str, str]) -> None:
        host, port = address.rsplit(":", 1)
        self.status, self.body, self.extra_headers = status, body, headers
        self.requests: list[tuple[str, str]] = []
        super().__init__((host, int(port)), RefusingHandler)


class RefusingHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Refusing

    def answer(self) -> None:
        self.server.requests.append((self.command, self.path))
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(self.server.body)))
        self.send_header("Docker-Distribution-Api-Version", "registry/2.0")
        self.send_header("Connection", "close")
        self.close_connection = True
        for name, value in self.server.extra_headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(self.server.body)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = answer

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def refusing(address: str, status: int, body: bytes, headers: dict[str, str]) -> Iterator[Refusing]:
    """A ``Refusing`` server on ``address`` (a stopped registry's port) while inside."""
    server = Refusing(address, status, body, headers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextlib.contextmanager
def local_registry_replaced(site: Site, status: int, body: bytes, headers: dict[str, str]) -> Iterator[Refusing]:
    """The local registry killed and a ``Refusing`` server on its port; the registry restarted after."""
    stack = site.client.stack
    assert stack is not None
    stack.kill_part(LOCAL_PART)
    try:
        with refusing(site.client.local_registry, status, body, headers) as server:
            yield server
    finally:
        stack.restart_part(LOCAL_PART)


# -- fallback on 401/403/429


def assert_pull_falls_back(site: Site, tmp_path: Path, local_status: int) -> None:
    client = site.client
    since = client.access_log_offset()
    before = client.nginx_metrics()
    assert pull_by_digest(client, site.image, tmp_path / f"pulled-{local_status}") == site.image.digest
    entries = pulled(client, since)
    shown = "; ".join(f"{e.status} {e.route} {e.reason} {e.fallback_status}" for e in entries)
    assert len(entries) == 1 + len(site.image.blob_digests), shown
    assert {(e.route, e.status) for e in entries} == {("fallback", 200)}, shown
    assert {last_status(e) for e in entries} == {str(local_status)}, shown
    # NGINX's counters (only NGINX knows a fallback): at least these requests, by the local status.
    after = client.nginx_metrics()
    fallbacks = f'geo_route_nginx_fallbacks_total{{local_status="{local_status}"}}'
    served = 'geo_route_nginx_requests_total{route="fallback",status="2xx"}'
    sent = 'geo_route_nginx_sent_bytes_total{route="fallback"}'
    assert after[fallbacks] - before.get(fallbacks, 0) >= len(entries)
    assert after[served] - before.get(served, 0) >= len(entries)
    assert after[sent] - before.get(sent, 0) >= sum(e.bytes_sent for e in entries)


def test_a_local_401_falls_back_to_the_primary(site: Site, tmp_path: Path) -> None:
    with local_registry_trusting(site, site.untrusted_certificate):
        token = site.client.token(f"repository:{REPOSITORY}:pull")
        direct = send(
            site.client.info.local_registry_url, "GET", f"/v2/{REPOSITORY}/manifests/{site.image.digest}", token
        )
        assert direct.status == 401 and 'error="invalid_token"' in direct.headers["www-authenticate"]
        assert_pull_falls_back(site, tmp_path, 401)


def test_after_a_local_401_the_client_gets_the_primarys_answer_and_headers_only(site: Site) -> None:
    client = site.client
    token = client.token(f"repository:{REPOSITORY}:pull")
    uris = [f"/v2/{REPOSITORY}/manifests/{site.image.digest}", f"/v2/{REPOSITORY}/blobs/{site.image.layers[0].digest}"]
    with local_registry_trusting(site, site.untrusted_certificate):
        for uri in uris:
            for method in ("GET", "HEAD"):
                at_primary = send(client.info.primary_url, method, uri, token)
                through_site = send(client.info.secondary_url, method, uri, token)
                assert through_site.status == at_primary.status == 200, (method, uri, through_site)
                assert "www-authenticate" not in through_site.headers, (method, uri, through_site.headers)
                assert through_site.body == at_primary.body
                for header in ("content-type", "docker-content-digest", "docker-distribution-api-version"):
                    assert through_site.headers.get(header) == at_primary.headers.get(header), (method, uri, header)
        answer = send(client.info.secondary_url, "GET", uris[0], token)
        assert "sha256:" + hashlib.sha256(answer.body).hexdigest() == site.image.digest


def test_the_primarys_answer_after_a_fallback_is_final(site: Site) -> None:
    """The index claims a blob is here that exists nowhere: local 401, then the primary's 404 is the answer."""
    client = site.client
    phantom = "sha256:" + "f" * 64
    client.index.apply([BlobPresence(REPOSITORY, phantom, True)])
    token = client.token(f"repository:{REPOSITORY}:pull")
    uri = f"/v2/{REPOSITORY}/blobs/{phantom}"
    with local_registry_trusting(site, site.untrusted_certificate):
        since = client.access_log_offset()
        through_site = send(client.info.secondary_url, "GET", uri, token)
        at_primary = send(client.info.primary_url, "GET", uri, token)
        assert (through_site.status, through_site.body) == (at_primary.status, at_primary.body)
        assert at_primary.status == 404 and b"BLOB_UNKNOWN" in at_primary.body
        assert "www-authenticate" not in through_site.headers
        (entry,) = [e for e in client.access_log(since) if e.uri == uri]
        assert (entry.route, entry.status, last_status(entry)) == ("fallback", 404, "401")


REFUSALS = {
    403: (b'{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}\n', {}),
    429: (b'{"errors":[{"code":"TOOMANYREQUESTS","message":"too many requests"}]}\n', {"Retry-After": "60"}),
}


@pytest.mark.parametrize("status", sorted(REFUSALS))
def test_a_local_403_or_429_falls_back_to_the_primary_and_writes_never_reach_it(
    site: Site, tmp_path: Path, status: int
) -> None:
    body, headers = REFUSALS[status]
    with local_registry_replaced(site, status, body, headers) as stand_in:
        assert_pull_falls_back(site, tmp_path, status)
        assert any(f"/v2/{REPOSITORY}/blobs/" in path for _, path in stand_in.requests), "the stand-in was asked"
        uri = f"/v2/{REPOSITORY}/blobs/{site.image.layers[0].digest}"
        answer = send(site.client.info.secondary_url, "GET", uri, site.client.token(f"repository:{REPOSITORY}:pull"))
        assert answer.status == 200 and "retry-after" not in answer.headers
        # A push through the site while the local registry refuses: it goes to the primary only.
        pushed = build_oci_image(tmp_path / "pushed", "v2", variant=f"pushed-{status}", layer_count=1)
        assert site.client.push(pushed, REPOSITORY, f"pushed-{status}") == pushed.digest
        assert {method for method, _ in stand_in.requests} <= {"GET", "HEAD"}


# -- NGINX's own 401 is the registry's 401


def no_token(_: Site) -> str | None:
    return None


def malformed_token(_: Site) -> str | None:
    return "not.a.token"


def reader_token(site: Site) -> str | None:
    """A valid token for READER_REPOSITORY only: every other repository is insufficient scope."""
    return site.client.token(f"repository:{READER_REPOSITORY}:pull", user=READER)


ZERO = "sha256:" + "0" * 64
UNAUTHORIZED_CASES = {
    "base without a token": ("GET", "/v2/", no_token),
    "manifest without a token": ("GET", f"/v2/{REPOSITORY}/manifests/v1", no_token),
    "manifest HEAD without a token": ("HEAD", f"/v2/{REPOSITORY}/manifests/v1", no_token),
    "blob with a malformed token": ("GET", f"/v2/{REPOSITORY}/blobs/{ZERO}", malformed_token),
    "tags of another repository": ("GET", f"/v2/{REPOSITORY}/tags/list", reader_token),
    "push to the reader's repository": ("POST", f"/v2/{READER_REPOSITORY}/blobs/uploads/", reader_token),
    "mount from another repository": ("POST", f"/v2/{REPOSITORY}/blobs/uploads/?mount={ZERO}&from=other/app", no_token),
    "delete": ("DELETE", f"/v2/{REPOSITORY}/manifests/{ZERO}", reader_token),
    "catalog": ("GET", "/v2/_catalog", no_token),
}


@pytest.mark.parametrize("case", sorted(UNAUTHORIZED_CASES))
def test_nginx_answers_401_with_the_registrys_body_byte_for_byte(site: Site, case: str) -> None:
    method, uri, token_for = UNAUTHORIZED_CASES[case]
    token = token_for(site)
    client = site.client
    since = client.access_log_offset()
    through_site = send(client.info.secondary_url, method, uri, token)
    at_registry = send(client.info.primary_url, method, uri, token)
    assert at_registry.status == 401, at_registry
    assert (through_site.status, through_site.body) == (at_registry.status, at_registry.body)
    for header in ("content-type", "docker-distribution-api-version"):
        assert through_site.headers.get(header) == at_registry.headers.get(header), header
    if method != "HEAD":
        detail = json.loads(through_site.body)["errors"][0]["detail"]
        assert detail is None if uri == "/v2/" else detail, through_site.body

    def answered_by_nginx() -> bool:
        entries = [e for e in client.access_log(since) if e.uri == uri and e.method == method]
        return len(entries) == 1 and entries[0].reason in ("no-token", "invalid-token", "insufficient-scope")

    wait_until(answered_by_nginx, 5, f"the access log line of {method} {uri} (a 401 of the auth service)")
