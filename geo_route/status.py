"""``geo-route status`` and the auth service's ``/status`` page: one function gathers, two render.

``gather_status`` reads NGINX's counters (``nginx.metrics_listen``: requests and bytes by route and
operation, fallbacks by cause, the last fallback answers) and the index (the updater's queues, the
pins and their ages, what the updater last recorded: reconciliation, verification, notification
lag; where Redis runs). Every part that cannot be read is named in ``problems``; the rest is shown.
Nothing here writes, and nothing shown is a secret: addresses, never credentials or tokens.
``format_status`` renders it for a terminal; ``web/status.py`` renders the same as HTML.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from prometheus_client.parser import text_string_to_metric_families

from geo_route.config import Settings
from geo_route.errors import GeoRouteError
from geo_route.index.model import IndexFigures, PinEntry, RedisTopology, StatusRecord

# Reads of content: what could be served locally (writes, listings and uploads always go to the primary).
CONTENT_READS = ("blob", "manifest-by-digest", "manifest-by-tag")
LOCAL_ROUTES = ("local", "stale")  # served from this site's registry: the bytes never crossed the WAN
PIN_REPOSITORIES = 1000  # status reads the pins of at most this many repositories (the first by name)
PIN_ROWS = 20  # pins listed by name (the oldest first); the counts cover every pin read
NGINX_TIMEOUT = 2.0
T = TypeVar("T")


class StatusSource(Protocol):
    """What status reads from the index (``RedisIndexStore``)."""

    def figures(self) -> IndexFigures: ...
    def status_records(self) -> dict[str, StatusRecord]: ...
    def pin_entries(self, max_repositories: int) -> tuple[list[PinEntry], int]: ...
    def topology(self) -> RedisTopology: ...


@dataclass(frozen=True)
class RecentAnswer:
    """One of the last answers NGINX gave without the local registry's content (fallback, stale,
    auth-unavailable); ``request_id`` finds it in the access log."""

    at: float
    route: str
    method: str
    operation: str
    local_status: str
    cause: str
    status: str
    request_id: str


@dataclass(frozen=True)
class Traffic:
    """NGINX's counters since it started."""

    requests: dict[str, float]  # route -> requests
    sent_bytes: dict[str, float]  # route -> bytes
    bytes_by_operation: dict[str, dict[str, float]]  # operation -> route -> bytes
    fallback_causes: dict[str, float]  # cause -> fallbacks
    reads: float  # content reads routed (local, stale, primary, fallback, auth-unavailable)
    reads_local: float
    read_bytes: float
    read_bytes_local: float
    recent: tuple[RecentAnswer, ...] = ()

    @property
    def hit_ratio(self) -> float | None:
        """Content reads served here (requests)."""
        return self.reads_local / self.reads if self.reads else None

    @property
    def byte_hit_ratio(self) -> float | None:
        return self.read_bytes_local / self.read_bytes if self.read_bytes else None

    @property
    def bytes_saved(self) -> float:
        """Bytes sent from this site's registry: they did not cross the WAN from the primary."""
        return sum(self.sent_bytes.get(route, 0.0) for route in LOCAL_ROUTES)


@dataclass(frozen=True)
class PinAges:
    """The index's tag entries by state and age (index clock), over the repositories read."""

    pins: int
    fresh: int  # younger than max_tag_age * refresh_fraction: served here, not yet refreshed
    within_bound: int  # served here, refresh due (queued by the next read)
    past_bound: int  # older than max_tag_age: reads go to the primary until it is resolved again
    unconfirmed: int  # of an older index epoch (a Redis restart or failover)
    tombstones: int
    oldest: float | None
    rows: tuple[tuple[str, str, str, float, str], ...]  # (repository, tag, digest, age, state)
    repositories_read: int
    repositories: int


@dataclass(frozen=True)
class SiteStatus:
    generated_at: float  # this machine's clock
    index_now: float | None  # the index's clock (ages are on it)
    max_tag_age: int
    traffic: Traffic | None
    figures: IndexFigures | None
    pins: PinAges | None
    records: dict[str, StatusRecord]
    topology: RedisTopology | None
    problems: tuple[str, ...] = field(default=())

    def record_age(self, name: str) -> float | None:
        record = self.records.get(name)
        if record is None or self.index_now is None:
            return None
        return max(0.0, self.index_now - record.at)


def gather_status(
    settings: Settings,
    store: StatusSource,
    *,
    fetch_text: Callable[[str], str] | None = None,
    clock: Callable[[], float] = time.time,
) -> SiteStatus:
    """Everything ``status`` shows; a part that cannot be read is left out and named in ``problems``."""
    problems: list[str] = []
    traffic = read_traffic(settings, fetch_text or fetch_nginx_text, problems)
    figures = attempt(store.figures, "index", problems)
    records = attempt(store.status_records, "index records", problems) or {}
    entries = attempt(lambda: store.pin_entries(PIN_REPOSITORIES), "index pins", problems)
    topology = attempt(store.topology, "redis topology", problems)
    now = figures.now if figures else None
    pins = summarize_pins(entries[0], entries[1], now, settings) if entries is not None and now else None
    return SiteStatus(
        clock(), now, settings.routing.max_tag_age, traffic, figures, pins, records, topology, tuple(problems)
    )


def attempt(read: Callable[[], T], what: str, problems: list[str]) -> T | None:
    try:
        return read()
    except GeoRouteError as exc:
        problems.append(f"{what}: {exc}")
        return None


def fetch_nginx_text(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=NGINX_TIMEOUT) as answer:
            return str(answer.read().decode("utf-8"))
    except (OSError, urllib.error.URLError) as exc:
        raise GeoRouteError(f"{url}: {exc}") from None


def read_traffic(settings: Settings, fetch_text: Callable[[str], str], problems: list[str]) -> Traffic | None:
    listen = settings.nginx.metrics_listen
    if not listen:
        problems.append("nginx: nginx.metrics_listen is off, so there are no traffic figures")
        return None
    metrics = attempt(lambda: fetch_text(f"http://{listen}/metrics"), "nginx metrics", problems)
    if metrics is None:
        return None
    recent = attempt(lambda: fetch_text(f"http://{listen}/recent"), "nginx recent fallbacks", problems)
    return parse_traffic(metrics, recent or "")


def parse_traffic(metrics_text: str, recent_text: str = "") -> Traffic:
    """NGINX's Prometheus text (the http part's /metrics) and /recent lines → ``Traffic``."""
    series: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            series[sample.name].append((sample.labels, sample.value))
    by_operation: dict[str, dict[str, float]] = defaultdict(dict)
    for labels, value in series["geo_route_nginx_operation_sent_bytes_total"]:
        by_operation[labels["operation"]][labels["route"]] = value
    reads, reads_local = content_reads(series["geo_route_nginx_operation_requests_total"])
    read_bytes, read_bytes_local = content_reads(series["geo_route_nginx_operation_sent_bytes_total"])
    return Traffic(
        requests=summed(series["geo_route_nginx_requests_total"], "route"),
        sent_bytes=summed(series["geo_route_nginx_sent_bytes_total"], "route"),
        bytes_by_operation={operation: dict(routes) for operation, routes in sorted(by_operation.items())},
        fallback_causes=summed(series["geo_route_nginx_fallback_causes_total"], "cause"),
        reads=reads,
        reads_local=reads_local,
        read_bytes=read_bytes,
        read_bytes_local=read_bytes_local,
        recent=parse_recent(recent_text),
    )


def content_reads(samples: list[tuple[dict[str, str], float]]) -> tuple[float, float]:
    """(all, served here) of the blob and manifest reads that were routed (not NGINX's own answers)."""
    total = local = 0.0
    for labels, value in samples:
        if labels.get("operation") in CONTENT_READS and labels.get("route") != "none":
            total += value
            local += value if labels.get("route") in LOCAL_ROUTES else 0.0
    return total, local


def summed(samples: list[tuple[dict[str, str], float]], label: str) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    for labels, value in samples:
        totals[labels.get(label, "")] += value
    return dict(sorted(totals.items()))


def parse_recent(text: str) -> tuple[RecentAnswer, ...]:
    """NGINX's /recent: one tab-separated answer a line, oldest first; shown newest first."""
    answers = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) != 8:
            continue
        try:
            answers.append(RecentAnswer(float(parts[0]), *parts[1:]))
        except ValueError:
            continue
    return tuple(sorted(answers, key=lambda answer: answer.at, reverse=True))


def summarize_pins(entries: list[PinEntry], repositories: int, now: float, settings: Settings) -> PinAges:
    bound, refresh = settings.routing.max_tag_age, settings.routing.max_tag_age * settings.routing.refresh_fraction
    states: dict[str, int] = defaultdict(int)
    rows = []
    ages = []
    for entry in entries:
        age = max(0.0, now - entry.confirmed_at)
        state = pin_state(entry, age, bound, refresh)
        states[state] += 1
        if entry.digest:
            ages.append(age)
            rows.append((entry.repository, entry.tag, entry.digest, age, state))
    rows.sort(key=lambda row: (-row[3], row[0], row[1]))
    return PinAges(
        pins=len(ages),
        fresh=states["fresh"],
        within_bound=states["refresh due"],
        past_bound=states["past the bound"],
        unconfirmed=states["unconfirmed"],
        tombstones=states["tombstone"],
        oldest=max(ages) if ages else None,
        rows=tuple(rows[:PIN_ROWS]),
        repositories_read=min(repositories, PIN_REPOSITORIES),
        repositories=repositories,
    )


def pin_state(entry: PinEntry, age: float, bound: float, refresh: float) -> str:
    if not entry.digest:
        return "tombstone"
    if not entry.current:
        return "unconfirmed"
    if age > bound:
        return "past the bound"
    return "fresh" if age <= refresh else "refresh due"


# --- the terminal rendering ---


def format_status(status: SiteStatus) -> str:
    lines = [f"geo-route status at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(status.generated_at))}"]
    lines += format_traffic(status.traffic)
    lines += format_updater(status)
    lines += format_pins(status.pins, status.max_tag_age)
    lines += format_topology(status.topology)
    lines += [f"problem: {problem}" for problem in status.problems]
    return "\n".join(lines) + "\n"


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f} %"


def size(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def seconds(value: float | None) -> str:
    if value is None:
        return "never"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    return f"{value / 60:.1f} min" if value < 7200 else f"{value / 3600:.1f} h"


def format_traffic(traffic: Traffic | None) -> list[str]:
    if traffic is None:
        return ["traffic: unknown (NGINX's counters could not be read)"]
    lines = [
        f"hit ratio: {percent(traffic.hit_ratio)} of {traffic.reads:.0f} blob and manifest reads served here "
        f"({percent(traffic.byte_hit_ratio)} of their bytes)",
        f"bytes saved: {size(traffic.bytes_saved)} sent from this site's registry instead of the primary",
        "requests by route: " + (", ".join(f"{r} {n:.0f}" for r, n in traffic.requests.items()) or "none"),
        "bytes by route: " + (", ".join(f"{r} {size(n)}" for r, n in traffic.sent_bytes.items()) or "none"),
        "fallbacks by cause: "
        + (", ".join(f"{cause} {n:.0f}" for cause, n in traffic.fallback_causes.items()) or "none"),
    ]
    for answer in traffic.recent[:10]:
        when = time.strftime("%H:%M:%S", time.gmtime(answer.at))
        lines.append(
            f"  {when} {answer.route:<16} {answer.method:<5} {answer.operation:<18} local {answer.local_status:<5} "
            f"{answer.cause:<12} -> {answer.status} (request {answer.request_id})"
        )
    return lines


def format_updater(status: SiteStatus) -> list[str]:
    lines = []
    for source in ("local", "primary"):
        record = status.records.get(f"events:{source}")
        if record is None:
            lines.append(f"notification lag ({source}): no event yet")
        else:
            lines.append(
                f"notification lag ({source}): {seconds(float(record.fields.get('lag', 0)))} "
                f"(last event {seconds(status.record_age(f'events:{source}'))} ago)"
            )
    for name, what in (("reconcile", "last reconciliation"), ("verify", "last verification")):
        record = status.records.get(name)
        if record is None:
            lines.append(f"{what}: never")
            continue
        lines.append(f"{what}: {seconds(status.record_age(name))} ago, {describe_run(record)}")
    figures = status.figures
    if figures is not None:
        lines.append(
            f"resolution queue: {figures.resolutions} ({figures.resolutions_due} due, the oldest waiting "
            f"{seconds(figures.resolutions_oldest_due)}); verification queue: {figures.suspects}; "
            f"quarantined: {figures.quarantined}"
        )
    return lines


def describe_run(record: StatusRecord) -> str:
    """A reconciliation's or verification pass' record: its verdict, then its figures."""
    fields = record.fields
    verdict = "ok" if fields.get("ok") else "cancelled" if fields.get("cancelled") else "problems"
    details = ", ".join(
        f"{key.replace('_', ' ')} {value}" for key, value in fields.items() if key not in ("ok", "cancelled")
    )
    return f"{verdict} ({details})"


def format_pins(pins: PinAges | None, bound: int) -> list[str]:
    if pins is None:
        return ["pins: unknown"]
    read = "" if pins.repositories_read == pins.repositories else f" (first {pins.repositories_read} repositories)"
    lines = [
        f"pins: {pins.pins}{read}, {pins.fresh} fresh, {pins.within_bound} due for refresh, "
        f"{pins.past_bound} past the bound ({bound} s), {pins.unconfirmed} unconfirmed, {pins.tombstones} "
        f"tombstones; oldest {seconds(pins.oldest)}"
    ]
    lines += [f"  {repo}:{tag} {digest[:19]} {seconds(age)} {state}" for repo, tag, digest, age, state in pins.rows]
    return lines


def format_topology(topology: RedisTopology | None) -> list[str]:
    if topology is None:
        return ["redis: unknown"]
    primary = "primaries" if topology.mode == "cluster" else "primary"
    lines = [
        f"redis: {topology.mode}, {primary} {topology.primary} ({topology.role or '?'}, Redis {topology.version}, "
        f"{topology.used_memory} used), {len(topology.replicas)} replicas"
    ]
    lines += [f"  replica {replica}" for replica in topology.replicas]
    if topology.mode == "sentinel":
        lines.append(f"  master name {topology.master_name}")
        lines += [f"  sentinel {address}: primary {answer}" for address, answer in topology.sentinels]
    return lines
