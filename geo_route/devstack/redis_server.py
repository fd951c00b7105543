"""A real ``redis-server`` on a free loopback port, in a directory of its own, without persistence.

Talks RESP over a plain socket for its readiness check: nothing outside ``geo_route/index/`` imports redis.
"""

from __future__ import annotations

import dataclasses
import socket
import subprocess
from pathlib import Path

from geo_route.devstack.processes import LOOPBACK, LoggedProcess, free_port, require_binary, start_process, wait_until


class RedisProcess:
    """``RedisProcess(directory).start()`` … ``stop()``; ``url`` is its ``redis://`` URL (database 0)."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.logged: LoggedProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self.logged.popen if self.logged is not None else None

    def start(self, timeout: float = 10.0) -> RedisProcess:
        binary = require_binary("redis-server")
        argv = [binary, "--port", str(self.port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"]
        argv += ["--dir", str(self.directory)]
        self.logged = dataclasses.replace(start_process(argv, self.directory, "redis"), ready=self.answers_ping)
        try:
            wait_until(self.answers_ping, timeout, f"redis-server on port {self.port}", process=self.logged)
        except BaseException:
            self.logged.stop()
            raise
        return self

    def answers_ping(self) -> bool:
        with socket.create_connection((LOOPBACK, self.port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    def stop(self) -> None:
        if self.logged is not None:
            self.logged.stop()

    def save(self) -> None:
        """Write a snapshot now (``dump.rdb`` in its directory); a restart loads it."""
        with socket.create_connection((LOOPBACK, self.port), timeout=10) as sock:
            sock.sendall(b"SAVE\r\n")
            if not sock.recv(16).startswith(b"+OK"):
                raise RuntimeError("redis-server refused SAVE")

    def restart(self) -> RedisProcess:
        """Stop and start again on the same port and directory: from the last ``save()`` if there
        was one (as Redis 7 restarts from its RDB snapshot), else empty. A new run_id either way."""
        self.stop()
        return self.start()
