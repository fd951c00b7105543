"""Phase 3 of ``benchmarks/load.py``: many distinct notification events, and the updater's memory meanwhile.

Envelopes shaped like registry 2.8's (one blob push event each, a new ``id`` every time, for digests
nobody pulls) are POSTed to the updater's ``/events/local`` with the site's shared secret, over
keep-alive connections, as a registry delivers them. The updater remembers applied event ids in a
bounded window per worker (``updater.dedupe_size``), so once the window is full its memory must stop
growing. The index grows by one set member per event; that is Redis memory, reported apart.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import time
from dataclasses import dataclass, field

from benchlib.common import BenchError
from benchlib.memory import tree_memory
from geo_route.config import load_settings
from geo_route.devstack.client import StackClient

EVENT_CONNECTIONS = 4
REPOSITORY = "bench/events"
FLAT_SLACK_KIB = 1024


@dataclass
class EventRound:
    events_sent: int  # cumulative
    updater_rss_kib: int
    seconds: float


@dataclass
class EventPhase:
    dedupe_size: int
    workers: int
    baseline_rss_kib: int = 0
    rounds: list[EventRound] = field(default_factory=list)
    failed: int = 0


def envelope(number: int) -> bytes:
    event = {
        "id": f"load-{number}",
        "timestamp": "2026-11-23T19:19:22.3Z",
        "action": "push",
        "target": {
            "mediaType": "application/octet-stream",
            "repository": REPOSITORY,
            "digest": f"sha256:{number:064x}",
            "size": 1,
        },
    }
    return json.dumps({"events": [event]}).encode()


def post_range(address: str, secret: str, numbers: range) -> int:
    """POST one envelope per number over one keep-alive connection; returns how many were not 200."""
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    failed = 0
    try:
        for number in numbers:
            body = envelope(number)
            headers = {"Authorization": secret, "Content-Type": "application/vnd.docker.distribution.events.v1+json"}
            connection.request("POST", "/events/local", body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            failed += response.status != 200
    finally:
        connection.close()
    return failed


def run_event_phase(client: StackClient, updater_pid: int, events: int, round_size: int) -> EventPhase:
    settings = load_settings(client.info.site_file, environ={})
    address, secret = settings.updater.bind[0], settings.updater.local_secret
    phase = EventPhase(settings.updater.dedupe_size, settings.updater.workers)
    phase.baseline_rss_kib = tree_memory(updater_pid).total_kib
    with concurrent.futures.ThreadPoolExecutor(EVENT_CONNECTIONS) as pool:
        for start in range(0, events, round_size):
            started = time.monotonic()
            stop = min(events, start + round_size)
            step = -(-(stop - start) // EVENT_CONNECTIONS)
            chunks = [range(first, min(stop, first + step)) for first in range(start, stop, step)]
            phase.failed += sum(pool.map(lambda numbers: post_range(address, secret, numbers), chunks))
            rss = tree_memory(updater_pid).total_kib
            phase.rounds.append(EventRound(stop, rss, time.monotonic() - started))
            print(f"[events] {stop:>7,} distinct events sent: updater RSS {rss / 1024:6.1f} MiB, failed {phase.failed}")
    if not phase.rounds:
        raise BenchError("no events were sent")
    return phase


def judge_events(phase: EventPhase) -> tuple[list[str], dict[str, float]]:
    """Every event accepted; once every worker's window is full, the updater's RSS stays flat."""
    problems = [f"{phase.failed} notification POSTs were not answered 200"] if phase.failed else []
    full_at = 2 * phase.dedupe_size * phase.workers  # round-robin over workers is not guaranteed: 2x
    full = [r for r in phase.rounds if r.events_sent >= full_at]
    figures: dict[str, float] = {"full_at_events": full_at}
    if len(full) >= 2:
        growth = full[-1].updater_rss_kib - full[0].updater_rss_kib
        figures["growth_once_full_kib"] = growth
        figures["events_once_full"] = full[-1].events_sent - full[0].events_sent
        if growth > FLAT_SLACK_KIB:
            problems.append(f"the updater grew {growth} KiB after its dedupe windows were full")
    else:
        problems.append(f"send more events: the windows are full only after ~{full_at:,}")
    return problems, figures


def print_events(phase: EventPhase, figures: dict[str, float]) -> None:
    print(
        f"\nmany events: updater.dedupe_size {phase.dedupe_size:,} per worker, {phase.workers} worker(s); "
        f"updater RSS before {phase.baseline_rss_kib / 1024:.1f} MiB"
    )
    for r in phase.rounds:
        print(f"  {r.events_sent:>8,} events  RSS {r.updater_rss_kib / 1024:7.1f} MiB  {r.seconds:6.1f} s")
    if "growth_once_full_kib" in figures:
        print(
            f"  once full: {figures['growth_once_full_kib'] / 1024:.1f} MiB over "
            f"{figures['events_once_full']:,.0f} more events (allowed {FLAT_SLACK_KIB / 1024:.1f} MiB)"
        )
