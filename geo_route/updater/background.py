"""The updater's background work in each gunicorn worker: the resolver, the reconcile loop and
content verification."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from geo_route.config import Settings
from geo_route.errors import GeoRouteError
from geo_route.updater.reconcile import Registries, open_store
from geo_route.updater.reconcile_cycle import ReconcileLoop
from geo_route.updater.resolver import Resolver, ResolverLoop
from geo_route.updater.verify import Observer, RateLimiter, Verifier, VerifyLoop

log = logging.getLogger("geo_route.updater")


@dataclass
class BackgroundLoops:
    resolver: ResolverLoop | None
    reconcile: ReconcileLoop | None
    registries: Registries | None = None
    verify: VerifyLoop | None = None

    @classmethod
    def start(cls, settings: Settings, observe: Observer | None = None) -> BackgroundLoops:
        """The resolver always (without ``updater.signing_key`` tags are never pinned: every tag
        read goes to the primary, which is logged); reconciliation when its interval is set;
        verification when its rate is set (``observe`` counts its results)."""
        resolver = None
        try:
            registries = Registries.from_settings(settings)
        except GeoRouteError as exc:
            log.error("tag resolution is off (every tag is served by the primary): %s", exc)
        else:
            updater = settings.updater
            worker = Resolver(
                open_store(settings),
                registries.primary,
                concurrency=updater.resolve_concurrency,
                batch=updater.resolve_batch,
                claim_seconds=updater.resolve_claim_seconds,
            )
            resolver = ResolverLoop(worker)
            resolver.start()
        reconcile = ReconcileLoop(settings) if settings.updater.reconcile_interval > 0 else None
        if reconcile is not None:
            reconcile.start()
        verify = None
        if resolver is not None and settings.updater.verify_bytes_per_second > 0:
            verify = start_verification(settings, registries, observe)
        return cls(resolver, reconcile, None if resolver is None else registries, verify)

    def stop(self) -> None:
        for loop in (self.verify, self.resolver, self.reconcile):
            if loop is not None:
                loop.stop()
        if self.registries is not None:
            self.registries.close()


def start_verification(settings: Settings, registries: Registries, observe: Observer | None) -> VerifyLoop:
    """The pass reads at most ``updater.verify_bytes_per_second``, what refetches queued at most
    ``updater.verify_refetch_bytes_per_second``."""
    updater, trust = settings.updater, settings.routing.refetch_trust
    store = open_store(settings)

    def verifier(rate: int) -> Verifier:
        return Verifier(store, registries.local, RateLimiter(rate), trust=trust, observe=observe)

    passes, refetches = verifier(updater.verify_bytes_per_second), verifier(updater.verify_refetch_bytes_per_second)
    loop = VerifyLoop(store, passes, refetches, lease=updater.reconcile_lease, interval=updater.verify_interval)
    loop.start()
    return loop
