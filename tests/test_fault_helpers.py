"""The fault matrix's probes follow the index's topology: under Redis Sentinel, after a failover,
``index_redis_url`` names the primary the sentinels name now (``RawRedis`` there can write), where
the stack's ``redis_url`` still names the first primary, now a read-only replica. A real
``SentinelTopology`` (a primary, a replica, three sentinels) and a real failover (``SENTINEL
FAILOVER``, no fault needed)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from faults import RawRedis, index_redis_url

from geo_route.config import DEFAULT_REDIS_URL
from geo_route.devstack.redis_server import SentinelTopology, info_fields, resp_command


def test_the_probes_reach_the_primary_the_sentinels_name_after_a_failover(
    tmp_path: Path, site_file: Callable[..., Path]
) -> None:
    topology = SentinelTopology(tmp_path / "sentinel").start()
    try:
        sentinels = f"  sentinels: [{', '.join(topology.sentinel_addresses)}]\n  master_name: {topology.master_name}\n"
        site = str(site_file(redis_url=DEFAULT_REDIS_URL, extra=sentinels))
        first = topology.nodes["redis"]
        assert index_redis_url(site) == first.url

        assert resp_command(topology.sentinels[0].port, "SENTINEL", "FAILOVER", topology.master_name) == "OK"
        deadline = time.monotonic() + 30
        while topology.master_port() in (None, first.port) or info_fields(first.port, "replication")["role"] != "slave":
            assert time.monotonic() < deadline, "the sentinels promoted no replica, or left the old primary, in 30 s"
            time.sleep(0.1)

        promoted = topology.nodes["redis-replica"]
        assert index_redis_url(site) == promoted.url
        with RawRedis(index_redis_url(site)) as redis:
            assert redis.command("SET", "probe", "written") == "OK", "the probe writes on the primary now"
        with RawRedis(first.url) as redis, pytest.raises(RuntimeError, match="READONLY"):
            redis.command("SET", "probe", "written")  # what the probes did before: the first primary, a replica now
    finally:
        topology.stop()
