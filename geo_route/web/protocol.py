"""HTTP/1.1 for the auth service's event-loop worker (``server.worker_class: httptools``).

NGINX's subrequests arrive on kept-alive connections; each is parsed by httptools (llhttp, the C
parser uvicorn uses) and ``GET /auth`` is answered straight from the parser's callbacks by
``AuthEndpoint.answer``, called synchronously (a decision is CPU and one Redis round trip on
loopback with a short timeout), its response written in one ``transport.write``: no task, no ASGI
scope or messages, no header list built for the app. Measured with ``benchmarks/head_rate.py``,
gunicorn's own ASGI protocol cost about twice the decision itself around every decision.

Every other request (``/healthz``, ``/readyz``, ``/metrics``, ``/status``) goes to the Flask app as
WSGI, run in a thread so that a slow one (``/status`` reads whole hashes) never holds up the
decisions behind it; responses leave a connection in the order its requests came.

gunicorn's request limits hold for both (``limit_request_line``, ``limit_request_fields``,
``limit_request_field_size``: 414 or 431, then the connection is closed), a body over
``MAX_BODY_BYTES`` is refused (413), and a request the parser rejects gets 400.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import sys
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import httptools

from geo_route.web.auth import AuthEndpoint

log = logging.getLogger("geo_route.http")

MAX_BODY_BYTES = 1 << 20  # the service takes no uploads; its endpoints read no body at all
MAX_QUEUED = 32  # requests read ahead behind a WSGI one; past that the connection is not read until they are answered
AUTH_PATHS = (b"/auth", b"/auth?")
AUTH_METHODS = (b"GET", b"HEAD")
REASONS = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 413: b"Content Too Large"}
REASONS |= {414: b"URI Too Long", 431: b"Request Header Fields Too Large", 500: b"Internal Server Error"}
STATUS_LINES = {status: b"HTTP/1.1 %d %s\r\n" % (status, reason) for status, reason in REASONS.items()}


@dataclass(frozen=True)
class Limits:
    """gunicorn's request limits (its ``limit_request_*`` settings), as the worker was configured."""

    request_line: int = 4094
    fields: int = 100
    field_size: int = 8190
    body: int = MAX_BODY_BYTES


class Connections:
    """What a worker's connections share: the service, the limits, whether the worker still serves
    (after SIGTERM a connection closes once its request is answered) and how many are open."""

    def __init__(
        self,
        auth: AuthEndpoint,
        wsgi_app: Callable[..., Any],
        executor: Executor,
        limits: Limits,
        keepalive: float,
        server_name: tuple[str, str] = ("localhost", "80"),
    ) -> None:
        self.auth = auth
        self.wsgi_app = wsgi_app
        self.executor = executor
        self.limits = limits
        self.keepalive = keepalive
        self.server_name = server_name
        self.alive = True
        self.open: set[HttpProtocol] = set()

    @property
    def count(self) -> int:
        return len(self.open)

    def protocol(self) -> HttpProtocol:
        return HttpProtocol(self)

    def sweep(self) -> None:
        """Close the connections idle for ``keepalive`` seconds; call it once a second. (A timer per
        connection, re-armed after every answer, would cost each decision a few microseconds.)"""
        if self.keepalive <= 0:
            return
        for protocol in list(self.open):
            protocol.tick(self.keepalive)


class RequestRefused(Exception):
    """The request breaks a limit: answer ``status`` and close."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class HttpProtocol(asyncio.Protocol):
    """One connection: parse, answer ``/auth`` at once, queue anything else for the WSGI app."""

    def __init__(self, connections: Connections) -> None:
        self._connections = connections
        self._limits = connections.limits
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_event_loop()
        self._url = b""
        self._auth = False
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._body_size = 0
        self._header_size = 0
        self._pending: deque[tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes, bool]] = deque()
        self._busy = False  # a WSGI request is running: later answers wait for it
        self._paused = False  # reading paused: too many requests queued (MAX_QUEUED)
        self._close_after = False
        self._answered = 0  # requests answered, for the idle sweep
        self._idle_since = (0, 0)  # (answered, sweeps) at the last sweep that saw a change

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._connections.open.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.open.discard(self)
        self._transport = None

    def tick(self, keepalive: float) -> None:
        """One idle sweep (a second apart): close once ``keepalive`` sweeps saw nothing answered."""
        answered, sweeps = self._idle_since
        if answered != self._answered or self._busy or self._pending:
            self._idle_since = (self._answered, 0)
        elif sweeps + 1 >= keepalive and self._transport is not None:
            self._transport.close()
        else:
            self._idle_since = (answered, sweeps + 1)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except RequestRefused as refused:
            self._refuse(refused.status)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            self._refuse(cause.status if isinstance(cause, RequestRefused) else 400)
        except httptools.HttpParserError:
            self._refuse(400)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._header_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._limits.request_line:
            raise RequestRefused(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        headers.append((name, value))
        if len(headers) > self._limits.fields or len(name) + len(value) + 2 > self._limits.field_size:
            raise RequestRefused(431)

    def on_headers_complete(self) -> None:
        url = self._url
        self._auth = (url == b"/auth" or url.startswith(b"/auth?")) and self._parser.get_method() in AUTH_METHODS

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._limits.body:
            raise RequestRefused(413)
        self._body.append(body)

    def on_message_complete(self) -> None:
        headers, self._headers = self._headers, []
        keep_alive = self._parser.should_keep_alive()
        if self._auth and not self._busy:
            self._body, self._body_size = [], 0
            self._answer_auth(headers, keep_alive)
            return
        body = b"".join(self._body)
        self._body, self._body_size = [], 0
        self._pending.append((self._parser.get_method(), self._url, headers, body, keep_alive))
        if len(self._pending) > MAX_QUEUED and self._transport is not None and not self._paused:
            self._paused = True
            self._transport.pause_reading()
        if not self._busy:
            self._next()

    # answers

    def _answer_auth(self, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        status, answer = self._connections.auth.answer_raw(headers)
        text = "".join([f"{name}: {value}\r\n" for name, value in answer])
        self._write(STATUS_LINES[status] + text.encode("latin-1") + self._end(keep_alive), keep_alive)

    def _end(self, keep_alive: bool) -> bytes:
        """The end of a response's header: an HTTP/1.0 client that asked to keep the connection is told."""
        if keep_alive and self._parser.get_http_version() == "1.0":
            return b"Connection: keep-alive\r\n\r\n"
        return b"\r\n"

    def _next(self) -> None:
        """Serve the queued requests in order: ``/auth`` at once, the first WSGI one in a thread."""
        while self._pending and self._transport is not None and not self._busy:
            method, url, headers, body, keep_alive = self._pending.popleft()
            if method in AUTH_METHODS and (url == b"/auth" or url.startswith(b"/auth?")):
                self._answer_auth(headers, keep_alive)
                continue
            self._busy = True
            environ = self._environ(method, url, headers, body)
            future = self._loop.run_in_executor(
                self._connections.executor, run_wsgi, self._connections.wsgi_app, environ
            )
            future.add_done_callback(functools.partial(self._wsgi_done, keep_alive=keep_alive, head=method == b"HEAD"))
        if self._paused and len(self._pending) <= MAX_QUEUED // 2 and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()

    def _wsgi_done(
        self, done: asyncio.Future[tuple[str, list[tuple[str, str]], bytes]], *, keep_alive: bool, head: bool
    ) -> None:
        self._busy = False
        try:
            status, headers, body = done.result()
        except Exception:
            log.exception("the WSGI app failed")
            status, headers, body = "500 Internal Server Error", [("Content-Type", "text/plain")], b"internal error\n"
        lines = [f"HTTP/1.1 {status}\r\n".encode("latin-1")]
        if head:  # the app's own Content-Length, if any: the body it would have sent
            lines += [f"{name}: {value}\r\n".encode("latin-1") for name, value in headers]
            lines.append(self._end(keep_alive))
        else:
            lines += [
                f"{name}: {value}\r\n".encode("latin-1") for name, value in headers if name.lower() != "content-length"
            ]
            lines.append(b"Content-Length: %d\r\n" % len(body) + self._end(keep_alive))
            lines.append(body)
        self._write(b"".join(lines), keep_alive)
        self._next()

    def _environ(self, method: bytes, url: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> dict[str, Any]:
        parsed = httptools.parse_url(url)
        server_name, server_port = self._connections.server_name
        remote_addr, remote_port = peer(self._transport)
        environ: dict[str, Any] = {
            "REQUEST_METHOD": method.decode("latin-1"),
            "SCRIPT_NAME": "",
            "PATH_INFO": (parsed.path or b"/").decode("latin-1"),
            "QUERY_STRING": (parsed.query or b"").decode("latin-1"),
            "RAW_URI": url.decode("latin-1"),
            "SERVER_NAME": server_name,
            "SERVER_PORT": server_port,
            "SERVER_PROTOCOL": f"HTTP/{self._parser.get_http_version()}",
            "REMOTE_ADDR": remote_addr,  # /status answers only loopback peers
            "REMOTE_PORT": remote_port,
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
        }
        for name, value in headers:
            key = name.decode("latin-1").upper().replace("-", "_")
            if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                environ[key] = value.decode("latin-1")
                continue
            key = "HTTP_" + key
            text = value.decode("latin-1")
            environ[key] = f"{environ[key]},{text}" if key in environ else text
        return environ

    def _refuse(self, status: int) -> None:
        self._pending.clear()
        self._write(STATUS_LINES[status] + b"Content-Length: 0\r\nConnection: close\r\n\r\n", keep_alive=False)

    def _write(self, data: bytes, keep_alive: bool) -> None:
        transport = self._transport
        if transport is None or self._close_after:
            return
        transport.write(data)
        self._answered += 1
        if not keep_alive or not self._connections.alive:
            self._close_after = True
            transport.close()


def peer(transport: asyncio.BaseTransport | None) -> tuple[str, str]:
    """The client's address and port as WSGI names them ("" for a Unix socket's peer)."""
    name = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(name, tuple) and len(name) >= 2:
        return str(name[0]), str(name[1])
    return "", ""


def run_wsgi(app: Callable[..., Any], environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
    """Call a WSGI app; its status line, headers and whole body (the service's pages are small)."""
    started: list[Any] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        started[:] = [status, headers]
        return lambda data: chunks.append(data)

    chunks: list[bytes] = []
    result: Iterable[bytes] = app(environ, start_response)
    try:
        chunks.extend(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return started[0], started[1], b"".join(chunks)
