"""The auth subrequest carries only what the decision needs (issue 11, item 5), through real NGINX.

A client may send any number of headers holding any bytes NGINX accepts. Before, NGINX forwarded
them all to the auth service, whose HTTP server (gunicorn) refuses more than 100 header fields (431)
and control bytes (400): the request skipped the decision and went to the primary as if the
service were down. Now the subrequest holds the method, the raw URI, ``Authorization`` and every
``Accept`` header joined (the service negotiates pinned tags with it), so the service decides.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from geo_route.devstack.client import AccessLogEntry, StackClient, started_stack
from geo_route.devstack.images import MANIFEST_MEDIA_TYPE, OciImage, build_oci_image
from geo_route.negotiation import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST

REPOSITORY = "subrequest/app"
EXTRA_HEADERS = 150
NOT_DECIDED = {"", "auth-unavailable", "internal-error"}


@dataclass(frozen=True)
class Published:
    client: StackClient
    image: OciImage
    token: str


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Published]:
    work = tmp_path_factory.mktemp("subrequest")
    with started_stack(work / "stack") as client:
        image = build_oci_image(work / "image", "v1", layer_count=1)
        client.push(image, REPOSITORY, "v1")
        client.replicate(REPOSITORY)
        client.wait_for_pin(REPOSITORY, "v1", image.digest, present=True)
        yield Published(client, image, client.token(f"repository:{REPOSITORY}:pull"))


def raw_get(client: StackClient, uri: str, headers: list[tuple[str, bytes]]) -> int:
    """GET over a plain socket (http.client refuses control bytes in header values); the status."""
    host, port = client.info.secondary_url.removeprefix("http://").rsplit(":", 1)
    lines = [f"GET {uri} HTTP/1.1".encode(), f"Host: {host}:{port}".encode(), b"Connection: close"]
    lines += [name.encode() + b": " + value for name, value in headers]
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def filler(count: int) -> list[tuple[str, bytes]]:
    return [(f"X-Filler-{n}", f"value {n}".encode()) for n in range(count)]


def file_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def decided(published: Published, uri: str, headers: list[tuple[str, bytes]]) -> tuple[int, AccessLogEntry, str]:
    """Send one request; its status, its access log entry and what the auth service and NGINX logged meanwhile."""
    client = published.client
    assert client.stack is not None
    logs = [client.stack.processes["auth"].log_path, Path(client.info.directory) / "nginx" / "error.log"]
    sizes = [file_size(path) for path in logs]
    since = client.access_log_offset()
    authorization = [("Authorization", f"Bearer {published.token}".encode())]
    status = raw_get(client, uri, authorization + headers)
    entries = [e for e in client.access_log(since) if e.uri == uri]
    assert len(entries) == 1, entries
    logged = ""
    for path, size in zip(logs, sizes, strict=True):
        with open(path, "rb") as stream:
            stream.seek(size)
            logged += stream.read().decode("utf-8", "replace")
    return status, entries[0], logged


def error_lines(logged: str) -> list[str]:
    markers = ("error", "invalid", "warn", "crit", "alert", "431", "400", "unexpected status")
    return [line for line in logged.splitlines() if any(marker in line.lower() for marker in markers)]


def manifest_uri() -> str:
    return f"/v2/{REPOSITORY}/manifests/v1"


# A blob served here: the first GET from an address, or a refetch of it (routing.refetch_window).
LOCAL_BLOB = {"blob-local", "blob-verifying"}


def blob_uri(published: Published) -> str:
    return f"/v2/{REPOSITORY}/blobs/{published.image.layers[0].digest}"


def test_a_pull_with_150_extra_headers_is_decided(published: Published) -> None:
    accept = [("Accept", MANIFEST_MEDIA_TYPE.encode())]
    status, entry, logged = decided(published, manifest_uri(), accept + filler(EXTRA_HEADERS))
    assert (status, entry.route, entry.reason) == (200, "local", "tag-pinned")
    assert error_lines(logged) == []
    status, entry, logged = decided(published, blob_uri(published), filler(EXTRA_HEADERS))
    assert (status, entry.route) == (200, "local")
    assert entry.reason in LOCAL_BLOB, "decided (the same blob again from this address: a refetch)"
    assert error_lines(logged) == []


def test_a_control_byte_in_a_header_is_decided(published: Published) -> None:
    """The decision is made; the registry then judges the request itself (2.8 answers 400 to it)."""
    junk = [("X-Junk", b"a\x01b\x7fc")]
    accept = [("Accept", MANIFEST_MEDIA_TYPE.encode())]
    for uri, reasons in ((manifest_uri(), {"tag-pinned"}), (blob_uri(published), LOCAL_BLOB)):
        status, entry, logged = decided(published, uri, accept + junk)
        assert entry.route == "local" and entry.reason in reasons, entry
        assert entry.reason not in NOT_DECIDED and status in (200, 400)
        assert error_lines(logged) == []


def test_control_bytes_in_accept_or_authorization_are_still_decided(published: Published) -> None:
    """A control byte in a header the service reads: it answers (a tag goes to the primary, an
    invalid token gets the registry's 401) instead of failing."""
    status, entry, logged = decided(published, manifest_uri(), [("Accept", MANIFEST_MEDIA_TYPE.encode() + b"\x01")])
    assert entry.reason not in NOT_DECIDED and entry.route == "primary", entry
    assert error_lines(logged) == []
    client = published.client
    since = client.access_log_offset()
    token = f"Bearer {published.token}".encode()
    status = raw_get(client, blob_uri(published), [("Authorization", token[:-3] + b"\x02" + token[-2:])])
    assert status == 401
    entries = [e for e in client.access_log(since) if e.uri == blob_uri(published)]
    assert len(entries) == 1 and entries[0].route != "auth-unavailable", entries


@pytest.mark.parametrize(
    "accepts",
    [
        [DOCKER_MANIFEST, MANIFEST_MEDIA_TYPE],  # the pinned type in the second header
        [DOCKER_MANIFEST_LIST, DOCKER_MANIFEST, f"{DOCKER_MANIFEST}, {MANIFEST_MEDIA_TYPE}"],
    ],
    ids=["second", "third-joined"],
)
def test_several_accept_headers_still_get_the_pinned_tag(published: Published, accepts: list[str]) -> None:
    """Clients send one Accept header per type (skopeo, docker); NGINX 1.22's $http_accept is the
    first one only, so the subrequest joins them all."""
    headers = [("Accept", value.encode()) for value in accepts]
    status, entry, logged = decided(published, manifest_uri(), headers)
    assert (status, entry.route, entry.reason) == (200, "local", "tag-pinned")
    assert error_lines(logged) == []


def test_without_the_pinned_type_the_tag_goes_to_the_primary(published: Published) -> None:
    headers = [("Accept", DOCKER_MANIFEST.encode()), ("Accept", DOCKER_MANIFEST_LIST.encode())]
    _, entry, _ = decided(published, manifest_uri(), headers)
    assert entry.route == "primary" and entry.reason not in NOT_DECIDED, entry
