"""The auth_request endpoint through the Flask test client and through real gunicorn."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import REALM, SERVICE, MakeToken, access
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from support import RedisServer, free_port, http_get, stop_process, wait_until

from geo_route import contract
from geo_route.config import Settings, load_settings
from geo_route.index.model import BlobPresence, ManifestPresence, PrimaryTag
from geo_route.index.redis_store import RedisIndexStore
from geo_route.web import create_app

OCI = "application/vnd.oci.image.manifest.v1+json"
D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


@pytest.fixture
def app(redis_settings: Settings) -> Flask:
    return create_app(redis_settings)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def index(app: Flask) -> RedisIndexStore:
    store = app.extensions["geo_route"]["index"]
    assert isinstance(store, RedisIndexStore)
    return store


def ask(
    client: FlaskClient, method: str, uri: str, token: str | None = None, **extra: str
) -> tuple[int, dict[str, str]]:
    headers = {contract.ORIGINAL_METHOD: method, contract.ORIGINAL_URI: uri, **extra}
    if token is not None:
        headers[contract.AUTHORIZATION] = f"Bearer {token}"
    response = client.get("/auth", headers=headers)
    return response.status_code, dict(response.headers)


def test_replicated_blob_is_served_locally(client: FlaskClient, index: RedisIndexStore, make_token: MakeToken) -> None:
    token = make_token([access("group/app", "pull")])
    uri = f"/v2/group/app/blobs/{D1}"
    assert ask(client, "GET", uri, token)[1][contract.ROUTE] == "primary"
    index.apply([BlobPresence("group/app", D1, True)])
    status, headers = ask(client, "GET", uri, token)
    assert (status, headers[contract.ROUTE], headers[contract.REASON]) == (200, "local", "blob-local")
    assert contract.UPSTREAM_PATH not in headers


def test_pinned_tag_is_rewritten_to_its_digest(
    client: FlaskClient, index: RedisIndexStore, make_token: MakeToken
) -> None:
    token = make_token([access("group/app", "pull")])
    index.apply([PrimaryTag("group/app", "v1", D1, index.now(), OCI), ManifestPresence("group/app", D1, True)])
    status, headers = ask(client, "HEAD", "/v2/group/app/manifests/v1", token, Accept=OCI)
    assert (status, headers[contract.ROUTE], headers[contract.REASON]) == (200, "local", "tag-pinned")
    assert headers[contract.UPSTREAM_PATH] == f"/v2/group/app/manifests/{D1}"
    status, headers = ask(client, "HEAD", "/v2/group/app/manifests/v1", token)  # no Accept: the registry 404s
    assert (status, headers[contract.ROUTE], headers[contract.REASON]) == (200, "primary", "tag-negotiated")
    index.apply([PrimaryTag("group/app", "v1", D2, index.now(), OCI)])  # moved on the primary, not replicated yet
    status, headers = ask(client, "GET", "/v2/group/app/manifests/v1", token, Accept=OCI)
    assert (headers[contract.ROUTE], headers[contract.REASON]) == ("primary", "tag-not-local")
    assert contract.UPSTREAM_PATH not in headers


def test_missing_token_gets_the_registry_challenge(client: FlaskClient) -> None:
    status, headers = ask(client, "GET", "/v2/group/app/manifests/v1")
    assert status == 401
    assert headers["WWW-Authenticate"] == (
        f'Bearer realm="{REALM}",service="{SERVICE}",scope="repository:group/app:pull"'
    )
    assert contract.ROUTE not in headers


def test_invalid_token_says_invalid_token(client: FlaskClient, make_token: MakeToken) -> None:
    status, headers = ask(client, "GET", "/v2/group/app/manifests/v1", make_token(iss="someone-else"))
    assert status == 401
    assert headers["WWW-Authenticate"].endswith(',scope="repository:group/app:pull",error="invalid_token"')


@pytest.mark.parametrize(
    ("granted", "method", "uri", "scope"),
    [
        (["pull"], "PUT", "/v2/group/app/manifests/v1", "repository:group/app:pull,push"),
        (["pull", "push"], "DELETE", f"/v2/group/app/manifests/{D1}", "repository:group/app:delete"),
        (["pull"], "GET", "/v2/group/other/manifests/v1", "repository:group/other:pull"),
    ],
    ids=["pull-only-used-for-push", "push-used-for-delete", "scope-for-another-repository"],
)
def test_insufficient_scope(
    client: FlaskClient, make_token: MakeToken, granted: list[str], method: str, uri: str, scope: str
) -> None:
    status, headers = ask(client, method, uri, make_token([access("group/app", *granted)]))
    assert status == 401
    assert headers["WWW-Authenticate"].endswith(f',scope="{scope}",error="insufficient_scope"')


def test_writes_go_to_the_primary(client: FlaskClient, make_token: MakeToken) -> None:
    token = make_token([access("group/app", "pull", "push")])
    for method, uri in [
        ("POST", "/v2/group/app/blobs/uploads/"),
        ("PATCH", "/v2/group/app/blobs/uploads/u1"),
        ("PUT", f"/v2/group/app/blobs/uploads/u1?digest={D1}"),
        ("PUT", "/v2/group/app/manifests/v1"),
    ]:
        status, headers = ask(client, method, uri, token)
        assert (status, headers[contract.ROUTE]) == (200, "primary"), (method, uri)


def test_client_supplied_geo_headers_do_not_influence_routing(client: FlaskClient, make_token: MakeToken) -> None:
    token = make_token([access("group/app", "pull")])
    spoof = {contract.ROUTE: "local", contract.UPSTREAM_PATH: "/v2/secret/manifests/v1", "X-Forwarded-For": "1.2.3.4"}
    status, headers = ask(client, "GET", f"/v2/group/app/blobs/{D1}", token, **spoof)
    assert (status, headers[contract.ROUTE], headers[contract.REASON]) == (200, "primary", "blob-not-local")
    assert contract.UPSTREAM_PATH not in headers


def test_missing_original_headers_route_to_the_primary(client: FlaskClient) -> None:
    response = client.get("/auth")
    assert response.status_code == 200
    assert response.headers[contract.ROUTE] == "primary"


def test_health_readiness_and_metrics(client: FlaskClient, make_token: MakeToken) -> None:
    token = make_token([access("group/app", "pull")])
    for _ in range(2):
        ask(client, "GET", f"/v2/group/app/blobs/{D1}", token)
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'geo_route_decisions_total{operation="blob",reason="blob-not-local",route="primary"} 2.0' in metrics
    assert 'geo_route_token_cache_total{result="hit"} 1.0' in metrics
    assert 'geo_route_token_cache_total{result="miss"} 1.0' in metrics
    assert "geo_route_decision_seconds_bucket" in metrics
    assert "geo_route_index_errors_total 0.0" in metrics


def test_metrics_show_how_many_tokens_the_cache_holds(client: FlaskClient, make_token: MakeToken) -> None:
    for token in [make_token(), make_token(), make_token()]:
        for _ in range(2):
            ask(client, "GET", f"/v2/group/app/blobs/{D1}", token)
    assert "geo_route_token_cache_entries 3.0" in client.get("/metrics").get_data(as_text=True)


def test_tokens_never_appear_in_logs(
    client: FlaskClient, make_token: MakeToken, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    bad, good = make_token(iss="evil"), make_token()
    ask(client, "GET", "/v2/group/app/manifests/v1", bad)
    ask(client, "GET", "/v2/group/app/manifests/v1", good)
    assert bad not in caplog.text and good not in caplog.text


header_text = st.text(st.characters(codec="latin-1", exclude_characters="\r\n"), max_size=200)


@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=header_text, uri=header_text, authorization=header_text)
def test_only_200_401_or_403_whatever_the_input(client: FlaskClient, method: str, uri: str, authorization: str) -> None:
    headers = {contract.ORIGINAL_METHOD: method, contract.ORIGINAL_URI: uri, contract.AUTHORIZATION: authorization}
    response = client.get("/auth", headers=headers)
    assert response.status_code in contract.ALLOWED_STATUSES
    if response.status_code == 200:
        assert response.headers[contract.ROUTE] in ("local", "primary")


class TestRedisStoppedMidTest:
    @pytest.fixture
    def own_redis(self, tmp_path: Path) -> Iterator[RedisServer]:
        server = RedisServer(tmp_path / "redis").start()
        try:
            yield server
        finally:
            server.stop()

    def test_decisions_fall_back_to_the_primary_with_200(
        self, own_redis: RedisServer, site_file: Callable[..., Path], make_token: MakeToken
    ) -> None:
        settings = load_settings(site_file(redis_url=own_redis.url, extra="  unavailable_cooldown: 0\n"), environ={})
        app = create_app(settings)
        client = app.test_client()
        app.extensions["geo_route"]["index"].apply([BlobPresence("group/app", D1, True)])
        token = make_token([access("group/app", "pull")])
        uri = f"/v2/group/app/blobs/{D1}"
        assert ask(client, "GET", uri, token)[1][contract.ROUTE] == "local"

        own_redis.stop()
        for method, path in [
            ("GET", uri),
            ("GET", f"/v2/group/app/manifests/{D1}"),
            ("GET", "/v2/group/app/manifests/v1"),
        ]:
            status, headers = ask(client, method, path, token)
            assert (status, headers[contract.ROUTE], headers[contract.REASON]) == (200, "primary", "index-unavailable")
        assert ask(client, "GET", "/v2/", token)[1][contract.ROUTE] == "local", "no index needed, still local"
        assert client.get("/readyz").status_code == 503
        assert "geo_route_index_errors_total 3.0" in client.get("/metrics").get_data(as_text=True)


def test_through_real_gunicorn(
    redis_settings: Settings,
    site_file: Callable[..., Path],
    tmp_path: Path,
    make_token: MakeToken,
    redis_server: RedisServer,
) -> None:
    port = free_port()
    config = site_file(redis_url=redis_server.url, prefix=redis_settings.redis.key_prefix)
    RedisIndexStore(redis_settings.redis).apply([BlobPresence("group/app", D1, True)])
    log = open(tmp_path / "gunicorn.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "geo_route.cli",
            "serve",
            "-c",
            str(config),
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "2",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_get(f"{base}/healthz")[0] == 200, 30, "geo-route serve")
        token = make_token([access("group/app", "pull")])
        headers = {
            contract.ORIGINAL_METHOD: "GET",
            contract.ORIGINAL_URI: f"/v2/group/app/blobs/{D1}",
            contract.AUTHORIZATION: f"Bearer {token}",
        }
        for _ in range(10):
            status, answer = http_get(f"{base}/auth", headers)
            assert (status, answer[contract.ROUTE], answer[contract.REASON]) == (200, "local", "blob-local")
        push = {contract.ORIGINAL_METHOD: "PUT", contract.ORIGINAL_URI: "/v2/group/app/manifests/v1"}
        status, answer = http_get(f"{base}/auth", {**headers, **push})
        assert status == 401 and "insufficient_scope" in answer["WWW-Authenticate"]
        assert http_get(f"{base}/readyz")[0] == 200
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
            metrics = response.read().decode()
        assert 'geo_route_decisions_total{operation="blob",reason="blob-local",route="local"} 10.0' in metrics, (
            "metrics aggregate both workers"
        )
    finally:
        stop_process(process)
        log.close()
    assert process.returncode == 0, (tmp_path / "gunicorn.log").read_text()
    assert token not in (tmp_path / "gunicorn.log").read_text()


class BrokenIndex:
    """An index whose lookups hit a bug (not an outage): the shell must still answer 200 → primary."""

    def lookup(self, query: object) -> object:
        raise RuntimeError("bug")

    def apply(self, updates: object) -> None:
        raise RuntimeError("bug")

    def ping(self) -> bool:
        return True


def test_a_bug_routes_to_the_primary_never_a_5xx(settings: Settings, make_token: MakeToken) -> None:
    client = create_app(settings, index=BrokenIndex()).test_client()  # type: ignore[arg-type]
    status, headers = ask(client, "GET", f"/v2/group/app/blobs/{D1}", make_token([access("group/app", "pull")]))
    assert (status, headers[contract.ROUTE], headers[contract.REASON]) == (200, "primary", "internal-error")


def test_index_warnings_are_throttled(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from geo_route.web.auth import ThrottledWarning

    warning = ThrottledWarning(logging.getLogger("test.throttle"), interval=3600)
    with caplog.at_level("WARNING", logger="test.throttle"):
        for attempt in range(5):
            warning.emit("index down (%s)", attempt)
    assert [record.getMessage() for record in caplog.records] == ["index down (0)"]


@pytest.mark.parametrize("workers", [1, 3])
def test_serve_refuses_workers_other_than_the_sockets_nginx_lists(
    site_file: Callable[..., Path], tmp_path: Path, workers: int
) -> None:
    """With server.socket_per_worker NGINX's upstream lists server.workers sockets; ``--workers``
    other than that would leave some unserved (decisions time out) or some workers unreached."""
    socket = tmp_path / "auth.sock"
    config = site_file(extra=f'server:\n  bind: ["unix:{socket}"]\n  workers: 2\n')
    command = [sys.executable, "-m", "geo_route.cli", "serve", "-c", str(config), "--workers", str(workers)]
    # Its own process group: a service that did start (the check gone) is stopped with its workers.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 1, stderr
    assert f"--workers {workers} changes the workers' own sockets" in stderr
    assert "server.workers: 2" in stderr
    assert not list(tmp_path.glob("auth.sock*")), "nothing was started"
