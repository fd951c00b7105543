"""The primary load the updater causes: HEADs per notification event, and the refresher's HEAD rate.

Since the consistency model (docs/consistency.md) an event is only a hint: the updater asks the
primary (``HEAD /v2/<name>/manifests/<tag>``) for every tag an event concerns, re-resolves hot tags
before their pin expires, and reconciliation re-asks every tag the index knows (and every manifest
held here, by digest). This prints what that costs the primary, with the default settings (``routing.max_tag_age`` 300,
``routing.refresh_fraction`` 0.5, ``updater.reconcile_interval`` 3600, read from a site file that
sets none of them).

Part ``events`` (real processes): the devstack (``geo_route.devstack``: two Docker Distribution 2.8
registries, the real updater, Redis, NGINX) with ``tests/support.py``'s recording relay in front of
the primary, so every request the updater sends the primary is counted (NGINX uses the relay too,
but nothing is pulled through it here). Images are pushed straight to the primary's own port, so
they bypass the relay and no write fence applies; the primary notifies the updater, which resolves
the tags. Three scenarios, each on its own repository, each tag a new manifest:

* ``push``: one push per tag (one tag event each);
* ``move``: each tag pushed twice in a row with another manifest (two tag events);
* ``push+delete``: each tag pushed, then its manifest deleted by digest at the primary at once (two
  events). When the delete lands before the push's resolution, the primary answers 404 where the
  event announced a digest: the updater is designed to ask again 3 times (0.5, 1, 2 s) before it
  believes it (``geo_route.updater.resolver``, ``HINT_RETRIES``): the hint-retry cost, up to 4 HEADs
  for one event. A scenario still asking after ``SETTLE_LIMIT`` seconds is reported as not settled,
  with the HEAD rate it still causes.

After each scenario it waits until every tag is resolved, nothing is queued and the primary has had
no request for a while, then counts HEADs by tag, per tag change (the manifest pushes and deletes
made) and per event (the primary's events the updater applied, from its own ``/metrics``).

Part ``refresh`` (simulated time): 10,000 pinned tags of which 1,000 are read every minute, for two
simulated hours, on the real ``RedisIndexStore`` on a real ``redis-server`` with an injected index
clock (``index_clock=``), the real routing (``index_query``/``route`` with ``Policy.from_settings``),
the real ``Resolver`` and reconciliation's real pin refresh (``ReconcileRun.refresh_primary_pins``:
every known tag by tag, every manifest held here by digest), each with a counting in-memory primary
(``TagSource``): it measures how many questions the updater asks, not how fast the primary answers.
The tags are tagged in the local registry (as GitLab Geo replicates them) and pinned by the
updater's first reconciliation at t = 0 (it runs when the updater starts; ``--cold`` skips it, so
hot tags are first pinned by their own reads); then every simulated minute: reconciliation's
refresh when ``reconcile_interval`` has passed, one read of each hot tag (``Accept`` naming the
pinned type), and ``resolve_due()`` until nothing is due. Reads at the minute's start and
resolution right after them model a resolver that keeps up (it polls every 0.2 s).

Usage:
    .venv/bin/python benchmarks/resolution_load.py [--part both|events|refresh] [--tags N]
        [--pinned N] [--hot N] [--hours H] [--cold] [--quick] [--json FILE]

Exit status: 0 when everything was measured, every scenario settled and every hot-tag read after
the tag's first local read was local; 1 when a scenario's tags were still being asked after
``SETTLE_LIMIT`` seconds or a hot read went back to the primary; 2 when the benchmark could not be
set up or run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib
sys.path.append(str(Path(__file__).resolve().parent.parent))  # tests.support (the recording relay)

from benchlib.common import BenchError
from benchlib.resolution_events import RATE_WINDOW, SETTLE_LIMIT, EventScenario, measure_events
from benchlib.resolution_refresh import MINUTE, RefreshResult, measure_refresh

from geo_route.errors import GeoRouteError
from geo_route.updater.resolver import HINT_RETRIES, HINT_RETRY_DELAY

# ---------------------------------------------------------------------------------------------
# report


def print_events(scenarios: list[EventScenario]) -> None:
    print("\n(a) HEADs the primary received per notification event (devstack: Distribution 2.8 primary, real updater)")
    header = (
        f"  {'scenario':<12} {'tags':>5} {'tag changes':>11} {'events':>7} {'HEADs':>7} {'per change':>11} "
        f"{'per event':>10}  tags x HEADs each"
    )
    print(header)
    print("  " + "-" * (len(header) + 6))
    for s in scenarios:
        mark = "  " if s.settled else ">="
        print(
            f"  {s.name:<12} {s.tags:>5} {s.tag_changes:>11} {s.applied_events:>7} {mark}{s.heads:>5} "
            f"{mark}{s.per_change:>9.2f} {mark}{s.per_applied_event:>8.2f}  {s.distribution()}"
        )
    print("  tag changes: the manifest pushes and deletes made at the primary; events: the primary's events the")
    print("  updater applied (its /metrics; registry 2.8 sends a manifest delete as two events)")
    for s in scenarios:
        if not s.settled:
            per_tag = s.ongoing_heads_per_s / len(s.still_asking)
            print(
                f"  {s.name}: NOT SETTLED: {len(s.still_asking)} of {s.tags} tags were still being asked "
                f"{SETTLE_LIMIT:g} s after the last push: {s.ongoing_heads_per_s:.2f} HEAD/s over the last "
                f"{RATE_WINDOW:g} s, {per_tag:.2f} per tag (the counts above stop there)"
            )
    print(
        f"  designed hint retries: {HINT_RETRIES} (after {HINT_RETRY_DELAY:g} s, doubling) when the primary answers "
        f"another digest than the event announced: at most {HINT_RETRIES + 1} HEADs for one resolution"
    )
    for s in scenarios:
        events = ", ".join(f"{key} {n}" for key, n in s.events.items()) or "none counted"
        print(f"  {s.name:<12} events from the primary (updater /metrics): {events}")
        if s.other_requests:
            print(f"  {'':<12} other requests at the primary: {Counter(s.other_requests).most_common(5)}")


def print_refresh(result: RefreshResult) -> None:
    settings = ", ".join(f"{key} {value:g}" for key, value in result.settings.items())
    print(
        f"\n(b) updater HEAD rate at the primary: {result.pinned:,} pinned tags, {result.hot:,} read every minute, "
        f"{result.seconds / 3600:g} h simulated" + (", starting with no pins (--cold)" if result.cold else "")
    )
    print(f"  settings: {settings}")
    interval = result.settings["updater.reconcile_interval"]
    refresher, reconcile = result.refresher_heads, result.reconcile_heads
    by_digest = result.reconcile_heads_by_digest
    by_tag = reconcile - by_digest
    every = f"each hot tag once per {result.seconds * result.hot / refresher:,.0f} s" if refresher else "none"
    rows = [
        ("refresher (reads of due pins)", refresher, every),
        (
            f"reconciliation ({result.reconcile_runs} runs)",
            reconcile,
            f"{by_tag:,} by tag + {by_digest:,} by digest (manifests held here); one run per {interval:g} s",
        ),
        ("total", refresher + reconcile, ""),
    ]
    print(f"  {'source':<32} {'HEADs':>8} {'HEAD/s':>8}  note")
    print("  " + "-" * 86)
    for label, heads, note in rows:
        print(f"  {label:<32} {heads:>8,} {result.rate(heads):>8.2f}  {note}".rstrip())
    period = (result.settings["routing.refresh_after"] // MINUTE + 1) * MINUTE
    print(
        f"  model: a tag read every {MINUTE:g} s is re-resolved at its first read past refresh_after, every "
        f"{period:g} s: {result.hot / period:.2f} HEAD/s, less what reconciliation's refresh makes unnecessary"
    )
    reads = sum(result.reads.values())
    local = sum(n for key, n in result.reads.items() if key.startswith("local/"))
    breakdown = ", ".join(f"{key} {n:,}" for key, n in result.reads.most_common())
    print(f"  hot-tag reads {reads:,}: local {local:,}, primary {reads - local:,} ({breakdown})")
    print(f"  hot-tag reads sent to the primary after the tag's first local read: {result.primary_reads_after_first:,}")
    print(f"  resolutions still queued at the end: {result.queued_at_end}")


def write_json(path: Path, scenarios: list[EventScenario], refresh: RefreshResult | None) -> None:
    document: dict[str, Any] = {
        "events": [
            dataclasses.asdict(s)
            | {
                "heads": s.heads,
                "applied_events": s.applied_events,
                "heads_per_change": s.per_change,
                "heads_per_applied_event": s.per_applied_event,
                "settled": s.settled,
            }
            for s in scenarios
        ],
        "refresh": None,
    }
    if refresh is not None:
        document["refresh"] = dataclasses.asdict(refresh) | {
            "reads": dict(refresh.reads),  # asdict would rebuild the Counter from its items
            "refresher_heads_per_s": refresh.rate(refresh.refresher_heads),
            "reconcile_heads_per_s": refresh.rate(refresh.reconcile_heads),
            "total_heads_per_s": refresh.rate(refresh.refresher_heads + refresh.reconcile_heads),
        }
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# main


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--part", choices=("both", "events", "refresh"), default="both", help="what to measure (default both)")
    add("--tags", type=int, help="events: tags per scenario (default 20; --quick 5)")
    add("--pinned", type=int, help="refresh: pinned tags (default 10,000; --quick 2,000)")
    add("--hot", type=int, help="refresh: tags read every minute (default 1,000; --quick 200)")
    add("--hours", type=float, help="refresh: simulated hours (default 2; --quick 1)")
    add("--cold", action="store_true", help="refresh: start with no pins (no reconciliation at t = 0)")
    add("--quick", action="store_true", help="smoke run: fewer tags, one simulated hour")
    add("--json", type=Path, metavar="FILE", help="also write the figures to FILE")
    args = parser.parse_args(argv)
    args.tags = args.tags or (5 if args.quick else 20)
    args.pinned = args.pinned or (2000 if args.quick else 10_000)
    args.hot = args.hot or (200 if args.quick else 1000)
    args.hours = args.hours or (1.0 if args.quick else 2.0)
    if not 0 < args.hot <= args.pinned or args.tags < 1 or args.hours <= 0:
        parser.error("need 0 < --hot <= --pinned, --tags >= 1 and --hours > 0")
    return args


@contextlib.contextmanager
def work_directory() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="geo-route-resolution-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    started = time.monotonic()
    scenarios: list[EventScenario] = []
    refresh: RefreshResult | None = None
    try:
        with work_directory() as directory:
            if args.part in ("both", "events"):
                print(f"part events: {args.tags} tags per scenario on the devstack", flush=True)
                scenarios = measure_events(args.tags, directory / "events")
            if args.part in ("both", "refresh"):
                print(f"part refresh: {args.pinned:,} pinned, {args.hot:,} hot, {args.hours:g} h simulated", flush=True)
                (directory / "refresh").mkdir()
                refresh = measure_refresh(args.pinned, args.hot, args.hours, args.cold, directory / "refresh")
    except (BenchError, GeoRouteError) as exc:
        print(f"\nbenchmark failed: {exc}", file=sys.stderr)
        return 2
    if scenarios:
        print_events(scenarios)
    if refresh is not None:
        print_refresh(refresh)
    if args.json:
        write_json(args.json, scenarios, refresh)
        print(f"\nwrote {args.json}")
    print(f"wall time {time.monotonic() - started:.1f} s")
    unsettled = any(not scenario.settled for scenario in scenarios)
    return 1 if unsettled or (refresh is not None and refresh.primary_reads_after_first) else 0


if __name__ == "__main__":
    sys.exit(main())
