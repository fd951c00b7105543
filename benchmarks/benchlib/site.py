"""The private site one run needs: signing key, site file, its own redis-server and ``geo-route serve``."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
import redis
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

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
from benchlib.processes import ProcessId, kill_survivors, list_children, read_tail, stop_process
from geo_route.config import ServerSettings, Settings, load_settings
from geo_route.index.model import BlobPresence, ManifestPresence, PrimaryTag
from geo_route.index.redis_store import RedisIndexStore
from geo_route.tokens import libtrust_kid

STARTUP_TIMEOUT = 30.0
Cleanup = list[Callable[[], None]]  # steps run in reverse order when the benchmark ends


@dataclass
class RunningService:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    workers: list[ProcessId]


@dataclass
class Site:
    """Everything the load needs: the service (with its workers), Redis's PID, a token that was checked
    and the site's settings (to write the index again)."""

    service: RunningService
    redis_pid: int
    token: str
    settings: Settings

    @property
    def auth_url(self) -> str:
        return self.service.base_url + "/auth"

    def process_ids(self) -> dict[str, int]:
        """Label → PID of every process whose CPU use is reported."""
        return {f"worker {pid}": pid for pid, _ in self.service.workers} | {"redis-server": self.redis_pid}

    def is_alive(self) -> bool:
        return self.service.process.poll() is None

    def refresh_index(self) -> None:
        """Before each run: the tag's pin stamped anew (the refresher's job on a real site), so a run
        never reads a pin due for refresh (``routing.refresh_after``) or past ``routing.max_tag_age``."""
        fill_index(self.settings)


def start_site(directory: Path, server: ServerSettings, cleanup: Cleanup, request: BenchRequest = BLOB) -> Site:
    """Key, site file, Redis with the blob, manifest and tag indexed, the service up and answering one
    checked decision of ``request``'s kind."""
    redis_port, service_port = find_free_port(), find_free_port()
    key = generate_signing_key(directory / "bundle.pem")
    config_path = write_site_config(directory, server, redis_port, service_port)
    settings = load_settings(config_path, environ={})

    redis_process = start_redis(directory, redis_port)
    cleanup.append(lambda: stop_process(redis_process, "redis-server"))
    wait_for_redis(redis_process, redis_port, directory / "redis.log")
    fill_index(settings)

    service = start_service(directory, config_path, service_port)
    cleanup.append(lambda: report_service_log(service.log_path))  # runs after the service has stopped
    cleanup.append(lambda: stop_service(service))
    wait_for_service(service, server.workers)

    token = mint_token(key)
    check_decision(service.base_url, token, request)
    return Site(service, redis_process.pid, token, settings)


def find_free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def generate_signing_key(bundle_path: Path) -> rsa.RSAPrivateKey:
    """An RSA-2048 key whose self-signed certificate is written as the PEM ``rootcertbundle``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "geo-route bench token signer")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    bundle_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key


def write_site_config(directory: Path, server: ServerSettings, redis_port: int, service_port: int) -> Path:
    site = {
        "local_registry": {"url": f"http://{LOOPBACK}:{find_free_port()}"},
        "primary": {"url": f"http://{LOOPBACK}:{find_free_port()}"},
        "token": {
            "realm": f"http://{LOOPBACK}:{find_free_port()}/jwt/auth",
            "service": SERVICE,
            "issuer": ISSUER,
            "rootcertbundle": "bundle.pem",
        },
        "redis": {"url": f"redis://{LOOPBACK}:{redis_port}/0"},
        "server": {
            "bind": [f"{LOOPBACK}:{service_port}"],
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


def start_redis(directory: Path, port: int) -> subprocess.Popen[bytes]:
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise BenchError("redis-server is not on PATH")
    command = [
        redis_server, "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no",
        "--dir", str(directory),
    ]  # fmt: skip
    with open(directory / "redis.log", "wb") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_redis(process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    client = redis.Redis(host=LOOPBACK, port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    with closing(client):
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise BenchError(f"redis-server exited with {process.returncode}:\n{read_tail(log_path)}")
            try:
                if client.ping():
                    return
            except redis.RedisError:
                pass
            time.sleep(0.05)
    raise BenchError(f"redis-server did not answer PING within {STARTUP_TIMEOUT:.0f} s")


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


def build_service_command(config_path: Path) -> list[str]:
    script = Path(sys.executable).parent / "geo-route"
    if script.exists():
        return [str(script), "serve", "-c", str(config_path)]
    return [sys.executable, "-m", "geo_route.cli", "serve", "-c", str(config_path)]


def start_service(directory: Path, config_path: Path, port: int) -> RunningService:
    metrics_dir = directory / "metrics"
    metrics_dir.mkdir()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GEO_ROUTE_")}  # the file alone decides
    environment["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    log_path = directory / "service.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            build_service_command(config_path),
            cwd=directory,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return RunningService(process, f"http://{LOOPBACK}:{port}", log_path, [])


def wait_for_service(service: RunningService, workers: int) -> None:
    """Until /healthz answers 200, /readyz too (Redis reachable), and every worker has been forked."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while fetch_status(service.base_url + "/healthz") != 200:
        ensure_service_alive(service)
        if time.monotonic() > deadline:
            raise BenchError(f"GET /healthz did not answer 200 within {STARTUP_TIMEOUT:.0f} s")
        time.sleep(0.1)
    if (status := fetch_status(service.base_url + "/readyz")) != 200:
        raise BenchError(f"GET /readyz answered {status}: the service cannot reach its Redis")
    while len(service.workers) < workers:
        ensure_service_alive(service)
        service.workers = list_children(service.process.pid)
        if time.monotonic() > deadline:
            raise BenchError(f"only {len(service.workers)} of {workers} gunicorn workers started")
        time.sleep(0.1)


def ensure_service_alive(service: RunningService) -> None:
    if service.process.poll() is not None:
        raise BenchError(f"geo-route serve exited with {service.process.returncode}")


def fetch_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def mint_token(key: rsa.RSAPrivateKey) -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": SERVICE,
        "sub": "bench",
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "access": [{"type": "repository", "name": REPOSITORY, "actions": ["pull"]}],
    }
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": libtrust_kid(key.public_key())})


def check_decision(base_url: str, token: str, kind: BenchRequest = BLOB) -> None:
    """One request by hand: it must be 200, routed local because the index says so."""
    request = urllib.request.Request(base_url + "/auth", headers=build_auth_headers(token, kind))
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            status, headers = int(response.status), response.headers
    except urllib.error.HTTPError as exc:
        status, headers = exc.code, exc.headers
    route, reason = headers.get("X-Geo-Route"), headers.get("X-Geo-Reason")
    if (status, route, reason) != (200, *kind.decision[:2]):
        raise BenchError(
            f"sanity check failed: GET /auth answered {status} X-Geo-Route={route!r} X-Geo-Reason={reason!r}, "
            f"expected 200 {kind.decision[0]} {kind.decision[1]}"
        )


def stop_service(service: RunningService) -> None:
    workers = service.workers or list_children(service.process.pid)
    stop_process(service.process, "gunicorn master")
    kill_survivors(workers, "gunicorn worker")  # normally gone with the master; a SIGKILLed one can leave orphans


def report_service_log(log_path: Path) -> None:
    """gunicorn runs at log level warning, so anything it wrote deserves a look."""
    text = log_path.read_text(encoding="utf-8", errors="replace").strip() if log_path.exists() else ""
    if text:
        count = len(text.splitlines())
        print(f"\nservice stderr ({count} lines; last 40):\n{read_tail(log_path)}", file=sys.stderr)
    else:
        print("\nservice stderr: empty (no warnings or errors)")
