"""Test support: real processes on free loopback ports, cleaned up by PID even when a test fails.

The helpers live in ``geo_route.devstack`` (shared with the demo); these names are kept for the tests.
"""

from __future__ import annotations

import os

from geo_route.devstack.processes import free_port, http_get, require_binary, stop_process, wait_until
from geo_route.devstack.redis_server import RedisProcess

RedisServer = RedisProcess
"""A real redis-server on a free loopback port in its own directory."""


def environment_without(*prefixes: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


__all__ = [
    "RedisServer",
    "environment_without",
    "free_port",
    "http_get",
    "require_binary",
    "stop_process",
    "wait_until",
]
