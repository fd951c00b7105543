"""A real Docker Distribution registry with token auth, on loopback: Debian's ``docker-registry`` (2.8)
or the binary ``DEVSTACK_REGISTRY_BINARY`` names (e.g. a Distribution 3 built from source).

``start_registry`` writes the YAML config next to the filesystem storage and runs
``REGISTRY serve CONFIG`` until ``GET /v2/`` answers 401 with a ``Bearer`` challenge.
Every site's registry trusts the same signing certificate, so one token works on all of them. A
binary whose ``--version`` says 3 or later also gets ``auth.token.jwks``: the bundle's keys under
their libtrust fingerprints (what ``geo-route jwks`` writes), without which Distribution 3 refuses
tokens that name their key by libtrust ``kid`` only (the token service's, like GitLab's).
Notification endpoints follow protocol notes §1.5 (the 2.8 ``ignore.actions`` needs a dummy media type).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import secrets
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509

from geo_route.devstack.keys import write_private
from geo_route.devstack.processes import (
    LOOPBACK,
    LoggedProcess,
    free_port,
    http_get,
    require_binary,
    start_until_ready,
)
from geo_route.errors import DevstackError
from geo_route.registry_config import write_jwks_file

DUMMY_IGNORED_MEDIA_TYPE = "application/x-none"
ENVIRONMENT_OVERRIDE_PREFIX = "REGISTRY_"  # the registry reads REGISTRY_<SECTION>_<KEY> as config overrides
# Not GEO_ROUTE_*: the site loader reads every GEO_ROUTE_* variable as a setting and refuses others.
BINARY_VARIABLE = "DEVSTACK_REGISTRY_BINARY"
DEFAULT_BINARY = "docker-registry"
JWKS_FILE = "token.jwks"


@dataclass(frozen=True)
class TokenAuth:
    """The registry's ``auth.token`` section."""

    realm: str
    service: str
    issuer: str
    rootcertbundle: Path
    jwks: Path | None = None  # Distribution 3's auth.token.jwks


@dataclass(frozen=True)
class NotificationEndpoint:
    """One ``notifications.endpoints`` entry; ``authorization`` is the whole header value, e.g. ``Bearer s3cret``."""

    name: str
    url: str
    authorization: str | None = None
    timeout: str = "1s"
    threshold: int = 3
    backoff: str = "1s"
    ignored_actions: tuple[str, ...] = ("pull",)

    def to_config(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "name": self.name,
            "url": self.url,
            "timeout": self.timeout,
            "threshold": self.threshold,
            "backoff": self.backoff,
        }
        if self.authorization is not None:
            entry["headers"] = {"Authorization": [self.authorization]}
        if self.ignored_actions:
            entry["ignore"] = {"mediatypes": [DUMMY_IGNORED_MEDIA_TYPE], "actions": list(self.ignored_actions)}
        return entry


def render_registry_config(
    storage_dir: Path,
    port: int,
    auth: TokenAuth,
    notifications: Sequence[NotificationEndpoint] = (),
) -> dict[str, Any]:
    """The registry's configuration as data (pure apart from a fresh random ``http.secret``)."""
    config: dict[str, Any] = {
        "version": 0.1,
        # warn, not info: 2.8 logs every notification endpoint's headers (our shared secrets) at info
        # when it starts. Its access log (one line per request) is independent of the level.
        "log": {"level": "warn", "formatter": "text", "fields": {"service": "registry"}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage_dir)},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {
            "addr": f"{LOOPBACK}:{port}",
            "secret": secrets.token_hex(32),
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
        "auth": {
            "token": {
                "realm": auth.realm,
                "service": auth.service,
                "issuer": auth.issuer,
                "rootcertbundle": str(auth.rootcertbundle),
                **({"jwks": str(auth.jwks)} if auth.jwks is not None else {}),
            }
        },
        "health": {"storagedriver": {"enabled": False}},
    }
    if notifications:
        config["notifications"] = {
            "events": {"includereferences": True},
            "endpoints": [endpoint.to_config() for endpoint in notifications],
        }
    return config


def write_registry_config(path: Path, config: dict[str, Any]) -> Path:
    """Write the YAML (mode 0600: it holds the HTTP secret and notification credentials)."""
    write_private(path, yaml.safe_dump(config, sort_keys=False).encode())
    return path


@dataclass(frozen=True)
class RegistryProcess:
    """A running registry; ``address`` is ``127.0.0.1:PORT`` as skopeo references need it."""

    name: str
    port: int
    directory: Path
    config_path: Path
    logged: LoggedProcess

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def stop(self) -> None:
        self.logged.stop()


def start_registry(
    directory: Path,
    auth: TokenAuth,
    *,
    name: str = "registry",
    port: int | None = None,
    notifications: Sequence[NotificationEndpoint] = (),
    timeout: float = 30.0,
    sections: Mapping[str, Any] | None = None,
) -> RegistryProcess:
    """Run ``REGISTRY serve`` with storage in ``directory/storage``; returns once token auth answers.

    ``sections`` replaces whole top-level sections of the configuration (e.g. a ``notifications``
    section as ``geo-route registry-config`` prints it)."""
    binary = registry_binary()
    port = port or free_port()
    storage = directory / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    if auth.jwks is None and registry_major_version(binary) >= 3:
        auth = dataclasses.replace(auth, jwks=bundle_jwks(auth.rootcertbundle, directory / JWKS_FILE))
    config = {**render_registry_config(storage, port, auth, notifications), **(sections or {})}
    config_path = write_registry_config(directory / f"{name}.yml", config)
    url = f"http://{LOOPBACK}:{port}"
    argv = [binary, "serve", str(config_path)]
    ready = lambda: challenges_for_token(url)  # noqa: E731
    logged = start_until_ready(argv, directory, name, ready, timeout=timeout, env=registry_environment())
    return RegistryProcess(name, port, directory, config_path, logged)


def challenges_for_token(url: str) -> bool:
    """``GET /v2/`` is 401 with a ``Bearer`` challenge: up, and token auth is on."""
    status, headers = http_get(f"{url}/v2/", timeout=2.0)
    challenge = {key.lower(): value for key, value in headers.items()}.get("www-authenticate", "")
    return status == 401 and challenge.startswith("Bearer ")


def registry_environment() -> dict[str, str]:
    """Our environment without ``REGISTRY_*``, which the registry would read as config overrides."""
    return {key: value for key, value in os.environ.items() if not key.startswith(ENVIRONMENT_OVERRIDE_PREFIX)}


def registry_binary() -> str:
    """``DEVSTACK_REGISTRY_BINARY`` (an executable's path) if set, else Debian's ``docker-registry``."""
    chosen = os.environ.get(BINARY_VARIABLE, "")
    if not chosen:
        return require_binary(DEFAULT_BINARY)
    if not (os.path.isfile(chosen) and os.access(chosen, os.X_OK)):
        raise DevstackError(f"{BINARY_VARIABLE}={chosen} is not an executable file")
    return os.path.abspath(chosen)


@functools.lru_cache(maxsize=8)
def registry_major_version(binary: str) -> int:
    """The major version ``BINARY --version`` prints (``... 2.8.2+ds1``, ``... v3.0.0``)."""
    try:
        result = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DevstackError(f"{binary} --version failed: {exc}") from None
    match = re.search(r"\sv?(\d+)\.\d+", result.stdout + result.stderr)
    if match is None:
        raise DevstackError(f"{binary} --version names no version: {(result.stdout + result.stderr)[:200]!r}")
    return int(match.group(1))


def bundle_jwks(bundle: Path, path: Path) -> Path:
    """The JWKS file of ``bundle`` at ``path``: its keys under libtrust fingerprint and thumbprint."""
    return write_jwks_file(path, x509.load_pem_x509_certificates(bundle.read_bytes()))
