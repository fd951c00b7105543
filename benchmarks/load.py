"""Many concurrent pulls through geo-route, and the auth service's memory under many tokens (issue 6, item 4).

Everything is real and private to the run: the development stack (``geo_route.devstack.bring_up``:
redis, the token service, primary and secondary docker-registry 2.8, the updater, the auth service
under gunicorn with 2 workers, NGINX with 2 workers) in a temporary directory, on loopback.

Setup: three images with 2 layers each (layer payloads of 4 KiB, 64 KiB and 1 MiB, so blobs of about
0.5 KiB (configs) to 1 MiB) are pushed to the primary as tags of ``bench/load`` and replicated to the
secondary's registry; a fourth (8 KiB layers) is pushed to the primary only. One pull token for the
repository comes from the stack's token service.

Phase 1, mixed load (``--clients``, default 500, for ``--duration``, default 60 s), closed loop:

* wrk (2 threads, ``--clients`` minus ``--head-clients`` keep-alive connections) sends GET requests
  in turn from a fixed mix: manifest by tag (with the manifest ``Accept`` list), manifest by digest,
  blobs of each size, and the primary-only image's manifest and a blob (routed to the primary);
* ApacheBench (``ab -i -k``, ``--head-clients`` connections, default 50) sends ``HEAD`` manifest by
  digest at the same time. wrk 4.1.0 (Debian) cannot complete a HEAD answer that carries
  ``Content-Length`` (it waits for a body that never comes; see ``head_rate.py``), so HEAD goes
  through ab. Together they are the ``--clients`` concurrent clients.

Reported: requests and requests/s (wrk + ab), p50/p99 latency of each tool (ab has whole
milliseconds), socket errors, timeouts (wrk ``--timeout``, default 10 s) and non-2xx answers; the
NGINX access log's route/status counts and each request kind's route:reason; the auth service's own
decisions, index errors and time per decision (/metrics); CPU per part of the stack (/proc); new
NGINX error-log lines; VmRSS of the auth service and the updater before and after.
Checks (exit 1 when one fails): no socket error, timeout, failed or non-2xx request; every logged
answer is 2xx (apart from at most one 499 per connection: what a tool had in flight at its deadline);
every request kind took its expected route (``local`` for replicated content, ``primary`` for the
primary-only image), so no request silently fell back or went around an overloaded auth service.

Phase 2, many distinct tokens: ``--tokens`` (default 40,000: 20,000 would only just fill the caches
of 2 workers if each got half; more rounds follow until every worker's cache has been full for 3
rounds, as one ASGI worker may get a tenth of the tokens) distinct valid pull tokens are minted with
the stack's signing key
(``updater.signing_key``; ``geo_route.updater.pull_tokens``, each with its own ``jti``) and each is used
once, ``--token-round`` at a time, by 32 keep-alive connections (``GET`` of a small blob through
NGINX). The auth service caches verified tokens in a bounded LRU per
worker (``token.cache_size``, default 10,000; ``geo_route.tokens.TokenCache``); /metrics exposes
hit and miss counters and each worker's entries. After each round: the VmRSS of the auth service
(gunicorn master + workers, from /proc), the cache counters and entries. Then the first round's tokens
are sent again: they must miss (evicted), which bounds what the cache holds. Checks: every request
200, and once every worker's cache is full (its ``geo_route_token_cache_entries`` at cache_size;
not a number of tokens sent: NGINX's kept-alive connections stay with the ASGI worker that accepted
them, so one worker's cache can still be filling long after the other's is full, which once read as
1.7 MiB of growth "once full", ``benchlib/token_churn.py``) the auth service's RSS grows by at most
20 % of what the same number of tokens added while filling (or by at most 1 MiB).

Phase 3, many distinct notification events (``--events``, default 60,000): one-event envelopes with
new ids POSTed to the updater's ``/events/local`` over 4 keep-alive connections, as a registry sends
them (``benchlib/event_churn.py``). The updater remembers applied ids in a window of
``updater.dedupe_size`` per worker: once the windows are full its RSS must stay flat (1 MiB slack),
judged from when a content verification pass has also read the events' blobs back (a pass takes
its bounded memory the first time it meets a repository that large) to after one more pass over all
of them at the end (``benchlib/event_churn.py``).

VmRSS is summed over each tree (gunicorn master and workers, updater master and worker); pages
shared since fork count once per process. Every process shares the machine's CPUs with wrk and ab.

Usage:
    .venv/bin/python benchmarks/load.py [--clients 500] [--duration 60] [--quick] [--json FILE]
        [--phases load,tokens,events]

``--phases``: run only these phases (the stack, images and checks of the setup always come first),
e.g. ``--phases events`` for phase 3 alone.

``--quick``: 10 s of load, 6,000 tokens in rounds of 1,000 against ``token.cache_size`` 1,000,
12,000 events in rounds of 2,000 against ``updater.dedupe_size`` 2,000.
Exit status: 0 when every check passed, 1 when a check failed, 2 when the setup failed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib and head_rate, also when imported

from benchlib.common import BenchError
from benchlib.cpu import sample_cpu_seconds
from benchlib.event_churn import judge_events, print_events, run_event_phase
from benchlib.memory import TreeMemory, tree_memory
from benchlib.pull_mix import (
    WRK_THREADS,
    Target,
    count_log,
    error_log_size,
    finish,
    new_error_log_lines,
    request_once,
    start_ab,
    start_wrk,
    write_mix_script,
)
from benchlib.service_metrics import MetricsSnapshot, compare_metrics, read_metrics
from benchlib.token_churn import judge_tokens, print_tokens, run_token_phase
from benchlib.wrk import WrkResult, parse_wrk_output
from head_rate import ACCEPT, AbResult, parse_ab

from geo_route.config import load_settings
from geo_route.devstack.client import StackClient, started_stack
from geo_route.devstack.images import OciImage, build_oci_image
from geo_route.devstack.processes import descendants
from geo_route.devstack.skopeo import docker_reference
from geo_route.errors import DevstackError

REPOSITORY = "bench/load"
REPLICATED = {"small": 4 * 1024, "medium": 64 * 1024, "large": 1024 * 1024}  # tag -> layer payload bytes
PRIMARY_ONLY = ("primary-only", 8 * 1024)
QUICK = {
    "duration": 10,
    "tokens": 6000,
    "token_round": 1000,
    "token_cache_size": 1000,
    "events": 12_000,
    "event_round": 2000,
    "dedupe_size": 2000,
}
ERROR_LOG_LINES_SHOWN = 5
PHASES = ("load", "tokens", "events")  # mixed load, many tokens, many events


class CheckFailed(Exception):
    pass


@dataclass
class LoadResult:
    clients: int
    duration: int
    requests: int = 0
    requests_per_s: float = 0.0
    wrk: WrkResult | None = None
    ab: AbResult | None = None
    routes: dict[str, int] = field(default_factory=dict)  # "route/status" -> count
    decisions: dict[str, int] = field(default_factory=dict)  # the auth service's "route/reason" -> count
    index_errors: int = 0
    handler_p50_le_ms: float = 0.0  # the auth service's own time per decision (histogram bucket bound)
    handler_p99_le_ms: float = 0.0
    cpu_percent: dict[str, float] = field(default_factory=dict)  # of one CPU, per part of the stack
    by_target: dict[str, dict[str, int]] = field(default_factory=dict)
    error_log_lines: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- setup


def publish_images(client: StackClient, root: Path) -> tuple[dict[str, OciImage], OciImage]:
    """Push every image to the primary, replicate the REPLICATED tags; the primary-only tag stays there."""
    pushed: dict[str, OciImage] = {}
    for tag, layer_bytes in [*REPLICATED.items(), PRIMARY_ONLY]:
        image = build_oci_image(root / f"image-{tag}", tag, variant=tag, layer_count=2, layer_bytes=layer_bytes)
        destination = docker_reference(client.primary, REPOSITORY, tag)
        if client.skopeo.copy(image.reference, destination, dest_creds=client.credentials()) != image.digest:
            raise CheckFailed(f"pushing {tag} did not give the built digest {image.digest}")
        client.wait_for_pin(REPOSITORY, tag, image.digest)
        pushed[tag] = image
    client.replicate(REPOSITORY, list(REPLICATED))
    return {tag: pushed[tag] for tag in REPLICATED}, pushed[PRIMARY_ONLY[0]]


def build_targets(replicated: dict[str, OciImage], primary_only: OciImage) -> tuple[list[Target], Target]:
    """The GET mix for wrk and the HEAD target for ab."""
    base = f"/v2/{REPOSITORY}"
    small, medium, large = replicated["small"], replicated["medium"], replicated["large"]
    mix = [
        Target("GET manifest by tag", "GET", f"{base}/manifests/small", "local", 3, ACCEPT),
        Target("GET manifest by digest", "GET", f"{base}/manifests/{medium.digest}", "local", 2, ACCEPT),
        Target(f"GET blob {small.config.size} B (config)", "GET", f"{base}/blobs/{small.config.digest}", "local", 2),
        Target(f"GET blob {small.layers[1].size} B", "GET", f"{base}/blobs/{small.layers[1].digest}", "local", 2),
        Target(f"GET blob {medium.layers[1].size} B", "GET", f"{base}/blobs/{medium.layers[1].digest}", "local", 2),
        Target(f"GET blob {large.layers[1].size} B", "GET", f"{base}/blobs/{large.layers[1].digest}", "local", 1),
        Target("GET manifest by tag, primary only", "GET", f"{base}/manifests/{PRIMARY_ONLY[0]}", "primary", 1, ACCEPT),
        Target(
            f"GET blob {primary_only.layers[1].size} B, primary only",
            "GET",
            f"{base}/blobs/{primary_only.layers[1].digest}",
            "primary",
            1,
        ),
    ]
    head = Target("HEAD manifest by digest", "HEAD", f"{base}/manifests/{small.digest}", "local", 1, ACCEPT)
    return mix, head


def check_targets_once(client: StackClient, targets: list[Target], token: str) -> None:
    """One request of each kind by hand: 200, and NGINX logged the expected route."""
    offset = client.access_log_offset()
    for target in targets:
        status = request_once(client.secondary, target, token)
        if status != 200:
            raise CheckFailed(f"{target.name} ({target.method} {target.uri}) answered {status}")
    logged = {(e.method, e.uri): e.route for e in client.access_log(offset)}
    for target in targets:
        if logged.get((target.method, target.uri)) != target.route:
            raise CheckFailed(f"{target.name}: routed {logged.get((target.method, target.uri))}, not {target.route}")


# ---------------------------------------------------------------- phase 1: mixed load


def run_mixed_load(
    client: StackClient, mix: list[Target], head: Target, token: str, args: argparse.Namespace, work: Path
) -> LoadResult:
    result = LoadResult(args.clients, args.duration)
    offset, error_offset = client.access_log_offset(), error_log_size(client)
    auth_url = f"http://{load_settings(client.info.site_file, environ={}).server.bind[0]}"
    before, cpu_before, started = read_metrics(auth_url), stack_cpu_seconds(client), time.monotonic()
    wrk, ab = start_clients(client, mix, head, token, args, work)
    limit = args.duration + args.timeout + 60
    result.wrk = parse_wrk_output(finish(wrk, "wrk", limit))
    if ab is not None:
        result.ab = parse_ab(finish(ab, "ab", limit))
    elapsed = time.monotonic() - started
    result.cpu_percent = cpu_shares(cpu_before, stack_cpu_seconds(client), elapsed)
    result.requests = result.wrk.requests + (result.ab.complete if result.ab else 0)
    result.requests_per_s = result.wrk.requests_per_s + (result.ab.requests_per_s if result.ab else 0.0)
    result.routes, result.by_target = count_log(client, offset, [*mix, head])
    result.error_log_lines = new_error_log_lines(client, error_offset)
    add_service_view(result, before, read_metrics(auth_url))
    return result


def start_clients(
    client: StackClient, mix: list[Target], head: Target, token: str, args: argparse.Namespace, work: Path
) -> tuple[subprocess.Popen[str], subprocess.Popen[str] | None]:
    """wrk with the GET mix and, when there are HEAD clients, ab with HEAD manifest by digest."""
    base = f"http://{client.secondary}"
    script = write_mix_script(work, mix, token)
    wrk = start_wrk(base + "/", script, args.clients - args.head_clients, args.duration, args.timeout)
    if not args.head_clients:
        return wrk, None
    headers = {"Accept": head.accept, "Authorization": f"Bearer {token}"}
    return wrk, start_ab(base + head.uri, headers, args.head_clients, args.duration, args.timeout)


def stack_cpu_seconds(client: StackClient) -> dict[str, float]:
    """CPU seconds of every stack process and its children ("part:pid"), plus the reaped children (wrk, ab)."""
    assert client.stack is not None
    labels = {
        f"{name}:{pid}": pid
        for name, process in client.stack.processes.items()
        for pid in (process.pid, *descendants(process.pid))
    }
    return sample_cpu_seconds(labels)


def cpu_shares(before: dict[str, float], after: dict[str, float], elapsed: float) -> dict[str, float]:
    """Per cent of one CPU each part of the stack (summed over its processes) and the load tools used."""
    shares: dict[str, float] = {}
    for label, seconds in after.items():
        part = label.split(":")[0] if label != "wrk" else "wrk + ab"
        shares[part] = shares.get(part, 0.0) + 100.0 * (seconds - before.get(label, 0.0)) / elapsed
    return {part: round(share, 1) for part, share in sorted(shares.items(), key=lambda item: -item[1])}


def add_service_view(result: LoadResult, before: MetricsSnapshot, after: MetricsSnapshot) -> None:
    """The auth service's decisions by route/reason, index errors and handler time during the load."""
    server = compare_metrics(before, after)
    decisions: Counter[str] = Counter()
    for (route, reason, operation), count in after.decisions.items():
        decisions[f"{route}/{reason}"] += int(count - before.decisions.get((route, reason, operation), 0.0))
    result.decisions = {key: count for key, count in decisions.most_common() if count}
    result.index_errors = server.index_errors
    result.handler_p50_le_ms, result.handler_p99_le_ms = server.handler_p50_le_ms, server.handler_p99_le_ms


def judge_load(result: LoadResult, mix: list[Target], head: Target, args: argparse.Namespace) -> list[str]:
    problems = []
    assert result.wrk is not None
    if result.wrk.socket_error_total:
        problems.append("wrk socket errors: " + ", ".join(f"{k} {v}" for k, v in result.wrk.socket_errors.items()))
    if result.wrk.non_2xx:
        problems.append(f"wrk: {result.wrk.non_2xx} non-2xx answers")
    if result.ab is not None and result.ab.seconds < args.duration - 1:
        problems.append(f"ab stopped after {result.ab.seconds:.1f} s: it reached its request cap (-n)")
    if result.ab is not None and (result.ab.failed or result.ab.non_2xx):
        problems.append(f"ab: {result.ab.failed} failed requests, {result.ab.non_2xx} non-2xx answers")
    aborted = sum(count for key, count in result.routes.items() if key.endswith("/499"))
    if aborted > args.clients:
        problems.append(f"{aborted} requests closed by the client (499), more than one per connection")
    not_ok = {key: count for key, count in result.routes.items() if not key.split("/")[1].startswith(("2", "499"))}
    if not_ok:
        problems.append(f"NGINX logged answers other than 2xx: {not_ok}")
    for target in [*mix, *([head] if args.head_clients else [])]:
        counts = result.by_target.get(target.name, {})
        wrong = {k: n for k, n in counts.items() if k.split(":")[0] != target.route and not k.endswith("/499")}
        if wrong:
            problems.append(f"{target.name}: expected route {target.route}, NGINX logged {wrong}")
        if not counts:
            problems.append(f"{target.name}: no request logged")
    other = result.by_target.get("other")
    if other:
        problems.append(f"requests outside the mix were logged: {other}")
    return problems


# ---------------------------------------------------------------- report


def print_load(result: LoadResult, memory: dict[str, dict[str, TreeMemory]]) -> None:
    wrk, ab = result.wrk, result.ab
    assert wrk is not None
    print(f"\nmixed load: {result.clients} clients for {result.duration} s")
    print(f"  total     {result.requests:>10,} requests  {result.requests_per_s:10,.0f} req/s")
    print(
        f"  wrk GET   {wrk.requests:>10,} requests  {wrk.requests_per_s:10,.0f} req/s"
        f"  p50 {wrk.percentiles_ms['p50']:7.2f} ms  p99 {wrk.percentiles_ms['p99']:7.2f} ms"
        f"  max {wrk.latency_max_ms:7.1f} ms"
    )
    print(f"            socket errors {wrk.socket_errors}, non-2xx {wrk.non_2xx}")
    if ab is not None:
        print(
            f"  ab HEAD   {ab.complete:>10,} requests  {ab.requests_per_s:10,.0f} req/s  p50 {ab.p50_ms:7.0f} ms"
            f"  p99 {ab.p99_ms:7.0f} ms  failed {ab.failed}, non-2xx {ab.non_2xx}"
        )
    print("  NGINX access log, route/status: " + ", ".join(f"{k} {v:,}" for k, v in result.routes.items()))
    for name, counts in result.by_target.items():
        print(f"    {name:<40} " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    print("  auth service decisions, route/reason: " + ", ".join(f"{k} {v:,}" for k, v in result.decisions.items()))
    print(
        f"  auth service: index errors {result.index_errors:,}, time per decision p50 <= {result.handler_p50_le_ms:g}"
        f" ms, p99 <= {result.handler_p99_le_ms:g} ms"
    )
    print("  CPU, % of one core: " + ", ".join(f"{part} {share:.0f}" for part, share in result.cpu_percent.items()))
    print(f"  NGINX error log: {len(result.error_log_lines)} new lines")
    for line in result.error_log_lines[:ERROR_LOG_LINES_SHOWN]:
        print(f"    {line[:200]}")
    print("  memory (VmRSS, master + workers):")
    for name, moments in memory.items():
        print("    " + f"{name:<13}" + "  ".join(f"{moment} {tree.describe()}" for moment, tree in moments.items()))


def write_json(path: str, args: argparse.Namespace, report: dict[str, Any]) -> None:
    report["config"] = {k: v for k, v in vars(args).items() if k != "json"}
    Path(path).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- main


def run(args: argparse.Namespace, root: Path, report: dict[str, Any]) -> list[str]:
    overrides: dict[str, dict[str, Any]] = {}
    if args.token_cache_size is not None:
        overrides["token"] = {"cache_size": args.token_cache_size}
    if args.dedupe_size is not None:
        overrides["updater"] = {"dedupe_size": args.dedupe_size}
    with contextlib.ExitStack() as owned:
        started = time.monotonic()
        client = owned.enter_context(started_stack(root / "stack", site_overrides=overrides))
        replicated, primary_only = publish_images(client, root)
        mix, head = build_targets(replicated, primary_only)
        token = client.token(f"repository:{REPOSITORY}:pull")
        check_targets_once(client, [*mix, head], token)
        print(
            f"stack up, images pushed and replicated, every request kind checked in {time.monotonic() - started:.1f} s"
        )
        assert client.stack is not None
        auth, updater = client.stack.processes["auth"].pid, client.stack.processes["updater"].pid
        memory = {"auth service": {"before": tree_memory(auth)}, "updater": {"before": tree_memory(updater)}}
        problems: list[str] = []
        if "load" in args.phases:
            result = run_mixed_load(client, mix, head, token, args, root)
            memory["auth service"]["after"], memory["updater"]["after"] = tree_memory(auth), tree_memory(updater)
            print_load(result, memory)
            problems += judge_load(result, mix, head, args)
            report["load"] = asdict(result)
        if "tokens" in args.phases:
            phase = run_token_phase(client, auth, REPOSITORY, mix[2].uri, args.tokens, args.token_round)
            token_problems, figures = judge_tokens(phase)
            memory["updater"]["after tokens"] = tree_memory(updater)
            print_tokens(phase, figures)
            problems += token_problems
            report["tokens"] = {**asdict(phase), "figures": figures}
        if "events" in args.phases:
            events = run_event_phase(client, updater, args.events, args.event_round)
            event_problems, event_figures = judge_events(events)
            print_events(events, event_figures)
            problems += event_problems
            report["events"] = {**asdict(events), "figures": event_figures}
        report["memory"] = {name: {k: v.as_dict() for k, v in moments.items()} for name, moments in memory.items()}
        return problems


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=500, help="concurrent connections in all (default 500)")
    parser.add_argument("--head-clients", type=int, default=50, help="of which ab HEAD connections (default 50)")
    parser.add_argument("--duration", type=int, default=None, help="seconds of mixed load (default 60)")
    parser.add_argument("--timeout", type=int, default=10, help="seconds before a request counts as timed out")
    parser.add_argument("--tokens", type=int, default=None, help="distinct tokens of phase 2 (default 40000)")
    parser.add_argument("--token-round", type=int, default=None, help="tokens between samples (default 5000)")
    parser.add_argument("--token-cache-size", type=int, default=None, help="token.cache_size (default: the site's)")
    parser.add_argument("--events", type=int, default=None, help="distinct events of phase 3 (default 60000)")
    parser.add_argument("--event-round", type=int, default=None, help="events between samples (default 10000)")
    parser.add_argument("--dedupe-size", type=int, default=None, help="updater.dedupe_size (default: the site's)")
    parser.add_argument("--quick", action="store_true", help="10 s of load; 6000 tokens against a cache of 1000")
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated phases to run, in their order (default {','.join(PHASES)}); the setup always runs",
    )
    parser.add_argument("--json", default="", help="write the results to this file")
    parser.add_argument("--report", default="", help="put the printed results into this Markdown file's load section")
    args = parser.parse_args(argv)
    full = {"duration": 60, "tokens": 40_000, "token_round": 5000, "events": 60_000, "event_round": 10_000}
    defaults = QUICK if args.quick else full
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    phases = [name.strip() for name in args.phases.split(",") if name.strip()]
    if not phases or any(name not in PHASES for name in phases):
        parser.error(f"--phases: a comma-separated list of {', '.join(PHASES)}")
    args.phases = phases
    if args.clients - args.head_clients < WRK_THREADS or args.head_clients < 0 or args.duration < 1:
        parser.error("need --clients - --head-clients >= 2, --head-clients >= 0 and --duration >= 1")
    return args


class Tee(io.TextIOBase):
    """What the run prints, also kept for ``--report``."""

    def __init__(self, stream: TextIO) -> None:
        self.stream, self.kept = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.kept.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


REPORT_BEGIN, REPORT_END = "<!-- load:begin -->", "<!-- load:end -->"


def write_report(path: Path, argv: list[str], printed: str, status: int) -> None:
    """Replace the section between the load markers of ``path`` with this run's output."""
    command = " ".join([".venv/bin/python benchmarks/load.py", *argv])
    section = f"{REPORT_BEGIN}\n\n`{command}` (exit {status}):\n\n```\n{printed.strip()}\n```\n\n{REPORT_END}"
    text = path.read_text(encoding="utf-8")
    if REPORT_BEGIN not in text or REPORT_END not in text:
        raise SystemExit(f"{path} has no {REPORT_BEGIN} ... {REPORT_END} section")
    head, rest = text.split(REPORT_BEGIN, 1)
    path.write_text(head + section + rest.split(REPORT_END, 1)[1], encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_arguments(argv)
    if not args.report:
        return run_main(args)
    tee = Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        status = run_main(args)
    shown = [a for i, a in enumerate(argv) if not a.startswith("--report") and (i == 0 or argv[i - 1] != "--report")]
    write_report(Path(args.report), shown, tee.kept.getvalue(), status)
    return status


def run_main(args: argparse.Namespace) -> int:
    wall = time.monotonic()
    report: dict[str, Any] = {}
    print(
        f"{args.clients} clients ({args.clients - args.head_clients} wrk GET, {args.head_clients} ab HEAD),"
        f" {args.duration} s; then {args.tokens:,} distinct tokens; {os.cpu_count()} CPUs shared by everything"
    )
    try:
        with tempfile.TemporaryDirectory(prefix="geo-route-load-") as temporary:
            problems = run(args, Path(temporary), report)
    except (BenchError, CheckFailed, DevstackError, TimeoutError) as exc:
        print(f"FAIL (setup): {exc}", file=sys.stderr)
        return 2
    report.update(problems=problems, wall_seconds=time.monotonic() - wall)
    if args.json:
        write_json(args.json, args, report)
    print(f"\nwall time {report['wall_seconds']:.1f} s; stack stopped")
    for problem in problems:
        print(f"CHECK FAILED: {problem}")
    print("all checks passed" if not problems else f"{len(problems)} checks failed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
