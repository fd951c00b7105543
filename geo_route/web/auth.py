"""GET /auth: the NGINX ``auth_request`` endpoint. Answers only 200 or 401, never a 5xx."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from flask import Response, request

from geo_route import contract
from geo_route.errors import IndexUnavailable
from geo_route.index.model import NOT_ASKED, UNAVAILABLE, IndexStore, IndexView
from geo_route.operations import Kind, Operation, classify_request
from geo_route.routing import Decision, Policy, Reason, authorize, index_query, primary, route
from geo_route.tokens import TokenVerifier
from geo_route.web.metrics import Metrics

log = logging.getLogger("geo_route.auth")


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

    def __call__(self) -> Response:
        started = time.perf_counter()
        headers = request.headers
        operation = Operation(Kind.UNRECOGNIZED, "")
        try:
            operation = classify_request(
                headers.get(contract.ORIGINAL_METHOD, ""), headers.get(contract.ORIGINAL_URI, "")
            )
            decision = self.decide(operation, headers.get(contract.AUTHORIZATION))
        except Exception:  # the contract: even a bug routes to the primary, never a 5xx
            log.exception("decision failed for %s %s; routing to primary", operation.method, operation.kind.value)
            decision = primary(Reason.INTERNAL_ERROR)
        route_label = decision.route.value if decision.route else "denied"
        self._metrics.decisions.labels(route_label, decision.reason, operation.kind.value).inc()
        self._metrics.decision_seconds.observe(time.perf_counter() - started)
        return respond(decision)

    def decide(self, operation: Operation, authorization: str | None) -> Decision:
        credential = self._verifier.authenticate(authorization)
        denial = authorize(operation, credential, self._policy)
        if denial is not None:
            return denial
        return route(operation, self.look_up(operation), self._policy, self._clock())

    def look_up(self, operation: Operation) -> IndexView:
        query = index_query(operation, self._policy)
        if query is None:
            return NOT_ASKED
        try:
            return self._index.lookup(query)
        except IndexUnavailable as exc:
            self._metrics.index_errors.inc()
            log.warning("index unavailable, routing to primary: %s", exc)
            return UNAVAILABLE


def respond(decision: Decision) -> Response:
    headers = {contract.REASON: decision.reason}
    if decision.route is not None:
        headers[contract.ROUTE] = decision.route.value
    if decision.upstream_path:
        headers[contract.UPSTREAM_PATH] = decision.upstream_path
    if decision.www_authenticate:
        headers[contract.WWW_AUTHENTICATE] = decision.www_authenticate
    return Response(b"", decision.status, headers)
