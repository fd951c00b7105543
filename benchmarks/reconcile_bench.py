"""How fast reconciliation rebuilds an empty index from the local registry.

Everything is real and private to the run: the development stack (``geo_route.devstack``: redis,
the token service, primary and secondary docker-registry 2.8, the auth service, NGINX) in a
temporary directory. The stack's updater is stopped first, so no notification touches the index
and the run measures reconciliation alone.

Setup (timed and printed): ``--manifests`` distinct OCI image manifests spread over
``--repositories`` repositories, pushed over HTTP straight into both registries (the local registry
as replication would leave it; the primary so its tag HEADs answer 200). Every manifest has its own
small config blob and shares one small layer with the other manifests of its repository, so a run
reads N manifests, HEADs N + R blobs on the local registry and N tags on the primary.

Then the index is flushed and ``reconcile`` runs once on the empty index ("cold": everything is
added) and once more on the full one ("warm": everything is confirmed, nothing written).

The target (issue 4): a cold run over 1,000 manifests within 30 s on a 2-core machine, i.e. at
least 33.3 manifests/s. Exit status: 0 when both runs completed without errors and with the
expected counts (whether or not the target is met), 1 when they did not, 2 when the setup failed.

Usage:
    .venv/bin/python benchmarks/reconcile_bench.py [--manifests 1000] [--repositories 10] [--concurrency N]
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import http.client
import json
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # geo_route from the checkout

import redis
from benchlib.cpu import sample_cpu_seconds

from geo_route.config import Settings, load_settings
from geo_route.devstack.stack import RunningStack, StackInfo, bring_up
from geo_route.updater.reconcile import open_store, reconcile
from geo_route.updater.reconcile_report import ReconcileReport

TARGET_SECONDS_PER_1000 = 30.0
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
PUSH_THREADS = 8


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifests", type=int, default=1000, help="distinct manifests (and tags) in total")
    parser.add_argument("--repositories", type=int, default=10, help="repositories they are spread over")
    parser.add_argument("--concurrency", type=int, default=0, help="requests in flight (default: the setting, 4)")
    arguments = parser.parse_args(argv)
    if arguments.manifests < 1 or arguments.repositories < 1:
        parser.error("--manifests and --repositories must be at least 1")
    return arguments


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Content:
    """One repository's share of the images: a shared layer, then a config and a manifest per tag."""

    repository: str
    layer: bytes
    images: list[tuple[str, bytes, bytes]]  # (tag, config, manifest)


def make_content(repository: str, count: int) -> Content:
    layer = gzip.compress(hashlib.shake_256(repository.encode()).digest(2048), mtime=0)
    images = []
    for number in range(count):
        config = json.dumps(
            {"architecture": "amd64", "os": "linux", "config": {"Labels": {"n": str(number)}}, "rootfs": {}},
            sort_keys=True,
        ).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": digest_of(config), "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER, "digest": digest_of(layer), "size": len(layer)}],
        }
        images.append((f"t{number:05d}", config, json.dumps(manifest, sort_keys=True).encode()))
    return Content(repository, layer, images)


class Pusher:
    """Blob uploads (POST + PUT) and manifest PUTs to one registry, one keep-alive connection per thread."""

    def __init__(self, origin: str, token_for: Callable[[str], str]) -> None:
        parts = urlsplit(origin)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port
        self.token_for = token_for
        self.local = threading.local()

    def send(
        self, method: str, target: str, repository: str, body: bytes = b"", content_type: str = ""
    ) -> tuple[int, str]:
        connection = getattr(self.local, "connection", None)
        if connection is None:
            connection = self.local.connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
        headers = {"Authorization": f"Bearer {self.token_for(repository)}", "Content-Length": str(len(body))}
        if content_type:
            headers["Content-Type"] = content_type
        connection.request(method, target, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status, response.getheader("Location") or ""

    def push_blob(self, repository: str, data: bytes) -> None:
        status, location = self.send("POST", f"/v2/{repository}/blobs/uploads/", repository)
        if status != 202:
            raise RuntimeError(f"upload start for {repository}: HTTP {status}")
        parts = urlsplit(location)
        target = f"{parts.path}?{parts.query}&digest={digest_of(data)}"
        status, _ = self.send("PUT", target, repository, data, "application/octet-stream")
        if status != 201:
            raise RuntimeError(f"blob upload to {repository}: HTTP {status}")

    def push_manifest(self, repository: str, tag: str, manifest: bytes) -> None:
        status, _ = self.send("PUT", f"/v2/{repository}/manifests/{tag}", repository, manifest, OCI_MANIFEST)
        if status != 201:
            raise RuntimeError(f"manifest {repository}:{tag}: HTTP {status}")


def token_source(info: StackInfo) -> Callable[[str], str]:
    """Push tokens from the stack's token service (cached per repository; the setup is short)."""
    basic = base64.b64encode(f"{info.username}:{info.password}".encode()).decode()
    cache: dict[str, str] = {}
    lock = threading.Lock()

    def token_for(repository: str) -> str:
        with lock:
            if repository not in cache:
                url = f"{info.token_realm}?service=container_registry&scope=repository:{repository}:pull,push"
                request = urllib.request.Request(url, headers={"Authorization": f"Basic {basic}"})
                with urllib.request.urlopen(request, timeout=10) as answer:
                    cache[repository] = str(json.loads(answer.read())["token"])
            return cache[repository]

    return token_for


def fill_registries(info: StackInfo, contents: list[Content]) -> None:
    tokens = token_source(info)
    pushers = [Pusher(info.local_registry_url, tokens), Pusher(info.primary_url, tokens)]
    with ThreadPoolExecutor(PUSH_THREADS) as pool:
        list(pool.map(lambda job: job[0].push_blob(job[1].repository, job[1].layer), jobs(pushers, contents)))
        uploads = [(p, c.repository, image) for p, c in jobs(pushers, contents) for image in c.images]
        list(pool.map(lambda job: job[0].push_blob(job[1], job[2][1]), uploads))
        list(pool.map(lambda job: job[0].push_manifest(job[1], job[2][0], job[2][2]), uploads))


def jobs(pushers: list[Pusher], contents: list[Content]) -> list[tuple[Pusher, Content]]:
    return [(pusher, content) for pusher in pushers for content in contents]


def spread(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


@contextmanager
def running_stack(directory: Path) -> Iterator[RunningStack]:
    stack = bring_up(directory / "stack")
    try:
        stack.stop_part("updater")
        yield stack
    finally:
        stack.stop()


def timed_reconcile(
    settings: Settings, stack: RunningStack, concurrency: int | None
) -> tuple[ReconcileReport, dict[str, float]]:
    store = open_store(settings)
    pids = {name: stack.processes[name].pid for name in ("secondary", "primary", "redis")}
    before, cpu_before = sample_cpu_seconds(pids), time.process_time()
    started = time.monotonic()
    try:
        report = reconcile(
            settings, store, progress=lambda p: print(f"    {p.format()}"), concurrency=concurrency, progress_every=200
        )
    finally:
        store.close()
    elapsed = time.monotonic() - started
    after = sample_cpu_seconds(pids)
    shares = {name: 100 * (after[name] - before[name]) / elapsed for name in pids}
    shares["reconcile (this process)"] = 100 * (time.process_time() - cpu_before) / elapsed
    return report, shares


def check_counts(report: ReconcileReport, manifests: int, repositories: int, cold: bool) -> list[str]:
    problems = [] if report.ok else [f"the run was not clean: {report.error_samples or report.format()}"]
    expected_added = (manifests, manifests + repositories, manifests) if cold else (0, 0, 0)
    added = (report.manifests.added, report.blobs.added, report.local_tags.added)
    seen = (report.manifests.seen, report.blobs.seen, report.local_tags.seen)
    if seen != (manifests, manifests + repositories, manifests):
        problems.append(
            f"seen (manifests, blobs, tags) = {seen}, expected {(manifests, manifests + repositories, manifests)}"
        )
    if added != expected_added:
        problems.append(f"added (manifests, blobs, tags) = {added}, expected {expected_added}")
    if report.primary_tags.refreshed != manifests:
        problems.append(f"primary tags confirmed {report.primary_tags.refreshed}, expected {manifests}")
    return problems


def print_run(label: str, report: ReconcileReport, shares: dict[str, float], manifests: int) -> None:
    rate = manifests / report.seconds if report.seconds else 0.0
    print(f"  {label}: {report.seconds:.2f} s, {rate:.0f} manifests/s")
    print("    " + report.format().replace("\n", "\n    "))
    print("    CPU (% of one core): " + ", ".join(f"{name} {share:.0f}" for name, share in shares.items()))


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    manifests, repositories = arguments.manifests, min(arguments.repositories, arguments.manifests)
    concurrency = arguments.concurrency or None
    directory = Path(tempfile.mkdtemp(prefix="geo-route-reconcile-bench-"))
    try:
        started = time.monotonic()
        with running_stack(directory) as stack:
            print(f"stack up in {time.monotonic() - started:.1f} s ({directory})")
            settings = load_settings(stack.info.site_file, environ={})
            contents = [make_content(f"bench/r{i:03d}", n) for i, n in enumerate(spread(manifests, repositories))]
            started = time.monotonic()
            try:
                fill_registries(stack.info, contents)
            except (OSError, RuntimeError, http.client.HTTPException) as exc:
                print(f"setup failed: {exc}", file=sys.stderr)
                return 2
            setup = time.monotonic() - started
            print(
                f"setup: {manifests} manifests in {repositories} repositories, pushed to both registries: {setup:.1f} s"
            )
            with redis.Redis.from_url(stack.info.redis_url) as connection:
                connection.flushdb()
            workers = concurrency or settings.updater.reconcile_concurrency
            print(f"reconcile with concurrency {workers}:")
            cold, cold_cpu = timed_reconcile(settings, stack, concurrency)
            print_run("cold (empty index)", cold, cold_cpu, manifests)
            warm, warm_cpu = timed_reconcile(settings, stack, concurrency)
            print_run("warm (full index)", warm, warm_cpu, manifests)
        problems = check_counts(cold, manifests, repositories, True) + check_counts(
            warm, manifests, repositories, False
        )
        target = TARGET_SECONDS_PER_1000 * manifests / 1000
        verdict = "meets" if cold.seconds <= target else "MISSES"
        print(f"result: cold run {cold.seconds:.2f} s for {manifests} manifests {verdict} the target of {target:.1f} s")
        for problem in problems:
            print(f"error: {problem}")
        return 1 if problems else 0
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
