"""Manifest HEAD requests per second through geo-route vs. a plain NGINX proxy (issue 5, scenario d).

Everything is real and private to the run, on loopback. For each setting of the NGINX decision cache
(off, then on) a fresh development stack (``geo_route.devstack.bring_up(..., decision_cache=...)``)
is started in a temporary directory. A small image is pushed straight to the primary and replicated
to the secondary's registry, so geo-route routes a manifest HEAD by digest ``local``. Next to the
stack, a minimal NGINX ("plain") is started on a free loopback port: the same worker count as the
stack's NGINX, an access log, ``proxy_pass`` over HTTP/1.1 to the same local registry through a
keepalive upstream, the client's ``Authorization`` forwarded, and NO ``auth_request``; the registry's
own token check still runs on every request.

The load generator is ApacheBench (``ab -i -k``, Debian ``apache2-utils``), not wrk: wrk 4.1.0 (the
Debian package) cannot complete a HEAD response that carries ``Content-Length`` (its parser waits for
the body that never comes; a HEAD script against a static NGINX completes 0 requests), and manifest
HEAD answers always carry it. Two ab processes run at once (one per core, like wrk's 2 threads),
``--connections`` (32) keep-alive connections in all, closed loop, each sending
``HEAD /v2/<repo>/manifests/<digest>`` with an ``Accept`` that includes the OCI manifest type and the
same pull token (from the stack's token service) on every request, for ``--duration`` seconds against
each front, geo-route and plain alternating in order, after a 1 s warm-up of each. Reported: req/s
of each (the two processes summed), the ratio geo-route/plain and the target (>= 0.8x). Checks: ab
saw no failed and no non-2xx answers, one HEAD through each front answered 200 with the pushed
digest, and every geo-route request of the measured run was logged by its NGINX as ``local``/200
(except at most one 499 per connection and ab run: what ab had in flight when it closed at the deadline).

All processes share the machine's CPUs (ab, both NGINX, the auth service, the registry, Redis), as
they would on one load balancer host; the numbers are relative, not absolute capacity.

Usage:
    .venv/bin/python benchmarks/head_rate.py [--duration 10] [--quick] [--connections 32] [--json FILE]

Exit status: 0 when every check passed (whether or not the target is met; the table says), 1 when a
check failed, 2 when the setup failed.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib, also when imported from elsewhere

from benchlib.common import BenchError
from benchlib.pull_mix import finish

from geo_route.devstack.client import StackClient, started_stack
from geo_route.devstack.images import MANIFEST_MEDIA_TYPE, build_oci_image
from geo_route.devstack.processes import LOOPBACK, LoggedProcess, fetch, free_port, require_binary, start_until_ready
from geo_route.devstack.skopeo import docker_reference
from geo_route.errors import DevstackError

REPOSITORY = "bench/head"
TAG = "v1"
ACCEPT = ", ".join(
    (
        MANIFEST_MEDIA_TYPE,
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    )
)
TARGET_RATIO = 0.8
AB_PROCESSES = 2
AB_REQUEST_CAP_PER_SECOND = 50_000  # per process; ab needs -n (a run ends at -t or -n, and reports its real time)
WARMUP_SECONDS = 1
DURATION, QUICK_DURATION = 10, 3
PLAIN_NGINX_CONF = """\
{user}worker_processes {workers};
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    client_body_temp_path {directory}/client_body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    server_tokens off;
    log_format plain '$remote_addr [$time_local] "$request" $status $body_bytes_sent $request_time';
    access_log {directory}/access.log plain;
    upstream local_registry {{
        server {registry};
        keepalive {keepalive};
    }}
    server {{
        listen {listen};
        location /v2/ {{
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header Authorization $http_authorization;
            proxy_buffering off;
            proxy_pass http://local_registry;
        }}
        location / {{
            return 404;
        }}
    }}
}}
"""


class CheckFailed(Exception):
    pass


@dataclass
class AbResult:
    complete: int
    failed: int
    non_2xx: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float


@dataclass
class Measurement:
    front: str
    requests_per_s: float
    requests: int
    failed: int
    non_2xx: int
    latency_p50_ms: float  # the larger of the ab processes' medians (ab reports whole milliseconds)
    latency_p99_ms: float
    processes: list[AbResult] = field(default_factory=list)
    routes: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, front: str, results: list[AbResult]) -> Measurement:
        return cls(
            front,
            sum(r.requests_per_s for r in results),
            sum(r.complete for r in results),
            sum(r.failed for r in results),
            sum(r.non_2xx for r in results),
            max(r.p50_ms for r in results),
            max(r.p99_ms for r in results),
            results,
        )


def ab_number(text: str, pattern: str, what: str, default: float | None = None) -> float:
    found = re.search(pattern, text, re.MULTILINE)
    if found is None:
        if default is not None:
            return default
        raise BenchError(f"cannot find {what} in ab's output:\n{text[-2000:]}")
    return float(found.group(1))


def parse_ab(text: str) -> AbResult:
    return AbResult(
        complete=int(ab_number(text, r"^Complete requests:\s+(\d+)", "Complete requests")),
        failed=int(ab_number(text, r"^Failed requests:\s+(\d+)", "Failed requests")),
        non_2xx=int(ab_number(text, r"^Non-2xx responses:\s+(\d+)", "Non-2xx responses", 0)),
        seconds=ab_number(text, r"^Time taken for tests:\s+([\d.]+)", "Time taken"),
        requests_per_s=ab_number(text, r"^Requests per second:\s+([\d.]+)", "Requests per second"),
        p50_ms=ab_number(text, r"^\s+50%\s+(\d+)", "50%"),
        p99_ms=ab_number(text, r"^\s+99%\s+(\d+)", "99%"),
    )


def run_ab(url: str, token: str, connections: int, duration: int) -> list[AbResult]:
    """``AB_PROCESSES`` ab processes at once, ``connections`` in all; each process's parsed result."""
    ab = shutil.which("ab")
    if ab is None:
        raise BenchError("ab is not on PATH (Debian package apache2-utils)")
    per_process = [connections // AB_PROCESSES + (i < connections % AB_PROCESSES) for i in range(AB_PROCESSES)]
    command = [ab, "-q", "-i", "-k", "-t", str(duration), "-n", str(AB_REQUEST_CAP_PER_SECOND * duration)]
    command += ["-s", "30", "-H", f"Accept: {ACCEPT}", "-H", f"Authorization: Bearer {token}"]
    children = [
        subprocess.Popen([*command, "-c", str(c), url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in per_process
    ]
    return [parse_ab(finish(child, "ab", duration + 60)) for child in children]


@dataclass
class CacheRun:
    decision_cache: bool
    georoute: Measurement | None = None
    plain: Measurement | None = None

    @property
    def ratio(self) -> float:
        assert self.georoute is not None and self.plain is not None
        return self.georoute.requests_per_s / self.plain.requests_per_s if self.plain.requests_per_s else 0.0


def start_plain_nginx(directory: Path, registry: str, workers: str) -> tuple[LoggedProcess, str]:
    """The baseline: NGINX proxying /v2/ to ``registry`` with no auth_request; returns (process, address)."""
    directory.mkdir(parents=True, exist_ok=True)
    listen = f"{LOOPBACK}:{free_port()}"
    conf = directory / "nginx.conf"
    conf.write_text(
        PLAIN_NGINX_CONF.format(
            user="user root;\n" if os.geteuid() == 0 else "",
            workers=workers,
            directory=directory,
            registry=registry,
            keepalive=32,  # the stack's default nginx.upstream_keepalive
            listen=listen,
        ),
        encoding="utf-8",
    )
    nginx = require_binary("nginx")
    argv = [nginx, "-e", str(directory / "error.log"), "-g", "daemon off;", "-c", str(conf), "-p", str(directory)]
    ready = lambda: fetch(f"http://{listen}/v2/").status == 401  # noqa: E731  (the registry's own challenge)
    return start_until_ready(argv, directory, "plain-nginx", ready), listen


def head_once(address: str, uri: str, token: str) -> tuple[int, str]:
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("HEAD", uri, headers={"Accept": ACCEPT, "Authorization": f"Bearer {token}"})
        response = connection.getresponse()
        response.read()
        return response.status, response.getheader("Docker-Content-Digest") or ""
    finally:
        connection.close()


def count_routes(client: StackClient, offset: int) -> dict[str, int]:
    routes: dict[str, int] = {}
    for entry in client.access_log(offset):
        key = f"{entry.route or 'none'}/{entry.status}"
        routes[key] = routes.get(key, 0) + 1
    return routes


def check(measurement: Measurement, problems: list[str], label: str) -> None:
    if measurement.non_2xx:
        problems.append(f"{label} {measurement.front}: {measurement.non_2xx} non-2xx answers")
    if measurement.failed:
        problems.append(f"{label} {measurement.front}: {measurement.failed} failed requests (ab)")
    if measurement.requests == 0:
        problems.append(f"{label} {measurement.front}: no requests completed")


def measure_stack(
    root: Path, decision_cache: bool, args: argparse.Namespace, problems: list[str], order: list[str]
) -> CacheRun:
    label = f"cache {'on' if decision_cache else 'off'}"
    with contextlib.ExitStack() as owned:
        started = time.monotonic()
        client = owned.enter_context(started_stack(root / "stack", decision_cache=decision_cache))
        image = build_oci_image(root / "image", TAG, layer_count=2, layer_bytes=64 * 1024)
        pushed = client.skopeo.copy(
            image.reference, docker_reference(client.primary, REPOSITORY, TAG), dest_creds=client.credentials()
        )
        if pushed != image.digest:
            raise CheckFailed(f"pushed {pushed}, built {image.digest}")
        client.wait_for_pin(REPOSITORY, TAG, image.digest)
        client.replicate(REPOSITORY, [TAG])
        plain, plain_address = start_plain_nginx(root / "plain-nginx", client.local_registry, "2")
        owned.callback(plain.stop)
        token = client.token(f"repository:{REPOSITORY}:pull")
        uri = f"/v2/{REPOSITORY}/manifests/{image.digest}"
        fronts = {"geo-route": client.secondary, "plain": plain_address}
        print(f"[{label}] stack + plain NGINX up, image replicated in {time.monotonic() - started:.1f} s", flush=True)
        for name, address in fronts.items():
            status, digest = head_once(address, uri, token)
            if status != 200 or digest != image.digest:
                problems.append(f"{label} {name}: single HEAD answered {status} with digest {digest or '-'}")
        run = CacheRun(decision_cache)
        for name in order:
            url = f"http://{fronts[name]}{uri}"
            run_ab(url, token, args.connections, WARMUP_SECONDS)
            offset = client.access_log_offset()
            measurement = Measurement.of(name, run_ab(url, token, args.connections, args.duration))
            if name == "geo-route":
                measurement.routes = count_routes(client, offset)
                # ab closes its connections at the deadline: NGINX logs what was in flight as 499 (client
                # closed), at most one per connection, for the warm-up run (logged late, after our offset)
                # and for the measured run. Anything else but local/200 is a failure.
                aborted = sum(v for k, v in measurement.routes.items() if k.endswith("/499"))
                wrong = {k: v for k, v in measurement.routes.items() if k != "local/200" and not k.endswith("/499")}
                if aborted > 2 * args.connections:
                    problems.append(f"{label} geo-route: {aborted} requests closed by the client (499)")
                if wrong:
                    problems.append(f"{label} geo-route: requests not local/200: {wrong}")
                run.georoute = measurement
            else:
                run.plain = measurement
            check(measurement, problems, label)
            print(
                f"[{label}] {name:<9} {measurement.requests_per_s:10,.0f} req/s  p50 {measurement.latency_p50_ms:6.2f}"
                f" ms  p99 {measurement.latency_p99_ms:6.2f} ms  ({measurement.requests:,} requests,"
                f" failed {measurement.failed}, non-2xx {measurement.non_2xx})",
                flush=True,
            )
            if measurement.routes:
                shown = ", ".join(f"{k} {v}" for k, v in sorted(measurement.routes.items()))
                print(f"[{label}] geo-route NGINX log (route/status): {shown}", flush=True)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--duration", type=int, default=None, help=f"seconds per measured run (default {DURATION})")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_DURATION} s per measured run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--json", default="", help="write the results to this file")
    args = parser.parse_args(argv)
    args.duration = args.duration or (QUICK_DURATION if args.quick else DURATION)
    if args.duration < 1 or args.connections < AB_PROCESSES:
        parser.error("--duration must be >= 1 and --connections >= 2")
    wall = time.monotonic()
    problems: list[str] = []
    runs: list[CacheRun] = []
    print(
        f"manifest HEAD by digest, {args.connections} connections, {AB_PROCESSES} ab processes, {args.duration} s per"
        f" front and cache setting, {os.cpu_count()} CPUs shared by everything"
    )
    try:
        with tempfile.TemporaryDirectory(prefix="geo-route-head-") as temporary:
            for index, cache in enumerate((False, True)):
                order = ["geo-route", "plain"] if index % 2 == 0 else ["plain", "geo-route"]
                runs.append(measure_stack(Path(temporary) / f"cache-{cache}", cache, args, problems, order))
    except (BenchError, CheckFailed, DevstackError, TimeoutError) as exc:
        print(f"FAIL (setup): {exc}", file=sys.stderr)
        return 2
    print()
    header = f"{'decision cache':<15} {'geo-route req/s':>16} {'plain NGINX req/s':>18} {'ratio':>7}  target"
    print(header)
    print("-" * len(header))
    for run in runs:
        assert run.georoute is not None and run.plain is not None
        met = run.ratio >= TARGET_RATIO
        print(
            f"{'on' if run.decision_cache else 'off':<15} {run.georoute.requests_per_s:16,.0f}"
            f" {run.plain.requests_per_s:18,.0f} {run.ratio:6.2f}x  >= {TARGET_RATIO}x: {'MET' if met else 'MISSED'}"
        )
    wall_seconds = time.monotonic() - wall
    if args.json:
        results: dict[str, Any] = {
            "config": {"duration": args.duration, "connections": args.connections, "ab_processes": AB_PROCESSES},
            "runs": [
                {
                    "decision_cache": run.decision_cache,
                    "georoute": asdict(run.georoute) if run.georoute else None,
                    "plain": asdict(run.plain) if run.plain else None,
                    "ratio": run.ratio,
                    "target": TARGET_RATIO,
                    "met": run.ratio >= TARGET_RATIO,
                }
                for run in runs
            ],
            "problems": problems,
            "wall_seconds": wall_seconds,
        }
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wall time {wall_seconds:.1f} s; stacks and plain NGINX stopped")
    for problem in problems:
        print(f"CHECK FAILED: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
