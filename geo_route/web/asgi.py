"""The auth service as an ASGI application, for ``server.worker_class: asgi`` (gunicorn's asyncio worker).

NGINX's subrequests arrive on kept-alive connections (its ``keepalive`` upstream), and gunicorn's
ASGI worker serves them on one event loop per worker without a thread hand-off, a graceful close or
a new connection per decision: the cheapest of gunicorn's own workers per request (the default,
``server.worker_class: httptools``, also drops gunicorn's ASGI protocol: geo_route/web/protocol.py).
``GET /auth`` is answered here by the same ``AuthEndpoint.answer`` the WSGI path uses, called
synchronously: a decision is CPU and one Redis round trip on loopback with a short timeout, as it
is in a sync worker, so the loop serves one decision at a time per worker. Every other path
(``/healthz``, ``/readyz``, ``/metrics``) is the Flask app, run by a2wsgi in its thread pool.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from a2wsgi import WSGIMiddleware

from geo_route.web.auth import AuthEndpoint

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

EMPTY_BODY = {"type": "http.response.body", "body": b""}


class AsgiService:
    """``/auth`` answered on the event loop; anything else handed to the WSGI app."""

    def __init__(self, auth: AuthEndpoint, wsgi_app: Callable[..., Any]) -> None:
        self._auth = auth
        self._wsgi = WSGIMiddleware(wsgi_app)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
        elif scope["type"] == "http" and scope["path"] == "/auth" and scope["method"] in ("GET", "HEAD"):
            await send(self.answer_auth(scope["headers"]))
            await send(EMPTY_BODY)
        else:
            await self._wsgi(scope, receive, send)  # type: ignore[arg-type]

    def answer_auth(self, raw_headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
        """The response start of one decision, from the subrequest's headers (the first of each)."""
        status, answer = self._auth.answer_raw(raw_headers)
        encoded = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in answer]
        return {"type": "http.response.start", "status": status, "headers": encoded}


async def answer_lifespan(receive: Receive, send: Send) -> None:
    """Nothing to start or stop on the loop: the app's resources are built before it runs."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
