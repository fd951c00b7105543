"""A real ``redis-server`` on a free loopback port, in a directory of its own, without persistence;
or a Redis Sentinel topology of them (``SentinelTopology``: a primary, a replica, three sentinels),
optionally with TLS and passwords (``RedisSecurity``: every node and sentinel on TLS only, the
nodes behind an ACL user, the sentinels behind a password).

Talks RESP over a plain (or TLS) socket for its readiness checks: nothing outside
``geo_route/index/`` imports redis.
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

from geo_route.devstack.processes import LOOPBACK, LoggedProcess, free_port, require_binary, start_process, wait_until
from geo_route.errors import DevstackError


@dataclasses.dataclass(frozen=True)
class RedisSecurity:
    """TLS and passwords for a devstack Redis: with ``tls_ca`` (and the server's ``tls_cert`` and
    ``tls_key``, whose names include 127.0.0.1) every node and sentinel listens on TLS only (clients
    need no certificate of their own), replication and Sentinel included; with ``password`` the
    nodes accept only the ACL user ``username`` (the default user is off; replicas and sentinels log
    in as it) and the sentinels ask for ``sentinel_password`` (their default user's)."""

    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    username: str = ""
    password: str = ""
    sentinel_password: str = ""

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None

    def listen_lines(self, port: int) -> list[str]:
        """The listening part of a redis-server or redis-sentinel config file."""
        if not self.tls:
            return [f"port {port}"]
        return [
            "port 0",
            f"tls-port {port}",
            f'tls-cert-file "{self.tls_cert}"',
            f'tls-key-file "{self.tls_key}"',
            f'tls-ca-cert-file "{self.tls_ca}"',
            "tls-auth-clients no",
            "tls-replication yes",
        ]

    def node_lines(self) -> list[str]:
        """ACL lines of a data node (and how its replica logs in to its primary)."""
        if not self.password:
            return []
        return [
            "user default off",
            f"user {self.username} on >{self.password} ~* &* +@all",
            f"masteruser {self.username}",
            f"masterauth {self.password}",
        ]

    def sentinel_lines(self, master_name: str) -> list[str]:
        lines = [f"requirepass {self.sentinel_password}", f"sentinel sentinel-pass {self.sentinel_password}"]
        lines = lines if self.sentinel_password else []
        if self.password:
            lines += [
                f"sentinel auth-user {master_name} {self.username}",
                f"sentinel auth-pass {master_name} {self.password}",
            ]
        return lines

    def client_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        return ssl.create_default_context(cafile=str(self.tls_ca))

    def login(self, sentinel: bool) -> tuple[str, ...]:
        """The ``AUTH`` command a readiness check sends first (empty: none)."""
        if sentinel:
            return ("AUTH", self.sentinel_password) if self.sentinel_password else ()
        return ("AUTH", self.username, self.password) if self.password else ()


NO_SECURITY = RedisSecurity()


class RedisProcess:
    """``RedisProcess(directory).start()`` … ``stop()``; ``url`` is its ``redis://`` (``rediss://``
    with TLS) URL (database 0)."""

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        *,
        replica_of: int | None = None,
        security: RedisSecurity = NO_SECURITY,
    ) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.replica_of = replica_of  # a node of a SentinelTopology: runs from a config file Sentinel rewrites
        self.security = security
        self.logged: LoggedProcess | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.security.tls else 'redis'}://{LOOPBACK}:{self.port}/0"

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self.logged.popen if self.logged is not None else None

    def start(self, timeout: float = 10.0) -> RedisProcess:
        binary = require_binary("redis-server")
        argv = [binary, "--port", str(self.port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"]
        argv += ["--dir", str(self.directory)]
        if self.replica_of is not None or self.security != NO_SECURITY or (self.directory / "redis.conf").exists():
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
            lines = [*self.security.listen_lines(self.port), f"bind {LOOPBACK}", 'save ""', "appendonly no"]
            lines += [f'dir "{self.directory}"', *self.security.node_lines()]
            if self.replica_of is not None:
                lines.append(f"replicaof {LOOPBACK} {self.replica_of}")
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    def answers_ping(self) -> bool:
        if self.security == NO_SECURITY:
            with socket.create_connection((LOOPBACK, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        try:
            return bool(resp_command(self.port, "PING", timeout=0.5, security=self.security) == "PONG")
        except (ssl.SSLError, DevstackError):
            return False

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


def resp_command(
    port: int, *args: str, timeout: float = 1.0, security: RedisSecurity = NO_SECURITY, sentinel: bool = False
) -> Any:
    """One command to a Redis or Sentinel (``sentinel``) on loopback, over TLS and logged in as
    ``security`` says: its reply as str, int, list or None; an error reply raises ``DevstackError``."""
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as plain:
        context = security.client_context()
        sock = context.wrap_socket(plain, server_hostname=LOOPBACK) if context is not None else plain
        with sock, sock.makefile("rb") as replies:
            login = security.login(sentinel)
            commands = [login, args] if login else [args]
            request = []
            for command in commands:
                request.append(f"*{len(command)}\r\n".encode())
                for arg in command:
                    request.append(b"$%d\r\n%s\r\n" % (len(arg.encode()), arg.encode()))
            sock.sendall(b"".join(request))
            if login:
                read_reply(replies)
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


def info_fields(port: int, section: str, security: RedisSecurity = NO_SECURITY) -> dict[str, str]:
    text = resp_command(port, "INFO", section, security=security)
    return dict(line.split(":", 1) for line in str(text).splitlines() if ":" in line)


class SentinelProcess:
    """``redis-sentinel`` watching ``master_name`` (quorum 2) from a config file of its own."""

    def __init__(
        self,
        directory: Path,
        master_name: str,
        master_port: int,
        down_after_ms: int,
        failover_ms: int,
        security: RedisSecurity = NO_SECURITY,
    ):
        self.directory = directory
        self.port = free_port()
        self.master_name = master_name
        self.security = security
        self.lines = [
            *security.listen_lines(self.port),
            f"bind {LOOPBACK}",
            f'dir "{directory}"',
            f"sentinel monitor {master_name} {LOOPBACK} {master_port} 2",
            f"sentinel down-after-milliseconds {master_name} {down_after_ms}",
            f"sentinel failover-timeout {master_name} {failover_ms}",
            f"sentinel parallel-syncs {master_name} 1",
            *security.sentinel_lines(master_name),
        ]
        self.logged: LoggedProcess | None = None

    def start(self, timeout: float = 10.0) -> SentinelProcess:
        binary = require_binary("redis-sentinel")
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "sentinel.conf"
        config.write_text("\n".join(self.lines) + "\n", encoding="utf-8")
        ready = lambda: self.command("PING") == "PONG"  # noqa: E731
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
            reply = self.command("SENTINEL", "get-master-addr-by-name", self.master_name)
        except (OSError, DevstackError):
            return None
        return int(reply[1]) if reply else None

    def command(self, *args: str) -> Any:
        return resp_command(self.port, *args, security=self.security, sentinel=True)


class SentinelTopology:
    """A primary (part ``redis``), its replica (``redis-replica``) and three sentinels (``sentinel-1``
    to ``-3``, quorum 2) on free loopback ports, each in a directory of its own with its own config
    file; stopped by PID. A node restarted after a failover comes back as whatever its config file
    (rewritten by Sentinel) says, and Sentinel turns a returning old primary into a replica."""

    def __init__(
        self,
        directory: Path,
        master_name: str = "geo-route",
        down_after_ms: int = 1000,
        failover_ms: int = 4000,
        security: RedisSecurity = NO_SECURITY,
    ):
        self.master_name = master_name
        self.security = security
        primary = RedisProcess(directory / "redis", security=security)
        replica = RedisProcess(directory / "redis-replica", replica_of=primary.port, security=security)
        self.nodes = {"redis": primary, "redis-replica": replica}
        self.sentinels = [
            SentinelProcess(
                directory / f"sentinel-{n}", master_name, primary.port, down_after_ms, failover_ms, security
            )
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
        if port is None or info_fields(port, "replication", self.security).get("role") != "master":
            return False
        for node in self.nodes.values():
            if node.port != port:
                fields = info_fields(node.port, "replication", self.security)
                if fields.get("master_port") != str(port) or fields.get("master_link_status") != "up":
                    return False
        for sentinel in self.sentinels:
            replicas = sentinel.command("SENTINEL", "replicas", self.master_name)
            flags = [dict(zip(entry[::2], entry[1::2], strict=True)).get("flags", "") for entry in replicas]
            if len(flags) < len(self.nodes) - 1 or any("down" in f or "disconnected" in f for f in flags):
                return False
            if sentinel.command("SENTINEL", "ckquorum", self.master_name)[:2] != "OK":
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
