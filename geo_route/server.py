"""Run the auth service under gunicorn (``geo-route serve``)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from gunicorn.app.base import BaseApplication

from geo_route.config import Settings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
UNIX_SOCKET_UMASK = 0o117  # a unix: bind's socket: 0660
GRACEFUL_STOP_SECONDS = 2  # nginx.auth_timeout's default: no decision in flight waits longer
WORKER_CLASSES = {  # server.worker_class -> gunicorn's worker_class
    "httptools": "geo_route.http_worker.HttpWorker",
    "asgi": "geo_route.asgi_worker.AsgiWorker",
}


def prepare_multiprocess_metrics() -> None:
    """Give gunicorn's workers one metrics directory; must run before prometheus_client is imported."""
    if os.environ.get(MULTIPROC_ENV):
        return
    directory = tempfile.mkdtemp(prefix="geo-route-metrics-")
    os.environ[MULTIPROC_ENV] = directory
    atexit.register(remove_in_process, directory, os.getpid())


def remove_in_process(directory: str, pid: int) -> None:
    """Remove ``directory`` when process ``pid`` (gunicorn's master) exits, not when a worker does: a
    worker inherits the atexit handler and leaves by ``sys.exit`` (a worker failing to boot took the
    directory with it, and the next worker then failed to boot on its missing files)."""
    if os.getpid() == pid:
        shutil.rmtree(directory, ignore_errors=True)


def assign_worker_socket(arbiter: Any, worker: Any) -> None:
    """In gunicorn's master, before a worker forks: the number of the worker socket it serves
    (``server.socket_per_worker``): the one fewest live workers serve, the lowest of those (a replaced
    worker's socket goes to its successor; while both run, e.g. after a HUP, they share it)."""
    workers = getattr(arbiter, "num_workers", 1) or 1
    served = [0] * workers
    for other in arbiter.WORKERS.values():
        number = getattr(other, "geo_route_socket", None)
        if number is not None and number < workers:
            served[number] += 1
    worker.geo_route_socket = served.index(min(served))


def mark_worker_dead(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


class GunicornServer(BaseApplication):  # type: ignore[misc]
    """A gunicorn application that builds the WSGI app once per worker with ``load_app``."""

    def __init__(self, options: dict[str, Any], load_app: Callable[[], Any]) -> None:
        self.options = options
        self.load_app = load_app
        super().__init__()

    def load_config(self) -> None:
        options = {"accesslog": None, "child_exit": mark_worker_dead, **self.options}
        if "control_socket_disable" in self.cfg.settings:  # gunicorn >= 25: no shared ~/.gunicorn socket
            options["control_socket_disable"] = True
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return self.load_app()


def serve(settings: Settings) -> None:
    """The auth service (``geo-route serve``)."""
    prepare_multiprocess_metrics()  # before prometheus_client is imported
    from geo_route.web.app import create_app, create_asgi_app, create_auth_service

    server = settings.server
    builders = {"httptools": create_auth_service, "asgi": create_asgi_app}
    build = builders.get(server.worker_class, create_app)
    options = {
        "bind": [*server.bind, *settings.worker_sockets],  # each worker serves one of the latter (socket_per_worker)
        "pre_fork": assign_worker_socket,
        "workers": server.workers,
        "threads": server.threads,
        "worker_class": WORKER_CLASSES.get(server.worker_class, server.worker_class),
        "timeout": server.timeout,
        "backlog": server.backlog,
        "reuse_port": server.reuse_port,
        "keepalive": server.keepalive,
        "loglevel": server.log_level,
        "proc_name": "geo-route-auth",
        # A unix: bind's socket is created srw-rw---- (the service's user and group: NGINX's workers
        # must run as one of them); the umask applies to gunicorn's socket files only.
        "umask": UNIX_SOCKET_UMASK,
        # asyncio, not uvloop (which gunicorn would pick when installed): a uvloop worker loses a SIGTERM
        # that arrives while it loads the app (seen: a stop right after a start hung until SIGKILL).
        "asgi_loop": "asyncio",
        # A stopping ASGI worker keeps answering on NGINX's kept-alive connections until they close or
        # this passes: a decision takes milliseconds, so a stopped service is gone within seconds (then
        # NGINX routes to the primary, auth-unavailable) rather than gunicorn's default 30 s.
        "graceful_timeout": GRACEFUL_STOP_SECONDS,
    }
    GunicornServer(options, lambda: build(settings)).run()


def serve_updater(settings: Settings) -> None:
    """The index updater (``geo-route updater``): notification endpoints plus the reconcile loop."""
    prepare_multiprocess_metrics()  # before prometheus_client is imported
    from geo_route.web.updater import create_updater_app

    updater = settings.updater
    options = {
        "bind": list(updater.bind),
        "workers": updater.workers,
        "worker_class": "sync",
        "timeout": 60,
        "loglevel": updater.log_level,
        "proc_name": "geo-route-updater",
        "post_worker_init": lambda worker: start_background_loops(settings, worker),
        "worker_exit": lambda server, worker: stop_background_loops(worker),
    }
    GunicornServer(options, lambda: create_updater_app(settings)).run()


def start_background_loops(settings: Settings, worker: Any) -> None:
    """Every worker resolves tags (claims are atomic) and may reconcile (a lease in the index lets
    one reconciliation run at a time). ``stop_background_loops`` ends them when the worker exits,
    so a stopped updater releases its reconcile lease instead of leaving it to expire."""
    from geo_route.updater.background import BackgroundLoops
    from geo_route.web.metrics import VerificationMetrics

    worker.geo_route_loops = BackgroundLoops.start(settings, VerificationMetrics())


def stop_background_loops(worker: Any) -> None:
    loops = getattr(worker, "geo_route_loops", None)
    if loops is not None:
        loops.stop()
