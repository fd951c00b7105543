"""Test support: real processes on free loopback ports, cleaned up by PID even when a test fails.

The helpers live in ``geo_route.devstack`` (shared with the demo); these names are kept for the tests.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading

from geo_route.devstack.processes import free_port, http_get, require_binary, stop_process, wait_until
from geo_route.devstack.redis_server import RedisProcess

RedisServer = RedisProcess
"""A real redis-server on a free loopback port in its own directory."""


def environment_without(*prefixes: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


__all__ = [
    "RecordingRelay",
    "RedisServer",
    "environment_without",
    "free_port",
    "http_get",
    "require_binary",
    "stop_process",
    "wait_until",
]


REQUEST_LINE = re.compile(rb"(?:^|[^A-Z])(GET|HEAD|POST|PUT|PATCH|DELETE|OPTIONS) (\S+) HTTP/1\.[01]\r?$")


class RecordingRelay:
    """A TCP relay on a free loopback port that records the request target of every HTTP request it
    forwards: what the upstream really received, byte for byte (tests of NGINX's proxy_pass URIs).

    Only request lines are looked for (a line of the client's stream ending in the HTTP request-line
    grammar, since a request can follow an upload body without a newline); bytes pass unchanged.
    """

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.targets: list[str] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self.accept_forever, daemon=True).start()

    def accept_forever(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self.pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self.pump, args=(upstream, client, False), daemon=True).start()

    def pump(self, source: socket.socket, sink: socket.socket, record: bool) -> None:
        pending = b""
        try:
            while data := source.recv(65536):
                if record:
                    pending = self.record(pending + data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            source.close()

    def record(self, data: bytes) -> bytes:
        *lines, rest = data.split(b"\n")
        for line in lines:
            match = REQUEST_LINE.search(line)  # a request may follow a body without a newline
            if match:
                with self.lock:
                    self.targets.append(match.group(2).decode("latin-1"))
        return rest[-8192:]

    def request_targets(self, since: int = 0) -> list[str]:
        with self.lock:
            return self.targets[since:]

    def close(self) -> None:
        self.closed = True
        self.listener.close()
