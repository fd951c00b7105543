"""Render the secondary's NGINX configuration from the site settings (Jinja2, StrictUndefined).

``nginx_context`` turns settings into template values (pure); ``render_nginx_conf`` renders the full
standalone configuration or one of the two include-able parts; ``write_atomically`` and
``check_with_nginx`` are the CLI's side effects. Header names come from ``contract`` so the config
and the service cannot drift apart.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import jinja2

from geo_route import contract
from geo_route.config import Settings
from geo_route.errors import GeoRouteError
from geo_route.negotiation import NEGOTIATED_TYPES
from geo_route.storage import MANIFEST_MAX_BYTES


def find_templates() -> Path:
    """``templates/`` of a source checkout, else the copy a wheel installs under ``share/geo-route``."""
    candidates = [Path(__file__).resolve().parent.parent / "templates", Path(sys.prefix) / "share/geo-route/templates"]
    return next((path for path in candidates if (path / "nginx.conf.j2").is_file()), candidates[0])


TEMPLATES_DIR = find_templates()
Part = Literal["full", "http", "server"]
TEMPLATE_FOR_PART: dict[str, str] = {
    "full": "nginx.conf.j2",
    "http": "geo-route-http.conf.j2",
    "server": "geo-route-server.conf.j2",
}
DEFAULT_PORTS = {"http": 80, "https": 443}
# The client's Accept, passed to the auth service (web/auth.py reads it for tag negotiation), and
# the longest joined value NGINX passes (gunicorn refuses a header field over 8190 bytes).
AUTH_ACCEPT_MAX_BYTES = 4096
# Seconds NGINX holds a request past nginx.per_address_denials before its 429 (a timer): a flood on
# N connections gets N answers a second at most, not as many as NGINX's workers could produce.
DENIED_429_PAUSE = 1
# How many of the last fallback, stale and auth-unavailable answers NGINX keeps for `geo-route status`.
RECENT_FALLBACKS = 20
# The Content-Type of the registries' JSON errors (registry/api/errcode/handler.go, ServeJSON), which
# NGINX's own 401 imitates (token.dialect): 2.8 names the charset, 3.0 does not. GitLab's fork is
# taken to keep 2.8's.
ERROR_CONTENT_TYPE = {
    "distribution-2.8": "application/json; charset=utf-8",
    "distribution-3": "application/json",
    "gitlab": "application/json; charset=utf-8",
}


class RenderError(GeoRouteError):
    """The configuration could not be rendered, written or checked."""


def upstream_of(url: str) -> dict[str, Any]:
    """Scheme, ``host:port`` and TLS name of a registry origin URL."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or DEFAULT_PORTS[parts.scheme]
    server_host = f"[{host}]" if ":" in host else host
    return {"scheme": parts.scheme, "server": f"{server_host}:{port}", "host": host, "origin": url.rstrip("/")}


def nginx_context(settings: Settings) -> dict[str, Any]:
    """Everything the templates use; StrictUndefined makes a missing value an error."""
    nginx = settings.nginx
    return {
        "nginx": nginx,
        "listen_tls": bool(nginx.tls_certificate),
        "local": upstream_of(settings.local_registry.url),
        "primary": upstream_of(settings.primary.url),
        "auth_servers": settings.auth_servers,  # host:port, [v6]:port and unix:PATH read the same in NGINX
        "auth_timeout": f"{nginx.auth_timeout:g}s",
        "original_method_header": contract.ORIGINAL_METHOD,
        "original_uri_header": contract.ORIGINAL_URI,
        "authorization_header": contract.AUTHORIZATION,
        "accept_header": contract.ACCEPT,
        "refetch_header": contract.REFETCH,
        "refetch_window": settings.routing.refetch_window,
        "auth_accept_max_bytes": AUTH_ACCEPT_MAX_BYTES,
        "route_var": contract.nginx_variable(contract.ROUTE),
        "reason_var": contract.nginx_variable(contract.REASON),
        "operation_var": contract.nginx_variable(contract.OPERATION),
        "upstream_path_var": contract.nginx_variable(contract.UPSTREAM_PATH),
        "stale_path_var": contract.nginx_variable(contract.STALE_PATH),
        "unauthorized_detail_var": contract.nginx_variable(contract.UNAUTHORIZED_DETAIL),
        "unauthorized_content_type": ERROR_CONTENT_TYPE[settings.token.dialect],
        "storage_path_var": contract.nginx_variable(contract.STORAGE_PATH),
        "storage_link_var": contract.nginx_variable(contract.STORAGE_LINK),
        # local_registry.storage_root: blobs from the registry's files ("" off), with its http.headers
        "storage_root": settings.local_registry.storage_root.rstrip("/") or settings.local_registry.storage_root,
        "storage_headers": [line.split(": ", 1) for line in settings.local_registry.http_headers],
        "storage_manifest_max_bytes": MANIFEST_MAX_BYTES,
        "storage_manifest_types": sorted(NEGOTIATED_TYPES),
        "geo_headers": list(contract.ROUTING_HEADERS),
        "reuse_header": contract.REUSE_SECONDS,
        "recent_fallbacks": RECENT_FALLBACKS,
        "route_local": "local",
        # nginx.per_address_denials as GCRA: seconds one request moves its address on, and how far
        # ahead an address may be (burst/rate) before NGINX answers 429 itself.
        "denials_interval": f"{1 / nginx.per_address_denials:g}" if nginx.per_address_denials else "",
        "denials_tolerance": f"{nginx.per_address_denials_burst / nginx.per_address_denials:g}"
        if nginx.per_address_denials
        else "",
        "denials_pause": DENIED_429_PAUSE,
    }


def template_environment(templates: Path = TEMPLATES_DIR) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,  # NGINX configuration, not HTML
    )


def render_nginx_conf(settings: Settings, part: Part = "full", templates: Path = TEMPLATES_DIR) -> str:
    try:
        template = template_environment(templates).get_template(TEMPLATE_FOR_PART[part])
        return template.render(nginx_context(settings))
    except jinja2.TemplateError as exc:
        raise RenderError(f"cannot render {TEMPLATE_FOR_PART[part]}: {exc}") from None


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)


def check_with_nginx(conf: Path, binary: str | None = None) -> str:
    """``nginx -t`` on a full configuration; returns its output, raises ``RenderError`` on failure."""
    binary = binary or nginx_binary()
    if binary is None:
        raise RenderError("nginx is not installed (apt-get install nginx)")
    result = subprocess.run(
        [binary, "-t", "-q", "-c", str(conf.resolve()), "-p", str(conf.resolve().parent)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0:
        raise RenderError(f"nginx -t rejected {conf}:\n{output}")
    return output
