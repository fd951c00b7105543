"""Phase 3 of ``benchmarks/load.py``: many distinct notification events, and the updater's memory meanwhile.

Envelopes shaped like registry 2.8's (one blob push event each, a new ``id`` every time, for digests
nobody pulls) are POSTed to the updater's ``/events/local`` with the site's shared secret, over
keep-alive connections, as a registry delivers them. The updater remembers applied event ids in a
bounded window per worker (``updater.dedupe_size``), so once the window is full its memory must stop
growing. The index grows by one set member per event; that is Redis memory, reported apart.

Each event is a blob the index now holds as local in one repository, which the updater's content
verification reads back (``geo_route/updater/verify.py``: a pass every ``updater.verify_interval``,
one GET per digest; the local registry answers 404 for these made-up digests). A pass keeps a
bounded amount of memory whatever the repository's size (a page of it, the last ``SEEN_DIGESTS``
digests it read to a verdict, and its thread's malloc arena, which settles at about 1.3 MiB), but
takes it the first time it reads a repository this large, which here is during the phase, whenever
the next pass starts (a pass that held the whole repository added 14-17 MiB here, more with every
event). So once the windows are full the phase sends nothing until a verification pass has ended
that read at least as many blobs as events were sent (the periodic work has run once over the
repository), and judges from there: every later round, and the updater after one more pass, over
every event's blob, at the end (so memory a pass took in proportion to the repository would show).
The pass's reads also share the machine (and the worker's GIL) with the events, so rounds are
slower while one runs.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import time
from dataclasses import dataclass, field

from benchlib.common import BenchError
from benchlib.memory import tree_memory
from geo_route.config import Settings, load_settings
from geo_route.devstack.client import StackClient
from geo_route.index.redis_store import RedisIndexStore

EVENT_CONNECTIONS = 4
REPOSITORY = "bench/events"
FLAT_SLACK_KIB = 1024
VERIFIER_WAIT_EXTRA = 300.0  # seconds beyond updater.verify_interval for a whole pass to start and end


@dataclass
class EventRound:
    events_sent: int  # cumulative
    updater_rss_kib: int
    seconds: float


@dataclass
class VerifierWait:
    events_sent: int
    blobs_read: int  # by the verification pass that ended (0: none did in time)
    seconds: float


@dataclass
class EventPhase:
    dedupe_size: int
    workers: int
    baseline_rss_kib: int = 0
    rounds: list[EventRound] = field(default_factory=list)
    failed: int = 0
    verifying: bool = True  # updater.verify_bytes_per_second > 0
    steady_from: int = 0  # events sent when the windows were full and a verification pass had run over them
    steady_rss_kib: int = 0  # the updater's RSS then: the judged rounds' baseline
    verifier_waits: list[VerifierWait] = field(default_factory=list)  # once the windows are full; at the end
    final_rss_kib: int = 0  # after the pass over every event's blob (0: verification off)
    verifier_problem: str = ""


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


def wait_for_verifier(settings: Settings, phase: EventPhase, events_sent: int, when: str) -> int:
    """Until a verification pass that read at least ``events_sent`` blobs has ended after now (its
    ``verify`` status record in the index), at most ``updater.verify_interval`` +
    ``VERIFIER_WAIT_EXTRA`` seconds: the blobs that pass read (0: none ended, a problem)."""
    store = RedisIndexStore(settings.redis)
    read = 0
    try:
        since, started = store.now(), time.monotonic()
        deadline = started + settings.updater.verify_interval + VERIFIER_WAIT_EXTRA
        while time.monotonic() < deadline:
            record = store.status_records().get("verify")
            if record is not None and record.at > since and int(record.fields.get("blobs", 0)) >= events_sent:
                read = int(record.fields["blobs"])
                break
            time.sleep(1.0)
    finally:
        store.close()
    waited = time.monotonic() - started
    phase.verifier_waits.append(VerifierWait(events_sent, read, waited))
    if not read:
        phase.verifier_problem = f"no pass over {events_sent:,} blobs ended in {waited:.0f} s"
    print(f"[events] {when}; waited {waited:.1f} s for a verification pass over {events_sent:,} blobs: read {read:,}")
    return read


def run_event_phase(client: StackClient, updater_pid: int, events: int, round_size: int) -> EventPhase:
    settings = load_settings(client.info.site_file, environ={})
    address, secret = settings.updater.bind[0], settings.updater.local_secret
    phase = EventPhase(settings.updater.dedupe_size, settings.updater.workers)
    phase.verifying = settings.updater.verify_bytes_per_second > 0
    full_at = windows_full_at(phase)
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
            if not phase.steady_from and stop >= full_at and stop < events:
                if phase.verifying:
                    wait_for_verifier(settings, phase, stop, "windows full")
                phase.steady_from, phase.steady_rss_kib = stop, tree_memory(updater_pid).total_kib
                print(f"[events] judged from here: updater RSS {phase.steady_rss_kib / 1024:6.1f} MiB")
    if not phase.rounds:
        raise BenchError("no events were sent")
    if phase.verifying and phase.steady_from:  # the pass over them all, whose memory must not have grown
        wait_for_verifier(settings, phase, events, "all sent")
        phase.final_rss_kib = tree_memory(updater_pid).total_kib
    return phase


def windows_full_at(phase: EventPhase) -> int:
    return 2 * phase.dedupe_size * phase.workers  # round-robin over workers is not guaranteed: 2x


def judge_events(phase: EventPhase) -> tuple[list[str], dict[str, float]]:
    """Every event accepted; once every worker's window is full and verification has warmed up
    (the sample taken then starts the judged rounds), the updater's RSS stays flat."""
    problems = [f"{phase.failed} notification POSTs were not answered 200"] if phase.failed else []
    if phase.verifier_problem:
        problems.append(f"steady state not reached, verification never ran over the events: {phase.verifier_problem}")
    full_at = windows_full_at(phase)
    after = [r for r in phase.rounds if r.events_sent > phase.steady_from] if phase.steady_from else []
    figures: dict[str, float] = {"full_at_events": full_at, "steady_from_events": phase.steady_from}
    if after:
        growth = max(after[-1].updater_rss_kib, phase.final_rss_kib) - phase.steady_rss_kib
        figures["growth_once_full_kib"] = growth
        figures["events_once_full"] = after[-1].events_sent - phase.steady_from
        if growth > FLAT_SLACK_KIB:
            problems.append(f"the updater grew {growth} KiB after its dedupe windows were full")
    else:
        problems.append(f"send more events: the windows are full only after ~{full_at:,}, and a round more")
    return problems, figures


def print_events(phase: EventPhase, figures: dict[str, float]) -> None:
    print(
        f"\nmany events: updater.dedupe_size {phase.dedupe_size:,} per worker, {phase.workers} worker(s); "
        f"updater RSS before {phase.baseline_rss_kib / 1024:.1f} MiB"
    )
    waits = iter(phase.verifier_waits)
    for r in phase.rounds:
        print(f"  {r.events_sent:>8,} events  RSS {r.updater_rss_kib / 1024:7.1f} MiB  {r.seconds:6.1f} s")
        if phase.steady_from and r.events_sent == phase.steady_from:
            wait = next(waits, None)
            waited = f"after a verification pass over {wait.blobs_read:,} blobs ({wait.seconds:.0f} s)" if wait else ""
            print(f"  {'':>8} judged from RSS {phase.steady_rss_kib / 1024:7.1f} MiB {waited or '(verification off)'}")
    final = next(waits, None)
    if final is not None:
        print(
            f"  {'':>8} after a verification pass over {final.blobs_read:,} blobs ({final.seconds:.0f} s):"
            f" RSS {phase.final_rss_kib / 1024:7.1f} MiB"
        )
    if "growth_once_full_kib" in figures:
        print(
            f"  once full: {figures['growth_once_full_kib'] / 1024:.1f} MiB over "
            f"{figures['events_once_full']:,.0f} more events (allowed {FLAT_SLACK_KIB / 1024:.1f} MiB)"
        )
