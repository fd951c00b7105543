"""GET /auth: the NGINX ``auth_request`` endpoint. Answers only 200 or 401, never a 5xx.

It runs on every registry request, so it is a plain WSGI callable mounted in front of Flask's
dispatcher (see ``app.create_app``): headers are read straight from the WSGI environ and the answer
is written without building Flask request and response objects. The logic stays in the pure
modules; this is only the translation between HTTP and a ``Decision``.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from geo_route import contract
from geo_route.errors import IndexUnavailable
from geo_route.index.model import NOT_ASKED, UNAVAILABLE, IndexStore, IndexUpdate, IndexView
from geo_route.operations import Kind, Operation, classify_request
from geo_route.routing import (
    Decision,
    Policy,
    Reason,
    authorize,
    cache_seconds,
    index_query,
    invalidations_for_write,
    primary,
    route,
)
from geo_route.tokens import TokenVerifier
from geo_route.web.metrics import Metrics

log = logging.getLogger("geo_route.auth")

StartResponse = Callable[..., Any]
STATUS_LINES = {200: "200 OK", 401: "401 Unauthorized", 403: "403 Forbidden"}
ENV_METHOD = contract.wsgi_environ_key(contract.ORIGINAL_METHOD)
ENV_URI = contract.wsgi_environ_key(contract.ORIGINAL_URI)
ENV_AUTHORIZATION = contract.wsgi_environ_key(contract.AUTHORIZATION)
ENV_ACCEPT = contract.wsgi_environ_key(contract.ACCEPT)
ENV_REFETCH = contract.wsgi_environ_key(contract.REFETCH)
EMPTY_BODY = (b"",)
# The subrequest's headers as raw (lower-case) names, for the HTTP layers that hand over header
# pairs (the ASGI and httptools workers): name -> its place in ``answer``'s arguments.
RAW_SUBREQUEST_HEADERS = {
    contract.asgi_header_name(header): slot
    for slot, header in enumerate(
        (contract.ORIGINAL_METHOD, contract.ORIGINAL_URI, contract.AUTHORIZATION, contract.ACCEPT, contract.REFETCH)
    )
}
# Operations classified lately, by (method, raw URI): classification is pure and costs ~25 us (five
# path patterns, the query), a hit well under 1; pulls repeat the same URIs (every client of an image
# asks for the same manifests and blobs). At most this many (NGINX's header buffers bound each URI).
CLASSIFIED_CACHE_SIZE = 4096


class AuthEndpoint:
    """Headers → operation → credential → (index) → decision → headers."""

    def __init__(
        self,
        policy: Policy,
        verifier: TokenVerifier,
        index: IndexStore,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._policy = policy
        self._verifier = verifier
        self._index = index
        self._metrics = metrics
        self._clock = clock
        self._index_warning = ThrottledWarning(log, interval=10.0)
        self._classify = functools.lru_cache(maxsize=CLASSIFIED_CACHE_SIZE)(classify_request)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        status, headers = self.answer(
            environ.get(ENV_METHOD, ""),
            environ.get(ENV_URI, ""),
            environ.get(ENV_AUTHORIZATION),
            environ.get(ENV_ACCEPT, ""),
            refetch=environ.get(ENV_REFETCH) == "1",
        )
        start_response(STATUS_LINES[status], headers)
        return EMPTY_BODY

    def answer_raw(self, raw_headers: Iterable[tuple[bytes, bytes]]) -> tuple[int, list[tuple[str, str]]]:
        """``answer`` from the subrequest's raw header pairs (the first of each name counts)."""
        wanted: list[str | None] = [None] * len(RAW_SUBREQUEST_HEADERS)
        for name, value in raw_headers:
            slot = RAW_SUBREQUEST_HEADERS.get(name.lower())
            if slot is not None and wanted[slot] is None:
                wanted[slot] = value.decode("latin-1")
        method, uri, authorization, accept, refetch = wanted
        return self.answer(method or "", uri or "", authorization, accept or "", refetch=refetch == "1")

    def answer(
        self, method: str, uri: str, authorization: str | None, accept: str, *, refetch: bool = False
    ) -> tuple[int, list[tuple[str, str]]]:
        """The subrequest's answer from its headers: status and response headers (WSGI and ASGI alike)."""
        started = time.perf_counter()
        operation = Operation(Kind.UNRECOGNIZED, "")
        reuse = 0
        try:
            operation = self._classify(method, uri)
            decision, reuse = self.decide(operation, authorization, accept, refetch=refetch)
        except Exception:  # the contract: even a bug routes to the primary, never a 5xx
            log.exception("decision failed for %s %s; routing to primary", operation.method, operation.kind.value)
            decision = primary(Reason.INTERNAL_ERROR)
        headers = response_headers(decision, reuse, operation.kind.value)
        self._metrics.count_decision(decision, operation.kind.value, time.perf_counter() - started)
        return decision.status, headers

    def decide(
        self, operation: Operation, authorization: str | None, accept: str = "", *, refetch: bool = False
    ) -> tuple[Decision, int]:
        """The decision and how many seconds NGINX may reuse it (see ``routing.cache_seconds``);
        ``refetch``: NGINX's note that this client address fetched the same content just before."""
        credential = self._verifier.authenticate(authorization)
        denial = authorize(operation, credential, self._policy)
        if denial is not None:
            return denial, 0
        now = self._clock()
        self.invalidate(invalidations_for_write(operation, credential, self._policy))
        view = self.look_up(operation, refetch)
        if view.pinned_digest and view.current and view.now:  # a tag read that found a pin
            self._metrics.observe_pin_age(max(0.0, view.now - view.confirmed_at))
        decision = route(operation, view, self._policy, now, accept)
        return decision, cache_seconds(operation, decision, credential, self._policy, now)

    def invalidate(self, updates: tuple[IndexUpdate, ...]) -> None:
        """Take what a write through the site changes off the index before it is proxied."""
        if not updates:
            return
        try:
            self._index.apply(updates)
        except IndexUnavailable as exc:  # the write still goes to the primary; max_tag_age bounds the rest
            self._metrics.index_errors.inc()
            self._index_warning.emit("could not invalidate what a write through the site changes: %s", exc)

    def look_up(self, operation: Operation, refetch: bool = False) -> IndexView:
        query = index_query(operation, self._policy, refetch)
        if query is None:
            return NOT_ASKED
        try:
            return self._index.lookup(query)
        except IndexUnavailable as exc:
            self._metrics.index_errors.inc()
            self._index_warning.emit("index unavailable, routing to primary: %s", exc)
            return UNAVAILABLE


class ThrottledWarning:
    """At most one warning per ``interval`` seconds, saying how many were held back in between."""

    def __init__(self, logger: logging.Logger, interval: float) -> None:
        self._logger = logger
        self._interval = interval
        self._next = 0.0
        self._held_back = 0

    def emit(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._held_back += 1
            return
        held_back, self._held_back, self._next = self._held_back, 0, now + self._interval
        suffix = f" ({held_back} similar warnings held back)" if held_back else ""
        self._logger.warning(message + suffix, *args)


def response_headers(
    decision: Decision, reuse_seconds: int = 0, operation: str = Kind.UNRECOGNIZED.value
) -> list[tuple[str, str]]:
    headers = [
        (contract.REASON, decision.reason),
        (contract.OPERATION, operation),
        ("Content-Length", "0"),
        (contract.REUSE_SECONDS, str(reuse_seconds)),
    ]
    if decision.route is not None:
        headers.append((contract.ROUTE, decision.route.value))
    if decision.upstream_path:
        headers.append((contract.UPSTREAM_PATH, decision.upstream_path))
    if decision.stale_path:
        headers.append((contract.STALE_PATH, decision.stale_path))
    if decision.storage_path:
        headers.append((contract.STORAGE_PATH, decision.storage_path))
        headers.append((contract.STORAGE_LINK, decision.storage_link))
    if decision.www_authenticate:
        headers.append((contract.WWW_AUTHENTICATE, decision.www_authenticate))
        headers.append((contract.UNAUTHORIZED_DETAIL, contract.unauthorized_detail(decision.www_authenticate)))
    return headers


def mount_auth(wsgi_app: Callable[..., Any], endpoint: AuthEndpoint) -> Callable[..., Any]:
    """Serve ``GET /auth`` with ``endpoint`` and pass every other request to ``wsgi_app``."""

    def dispatch(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/auth" and environ.get("REQUEST_METHOD") in ("GET", "HEAD"):
            return endpoint(environ, start_response)
        return wsgi_app(environ, start_response)  # type: ignore[no-any-return]

    return dispatch
