"""A site's nodes in the development stack: each node an auth service (gunicorn) and an NGINX in front
of it, and an updater, all sharing the one index, the registries and the token service.

Node 1 runs from ``site.yaml`` with its files under ``nginx/``, ``auth/`` and ``updater/``; node N
(2, 3, ...) from ``site-N.yaml``: the same site with its own ports (``server.bind``, ``nginx.listen``,
``nginx.metrics_listen``, ``updater.bind``) and its own NGINX files under ``nginx-N/``. Its parts are
named ``auth-N``, ``nginx-N`` and ``updater-N``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from geo_route.config import load_settings
from geo_route.devstack.processes import (
    LOOPBACK,
    LoggedProcess,
    fetch_from,
    free_port,
    http_get,
    require_binary,
    start_until_ready,
)
from geo_route.render import check_with_nginx, render_nginx_conf

AUTH_SOCKET = "auth.sock"  # a node's Unix socket for NGINX, in its auth/ directory


@dataclass(frozen=True)
class NodeInfo:
    """One node of the site: the URL clients use, its NGINX's files and its updater ("" if none)."""

    number: int
    secondary_url: str
    nginx_access_log: str
    nginx_metrics_url: str
    site_file: str
    auth_url: str
    updater_url: str = ""


def part_name(part: str, number: int) -> str:
    """``auth``, ``nginx`` or ``updater`` of node ``number``: node 1's keep their plain names."""
    return part if number == 1 else f"{part}-{number}"


def nginx_dir(directory: Path, number: int) -> Path:
    return directory / part_name("nginx", number)


def write_node_site(
    directory: Path, site: Path, number: int, overrides: Mapping[str, Mapping[str, Any]] | None = None
) -> Path:
    """Node ``number``'s site file (node 1's is ``site`` itself): the same site with ``overrides`` merged
    into its sections (e.g. another ``server.worker_class``, to compare nodes side by side), on its own
    ports and files: each ``server.bind`` becomes node N's own, a ``unix:`` one its own socket."""
    if number == 1:
        return site
    values: dict[str, Any] = yaml.safe_load(site.read_text(encoding="utf-8"))
    for section, changes in (overrides or {}).items():
        values[section] = {**values.get(section, {}), **changes}
    files = nginx_dir(directory, number)
    (files / "run").mkdir(parents=True, exist_ok=True)
    socket = directory / part_name("auth", number) / AUTH_SOCKET
    binds = [
        f"unix:{socket}" if bind.startswith("unix:") else f"{LOOPBACK}:{free_port()}"
        for bind in values["server"]["bind"]
    ]
    values["server"] = {**values["server"], "bind": binds}
    values["updater"] = {**values["updater"], "bind": [f"{LOOPBACK}:{free_port()}"]}
    values["nginx"] = {
        **values["nginx"],
        "listen": [f"{LOOPBACK}:{free_port()}"],
        "runtime_dir": str(files / "run"),
        "access_log": str(files / "access.log"),
        "error_log": str(files / "error.log"),
        "metrics_listen": f"{LOOPBACK}:{free_port()}",
    }
    path = directory / f"site-{number}.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    load_settings(path, environ={})
    return path


def start_node(
    directory: Path, site: Path, number: int, processes: dict[str, LoggedProcess], *, with_updater: bool
) -> NodeInfo:
    """Node ``number``'s updater (if asked), auth service and NGINX, added to ``processes``."""
    settings = load_settings(site, environ={})
    if with_updater:
        processes[part_name("updater", number)] = start_updater(directory / part_name("updater", number), site)
    processes[part_name("auth", number)] = start_auth_service(directory / part_name("auth", number), site)
    processes[part_name("nginx", number)] = start_nginx(nginx_dir(directory, number), site)
    metrics = settings.nginx.metrics_listen
    return NodeInfo(
        number=number,
        secondary_url=f"http://{settings.nginx.listen[0]}",
        nginx_access_log=str(settings.nginx.access_log),
        nginx_metrics_url=f"http://{metrics}/metrics" if metrics else "",
        site_file=str(site),
        auth_url=f"http://{tcp_bind(settings.server.bind)}",
        updater_url=f"http://{settings.updater.bind[0]}" if with_updater else "",
    )


def tcp_bind(binds: tuple[str, ...]) -> str:
    """The first TCP address of ``binds`` (for HTTP clients other than NGINX), else the first bind."""
    return next((bind for bind in binds if not bind.startswith("unix:")), binds[0])


def start_auth_service(log_dir: Path, site: Path) -> LoggedProcess:
    """``geo-route serve``, ready when ``/healthz`` answers 200 on every bind (a Unix socket too)."""
    binds = load_settings(site, environ={}).server.bind
    log_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "geo_route.cli", "serve", "-c", str(site)]
    ready = lambda: all(fetch_from(bind, "/healthz").status == 200 for bind in binds)  # noqa: E731
    return start_until_ready(argv, log_dir, "auth", ready, env=environment_without_settings())


def start_updater(log_dir: Path, site: Path) -> LoggedProcess:
    url = f"http://{load_settings(site, environ={}).updater.bind[0]}/healthz"
    argv = [sys.executable, "-m", "geo_route.cli", "updater", "-c", str(site)]
    ready = lambda: http_get(url)[0] == 200  # noqa: E731
    return start_until_ready(argv, log_dir, "updater", ready, env=environment_without_settings())


def start_nginx(files: Path, site: Path) -> LoggedProcess:
    settings = load_settings(site, environ={})
    conf = files / "nginx.conf"
    conf.write_text(render_nginx_conf(settings), encoding="utf-8")
    check_with_nginx(conf)
    argv = [require_binary("nginx"), "-e", str(files / "error.log"), "-g", "daemon off;", "-c", str(conf)]
    argv += ["-p", str(files)]
    url = f"http://{settings.nginx.listen[0]}/v2/"
    return start_until_ready(argv, files, "nginx-master", lambda: http_get(url)[0] == 401)


def environment_without_settings() -> dict[str, str]:
    """The caller's environment minus GEO_ROUTE_* (the stack's site file must be the whole truth)."""
    return {key: value for key, value in os.environ.items() if not key.startswith("GEO_ROUTE_")}
