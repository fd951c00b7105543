"""Part ``refresh`` of resolution_load.py: the updater's HEAD rate for pinned tags, in simulated time.

Real parts: ``RedisIndexStore`` on a real ``redis-server`` with an injected index clock, routing
(``index_query``/``route`` with ``Policy.from_settings``), the ``Resolver`` and reconciliation's pin
refresh (``ReconcileRun.refresh_primary_pins``). The primary is a counting in-memory ``TagSource``:
what is measured is how many questions the updater asks, not how fast they are answered.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import yaml

from benchlib.common import BenchError
from geo_route.config import Settings, load_settings
from geo_route.devstack.redis_server import RedisProcess
from geo_route.index.model import IndexUpdate, LocalTag, ManifestPresence
from geo_route.index.redis_store import RedisIndexStore
from geo_route.operations import Operation, classify_request
from geo_route.routing import Policy, Route, index_query, route
from geo_route.updater.reconcile import ReconcileRun, Registries
from geo_route.updater.reconcile_report import ReconcileReport
from geo_route.updater.registry_client import ManifestHead, RegistryClient
from geo_route.updater.resolver import Resolver

MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"  # every tag's manifest; the reads' Accept
MINUTE = 60.0
# The simulated index clock at t = 0 (unix seconds, year 2065). It must stay ahead of the real one:
# SET_PIN_IF_NEWER_SCRIPT requeues a losing answer at max(Redis TIME, the entry's stamp), reading
# TIME even when the store has an injected clock, and a due time from the real clock would be hours
# ahead of a simulated clock that lags it.
START = 3_000_000_000.0
BATCH_SECONDS = 0.001  # simulated time one resolver batch takes (the real clock moves on between batches)
STORE_TIMEOUT = 10.0  # simulated time: a slow answer on a shared machine must not count as an outage
TAGS_PER_REPOSITORY = 100


class SimulatedClock:
    """The index's clock, moved by the simulation (unix seconds)."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class CountingPrimary:
    """The primary as a ``TagSource``: what each tag (and manifest digest) is, and how often it was asked."""

    def __init__(self, tags: dict[tuple[str, str], ManifestHead]) -> None:
        self.tags = tags
        self.manifests = {(repository, head.digest): head for (repository, _), head in tags.items()}
        self.heads: Counter[str] = Counter()  # "tag" | "digest" -> HEADs
        self._lock = threading.Lock()

    def head_manifest(self, repository: str, reference: str) -> ManifestHead | None:
        by_digest = reference.startswith("sha256:")
        with self._lock:
            self.heads["digest" if by_digest else "tag"] += 1
        return (self.manifests if by_digest else self.tags).get((repository, reference))

    @property
    def total(self) -> int:
        return sum(self.heads.values())


@dataclass
class RefreshResult:
    pinned: int
    hot: int
    seconds: float
    cold: bool = False
    refresher_heads: int = 0
    reconcile_heads: int = 0
    reconcile_heads_by_digest: int = 0  # of reconcile_heads: manifests held here, asked by digest
    reconcile_runs: int = 0
    reads: Counter[str] = field(default_factory=Counter)  # "route/reason" -> count
    primary_reads_after_first: int = 0  # a hot tag read from the primary after a local read of it
    queued_at_end: int = 0
    settings: dict[str, float] = field(default_factory=dict)

    def rate(self, heads: int) -> float:
        return heads / self.seconds


def measure_refresh(pinned: int, hot: int, hours: float, cold: bool, directory: Path) -> RefreshResult:
    redis = RedisProcess(directory / "redis").start()
    try:
        settings = load_settings(write_site_file(directory, redis.url), environ={})
        simulation = Simulation(settings, pinned, hot, hours * 3600.0, cold)
        try:
            return simulation.run()
        finally:
            simulation.close()
    finally:
        redis.stop()


def write_site_file(directory: Path, redis_url: str) -> Path:
    """A site file that leaves routing and the updater at their defaults (no registry is contacted)."""
    (directory / "bundle.pem").write_text("unused: no token is verified here\n", encoding="utf-8")
    site = {
        "local_registry": {"url": "http://127.0.0.1:9"},
        "primary": {"url": "http://127.0.0.1:9"},
        "token": {
            "realm": "http://127.0.0.1:9/",
            "service": "bench",
            "issuer": "bench",
            "rootcertbundle": "bundle.pem",
        },
        "redis": {"url": redis_url},
    }
    path = directory / "site.yaml"
    path.write_text(yaml.safe_dump(site, sort_keys=False), encoding="utf-8")
    return path


def tag_names(count: int) -> list[tuple[str, str]]:
    """``count`` tags, 100 per repository: ``sim/r000:t00`` …"""
    return [(f"sim/r{i // TAGS_PER_REPOSITORY:03d}", f"t{i % TAGS_PER_REPOSITORY:02d}") for i in range(count)]


def digest_of(repository: str, tag: str) -> str:
    return "sha256:" + hashlib.sha256(f"{repository}:{tag}".encode()).hexdigest()


class Simulation:
    """``cold``: no reconciliation at t = 0 (the first one after ``reconcile_interval``), so every tag
    starts unpinned and a hot tag's first read goes to the primary and queues its resolution."""

    def __init__(self, settings: Settings, pinned: int, hot: int, seconds: float, cold: bool) -> None:
        self.updater = settings.updater
        self.clock = SimulatedClock(START)
        self.store = RedisIndexStore(
            dataclasses.replace(settings.redis, socket_timeout=STORE_TIMEOUT), index_clock=self.clock
        )
        self.names = tag_names(pinned)
        answers = {name: ManifestHead(digest_of(*name), MEDIA_TYPE) for name in self.names}
        self.refresher_primary, self.reconcile_primary = CountingPrimary(answers), CountingPrimary(answers)
        self.resolver = Resolver(
            self.store,
            self.refresher_primary,
            concurrency=self.updater.resolve_concurrency,
            batch=self.updater.resolve_batch,
        )
        self.policy = Policy.from_settings(settings)
        self.hot = [
            classify_request("GET", f"/v2/{repository}/manifests/{tag}") for repository, tag in self.names[:hot]
        ]
        self.read_locally: set[int] = set()
        self.result = RefreshResult(pinned, hot, seconds, cold)
        self.result.settings = {
            "routing.max_tag_age": settings.routing.max_tag_age,
            "routing.refresh_fraction": settings.routing.refresh_fraction,
            "routing.refresh_after": settings.routing.refresh_after,
            "updater.reconcile_interval": self.updater.reconcile_interval,
            "updater.resolve_batch": self.updater.resolve_batch,
            "updater.resolve_concurrency": self.updater.resolve_concurrency,
        }

    def run(self) -> RefreshResult:
        """Every simulated minute: reconciliation's refresh when due, one read of each hot tag, then
        the resolver until nothing is due."""
        fill_local_registry(self.store, self.names)
        interval = self.updater.reconcile_interval
        last_reconcile = 0.0 if self.result.cold else -float(interval)
        with ThreadPoolExecutor(self.updater.reconcile_concurrency, "reconcile-http") as requests:
            for minute in range(int(self.result.seconds // MINUTE)):
                elapsed = minute * MINUTE
                self.clock.now = START + elapsed
                if elapsed - last_reconcile >= interval:
                    refresh_pins(self.store, self.reconcile_primary, requests)
                    last_reconcile = elapsed
                    self.result.reconcile_runs += 1
                for number, operation in enumerate(self.hot):
                    self.read(number, operation)
                self.resolve_all()
                if (minute + 1) % 30 == 0:
                    print(f"  simulated {(minute + 1) / 60:g} h", flush=True)
        self.result.refresher_heads = self.refresher_primary.total
        self.result.reconcile_heads = self.reconcile_primary.total
        self.result.reconcile_heads_by_digest = self.reconcile_primary.heads["digest"]
        self.result.queued_at_end = self.store.queued_resolutions()
        return self.result

    def resolve_all(self) -> None:
        """``resolve_due()`` until nothing is due, the clock moving ``BATCH_SECONDS`` per batch; a
        minute that claims more than ten resolutions per tag is a livelock, not a load."""
        claimed = 0
        while batch := self.resolver.resolve_due():
            claimed += batch
            self.clock.now += BATCH_SECONDS
            if claimed > 10 * len(self.names):
                raise BenchError(f"{claimed:,} resolutions claimed in one simulated minute: a livelock")

    def read(self, number: int, operation: Operation) -> None:
        """One read of a hot tag, decided as the auth service decides it (``Accept`` names the pin's type)."""
        query = index_query(operation, self.policy)
        if query is None:
            raise BenchError(f"routing asks the index nothing for {operation}: is routing.tag_policy pinned?")
        decision = route(operation, self.store.lookup(query), self.policy, self.clock.now, MEDIA_TYPE)
        self.result.reads[f"{decision.route.value if decision.route else '-'}/{decision.reason}"] += 1
        if decision.route is Route.LOCAL:
            self.read_locally.add(number)
        elif number in self.read_locally:
            self.result.primary_reads_after_first += 1

    def close(self) -> None:
        self.resolver.close()
        self.store.close()


def fill_local_registry(store: RedisIndexStore, names: list[tuple[str, str]]) -> None:
    """Every tag tagged in the local registry with its manifest present (replicated by GitLab Geo)."""
    updates: list[IndexUpdate] = []
    for repository, tag in names:
        digest = digest_of(repository, tag)
        updates += [ManifestPresence(repository, digest, True), LocalTag(repository, tag, digest)]
    for start in range(0, len(updates), 2000):
        store.apply(updates[start : start + 2000])


def refresh_pins(store: RedisIndexStore, primary: CountingPrimary, requests: ThreadPoolExecutor) -> None:
    """Reconciliation's own refresh of every tag the index knows (its walk of the local registry asks
    the primary nothing and is left out)."""
    source = cast(RegistryClient, primary)  # refresh_primary_pins only calls primary.head_manifest
    report = ReconcileReport()
    ReconcileRun(store, Registries(source, source), requests, report, threading.Event()).refresh_primary_pins()
    if report.errors:
        raise BenchError(f"reconciliation's refresh failed: {report.error_samples[:3]}")
    if report.primary_tags.deleted:
        raise BenchError(f"reconciliation marked {report.primary_tags.deleted} manifests deleted: the model is wrong")
