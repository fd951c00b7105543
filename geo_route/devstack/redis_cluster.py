"""A real Redis Cluster on loopback (``ClusterTopology``): N primaries (and replicas, if asked for),
each a ``redis-server`` with ``cluster-enabled`` in a directory of its own, joined by Debian's
``redis-cli --cluster create``; stopped by PID.

Each node's cluster bus is on a free port of its own (``cluster-port``), not port + 10000, so the
nodes only take ports that were free. ``cluster-require-full-coverage no``: a slot whose primary is
gone fails alone (the index answers "unavailable" for its buckets, which go to the primary), the
others keep serving.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from geo_route.devstack.processes import LOOPBACK, LoggedProcess, free_port, require_binary, wait_until
from geo_route.devstack.redis_server import RedisProcess, info_fields, resp_command
from geo_route.errors import DevstackError

CLUSTER_SLOTS = 16384


class ClusterNodeProcess(RedisProcess):
    """A ``redis-server`` with cluster mode on, from a config file of its own (``nodes.conf`` beside it)."""

    def __init__(self, directory: Path, node_timeout_ms: int) -> None:
        super().__init__(directory)
        self.bus_port = free_port()
        self.node_timeout_ms = node_timeout_ms

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def write_config(self) -> Path:
        path = self.directory / "redis.conf"
        if not path.exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            lines = [
                f"port {self.port}",
                f"bind {LOOPBACK}",
                'save ""',
                "appendonly no",
                f'dir "{self.directory}"',
                "cluster-enabled yes",
                "cluster-config-file nodes.conf",
                f"cluster-port {self.bus_port}",
                f"cluster-node-timeout {self.node_timeout_ms}",
                "cluster-require-full-coverage no",
            ]
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    def start(self, timeout: float = 10.0) -> ClusterNodeProcess:
        self.write_config()
        super().start(timeout)
        return self


class ClusterTopology:
    """``ClusterTopology(directory, primaries=3).start()`` … ``stop()``; parts ``redis-cluster-1`` …"""

    def __init__(
        self, directory: Path, primaries: int = 3, replicas_per_primary: int = 0, node_timeout_ms: int = 1000
    ) -> None:
        if primaries < 3:
            raise DevstackError("a Redis Cluster needs at least 3 primaries")
        self.primaries = primaries
        self.replicas_per_primary = replicas_per_primary
        count = primaries * (1 + replicas_per_primary)
        self.nodes = {
            f"redis-cluster-{n}": ClusterNodeProcess(directory / f"redis-cluster-{n}", node_timeout_ms)
            for n in range(1, count + 1)
        }

    @property
    def addresses(self) -> list[str]:
        return [node.address for node in self.nodes.values()]

    def start(self, timeout: float = 60.0) -> ClusterTopology:
        try:
            for node in self.nodes.values():
                node.start()
            self.create(timeout)
            self.wait_until_settled(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def create(self, timeout: float) -> None:
        """``redis-cli --cluster create``: slots spread over the first nodes, the rest their replicas."""
        argv = [require_binary("redis-cli"), "--cluster", "create", *self.addresses]
        argv += ["--cluster-replicas", str(self.replicas_per_primary), "--cluster-yes"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise DevstackError(f"redis-cli --cluster create failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")

    def processes(self) -> dict[str, LoggedProcess]:
        return {name: node.logged for name, node in self.nodes.items() if node.logged is not None}

    def settled(self) -> bool:
        """Every running node says the cluster is ok with every slot served, as many nodes are
        primaries as the cluster has (a restarted old primary has become a replica), and every
        replica's link to its primary is up."""
        roles = [info_fields(node.port, "replication").get("role") for node in self.running()]
        if roles.count("master") != self.primaries:
            return False
        for node in self.running():
            info = str(resp_command(node.port, "CLUSTER", "INFO"))
            fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
            if fields.get("cluster_state") != "ok" or fields.get("cluster_slots_ok") != str(CLUSTER_SLOTS):
                return False
            replication = info_fields(node.port, "replication")
            if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                return False
        return True

    def running(self) -> list[ClusterNodeProcess]:
        return [node for node in self.nodes.values() if node.process is not None and node.process.poll() is None]

    def wait_until_settled(self, timeout: float = 60.0) -> float:
        """Seconds until ``settled()``; raises ``TimeoutError`` if it is not within ``timeout``."""
        started = time.monotonic()
        wait_until(self.settled_quietly, timeout, "the Redis Cluster", interval=0.1)
        return time.monotonic() - started

    def settled_quietly(self) -> bool:
        try:
            return self.settled()
        except (DevstackError, OSError):
            return False

    def primary_part(self, key: str) -> str:
        """The part that is the primary for ``key``'s slot now (as a running node answers)."""
        for node in self.running():
            try:
                slot = int(resp_command(node.port, "CLUSTER", "KEYSLOT", key))
                for start, end, primary, *_ in resp_command(node.port, "CLUSTER", "SLOTS"):
                    if int(start) <= slot <= int(end):
                        port = int(primary[1])
                        return next(name for name, each in self.nodes.items() if each.port == port)
            except (DevstackError, OSError):
                continue
        raise DevstackError(f"no running cluster node names the primary of {key!r}")

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()
