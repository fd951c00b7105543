"""The service's own view of a run, from ``/metrics``: decisions, index errors, time inside the handler."""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from benchlib.common import EXPECTED_DECISION, BenchError


@dataclass
class MetricsSnapshot:
    """The service's own counters, summed over every worker (multiprocess mode)."""

    decisions: dict[tuple[str, str, str], float] = field(default_factory=dict)
    index_errors: float = 0.0
    handler_count: float = 0.0
    handler_sum_s: float = 0.0
    handler_buckets: dict[float, float] = field(default_factory=dict)  # le (seconds) -> cumulative count


@dataclass
class ServerSide:
    """The decisions and the handler-time histogram between two snapshots."""

    decisions: int = 0
    unexpected_decisions: dict[str, int] = field(default_factory=dict)
    index_errors: int = 0
    handler_mean_ms: float = 0.0
    handler_p50_le_ms: float = 0.0
    handler_p99_le_ms: float = 0.0


def read_metrics(base_url: str) -> MetricsSnapshot:
    try:
        with urllib.request.urlopen(base_url + "/metrics", timeout=5) as response:
            text = response.read().decode("utf-8")
    except OSError as exc:
        raise BenchError(f"GET /metrics failed: {exc}") from None
    snapshot = MetricsSnapshot()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            add_sample(snapshot, sample.name, sample.labels, sample.value)
    return snapshot


def add_sample(snapshot: MetricsSnapshot, name: str, labels: Mapping[str, str], value: float) -> None:
    if name == "geo_route_decisions_total":
        key = (labels["route"], labels["reason"], labels["operation"])
        snapshot.decisions[key] = snapshot.decisions.get(key, 0.0) + value
    elif name == "geo_route_index_errors_total":
        snapshot.index_errors += value
    elif name == "geo_route_decision_seconds_count":
        snapshot.handler_count += value
    elif name == "geo_route_decision_seconds_sum":
        snapshot.handler_sum_s += value
    elif name == "geo_route_decision_seconds_bucket":
        bound = float(labels["le"])
        snapshot.handler_buckets[bound] = snapshot.handler_buckets.get(bound, 0.0) + value


def compare_metrics(
    before: MetricsSnapshot, after: MetricsSnapshot, expected: tuple[str, str, str] = EXPECTED_DECISION
) -> ServerSide:
    """``expected`` is the one (route, reason, operation) the load may get; any other is unexpected."""
    deltas = {key: after.decisions.get(key, 0.0) - before.decisions.get(key, 0.0) for key in after.decisions}
    unexpected = {"/".join(key): int(n) for key, n in deltas.items() if key != expected and n > 0}
    count = after.handler_count - before.handler_count
    buckets = {le: after.handler_buckets[le] - before.handler_buckets.get(le, 0.0) for le in after.handler_buckets}
    return ServerSide(
        decisions=int(sum(deltas.values())),
        unexpected_decisions=unexpected,
        index_errors=int(after.index_errors - before.index_errors),
        handler_mean_ms=1000.0 * (after.handler_sum_s - before.handler_sum_s) / count if count else 0.0,
        handler_p50_le_ms=bucket_bound_ms(buckets, count, 0.50),
        handler_p99_le_ms=bucket_bound_ms(buckets, count, 0.99),
    )


def bucket_bound_ms(buckets: Mapping[float, float], count: float, quantile: float) -> float:
    """The upper bound of the histogram bucket holding the quantile (inf when beyond the last bucket)."""
    for bound in sorted(buckets):
        if count and buckets[bound] >= quantile * count:
            return bound * 1000.0
    return float("inf")
