"""Client snippets that point docker, containerd and podman at the site (``geo-route client-config``).

Pure functions of the settings: each returns a ``ClientSnippet`` whose ``text`` is the file to
install (TOML or JSON, parsed by the tests) and whose ``notes`` say what it does and where it goes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from geo_route.config import Settings, check_http_url
from geo_route.errors import ConfigError

Client = Literal["docker", "containerd", "podman"]
CLIENTS: tuple[Client, ...] = ("docker", "containerd", "podman")
DOCKER_HUB = ("docker.io", "index.docker.io", "registry-1.docker.io")
DEFAULT_PORTS = {"http": 80, "https": 443}
WILDCARD_HOSTS = ("*", "0.0.0.0", "[::]", "::")


@dataclass(frozen=True)
class Origin:
    """A registry as clients name it: ``scheme://host[:port]``."""

    scheme: str
    host: str  # host[:port], the port only when not the scheme's default

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @classmethod
    def parse(cls, url: str, key: str) -> Origin:
        if problem := check_http_url(url):
            raise ConfigError([f"{key}: {problem}"])
        parts = urlsplit(url)
        return cls.at(parts.scheme, parts.hostname or "", parts.port)

    @classmethod
    def at(cls, scheme: str, hostname: str, port: int | None) -> Origin:
        host = f"[{hostname}]" if ":" in hostname else hostname
        return cls(scheme, host if port in (None, DEFAULT_PORTS[scheme]) else f"{host}:{port}")


@dataclass(frozen=True)
class ClientSnippet:
    """``text`` goes into the file at ``path``; ``notes`` are for the operator (not part of it)."""

    client: Client
    path: str
    text: str
    notes: tuple[str, ...]


def site_origin(settings: Settings, site_url: str | None = None) -> Origin:
    """The site's public name: ``site_url``, else ``nginx.server_name`` (or the first listen
    address's host when it is not a wildcard) on the first listen port, https with a certificate."""
    if site_url:
        return Origin.parse(site_url, "--site-url")
    nginx = settings.nginx
    scheme = "https" if nginx.tls_certificate else "http"
    listen_host, port = _listen_address(nginx.listen[0] if nginx.listen else "")
    names = [n for n in nginx.server_name.split() if n != "_" and not n.startswith("~") and "*" not in n]
    hostname = names[0] if names else listen_host
    if not hostname:
        raise ConfigError(
            [f"nginx.server_name: {nginx.server_name!r} names no host and nginx.listen none either: pass --site-url"]
        )
    return Origin.at(scheme, hostname.strip("[]"), port)


def _listen_address(listen: str) -> tuple[str | None, int | None]:
    """An NGINX ``listen`` value's host (None for a wildcard) and port."""
    address = listen.split()[0] if listen.split() else ""
    if address.startswith("unix:"):
        return None, None
    if address.isdigit():
        return None, int(address)
    match = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:]+)(?::(\d+))?", address)
    if match is None:
        return None, None
    host, port = match.group(1), match.group(2)
    return (None if host in WILDCARD_HOSTS else host), (int(port) if port else 80)


def primary_origin(settings: Settings, registry: str | None = None) -> Origin:
    """The name clients use for the primary: ``registry`` (``host[:port]`` or a URL), else ``primary.url``."""
    if registry:
        return Origin.parse(registry if "://" in registry else f"https://{registry}", "--registry")
    return Origin.parse(settings.primary.url, "primary.url")


def render_client_config(client: Client, site: Origin, primary: Origin) -> ClientSnippet:
    return {"docker": docker_snippet, "containerd": containerd_snippet, "podman": podman_snippet}[client](site, primary)


def containerd_snippet(site: Origin, primary: Origin) -> ClientSnippet:
    """``hosts.toml`` for the primary's name with the site as a pull/resolve mirror."""
    lines = [
        f"# containerd: /etc/containerd/certs.d/{primary.host}/hosts.toml (written by geo-route client-config)",
        f"# Images keep the primary's name ({primary.host}/group/project:tag). Pulls and tag resolution go",
        f"# to the geo-route site {site.url} first (containerd tries the primary if the site cannot be",
        "# reached); pushes go to the server, the primary. Credentials: have them for both host names.",
        'server = "' + primary.url + '"',
        "",
        f'[host."{site.url}"]',
        '  capabilities = ["pull", "resolve"]',
    ]
    if site.scheme == "http":
        lines.insert(-1, "  # plain HTTP: containerd speaks it to an http:// host without further settings")
    notes = (
        "containerd reads this only with a hosts directory configured: containerd 1.x CRI",
        '  [plugins."io.containerd.grpc.v1.cri".registry] config_path = "/etc/containerd/certs.d",',
        '  containerd 2.x [plugins."io.containerd.cri.v1.images".registry] config_path = ...;',
        "  ctr: --hosts-dir /etc/containerd/certs.d; nerdctl reads it by default.",
    )
    return ClientSnippet(
        "containerd", f"/etc/containerd/certs.d/{primary.host}/hosts.toml", "\n".join(lines) + "\n", notes
    )


def docker_snippet(site: Origin, primary: Origin) -> ClientSnippet:
    """``daemon.json``: ``registry-mirrors`` only mirrors Docker Hub, so for any other primary the
    snippet holds only what using the site's name needs (``insecure-registries`` for plain HTTP)."""
    document: dict[str, list[str]] = {}
    if primary.host in DOCKER_HUB:
        document["registry-mirrors"] = [site.url]
        notes: tuple[str, ...] = (
            f"docker: {site.url} mirrors Docker Hub pulls (registry-mirrors applies to Docker Hub only).",
        )
    else:
        notes = (
            f"docker: daemon.json registry-mirrors applies to Docker Hub images only, never to {primary.host}.",
            f"Use the site's name directly instead: docker login {site.host};",
            f"  docker pull {site.host}/group/project:tag.",
            "One URL for reads and writes: pushes to it work too (geo-route forwards every write to the primary),",
            f"and the token service is the primary's, so the {primary.host} credentials are the ones to use.",
        )
    if site.scheme == "http":
        document["insecure-registries"] = [site.host]
        notes += (f"{site.host} speaks plain HTTP: docker needs it in insecure-registries (above).",)
    if not document:
        notes += ("Nothing to add to /etc/docker/daemon.json for this site (the JSON is empty).",)
    return ClientSnippet("docker", "/etc/docker/daemon.json", json.dumps(document, indent=2) + "\n", notes)


def podman_snippet(site: Origin, primary: Origin) -> ClientSnippet:
    """``registries.conf`` (v2): the primary's name with the site as a mirror for every pull."""
    lines = [
        f"# podman, buildah, skopeo: /etc/containers/registries.conf.d/50-geo-route-{_file_stem(primary.host)}.conf",
        f"# Images keep the primary's name ({primary.host}/...). Pulls go to the geo-route site first (the",
        "# primary if the site fails); pushes go to the location, the primary.",
        '# pull-from-mirror = "all": pulls by tag use the site too. The site serves a tag only from a pin',
        "# the primary confirmed within routing.max_tag_age (else it routes the tag to the primary);",
        '# "digest-only" would send every pull by tag, blobs included, to the primary.',
        "# Credentials: have them for both host names (podman login).",
        "[[registry]]",
        f'prefix = "{primary.host}"',
        f'location = "{primary.host}"',
    ]
    if primary.scheme == "http":
        lines.append("insecure = true")
    lines += ["", "[[registry.mirror]]", f'location = "{site.host}"', 'pull-from-mirror = "all"']
    if site.scheme == "http":
        lines.append("insecure = true")
    path = f"/etc/containers/registries.conf.d/50-geo-route-{_file_stem(primary.host)}.conf"
    notes = ("registries.conf.d drop-ins need the v2 format (every [[registry]] table, no [registries.search]).",)
    return ClientSnippet("podman", path, "\n".join(lines) + "\n", notes)


def _file_stem(host: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", host)
