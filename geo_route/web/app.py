"""``create_app``: the Flask application factory. Dependencies live on the app, not in modules."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response

from geo_route.config import Settings
from geo_route.index.model import IndexStore
from geo_route.routing import Policy
from geo_route.status import StatusSource
from geo_route.tokens import TokenVerifier
from geo_route.web.auth import AuthEndpoint, mount_auth
from geo_route.web.metrics import Metrics
from geo_route.web.status import status_view


def create_app(
    settings: Settings,
    *,
    index: IndexStore | None = None,
    verifier: TokenVerifier | None = None,
    clock: Callable[[], float] = time.time,
) -> Flask:
    """The auth service. Keys are loaded and the Redis pool is built once, here."""
    app = Flask("geo_route")
    metrics = Metrics()
    metrics.tag_age_bound.set(settings.routing.max_tag_age)
    if verifier is None:
        verifier = TokenVerifier.from_settings(
            settings.token,
            clock=clock,
            on_cache=metrics.count_token_cache,
            on_cache_entries=metrics.token_cache_entries.set,
        )
    if index is None:
        from geo_route.index.redis_store import RedisIndexStore

        index = RedisIndexStore(settings.redis)
    app.extensions["geo_route"] = {"settings": settings, "index": index, "verifier": verifier, "metrics": metrics}

    auth = AuthEndpoint(Policy.from_settings(settings), verifier, index, metrics, clock)
    app.extensions["geo_route"]["auth"] = auth
    app.wsgi_app = mount_auth(app.wsgi_app, auth)  # type: ignore[method-assign]
    app.add_url_rule("/healthz", "healthz", lambda: Response(b"ok\n", 200, mimetype="text/plain"))
    app.add_url_rule("/readyz", "readyz", lambda: readiness(index))
    app.add_url_rule("/metrics", "metrics", lambda: Response(metrics.render(), 200, content_type=metrics.content_type))
    app.add_url_rule("/status", "status", status_view(settings, status_store_opener(settings)))
    return app


def create_asgi_app(settings: Settings) -> Any:
    """The auth service for gunicorn's ASGI worker (``server.worker_class: asgi``): ``/auth`` on the
    event loop, the rest of ``create_app``'s Flask app behind it."""
    from geo_route.web.asgi import AsgiService

    app = create_app(settings)
    return AsgiService(app.extensions["geo_route"]["auth"], app)


@dataclass(frozen=True)
class AuthService:
    """What the event-loop worker (``server.worker_class: httptools``) serves: ``/auth`` from its
    own HTTP layer (``geo_route.web.protocol``), every other path from the Flask app."""

    auth: AuthEndpoint
    wsgi_app: Callable[..., Any]
    worker_sockets: tuple[str, ...] = ()  # Settings.worker_sockets: worker N serves the Nth of these only


def create_auth_service(settings: Settings) -> AuthService:
    app = create_app(settings)
    return AuthService(app.extensions["geo_route"]["auth"], app, settings.worker_sockets)


def status_store_opener(settings: Settings) -> Callable[[], StatusSource]:
    """A store of its own for /status, opened on first use, with reconciliation's longer timeouts
    (it reads whole hashes; the decision path's store keeps its short ones)."""
    opened: list[StatusSource] = []
    lock = threading.Lock()

    def store() -> StatusSource:
        with lock:
            if not opened:
                from geo_route.updater.reconcile import open_store

                opened.append(open_store(settings))
            return opened[0]

    return store


def readiness(index: IndexStore) -> Response:
    if index.ping():
        return Response(b"ready\n", 200, mimetype="text/plain")
    return Response(b"index unavailable\n", 503, mimetype="text/plain")
