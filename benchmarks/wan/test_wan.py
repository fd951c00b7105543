"""Tests of the simulated WAN: ``.venv/bin/python -m pytest benchmarks/wan/test_wan.py`` (the link tests need root)."""

from __future__ import annotations

import asyncio
import os
import subprocess

import pytest

from .check import main as check_main
from .link import SimulatedWan, WanUnavailable
from .relay import DelayLine

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and tc need root")


def our_namespaces_left() -> list[str]:
    """Namespaces named like this process's links (``grwan<pid>n...``) that still exist."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line for line in listing.splitlines() if line.startswith(f"grwan{os.getpid()}n")]


def test_delay_line_releases_in_order_only_when_due_and_keeps_end_of_stream() -> None:
    async def scenario() -> None:
        line = DelayLine(limit_bytes=10)
        line.put(1.0, b"abc")
        line.put(2.0, b"defgh")
        line.put(2.5, b"")
        assert line.take_due(0.5) == ([], False)
        assert line.take_due(1.0) == ([b"abc"], False)
        assert line.take_due(3.0) == ([b"defgh"], True)

    asyncio.run(scenario())


def test_delay_line_applies_backpressure_at_its_byte_limit() -> None:
    async def scenario() -> None:
        line = DelayLine(limit_bytes=4)
        line.put(1.0, b"abcd")
        assert not line.has_room.is_set()
        line.take_due(1.0)
        assert line.has_room.is_set()
        assert not line.has_items.is_set()

    asyncio.run(scenario())


@needs_root
def test_check_passes_for_another_configuration_and_leaves_nothing_behind() -> None:
    assert check_main(["--rate-mbit", "20", "--rtt-ms", "30", "--megabytes", "5", "--pings", "10"]) == 0
    assert not our_namespaces_left()


@needs_root
def test_setup_failure_is_loud_and_cleans_up() -> None:
    wan = SimulatedWan(("127.0.0.1", 9), burst="not-a-size")
    with pytest.raises(WanUnavailable, match="tbf"), wan:
        pass
    assert not our_namespaces_left()
