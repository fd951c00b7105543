"""The pull storm (issue 15, item 3): many clients, each with its own token, pull one image at once.

As kubelets do when a deployment rolls out: ``--clients`` (200) clients each get their own pull
token from the development stack's token service (``StackClient.token``: 200 distinct tokens, so
neither NGINX's decision cache nor the service's token cache can answer one client from another's
work), then all pull the same image at the same moment: through the site (``site``: manifests and
blobs from the local registry), through a second node of the same site with
``local_registry.storage_root`` (``site-storage``: NGINX answers manifests and blobs from the
registry's files), and straight at the local registry, each with fresh tokens. Rounds alternate the
order (reversed every other round); each side's figures are the medians over the rounds.

The client performs the registry pull protocol for real, with the token on every request: ``GET``
the manifest by tag (the ``Accept`` a container runtime sends), then ``GET`` the config and every
layer blob, reading every byte and checking each digest (SHA-256), over one kept-alive connection
per client (blobs one after another). It is NOT skopeo: 200 skopeo processes on 2 cores would
measure skopeo's start-up (a Go binary, its TLS and policy set-up, its temporary files) and the
kernel's scheduling of 200 processes rather than the site. Instead ``--processes`` (4) Python
processes, forked and each holding its share of the clients as threads, are started and idle
before the storm; every thread sleeps until one common start instant (``CLOCK_MONOTONIC``, shared by
the processes) and times its own pull from there to its last byte. Start-up is not measured; what
the client costs (HTTP parsing, hashing: hashlib and socket reads release the GIL) is the same on
both sides.

Reported: p50, p99 and max pull time and the storm's wall time for each side, the ratio of the
p99s (target: site <= 1.2x direct), and the CPU the auth service (its gunicorn master and workers,
from /proc) used during the site's storm: in all, per pull, and per request. NGINX's and the
registry's CPU are shown too. Checks: every pull completed with the right digests, and NGINX logged
every request of the site's storm as ``local``/200.

Usage:
    .venv/bin/python benchmarks/pull_storm.py [--clients 200] [--rounds 3] [--layers 4]
        [--layer-bytes 1048576] [--processes 4] [--quick] [--json FILE]

Exit status: 0 when every check passed (whether or not the target is met), 1 when a check failed,
2 when the setup failed.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import multiprocessing
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib, also when imported from elsewhere

from benchlib.common import BenchError

from geo_route.devstack.client import StackClient, started_stack
from geo_route.devstack.images import OciImage, build_oci_image
from geo_route.devstack.processes import cpu_seconds
from geo_route.devstack.skopeo import docker_reference
from geo_route.errors import DevstackError

REPOSITORY = "bench/storm"
TAG = "v1"
ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    )
)
TARGET_P99_RATIO = 1.2
START_DELAY = 2.0  # seconds from handing out the work to the common start (every thread is waiting by then)
READ_CHUNK = 1 << 20
CLIENT_TIMEOUT = 120.0
SIDES = ("site", "site-storage", "direct")
STORAGE = "site-storage"  # a node with local_registry.storage_root: manifests and blobs answered by NGINX
BEFORE = "site-before"  # --before: a node with the auth transport of before issue 15 (sync workers, TCP)
BEFORE_OVERRIDES = {"server": {"worker_class": "sync", "bind": ["127.0.0.1:0"]}}


@dataclass(frozen=True)
class PullJob:
    """What every client pulls, and from where."""

    address: str
    repository: str
    tag: str
    manifest_digest: str
    blobs: tuple[str, ...]


@dataclass
class PullResult:
    seconds: float
    ok: bool
    error: str = ""
    requests: int = 0
    bytes: int = 0


@dataclass
class StormResult:
    side: str
    pulls: list[PullResult]
    wall_seconds: float
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # component -> CPU seconds during the storm
    routes: dict[str, int] = field(default_factory=dict)

    def times(self) -> list[float]:
        return sorted(pull.seconds for pull in self.pulls if pull.ok)

    def percentile(self, fraction: float) -> float:
        times = self.times()
        if not times:
            return 0.0
        return times[min(len(times) - 1, max(0, round(fraction * len(times)) - 1))]

    @property
    def failures(self) -> int:
        return sum(not pull.ok for pull in self.pulls)

    def summary(self) -> dict[str, Any]:
        requests = sum(pull.requests for pull in self.pulls) or 1
        pulls = len(self.pulls) or 1
        return {
            "p50": self.percentile(0.50),
            "p99": self.percentile(0.99),
            "max": self.percentile(1.0),
            "wall_seconds": self.wall_seconds,
            "failures": self.failures,
            "cpu_seconds": self.cpu_seconds,
            "cpu_ms_per_pull": {part: 1e3 * value / pulls for part, value in self.cpu_seconds.items()},
            "cpu_us_per_request": {part: 1e6 * value / requests for part, value in self.cpu_seconds.items()},
            "requests": requests,
            "bytes": sum(pull.bytes for pull in self.pulls),
        }


# ------------------------------------------------------------------ the client (runs in the forked processes)


def client_address(number: int) -> str:
    """Client ``number``'s own loopback source address (127.0.1.1, 127.0.1.2, ...; all of 127/8 is
    loopback on Linux): as kubelets on their own machines, so NGINX's per-address memory (refetches,
    per-address caps) sees 200 machines, not one fetching the same blob 200 times."""
    return f"127.0.{1 + number // 250}.{1 + number % 250}"


def pull_once(job: PullJob, token: str, source: str) -> PullResult:
    """The registry pull protocol on one connection: manifest by tag, then each blob, digests checked."""
    host, port = job.address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=CLIENT_TIMEOUT, source_address=(source, 0))
    headers = {"Authorization": f"Bearer {token}"}
    started = time.monotonic()
    result = PullResult(0.0, False)
    try:
        paths = [(f"/v2/{job.repository}/manifests/{job.tag}", job.manifest_digest, {"Accept": ACCEPT})]
        paths += [(f"/v2/{job.repository}/blobs/{digest}", digest, {}) for digest in job.blobs]
        for path, digest, extra in paths:
            result.bytes += fetch_checked(connection, path, digest, {**headers, **extra})
            result.requests += 1
        result.ok = True
    except (OSError, http.client.HTTPException, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        connection.close()
        result.seconds = time.monotonic() - started
    return result


def fetch_checked(connection: http.client.HTTPConnection, path: str, digest: str, headers: dict[str, str]) -> int:
    connection.request("GET", path, headers=headers)
    response = connection.getresponse()
    hasher = hashlib.sha256()
    size = 0
    while chunk := response.read(READ_CHUNK):
        hasher.update(chunk)
        size += len(chunk)
    if response.status != 200:
        raise ValueError(f"GET {path} answered {response.status}")
    if f"sha256:{hasher.hexdigest()}" != digest:
        raise ValueError(f"GET {path}: content does not match {digest}")
    return size


def run_clients(job: PullJob, clients: list[tuple[int, str]], start_at: float) -> list[PullResult]:
    """One process's share of (client number, token): a thread each, all starting at ``start_at``."""
    results: list[PullResult | None] = [None] * len(clients)

    def client(index: int) -> None:
        number, token = clients[index]
        time.sleep(max(0.0, start_at - time.monotonic()))
        results[index] = pull_once(job, token, client_address(number))

    threads = [threading.Thread(target=client, args=(index,)) for index in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [result or PullResult(0.0, False, "no result") for result in results]


# ------------------------------------------------------------------ the storm


class Storm:
    """``processes`` forked client processes, idle until a storm is handed to them."""

    def __init__(self, processes: int) -> None:
        self._pool = multiprocessing.get_context("fork").Pool(processes)
        self._processes = processes

    def run(self, job: PullJob, tokens: list[str]) -> tuple[list[PullResult], float, float]:
        """Every client's result, the storm's wall time and the client processes' CPU seconds."""
        numbered = list(enumerate(tokens))
        shares = [numbered[index :: self._processes] for index in range(self._processes)]
        cpu_before = self.cpu_seconds()
        start_at = time.monotonic() + START_DELAY
        pending = [self._pool.apply_async(run_clients, (job, share, start_at)) for share in shares if share]
        results = [result for handle in pending for result in handle.get(timeout=CLIENT_TIMEOUT * 4)]
        return results, time.monotonic() - start_at, self.cpu_seconds() - cpu_before

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(child.pid, with_descendants=False) for child in multiprocessing.active_children())

    def close(self) -> None:
        self._pool.close()
        self._pool.join()


def publish_image(client: StackClient, root: Path, args: argparse.Namespace) -> OciImage:
    image = build_oci_image(root / "image", TAG, layer_count=args.layers, layer_bytes=args.layer_bytes)
    reference = docker_reference(client.primary, REPOSITORY, TAG)
    pushed = client.skopeo.copy(image.reference, reference, dest_creds=client.credentials())
    if pushed != image.digest:
        raise BenchError(f"pushed {pushed}, built {image.digest}")
    client.wait_for_pin(REPOSITORY, TAG, image.digest)
    client.replicate(REPOSITORY, [TAG])
    return image


def storm_once(
    side: str, access_log: str, storm: Storm, job: PullJob, tokens: list[str], parts: dict[str, int]
) -> StormResult:
    log_offset = Path(access_log).stat().st_size if access_log else 0
    before = {part: cpu_seconds(pid) for part, pid in parts.items()}
    pulls, wall, clients_cpu = storm.run(job, tokens)
    after = {part: cpu_seconds(pid) for part, pid in parts.items()}
    used = {part: after[part] - before[part] for part in parts} | {"clients": clients_cpu}
    result = StormResult(side, pulls, wall, used)
    if access_log:
        time.sleep(0.3)  # NGINX writes a request's line just after its last byte
        result.routes = count_routes(access_log, log_offset)
    return result


def count_routes(access_log: str, offset: int) -> dict[str, int]:
    """``route:reason/status`` of every line NGINX wrote after ``offset``."""
    with open(access_log, "rb") as stream:
        stream.seek(offset)
        lines = stream.read().decode("utf-8").splitlines()
    counts: Counter[str] = Counter()
    for line in lines:
        found = re.search(r'"status":(\d+),.*"route":"([^"]*)","reason":"([^"]*)"', line)
        counts[f"{found.group(2)}:{found.group(3)}/{found.group(1)}" if found else "unparsed"] += 1
    return dict(counts)


def check_storm(result: StormResult, problems: list[str]) -> None:
    """Every pull complete and right; every request local, or sent to the primary only by the fail-safe."""
    if result.failures:
        errors = Counter(pull.error[-160:] for pull in result.pulls if not pull.ok)
        problems.append(f"{result.side}: {result.failures} pulls failed: {dict(errors.most_common(3))}")
    wrong = {key: count for key, count in result.routes.items() if not is_local(key) and not is_fail_safe(key)}
    if wrong:
        problems.append(f"{result.side}: requests neither local nor a fail-safe in NGINX's log: {wrong}")


def is_local(route_key: str) -> bool:
    return route_key.startswith("local:") and route_key.endswith("/200")


def is_fail_safe(route_key: str) -> bool:
    """The decision path's fail-safe (docs/reliability.md): the index did not answer within
    ``redis.socket_timeout`` or the service not within ``nginx.auth_timeout``, so the primary served."""
    return route_key in ("primary:index-unavailable/200", "auth-unavailable:/200")


def not_local(result: StormResult) -> int:
    return sum(count for key, count in result.routes.items() if not is_local(key))


def measure(root: Path, args: argparse.Namespace, problems: list[str]) -> dict[str, list[StormResult]]:
    sides = (*SIDES, BEFORE) if args.before else SIDES
    results: dict[str, list[StormResult]] = {side: [] for side in sides}
    with started_stack(root / "stack") as client:
        assert client.stack is not None
        image = publish_image(client, root, args)
        processes = client.stack.processes
        registry = {"registry": processes["secondary"].pid}
        parts = {
            "site": {"auth": processes["auth"].pid, "nginx": processes["nginx"].pid, **registry},
            "direct": registry,
        }
        addresses = {"site": client.secondary, "direct": client.local_registry}
        logs = {"site": client.info.nginx_access_log}
        storage = Path(client.info.directory) / "secondary" / "storage"
        node = client.stack.add_node({"local_registry": {"storage_root": str(storage)}})
        number = f"-{node.number}"
        parts[STORAGE] = {"auth": processes["auth" + number].pid, "nginx": processes["nginx" + number].pid}
        parts[STORAGE] |= registry  # asked for nothing unless a file is missing
        addresses[STORAGE], logs[STORAGE] = node.secondary_url.split("://", 1)[1], node.nginx_access_log
        if args.before:
            node = client.stack.add_node(BEFORE_OVERRIDES)
            number = f"-{node.number}"
            parts[BEFORE] = {"auth": processes["auth" + number].pid, "nginx": processes["nginx" + number].pid}
            parts[BEFORE] |= registry
            addresses[BEFORE], logs[BEFORE] = node.secondary_url.split("://", 1)[1], node.nginx_access_log
        storm = Storm(args.processes)
        try:
            for round_number in range(args.rounds):
                order = sides if round_number % 2 == 0 else tuple(reversed(sides))
                for side in order:
                    # fresh tokens for every storm: each client its own, none reused across storms either
                    tokens = [client.token(f"repository:{REPOSITORY}:pull") for _ in range(args.clients)]
                    if len(set(tokens)) != len(tokens):
                        raise BenchError("the token service handed out the same token twice")
                    job = PullJob(addresses[side], REPOSITORY, TAG, image.digest, image.blob_digests)
                    result = storm_once(side, logs.get(side, ""), storm, job, tokens, parts[side])
                    check_storm(result, problems)
                    results[side].append(result)
                    print_storm(round_number + 1, result)
        finally:
            storm.close()
    return results


def print_storm(round_number: int, result: StormResult) -> None:
    summary = result.summary()
    cpu = "  ".join(f"{part} {seconds:.2f} s" for part, seconds in result.cpu_seconds.items())
    routed = f"  not local {not_local(result)} of {sum(result.routes.values())}" if result.routes else ""
    print(
        f"round {round_number} {result.side:<12} p50 {summary['p50']:6.2f} s  p99 {summary['p99']:6.2f} s"
        f"  max {summary['max']:6.2f} s  wall {result.wall_seconds:6.2f} s  failed {result.failures}"
        f"  CPU: {cpu}{routed}",
        flush=True,
    )


def median_summary(storms: list[StormResult]) -> dict[str, Any]:
    summaries = [storm.summary() for storm in storms]
    keys = ("p50", "p99", "max", "wall_seconds")
    merged: dict[str, Any] = {key: statistics.median(s[key] for s in summaries) for key in keys}
    for group in ("cpu_seconds", "cpu_ms_per_pull", "cpu_us_per_request"):
        parts = summaries[0][group] if summaries else {}
        merged[group] = {part: statistics.median(s[group][part] for s in summaries) for part in parts}
    merged["failures"] = sum(s["failures"] for s in summaries)
    merged["not_local"] = [not_local(storm) for storm in storms]
    merged["routes"] = [storm.routes for storm in storms]
    merged["requests_per_storm"] = summaries[0]["requests"] if summaries else 0
    merged["bytes_per_storm"] = summaries[0]["bytes"] if summaries else 0
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=None, help="clients per storm (default 200; --quick 50)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of (site, direct) (default 3; --quick 1)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument(
        "--layer-bytes", type=int, default=None, help="bytes per layer (default 1 MiB; --quick 256 KiB)"
    )
    parser.add_argument("--processes", type=int, default=4, help="client processes the clients are spread over")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--before", action="store_true", help=f"also storm a node with the old transport ({BEFORE})")
    parser.add_argument("--json", default="", help="write the results to this file")
    args = parser.parse_args(argv)
    args.clients = args.clients or (50 if args.quick else 200)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.layer_bytes = args.layer_bytes or (256 * 1024 if args.quick else 1024 * 1024)
    wall = time.monotonic()
    problems: list[str] = []
    print(
        f"pull storm: {args.clients} clients with their own tokens, {args.layers} layers of {args.layer_bytes:,} bytes,"
        f" {args.rounds} rounds, client threads in {args.processes} processes, {os.cpu_count()} CPUs shared"
    )
    try:
        with tempfile.TemporaryDirectory(prefix="geo-route-storm-") as temporary:
            results = measure(Path(temporary), args, problems)
    except (BenchError, DevstackError, TimeoutError, multiprocessing.TimeoutError) as exc:
        print(f"FAIL (setup): {exc}", file=sys.stderr)
        return 2
    summaries = {side: median_summary(storms) for side, storms in results.items()}
    site, direct = summaries["site"], summaries["direct"]
    ratio = site["p99"] / direct["p99"] if direct["p99"] else 0.0
    met = 0 < ratio <= TARGET_P99_RATIO
    print(f"\n{'':<12} {'p50 s':>7} {'p99 s':>7} {'max s':>7} {'wall s':>7}   (medians over {args.rounds} rounds)")
    for side, summary in summaries.items():
        print(
            f"{side:<12} {summary['p50']:7.2f} {summary['p99']:7.2f} {summary['max']:7.2f}"
            f" {summary['wall_seconds']:7.2f}"
        )
    auth = site["cpu_seconds"].get("auth", 0.0)
    print(
        f"auth service CPU during the site's storm: {auth:.2f} s ({site['cpu_ms_per_pull'].get('auth', 0):.1f} ms"
        f" per pull, {site['cpu_us_per_request'].get('auth', 0):.0f} us per request)"
    )
    print(f"p99 site/direct {ratio:.2f}x  target <= {TARGET_P99_RATIO}x: {'MET' if met else 'MISSED'}")
    stored = summaries[STORAGE]
    storage_ratio = stored["p99"] / direct["p99"] if direct["p99"] else 0.0
    storage_met = 0 < storage_ratio <= TARGET_P99_RATIO
    print(
        f"p99 {STORAGE}/direct {storage_ratio:.2f}x  target <= {TARGET_P99_RATIO}x:"
        f" {'MET' if storage_met else 'MISSED'} (manifests and blobs answered from storage)"
    )
    wall_seconds = time.monotonic() - wall
    if args.json:
        document = {
            "config": {k: getattr(args, k) for k in ("clients", "rounds", "layers", "layer_bytes", "processes")},
            **summaries,  # "site", "site-storage", "direct" and, with --before, "site-before"
            "ratio_p99": ratio,
            "ratio_p50": site["p50"] / direct["p50"] if direct["p50"] else 0.0,
            "target": TARGET_P99_RATIO,
            "met": met,
            "storage_ratio_p99": storage_ratio,
            "storage_ratio_p50": stored["p50"] / direct["p50"] if direct["p50"] else 0.0,
            "storage_met": storage_met,
            "storms": {side: [asdict(storm) | {"pulls": None} for storm in storms] for side, storms in results.items()},
            "problems": problems,
            "wall_seconds": wall_seconds,
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"wall time {wall_seconds:.1f} s; stack stopped")
    for problem in problems:
        print(f"CHECK FAILED: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
