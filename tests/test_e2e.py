"""End to end with skopeo through NGINX: real redis-server, two docker-registry, token service, gunicorn, nginx."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import stat
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from geo_route import contract
from geo_route.config import load_settings
from geo_route.devstack.client import AccessLogEntry, StackClient, started_stack
from geo_route.devstack.images import OciImage, build_oci_image
from geo_route.devstack.processes import descendants, wait_until
from geo_route.devstack.skopeo import SkopeoError, docker_reference
from geo_route.devstack.stack import READER, READER_REPOSITORY, StackInfo
from geo_route.index.model import BlobPresence, IndexUpdate, ManifestPresence


def started(directory: Path) -> Iterator[StackClient]:
    with started_stack(directory) as client:
        yield client


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackClient]:
    yield from started(tmp_path_factory.mktemp("stack"))


@pytest.fixture
def own(tmp_path: Path) -> Iterator[StackClient]:
    """A stack of this test's own, for tests that stop parts of it."""
    yield from started(tmp_path / "stack")


def image(tmp_path: Path, tag: str = "v1", variant: str = "") -> OciImage:
    return build_oci_image(tmp_path / f"image-{variant or 'base'}", tag, variant=variant, layer_count=3)


def pull_entries(client: StackClient, repository: str, since: int) -> list[AccessLogEntry]:
    return [
        e
        for e in client.access_log(since)
        if e.uri.startswith(f"/v2/{repository}/") and ("/blobs/" in e.uri or "/manifests/" in e.uri)
    ]


def published_replicated(client: StackClient, tmp_path: Path, repository: str) -> OciImage:
    built = image(tmp_path)
    client.push(built, repository, "v1")
    client.replicate(repository)
    return built


def test_a_push_through_the_secondary_lands_on_the_primary_only(shared: StackClient, tmp_path: Path) -> None:
    built = image(tmp_path)
    since = shared.access_log_offset()
    assert shared.push(built, "e2e/push", "v1") == built.digest
    assert shared.digest_at(shared.primary, "e2e/push", "v1") == built.digest
    with pytest.raises(SkopeoError):
        shared.digest_at(shared.local_registry, "e2e/push", "v1")
    writes = [e for e in shared.access_log(since) if e.method not in ("GET", "HEAD") and "/e2e/push/" in e.uri]
    assert writes and {e.route for e in writes} == {"primary"}


def test_a_pull_right_after_the_push_is_served_by_the_primary(shared: StackClient, tmp_path: Path) -> None:
    built = image(tmp_path)
    shared.push(built, "e2e/fresh", "v1")
    since = shared.access_log_offset()
    assert shared.pull("e2e/fresh", "v1", tmp_path / "out") == built.digest
    entries = pull_entries(shared, "e2e/fresh", since)
    assert entries and {e.route for e in entries} == {"primary"}
    assert all(e.status == 200 for e in entries)


def test_after_replication_every_blob_and_manifest_get_is_local(shared: StackClient, tmp_path: Path) -> None:
    built = published_replicated(shared, tmp_path, "e2e/replicated")
    since = shared.access_log_offset()
    assert shared.pull("e2e/replicated", "v1", tmp_path / "out") == built.digest
    entries = pull_entries(shared, "e2e/replicated", since)
    assert len(entries) == 1 + len(built.blob_digests)
    assert {(e.route, e.status) for e in entries} == {("local", 200)}
    manifest = next(e for e in entries if "/manifests/" in e.uri)
    assert manifest.reason == "tag-pinned"


def test_a_tag_moved_on_the_primary_is_never_served_with_the_old_digest(shared: StackClient, tmp_path: Path) -> None:
    old = published_replicated(shared, tmp_path, "e2e/moving")
    new = image(tmp_path, variant="moved")
    shared.push(new, "e2e/moving", "v1")
    # Right away, before anything else: the push through this site unpinned the tag (read-your-writes).
    assert shared.pull("e2e/moving", "v1", tmp_path / "out") == new.digest != old.digest
    shared.wait_for_pin("e2e/moving", "v1", new.digest)  # the primary's notification, through the updater
    assert shared.pull("e2e/moving", "v1", tmp_path / "out1") == new.digest
    shared.replicate("e2e/moving")
    since = shared.access_log_offset()
    assert shared.pull("e2e/moving", "v1", tmp_path / "out2") == new.digest
    assert {e.route for e in pull_entries(shared, "e2e/moving", since)} == {"local"}


def test_no_token_gets_a_registry_challenge(shared: StackClient) -> None:
    request = urllib.request.Request(f"{shared.info.secondary_url}/v2/e2e/any/manifests/v1")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=5)
    error = caught.value
    assert error.code == 401
    challenge = error.headers["WWW-Authenticate"]
    assert challenge.startswith(f'Bearer realm="{shared.info.token_realm}",service="container_registry"')
    assert 'scope="repository:e2e/any:pull"' in challenge
    assert error.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
    assert json.loads(error.read())["errors"][0]["code"] == "UNAUTHORIZED"


def test_a_wrong_password_fails_cleanly(shared: StackClient, tmp_path: Path) -> None:
    started_at = time.monotonic()
    with pytest.raises(SkopeoError) as caught:
        shared.skopeo.copy(
            image(tmp_path).reference,
            docker_reference(shared.secondary, "e2e/denied", "v1"),
            dest_creds=shared.credentials().__class__(shared.info.username, "wrong"),
        )
    assert "wrong" not in str(caught.value)
    assert time.monotonic() - started_at < 30


def test_a_token_for_repository_a_cannot_read_repository_b(shared: StackClient, tmp_path: Path) -> None:
    published_replicated(shared, tmp_path, READER_REPOSITORY)
    published_replicated(shared, tmp_path, "team-b/app")
    assert shared.pull(READER_REPOSITORY, "v1", tmp_path / "a", user=READER)
    with pytest.raises(SkopeoError):
        shared.pull("team-b/app", "v1", tmp_path / "b", user=READER)


def stop_part(client: StackClient, name: str) -> None:
    assert client.stack is not None
    client.stack.stop_part(name)


def assert_pull_succeeds(client: StackClient, tmp_path: Path, repository: str, built: OciImage) -> list[AccessLogEntry]:
    since = client.access_log_offset()
    assert client.pull(repository, "v1", tmp_path / f"out-{time.monotonic_ns()}") == built.digest
    return pull_entries(client, repository, since)


def test_redis_stopped_pulls_still_succeed(own: StackClient, tmp_path: Path) -> None:
    built = published_replicated(own, tmp_path, "e2e/no-redis")
    stop_part(own, "redis")
    entries = assert_pull_succeeds(own, tmp_path, "e2e/no-redis", built)
    assert {e.route for e in entries} == {"primary"}
    assert {e.reason for e in entries} == {"index-unavailable"}


def test_auth_service_stopped_pulls_still_succeed(own: StackClient, tmp_path: Path) -> None:
    built = published_replicated(own, tmp_path, "e2e/no-auth")
    stop_part(own, "auth")
    entries = assert_pull_succeeds(own, tmp_path, "e2e/no-auth", built)
    assert {e.route for e in entries} == {"auth-unavailable"}


def test_nginx_asks_the_auth_service_on_a_private_unix_socket_and_falls_back_when_it_dies(
    own: StackClient, tmp_path: Path
) -> None:
    settings = load_settings(own.info.site_file, environ={})
    first = next(bind for bind in settings.server.bind if bind.startswith("unix:"))
    assert settings.auth_servers == (f"{first}.0", f"{first}.1")  # one socket per worker (socket_per_worker)
    conf = (Path(own.info.directory) / "nginx" / "nginx.conf").read_text()
    sockets = [Path(server.removeprefix("unix:")) for server in settings.auth_servers]
    for path in sockets:
        assert f"server unix:{path} max_fails=0;" in conf
        mode = path.stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660, oct(mode)  # no access for other users
    built = published_replicated(own, tmp_path, "e2e/unix")
    # decided through the socket (on a loaded machine a lookup may still miss redis.socket_timeout: primary)
    assert "local" in {e.route for e in assert_pull_succeeds(own, tmp_path, "e2e/unix", built)}
    assert own.stack is not None
    own.stack.kill_part("auth")  # SIGKILL: the socket files stay, nobody accepts on them
    assert all(path.exists() for path in sockets)
    entries = assert_pull_succeeds(own, tmp_path, "e2e/unix", built)
    assert {e.route for e in entries} == {"auth-unavailable"}


def test_a_burst_of_connections_waits_in_the_auth_services_backlog(own: StackClient) -> None:
    """300 connections at once while every worker is busy (stopped): all queue in the socket's backlog
    (server.backlog), none is refused (a refused one is NGINX's 502: a request sent to the primary)."""
    path = load_settings(own.info.site_file, environ={}).auth_servers[0].removeprefix("unix:")  # a worker's own
    assert own.stack is not None
    workers = descendants(own.stack.processes["auth"].pid)
    assert len(workers) == 2, workers
    opened: list[socket.socket] = []
    refused = 0
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        for _ in range(300):
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            connection.setblocking(False)
            opened.append(connection)
            try:
                connection.connect(path)
            except BlockingIOError:  # EAGAIN: the backlog is full
                refused += 1
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        for connection in opened:
            connection.close()
    assert refused == 0


def test_local_registry_stopped_pulls_still_succeed(own: StackClient, tmp_path: Path) -> None:
    built = published_replicated(own, tmp_path, "e2e/no-local")
    stop_part(own, "secondary")
    entries = assert_pull_succeeds(own, tmp_path, "e2e/no-local", built)
    assert {e.route for e in entries} == {"fallback"}


def test_index_claiming_content_the_local_registry_lacks(shared: StackClient, tmp_path: Path) -> None:
    built = image(tmp_path)
    shared.push(built, "e2e/phantom", "v1")  # on the primary only
    shared.wait_for_pin("e2e/phantom", "v1", built.digest)  # resolved at the primary
    claims: list[IndexUpdate] = [ManifestPresence("e2e/phantom", built.digest, True)]
    claims += [BlobPresence("e2e/phantom", digest, True) for digest in built.blob_digests]
    shared.index.apply(claims)
    entries = assert_pull_succeeds(shared, tmp_path, "e2e/phantom", built)
    assert {e.route for e in entries} == {"fallback"}, "the service said local, the local registry 404'd"


def test_each_auth_worker_reports_its_token_cache_entries(shared: StackClient) -> None:
    """geo_route_token_cache_entries{pid}: one series per live worker, which is how benchmarks/load.py
    knows every worker's cache is full (NGINX's connections reach the ASGI workers unevenly)."""
    assert shared.stack is not None
    settings = load_settings(shared.info.site_file, environ={})
    workers = {str(pid) for pid in descendants(shared.stack.processes["auth"].pid)}
    bind = next(b for b in settings.server.bind if not b.startswith("unix:"))

    def entries() -> dict[str, float]:
        with urllib.request.urlopen(f"http://{bind}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        found = re.findall(r'^geo_route_token_cache_entries\{pid="(\d+)"\} (\S+)$', text, re.MULTILINE)
        return {pid: float(value) for pid, value in found}

    def decide_with_a_new_token() -> bool:
        headers = {
            contract.ORIGINAL_METHOD: "GET",
            contract.ORIGINAL_URI: "/v2/e2e/cache/blobs/sha256:" + "0" * 64,
            contract.AUTHORIZATION: f"Bearer {shared.token('repository:e2e/cache:pull')}",
        }
        request = urllib.request.Request(f"http://{bind}/auth", headers=headers)  # a new connection each
        with urllib.request.urlopen(request, timeout=5) as answer:
            assert answer.status == 200
        cached = entries()
        assert set(cached) == workers, cached  # every live worker, from its start (0 until it caches)
        return all(value >= 1 for value in cached.values())

    wait_until(decide_with_a_new_token, 30, "every auth worker to cache a token")
    assert all(value <= settings.token.cache_size for value in entries().values())


def test_stack_json_names_every_process(shared: StackClient) -> None:
    info = StackInfo.read(Path(shared.info.directory))
    assert set(info.pids) == {"redis", "token-service", "updater", "primary", "secondary", "auth", "nginx"}
    for field in (
        "secondary_url",
        "primary_url",
        "local_registry_url",
        "token_realm",
        "username",
        "password",
        "redis_url",
        "nginx_access_log",
    ):
        assert getattr(info, field)


def test_client_geo_headers_do_not_influence_routing(shared: StackClient, tmp_path: Path) -> None:
    built = image(tmp_path)
    shared.push(built, "e2e/spoof", "v1")  # on the primary only: the honest answer is "primary"
    token = shared.token("repository:e2e/spoof:pull")
    spoofed = {
        "Authorization": f"Bearer {token}",
        "X-Geo-Route": "local",
        "X-Geo-Reason": "blob-local",
        "X-Geo-Upstream-Path": "/v2/e2e/other/blobs/" + built.layers[0].digest,
        "X-Original-URI": "/v2/e2e/other/blobs/" + built.layers[0].digest,
    }
    since = shared.access_log_offset()
    url = f"{shared.info.secondary_url}/v2/e2e/spoof/blobs/{built.layers[1].digest}"
    with urllib.request.urlopen(urllib.request.Request(url, headers=spoofed), timeout=10) as answer:
        assert answer.status == 200
        assert hashlib.sha256(answer.read()).hexdigest() == built.layers[1].digest.split(":", 1)[1]
    logged = lambda: [e for e in shared.access_log(since) if "/e2e/spoof/" in e.uri]  # noqa: E731
    wait_until(lambda: bool(logged()), 5, "the access log line")  # NGINX logs after the response is sent
    (entry,) = logged()
    assert (entry.route, entry.reason) == ("primary", "blob-not-local")
