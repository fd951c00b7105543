"""Local pull latency during an unauthenticated request flood (issue 11, item 4).

Everything is real and private to the run: the development stack (``geo_route.devstack``: redis, the
token service, both docker-registry 2.8, the auth service, NGINX) in a temporary directory, with the
site's default edge settings except the descriptor limit (the devstack's hard limit). An image is
pushed through the site and replicated, so its pulls are served locally. Then, for each phase, a
puller measures whole replicated pulls through the site, one after another on a fresh connection
each (a manifest GET by tag, then every blob GET, with a pull token), while ``wrk`` floods the site
with requests that carry no token: each one a 401 decided by the auth service until the address has
had ``nginx.per_address_denials_burst`` of them (500), then at most ``nginx.per_address_denials`` a
second (50); the rest NGINX answers 429 itself, after a 1 s pause, without asking the service (and
429 at once past ``nginx.per_address_connections`` requests in progress):

* no flood;
* flood: ``--connections`` wrk connections (default 64, under the per-address cap);
* flood past the cap: ``--over-cap`` connections (default 2,000 > 1,024).

``--bad-token`` floods with ``Authorization: Bearer`` and a token that does not verify (each one
a 401 too; such requests count once denied, or from their start once the address is past half its
burst). ``--denials 0`` turns the denial limit off (the edge before it: every request of the flood cost an
auth subrequest, and past the cap its 1,024 requests in progress were as many decisions queued ahead
of every other client's).

The puller connects from 127.0.0.2, the flood from 127.0.0.1: two clients, each with its own cap.

Printed per phase: pulls, p50/p99/max pull time, failed pulls, and the flood's requests/s and status
mix (from NGINX's counters). Exit status 0 when every pull succeeded, 1 otherwise.

Usage:
    .venv/bin/python benchmarks/flood.py [--quick] [--seconds S] [--connections C] [--over-cap C]
        [--per-address C] [--denials N] [--bad-token] [--json FILE]
"""

from __future__ import annotations

import argparse
import http.client
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from geo_route.devstack.client import StackClient, started_stack
from geo_route.devstack.images import OciImage, build_oci_image

REPOSITORY = "bench/flood"
TAG = "v1"
FLOOD_PATH = f"/v2/{REPOSITORY}/manifests/{TAG}"
# The puller is another client than the flood (wrk connects from 127.0.0.1): the per-address cap
# is the flood's, not the puller's.
PULLER_ADDRESS = "127.0.0.2"
BAD_TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJmbG9vZCJ9.c2lnbmF0dXJl"  # well formed, signed by no trusted key
MANIFEST_TYPES = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"


@dataclass(frozen=True)
class PhaseResult:
    phase: str
    flood_connections: int
    pulls: int
    failed_pulls: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    flood_requests_per_s: float
    flood_statuses: dict[str, float]


def pull_once(address: str, image: OciImage, token: str) -> bool:
    """A whole pull on one fresh connection: the manifest by tag, then every blob; True if all were 200."""
    connection = http.client.HTTPConnection(address, timeout=30, source_address=(PULLER_ADDRESS, 0))
    headers = {"Authorization": f"Bearer {token}"}
    try:
        paths = [(f"/v2/{REPOSITORY}/manifests/{TAG}", {**headers, "Accept": MANIFEST_TYPES})]
        paths += [(f"/v2/{REPOSITORY}/blobs/{digest}", headers) for digest in image.blob_digests]
        for path, request_headers in paths:
            connection.request("GET", path, headers=request_headers)
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                return False
        return True
    except OSError:
        return False
    finally:
        connection.close()


def measure_pulls(address: str, image: OciImage, token: str, seconds: float) -> tuple[list[float], int]:
    times, failed = [], 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        if pull_once(address, image, token):
            times.append((time.perf_counter() - started) * 1000)
        else:
            failed += 1
    return times, failed


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def flood_counts(client: StackClient) -> dict[str, float]:
    """NGINX's request counters by status class for requests it answered itself or after a 401."""
    metrics = client.nginx_metrics()
    prefix = 'geo_route_nginx_requests_total{route="none",status="'
    return {key[len(prefix) : -2]: value for key, value in metrics.items() if key.startswith(prefix)}


def run_phase(
    client: StackClient,
    image: OciImage,
    token: str,
    phase: str,
    connections: int,
    seconds: float,
    flood_headers: tuple[str, ...] = (),
) -> PhaseResult:
    address = client.secondary
    before = flood_counts(client)
    flood: subprocess.Popen[str] | None = None
    if connections:
        threads = str(min(2, connections))
        argv = ["wrk", "-t", threads, "-c", str(connections), "-d", f"{seconds + 2:g}s", "--timeout", "10s"]
        argv += [argument for header in flood_headers for argument in ("-H", header)]
        flood = subprocess.Popen([*argv, f"http://{address}{FLOOD_PATH}"], stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)  # the flood is at full strength before the first pull
    counted_from = time.monotonic()
    times, failed = measure_pulls(address, image, token, seconds)
    elapsed = time.monotonic() - counted_from
    after = flood_counts(client)
    if flood is not None:
        flood.communicate(timeout=seconds + 30)
    statuses = {status: after.get(status, 0) - before.get(status, 0) for status in after}
    return PhaseResult(
        phase=phase,
        flood_connections=connections,
        pulls=len(times),
        failed_pulls=failed,
        p50_ms=round(statistics.median(times), 2) if times else float("nan"),
        p99_ms=round(percentile(times, 0.99), 2),
        max_ms=round(max(times), 2) if times else float("nan"),
        flood_requests_per_s=round(sum(statuses.values()) / elapsed, 1),
        flood_statuses={status: count for status, count in statuses.items() if count},
    )


def print_result(result: PhaseResult) -> None:
    mix = ", ".join(f"{status}: {count:.0f}" for status, count in sorted(result.flood_statuses.items())) or "-"
    print(
        f"{result.phase:<24} {result.flood_connections:>6} {result.pulls:>6} {result.failed_pulls:>6} "
        f"{result.p50_ms:>8.1f} {result.p99_ms:>8.1f} {result.max_ms:>8.1f} {result.flood_requests_per_s:>9.0f}  {mix}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per phase")
    parser.add_argument("--connections", type=int, default=64, help="flood connections (under the cap)")
    parser.add_argument("--over-cap", type=int, default=2000, help="flood connections past the per-address cap")
    parser.add_argument("--per-address", type=int, help="nginx.per_address_connections (default: the site default)")
    parser.add_argument("--denials", type=int, help="nginx.per_address_denials (default: the site default; 0: off)")
    parser.add_argument("--bad-token", action="store_true", help="the flood sends a token that does not verify")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--layer-kib", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="5 s phases")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed (script/bootstrap installs it)", file=sys.stderr)
        return 2
    seconds = 5.0 if args.quick else args.seconds
    nginx: dict[str, int] = {}
    if args.per_address is not None:
        nginx["per_address_connections"] = args.per_address
    if args.denials is not None:
        nginx["per_address_denials"] = args.denials
    overrides = {"nginx": nginx} if nginx else {}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # wrk inherits it: --over-cap connections need as many descriptors
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with (
        tempfile.TemporaryDirectory(prefix="geo-route-flood-") as temporary,
        started_stack(Path(temporary) / "stack", site_overrides=overrides) as client,
    ):
        image = build_oci_image(
            Path(temporary) / "image", TAG, variant="flood", layer_count=args.layers, layer_bytes=args.layer_kib * 1024
        )
        client.push(image, REPOSITORY, TAG)
        client.replicate(REPOSITORY, [TAG])
        token = client.token(f"repository:{REPOSITORY}:pull")
        pull_once(client.secondary, image, token)  # warm: connections, decision paths
        flood_headers = (f"Authorization: Bearer {BAD_TOKEN}",) if args.bad_token else ()
        print(
            f"replicated pulls of {REPOSITORY}:{TAG} ({args.layers} x {args.layer_kib} KiB) through the site, "
            f"{seconds:g} s per phase; flood: GET {FLOOD_PATH} "
            f"{'with a bad' if args.bad_token else 'without a'} token (wrk)"
        )
        print(f"{'phase':<24} {'flood':>6} {'pulls':>6} {'failed':>6} {'p50 ms':>8} {'p99 ms':>8}", end="")
        print(f" {'max ms':>8} {'flood/s':>9}  flood statuses")
        results = []
        for phase, connections in (("no flood", 0), ("flood", args.connections), ("flood past the cap", args.over_cap)):
            result = run_phase(client, image, token, phase, connections, seconds, flood_headers)
            print_result(result)
            results.append(result)
    if args.json:
        args.json.write_text(json.dumps([asdict(result) for result in results], indent=2) + "\n")
    return 0 if all(result.failed_pulls == 0 for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
