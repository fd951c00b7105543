"""Pull times through geo-route vs. direct, with the primary behind a simulated WAN (issue 5, scenarios a-c).

Everything is real and private to the run: the development stack (``geo_route.devstack``: redis, the
token service, primary and secondary docker-registry 2.8, the auth service, NGINX) in a temporary
directory, with the PRIMARY registry reachable only through ``benchmarks/wan`` (``SimulatedWan``,
default 100 Mbit/s each way, 80 ms RTT): NGINX's primary upstream and every "direct from the primary"
pull cross the link. The local (secondary) registry, NGINX, the auth service and the token service
are on loopback.

The image is built on disk (``geo_route.devstack.images.build_oci_image``: pseudo-random, i.e.
incompressible, layer payloads, stored as gzip layers; gzip does not shrink them), ``--image-mb``
in ``--layers`` layers, and pushed straight to the primary's own port. Then, timing each whole
``skopeo copy docker://... oci:DIR:tag`` into a fresh directory, ``--runs`` times alternating sides:

* (c) before replication: pull through geo-route (secondary URL) vs. direct from the primary
  (across the WAN); target: geo-route <= 1.05x direct;
* replicate (primary -> local registry, wait until the index has the notifications);
* (a) replicated pull through geo-route vs. direct from the primary across the WAN; target: >= 10x
  faster;
* (b) replicated pull through geo-route vs. direct from the local registry (no NGINX, no auth
  service); target: <= 1.10x.

Each geo-route pull is checked in NGINX's access log (all "primary" before replication, all
"local" after), every pulled digest must be the pushed one, and the bytes the WAN's tbf qdiscs
sent during each pull are recorded. Exit status: 0 when every check passed (whether or not the
targets are met; the table says), 1 when a check failed, 2 when the setup failed (e.g. no WAN).

Usage (as root: the WAN needs network namespaces and tc):
    .venv/bin/python benchmarks/pulls.py [--quick] [--runs N] [--image-mb M] [--layers L] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wan.check import Reading, measure, sink_server
from wan.link import SimulatedWan, WanError, WanFront, WanUnavailable

from geo_route.devstack.client import AccessLogEntry, StackClient, started_stack
from geo_route.devstack.images import OciImage, build_oci_image
from geo_route.devstack.skopeo import Skopeo, docker_reference
from geo_route.errors import DevstackError

REPOSITORY = "bench/pulls"
TAG = "v1"
RATE_MBIT = 100.0
RTT_MS = 80.0
SKOPEO_TIMEOUT = 1800.0
# scenario -> (description, limit, the ratio must be at least the limit (True) or at most (False))
TARGETS: dict[str, tuple[str, float, bool]] = {
    "a": ("geo-route >= 10x faster than direct primary", 10.0, True),
    "b": ("geo-route <= 1.10x direct local", 1.10, False),
    "c": ("geo-route <= 1.05x direct primary", 1.05, False),
}


@dataclass
class Side:
    name: str
    seconds: list[float] = field(default_factory=list)
    wan_bytes: list[int] = field(default_factory=list)
    routes: dict[str, int] = field(default_factory=dict)
    others: list[str] = field(default_factory=list)  # NGINX requests that are not for the image

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seconds": self.seconds,
            "median": statistics.median(self.seconds),
            "min": min(self.seconds),
            "max": max(self.seconds),
            "wan_bytes_to_client": self.wan_bytes,
            "routes": self.routes,
            "non_image_requests": self.others,
        }


@dataclass
class Scenario:
    key: str
    title: str
    georoute: Side
    other: Side
    ratio_name: str = ""
    ratio: float = 0.0
    met: bool = False

    def judge(self) -> None:
        mine, theirs = statistics.median(self.georoute.seconds), statistics.median(self.other.seconds)
        if self.key == "a":
            self.ratio_name, self.ratio = "speed-up direct/geo-route", theirs / mine
        else:
            self.ratio_name, self.ratio = "geo-route/direct", mine / theirs
        _, limit, at_least = TARGETS[self.key]
        self.met = self.ratio >= limit if at_least else self.ratio <= limit


class CheckFailed(Exception):
    pass


class Bench:
    def __init__(self, client: StackClient, wan: SimulatedWan, image: OciImage, root: Path) -> None:
        self.client = client
        self.wan = wan
        self.image = image
        self.root = root
        self.count = 0
        self.problems: list[str] = []

    def wan_sent_to_client(self) -> int:
        """Bytes the tbf on veth B (primary -> client direction) has sent so far."""
        stats = self.wan.qdisc_stats()[self.wan.veth[1]]
        found = re.search(r"Sent (\d+) bytes", stats)
        return int(found.group(1)) if found else -1

    def pull(self, side: Side, address: str, expected_route: str | None) -> None:
        self.count += 1
        layout = self.root / f"pull-{self.count}"
        layout.mkdir(parents=True)
        offset = self.client.access_log_offset()
        sent_before = self.wan_sent_to_client()
        started = time.monotonic()
        digest = self.client.skopeo.copy(
            docker_reference(address, REPOSITORY, TAG), f"oci:{layout}:{TAG}", src_creds=self.client.credentials()
        )
        seconds = time.monotonic() - started
        side.seconds.append(seconds)
        side.wan_bytes.append(self.wan_sent_to_client() - sent_before)
        entries = self.client.access_log(offset)
        for entry in entries:
            route = entry.route or f"none/{entry.status}"
            side.routes[route] = side.routes.get(route, 0) + 1
        shutil.rmtree(layout)
        if digest != self.image.digest:
            self.problems.append(f"{side.name} run {len(side.seconds)}: pulled {digest}, pushed {self.image.digest}")
        self.check_routes(side, entries, expected_route)

    def check_routes(self, side: Side, entries: list[AccessLogEntry], expected: str | None) -> None:
        run = f"{side.name} run {len(side.seconds)}"
        if expected is None:  # a direct pull must not touch NGINX
            if entries:
                self.problems.append(f"{run}: {len(entries)} NGINX request(s) during a direct pull")
            return
        # The image's own requests must all take the expected route. The rest (skopeo's unauthenticated
        # `GET /v2/` ping, answered 401 with the token challenge) carries no image bytes: it must be 4xx.
        image_requests = [e for e in entries if e.uri.startswith(f"/v2/{REPOSITORY}/")]
        others = [e for e in entries if e not in image_requests]
        for entry in others:
            side.others.append(f"{entry.method or '-'} {entry.uri or '-'} {entry.status} {entry.reason or '-'}")
            if not 400 <= entry.status < 500:
                self.problems.append(f"{run}: unexpected non-image request {entry}")
        wrong = [e for e in image_requests if e.route != expected]
        if wrong:
            shown = ", ".join(f"{e.method} {e.uri} -> {e.route} ({e.reason})" for e in wrong[:3])
            self.problems.append(f"{run}: {len(wrong)} request(s) not routed {expected}: {shown}")
        blobs = {
            e.uri.rsplit("/", 1)[1] for e in entries if e.method == "GET" and "/blobs/" in e.uri and e.status == 200
        }
        missing = set(self.image.blob_digests) - blobs
        if missing:
            self.problems.append(f"{run}: {len(missing)} blob(s) not fetched through NGINX with 200")

    def compare(
        self, key: str, title: str, mine: tuple[str, str], other: tuple[str, str, str | None], runs: int
    ) -> Scenario:
        scenario = Scenario(key, title, Side(mine[0]), Side(other[0]))
        for run in range(runs):
            first_georoute = run % 2 == 0
            order: list[Callable[[], None]] = [
                lambda: self.pull(scenario.georoute, self.client.secondary, mine[1]),
                lambda: self.pull(scenario.other, other[1], other[2]),
            ]
            for action in order if first_georoute else reversed(order):
                action()
        scenario.judge()
        return scenario


def http_rtts(address: str, count: int) -> list[float]:
    """``GET /v2/`` round trips to the primary through the WAN on one keep-alive connection (first is setup)."""
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    times = []
    try:
        for _ in range(count + 1):
            started = time.monotonic()
            connection.request("GET", "/v2/")
            connection.getresponse().read()
            times.append(time.monotonic() - started)
    finally:
        connection.close()
    return times


def wan_check(megabytes: int) -> dict[str, Any]:
    """The link's numbers, measured like ``benchmarks/wan/check.py`` on an identical link to a sink."""
    with sink_server() as target, SimulatedWan(target, rate_mbit=RATE_MBIT, rtt_ms=RTT_MS) as link:
        readings: list[Reading] = measure(link, megabytes, 15)
    for reading in readings:
        print(reading.line())
    return {r.name: {"measured": r.measured, "expected": r.expected, "unit": r.unit, "ok": r.ok} for r in readings}


def fmt_side(side: Side) -> str:
    s = side.summary()
    return f"{s['median']:8.2f} s ({s['min']:.2f}-{s['max']:.2f})"


def print_table(scenarios: list[Scenario], image_bytes: int) -> None:
    print()
    header = f"{'scenario':<44} {'geo-route median (min-max)':<27} {'direct median (min-max)':<27} {'ratio':>8}  target"
    print(header)
    print("-" * len(header))
    for sc in scenarios:
        target = TARGETS[sc.key][0]
        print(
            f"({sc.key}) {sc.title:<40} {fmt_side(sc.georoute):<27} {fmt_side(sc.other):<27} "
            f"{sc.ratio:7.2f}x  {target}: {'MET' if sc.met else 'MISSED'}"
        )
    print()
    for sc in scenarios:
        for side in (sc.georoute, sc.other):
            wan_mb = statistics.median(side.wan_bytes) / 1e6
            goodput = image_bytes * 8 / statistics.median(side.seconds) / 1e6
            routes = ", ".join(f"{k} {v}" for k, v in sorted(side.routes.items())) or "no NGINX requests"
            print(
                f"  ({sc.key}) {side.name:<34} {goodput:8.1f} Mbit/s image goodput, WAN->client {wan_mb:7.1f} MB/pull,"
                f" NGINX routes: {routes}"
            )


def run(args: argparse.Namespace) -> int:
    layer_bytes = int(args.image_mb * 1_000_000 / args.layers)
    results: dict[str, Any] = {
        "config": {"image_mb": args.image_mb, "layers": args.layers, "runs": args.runs, "rate_mbit": RATE_MBIT},
    }
    results["config"]["rtt_ms"] = RTT_MS
    wall = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="geo-route-pulls-") as temporary, contextlib.ExitStack() as owned:
        root = Path(temporary)
        print(f"WAN check (identical link to a sink, {args.wan_mb} MB each way):")
        results["wan_check"] = wan_check(args.wan_mb)

        started = time.monotonic()
        image = build_oci_image(root / "image", TAG, layer_count=args.layers, layer_bytes=layer_bytes)
        image_bytes = image.config.size + sum(layer.size for layer in image.layers)
        print(
            f"image: {len(image.layers)} layers, {image_bytes / 1e6:.1f} MB blobs, {image.digest[:19]}"
            f" (built in {time.monotonic() - started:.1f} s)"
        )

        front = WanFront(owned, rate_mbit=RATE_MBIT, rtt_ms=RTT_MS)
        started = time.monotonic()
        # The WAN (entered in `owned` while the stack comes up) is closed after the stack is stopped.
        client = owned.enter_context(started_stack(root / "stack", primary_front=front))
        client.skopeo = Skopeo(root / "skopeo", timeout=SKOPEO_TIMEOUT)
        wan = front.wan
        assert wan is not None
        print(f"stack up in {time.monotonic() - started:.1f} s; primary {client.primary} = WAN: {wan.describe()}")
        rtts = http_rtts(client.primary, 5)
        print(
            f"HTTP GET /v2/ to the primary through the WAN: setup+1st {rtts[0] * 1e3:.1f} ms,"
            f" then median {statistics.median(rtts[1:]) * 1e3:.1f} ms"
        )
        results["primary_http_rtt_ms"] = {"first": rtts[0] * 1e3, "median": statistics.median(rtts[1:]) * 1e3}

        started = time.monotonic()
        pushed = client.skopeo.copy(
            image.reference, docker_reference(front.direct, REPOSITORY, TAG), dest_creds=client.credentials()
        )
        if pushed != image.digest:
            raise CheckFailed(f"pushed {pushed}, built {image.digest}")
        client.wait_for_pin(REPOSITORY, TAG, image.digest)
        print(f"pushed straight to the primary in {time.monotonic() - started:.1f} s")

        bench = Bench(client, wan, image, root / "pulls")
        runs = args.runs
        scenarios = [
            bench.compare(
                "c",
                "unreplicated: geo-route vs direct primary",
                ("geo-route (unreplicated)", "primary"),
                ("direct primary via WAN", client.primary, None),
                runs,
            )
        ]
        started = time.monotonic()
        client.replicate(REPOSITORY, [TAG])
        print(f"replicated (and indexed) in {time.monotonic() - started:.1f} s")
        results["replicate_seconds"] = time.monotonic() - started
        scenarios.append(
            bench.compare(
                "a",
                "replicated: geo-route vs direct primary",
                ("geo-route (replicated)", "local"),
                ("direct primary via WAN", client.primary, None),
                runs,
            )
        )
        scenarios.append(
            bench.compare(
                "b",
                "replicated: geo-route vs direct local",
                ("geo-route (replicated)", "local"),
                ("direct local registry", client.local_registry, None),
                runs,
            )
        )
        print_table(scenarios, image_bytes)
        results["image"] = {"digest": image.digest, "bytes": image_bytes, "layers": len(image.layers)}
        results["scenarios"] = [
            {
                "key": sc.key,
                "title": sc.title,
                "georoute": sc.georoute.summary(),
                "other": sc.other.summary(),
                "ratio_name": sc.ratio_name,
                "ratio": sc.ratio,
                "target": TARGETS[sc.key][0],
                "met": sc.met,
            }
            for sc in scenarios
        ]
        results["problems"] = bench.problems
    results["wall_seconds"] = time.monotonic() - wall
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wall time {results['wall_seconds']:.1f} s; stack stopped, WAN removed")
    for problem in bench.problems:
        print(f"CHECK FAILED: {problem}")
    if bench.problems:
        return 1
    met = sum(sc.met for sc in scenarios)
    print(f"checks passed (routes, digests); targets met: {met}/{len(scenarios)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="24 MB image, 1 run, 10 MB WAN check")
    parser.add_argument("--runs", type=int, default=None, help="pulls per side and scenario (default 3, quick 1)")
    parser.add_argument("--image-mb", type=float, default=None, help="image size in MB (default 200, quick 24)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--wan-mb", type=int, default=None, help="WAN check payload each way (default 25, quick 10)")
    parser.add_argument("--json", default="", help="write the results to this file")
    args = parser.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    args.image_mb = args.image_mb or (24.0 if args.quick else 200.0)
    args.wan_mb = args.wan_mb or (10 if args.quick else 25)
    if args.runs < 1 or args.layers < 1 or args.image_mb <= 0:
        parser.error("--runs, --layers and --image-mb must be positive")
    try:
        return run(args)
    except (WanUnavailable, WanError) as exc:
        print(f"FAIL: simulated WAN: {exc}", file=sys.stderr)
        return 2
    except (CheckFailed, DevstackError) as exc:
        print(f"FAIL: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
