"""Tag resolution: ask the primary what a queued tag points at, and pin the answer.

The queue is in the index (``RedisIndexStore.claim_resolutions``): events and writes through the
site invalidate a tag and queue it; a read of a tag whose pin is missing, unconfirmed or due for
refresh queues it in the same round trip as its decision. Each resolution is stamped with the
index's clock when it is claimed, before the question is sent, so an invalidation that happens
while it is in flight is newer and wins (docs/consistency.md). Several updater workers and nodes
claim from one queue; a claim is atomic, so none is asked twice at once. A claim is not a removal:
the tag stays queued, due again when the claim ends (``updater.resolve_claim_seconds``), and its
pin or requeue releases it; so a resolution claimed by an updater that dies, or whose write Redis
fails, is claimed again by any updater then, never lost.

An event's digest is a hint: the primary announces a tagged push before it writes the tag link
(protocol notes §1.3), so an answer other than the hint is asked again (``HINT_RETRIES`` times,
backing off) before it is pinned. A failed question is asked again after ``ERROR_DELAY``; the tag
stays unpinned meanwhile (its reads go to the primary).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from geo_route.errors import GeoRouteError, IndexUnavailable
from geo_route.index.model import IndexUpdate, PrimaryTag, TagResolution
from geo_route.index.redis_store import CLAIM_SECONDS
from geo_route.updater.registry_client import ManifestHead, RegistryError

HINT_RETRIES = 3
HINT_RETRY_DELAY = 0.5  # seconds, doubled per attempt
ERROR_DELAY = 5.0
IDLE_WAIT = 0.2  # seconds between polls of an empty queue
log = logging.getLogger("geo_route.resolver")


class TagSource(Protocol):
    """The primary, as resolution asks it (``RegistryClient`` is one)."""

    def head_manifest(self, repository: str, reference: str) -> ManifestHead | None: ...


class ResolutionStore(Protocol):
    def claim_resolutions(self, limit: int, seconds: float) -> list[TagResolution]: ...
    def requeue(self, resolution: TagResolution, delay: float, attempts: int | None = None) -> None: ...
    def apply(self, updates: Iterable[IndexUpdate]) -> None: ...


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with one answer: pin it, or ask again after ``delay`` (with ``attempts``)."""

    pin: PrimaryTag | None = None
    delay: float = 0.0
    attempts: int | None = None
    outcome: str = "pinned"  # pinned | tombstoned | retried | failed


def judge(resolution: TagResolution, answer: ManifestHead | GeoRouteError | None) -> Verdict:
    """Pure: the verdict on the primary's answer to one resolution."""
    if isinstance(answer, GeoRouteError):
        return Verdict(delay=ERROR_DELAY, outcome="failed")
    digest = answer.digest if answer is not None else ""
    if resolution.hint and digest != resolution.hint and resolution.attempts < HINT_RETRIES:
        return Verdict(
            delay=HINT_RETRY_DELAY * 2**resolution.attempts, attempts=resolution.attempts + 1, outcome="retried"
        )
    hint = f"{resolution.hint} {resolution.attempts}" if resolution.hint else ""
    media_type = answer.media_type if answer is not None else ""
    pin = PrimaryTag(
        resolution.repository,
        resolution.tag,
        digest,
        resolution.asked_at,
        media_type,
        hint,
        resolution.epoch,
        resolution.claimed_until,
    )
    return Verdict(pin=pin, outcome="pinned" if digest else "tombstoned")


class Resolver:
    """Claims due resolutions in batches and asks the primary ``concurrency`` at a time."""

    def __init__(
        self,
        store: ResolutionStore,
        source: TagSource,
        *,
        concurrency: int = 8,
        batch: int = 64,
        claim_seconds: float = CLAIM_SECONDS,
    ) -> None:
        self.store = store
        self.source = source
        self.batch = batch
        self.claim_seconds = claim_seconds
        self.counts: Counter[str] = Counter()
        self._pool = ThreadPoolExecutor(concurrency, "geo-route-resolve")

    def resolve_due(self) -> int:
        """Resolve what is due now; the number of resolutions claimed."""
        claimed = self.store.claim_resolutions(self.batch, self.claim_seconds)
        if not claimed:
            return 0
        answers = list(self._pool.map(self.ask, claimed))
        verdicts = [judge(resolution, answer) for resolution, answer in zip(claimed, answers, strict=True)]
        self.store.apply([verdict.pin for verdict in verdicts if verdict.pin is not None])
        for resolution, verdict in zip(claimed, verdicts, strict=True):
            self.counts[verdict.outcome] += 1
            if verdict.pin is None:
                self.store.requeue(resolution, verdict.delay, verdict.attempts)
        return len(claimed)

    def ask(self, resolution: TagResolution) -> ManifestHead | GeoRouteError | None:
        try:
            return self.source.head_manifest(resolution.repository, resolution.tag)
        except RegistryError as exc:
            log.warning("resolve %s:%s at the primary: %s", resolution.repository, resolution.tag, exc)
            return exc

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class ResolverLoop:
    """``Resolver.resolve_due`` in a daemon thread until ``stop()``; idle polls every ``IDLE_WAIT``."""

    def __init__(self, resolver: Resolver, idle_wait: float = IDLE_WAIT) -> None:
        self.resolver = resolver
        self.idle_wait = idle_wait
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run_until_stopped, name="geo-route-resolver", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self.resolver.close()

    def run_until_stopped(self) -> None:
        while not self._stop.is_set():
            try:
                if self.resolver.resolve_due():
                    continue
            except IndexUnavailable as exc:
                log.warning("resolver: index unavailable: %s", exc)
            except Exception:  # the loop must outlive a bug in one batch
                log.exception("resolver: unexpected error")
            self._stop.wait(self.idle_wait)
