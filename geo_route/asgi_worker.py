"""gunicorn's ASGI worker with the listen backlog it was configured with (``server.worker_class: asgi``).

gunicorn's ``ASGIWorker`` hands its listening sockets to ``loop.create_server`` without a backlog, and
asyncio then calls ``listen(100)`` on them again: past 100 connections waiting to be accepted, a
connect to a Unix socket fails at once (EAGAIN: NGINX answers the subrequest 502, the request goes
to the primary as ``auth-unavailable``) and a TCP SYN is dropped (a second's retransmission). This
worker passes ``server.backlog`` (2048) instead, as the sync and gthread workers have it from the
arbiter's ``listen``. Nothing else differs.
"""

from __future__ import annotations

from typing import Any

from gunicorn.workers.gasgi import ASGIWorker


class AsgiWorker(ASGIWorker):  # type: ignore[misc]
    def load_wsgi(self) -> None:
        """Load the app (gunicorn's own), then give every server the loop creates the configured backlog."""
        super().load_wsgi()
        create_server = self.loop.create_server
        backlog = self.cfg.backlog

        async def create_server_with_backlog(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("backlog", backlog)
            return await create_server(*args, **kwargs)

        self.loop.create_server = create_server_with_backlog
