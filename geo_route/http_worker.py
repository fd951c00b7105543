"""The auth service's gunicorn worker for ``server.worker_class: httptools`` (the default).

gunicorn stays the process manager (master, workers, heartbeat, SIGTERM/SIGINT/SIGQUIT, the
listening sockets with ``server.backlog``); the HTTP of every connection is
``geo_route.web.protocol`` on one asyncio loop per worker. On SIGTERM the worker stops accepting,
answers what arrives on its open connections, closing each after its answer, and exits when none is
left or after ``graceful_timeout`` (2 s).

With ``server.socket_per_worker`` each worker also serves a socket of its own, ``PATH.N``, which
NGINX's upstream lists with the others': a worker keeps the connections it accepts, and on one shared
socket the first worker to wake accepted every connection NGINX opened (asyncio accepts up to the
backlog at once), so one core made all the decisions. The master gives each new worker the socket
fewest live workers serve (``server.assign_worker_socket``); the master keeps every socket open, so
connections to a restarting worker's socket wait in its backlog for the successor.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

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
        for listener in self.listeners():
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

    def handle_exit_signal(self) -> None:
        """SIGTERM: from now on each connection closes after its next answer (not a heartbeat later)."""
        super().handle_exit_signal()
        if hasattr(self, "connections"):
            self.connections.alive = False

    def handle_quit_signal(self) -> None:
        super().handle_quit_signal()
        if hasattr(self, "connections"):
            self.connections.alive = False

    def listeners(self) -> list[Any]:
        """gunicorn's listening sockets less the other workers' own (``server.socket_per_worker``)."""
        own = getattr(self, "geo_route_socket", None)  # set in the master by server.assign_worker_socket
        sockets = self.service.worker_sockets
        mine = sockets[own] if own is not None and own < len(sockets) else ""
        return [listener for listener in self.sockets if str(listener) not in sockets or str(listener) == mine]

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
