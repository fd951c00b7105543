"""Manifest HEAD requests per second through geo-route vs. a plain NGINX proxy (issue 5 scenario d, issue 15 item 2).

Everything is real and private to the run, on loopback, in ONE development stack
(``geo_route.devstack``): a small image is pushed to the primary and replicated, so geo-route routes
a manifest HEAD by digest ``local``. The fronts measured side by side, all on that stack's index and
local registry:

* ``site``: node 1, the site as configured by default (``server.worker_class: httptools``, NGINX
  reaching the auth service on its Unix socket through kept-alive connections), decision cache OFF;
* ``site-storage``: another node, the same as ``site`` with ``local_registry.storage_root`` set to
  the local registry's storage: NGINX answers the replicated manifest from the registry's files
  (``@geo_route_storage_manifest``), so no registry is asked; its rate may exceed plain NGINX's, whose
  every HEAD costs the registry's CPU;
* ``site-asgi``: another node, the same as ``site`` but ``server.worker_class: asgi`` (gunicorn's own
  ASGI protocol around the same decision: the default before the httptools worker);
* ``site-before``: another node (``RunningStack.add_node``) with the auth transport geo-route had
  before issue 15: gunicorn sync workers on TCP (a connection per decision, closed gracefully);
* ``plain``: a minimal NGINX started next to the stack (the same worker count, an access log,
  ``proxy_pass`` over HTTP/1.1 to the same local registry through a keepalive upstream, the client's
  ``Authorization`` forwarded, NO ``auth_request``); the registry's own token check still runs.

The decision cache (``nginx.decision_cache``) is not a front here: decisions about manifests are
never reused (README, ``routing.cache_digest_seconds``), so with it on every manifest HEAD still asks
the service (and waits on ``proxy_cache_lock`` for the one in flight).

The load generator is ApacheBench (``ab -i -k``, Debian ``apache2-utils``), not wrk: wrk 4.1.0 (the
Debian package) cannot complete a HEAD response that carries ``Content-Length`` (its parser waits for
the body that never comes), and manifest HEAD answers always carry it. Two ab processes run at once
(one per core), ``--connections`` (32) keep-alive connections in all, closed loop, each sending
``HEAD /v2/<repo>/manifests/<digest>`` with an ``Accept`` naming the OCI manifest type and the same
pull token (from the stack's token service), for ``--duration`` seconds against each front after a
1 s warm-up. The fronts take turns within a round, in an order reversed every other round, for
``--rounds`` rounds: the machine is shared and its load drifts, so each front's figure is its median
over the rounds and the ratio is taken of medians. For each run the CPU seconds (from /proc) of the
front's NGINX, its auth service (master and workers), the local registry and Redis are divided by the
requests served: microseconds of CPU per request, by component, a figure the machine's load disturbs
far less than the rate.

Checks: ab saw no failed and no non-2xx answers, one HEAD through each front answered 200 with the
pushed digest, and every request through a geo-route front was logged by its NGINX as ``local``/200
(``site-storage``: with no upstream, i.e. answered from storage), except at most one 499 per
connection and ab run: what ab had in flight at the deadline.

Usage:
    .venv/bin/python benchmarks/head_rate.py [--duration 8] [--rounds 3] [--quick] [--connections 32] [--json FILE]

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
import statistics
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
from geo_route.devstack.processes import (
    LOOPBACK,
    LoggedProcess,
    cpu_seconds,
    fetch,
    free_port,
    require_binary,
    start_until_ready,
)
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
TARGET_RATIO = 0.9  # issue 15: the site's rate >= 0.9x plain NGINX's, decision cache off
AB_PROCESSES = 2
AB_REQUEST_CAP_PER_SECOND = 50_000  # per process; ab needs -n (a run ends at -t or -n, and reports its real time)
WARMUP_SECONDS = 1
DURATION, QUICK_DURATION = 8, 3
ROUNDS, QUICK_ROUNDS = 3, 1
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
    cpu_us: dict[str, float] = field(default_factory=dict)  # component -> CPU microseconds per request

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


# The nodes measured next to node 1 ("site"): their site file is node 1's with these sections merged in.
NODE_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "site-asgi": {"server": {"worker_class": "asgi"}},  # gunicorn's ASGI protocol (the default until issue 15's end)
    "site-before": {"server": {"worker_class": "sync", "bind": [f"{LOOPBACK}:0"]}},  # before issue 15
    # local_registry.storage_root: set to the stack's local registry storage below
    "site-storage": {"local_registry": {}},
}
FRONTS = ("site", "site-storage", "site-asgi", "site-before", "plain")
# Redis gets 0.5 s instead of 50 ms: the run measures the decision's cost, and on the shared, saturated
# machine a lookup missing 50 ms would be an index-unavailable answer (primary) the checks reject.
SITE_OVERRIDES = {"redis": {"socket_timeout": 0.5}}


@dataclass
class Front:
    """One front's address and the processes whose CPU it costs."""

    name: str
    address: str
    parts: dict[str, int]  # component -> PID (with its descendants)
    access_log: str = ""  # a geo-route front's NGINX access log


@dataclass
class FrontResult:
    name: str
    runs: list[Measurement] = field(default_factory=list)
    cpu_us: list[dict[str, float]] = field(default_factory=list)  # per run: component -> CPU us per request

    @property
    def requests_per_s(self) -> float:
        return statistics.median(run.requests_per_s for run in self.runs) if self.runs else 0.0

    def median_cpu(self) -> dict[str, float]:
        if not self.cpu_us:
            return {}
        return {part: statistics.median(run[part] for run in self.cpu_us) for part in self.cpu_us[0]}


def set_up_fronts(client: StackClient, root: Path, owned: contextlib.ExitStack) -> dict[str, Front]:
    assert client.stack is not None
    processes = client.stack.processes
    shared = {"registry": processes["secondary"].pid, "redis": processes["redis"].pid}
    fronts = {
        "site": Front(
            "site",
            client.secondary,
            {"nginx": processes["nginx"].pid, "auth": processes["auth"].pid, **shared},
            client.info.nginx_access_log,
        )
    }
    storage = Path(client.info.directory) / "secondary" / "storage"
    for name, overrides in NODE_OVERRIDES.items():
        if "local_registry" in overrides:
            overrides = {**overrides, "local_registry": {"storage_root": str(storage)}}
        node = client.stack.add_node(overrides)
        suffix = f"-{node.number}"
        parts = {"nginx": processes["nginx" + suffix].pid, "auth": processes["auth" + suffix].pid, **shared}
        fronts[name] = Front(name, node.secondary_url.split("://", 1)[1], parts, node.nginx_access_log)
    plain, plain_address = start_plain_nginx(root / "plain-nginx", client.local_registry, "2")
    owned.callback(plain.stop)
    fronts["plain"] = Front("plain", plain_address, {"nginx": plain.pid, "registry": shared["registry"]})
    return fronts


def count_routes(access_log: str, offset: int) -> dict[str, int]:
    routes: dict[str, int] = {}
    with open(access_log, "rb") as stream:
        stream.seek(offset)
        for line in stream.read().decode("utf-8").splitlines():
            found = re.search(r'"status":(\d+),.*"route":"([^"]*)".*"upstream":"([^"]*)"', line)
            # "local/200" (the registry answered) or "storage/200" (NGINX answered from storage)
            route = (
                "storage" if found and found.group(2) == "local" and not found.group(3) else found and found.group(2)
            )
            key = f"{route or 'none'}/{found.group(1)}" if found else "unparsed"
            routes[key] = routes.get(key, 0) + 1
    return routes


def log_size(path: str) -> int:
    return Path(path).stat().st_size if path and Path(path).exists() else 0


def measure_front(front: Front, uri: str, token: str, args: argparse.Namespace, problems: list[str]) -> Measurement:
    url = f"http://{front.address}{uri}"
    run_ab(url, token, args.connections, WARMUP_SECONDS)
    time.sleep(0.3)  # the warm-up's last log lines
    offset = log_size(front.access_log)
    before = {part: cpu_seconds(pid) for part, pid in front.parts.items()}
    measurement = Measurement.of(front.name, run_ab(url, token, args.connections, args.duration))
    after = {part: cpu_seconds(pid) for part, pid in front.parts.items()}
    served = max(measurement.requests, 1)
    measurement.cpu_us = {part: 1e6 * (after[part] - before[part]) / served for part in front.parts}
    if front.access_log:
        time.sleep(0.3)
        measurement.routes = count_routes(front.access_log, offset)
        aborted = sum(v for k, v in measurement.routes.items() if k.endswith("/499"))
        served = "storage/200" if front.name == "site-storage" else "local/200"
        wrong = {k: v for k, v in measurement.routes.items() if k != served and not k.endswith("/499")}
        if aborted > 2 * args.connections:
            problems.append(f"{front.name}: {aborted} requests closed by the client (499)")
        if wrong:
            problems.append(f"{front.name}: requests not {served}: {wrong}")
    check(measurement, problems, front.name)
    return measurement


def check(measurement: Measurement, problems: list[str], label: str) -> None:
    if measurement.non_2xx:
        problems.append(f"{label}: {measurement.non_2xx} non-2xx answers")
    if measurement.failed:
        problems.append(f"{label}: {measurement.failed} failed requests (ab)")
    if measurement.requests == 0:
        problems.append(f"{label}: no requests completed")


def measure(root: Path, args: argparse.Namespace, problems: list[str]) -> dict[str, FrontResult]:
    with contextlib.ExitStack() as owned:
        started = time.monotonic()
        client = owned.enter_context(started_stack(root / "stack", site_overrides=SITE_OVERRIDES))
        image = build_oci_image(root / "image", TAG, layer_count=2, layer_bytes=64 * 1024)
        pushed = client.skopeo.copy(
            image.reference, docker_reference(client.primary, REPOSITORY, TAG), dest_creds=client.credentials()
        )
        if pushed != image.digest:
            raise CheckFailed(f"pushed {pushed}, built {image.digest}")
        client.wait_for_pin(REPOSITORY, TAG, image.digest)
        client.replicate(REPOSITORY, [TAG])
        fronts = set_up_fronts(client, root, owned)
        token = client.token(f"repository:{REPOSITORY}:pull")
        uri = f"/v2/{REPOSITORY}/manifests/{image.digest}"
        print(f"stack, one more node and plain NGINX up, image replicated in {time.monotonic() - started:.1f} s")
        for front in fronts.values():
            status, digest = head_once(front.address, uri, token)
            if status != 200 or digest != image.digest:
                problems.append(f"{front.name}: single HEAD answered {status} with digest {digest or '-'}")
        results = {name: FrontResult(name) for name in fronts}
        for round_number in range(args.rounds):
            order = list(FRONTS) if round_number % 2 == 0 else list(reversed(FRONTS))
            for name in order:
                measurement = measure_front(fronts[name], uri, token, args, problems)
                results[name].runs.append(measurement)
                results[name].cpu_us.append(measurement.cpu_us)
                cpu = "  ".join(f"{part} {us:.0f}" for part, us in measurement.cpu_us.items())
                print(
                    f"round {round_number + 1} {name:<12} {measurement.requests_per_s:8,.0f} req/s  p50"
                    f" {measurement.latency_p50_ms:5.0f} ms  p99 {measurement.latency_p99_ms:5.0f} ms"
                    f"  CPU us/request: {cpu}",
                    flush=True,
                )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--duration", type=int, default=None, help=f"seconds per measured run (default {DURATION})")
    parser.add_argument("--rounds", type=int, default=None, help=f"rounds over the fronts (default {ROUNDS})")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ROUNDS} round of {QUICK_DURATION} s runs")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--json", default="", help="write the results to this file")
    args = parser.parse_args(argv)
    args.duration = args.duration or (QUICK_DURATION if args.quick else DURATION)
    args.rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    if args.duration < 1 or args.connections < AB_PROCESSES or args.rounds < 1:
        parser.error("--duration and --rounds must be >= 1 and --connections >= 2")
    wall = time.monotonic()
    problems: list[str] = []
    print(
        f"manifest HEAD by digest, {args.connections} connections, {AB_PROCESSES} ab processes, {args.rounds} rounds"
        f" of {args.duration} s per front, {os.cpu_count()} CPUs shared by everything (and other work)"
    )
    try:
        with tempfile.TemporaryDirectory(prefix="geo-route-head-") as temporary:
            results = measure(Path(temporary), args, problems)
    except (BenchError, CheckFailed, DevstackError, TimeoutError) as exc:
        print(f"FAIL (setup): {exc}", file=sys.stderr)
        return 2
    plain = results["plain"].requests_per_s
    ratios = {name: (result.requests_per_s / plain if plain else 0.0) for name, result in results.items()}
    print()
    header = f"{'front':<12} {'req/s (median)':>15} {'ratio to plain':>15}  CPU us/request: nginx auth registry redis"
    print(header)
    print("-" * len(header))
    for name, result in results.items():
        cpu = result.median_cpu()
        parts = "  ".join(f"{cpu.get(part, 0):6.0f}" for part in ("nginx", "auth", "registry", "redis"))
        print(f"{name:<12} {result.requests_per_s:15,.0f} {ratios[name]:14.2f}x  {parts}")
    met = ratios["site"] >= TARGET_RATIO
    print(
        f"target: site >= {TARGET_RATIO}x plain, decision cache off:"
        f" {'MET' if met else 'MISSED'} ({ratios['site']:.2f}x; the local registry answers every HEAD)"
    )
    met_storage = ratios["site-storage"] >= TARGET_RATIO
    print(
        f"target: site-storage >= {TARGET_RATIO}x plain, decision cache off:"
        f" {'MET' if met_storage else 'MISSED'} ({ratios['site-storage']:.2f}x; NGINX answers from storage)"
    )
    wall_seconds = time.monotonic() - wall
    if args.json:
        document: dict[str, Any] = {
            "config": {"duration": args.duration, "rounds": args.rounds, "connections": args.connections},
            "fronts": {
                name: {
                    "requests_per_s": result.requests_per_s,
                    "ratio": ratios[name],
                    "cpu_us": result.median_cpu(),
                    "runs": [asdict(run) for run in result.runs],
                }
                for name, result in results.items()
            },
            "target": TARGET_RATIO,
            "ratio": ratios["site"],
            "met": met,
            "storage_ratio": ratios["site-storage"],
            "storage_met": met_storage,
            "problems": problems,
            "wall_seconds": wall_seconds,
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"wall time {wall_seconds:.1f} s; stack and plain NGINX stopped")
    for problem in problems:
        print(f"CHECK FAILED: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
