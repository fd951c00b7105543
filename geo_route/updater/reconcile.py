"""Reconciliation: rebuild the index's local presence from the local registry and re-confirm the
primary's tag pins, while notifications keep arriving.

``reconcile`` takes the ``reconcile`` lease in the index (one run at a time), then:

1. walks every repository the local registry's catalog lists, plus every repository the index knows
   (one the catalog no longer lists loses its entries the same way): snapshot, walk, second
   snapshot, one ``apply`` per repository (``reconcile_walk`` explains why no notification's update
   is lost);
2. asks the primary (``HEAD`` by tag) for every tag the index knows (pinned from the primary, or
   tagged in the local registry) and pins the answer with the time the question was asked (on the
   index's clock), so a newer invalidation still wins; a 404 is a tombstone; an error leaves it.
   It also asks the primary (``HEAD`` by digest) for every manifest held here: one the primary no
   longer has is marked deleted (GitLab's garbage collection sends no event), and a deletion mark
   the primary has the digest again for is cleared.

Requests use pull tokens minted with the sites' shared signing key (``pull_tokens``); at most
``concurrency`` run at once. ``run_reconcile_command`` is ``geo-route reconcile``; the updater's
background reconciliation spreads the same work over its interval (``reconcile_cycle``).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Protocol

from geo_route.config import Settings
from geo_route.errors import GeoRouteError, IndexUnavailable
from geo_route.index.model import DigestDeleted, DigestRestored, IndexUpdate, PrimaryTag, record_status_of
from geo_route.index.redis_store import RedisIndexStore
from geo_route.updater.pull_tokens import PullTokens
from geo_route.updater.reconcile_report import PrimaryTally, Progress, ReconcileReport, RepositoryTally
from geo_route.updater.reconcile_walk import RepositoryWalker, Snapshot, gather, plan_updates
from geo_route.updater.registry_client import ManifestHead, RegistryClient, RegistryError

if TYPE_CHECKING:
    from geo_route.updater.verify import VerifyReport

LOCK_NAME = "reconcile"
PROGRESS_EVERY = 100
APPLY_CHUNK = 1000
REDIS_TIMEOUT = 10.0  # a reconciliation reads whole sets: the decision path's 50 ms would be too short
HTTP_TIMEOUT = 30.0
log = logging.getLogger("geo_route.updater.reconcile")

ProgressCallback = Callable[[Progress], None]


class ReconcileStore(Protocol):
    """The index operations reconciliation uses (``RedisIndexStore`` has them all)."""

    def apply(self, updates: list[IndexUpdate]) -> None: ...
    def local_snapshot(self, repository: str) -> tuple[set[str], set[str]]: ...
    def local_tags(self, repository: str) -> dict[str, str]: ...
    def primary_tags(self, repository: str) -> dict[str, tuple[str, float]]: ...
    def repositories(self) -> set[str]: ...
    def deleted_digests(self, repository: str) -> set[str]: ...
    def stamps(self, repositories: Iterable[str]) -> dict[str, tuple[float, str]]: ...
    def try_lock(self, name: str, seconds: int) -> bool: ...
    def renew_lock(self, name: str, seconds: int) -> bool: ...
    def unlock(self, name: str) -> None: ...


@dataclasses.dataclass(frozen=True)
class Registries:
    """The two registries reconciliation reads, with their token source."""

    local: RegistryClient
    primary: RegistryClient

    @classmethod
    def from_settings(
        cls, settings: Settings, timeout: float = HTTP_TIMEOUT, throttle: Callable[[], None] | None = None
    ) -> Registries:
        """``throttle`` is called before every request to either registry (a shared rate limit)."""
        tokens = PullTokens.from_settings(settings)
        local = RegistryClient(settings.local_registry.url, tokens, timeout=timeout, throttle=throttle)
        primary = RegistryClient(
            settings.primary.url, tokens, timeout=timeout, tls_context=primary_tls(settings), throttle=throttle
        )
        return cls(local, primary)

    def close(self) -> None:
        self.local.close()
        self.primary.close()


def primary_tls(settings: Settings) -> ssl.SSLContext | None:
    """The primary is trusted as NGINX trusts it (``nginx.primary_tls_verify``/``primary_ca_bundle``)."""
    if not settings.primary.url.startswith("https:"):
        return None
    if not settings.nginx.primary_tls_verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    bundle = settings.nginx.primary_ca_bundle
    return ssl.create_default_context(cafile=bundle if bundle and Path(bundle).is_file() else None)


class ProgressCounter:
    """Counts manifests read (from any thread) and calls ``progress`` every ``every`` of them."""

    def __init__(self, progress: ProgressCallback | None, every: int, total: int) -> None:
        self.progress = progress
        self.every = max(every, 1)
        self.total = total
        self.manifests = 0
        self.repositories_done = 0
        self.started = time.monotonic()
        self.lock = threading.Lock()

    def count_manifest(self) -> None:
        with self.lock:
            self.manifests += 1
            if self.progress is not None and self.manifests % self.every == 0:
                self.progress(self.snapshot())

    def count_repository(self) -> None:
        with self.lock:
            self.repositories_done += 1

    def snapshot(self) -> Progress:
        seconds = time.monotonic() - self.started
        return Progress(self.manifests, self.repositories_done, self.total, seconds)


def reconcile(
    settings: Settings,
    store: ReconcileStore,
    *,
    progress: ProgressCallback | None = None,
    concurrency: int | None = None,
    progress_every: int = PROGRESS_EVERY,
    registries: Registries | None = None,
    stop: threading.Event | None = None,
    lock_seconds: int | None = None,
) -> ReconcileReport:
    """One reconciliation run. Registry and index trouble is counted in the report, never raised;
    an unusable ``updater.signing_key`` raises ``SigningKeyError`` before anything is locked."""
    options = RunOptions(
        concurrency or settings.updater.reconcile_concurrency, progress, progress_every, stop or threading.Event()
    )
    lock_seconds = lock_seconds or settings.updater.reconcile_lease
    if registries is not None:
        return run_locked(store, registries, options, lock_seconds)
    registries = Registries.from_settings(settings)
    try:
        return run_locked(store, registries, options, lock_seconds)
    finally:
        registries.close()


@dataclasses.dataclass(frozen=True)
class RunOptions:
    concurrency: int
    progress: ProgressCallback | None
    progress_every: int
    stop: threading.Event


def run_locked(
    store: ReconcileStore, registries: Registries, options: RunOptions, lock_seconds: int
) -> ReconcileReport:
    started = time.monotonic()
    report = ReconcileReport()
    try:
        report.locked = not store.try_lock(LOCK_NAME, lock_seconds)
    except IndexUnavailable as exc:
        report.add_errors([f"index: {exc}"])
        return report
    if report.locked:
        return report
    try:
        run_under_lease(store, registries, options, lock_seconds, None, report)
    finally:
        release_lock(store, report)
        report.seconds = time.monotonic() - started
    record_status_of(store, "reconcile", report.status_fields())
    return report


def run_under_lease(
    store: ReconcileStore,
    registries: Registries,
    options: RunOptions,
    lock_seconds: int,
    names: list[str] | None,
    report: ReconcileReport,
) -> None:
    """The work of a run while its caller holds the lease (renewed meanwhile), counted into
    ``report``: every repository (``names`` None), or only ``names`` (a slice of a spread cycle,
    ``reconcile_cycle``)."""
    try:
        with LeaseKeeper(store, lock_seconds), ThreadPoolExecutor(options.concurrency, "reconcile-http") as requests:
            run = ReconcileRun(store, registries, requests, report, options.stop)
            run.walk_local(options.concurrency, options.progress, options.progress_every, names)
            run.refresh_primary_pins(names)
    except IndexUnavailable as exc:
        report.add_errors([f"index: {exc}"])


class LeaseStore(Protocol):
    def renew_lock(self, name: str, seconds: int) -> bool: ...


class LeaseKeeper:
    """Renews the reconcile lease every third of its length while a run lives, so a run is never
    overtaken by the next one however long it takes, and a killed run blocks repair for at most one
    lease (``updater.reconcile_lease``), not for the longest run imaginable."""

    def __init__(self, store: LeaseStore, seconds: int, name: str = LOCK_NAME) -> None:
        self._store = store
        self._seconds = seconds
        self._name = name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"geo-route-{name}-lease", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _renew(self) -> None:
        while not self._stop.wait(self._seconds / 3):
            try:
                if not self._store.renew_lock(self._name, self._seconds):
                    log.warning("%s: the lease is no longer ours; another run may start", self._name)
                    return
            except IndexUnavailable as exc:
                log.warning("%s: cannot renew the lease: %s", self._name, exc)


def release_lock(store: ReconcileStore, report: ReconcileReport) -> None:
    try:
        store.unlock(LOCK_NAME)
    except IndexUnavailable as exc:
        report.add_errors([f"index: cannot release the lock (it expires by itself): {exc}"])


class ReconcileRun:
    """The state of one run: the store, the registries, the request pool, the report being filled."""

    def __init__(
        self,
        store: ReconcileStore,
        registries: Registries,
        requests: Executor,
        report: ReconcileReport,
        stop: threading.Event,
    ) -> None:
        self.store = store
        self.registries = registries
        self.requests = requests
        self.report = report
        self.stop = stop

    def walk_local(
        self, workers: int, progress: ProgressCallback | None, progress_every: int, names: list[str] | None = None
    ) -> None:
        """Every repository (the catalog's and the index's), or only ``names``."""
        names = self.list_repositories() if names is None else names
        if names is None:
            return
        counter = ProgressCounter(progress, progress_every, len(names))
        walker = RepositoryWalker(self.registries.local, self.requests, counter.count_manifest)
        with ThreadPoolExecutor(workers, "reconcile-repository") as repositories:
            futures = {repositories.submit(self.reconcile_repository, walker, name): name for name in names}
            for future in as_completed(futures):
                name = futures[future]
                tally, errors = future.result()
                counter.count_repository()
                if tally is not None:
                    self.report.add_repository(tally)
                self.report.add_errors([f"{name}: {message}" for message in errors])

    def list_repositories(self) -> list[str] | None:
        """The catalog's repositories and the index's; ``None`` if the catalog cannot be read."""
        ((_, catalog),) = gather(self.requests, lambda _: self.registries.local.list_repositories(), [None])
        if isinstance(catalog, RegistryError):
            self.report.add_errors([f"catalog: {catalog}"])
            return None
        return sorted(set(catalog) | self.store.repositories())

    def reconcile_repository(
        self, walker: RepositoryWalker, repository: str
    ) -> tuple[RepositoryTally | None, list[str]]:
        """Snapshot, walk, snapshot, apply. Runs on a repository thread; the caller merges the result."""
        if self.stop.is_set():
            self.report.cancelled = True
            return None, []
        try:
            before = self.take_snapshot(repository)
            found = walker.walk(repository, before)
            updates, tally = plan_updates(repository, before, self.take_snapshot(repository), found)
            self.store.apply(updates)
        except IndexUnavailable as exc:
            return None, [f"index: {exc}"]
        return tally, found.errors

    def take_snapshot(self, repository: str) -> Snapshot:
        blobs, manifests = self.store.local_snapshot(repository)
        return Snapshot(frozenset(blobs), frozenset(manifests), self.store.local_tags(repository))

    def refresh_primary_pins(self, names: list[str] | None = None) -> None:
        """``HEAD`` every tag the index knows at the primary (of ``names`` only, if given); pin the
        answers (see the module docstring)."""
        if self.stop.is_set():
            self.report.cancelled = True
            return
        names = sorted(self.store.repositories()) if names is None else names
        known = self.known_tags(names)
        # Before any question: an invalidation after it still wins (per bucket on a Redis Cluster).
        stamps = self.store.stamps(set(names) | set(known))
        asked = gather(self.requests, self.ask_primary, [(repo, tag) for repo, tags in known.items() for tag in tags])
        updates: list[IndexUpdate] = []
        tally = self.report.primary_tags
        for (repository, tag), answer in asked:
            if isinstance(answer, RegistryError):
                self.report.add_errors([f"primary {repository}:{tag}: {answer}"])
                continue
            pinned = known[repository][tag]
            asked_at, epoch = stamps[repository]
            update = pin_update(repository, tag, answer, pinned, asked_at, tally, epoch)
            if update is not None:
                updates.append(update)
        updates.extend(self.restored_digests(stamps, names))
        updates.extend(self.deleted_digests(names))
        for start in range(0, len(updates), APPLY_CHUNK):
            self.store.apply(updates[start : start + APPLY_CHUNK])

    def known_tags(self, names: list[str]) -> dict[str, dict[str, str | None]]:
        """repository → tag → pinned digest (``None``: tagged locally, not pinned)."""
        known: dict[str, dict[str, str | None]] = {}
        for repository in names:
            tags: dict[str, str | None] = dict.fromkeys(self.store.local_tags(repository))
            tags.update({tag: digest for tag, (digest, _) in self.store.primary_tags(repository).items()})
            if tags:
                known[repository] = tags
        return known

    def ask_primary(self, key: tuple[str, str]) -> ManifestHead | None:
        return self.registries.primary.head_manifest(*key)

    def deleted_digests(self, names: list[str]) -> list[IndexUpdate]:
        """Manifests held here that the primary answers 404 for by digest: deleted there with no
        event (GitLab's online garbage collection, a lost or dropped event). They are marked
        deleted, so they stop being served by digest, and tags pinned to them are re-resolved."""
        held = []
        for repository in names:
            _, manifests = self.store.local_snapshot(repository)
            held += [(repository, digest) for digest in sorted(manifests - self.store.deleted_digests(repository))]
        deleted: list[IndexUpdate] = []
        for (repository, digest), answer in gather(self.requests, self.ask_primary, held):
            if isinstance(answer, RegistryError):
                self.report.add_errors([f"primary {repository}@{digest}: {answer}"])
            elif answer is None:
                deleted.append(DigestDeleted(repository, digest))
        self.report.primary_tags.deleted += len(deleted)
        return deleted

    def restored_digests(self, stamps: dict[str, tuple[float, str]], names: list[str]) -> list[IndexUpdate]:
        """Digests marked deleted at the primary that the primary serves again (pushed anew); a
        mark newer than the repository's stamp stays (the digest was deleted again while we asked)."""
        marked = [(repo, digest) for repo in names for digest in self.store.deleted_digests(repo)]
        updates: list[IndexUpdate] = []
        for (repository, digest), answer in gather(self.requests, lambda key: self.ask_primary(key), marked):
            if isinstance(answer, RegistryError):
                self.report.add_errors([f"primary {repository}@{digest}: {answer}"])
            elif answer is not None:
                updates.append(DigestRestored(repository, digest, stamps[repository][0]))
        return updates


def pin_update(
    repository: str,
    tag: str,
    answer: ManifestHead | None,
    pinned: str | None,
    asked_at: float,
    tally: PrimaryTally,
    epoch: str = "",
) -> PrimaryTag | None:
    if answer is not None:
        tally.refreshed += 1
        tally.changed += int(pinned is not None and pinned != answer.digest)
        return PrimaryTag(repository, tag, answer.digest, asked_at, answer.media_type, epoch=epoch)
    if pinned is None:
        return None  # tagged locally only, unknown to the primary: nothing to unpin
    tally.removed += 1
    return PrimaryTag(repository, tag, "", asked_at, epoch=epoch)


def open_store(settings: Settings) -> RedisIndexStore:
    """An index store for reconciliation: whole-set reads need longer timeouts than a decision."""
    redis = dataclasses.replace(
        settings.redis,
        socket_timeout=max(settings.redis.socket_timeout, REDIS_TIMEOUT),
        connect_timeout=max(settings.redis.connect_timeout, REDIS_TIMEOUT),
        unavailable_cooldown=0.0,
    )
    return RedisIndexStore(redis)


def run_reconcile_command(
    settings: Settings, once: bool, print_line: Callable[[str], None], verify_rate: int | None = None
) -> int:
    """``geo-route reconcile``: with ``once``, one full run at once (exit 0 when it ran cleanly, else
    1); without, the updater's spread cycle in the foreground (``reconcile_cycle``: one cycle per
    ``updater.reconcile_interval``, at most ``updater.reconcile_requests_per_second``), each cycle's
    report printed, until SIGINT/SIGTERM (exit 0). ``verify_rate`` (bytes per second, 0 = no limit;
    ``None`` = no verification): after the run or each cycle, a full verification pass
    (``--verify``), which must be clean too."""
    from geo_route.updater.reconcile_cycle import request_throttle, run_cycles

    try:
        registries = Registries.from_settings(settings, throttle=None if once else request_throttle(settings))
    except GeoRouteError as exc:
        print_line(f"reconcile: {exc}")
        return 1
    store = open_store(settings)
    stop = threading.Event()

    def report_and_verify(report: ReconcileReport) -> bool:
        print_line(report.format())
        if verify_rate is None or stop.is_set():
            return report.ok
        verified = verify_once(settings, store, registries, verify_rate, stop)
        print_line(verified.format())
        return report.ok and verified.ok

    try:
        with stop_on_signals(stop):
            if not once:
                run_cycles(settings, store, registries, stop, on_cycle=report_and_verify, on_error=print_line)
                return 0
            report = reconcile(
                settings, store, progress=lambda p: print_line(p.format()), registries=registries, stop=stop
            )
            return 0 if report_and_verify(report) else 1
    finally:
        registries.close()
        store.close()


def verify_once(
    settings: Settings, store: RedisIndexStore, registries: Registries, rate: int, stop: threading.Event
) -> VerifyReport:
    """One verification pass from the start (``reconcile --verify``), refetch suspects included."""
    from geo_route.updater.verify import RateLimiter, Verifier

    verifier = Verifier(store, registries.local, RateLimiter(rate), trust=settings.routing.refetch_trust)
    return verifier.run_pass(stop)


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Set ``stop`` on SIGINT/SIGTERM while inside (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {number: signal.signal(number, handle) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
