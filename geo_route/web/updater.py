"""The index updater's HTTP side: ``POST /events/local`` and ``POST /events/primary``.

Every dialect's envelope is accepted whatever its ``Content-Type`` says (2.8 and GitLab send
``application/vnd.docker.distribution.events.v1+json``, 3.0 ``…events.v2+json``): the body is read
as JSON either way, and one that is not an envelope is acknowledged and ignored. Nothing of an
event but its target is read, so GitLab's ``actor.user`` (a JWT) is never logged or stored.

Answers as the registry's retry loop needs them (protocol notes §1.4): 200 for everything accepted
or deliberately ignored (a malformed event is logged and counted, never bounced back forever), 401
for a wrong secret, 413 for an oversized body, 503 only when the index is unavailable, so the
registry retries later. An envelope is applied in one transaction or not at all.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, jsonify, request

from geo_route.config import Settings
from geo_route.errors import IndexUnavailable
from geo_route.index.model import IndexStore, IndexUpdate, StatusRecorder
from geo_route.lru import Lru
from geo_route.updater.notifications import EnvelopeError, Outcome, Source, interpret_events, parse_envelope
from geo_route.web.app import readiness
from geo_route.web.metrics import IndexGauges, UpdaterMetrics

log = logging.getLogger("geo_route.updater")


class RecentEventIds:
    """A bounded memory of event ids already applied (per process), to skip redeliveries."""

    def __init__(self, size: int) -> None:
        self._ids: Lru[str, None] = Lru(size)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._ids)

    def seen(self, event_id: str) -> bool:
        with self._lock:
            return event_id in self._ids

    def remember(self, event_ids: list[str]) -> None:
        with self._lock:
            for event_id in event_ids:
                self._ids.put(event_id, None)


class EventsEndpoint:
    """One notification endpoint: its source, its secret, the shared index and metrics."""

    def __init__(
        self,
        source: Source,
        secret: str,
        settings: Settings,
        index: IndexStore,
        metrics: UpdaterMetrics,
        recent: RecentEventIds,
        clock: Callable[[], float],
    ) -> None:
        self.source = source
        self._secret = secret.encode()
        self._max_body = settings.updater.max_body_bytes
        self._index = index
        self._metrics = metrics
        self._recent = recent
        self._clock = clock

    def __call__(self) -> Response | tuple[Response, int]:
        if not self.authorized(request.headers.get("Authorization", "")):
            return self.refuse(401, "unauthorized", "wrong or missing secret")
        body = request.stream.read(self._max_body + 1)
        if len(body) > self._max_body or (request.content_length or 0) > self._max_body:
            return self.refuse(413, "too-large", f"body larger than {self._max_body} bytes")
        received_at = self._clock()
        try:
            outcomes = interpret_events(parse_envelope(body), self.source, received_at)
        except EnvelopeError as exc:
            log.warning("%s: ignoring a body that is not an envelope: %s", self.source.value, exc)
            self._metrics.rejected.labels(self.source.value, "not-an-envelope").inc()
            return jsonify(status="ignored", reason=str(exc)[:200])
        fresh, duplicates = self.split_duplicates(outcomes)
        updates: list[IndexUpdate] = [update for outcome in fresh for update in outcome.updates]
        started = time.perf_counter()
        try:
            if updates:
                self._index.apply(updates)
        except IndexUnavailable as exc:
            log.warning("%s: index unavailable, asking the registry to retry: %s", self.source.value, exc)
            return self.refuse(503, "index-unavailable", "index unavailable; retry later")
        self._metrics.apply_seconds.observe(time.perf_counter() - started)
        self._recent.remember([self.dedupe_key(o) for o in fresh if o.event is not None and o.event.id])
        self.count(fresh, duplicates, received_at, applied=bool(updates))
        return jsonify(summary(fresh, duplicates))

    def authorized(self, header: str) -> bool:
        return hmac.compare_digest(header.encode("utf-8", "surrogateescape"), self._secret)

    def split_duplicates(self, outcomes: list[Outcome]) -> tuple[list[Outcome], list[Outcome]]:
        fresh: list[Outcome] = []
        duplicates: list[Outcome] = []
        for outcome in outcomes:
            event_id = outcome.event.id if outcome.event is not None else ""
            (duplicates if event_id and self._recent.seen(self.dedupe_key(outcome)) else fresh).append(outcome)
        return fresh, duplicates

    def dedupe_key(self, outcome: Outcome) -> str:
        """Ids are remembered per endpoint: two registries' events never shadow each other."""
        return f"{self.source.value} {outcome.event.id if outcome.event is not None else ''}"

    def count(self, fresh: list[Outcome], duplicates: list[Outcome], received_at: float, applied: bool) -> None:
        source = self.source.value
        lags = []
        for outcome in fresh:
            self._metrics.events.labels(source, outcome.action, outcome.status).inc()
            if outcome.status == "malformed":
                log.warning("%s: malformed event ignored: %s", source, outcome.problem)
            elif outcome.event is not None and outcome.event.timestamp is not None:
                lags.append(max(0.0, received_at - outcome.event.timestamp))
                self._metrics.lag_seconds.labels(source).observe(lags[-1])
        if duplicates:
            self._metrics.duplicates.labels(source).inc(len(duplicates))
        if lags and applied:
            self.record_lag(lags)

    def record_lag(self, lags: list[float]) -> None:
        """The lag of an envelope that changed the index, for ``geo-route status`` (one small write
        after the envelope's transaction; best effort: the envelope is applied either way)."""
        if not isinstance(self._index, StatusRecorder):
            return
        try:
            self._index.record_status(f"events:{self.source.value}", {"lag": lags[-1], "max_lag": max(lags)})
        except IndexUnavailable as exc:
            log.debug("%s: could not record the notification lag: %s", self.source.value, exc)

    def refuse(self, status: int, reason: str, message: str) -> tuple[Response, int]:
        self._metrics.rejected.labels(self.source.value, reason).inc()
        return jsonify(status="refused", reason=message), status


def summary(fresh: list[Outcome], duplicates: list[Outcome]) -> dict[str, Any]:
    counts = {"applied": 0, "ignored": 0, "malformed": 0}
    for outcome in fresh:
        counts[outcome.status] += 1
    return {"status": "ok", **counts, "duplicates": len(duplicates)}


def index_gauges(index: IndexStore) -> IndexGauges | None:
    """The queues and last runs, read from the index at scrape time (a test double has none)."""
    from geo_route.index.redis_store import RedisIndexStore

    return IndexGauges(index.figures, index.status_records) if isinstance(index, RedisIndexStore) else None


def create_updater_app(
    settings: Settings, *, index: IndexStore | None = None, clock: Callable[[], float] = time.time
) -> Flask:
    app = Flask("geo_route.updater")
    if index is None:
        from geo_route.index.redis_store import RedisIndexStore

        index = RedisIndexStore(settings.redis)
    metrics = UpdaterMetrics(index_gauges(index))
    recent = RecentEventIds(settings.updater.dedupe_size)
    app.extensions["geo_route"] = {"settings": settings, "index": index, "metrics": metrics}
    for source, secret in (
        (Source.LOCAL, settings.updater.local_secret),
        (Source.PRIMARY, settings.updater.primary_secret),
    ):
        endpoint = EventsEndpoint(source, secret, settings, index, metrics, recent, clock)
        app.add_url_rule(f"/events/{source.value}", f"events_{source.value}", endpoint, methods=["POST"])
    app.add_url_rule("/healthz", "healthz", lambda: Response(b"ok\n", 200, mimetype="text/plain"))
    app.add_url_rule("/readyz", "readyz", lambda: readiness(index))
    app.add_url_rule("/metrics", "metrics", lambda: Response(metrics.render(), 200, content_type=metrics.content_type))
    return app
