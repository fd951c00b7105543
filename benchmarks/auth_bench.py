"""End-to-end throughput and latency of ``GET /auth``, the NGINX ``auth_request`` endpoint.

What it measures: complete routing decisions as NGINX would ask for them. Each request carries
``X-Original-Method: GET``, ``X-Original-URI`` and one bearer token, so a request costs gunicorn's
HTTP handling, the WSGI fast path, a token-cache hit (the same RS256 token every time, verified once
per worker), request classification, one Redis round trip and the metrics updates. ``--request``
picks the decision (one kind per run, so each has its own figures):

* ``blob`` (default): ``/v2/bench/app/blobs/sha256:<digest>``, one ``SISMEMBER``; the answer must be
  200 ``X-Geo-Route: local`` / ``X-Geo-Reason: blob-local``;
* ``manifest``: the manifest by digest, one Lua script (present here and not deleted at the
  primary); ``local``/``manifest-local``;
* ``tag``: ``/v2/bench/app/manifests/v1`` with Docker's ``Accept``, one Lua script (the pin, the
  index epoch, the pinned manifest's presence, Redis ``TIME``; it would queue a refresh when due);
  ``local``/``tag-pinned``. The pin is written as a resolution writes it: stamped on the index's
  clock with the media type the ``Accept`` names, and stamped anew before every run (the refresher's
  job on a real site), so no run reads a pin due for refresh or stale.

Everything is real and private to the run: a temporary directory with an RSA-2048 key and its
self-signed certificate (the ``rootcertbundle``), a site YAML (routing at its defaults), its own
``redis-server`` and ``geo-route serve`` (gunicorn) on free 127.0.0.1 ports. The gunicorn settings
default to the service's own (``geo_route.config.ServerSettings()``); the flags override them. The
index is filled with the project's own write API. Both processes are stopped by PID and the directory is removed at
the end, however the run ends.

The target (from the issue) is at least 2,000 decisions/s with p99 <= 10 ms at 32 concurrent
connections, on a 2-core machine. wrk is a closed-loop generator: each connection sends its next
request only when the previous answer has arrived, so by Little's law mean latency = connections /
throughput, and at 32 connections both halves can only hold at once above ~3,200/s. One service
start therefore measures two readings, each ``--repeat`` times (the median is judged):

* phase ``saturation``: closed-loop wrk at full speed. Answers "how many decisions/s at most" (the
  throughput half); its latency is queueing-dominated and shown for information.
* phase ``paced``: wrk paced to 2,000 req/s (a LuaJIT ``delay()`` schedule per wrk thread) over the
  same connections. Answers "what latency at the target load" (the p99 half). A paced run counts as
  at the requested rate within 2 % below it. It is still not open-loop: wrk times a request from
  when it is actually sent, so a stalled server delays later sends instead of counting their waiting
  time (coordinated omission), and the tail is understated compared with wrk2.

Every run is checked against the service's own ``/metrics`` (read before and after): the decision
counters must show only the expected local answer and no index errors (a Redis failure still answers 200,
routed to the primary, and would otherwise pass unnoticed); wrk must see no non-2xx answers and no
socket errors. The ``geo_route_decision_seconds`` histogram gives the time inside the handler
(without queueing), and the CPU each worker, Redis and wrk used is shown too.

On a machine shared with other work, throughput and tail swing by tens of percent from run to run;
``benchmarks/decision_cost.py`` measures the CPU a decision costs, which sharing disturbs less.

Comparing with an older commit: the script runs against whichever ``geo_route`` Python imports, e.g.
``PYTHONPATH=/tmp/wt-bench .venv/bin/python benchmarks/auth_bench.py --request tag`` with
``/tmp/wt-bench`` a ``git worktree`` of the older commit (the service inherits ``PYTHONPATH``; the
tag pin is written without an index clock or media type for commits that have neither).

Usage:
    .venv/bin/python benchmarks/auth_bench.py [--request blob|manifest|tag] [--mode both|saturation|paced] [--rate R]
        [--repeat 3] [--duration 10] [--quick] [--connections 32] [--workers N]
        [--worker-class httptools|asgi|sync|gthread] [--threads N] [--[no-]reuse-port] [--json FILE] [--profile FILE]

Exit status: 0 when every run completed without errors (whether or not the target is met); 1 when
the load saw errors (non-2xx answers, socket errors, decisions other than the expected one, index errors
or the service dying); 2 when the benchmark could not be set up or run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import sys
import tempfile
import time
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib, also when imported from elsewhere

from benchlib.common import REQUESTS, TARGET_CONNECTIONS, TARGET_RPS, BenchError
from benchlib.measure import Phase, RunResult, measure_run, warm_up
from benchlib.profiling import print_profile, start_profiler
from benchlib.report import (
    describe_run,
    describe_verdict,
    format_phase_header,
    format_phase_summary,
    format_run_line,
    format_verdict,
    judge_target,
    write_json,
)
from benchlib.site import Cleanup, Site, start_site
from benchlib.wrk import Load, write_wrk_script

from geo_route.config import ServerSettings
from geo_route.devstack.processes import stop_process

SERVICE_DEFAULTS = ServerSettings()
WORKER_CLASSES = typing.get_args(typing.get_type_hints(ServerSettings)["worker_class"])
WARMUP_SECONDS = 2
DURATION, QUICK_DURATION = 10, 3
REPEAT, QUICK_REPEAT = 3, 1


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.duration = args.duration or (QUICK_DURATION if args.quick else DURATION)
    args.repeat = args.repeat or (QUICK_REPEAT if args.quick else REPEAT)
    args.mode = args.mode or ("paced" if args.rate is not None else "both")
    args.rate = TARGET_RPS if args.rate is None else args.rate
    if min(args.workers, args.threads, args.duration, args.repeat, args.wrk_threads) < 1:
        parser.error("--workers, --threads, --duration, --repeat and --wrk-threads must be at least 1")
    if args.connections < args.wrk_threads:
        parser.error("--connections must be at least --wrk-threads")
    if args.worker_class == "sync" and args.threads > 1:
        parser.error("gunicorn silently turns sync with threads > 1 into gthread; use --worker-class gthread")
    if args.rate <= 0:
        parser.error("--rate must be greater than 0")
    return args


def build_parser() -> argparse.ArgumentParser:
    defaults = SERVICE_DEFAULTS  # gunicorn settings default to the service's own (geo_route.config)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--request", choices=tuple(REQUESTS), default="blob", help="the decision every request asks (default blob)")
    add("--mode", choices=("both", "saturation", "paced"), help="phases to run (default both; paced with --rate)")
    add("--rate", type=float, help=f"paced phase rate in requests/s (default {TARGET_RPS:,.0f}; alone: paced only)")
    add("--repeat", type=int, help=f"measured runs per phase (default {REPEAT})")
    add("--duration", type=int, help=f"seconds per measured run (default {DURATION})")
    add("--quick", action="store_true", help=f"smoke run: --duration {QUICK_DURATION} --repeat {QUICK_REPEAT}")
    add("--connections", type=int, default=TARGET_CONNECTIONS, help="wrk connections (default 32)")
    add("--wrk-threads", type=int, default=2, help="wrk threads (default 2)")
    add("--workers", type=int, default=defaults.workers, help=f"gunicorn workers (default {defaults.workers})")
    add(
        "--worker-class",
        choices=WORKER_CLASSES,
        default=defaults.worker_class,
        help=f"(default {defaults.worker_class})",
    )
    add(
        "--threads", type=int, default=defaults.threads, help=f"threads per gthread worker (default {defaults.threads})"
    )
    add(
        "--reuse-port",
        action=argparse.BooleanOptionalAction,
        default=defaults.reuse_port,
        help=f"(default {defaults.reuse_port})",
    )
    add("--json", type=Path, metavar="FILE", help="also write every run, the medians and the verdict to FILE")
    add("--profile", type=Path, metavar="FILE", help="extra run sampling one worker with py-spy; stacks in FILE")
    return parser


def build_server_settings(args: argparse.Namespace) -> ServerSettings:
    return dataclasses.replace(
        SERVICE_DEFAULTS,
        workers=args.workers,
        worker_class=args.worker_class,
        threads=args.threads,
        reuse_port=args.reuse_port,
    )


def plan_loads(args: argparse.Namespace) -> list[Load]:
    loads = []
    if args.mode in ("both", "saturation"):
        loads.append(Load("saturation", args.connections, args.wrk_threads))
    if args.mode in ("both", "paced"):
        loads.append(Load("paced", args.connections, args.wrk_threads, args.rate))
    return loads


def print_configuration(args: argparse.Namespace, server: ServerSettings) -> None:
    def describe(settings: ServerSettings) -> str:
        return (
            f"workers={settings.workers} worker_class={settings.worker_class} threads={settings.threads} "
            f"reuse_port={settings.reuse_port}"
        )

    request = REQUESTS[args.request]
    print("geo-route GET /auth benchmark")
    print(f"  request   {request.name}: GET {request.uri} -> {request.answer} ({request.index_work})")
    if request.accept:
        print(f"            Accept: {request.accept}")
    print(f"  service   {describe(server)} (service defaults: {describe(SERVICE_DEFAULTS)})")
    print(
        f"  load      {', '.join(load.phase for load in plan_loads(args))} | connections={args.connections} "
        f"wrk_threads={args.wrk_threads} | {args.repeat} x {args.duration} s per phase, "
        f"after a {WARMUP_SECONDS} s warm-up"
    )
    print(f"  host      {os.cpu_count()} CPUs shared by wrk, gunicorn and redis-server\n", flush=True)


def run_phase(site: Site, phase: Phase, args: argparse.Namespace) -> bool:
    """``--repeat`` measured runs of one phase; False when the service died (nothing more can be measured)."""
    for line in format_phase_header(phase, args.repeat, args.duration):
        print(line, flush=True)
    for index in range(1, args.repeat + 1):
        run = measure_run(site, phase, args.duration, f"{index}/{args.repeat}")
        phase.runs.append(run)
        print(format_run_line(run), flush=True)
        if not site.is_alive():
            return False
    for line in format_phase_summary(phase):
        print(line)
    return True


def run_profile(site: Site, phase: Phase, args: argparse.Namespace, cleanup: Cleanup) -> RunResult:
    """One extra run with py-spy on the first worker; it slows that worker, so it stays out of the medians."""
    pid = site.workers[0]
    profiler = start_profiler(pid, max(1, args.duration - 1), args.profile)
    cleanup.append(lambda: stop_process(profiler))
    print(f"\nprofile run: {phase.load.describe()}, {args.duration} s, py-spy on worker {pid} (not in the medians)")
    run = measure_run(site, phase, args.duration, "profile")
    print(format_run_line(run))
    print_profile(profiler, args.profile, pid)
    return run


def run_benchmark(args: argparse.Namespace, directory: Path, cleanup: Cleanup) -> int:
    server = build_server_settings(args)
    print_configuration(args, server)
    request = REQUESTS[args.request]
    site = start_site(directory, server, cleanup, request)
    phases = {
        load.phase: Phase(load, write_wrk_script(directory, site.token, load, request), request.decision)
        for load in plan_loads(args)
    }
    warm_up(site, next(iter(phases.values())), WARMUP_SECONDS)
    completed = all(run_phase(site, phase, args) for phase in phases.values())  # stops at a dead service
    profile = run_profile(site, next(iter(phases.values())), args, cleanup) if args.profile and completed else None

    errors = [error for phase in phases.values() for error in phase.errors()]
    errors += [f"profile run: {error}" for error in (profile.errors if profile else [])]
    verdict = judge_target({name: phase for name, phase in phases.items() if phase.runs}, args.connections)
    for line in format_verdict(verdict, errors):
        print(line)
    if args.json:
        extra = {
            "profile_run": describe_run(profile) if profile else None,
            "verdict": describe_verdict(verdict, errors),
        }
        write_json(args.json, vars(args), phases, extra)
        print(f"\nwrote {args.json}")
    return 1 if errors else 0


def raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def clean_up(cleanup: Cleanup, directory: Path) -> None:
    for step in reversed(cleanup):  # the profiler, the log report, then the service, then redis
        try:
            step()
        except Exception as exc:  # keep cleaning up whatever one step did
            print(f"warning: clean-up step failed: {exc!r}", file=sys.stderr)
    shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    signal.signal(signal.SIGTERM, raise_system_exit)  # so the finally block below always cleans up
    started = time.monotonic()
    directory = Path(tempfile.mkdtemp(prefix="geo-route-bench-"))
    cleanup: Cleanup = []
    try:
        return run_benchmark(args, directory, cleanup)
    except BenchError as exc:
        print(f"\nbenchmark failed: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        clean_up(cleanup, directory)
        print(f"wall time {time.monotonic() - started:.1f} s (set-up, warm-up, runs and clean-up)")


if __name__ == "__main__":
    sys.exit(main())
