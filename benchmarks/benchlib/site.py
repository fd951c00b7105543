"""The private site one auth-service run needs, from ``geo_route.devstack``: its signing key
(``keys``), its own redis-server (``redis_server``), the site file, and ``geo-route serve`` (``nodes``).

Nothing here starts, waits for or stops a process itself: the devstack does, each by its own PID.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from benchlib.common import (
    BLOB,
    BLOB_DIGEST,
    ISSUER,
    LOOPBACK,
    MANIFEST_DIGEST,
    MANIFEST_MEDIA_TYPE,
    REPOSITORY,
    SERVICE,
    TAG,
    BenchError,
    BenchRequest,
    build_auth_headers,
)
from geo_route.config import ServerSettings, Settings, load_settings
from geo_route.devstack.keys import SigningKeyFiles, generate_signing_key, load_private_key
from geo_route.devstack.nodes import start_auth_service
from geo_route.devstack.processes import LoggedProcess, descendants, fetch, free_port, wait_until
from geo_route.devstack.redis_server import RedisProcess
from geo_route.devstack.token_service import TokenService
from geo_route.index.model import BlobPresence, ManifestPresence, PrimaryTag
from geo_route.index.redis_store import RedisIndexStore

STARTUP_TIMEOUT = 30.0
Cleanup = list[Callable[[], None]]  # steps run in reverse order when the benchmark ends


@dataclass
class Site:
    """Everything the load needs: the service (and its workers' PIDs), Redis's PID, a token that was
    checked and the site's settings (to write the index again)."""

    service: LoggedProcess
    base_url: str
    workers: list[int]
    redis_pid: int
    token: str
    settings: Settings

    @property
    def auth_url(self) -> str:
        return self.base_url + "/auth"

    def process_ids(self) -> dict[str, int]:
        """Label → PID of every process whose CPU use is reported."""
        return {f"worker {pid}": pid for pid in self.workers} | {"redis-server": self.redis_pid}

    def is_alive(self) -> bool:
        return self.service.is_running()

    def refresh_index(self) -> None:
        """Before each run: the tag's pin stamped anew (the refresher's job on a real site), so a run
        never reads a pin due for refresh (``routing.refresh_after``) or past ``routing.max_tag_age``."""
        fill_index(self.settings)


def start_site(directory: Path, server: ServerSettings, cleanup: Cleanup, request: BenchRequest = BLOB) -> Site:
    """Key, Redis with the blob, manifest and tag indexed, the service up (every worker forked, /readyz
    200) and answering one checked decision of ``request``'s kind."""
    keys = generate_signing_key(directory / "keys")
    redis = RedisProcess(directory / "redis").start()
    cleanup.append(redis.stop)
    assert redis.logged is not None
    config_path = write_site_config(directory, server, redis.url, keys.certificate)
    settings = load_settings(config_path, environ={})
    fill_index(settings)
    service = start_auth_service(directory / "auth", config_path)
    cleanup.append(lambda: report_service_log(service))  # runs after the service has stopped
    cleanup.append(service.stop)
    base_url = f"http://{settings.server.bind[0]}"
    workers = wait_for_workers(service, server.workers)
    if (status := fetch(base_url + "/readyz").status) != 200:
        raise BenchError(f"GET /readyz answered {status}: the service cannot reach its Redis")
    token = mint_token(keys)
    check_decision(base_url, token, request)
    return Site(service, base_url, workers, redis.logged.pid, token, settings)


def write_site_config(directory: Path, server: ServerSettings, redis_url: str, certificate: Path) -> Path:
    """The site file: the service on a loopback TCP port (the load generator's target), the rest unused."""
    site = {
        "local_registry": {"url": f"http://{LOOPBACK}:{free_port()}"},
        "primary": {"url": f"http://{LOOPBACK}:{free_port()}"},
        "token": {
            "realm": f"http://{LOOPBACK}:{free_port()}/jwt/auth",
            "service": SERVICE,
            "issuer": ISSUER,
            "rootcertbundle": str(certificate),
        },
        # 0.5 s, not 50 ms: these runs measure a decision's cost, and on a shared, saturated machine a
        # lookup can miss 50 ms and turn into an index-unavailable answer the run then rejects.
        "redis": {"url": redis_url, "socket_timeout": 0.5},
        "server": {
            "bind": [f"{LOOPBACK}:{free_port()}"],
            "workers": server.workers,
            "worker_class": server.worker_class,
            "threads": server.threads,
            "reuse_port": server.reuse_port,
            "log_level": "warning",
        },
    }
    path = directory / "site.yaml"
    path.write_text(yaml.safe_dump(site, sort_keys=False), encoding="utf-8")
    return path


def wait_for_workers(service: LoggedProcess, workers: int) -> list[int]:
    """The PIDs of gunicorn's workers, once all ``workers`` are forked."""
    wait_until(lambda: len(descendants(service.pid)) >= workers, STARTUP_TIMEOUT, "gunicorn's workers", process=service)
    return descendants(service.pid)


def fill_index(settings: Settings) -> None:
    """The blob, the manifest and the tag the loads ask about, written through the project's own index API."""
    store = RedisIndexStore(settings.redis)
    try:
        blob, manifest = (
            BlobPresence(REPOSITORY, BLOB_DIGEST, True),
            ManifestPresence(REPOSITORY, MANIFEST_DIGEST, True),
        )
        store.apply([blob, manifest, pin_tag(store)])
    finally:
        store.close()


def pin_tag(store: RedisIndexStore) -> PrimaryTag:
    """The tag's pin as a resolution writes it (docs/consistency.md): stamped on the index's clock
    (``store.now()``) with the media type the primary answered, which the tag load's ``Accept`` names.
    Without them routing sends the tag to the primary (``tag-stale``, ``tag-negotiated``).

    A ``geo_route`` from before the consistency model (f54412d and older) has neither an index clock
    nor a media type in a pin: the pin then carries the wall clock, so the same load can be measured
    against that commit (``PYTHONPATH`` pointing at its tree)."""
    if not hasattr(store, "now"):
        return PrimaryTag(REPOSITORY, TAG, MANIFEST_DIGEST, time.time())
    return PrimaryTag(REPOSITORY, TAG, MANIFEST_DIGEST, store.now(), MANIFEST_MEDIA_TYPE)


def mint_token(keys: SigningKeyFiles) -> str:
    """A pull token for the repository, as the devstack's token service issues it (RS256, libtrust kid)."""
    issuer = TokenService(ISSUER, SERVICE, load_private_key(keys.private_key), {})
    access = [{"type": "repository", "name": REPOSITORY, "actions": ["pull"]}]
    return str(issuer.issue("bench", access)["token"])


def check_decision(base_url: str, token: str, kind: BenchRequest = BLOB) -> None:
    """One request by hand: it must be 200, routed local because the index says so."""
    answer = fetch(base_url + "/auth", build_auth_headers(token, kind))
    route, reason = answer.headers.get("X-Geo-Route"), answer.headers.get("X-Geo-Reason")
    if (answer.status, route, reason) != (200, *kind.decision[:2]):
        raise BenchError(
            f"sanity check failed: GET /auth answered {answer.status} X-Geo-Route={route!r} X-Geo-Reason={reason!r}, "
            f"expected 200 {kind.decision[0]} {kind.decision[1]}"
        )


def ensure_service_alive(service: LoggedProcess) -> None:
    if not service.is_running():
        raise BenchError(f"geo-route serve exited with {service.popen.returncode}:\n{service.read_log_tail()}")


def report_service_log(service: LoggedProcess) -> None:
    """gunicorn runs at log level warning, so anything it wrote deserves a look."""
    text = service.read_log_tail().strip()
    if text:
        print(f"\nservice log (last lines):\n{text[-3000:]}", file=sys.stderr)
    else:
        print("\nservice log: empty (no warnings or errors)")
