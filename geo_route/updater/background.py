"""The updater's background work in each gunicorn worker: the resolver and the reconcile loop."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from geo_route.config import Settings
from geo_route.errors import GeoRouteError
from geo_route.updater.reconcile import ReconcileLoop, Registries, open_store
from geo_route.updater.resolver import Resolver, ResolverLoop

log = logging.getLogger("geo_route.updater")


@dataclass
class BackgroundLoops:
    resolver: ResolverLoop | None
    reconcile: ReconcileLoop | None
    registries: Registries | None = None

    @classmethod
    def start(cls, settings: Settings) -> BackgroundLoops:
        """The resolver always (without ``updater.signing_key`` tags are never pinned: every tag
        read goes to the primary, which is logged); reconciliation when its interval is set."""
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
            )
            resolver = ResolverLoop(worker)
            resolver.start()
        reconcile = ReconcileLoop(settings) if settings.updater.reconcile_interval > 0 else None
        if reconcile is not None:
            reconcile.start()
        return cls(resolver, reconcile, None if resolver is None else registries)

    def stop(self) -> None:
        for loop in (self.resolver, self.reconcile):
            if loop is not None:
                loop.stop()
        if self.registries is not None:
            self.registries.close()
