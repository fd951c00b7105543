"""End-to-end throughput and latency of ``GET /auth``, the NGINX ``auth_request`` endpoint.

What it measures: complete routing decisions as NGINX would ask for them. Each request carries
``X-Original-Method: GET``, ``X-Original-URI: /v2/bench/app/blobs/sha256:<digest>`` and one bearer
token, so a request costs gunicorn's HTTP handling, Flask dispatch, a token-cache hit (the same RS256
token every time, verified once per worker), request classification, one Redis ``SISMEMBER`` and the
metrics updates. The answer must be 200 ``X-Geo-Route: local`` / ``X-Geo-Reason: blob-local``.

Everything is real and private to the run: a temporary directory with an RSA-2048 key and its
self-signed certificate (the ``rootcertbundle``), a site YAML, its own ``redis-server`` and
``geo-route serve`` (gunicorn) on free 127.0.0.1 ports. The index is filled with the project's own
write API (``RedisIndexStore.apply``). Both processes are stopped by PID and the directory is
removed at the end, however the run ends.

The load comes from ``wrk``, a closed-loop generator: each of its connections sends the next request
only when the previous answer has arrived, so at saturation the reported latency includes the time
a request waits in gunicorn's queues, and by Little's law mean latency ≈ connections / throughput
(32 connections at 3,200 decisions/s means ≈ 10 ms on average, whatever the handler itself costs).
``--rate R`` paces wrk (a LuaJIT ``delay()`` schedule per wrk thread) to about R requests/s in
total, which shows the latency at a load below saturation. It is still not open-loop: wrk times a
request from when it is actually sent, so a stalled server delays later sends instead of counting
their waiting time (coordinated omission), and the tail is understated compared with wrk2.

For comparison, the service's own ``geo_route_decision_seconds`` histogram (read from ``/metrics``
before and after the run) gives the time spent inside the handler, without queueing; its decision
counters prove every answer was really ``blob-local`` (a Redis failure still answers 200, routed to
the primary, and would otherwise pass unnoticed). The CPU each worker, Redis and wrk used is shown
too: gthread workers keep the connections they accept, and when one worker wins most of wrk's
connections the run measures one worker, not two (the report warns).

Target (from the issue): at least 2,000 decisions/s with p99 <= 10 ms at 32 concurrent connections.

Usage:
    .venv/bin/python benchmarks/auth_bench.py [--workers 2] [--connections 32] [--duration 10]
        [--worker-class gthread|sync] [--threads N] [--rate R] [--json FILE] [--profile FILE]

Exit status: 0 when the run completed without errors (whether or not the target is met); 1 when
the load saw errors (non-2xx answers, socket errors, decisions other than blob-local, index errors
or the service dying); 2 when the benchmark could not be set up or run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import closing
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import redis
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families

import geo_route
from geo_route.config import Settings, load_settings
from geo_route.index.model import BlobPresence
from geo_route.index.redis_store import RedisIndexStore
from geo_route.tokens import libtrust_kid

LOOPBACK = "127.0.0.1"
REPOSITORY = "bench/app"
BLOB_DIGEST = "sha256:" + "ab" * 32
REQUEST_URI = f"/v2/{REPOSITORY}/blobs/{BLOB_DIGEST}"
ISSUER = "geo-route-bench-issuer"
SERVICE = "container_registry"
EXPECTED_ROUTE = ("local", "blob-local", "blob")  # the decisions counter's (route, reason, operation)
TARGET_RPS = 2000.0
TARGET_P99_MS = 10.0
TARGET_CONNECTIONS = 32
WARMUP_SECONDS = 2
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
PERCENTILES = ("50", "75", "90", "99")
TIME_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
TIME_PATTERN = r"([\d.]+)(us|ms|s|m|h)"


class BenchError(Exception):
    """The benchmark itself could not be set up or run (as opposed to the service erring under load)."""


@dataclass
class WrkResult:
    """What one wrk run printed, in numbers (latencies in milliseconds)."""

    requests: int
    elapsed_s: float
    requests_per_s: float
    latency_mean_ms: float
    latency_stdev_ms: float
    latency_max_ms: float
    percentiles_ms: dict[str, float]
    socket_errors: dict[str, int]
    non_2xx: int

    @property
    def socket_error_total(self) -> int:
        return sum(self.socket_errors.values())


@dataclass
class MetricsSnapshot:
    """The service's own counters, summed over every worker (multiprocess mode)."""

    decisions: dict[tuple[str, str, str], float] = field(default_factory=dict)
    index_errors: float = 0.0
    handler_count: float = 0.0
    handler_sum_s: float = 0.0
    handler_buckets: dict[float, float] = field(default_factory=dict)  # le (seconds) -> cumulative count


@dataclass
class ServerSide:
    """The handler-time histogram and the decisions between two snapshots."""

    decisions: int
    unexpected_decisions: dict[str, int]
    index_errors: int
    handler_mean_ms: float
    handler_p50_le_ms: float
    handler_p99_le_ms: float


@dataclass
class CpuUse:
    """Per cent of one CPU each process used during the measured run (wall-clock based)."""

    shares: dict[str, float]
    uneven_workers: bool


@dataclass
class RunningService:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    workers: list[tuple[int, str]]  # (pid, /proc start time) of each gunicorn worker


# ---------------------------------------------------------------------------------------------
# command line


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="gunicorn worker processes (default 2)")
    parser.add_argument("--connections", type=int, default=TARGET_CONNECTIONS, help="wrk connections (default 32)")
    parser.add_argument("--duration", type=int, default=10, help="seconds of measured load (default 10)")
    parser.add_argument("--worker-class", choices=("gthread", "sync"), default="gthread")
    parser.add_argument("--threads", type=int, default=1, help="threads per worker, gthread only (default 1)")
    parser.add_argument(
        "--reuse-port",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one SO_REUSEPORT socket per worker (default; spreads kept-alive connections over workers)",
    )
    parser.add_argument("--wrk-threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--rate", type=float, help="pace wrk to about R requests/s in total (still not open-loop)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the parsed numbers to FILE")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="sample one worker with py-spy during the measured run (slows it) and keep the collapsed stacks in FILE",
    )
    args = parser.parse_args(argv)
    if args.workers < 1 or args.threads < 1 or args.duration < 1 or args.wrk_threads < 1:
        parser.error("--workers, --threads, --duration and --wrk-threads must be at least 1")
    if args.connections < args.wrk_threads:
        parser.error("--connections must be at least --wrk-threads")
    if args.worker_class == "sync" and args.threads > 1:
        parser.error("gunicorn silently turns sync with threads > 1 into gthread; use --worker-class gthread")
    if args.rate is not None and args.rate <= 0:
        parser.error("--rate must be greater than 0")
    return args


# ---------------------------------------------------------------------------------------------
# set-up


def find_free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def generate_signing_key(bundle_path: Path) -> rsa.RSAPrivateKey:
    """An RSA-2048 key whose self-signed certificate is written as the PEM ``rootcertbundle``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "geo-route bench token signer")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    bundle_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key


def write_site_config(directory: Path, args: argparse.Namespace, redis_port: int, service_port: int) -> Path:
    site = {
        "local_registry": {"url": f"http://{LOOPBACK}:{find_free_port()}"},
        "primary": {"url": f"http://{LOOPBACK}:{find_free_port()}"},
        "token": {
            "realm": f"http://{LOOPBACK}:{find_free_port()}/jwt/auth",
            "service": SERVICE,
            "issuer": ISSUER,
            "rootcertbundle": "bundle.pem",
        },
        "redis": {"url": f"redis://{LOOPBACK}:{redis_port}/0"},
        "server": {
            "bind": [f"{LOOPBACK}:{service_port}"],
            "workers": args.workers,
            "worker_class": args.worker_class,
            "threads": args.threads,
            "reuse_port": args.reuse_port,
            "log_level": "warning",
        },
    }
    path = directory / "site.yaml"
    path.write_text(yaml.safe_dump(site, sort_keys=False), encoding="utf-8")
    return path


def start_redis(directory: Path, port: int) -> subprocess.Popen[bytes]:
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise BenchError("redis-server is not on PATH")
    command = [
        redis_server, "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no",
        "--dir", str(directory),
    ]  # fmt: skip
    with open(directory / "redis.log", "wb") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_redis(process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    client = redis.Redis(host=LOOPBACK, port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    with closing(client):
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise BenchError(f"redis-server exited with {process.returncode}:\n{read_tail(log_path)}")
            try:
                if client.ping():
                    return
            except redis.RedisError:
                pass
            time.sleep(0.05)
    raise BenchError(f"redis-server did not answer PING within {STARTUP_TIMEOUT:.0f} s")


def fill_index(settings: Settings) -> None:
    """The blob the load asks about, written through the project's own index API."""
    store = RedisIndexStore(settings.redis)
    try:
        store.apply([BlobPresence(REPOSITORY, BLOB_DIGEST, True)])
    finally:
        store.close()


def build_service_command(config_path: Path) -> list[str]:
    script = Path(sys.executable).parent / "geo-route"
    if script.exists():
        return [str(script), "serve", "-c", str(config_path)]
    return [sys.executable, "-m", "geo_route.cli", "serve", "-c", str(config_path)]


def start_service(directory: Path, config_path: Path, port: int) -> RunningService:
    metrics_dir = directory / "metrics"
    metrics_dir.mkdir()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GEO_ROUTE_")}  # the file alone decides
    environment["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    log_path = directory / "service.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            build_service_command(config_path),
            cwd=directory,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return RunningService(process, f"http://{LOOPBACK}:{port}", log_path, [])


def wait_for_service(service: RunningService, workers: int) -> None:
    """Until /healthz answers 200, /readyz too (Redis reachable), and every worker has been forked."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        ensure_service_alive(service)
        if fetch_status(service.base_url + "/healthz") == 200:
            break
        if time.monotonic() > deadline:
            raise BenchError(f"GET /healthz did not answer 200 within {STARTUP_TIMEOUT:.0f} s")
        time.sleep(0.1)
    if (status := fetch_status(service.base_url + "/readyz")) != 200:
        raise BenchError(f"GET /readyz answered {status}: the service cannot reach its Redis")
    while len(service.workers) < workers:
        ensure_service_alive(service)
        service.workers = list_children(service.process.pid)
        if time.monotonic() > deadline:
            raise BenchError(f"only {len(service.workers)} of {workers} gunicorn workers started")
        time.sleep(0.1)


def ensure_service_alive(service: RunningService) -> None:
    if service.process.poll() is not None:
        raise BenchError(f"geo-route serve exited with {service.process.returncode}")


def fetch_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def mint_token(key: rsa.RSAPrivateKey) -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": SERVICE,
        "sub": "bench",
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "access": [{"type": "repository", "name": REPOSITORY, "actions": ["pull"]}],
    }
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": libtrust_kid(key.public_key())})


def build_auth_headers(token: str) -> dict[str, str]:
    return {"X-Original-Method": "GET", "X-Original-URI": REQUEST_URI, "Authorization": f"Bearer {token}"}


def check_decision(base_url: str, token: str) -> None:
    """One request by hand: it must be 200, routed local because the blob is in the index."""
    request = urllib.request.Request(base_url + "/auth", headers=build_auth_headers(token))
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            status, headers = int(response.status), response.headers
    except urllib.error.HTTPError as exc:
        status, headers = exc.code, exc.headers
    route, reason = headers.get("X-Geo-Route"), headers.get("X-Geo-Reason")
    if (status, route, reason) != (200, "local", "blob-local"):
        raise BenchError(
            f"sanity check failed: GET /auth answered {status} X-Geo-Route={route!r} X-Geo-Reason={reason!r}, "
            "expected 200 local blob-local"
        )


# ---------------------------------------------------------------------------------------------
# load


def write_wrk_script(directory: Path, token: str, rate: float | None, wrk_threads: int) -> Path:
    lines = [
        "-- generated by benchmarks/auth_bench.py: the headers NGINX's auth_request subrequest carries",
        'wrk.method = "GET"',
        *(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in build_auth_headers(token).items()),
    ]
    if rate is not None:
        interval_ms = wrk_threads * 1000.0 / rate  # each wrk thread has its own Lua state and schedule
        lines += [
            "",
            "-- pacing: every request takes the next slot of this thread's schedule (not open-loop, see docstring)",
            'local ffi = require("ffi")',
            "ffi.cdef[[",
            "typedef struct { long tv_sec; long tv_nsec; } bench_timespec;",
            "int clock_gettime(int clock_id, bench_timespec *tp);",
            "]]",
            "local CLOCK_MONOTONIC = 1",
            'local now_buffer = ffi.new("bench_timespec")',
            f"local interval_ms = {interval_ms!r}",
            "local next_ms = nil",
            "local function now_ms()",
            "  ffi.C.clock_gettime(CLOCK_MONOTONIC, now_buffer)",
            "  return tonumber(now_buffer.tv_sec) * 1000 + tonumber(now_buffer.tv_nsec) / 1e6",
            "end",
            "function delay()",
            "  local now = now_ms()",
            "  if next_ms == nil then next_ms = now end",
            "  local wait = next_ms - now",
            "  next_ms = next_ms + interval_ms",
            "  if wait < 0 then return 0 end",
            "  return wait",
            "end",
        ]
    path = directory / "auth.lua"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_wrk(url: str, script: Path, connections: int, duration: int, wrk_threads: int) -> tuple[WrkResult, str]:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise BenchError("wrk is not on PATH")
    command = [wrk, f"-t{wrk_threads}", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script), url]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish within {duration + 60} s") from None
    if completed.returncode != 0:
        raise BenchError(f"wrk exited with {completed.returncode}:\n{completed.stdout}{completed.stderr}")
    return parse_wrk_output(completed.stdout), completed.stdout


def parse_wrk_output(text: str) -> WrkResult:
    def search(pattern: str, what: str) -> re.Match[str]:
        match = re.search(pattern, text, re.MULTILINE)
        if match is None:
            raise BenchError(f"cannot find {what} in wrk's output:\n{text}")
        return match

    latency = search(rf"^\s+Latency\s+{TIME_PATTERN}\s+{TIME_PATTERN}\s+{TIME_PATTERN}", "the latency line")
    totals = search(rf"^\s+(\d+) requests in {TIME_PATTERN}", "the request count")
    percentiles = {}
    for percentile in PERCENTILES:
        match = search(rf"^\s+{percentile}%\s+{TIME_PATTERN}\s*$", f"the {percentile}% latency")
        percentiles[f"p{percentile}"] = to_milliseconds(match.group(1), match.group(2))
    socket_errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    if errors := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text):
        socket_errors = dict(zip(socket_errors, map(int, errors.groups()), strict=True))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return WrkResult(
        requests=int(totals.group(1)),
        elapsed_s=to_milliseconds(totals.group(2), totals.group(3)) / 1000.0,
        requests_per_s=float(search(r"^Requests/sec:\s+([\d.]+)", "Requests/sec").group(1)),
        latency_mean_ms=to_milliseconds(latency.group(1), latency.group(2)),
        latency_stdev_ms=to_milliseconds(latency.group(3), latency.group(4)),
        latency_max_ms=to_milliseconds(latency.group(5), latency.group(6)),
        percentiles_ms=percentiles,
        socket_errors=socket_errors,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
    )


def to_milliseconds(value: str, unit: str) -> float:
    return float(value) * TIME_UNITS_MS[unit]


# ---------------------------------------------------------------------------------------------
# the service's own view


def read_metrics(base_url: str) -> MetricsSnapshot:
    try:
        with urllib.request.urlopen(base_url + "/metrics", timeout=5) as response:
            text = response.read().decode("utf-8")
    except OSError as exc:
        raise BenchError(f"GET /metrics failed: {exc}") from None
    snapshot = MetricsSnapshot()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "geo_route_decisions_total":
                key = (sample.labels["route"], sample.labels["reason"], sample.labels["operation"])
                snapshot.decisions[key] = snapshot.decisions.get(key, 0.0) + sample.value
            elif sample.name == "geo_route_index_errors_total":
                snapshot.index_errors += sample.value
            elif sample.name == "geo_route_decision_seconds_count":
                snapshot.handler_count += sample.value
            elif sample.name == "geo_route_decision_seconds_sum":
                snapshot.handler_sum_s += sample.value
            elif sample.name == "geo_route_decision_seconds_bucket":
                bound = float(sample.labels["le"])
                snapshot.handler_buckets[bound] = snapshot.handler_buckets.get(bound, 0.0) + sample.value
    return snapshot


def compare_metrics(before: MetricsSnapshot, after: MetricsSnapshot) -> ServerSide:
    deltas = {key: after.decisions.get(key, 0.0) - before.decisions.get(key, 0.0) for key in after.decisions}
    unexpected = {"/".join(key): int(n) for key, n in deltas.items() if key != EXPECTED_ROUTE and n > 0}
    count = after.handler_count - before.handler_count
    buckets = {le: after.handler_buckets[le] - before.handler_buckets.get(le, 0.0) for le in after.handler_buckets}
    return ServerSide(
        decisions=int(sum(deltas.values())),
        unexpected_decisions=unexpected,
        index_errors=int(after.index_errors - before.index_errors),
        handler_mean_ms=1000.0 * (after.handler_sum_s - before.handler_sum_s) / count if count else 0.0,
        handler_p50_le_ms=bucket_bound_ms(buckets, count, 0.50),
        handler_p99_le_ms=bucket_bound_ms(buckets, count, 0.99),
    )


def bucket_bound_ms(buckets: Mapping[float, float], count: float, quantile: float) -> float:
    """The upper bound of the histogram bucket holding the quantile (inf when beyond the last bucket)."""
    for bound in sorted(buckets):
        if count and buckets[bound] >= quantile * count:
            return bound * 1000.0
    return float("inf")


# ---------------------------------------------------------------------------------------------
# profiling (optional)


PROJECT_DIR = str(Path(geo_route.__file__).resolve().parents[1]) + "/"
STDLIB_DIR = re.compile(r"/lib/python3\.\d+/")
STARTUP_FILES = (
    "gunicorn/arbiter.py",
    "gunicorn/app/base.py",
    "geo_route/cli.py",
    "geo_route/server.py",
    "bin/geo-route",
)


def start_profiler(pid: int, seconds: int, output: Path) -> subprocess.Popen[bytes]:
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        raise BenchError("--profile needs py-spy (pip install py-spy into this environment)")
    command = [
        py_spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "200",
        "--format", "raw", "--function", "--full-filenames", "--output", str(output),
    ]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def summarize_profile(raw_path: Path, top: int = 15) -> Iterator[str]:
    """Self and inclusive shares from py-spy's collapsed stacks (``frame;frame;... count``)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    total = 0
    for line in raw_path.read_text(encoding="utf-8").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [split_frame(frame) for frame in stack.split(";")]
        total += count
        own[format_frame(*frames[-1])] += count
        by_package[package_of(frames[-1][1])] += count
        for function, path in set(frames):
            if not package_of(path).startswith("stdlib") and not path.endswith(STARTUP_FILES):
                inclusive[format_frame(function, path)] += count
    if not total:
        yield "  (py-spy recorded no samples)"
        return
    yield f"  {total} samples of the worker's running or runnable threads (blocked waits excluded)"
    yield "  self time by package:"
    yield from (f"    {100 * n / total:5.1f}%  {name}" for name, n in by_package.most_common(10))
    yield "  self time by function:"
    yield from (f"    {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top))
    yield "  inclusive time by function (stdlib and start-up frames left out):"
    yield from (f"    {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top + 10))


def split_frame(frame: str) -> tuple[str, str]:
    """``handle (/x/gunicorn/workers/gthread.py:123)`` -> (``handle``, ``/x/gunicorn/workers/gthread.py``)."""
    match = re.fullmatch(r"(.*) \((.*?)(?::\d+)?\)", frame)
    return (match.group(1), match.group(2)) if match else (frame, "")


def format_frame(function: str, path: str) -> str:
    return f"{function} ({relative_path(path)})"


def relative_path(path: str) -> str:
    """The path below site-packages, the stdlib directory or the project."""
    for marker in ("site-packages/", PROJECT_DIR):
        if marker in path:
            return path.split(marker, 1)[1]
    parts = STDLIB_DIR.split(path, maxsplit=1)
    return parts[1] if len(parts) == 2 else path


def package_of(path: str) -> str:
    if "site-packages/" in path:
        return relative_path(path).split("/", 1)[0].removesuffix(".py")
    if "/geo_route/" in path:
        return "geo_route"
    if STDLIB_DIR.search(path):
        return "stdlib " + relative_path(path).split("/", 1)[0].removesuffix(".py")
    return path or "?"


def print_profile(profiler: subprocess.Popen[bytes], raw_path: Path, pid: int) -> None:
    try:
        _, stderr = profiler.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        print("\npy-spy did not finish; no profile", file=sys.stderr)
        return
    print(f"\npy-spy profile of worker {pid} during the measured run (sampling slows that worker down):")
    if profiler.returncode != 0 or not raw_path.exists():
        print(f"  py-spy failed ({profiler.returncode}): {stderr.decode(errors='replace').strip()}")
        return
    for line in summarize_profile(raw_path):
        print(line)
    print(f"  collapsed stacks kept in {raw_path} (flamegraph.pl or speedscope read them)")


# ---------------------------------------------------------------------------------------------
# clean-up


def list_children(parent: int) -> list[tuple[int, str]]:
    """(pid, start time) of ``parent``'s children, from /proc; the start time guards against PID reuse."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = read_proc_stat(int(entry.name))
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent:
            children.append((int(entry.name), fields[19]))
    return sorted(children)


def read_proc_stat(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: [0] state, [1] ppid, [19] start time (fields 3, 4 and 22)."""
    text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    return text.rpartition(")")[2].split()


def stop_process(process: subprocess.Popen[bytes], name: str, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, wait, then SIGKILL: only this process, by its PID."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        print(
            f"warning: {name} (pid {process.pid}) ignored SIGTERM for {timeout:.0f} s; sending SIGKILL", file=sys.stderr
        )
        process.kill()
        process.wait(5)


def stop_service(service: RunningService) -> None:
    workers = service.workers or list_children(service.process.pid)
    stop_process(service.process, "gunicorn master")
    for pid, started in workers:  # normally gone with the master; a SIGKILLed master can leave orphans
        try:
            fields = read_proc_stat(pid)
        except (OSError, IndexError):
            continue
        if fields[19] == started and fields[0] != "Z":
            print(f"warning: gunicorn worker {pid} outlived its master; sending SIGKILL", file=sys.stderr)
            os.kill(pid, signal.SIGKILL)


def read_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"({path.name} unreadable)"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else f"({path.name} is empty)"


# ---------------------------------------------------------------------------------------------
# CPU use


def sample_cpu_seconds(pids: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds so far of each named process, plus ``wrk``: the reaped children's total (wrk is the only one)."""
    ticks = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for label, pid in pids.items():
        try:
            fields = read_proc_stat(pid)
            seconds[label] = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        except (OSError, IndexError):
            seconds[label] = 0.0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds["wrk"] = children.ru_utime + children.ru_stime
    return seconds


def compare_cpu(before: Mapping[str, float], after: Mapping[str, float], elapsed: float) -> CpuUse:
    shares = {label: 100.0 * (after[label] - before[label]) / elapsed for label in after}
    workers = [share for label, share in shares.items() if label.startswith("worker")]
    uneven = len(workers) > 1 and max(workers) > 20.0 and min(workers) < 0.5 * max(workers)
    return CpuUse(shares, uneven)


# ---------------------------------------------------------------------------------------------
# report


def judge_errors(result: WrkResult, server: ServerSide, service_alive: bool) -> list[str]:
    errors = []
    if result.non_2xx:
        errors.append(f"{result.non_2xx} non-2xx answers")
    if result.socket_error_total:
        errors.append("socket errors " + ", ".join(f"{k} {v}" for k, v in result.socket_errors.items() if v))
    if server.unexpected_decisions:
        errors.append("decisions other than local/blob-local: " + json.dumps(server.unexpected_decisions))
    if server.index_errors:
        errors.append(f"{server.index_errors} index errors (Redis lookups failed or timed out)")
    if not service_alive:
        errors.append("the service exited during the run")
    return errors


def judge_target(result: WrkResult, connections: int) -> tuple[bool, list[str]]:
    misses = []
    p99 = result.percentiles_ms["p99"]
    if result.requests_per_s < TARGET_RPS:
        misses.append(f"{result.requests_per_s:,.0f} decisions/s < {TARGET_RPS:,.0f}")
    if p99 > TARGET_P99_MS:
        misses.append(f"p99 {p99:.2f} ms > {TARGET_P99_MS:.0f} ms")
    if connections != TARGET_CONNECTIONS:
        misses.append(f"measured at {connections} connections, the target is stated for {TARGET_CONNECTIONS}")
    return not misses, misses


def format_report(
    args: argparse.Namespace,
    result: WrkResult,
    server: ServerSide,
    cpu: CpuUse,
    errors: list[str],
    target_misses: list[str],
) -> Iterator[str]:
    p = result.percentiles_ms
    load = f"paced to ~{args.rate:,.0f} req/s" if args.rate else "closed-loop (wrk)"
    yield "geo-route GET /auth benchmark"
    yield (
        f"  config       workers={args.workers} worker_class={args.worker_class} threads={args.threads} "
        f"reuse_port={args.reuse_port} "
        f"connections={args.connections} wrk_threads={args.wrk_threads} duration={args.duration}s load={load}"
    )
    yield f"  host         {os.cpu_count()} CPUs shared by wrk, gunicorn and redis-server"
    yield (
        f"  throughput   {result.requests_per_s:,.1f} decisions/s "
        f"({result.requests:,} requests in {result.elapsed_s:.2f} s)"
    )
    yield (
        f"  latency      p50 {p['p50']:.2f} ms | p75 {p['p75']:.2f} ms | p90 {p['p90']:.2f} ms | p99 {p['p99']:.2f} ms"
        f" | mean {result.latency_mean_ms:.2f} ms | max {result.latency_max_ms:.2f} ms"
    )
    socket_errors = ", ".join(f"{k} {v}" for k, v in result.socket_errors.items())
    yield f"  errors       non-2xx {result.non_2xx} | socket errors: {socket_errors} | index {server.index_errors}"
    yield (
        f"  decisions    {server.decisions:,} counted by the service during the run, "
        f"unexpected: {server.unexpected_decisions or 'none'}"
    )
    yield (
        f"  in handler   mean {server.handler_mean_ms:.3f} ms | p50 <= {server.handler_p50_le_ms:g} ms | "
        f"p99 <= {server.handler_p99_le_ms:g} ms (service histogram buckets, no queueing)"
    )
    yield from describe_cpu(cpu)
    yield describe_load_model(args, result)
    outcome = "met" if not target_misses else "missed (" + "; ".join(target_misses) + ")"
    yield (
        f"  target       >= {TARGET_RPS:,.0f} decisions/s with p99 <= {TARGET_P99_MS:.0f} ms at "
        f"{TARGET_CONNECTIONS} connections: {outcome}"
    )
    if errors:
        yield f"  run errors   {'; '.join(errors)}"
    yield f"  RESULT       {'PASS' if not errors and not target_misses else 'FAIL'}"


def describe_cpu(cpu: CpuUse) -> Iterator[str]:
    shares = " | ".join(f"{label} {share:.0f}%" for label, share in cpu.shares.items())
    yield f"  cpu          {shares} (100% = one CPU)"
    if cpu.uneven_workers:
        yield (
            "  warning      workers unevenly loaded: kept-alive connections stay with the worker that accepted "
            "them, so this run measured fewer workers than configured"
        )


def describe_load_model(args: argparse.Namespace, result: WrkResult) -> str:
    if args.rate:
        achieved = result.requests_per_s / args.rate
        return (
            f"  note         paced load: {achieved:.0%} of the requested {args.rate:,.0f} req/s achieved. wrk times "
            "requests from when they are sent (coordinated omission), so tails are understated vs. open-loop."
        )
    little = 1000.0 * args.connections / result.requests_per_s if result.requests_per_s else float("inf")
    return (
        f"  note         wrk is closed-loop: latency includes queueing; mean ≈ connections / throughput = "
        f"{args.connections} / {result.requests_per_s:,.0f}/s = {little:.2f} ms "
        f"(measured mean {result.latency_mean_ms:.2f} ms)"
    )


def write_json(
    path: Path, args: argparse.Namespace, result: WrkResult, server: ServerSide, cpu: CpuUse, verdict: dict[str, Any]
) -> None:
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    document = {
        "config": config,
        "cpus": os.cpu_count(),
        "load": "paced" if args.rate else "closed-loop",
        "wrk": asdict(result),
        "server": asdict(server),
        "cpu_percent": cpu.shares,
        "uneven_workers": cpu.uneven_workers,
        "target": {"rps": TARGET_RPS, "p99_ms": TARGET_P99_MS, "connections": TARGET_CONNECTIONS},
        **verdict,
    }
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# main


def start_site(args: argparse.Namespace, directory: Path, cleanup: list[Any]) -> tuple[RunningService, int, str]:
    """Key, site file, Redis with the blob indexed, the service up; returns it, Redis's PID and a checked token."""
    redis_port, service_port = find_free_port(), find_free_port()
    key = generate_signing_key(directory / "bundle.pem")
    config_path = write_site_config(directory, args, redis_port, service_port)
    settings = load_settings(config_path, environ={})

    redis_process = start_redis(directory, redis_port)
    cleanup.append(lambda: stop_process(redis_process, "redis-server"))
    wait_for_redis(redis_process, redis_port, directory / "redis.log")
    fill_index(settings)

    service = start_service(directory, config_path, service_port)
    cleanup.append(lambda: report_service_log(service.log_path))  # runs after the service has stopped
    cleanup.append(lambda: stop_service(service))
    wait_for_service(service, args.workers)

    token = mint_token(key)
    check_decision(service.base_url, token)
    return service, redis_process.pid, token


def run_benchmark(args: argparse.Namespace, directory: Path, cleanup: list[Any]) -> int:
    service, redis_pid, token = start_site(args, directory, cleanup)
    url = service.base_url + "/auth"
    script = write_wrk_script(directory, token, args.rate, args.wrk_threads)
    print(f"warming up for {WARMUP_SECONDS} s ...", flush=True)
    run_wrk(url, script, args.connections, WARMUP_SECONDS, args.wrk_threads)
    ensure_service_alive(service)

    before = read_metrics(service.base_url)
    profiler = None
    if args.profile:
        profiler = start_profiler(service.workers[0][0], max(1, args.duration - 1), args.profile)
        cleanup.append(lambda: stop_process(profiler, "py-spy"))
    print(f"measuring for {args.duration} s ...", flush=True)
    pids = {f"worker {pid}": pid for pid, _ in service.workers} | {"redis-server": redis_pid}
    cpu_before, started = sample_cpu_seconds(pids), time.monotonic()
    result, wrk_output = run_wrk(url, script, args.connections, args.duration, args.wrk_threads)
    cpu = compare_cpu(cpu_before, sample_cpu_seconds(pids), time.monotonic() - started)
    alive = service.process.poll() is None
    server = compare_metrics(before, read_metrics(service.base_url)) if alive else ServerSide(0, {}, 0, 0, 0, 0)

    errors = judge_errors(result, server, alive)
    target_met, target_misses = judge_target(result, args.connections)
    print("\n--- wrk output ---\n" + wrk_output.rstrip() + "\n------------------\n")
    for line in format_report(args, result, server, cpu, errors, target_misses):
        print(line)
    if profiler is not None:
        print_profile(profiler, args.profile, service.workers[0][0])
    if args.json:
        verdict = {"errors": errors, "target_met": target_met, "target_misses": target_misses,
                   "result": "PASS" if not errors and target_met else "FAIL"}  # fmt: skip
        write_json(args.json, args, result, server, cpu, verdict)
        print(f"\nwrote {args.json}")
    return 1 if errors else 0


def report_service_log(log_path: Path) -> None:
    """gunicorn runs at log level warning, so anything it wrote deserves a look."""
    text = log_path.read_text(encoding="utf-8", errors="replace").strip() if log_path.exists() else ""
    if text:
        count = len(text.splitlines())
        print(f"\nservice stderr ({count} lines; last 40):\n{read_tail(log_path)}", file=sys.stderr)
    else:
        print("\nservice stderr: empty (no warnings or errors)")


def raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    signal.signal(signal.SIGTERM, raise_system_exit)  # so the finally block below always cleans up
    directory = Path(tempfile.mkdtemp(prefix="geo-route-bench-"))
    cleanup: list[Any] = []
    try:
        return run_benchmark(args, directory, cleanup)
    except BenchError as exc:
        print(f"\nbenchmark failed: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        for step in reversed(cleanup):  # the log report, then the service, then redis
            try:
                step()
            except Exception as exc:  # keep cleaning up whatever one step did
                print(f"warning: clean-up step failed: {exc!r}", file=sys.stderr)
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
