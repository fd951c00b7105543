"""Run the auth service under gunicorn (``geo-route serve``)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import Any

from gunicorn.app.base import BaseApplication

from geo_route.config import Settings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiprocess_metrics() -> None:
    """Give gunicorn's workers one metrics directory; must run before prometheus_client is imported."""
    if os.environ.get(MULTIPROC_ENV):
        return
    directory = tempfile.mkdtemp(prefix="geo-route-metrics-")
    os.environ[MULTIPROC_ENV] = directory
    atexit.register(shutil.rmtree, directory, True)


def mark_worker_dead(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


class AuthServer(BaseApplication):  # type: ignore[misc]
    """gunicorn application that builds one ``create_app`` per worker (keys loaded once per worker)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        server = self.settings.server
        options = {
            "bind": list(server.bind),
            "workers": server.workers,
            "threads": server.threads,
            "worker_class": server.worker_class,
            "timeout": server.timeout,
            "backlog": server.backlog,
            "reuse_port": server.reuse_port,
            "keepalive": server.keepalive,
            "loglevel": server.log_level,
            "accesslog": None,
            "child_exit": mark_worker_dead,
            "proc_name": "geo-route-auth",
        }
        if "control_socket_disable" in self.cfg.settings:  # gunicorn >= 25: no shared ~/.gunicorn socket
            options["control_socket_disable"] = True
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from geo_route.web import create_app

        return create_app(self.settings)


def serve(settings: Settings) -> None:
    prepare_multiprocess_metrics()
    AuthServer(settings).run()
