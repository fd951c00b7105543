"""Prometheus metrics of one app, in its own registry (no module-level state).

Under gunicorn with several workers, ``geo-route serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` and
``/metrics`` aggregates every worker's values from there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from geo_route.errors import IndexUnavailable
from geo_route.index.model import IndexFigures, StatusRecord
from geo_route.routing import Decision

LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
# Pin ages (seconds): fine up to the default routing.max_tag_age (300), coarse past it.
PIN_AGE_BUCKETS = (1, 5, 15, 30, 60, 90, 120, 150, 180, 240, 300, 450, 600, 900, 1800, 3600, 21600, 86400)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.decisions = Counter(
            "geo_route_decisions",
            "Routing decisions by route (local, primary, denied), reason and operation.",
            ["route", "reason", "operation"],
            registry=self.registry,
        )
        self.decision_seconds = Histogram(
            "geo_route_decision_seconds",
            "Time to answer one /auth request, from headers to decision.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        token_cache = Counter(
            "geo_route_token_cache", "Verified-token cache lookups.", ["result"], registry=self.registry
        )
        self.token_cache_hits = token_cache.labels("hit")
        self.token_cache_misses = token_cache.labels("miss")
        # Per worker (a pid label under gunicorn): NGINX's kept-alive connections stay with the worker
        # that accepted them, so the workers' caches fill unevenly (benchmarks/load.py waits for all).
        self.token_cache_entries = Gauge(
            "geo_route_token_cache_entries",
            "Verified tokens this worker caches (at most token.cache_size), as of its last insertion.",
            multiprocess_mode="liveall",
            registry=self.registry,
        )
        self.index_errors = Counter(
            "geo_route_index_errors", "Index lookups that failed or timed out.", registry=self.registry
        )
        self.pin_age = Histogram(
            "geo_route_tag_pin_age_seconds",
            "Age (index clock) of the pin a tag read found: current epoch, tombstones left out.",
            buckets=PIN_AGE_BUCKETS,
            registry=self.registry,
        )
        self.tag_age_bound = Gauge(
            "geo_route_max_tag_age_seconds",
            "routing.max_tag_age: a pin older than this is not served locally.",
            multiprocess_mode="max",
            registry=self.registry,
        )

        self._decision_children: dict[tuple[str, str, str], Any] = {}

    def count_decision(self, decision: Decision, operation: str, seconds: float) -> None:
        route = decision.route.value if decision.route else "denied"
        key = (route, decision.reason, operation)
        child = self._decision_children.get(key)
        if child is None:
            child = self._decision_children[key] = self.decisions.labels(*key)
        child.inc()
        self.decision_seconds.observe(seconds)

    def observe_pin_age(self, seconds: float) -> None:
        self.pin_age.observe(seconds)

    def count_token_cache(self, hit: bool) -> None:
        (self.token_cache_hits if hit else self.token_cache_misses).inc()

    def render(self) -> bytes:
        return render_registry(self.registry)


def render_registry(registry: CollectorRegistry, *read_at_scrape: object) -> bytes:
    """This process's metrics, or every gunicorn worker's when ``PROMETHEUS_MULTIPROC_DIR`` is set,
    then those of ``read_at_scrape`` (collectors that read shared state, the same in every worker)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        aggregated = CollectorRegistry()
        multiprocess.MultiProcessCollector(aggregated)  # type: ignore[no-untyped-call]
        registry = aggregated
    text = generate_latest(registry)
    if read_at_scrape:
        extra = CollectorRegistry(auto_describe=False)
        for collector in read_at_scrape:
            extra.register(collector)  # type: ignore[arg-type]
        text += generate_latest(extra)
    return text


class IndexGauges:
    """The updater's queues and last runs, read from the index when ``/metrics`` is scraped (one
    round trip; the same in every worker and node, so no multiprocess gauge is needed)."""

    def __init__(self, figures: Callable[[], IndexFigures], records: Callable[[], dict[str, StatusRecord]]) -> None:
        self._figures = figures
        self._records = records

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("geo_route_index_up", "1 when the index answered this scrape.")
        try:
            figures, records = self._figures(), self._records()
        except IndexUnavailable:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        for name, help_text, value in (
            (
                "geo_route_resolution_queue",
                "Tags queued for resolution at the primary (due or later).",
                figures.resolutions,
            ),
            ("geo_route_resolution_queue_due", "Queued resolutions that are due now.", figures.resolutions_due),
            (
                "geo_route_resolution_oldest_due_seconds",
                "How long the longest-waiting due resolution has waited.",
                figures.resolutions_oldest_due,
            ),
            (
                "geo_route_verification_queue",
                "Local content queued for verification (refetched: suspects).",
                figures.suspects,
            ),
            (
                "geo_route_verification_oldest_due_seconds",
                "How long the longest-waiting suspect has waited.",
                figures.suspects_oldest_due,
            ),
            (
                "geo_route_quarantined",
                "Digests whose local copy failed verification (served by the primary).",
                figures.quarantined,
            ),
        ):
            yield GaugeMetricFamily(name, help_text, value=value)
        for record, name, help_text in (
            ("reconcile", "geo_route_last_reconcile_timestamp_seconds", "When the last reconciliation ended."),
            ("verify", "geo_route_last_verify_pass_timestamp_seconds", "When the last verification pass ended."),
        ):
            if record in records:
                yield GaugeMetricFamily(name, help_text + " (index clock)", value=records[record].at)


class UpdaterMetrics:
    """The index updater's metrics, in its own registry; ``index_gauges`` are read at scrape time."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, index_gauges: IndexGauges | None = None) -> None:
        self.index_gauges = index_gauges
        self.registry = CollectorRegistry(auto_describe=True)
        self.events = Counter(
            "geo_route_events",
            "Notification events by source (local, primary), action and outcome.",
            ["source", "action", "outcome"],
            registry=self.registry,
        )
        self.apply_seconds = Histogram(
            "geo_route_event_apply_seconds",
            "Time to apply one envelope to the index (one transaction).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.lag_seconds = Histogram(
            "geo_route_notification_lag_seconds",
            "Now minus the event's timestamp, at receipt, by source (local, primary).",
            ["source"],
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30, 60, 300, 3600),
            registry=self.registry,
        )
        self.duplicates = Counter(
            "geo_route_event_duplicates", "Redelivered events skipped by id.", ["source"], registry=self.registry
        )
        self.rejected = Counter(
            "geo_route_envelopes_rejected",
            "Envelopes refused (unauthorized, too large, not an envelope, index unavailable).",
            ["source", "reason"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return render_registry(self.registry, *([self.index_gauges] if self.index_gauges else []))


class VerificationMetrics:
    """The updater's content verification (``updater/verify.py``); an ``Observer``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry or CollectorRegistry(auto_describe=True)
        self.results = Counter(
            "geo_route_verifications",
            "Local blobs and manifests read back and checked, by result (intact, mismatch, missing, "
            "error, skipped) and cause (pass, or refetch: a client fetched it again).",
            ["result", "cause"],
            registry=registry,
        )
        self.bytes = Counter(
            "geo_route_verified_bytes", "Bytes read back from the local registry by verification.", registry=registry
        )

    def __call__(self, result: Any, size: int, suspect: bool) -> None:
        self.results.labels(result.value, "refetch" if suspect else "pass").inc()
        self.bytes.inc(size)
