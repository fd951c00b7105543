"""The auth service's gunicorn worker for ``server.worker_class: httptools`` (the default).

gunicorn stays the process manager (master, workers, heartbeat, SIGTERM/SIGINT/SIGQUIT, the
listening sockets with ``server.backlog``); the HTTP of every connection is
``geo_route.web.protocol`` on one asyncio loop per worker. On SIGTERM the worker stops accepting,
answers what arrives on its open connections, closing each after its answer, and exits when none is
left or after ``graceful_timeout`` (2 s).
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

from gunicorn.workers.gasgi import ASGIWorker

from geo_route.web.protocol import Connections, Limits

WSGI_THREADS = 4  # /healthz, /readyz, /metrics, /status: not on the decisions' loop


class HttpWorker(ASGIWorker):  # type: ignore[misc]
    """gunicorn's asyncio worker (its loop, signals and clean-up) serving ``geo_route.web.protocol``."""

    connections: Connections

    def load_wsgi(self) -> None:
        self.service = self.app.wsgi()  # geo_route.web.app.AuthService

    async def _serve(self) -> None:
        cfg = self.cfg
        limits = Limits(cfg.limit_request_line or 1 << 20, cfg.limit_request_fields, cfg.limit_request_field_size)
        executor = ThreadPoolExecutor(WSGI_THREADS, thread_name_prefix="geo-route-wsgi")
        self.connections = Connections(self.service.auth, self.service.wsgi_app, executor, limits, cfg.keepalive)
        for listener in self.sockets:
            server = await self.loop.create_server(
                self.connections.protocol, sock=listener.sock, backlog=cfg.backlog, start_serving=True
            )
            self.servers.append(server)
        try:
            while self.alive:
                self.notify()
                if self.ppid != os.getppid():
                    self.log.info("Parent changed, shutting down: %s", self)
                    break
                self.connections.sweep()
                await asyncio.sleep(1.0)
        except asyncio.CancelledError:
            pass
        await self.stop_serving()
        executor.shutdown(wait=False, cancel_futures=True)

    async def stop_serving(self) -> None:
        """Accept no more; close each open connection after its next answer; wait for them up to
        ``graceful_timeout`` (none on SIGINT/SIGQUIT)."""
        self.connections.alive = False
        for server in self.servers:
            server.close()
        deadline = self.loop.time() + self.cfg.graceful_timeout
        while self.connections.count and not self._quick_shutdown and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.connections.count:
            self.log.info("Closing %d connections at exit", self.connections.count)
