"""A real ``redis-server`` on a free loopback port, in a directory of its own, without persistence;
or a Redis Sentinel topology of them (``SentinelTopology``: a primary, a replica, three sentinels).

Talks RESP over a plain socket for its readiness checks: nothing outside ``geo_route/index/`` imports redis.
"""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from geo_route.devstack.processes import LOOPBACK, LoggedProcess, free_port, require_binary, start_process, wait_until
from geo_route.errors import DevstackError


class RedisProcess:
    """``RedisProcess(directory).start()`` … ``stop()``; ``url`` is its ``redis://`` URL (database 0)."""

    def __init__(self, directory: Path, port: int | None = None, *, replica_of: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.replica_of = replica_of  # a node of a SentinelTopology: runs from a config file Sentinel rewrites
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
        if self.replica_of is not None or (self.directory / "redis.conf").exists():
            argv = [binary, str(self.write_config())]
        self.logged = dataclasses.replace(start_process(argv, self.directory, "redis"), ready=self.answers_ping)
        try:
            wait_until(self.answers_ping, timeout, f"redis-server on port {self.port}", process=self.logged)
        except BaseException:
            self.logged.stop()
            raise
        return self

    def write_config(self) -> Path:
        """``redis.conf`` (once: afterwards it is Sentinel's, which rewrites it on a failover)."""
        path = self.directory / "redis.conf"
        if not path.exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            lines = [f"port {self.port}", f"bind {LOOPBACK}", 'save ""', "appendonly no", f'dir "{self.directory}"']
            if self.replica_of is not None:
                lines.append(f"replicaof {LOOPBACK} {self.replica_of}")
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

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


def resp_command(port: int, *args: str, timeout: float = 1.0) -> Any:
    """One command to a Redis or Sentinel on loopback: its reply as str, int, list or None; an error
    reply raises ``DevstackError``."""
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock, sock.makefile("rb") as replies:
        request = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            request.append(b"$%d\r\n%s\r\n" % (len(arg.encode()), arg.encode()))
        sock.sendall(b"".join(request))
        return read_reply(replies)


def read_reply(replies: Any) -> Any:
    line = replies.readline().decode().rstrip("\r\n")
    kind, rest = line[:1], line[1:]
    if kind == "+":
        return rest
    if kind == "-":
        raise DevstackError(f"redis: {rest}")
    if kind == ":":
        return int(rest)
    if kind == "$":
        return None if rest == "-1" else replies.read(int(rest) + 2)[:-2].decode()
    if kind == "*":
        return None if rest == "-1" else [read_reply(replies) for _ in range(int(rest))]
    raise DevstackError(f"redis: unexpected reply {line!r}")


def info_fields(port: int, section: str) -> dict[str, str]:
    text = resp_command(port, "INFO", section)
    return dict(line.split(":", 1) for line in str(text).splitlines() if ":" in line)


class SentinelProcess:
    """``redis-sentinel`` watching ``master_name`` (quorum 2) from a config file of its own."""

    def __init__(self, directory: Path, master_name: str, master_port: int, down_after_ms: int, failover_ms: int):
        self.directory = directory
        self.port = free_port()
        self.master_name = master_name
        self.lines = [
            f"port {self.port}",
            f"bind {LOOPBACK}",
            f'dir "{directory}"',
            f"sentinel monitor {master_name} {LOOPBACK} {master_port} 2",
            f"sentinel down-after-milliseconds {master_name} {down_after_ms}",
            f"sentinel failover-timeout {master_name} {failover_ms}",
            f"sentinel parallel-syncs {master_name} 1",
        ]
        self.logged: LoggedProcess | None = None

    def start(self, timeout: float = 10.0) -> SentinelProcess:
        binary = require_binary("redis-sentinel")
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "sentinel.conf"
        config.write_text("\n".join(self.lines) + "\n", encoding="utf-8")
        ready = lambda: resp_command(self.port, "PING") == "PONG"  # noqa: E731
        self.logged = dataclasses.replace(start_process([binary, str(config)], self.directory, "sentinel"), ready=ready)
        try:
            wait_until(ready, timeout, f"redis-sentinel on port {self.port}", process=self.logged)
        except BaseException:
            self.logged.stop()
            raise
        return self

    def master_port(self) -> int | None:
        """The port this sentinel names as the primary (None: it does not answer)."""
        try:
            reply = resp_command(self.port, "SENTINEL", "get-master-addr-by-name", self.master_name)
        except (OSError, DevstackError):
            return None
        return int(reply[1]) if reply else None


class SentinelTopology:
    """A primary (part ``redis``), its replica (``redis-replica``) and three sentinels (``sentinel-1``
    to ``-3``, quorum 2) on free loopback ports, each in a directory of its own with its own config
    file; stopped by PID. A node restarted after a failover comes back as whatever its config file
    (rewritten by Sentinel) says, and Sentinel turns a returning old primary into a replica."""

    def __init__(
        self, directory: Path, master_name: str = "geo-route", down_after_ms: int = 1000, failover_ms: int = 4000
    ):
        self.master_name = master_name
        primary = RedisProcess(directory / "redis")
        replica = RedisProcess(directory / "redis-replica", replica_of=primary.port)
        self.nodes = {"redis": primary, "redis-replica": replica}
        self.sentinels = [
            SentinelProcess(directory / f"sentinel-{n}", master_name, primary.port, down_after_ms, failover_ms)
            for n in (1, 2, 3)
        ]

    def start(self, timeout: float = 30.0) -> SentinelTopology:
        try:
            self.nodes["redis"].write_config()
            for node in self.nodes.values():
                node.start()
            for sentinel in self.sentinels:
                sentinel.start()
            self.wait_until_settled(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def sentinel_addresses(self) -> list[str]:
        return [f"{LOOPBACK}:{sentinel.port}" for sentinel in self.sentinels]

    def processes(self) -> dict[str, LoggedProcess]:
        parts = {name: node.logged for name, node in self.nodes.items()}
        parts.update({f"sentinel-{n}": sentinel.logged for n, sentinel in enumerate(self.sentinels, 1)})
        return {name: logged for name, logged in parts.items() if logged is not None}

    def master_port(self) -> int | None:
        """The primary's port as a majority of the sentinels name it (None: no majority)."""
        ports = [sentinel.master_port() for sentinel in self.sentinels]
        return next((port for port in ports if port is not None and ports.count(port) >= 2), None)

    def master_part(self) -> str:
        port = self.master_port()
        return next(name for name, node in self.nodes.items() if node.port == port)

    def settled(self) -> bool:
        """One primary the sentinels agree on, and every other node its replica with the link up,
        known to every sentinel (so a failover can happen, and nothing is left to resynchronise)."""
        port = self.master_port()
        if port is None or info_fields(port, "replication").get("role") != "master":
            return False
        for node in self.nodes.values():
            if node.port != port:
                fields = info_fields(node.port, "replication")
                if fields.get("master_port") != str(port) or fields.get("master_link_status") != "up":
                    return False
        for sentinel in self.sentinels:
            replicas = resp_command(sentinel.port, "SENTINEL", "replicas", self.master_name)
            flags = [dict(zip(entry[::2], entry[1::2], strict=True)).get("flags", "") for entry in replicas]
            if len(flags) < len(self.nodes) - 1 or any("down" in f or "disconnected" in f for f in flags):
                return False
            if resp_command(sentinel.port, "SENTINEL", "ckquorum", self.master_name)[:2] != "OK":
                return False
        return True

    def wait_until_settled(self, timeout: float = 60.0) -> float:
        """Seconds until ``settled()``; raises ``TimeoutError`` if it is not within ``timeout``."""
        started = time.monotonic()
        wait_until(lambda: self.settled_quietly(), timeout, "the Redis Sentinel topology", interval=0.1)
        return time.monotonic() - started

    def settled_quietly(self) -> bool:
        try:
            return self.settled()
        except DevstackError:
            return False

    def stop(self) -> None:
        for sentinel in self.sentinels:
            if sentinel.logged is not None:
                sentinel.logged.stop()
        for node in self.nodes.values():
            node.stop()
