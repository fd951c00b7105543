"""Reconciliation spread over its interval: the updater's periodic reconciliation, in slices.

A full run (``reconcile.reconcile``, ``geo-route reconcile --once``) walks every repository and asks
the primary about every known tag and held manifest at once: at a large site that is a burst of
hundreds of thousands of requests every ``updater.reconcile_interval``. A **cycle** does the same
work one slice of repositories at a time, in the catalog's (lexical) order, spread evenly over the
interval: repository ``i`` of the ``total`` expected is due ``interval * i / total`` after the
cycle's start, so one cycle takes one interval and the registries see a steady rate, never above
``updater.reconcile_requests_per_second`` (a token bucket over both registries).

Where the cycle is lives in the index (``Cursor``, ``reconcile:cursor``): its start on the index's
clock, the repositories expected and done, the last one done. Every slice runs under the
``reconcile`` lease (one slice at a time across updaters and nodes, and never beside a full run)
and moves the cursor before it lets the lease go, so a restarted updater, or another node's,
resumes after the last repository done rather than from the start. A slice is at most
``SLICE_MAX`` repositories: a catalog page after the cursor (``n``/``last``) merged with the
index's own repositories in that range (one the catalog no longer lists loses its entries as in a
full run).

``total`` is what the previous cycle found, or the index's repository count for the first one. A
cycle that finds more than it expected does the rest as fast as the rate cap allows; one that ends
early waits: the next cycle starts one interval after this one started (or at once, if this one
overran).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Callable
from typing import Protocol

from geo_route.config import Settings
from geo_route.errors import GeoRouteError, IndexUnavailable
from geo_route.index.model import record_status_of
from geo_route.index.redis_store import RedisIndexStore
from geo_route.updater.reconcile import (
    LOCK_NAME,
    ReconcileStore,
    Registries,
    RunOptions,
    open_store,
    run_under_lease,
)
from geo_route.updater.reconcile_report import ReconcileReport
from geo_route.updater.registry_client import RegistryError
from geo_route.updater.verify import RateLimiter

SLICE_MAX = 64  # repositories per slice at most (one catalog page)
LOCKED_RETRY = 1.0  # seconds before asking again for a lease another run holds
ERROR_RETRY = 5.0  # seconds after a failed step (the index or a registry unavailable)
MAX_WAIT = 10.0  # seconds between looks at the cursor at most (another node may have moved it)
log = logging.getLogger("geo_route.updater.reconcile")


class CycleStore(ReconcileStore, Protocol):
    def reconcile_cursor(self) -> str: ...
    def set_reconcile_cursor(self, value: str) -> None: ...
    def now(self) -> float: ...


@dataclasses.dataclass(frozen=True)
class Cursor:
    """Where a cycle is: started at ``started`` (the index's clock), ``total`` repositories
    expected, ``done`` of them reconciled, the last one ``last`` ("" before the first)."""

    started: float
    total: int
    done: int = 0
    last: str = ""

    def encode(self) -> str:
        return f"{self.started:.6f} {self.total} {self.done} {self.last}"

    @classmethod
    def decode(cls, value: str) -> Cursor | None:
        """``None`` for no cursor or one this version cannot read (a new cycle starts)."""
        parts = value.split(" ", 3)
        if len(parts) != 4:
            return None
        try:
            return cls(float(parts[0]), int(parts[1]), int(parts[2]), parts[3])
        except ValueError:
            return None

    def due_by(self, now: float, interval: float) -> int:
        """Pure: how many more repositories are due at ``now`` (repository ``i`` is due
        ``interval * i / total`` after the start; past ``total``, all of them)."""
        if now < self.started:
            return 0
        if self.done >= self.total:
            return SLICE_MAX
        due = min(math.floor((now - self.started) * self.total / interval) + 1, self.total)
        return max(due - self.done, 0)

    def next_due(self, interval: float) -> float:
        """When the next repository is due (the index's clock)."""
        if self.done >= self.total:
            return self.started
        return self.started + interval * self.done / self.total


def merge_slice(catalog_page: list[str], index_names: list[str], last: str, limit: int) -> list[str]:
    """Pure: the next ``limit`` repositories after ``last``, from a catalog page after ``last`` (of
    at most ``limit``) and the index's sorted names. An index name past a full page waits for the
    page it belongs to."""
    full = len(catalog_page) >= limit
    bound = max(catalog_page) if full else None
    from_index = [name for name in index_names if name > last and (bound is None or name <= bound)]
    return sorted(set(catalog_page) | set(from_index))[:limit]


class ReconcileCycle:
    """Runs the spread cycle one step at a time: ``step()`` reconciles what is due now and returns
    the seconds until more is; ``on_cycle`` gets each finished cycle's report."""

    def __init__(
        self,
        settings: Settings,
        store: CycleStore,
        registries: Registries,
        *,
        stop: threading.Event | None = None,
        on_cycle: Callable[[ReconcileReport], object] | None = None,
    ) -> None:
        updater = settings.updater
        self.interval = float(max(updater.reconcile_interval, 1))
        self.lease = updater.reconcile_lease
        self.store = store
        self.registries = registries
        self.on_cycle = on_cycle
        self.stop = stop or threading.Event()
        self.options = RunOptions(updater.reconcile_concurrency, None, 1, self.stop)
        self.report = ReconcileReport()
        self._index_names: list[str] | None = None  # the index's repositories, read once per cycle

    def step(self) -> float:
        """Reconcile the repositories due now (one slice, under the lease); seconds until more are due.
        While nothing is due the lease is not even asked for: a full run (``reconcile --once``) and
        the other updaters never find it held by a cycle that is only waiting."""
        cursor = Cursor.decode(self.store.reconcile_cursor())
        if cursor is not None:
            now = self.store.now()
            if cursor.due_by(now, self.interval) == 0:
                return max(cursor.next_due(self.interval) - now, 0.0)
        if not self.store.try_lock(LOCK_NAME, self.lease):
            return LOCKED_RETRY
        try:
            return self._step_locked()
        finally:
            try:
                self.store.unlock(LOCK_NAME)
            except IndexUnavailable as exc:
                log.warning("reconcile: cannot release the lease (it expires by itself): %s", exc)

    def _step_locked(self) -> float:
        now = self.store.now()
        cursor = Cursor.decode(self.store.reconcile_cursor()) or self.start_cycle(now, expected=0)
        due = min(cursor.due_by(now, self.interval), SLICE_MAX)
        if due == 0:
            return max(cursor.next_due(self.interval) - now, 0.0)
        names = self.next_names(cursor.last, due)
        if names is None:
            return LOCKED_RETRY
        if not names:
            self.finish(cursor, now)
            return 0.0
        run_under_lease(self.store, self.registries, self.options, self.lease, names, self.report)
        if self.stop.is_set():
            return 0.0  # cancelled mid-slice: the cursor stays, the slice is done again on resume
        done = dataclasses.replace(cursor, done=cursor.done + len(names), last=names[-1])
        self.store.set_reconcile_cursor(done.encode())
        return 0.0

    def start_cycle(self, started: float, expected: int) -> Cursor:
        """A new cycle from ``started`` (the index's clock), expecting at least ``expected``
        repositories (and at least as many as the index knows now); its names are read when it needs them."""
        self._index_names = None
        cursor = Cursor(started, max(expected, len(self.index_names()), 1))
        self._index_names = None
        self.store.set_reconcile_cursor(cursor.encode())
        return cursor

    def finish(self, cursor: Cursor, now: float) -> None:
        """The cycle's end: report it; the next starts one interval after this one started (at once
        if this one overran), expecting as many repositories as this one found."""
        if now - cursor.started > self.interval:
            log.warning(
                "reconcile: a cycle took %.0f s, longer than updater.reconcile_interval (%.0f s): "
                "raise updater.reconcile_requests_per_second or the interval",
                now - cursor.started,
                self.interval,
            )
        self.start_cycle(max(cursor.started + self.interval, now), expected=cursor.done)
        report, self.report = self.report, ReconcileReport()
        report.seconds = now - cursor.started
        record_status_of(self.store, "reconcile", report.status_fields())  # what geo-route status shows
        if self.on_cycle is not None:
            self.on_cycle(report)

    def index_names(self) -> list[str]:
        if self._index_names is None:
            self._index_names = sorted(self.store.repositories())
        return self._index_names

    def next_names(self, last: str, limit: int) -> list[str] | None:
        """The next ``limit`` repositories after ``last``; ``None`` if the catalog cannot be read."""
        try:
            page = self.registries.local.list_repositories_after(last, limit)
        except RegistryError as exc:
            self.report.add_errors([f"catalog: {exc}"])
            return None
        return merge_slice(page, self.index_names(), last, limit)


def request_throttle(settings: Settings) -> Callable[[], None] | None:
    """A token bucket of ``updater.reconcile_requests_per_second`` requests (None: no limit)."""
    rate = settings.updater.reconcile_requests_per_second
    if rate <= 0:
        return None
    limiter = RateLimiter(rate)
    return lambda: limiter.take(1)


def run_cycles(
    settings: Settings,
    store: CycleStore,
    registries: Registries,
    stop: threading.Event,
    *,
    on_cycle: Callable[[ReconcileReport], object],
    on_error: Callable[[str], None],
) -> None:
    """The spread cycle until ``stop`` (``geo-route reconcile`` without ``--once``)."""
    cycle = ReconcileCycle(settings, store, registries, stop=stop, on_cycle=on_cycle)
    while not stop.is_set():
        try:
            wait = min(cycle.step(), MAX_WAIT)
        except GeoRouteError as exc:
            on_error(f"reconcile: {exc}")
            wait = ERROR_RETRY
        if wait > 0:
            stop.wait(wait)


class ReconcileLoop:
    """The spread cycle (``ReconcileCycle``), one cycle per ``updater.reconcile_interval`` seconds
    (at least 1), in a daemon thread; at start it resumes where the cursor is.

    ``stop()`` asks a running slice to finish the repository it is in and skip the rest (the cursor
    stays before that slice), then waits for the thread. ``last_report`` is the latest cycle's
    report and ``runs`` counts the cycles finished.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        store: CycleStore | None = None,
        on_report: Callable[[ReconcileReport], None] | None = None,
    ) -> None:
        self.settings = settings
        self.interval = max(settings.updater.reconcile_interval, 1)
        self.on_report = on_report
        self.last_report: ReconcileReport | None = None
        self.runs = 0
        self._store = store
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("ReconcileLoop already started")
        self._thread = threading.Thread(target=self.run_until_stopped, name="geo-route-reconcile", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_until_stopped(self) -> None:
        store = self._store
        own_store = store is None
        registries: Registries | None = None
        cycle: ReconcileCycle | None = None
        try:
            while not self._stop.is_set():
                wait = ERROR_RETRY
                try:
                    store = store or open_store(self.settings)
                    registries = registries or Registries.from_settings(
                        self.settings, throttle=request_throttle(self.settings)
                    )
                    cycle = cycle or ReconcileCycle(
                        self.settings, store, registries, stop=self._stop, on_cycle=self.record
                    )
                    wait = min(cycle.step(), MAX_WAIT)
                except GeoRouteError as exc:
                    log.error("reconcile: %s", exc)
                except Exception:  # the loop must outlive a bug in one slice
                    log.exception("reconcile: unexpected error")
                if wait > 0:
                    self._stop.wait(wait)
        finally:
            if registries is not None:
                registries.close()
            if own_store and isinstance(store, RedisIndexStore):
                store.close()

    def record(self, report: ReconcileReport) -> None:
        self.runs += 1
        self.last_report = report
        level = logging.INFO if report.ok or report.locked else logging.WARNING
        log.log(level, "%s", report.format())
        if self.on_report is not None:
            self.on_report(report)
