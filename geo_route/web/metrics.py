"""Prometheus metrics of one app, in its own registry (no module-level state).

Under gunicorn with several workers, ``geo-route serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` and
``/metrics`` aggregates every worker's values from there.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from geo_route.routing import Decision

LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


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
        self.index_errors = Counter(
            "geo_route_index_errors", "Index lookups that failed or timed out.", registry=self.registry
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

    def count_token_cache(self, hit: bool) -> None:
        (self.token_cache_hits if hit else self.token_cache_misses).inc()

    def render(self) -> bytes:
        return render_registry(self.registry)


def render_registry(registry: CollectorRegistry) -> bytes:
    """This process's metrics, or every gunicorn worker's when ``PROMETHEUS_MULTIPROC_DIR`` is set."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        aggregated = CollectorRegistry()
        multiprocess.MultiProcessCollector(aggregated)  # type: ignore[no-untyped-call]
        return generate_latest(aggregated)
    return generate_latest(registry)


class UpdaterMetrics:
    """The index updater's metrics, in its own registry."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
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
            "Now minus the event's timestamp, at receipt.",
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
        return render_registry(self.registry)


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
