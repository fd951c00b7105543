"""The auth service's own HTTP layer (``server.worker_class: httptools``) through real gunicorn.

``geo-route serve`` with its default worker, a real ``redis-server`` and raw sockets: what NGINX and
other clients rely on that gunicorn's own HTTP layer gave before: pipelined requests answered in
order (``/auth`` on the loop, the Flask paths in a thread), HTTP/1.0 keep-alive, gunicorn's request
limits (414, 431, 400, then the connection is closed), and a SIGTERM that ends the service within
``graceful_timeout`` although NGINX keeps connections open.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import MakeToken, access
from support import RedisServer, free_port, http_get, stop_process, wait_until

from geo_route import contract
from geo_route.config import Settings
from geo_route.index.model import BlobPresence
from geo_route.index.redis_store import RedisIndexStore

D1 = "sha256:" + "1" * 64


@dataclass
class Service:
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    token: str


@pytest.fixture
def service(
    redis_settings: Settings,
    site_file: Callable[..., Path],
    tmp_path: Path,
    make_token: MakeToken,
    redis_server: RedisServer,
) -> Iterator[Service]:
    port = free_port()
    config = site_file(redis_url=redis_server.url, prefix=redis_settings.redis.key_prefix)
    RedisIndexStore(redis_settings.redis).apply([BlobPresence("group/app", D1, True)])
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "wb") as log:
        argv = [sys.executable, "-m", "geo_route.cli", "serve", "-c", str(config), "--bind", f"127.0.0.1:{port}"]
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200, 30, "geo-route serve")
        yield Service(process, port, log_path, make_token([access("group/app", "pull")]))
    finally:
        stop_process(process)


def auth_request(token: str, version: str = "1.1", extra: str = "") -> bytes:
    return (
        f"GET /auth HTTP/{version}\r\nHost: auth\r\n{contract.ORIGINAL_METHOD}: GET\r\n"
        f"{contract.ORIGINAL_URI}: /v2/group/app/blobs/{D1}\r\n{contract.AUTHORIZATION}: Bearer {token}\r\n"
        f"{extra}\r\n"
    ).encode()


def read_answers(
    connection: socket.socket, count: int, timeout: float = 10.0
) -> list[tuple[int, dict[str, str], bytes]]:
    """``count`` answers (status, headers, body by Content-Length) read off one connection."""
    connection.settimeout(timeout)
    buffer, answers = b"", []
    while len(answers) < count:
        while b"\r\n\r\n" not in buffer:
            chunk = connection.recv(65536)
            if not chunk:
                raise AssertionError(f"closed after {len(answers)} answers: {buffer!r}")
            buffer += chunk
        head, buffer = buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        length = int(headers.get("Content-Length", "0"))
        while len(buffer) < length:
            buffer += connection.recv(65536)
        answers.append((int(lines[0].split(" ")[1]), headers, buffer[:length]))
        buffer = buffer[length:]
    return answers


def closed_by_peer(connection: socket.socket, timeout: float = 5.0) -> bool:
    connection.settimeout(timeout)
    try:
        while connection.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def test_pipelined_requests_are_answered_in_order(service: Service) -> None:
    """/auth, /healthz (the Flask app, in a thread), /auth and HEAD /metrics in one write: four answers
    in that order on the kept-alive connection, which then serves the next request too."""
    pipelined = (
        auth_request(service.token)
        + b"GET /healthz HTTP/1.1\r\nHost: auth\r\n\r\n"
        + auth_request(service.token)
        + b"HEAD /metrics HTTP/1.1\r\nHost: auth\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", service.port)) as connection:
        connection.sendall(pipelined)
        answers = read_answers(connection, 3)
        assert [status for status, _, _ in answers] == [200, 200, 200]
        assert answers[0][1][contract.ROUTE] == answers[2][1][contract.ROUTE] == "local"
        assert answers[1][2] == b"ok\n"
        connection.settimeout(10)
        head = b""
        while b"\r\n\r\n" not in head:
            head += connection.recv(65536)
        assert head.startswith(b"HTTP/1.1 200 ") and int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]) > 0
        assert head.endswith(b"\r\n\r\n"), "no body after HEAD"
        connection.sendall(auth_request(service.token))
        ((status, headers, _),) = read_answers(connection, 1)
        assert (status, headers[contract.REASON]) == (200, "blob-local")


def test_a_hundred_pipelined_requests_behind_flask_ones_are_all_answered_in_order(service: Service) -> None:
    """More requests queued than the connection reads ahead (it stops reading past MAX_QUEUED)."""
    healthz = b"GET /healthz HTTP/1.1\r\nHost: auth\r\n\r\n"
    with socket.create_connection(("127.0.0.1", service.port)) as connection:
        connection.sendall((healthz + auth_request(service.token)) * 50)
        answers = read_answers(connection, 100, timeout=30)
    assert [status for status, _, _ in answers] == [200] * 100
    assert [body == b"ok\n" for _, _, body in answers] == [True, False] * 50
    assert all(headers[contract.REASON] == "blob-local" for _, headers, _ in answers[1::2])


def test_the_status_page_answers_a_loopback_peer(service: Service) -> None:
    """/status is for loopback peers only (404 for others): the WSGI environ carries the peer's address."""
    status, _ = http_get(f"http://127.0.0.1:{service.port}/status", timeout=30)
    assert status == 200


def test_an_http_1_0_client_asking_for_keep_alive_keeps_its_connection(service: Service) -> None:
    with socket.create_connection(("127.0.0.1", service.port)) as connection:
        for _ in range(3):
            connection.sendall(auth_request(service.token, "1.0", "Connection: keep-alive\r\n"))
            ((status, headers, _),) = read_answers(connection, 1)
            assert (status, headers.get("Connection")) == (200, "keep-alive")
        connection.sendall(auth_request(service.token, "1.0"))
        ((status, headers, _),) = read_answers(connection, 1)
        assert status == 200 and "Connection" not in headers
        assert closed_by_peer(connection)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /auth?" + b"x" * 5000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
        (b"GET /auth HTTP/1.1\r\n" + b"".join(b"X-F%d: v\r\n" % n for n in range(101)) + b"\r\n", 431),
        (b"GET /auth HTTP/1.1\r\nX-Big: " + b"v" * 9000 + b"\r\n\r\n", 431),
        (b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-F%d: v\r\n" % n for n in range(101)) + b"\r\n", 431),
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
    ],
    ids=["long-uri", "101-fields", "long-field", "101-fields-flask-path", "garbage"],
)
def test_gunicorns_request_limits_hold(service: Service, request_bytes: bytes, status: int) -> None:
    """limit_request_line (4094), limit_request_fields (100), limit_request_field_size (8190): the
    answer, then the connection closed; the service goes on deciding."""
    with socket.create_connection(("127.0.0.1", service.port)) as connection:
        connection.sendall(request_bytes)
        ((answered, headers, _),) = read_answers(connection, 1)
        assert (answered, headers.get("Connection")) == (status, "close")
        assert closed_by_peer(connection)
    with socket.create_connection(("127.0.0.1", service.port)) as connection:
        connection.sendall(auth_request(service.token))
        assert read_answers(connection, 1)[0][0] == 200


def test_sigterm_ends_the_service_within_the_graceful_timeout_with_idle_connections_open(service: Service) -> None:
    """NGINX keeps its connections to the service open: a stop must not wait on them past
    graceful_timeout (2 s), and an answer given meanwhile closes its connection."""
    busy = socket.create_connection(("127.0.0.1", service.port))
    idle = [socket.create_connection(("127.0.0.1", service.port)) for _ in range(4)]
    try:
        busy.sendall(auth_request(service.token))
        assert read_answers(busy, 1)[0][0] == 200
        started = time.monotonic()
        service.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # the workers notice within their 1 s heartbeat
        busy.sendall(auth_request(service.token))
        ((status, _, _),) = read_answers(busy, 1)
        assert status == 200
        assert closed_by_peer(busy), "an answer after SIGTERM closes its connection"
        assert service.process.wait(timeout=15) == 0
        assert time.monotonic() - started < 6, "graceful_timeout (2 s) plus the heartbeat, not gunicorn's 30 s"
    finally:
        for connection in [busy, *idle]:
            connection.close()
    assert "Traceback" not in service.log.read_text()
