"""A pull-through cache at the secondary vs. geo-route (issue 5, scenario f).

Everything is real and private to the run: the development stack (``geo_route.devstack``) in a
temporary directory, by default with the PRIMARY registry behind ``benchmarks/wan`` (100 Mbit/s,
80 ms RTT, as in ``benchmarks/pulls.py``; ``--no-wan`` keeps it on loopback), plus the alternative a
secondary site could run instead of geo-route: CNCF Distribution 2.8 (the same ``docker-registry``
binary) in proxy mode, ``proxy: {remoteurl: <primary URL as NGINX sees it>, username, password}``
with the devstack user's credentials, itself without auth, on a free loopback port, storage in a
temporary directory.

The image (``--image-mb`` in ``--layers`` layers, incompressible) is pushed straight to the
primary's own port and replicated to the secondary's registry (GitLab Geo's job). Then, timing each
whole ``skopeo copy docker://... oci:DIR:tag`` into a fresh directory, ``--runs`` times:

* proxy cold: the first pull through a freshly started proxy (empty storage);
* proxy warm: the second pull through the same proxy;
* geo-route: the replicated pull through the secondary URL (every image request must be routed
  ``local`` in NGINX's access log).

Then the tag is MOVED on the primary (another image pushed to the same tag, straight to the primary)
and, without waiting for anything, the tag is pulled once through the (warm) proxy and once through
geo-route. Reported: which digest each served, the old or the new one, and whether geo-route's index
had already pinned the new digest when its pull started. geo-route must serve the new digest (a
check); for the proxy the table only says what happened.

Exit status: 0 when every check passed, 1 when a check failed, 2 when the setup failed (e.g. no WAN).

Usage (as root unless --no-wan: the WAN needs network namespaces and tc):
    .venv/bin/python benchmarks/peer_cache.py [--quick] [--runs N] [--image-mb M] [--layers L] [--no-wan]
        [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from wan.link import WanError, WanFront, WanUnavailable

from geo_route.devstack.client import StackClient, started_stack
from geo_route.devstack.images import build_oci_image
from geo_route.devstack.processes import LOOPBACK, LoggedProcess, fetch, free_port, require_binary, start_until_ready
from geo_route.devstack.registry import registry_environment
from geo_route.devstack.skopeo import Credentials, Skopeo, docker_reference
from geo_route.errors import DevstackError
from geo_route.index.model import IndexQuery, QueryKind

REPOSITORY = "bench/peer"
TAG = "v1"
RATE_MBIT = 100.0
RTT_MS = 80.0
SKOPEO_TIMEOUT = 1800.0


class CheckFailed(Exception):
    pass


@dataclass
class Timings:
    name: str
    seconds: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seconds": self.seconds,
            "median": statistics.median(self.seconds),
            "min": min(self.seconds),
            "max": max(self.seconds),
        }


def start_proxy(directory: Path, remote_url: str, credentials: Credentials) -> tuple[LoggedProcess, str]:
    """Distribution 2.8 as a pull-through cache of ``remote_url``; no auth of its own. Returns (process, address)."""
    storage = directory / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text", "fields": {"service": "proxy"}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": f"{LOOPBACK}:{port}", "headers": {"X-Content-Type-Options": ["nosniff"]}},
        "health": {"storagedriver": {"enabled": False}},
        "proxy": {"remoteurl": remote_url, "username": credentials.username, "password": credentials.password},
    }
    path = directory / "proxy.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    path.chmod(0o600)
    address = f"{LOOPBACK}:{port}"
    argv = [require_binary("docker-registry"), "serve", str(path)]
    ready = lambda: fetch(f"http://{address}/v2/").status == 200  # noqa: E731
    return start_until_ready(argv, directory, "proxy", ready, env=registry_environment()), address


class Bench:
    def __init__(self, client: StackClient, root: Path) -> None:
        self.client = client
        self.root = root
        self.count = 0
        self.problems: list[str] = []

    def pull(self, address: str, credentials: Credentials | None) -> tuple[str, float]:
        self.count += 1
        layout = self.root / f"pull-{self.count}"
        layout.mkdir(parents=True)
        started = time.monotonic()
        digest = self.client.skopeo.copy(
            docker_reference(address, REPOSITORY, TAG), f"oci:{layout}:{TAG}", src_creds=credentials
        )
        seconds = time.monotonic() - started
        shutil.rmtree(layout)
        return digest, seconds

    def georoute_pull(self, expected_digest: str, timings: Timings | None) -> tuple[str, dict[str, int]]:
        offset = self.client.access_log_offset()
        digest, seconds = self.pull(self.client.secondary, self.client.credentials())
        routes: dict[str, int] = {}
        for entry in self.client.access_log(offset):
            if entry.uri.startswith(f"/v2/{REPOSITORY}/"):
                key = f"{entry.method} {'manifest' if '/manifests/' in entry.uri else 'blob'} {entry.route}"
                routes[key] = routes.get(key, 0) + 1
                if entry.route != "local" or entry.status != 200:
                    self.problems.append(f"geo-route pull: {entry.method} {entry.uri} -> {entry.route} {entry.status}")
        if timings is not None:
            timings.seconds.append(seconds)
        if digest != expected_digest:
            self.problems.append(f"geo-route pull served {digest}, expected {expected_digest}")
        return digest, routes


def run(args: argparse.Namespace) -> int:
    layer_bytes = int(args.image_mb * 1_000_000 / args.layers)
    results: dict[str, Any] = {
        "config": {
            "image_mb": args.image_mb,
            "layers": args.layers,
            "runs": args.runs,
            "wan": None if args.no_wan else {"rate_mbit": RATE_MBIT, "rtt_ms": RTT_MS},
        }
    }
    wall = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="geo-route-peer-") as temporary, contextlib.ExitStack() as owned:
        root = Path(temporary)
        front = WanFront(owned, rate_mbit=RATE_MBIT, rtt_ms=RTT_MS)
        started = time.monotonic()
        client = owned.enter_context(started_stack(root / "stack", primary_front=None if args.no_wan else front))
        client.skopeo = Skopeo(root / "skopeo", timeout=SKOPEO_TIMEOUT)
        primary_own = front.direct or client.primary
        where = f"behind the WAN ({front.wan.describe()})" if front.wan else "on loopback (no WAN)"
        print(f"stack up in {time.monotonic() - started:.1f} s; primary {client.primary} {where}")

        old = build_oci_image(root / "image", TAG, variant="old", layer_count=args.layers, layer_bytes=layer_bytes)
        new = build_oci_image(root / "image-new", TAG, variant="new", layer_count=args.layers, layer_bytes=layer_bytes)
        image_bytes = old.config.size + sum(layer.size for layer in old.layers)
        print(
            f"image: {len(old.layers)} layers, {image_bytes / 1e6:.1f} MB blobs;"
            f" old {old.digest[:19]}, new {new.digest[:19]}"
        )
        creds = client.credentials()
        pushed = client.skopeo.copy(old.reference, docker_reference(primary_own, REPOSITORY, TAG), dest_creds=creds)
        if pushed != old.digest:
            raise CheckFailed(f"pushed {pushed}, built {old.digest}")
        client.wait_for_pin(REPOSITORY, TAG, old.digest)
        started = time.monotonic()
        client.replicate(REPOSITORY, [TAG])
        print(f"pushed to the primary; replicated (and indexed) in {time.monotonic() - started:.1f} s")

        bench = Bench(client, root / "pulls")
        cold, warm, georoute = Timings("proxy cold (1st pull)"), Timings("proxy warm (2nd pull)"), Timings("geo-route")
        proxy: LoggedProcess | None = None
        proxy_address = ""
        for index in range(args.runs):
            if proxy is not None:
                proxy.stop()
            proxy, proxy_address = start_proxy(root / f"proxy-{index}", client.info.primary_url, creds)
            owned.callback(proxy.stop)
            for timings in (cold, warm):
                digest, seconds = bench.pull(proxy_address, None)
                timings.seconds.append(seconds)
                if digest != old.digest:
                    bench.problems.append(f"{timings.name} run {index + 1}: served {digest}, expected {old.digest}")
            bench.georoute_pull(old.digest, georoute)
            print(
                f"run {index + 1}: proxy cold {cold.seconds[-1]:.2f} s, warm {warm.seconds[-1]:.2f} s,"
                f" geo-route {georoute.seconds[-1]:.2f} s",
                flush=True,
            )

        # Move the tag on the primary, then pull it at once through the warm proxy and through geo-route.
        moved_at = time.monotonic()
        pushed = client.skopeo.copy(new.reference, docker_reference(primary_own, REPOSITORY, TAG), dest_creds=creds)
        if pushed != new.digest:
            raise CheckFailed(f"pushed {pushed}, built {new.digest}")
        push_seconds = time.monotonic() - moved_at
        assert proxy is not None
        proxy_digest, proxy_seconds = bench.pull(proxy_address, None)
        pin_before = client.index.lookup(IndexQuery(QueryKind.TAG, REPOSITORY, TAG)).pinned_digest
        offset = client.access_log_offset()
        geo_digest, geo_seconds = bench.pull(client.secondary, creds)
        geo_routes: dict[str, int] = {}
        for entry in client.access_log(offset):
            if entry.uri.startswith(f"/v2/{REPOSITORY}/"):
                key = f"{entry.method} {'manifest' if '/manifests/' in entry.uri else 'blob'} {entry.route}"
                geo_routes[key] = geo_routes.get(key, 0) + 1
        if geo_digest != new.digest:
            bench.problems.append(f"after the tag moved, geo-route served {geo_digest}, new is {new.digest}")

        def which(digest: str) -> str:
            return "NEW" if digest == new.digest else "OLD" if digest == old.digest else f"other {digest[:19]}"

        print()
        header = f"{'pull':<24} {'median s':>9} {'min-max s':>13}  {'Mbit/s':>7}"
        print(header)
        print("-" * len(header))
        for timings in (cold, warm, georoute):
            s = timings.summary()
            rate = image_bytes * 8 / s["median"] / 1e6
            print(f"{timings.name:<24} {s['median']:9.2f} {s['min']:6.2f}-{s['max']:<6.2f}  {rate:7.1f}")
        print()
        print(f"tag moved on the primary (push took {push_seconds:.2f} s), then pulled at once:")
        print(f"  through the proxy     {which(proxy_digest):<4} {proxy_digest[:19]}  ({proxy_seconds:.2f} s)")
        pinned = "new" if pin_before == new.digest else "old" if pin_before == old.digest else repr(pin_before)
        print(
            f"  through geo-route     {which(geo_digest):<4} {geo_digest[:19]}  ({geo_seconds:.2f} s; index pin at"
            f" pull start: {pinned}; routes: {', '.join(f'{k} {v}' for k, v in sorted(geo_routes.items()))})"
        )
        results["image"] = {"bytes": image_bytes, "layers": len(old.layers), "old": old.digest, "new": new.digest}
        results["pulls"] = [t.summary() for t in (cold, warm, georoute)]
        results["moved_tag"] = {
            "push_seconds": push_seconds,
            "proxy": {"digest": proxy_digest, "served": which(proxy_digest), "seconds": proxy_seconds},
            "georoute": {
                "digest": geo_digest,
                "served": which(geo_digest),
                "seconds": geo_seconds,
                "index_pin_at_pull_start": pin_before,
                "routes": geo_routes,
            },
        }
        results["problems"] = bench.problems
    results["wall_seconds"] = time.monotonic() - wall
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wall time {results['wall_seconds']:.1f} s; stack and proxy stopped{', WAN removed' if front.wan else ''}")
    for problem in bench.problems:
        print(f"CHECK FAILED: {problem}")
    if bench.problems:
        return 1
    print("checks passed (digests, geo-route routes, geo-route served the moved tag's new digest)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="8 MB image, 1 run")
    parser.add_argument("--runs", type=int, default=None, help="cold/warm/geo-route pulls (default 3, quick 1)")
    parser.add_argument("--image-mb", type=float, default=None, help="image size in MB (default 100, quick 8)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--no-wan", action="store_true", help="the primary on loopback, no simulated WAN")
    parser.add_argument("--json", default="", help="write the results to this file")
    args = parser.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    args.image_mb = args.image_mb or (8.0 if args.quick else 100.0)
    if args.runs < 1 or args.layers < 1 or args.image_mb <= 0:
        parser.error("--runs, --layers and --image-mb must be positive")
    try:
        return run(args)
    except (WanUnavailable, WanError) as exc:
        print(f"FAIL: simulated WAN: {exc}", file=sys.stderr)
        return 2
    except (CheckFailed, DevstackError, TimeoutError) as exc:
        print(f"FAIL: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
