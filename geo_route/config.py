"""Typed, frozen settings loaded from one YAML site file.

Order of precedence: defaults, then the file, then ``GEO_ROUTE_<SECTION>__<KEY>`` environment
variables (double underscore between levels; values are parsed as YAML scalars, lists may also be
comma-separated). Unknown keys and bad values are collected and raised as one ``ConfigError``
that names every problem with its key path.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml

from geo_route.errors import ConfigError

ENV_PREFIX = "GEO_ROUTE_"
ENV_SEPARATOR = "__"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# Every asymmetric algorithm some registry dialect verifies (Distribution 3 adds PS* and EdDSA).
# Never none or HS*: a registry's key is public, so an HMAC "signature" with it proves nothing.
SUPPORTED_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "EdDSA")
TagPolicy = Literal["pinned", "primary"]
RefetchRoute = Literal["local", "primary"]
Dialect = Literal["distribution-2.8", "distribution-3", "gitlab"]
Check = Callable[[Any], "str | None"]


def _checked(check: Check, **kwargs: Any) -> Any:
    return field(metadata={"check": check}, **kwargs)


def check_http_url(value: str) -> str | None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"must be an http(s) URL with a host, got {value!r}"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return "must be a bare origin (scheme://host[:port]) without path, query or fragment"
    return None


def check_redis_url(value: str) -> str | None:
    if urlsplit(value).scheme not in ("redis", "rediss", "unix"):
        return "must be a redis://, rediss:// or unix:// URL"
    return None


def check_sentinels(value: tuple[str, ...]) -> str | None:
    for address in value:
        if not re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:\[\]\s/]+):\d{1,5}", address):
            return f"{address!r} is not host:port or [v6]:port"
    return None


def check_absolute_path(value: str) -> str | None:
    return None if value == "" or Path(value).is_absolute() else f"must be an absolute path, got {value!r}"


def check_positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def check_not_negative(value: float) -> str | None:
    return None if value >= 0 else "must not be negative"


def check_fraction(value: float) -> str | None:
    return None if 0 < value < 1 else "must be between 0 and 1 (exclusive)"


def check_nginx_size(value: str) -> str | None:
    """An NGINX size: digits with an optional k or m suffix (``128k``)."""
    return None if re.fullmatch(r"[1-9][0-9]*[kKmM]?", value) else f"must be an NGINX size such as 128k, got {value!r}"


def check_open_files_limit(value: int) -> str | None:
    return None if value >= 1024 else "must be at least 1024 (worker_connections is derived from it)"


def check_metrics_listen(value: str) -> str | None:
    if value == "" or re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:\[\]\s;]+):\d{1,5}", value):
        return None
    return f"must be host:port or [v6]:port (empty: no metrics server), got {value!r}"


def check_non_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def check_algorithms(value: tuple[str, ...]) -> str | None:
    """A registry's ``signingalgorithms`` maps onto this list, less HS* (never with public keys)."""
    bad = [a for a in value if a not in SUPPORTED_ALGORITHMS]
    if bad:
        return f"unsupported {bad}; allowed are {list(SUPPORTED_ALGORITHMS)} (never none or HS*)"
    return None if value else "must list at least one algorithm"


UNIX_PATH_MAX = 108  # sun_path, with its terminating NUL


def check_binds(value: tuple[str, ...]) -> str | None:
    for bind in value:
        if not (bind.startswith("unix:") or re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:\[\]]+):\d{1,5}", bind)):
            return f"{bind!r} is not host:port, [v6]:port or unix:PATH"
    return None if value else "must list at least one address"


def check_auth_server(value: str) -> str | None:
    """``nginx.auth_server``: empty (derived from ``server.bind``) or one address NGINX can connect to."""
    if value == "":
        return None
    if problem := check_binds((value,)):
        return problem
    if is_wildcard(value):
        return f"{value!r} is a wildcard (listen on every address), not an address NGINX can connect to"
    return None


def split_host_port(address: str) -> tuple[str, str]:
    """``host:port`` or ``[v6]:port`` as (host without brackets, port)."""
    host, _, port = address.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), port


def is_wildcard(address: str) -> bool:
    """A ``host:port`` whose host is the unspecified address (0.0.0.0, ::): "every address" to bind."""
    if address.startswith("unix:"):
        return False
    try:
        return ipaddress.ip_address(split_host_port(address)[0]).is_unspecified
    except ValueError:
        return False


def connectable_address(bind: str) -> str:
    """The address a client on the same host connects to for the bind address ``bind``: a wildcard
    host (0.0.0.0, [::]) becomes the loopback address of its family; anything else is itself."""
    if not is_wildcard(bind):
        return bind
    host, port = split_host_port(bind)
    return f"[::1]:{port}" if ipaddress.ip_address(host).version == 6 else f"127.0.0.1:{port}"


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, for logs and reprs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


@dataclass(frozen=True)
class UpstreamSettings:
    """A registry the site can send requests to."""

    url: str = _checked(check_http_url)


def check_header_lines(value: tuple[str, ...]) -> str | None:
    for line in value:
        if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+: [\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?", line):
            return f"{line!r} is not 'Name: value' (a header name, one space, printable ASCII)"
        if '"' in line or "\\" in line or "$" in line:
            return f"{line!r}: no quotes, backslashes or $ (the value is written into NGINX's configuration)"
    return None


def check_storage_root(value: str) -> str | None:
    """An absolute path NGINX's configuration and its Lua can hold as written."""
    if re.search(r"[\s\"'\\$;{}]", value):
        return "no whitespace, quotes, backslashes, $, ; or braces (written into NGINX's configuration)"
    return check_absolute_path(value)


@dataclass(frozen=True)
class LocalRegistrySettings(UpstreamSettings):
    """This site's registry. ``storage_root``: its ``storage.filesystem.rootdirectory`` when NGINX
    may read it (the directory holding ``docker/registry/v2``); set, NGINX sends the blobs the
    decision finds here straight from those files (sendfile), with the headers the registry sends,
    ``http_headers`` included: the registry's own ``http.headers`` section, which it adds to every
    answer (its shipped ``config.yml`` has ``X-Content-Type-Options: nosniff``). Empty: every local
    answer comes from the registry (object storage: the registry keeps redirecting)."""

    storage_root: str = _checked(check_storage_root, default="")
    http_headers: tuple[str, ...] = _checked(check_header_lines, default=("X-Content-Type-Options: nosniff",))


@dataclass(frozen=True)
class TokenSettings:
    """How bearer tokens are verified: every form a registry dialect accepts (README "Token
    verification"); ``dialect`` (the site's registries') only picks the challenge text and the 401's
    Content-Type they answer with, and their content negotiation of tags (``negotiation``)."""

    realm: str = _checked(check_non_empty)
    service: str = _checked(check_non_empty)
    issuer: str = _checked(check_non_empty)
    rootcertbundle: str = _checked(check_non_empty)
    jwks: str = ""  # Distribution 3's auth.token.jwks: more trusted keys, by their kid as written
    algorithms: tuple[str, ...] = _checked(check_algorithms, default=SUPPORTED_ALGORITHMS)
    dialect: Dialect = "distribution-2.8"
    accept_v3_0_ec_quirk: bool = False  # Distribution 3.0.0's one kid per EC curve (its bug)
    leeway: int = _checked(check_not_negative, default=60)
    cache_size: int = _checked(check_not_negative, default=10_000)
    max_token_bytes: int = _checked(check_positive, default=16_384)


@dataclass(frozen=True)
class RedisSettings:
    """Where the digest index lives and how long a decision may wait for it."""

    url: str = field(default=DEFAULT_REDIS_URL, repr=False, metadata={"check": check_redis_url})
    key_prefix: str = "geo-route:"
    socket_timeout: float = _checked(check_positive, default=0.05)
    connect_timeout: float = _checked(check_positive, default=0.1)
    max_connections: int = _checked(check_positive, default=32)
    unavailable_cooldown: float = _checked(check_not_negative, default=1.0)
    # Redis Sentinel (instead of url): the sentinels' host:port, asked in turn for the current
    # primary of master_name (redis-py's Sentinel client; every new connection asks again).
    sentinels: tuple[str, ...] = _checked(check_sentinels, default=())
    master_name: str = ""
    sentinel_username: str = ""
    sentinel_password: str = field(default="", repr=False)
    sentinel_tls: bool = False
    # The data nodes under Sentinel (with url, these belong in the URL: user, password, /db, rediss://).
    username: str = ""
    password: str = field(default="", repr=False)
    db: int = _checked(check_not_negative, default=0)
    tls: bool = False
    # CA certificates (PEM) that TLS connections verify the server against; empty: the system's.
    tls_ca_file: str = _checked(check_absolute_path, default="")
    # Redis Cluster (instead of url): some nodes' host:port to discover the cluster from (redis-py's
    # RedisCluster; username, password and tls as above). Repositories are spread over
    # cluster_buckets hash tags (geo_route/index/redis_store.py); fixed for the life of an index.
    cluster_nodes: tuple[str, ...] = _checked(check_sentinels, default=())
    cluster_buckets: int = _checked(check_positive, default=256)

    @property
    def display_url(self) -> str:
        if self.cluster_nodes:
            return f"cluster via {','.join(self.cluster_nodes)}"
        if self.sentinels:
            return f"sentinel {self.master_name} via {','.join(self.sentinels)} db {self.db}"
        return redact_url(self.url)

    def problems(self) -> list[str]:
        """Problems that involve more than one of its keys."""
        if self.cluster_nodes:
            return self.cluster_problems()
        if not self.sentinels:
            sentinel_only = ("master_name", "sentinel_username", "sentinel_password", "sentinel_tls", "db", "tls")
            return [f"redis.{name}: only with redis.sentinels" for name in sentinel_only if getattr(self, name)]
        problems = [] if self.master_name else ["redis.master_name: required with redis.sentinels"]
        if self.url != DEFAULT_REDIS_URL:
            problems.append("redis.url: not used with redis.sentinels (the data nodes' username, password, db, tls)")
        return problems

    def cluster_problems(self) -> list[str]:
        problems = []
        if self.sentinels:
            problems.append("redis.cluster_nodes: not with redis.sentinels (one or the other)")
        if self.url != DEFAULT_REDIS_URL:
            problems.append("redis.url: not used with redis.cluster_nodes (username, password, tls)")
        for name in ("master_name", "sentinel_username", "sentinel_password", "sentinel_tls", "db"):
            if getattr(self, name):
                problems.append(f"redis.{name}: not used with redis.cluster_nodes")
        if "{" in self.key_prefix or "}" in self.key_prefix:
            problems.append("redis.key_prefix: no braces with redis.cluster_nodes (they would choose the hash slot)")
        return problems


@dataclass(frozen=True)
class RoutingSettings:
    """How tag requests are routed; see README "Tag policy"."""

    tag_policy: TagPolicy = "pinned"
    max_tag_age: int = _checked(check_not_negative, default=300)
    refresh_fraction: float = _checked(check_fraction, default=0.5)
    write_fence: int = _checked(check_not_negative, default=30)
    cache_digest_seconds: int = _checked(check_not_negative, default=30)
    stale_if_error: int = _checked(check_not_negative, default=86400)
    # Verified local content (docs/reliability.md "Corrupted local content"): NGINX remembers, per
    # client address, each blob or manifest by digest it served whole from the local registry for
    # refetch_window seconds (0 = off); a client fetching it again within that time (a client that
    # rejected the bytes retries) has the updater verify the local copy at once; refetches of a copy
    # verified within refetch_recheck need no new verification; refetch_trust bounds how long a
    # verification lets refetches be served here with refetch_route "primary".
    refetch_window: int = _checked(check_not_negative, default=600)
    refetch_trust: int = _checked(check_positive, default=600)
    # A refetch of content whose last verification is older than this (within its trust) is still
    # served here, and asks for the content to be verified again: a retrying client's bound.
    refetch_recheck: int = _checked(check_positive, default=60)
    # Where a refetch of content not verified since goes while it is verified: "local" (served here;
    # the client's next retry, once the verifier has read the copy, goes to the primary if it was
    # bad: every replicated byte stays local) or "primary" (at once: a retrying client never gets the
    # same bad copy twice, but a machine pulling the same image twice pays the WAN for it).
    refetch_route: RefetchRoute = "local"

    @property
    def refresh_after(self) -> float:
        """A read of a pin older than this queues its re-resolution (docs/consistency.md)."""
        return self.max_tag_age * self.refresh_fraction


@dataclass(frozen=True)
class ServerSettings:
    """The auth service's gunicorn process."""

    bind: tuple[str, ...] = _checked(check_binds, default=("127.0.0.1:8080",))
    workers: int = _checked(check_positive, default=2)
    # httptools: gunicorn's asyncio worker with geo-route's own HTTP layer (geo_route/web/protocol.py),
    # NGINX's subrequests on kept-alive connections; asgi: the same on gunicorn's ASGI protocol
    worker_class: Literal["sync", "gthread", "asgi", "httptools"] = "httptools"
    threads: int = _checked(check_positive, default=1)
    keepalive: int = _checked(check_not_negative, default=75)
    timeout: int = _checked(check_positive, default=30)
    backlog: int = _checked(check_positive, default=2048)
    reuse_port: bool = False
    # With a unix: bind and worker_class httptools, each worker also listens on a socket of its own,
    # PATH.N (PATH the first unix: bind, N = 0 .. workers-1), and NGINX's upstream names them all (round
    # robin). A worker keeps the connections it accepts: on one shared socket the first worker to wake
    # took every connection NGINX opened, and one core made every decision.
    socket_per_worker: bool = True
    log_level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True)
class UpdaterSettings:
    """The index updater (``geo-route updater``) and reconciliation (``geo-route reconcile``)."""

    bind: tuple[str, ...] = _checked(check_binds, default=("127.0.0.1:8081",))
    workers: int = _checked(check_positive, default=1)
    local_secret: str = field(default="", repr=False)
    primary_secret: str = field(default="", repr=False)
    max_body_bytes: int = _checked(check_positive, default=8_388_608)
    dedupe_size: int = _checked(check_not_negative, default=10_000)
    reconcile_interval: int = _checked(check_not_negative, default=3600)
    reconcile_concurrency: int = _checked(check_positive, default=4)
    reconcile_lease: int = _checked(check_positive, default=60)
    # The updater's reconciliation walks the repositories in slices spread over reconcile_interval (a
    # cursor in the index: a restarted updater resumes), at most this many registry requests per
    # second (both registries; 0 = no limit). `geo-route reconcile --once` is a full run, unlimited.
    reconcile_requests_per_second: int = _checked(check_not_negative, default=200)
    resolve_concurrency: int = _checked(check_positive, default=8)
    resolve_batch: int = _checked(check_positive, default=64)
    # A claimed resolution neither pinned nor requeued within this many seconds (its updater died, or
    # Redis failed the write) is claimed again by any updater. Longer than a batch can take
    # (resolve_batch / resolve_concurrency questions of at most 30 s each), or a slow batch is asked twice.
    resolve_claim_seconds: int = _checked(check_positive, default=60)
    # Scrub: the local registry's content is read back and its digests checked, continuously, at
    # most this many bytes per second (0 = off; 32 MiB/s by default: 10 GB in about 5 minutes).
    verify_bytes_per_second: int = _checked(check_not_negative, default=33_554_432)
    # A pass starts at most this often (seconds): a small site is not re-read without pause.
    verify_interval: int = _checked(check_positive, default=60)
    # What a refetch queued (a client fetched content again) is read at, apart from the pass: 128 MiB/s
    # (a 1 GB layer in 8 s, while the refetches of it go to the primary); 0 = no limit.
    verify_refetch_bytes_per_second: int = _checked(check_not_negative, default=134_217_728)
    signing_key: str = ""
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    def problems_for_serving(self) -> list[str]:
        """What ``geo-route updater`` needs beyond the structural checks."""
        problems = []
        for name in ("local_secret", "primary_secret"):
            if len(getattr(self, name)) < 16:
                problems.append(f"updater.{name}: required, at least 16 characters (the registry sends it verbatim)")
        return problems


@dataclass(frozen=True)
class NginxSettings:
    """The secondary's NGINX, rendered by ``geo-route render-nginx``.

    The edge (README "The edge"): each worker may hold ``open_files_limit`` descriptors
    (``worker_rlimit_nofile``; NGINX's master sets it for its workers, which fails without
    CAP_SYS_RESOURCE above the hard ``ulimit -Hn``: NGINX then logs an alert and keeps the old
    limit, so set it at most to that hard limit where NGINX cannot raise it) and ``worker_connections``
    is derived from it. A client that has not sent its whole request header within
    ``client_header_timeout`` seconds is reset; ``per_address_connections`` caps the requests in
    progress per client address (0: no cap); ``per_address_denials`` (per second, after a burst of
    ``per_address_denials_burst``) caps the 401/403 answers per client address, past which NGINX
    answers 429 itself without asking the auth service (0: no cap); ``metrics_listen`` serves NGINX's
    own counters (empty: off).
    """

    listen: tuple[str, ...] = ("127.0.0.1:5080",)
    server_name: str = "_"
    tls_certificate: str = ""
    tls_certificate_key: str = ""
    access_log: str = "/var/log/nginx/geo-route.access.log"
    error_log: str = "/var/log/nginx/geo-route.error.log"
    runtime_dir: str = "/var/lib/geo-route/nginx"
    worker_processes: str = "auto"
    user: str = ""
    # The auth service's address as NGINX connects to it; empty: server.bind's first address (a
    # wildcard host read as loopback). Set it when NGINX runs on another host or container.
    auth_server: str = _checked(check_auth_server, default="")
    auth_timeout: float = _checked(check_positive, default=2.0)
    proxy_timeout: int = _checked(check_positive, default=900)
    connect_timeout: int = _checked(check_positive, default=5)
    local_timeout: int = _checked(check_positive, default=30)
    proxy_buffer_size: str = _checked(check_nginx_size, default="128k")
    upstream_keepalive: int = _checked(check_positive, default=32)
    decision_cache: bool = False
    decision_cache_size: str = "10m"
    primary_tls_verify: bool = True
    primary_ca_bundle: str = "/etc/ssl/certs/ca-certificates.crt"
    open_files_limit: int = _checked(check_open_files_limit, default=65536)
    client_header_timeout: int = _checked(check_positive, default=10)
    client_body_timeout: int = _checked(check_positive, default=30)
    send_timeout: int = _checked(check_positive, default=30)
    keepalive_timeout: int = _checked(check_not_negative, default=20)
    per_address_connections: int = _checked(check_not_negative, default=1024)
    per_address_denials: int = _checked(check_not_negative, default=50)
    per_address_denials_burst: int = _checked(check_positive, default=500)
    metrics_listen: str = _checked(check_metrics_listen, default="127.0.0.1:9145")

    @property
    def worker_connections(self) -> int:
        """Connections one worker may hold: its descriptors less 1/16 for logs, listeners and cache
        files. Every connection is one descriptor (a proxied request holds up to three: the client,
        the auth service and a registry), so a worker serves ``worker_connections // 3`` proxied
        requests at once, or holds ``worker_connections`` idle clients."""
        return self.open_files_limit - self.open_files_limit // 16


@dataclass(frozen=True)
class Settings:
    """Everything one secondary site needs; built only by ``load_settings``."""

    local_registry: LocalRegistrySettings
    primary: UpstreamSettings
    token: TokenSettings
    redis: RedisSettings = RedisSettings()
    routing: RoutingSettings = RoutingSettings()
    server: ServerSettings = ServerSettings()
    nginx: NginxSettings = NginxSettings()
    updater: UpdaterSettings = UpdaterSettings()

    @property
    def auth_server(self) -> str:
        """Where NGINX reaches the auth service: ``nginx.auth_server``, else ``server.bind``'s first
        ``unix:`` address (no TCP handshake or loopback stack per connection), else its first address as
        a client on the same host connects to it (``0.0.0.0:8080`` is ``127.0.0.1:8080``)."""
        unix = next((bind for bind in self.server.bind if bind.startswith("unix:")), "")
        return self.nginx.auth_server or unix or connectable_address(self.server.bind[0])

    @property
    def worker_sockets(self) -> tuple[str, ...]:
        """``server.socket_per_worker``'s binds, ``unix:PATH.N`` for each worker N: NGINX's way to the
        service when it uses the first ``unix:`` bind and the workers are ``httptools`` ones; else none."""
        server = self.server
        if self.nginx.auth_server or not server.socket_per_worker or server.worker_class != "httptools":
            return ()
        unix = self.auth_server
        return tuple(f"{unix}.{number}" for number in range(server.workers)) if unix.startswith("unix:") else ()

    @property
    def auth_servers(self) -> tuple[str, ...]:
        """The servers of NGINX's ``upstream geo_route_auth``: each worker's socket, or ``auth_server``."""
        return self.worker_sockets or (self.auth_server,)


def load_settings(path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None) -> Settings:
    """Defaults, then the YAML file at ``path``, then ``GEO_ROUTE_*`` from ``environ``."""
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    data: dict[str, Any] = {}
    base_dir = Path.cwd()
    if path is not None:
        data = _read_yaml(Path(path), problems)
        base_dir = Path(path).resolve().parent
    _merge(data, _environment_overrides(environ, problems))
    settings = _build(Settings, data, "", problems)
    if settings is not None:
        problems.extend(check_consistency(settings))
    if problems or settings is None:
        raise ConfigError(problems)
    return _resolve_paths(settings, base_dir)


def check_consistency(settings: Settings) -> list[str]:
    """Problems that involve more than one key."""
    problems = []
    nginx = settings.nginx
    if bool(nginx.tls_certificate) != bool(nginx.tls_certificate_key):
        problems.append("nginx.tls_certificate: tls_certificate and tls_certificate_key go together")
    problems.extend(settings.redis.problems())
    for bind in settings.worker_sockets[-1:]:
        if len(bind.removeprefix("unix:").encode()) >= UNIX_PATH_MAX:
            problems.append(
                f"server.bind: {bind!r}, a worker's socket (server.socket_per_worker), is too long for a Unix"
                f" socket ({UNIX_PATH_MAX - 1} bytes at most): a shorter path, or socket_per_worker: false"
            )
    return problems


def _read_yaml(path: Path, problems: list[str]) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        problems.append(f"{path}: cannot read ({exc.strerror})")
        return {}
    except yaml.YAMLError as exc:
        problems.append(f"{path}: not valid YAML ({exc})")
        return {}
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        problems.append(f"{path}: the top level must be a mapping")
        return {}
    return loaded


def _environment_overrides(environ: Mapping[str, str], problems: list[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for name, text in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        keys = name[len(ENV_PREFIX) :].lower().split(ENV_SEPARATOR)
        if len(keys) < 2 or not all(keys):
            problems.append(f"{name}: expected {ENV_PREFIX}<SECTION>{ENV_SEPARATOR}<KEY>")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        node = overrides
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return overrides


def _merge(into: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _build(cls: type[Any], data: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(data, Mapping):
        problems.append(f"{path or '<top>'}: expected a mapping, got {type(data).__name__}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            problems.append(f"{_join(path, str(key))}: unknown key")
    before = len(problems)
    values: dict[str, Any] = {}
    for name, spec in fields.items():
        key_path = _join(path, name)
        if name in data:
            field_start = len(problems)
            values[name] = _coerce(hints[name], data[name], key_path, problems)
            check = spec.metadata.get("check")
            if check is not None and len(problems) == field_start and (message := check(values[name])):
                problems.append(f"{key_path}: {message}")
        elif spec.default is dataclasses.MISSING and _is_section(hints[name]):
            values[name] = _build(hints[name], {}, key_path, problems)
        elif spec.default is dataclasses.MISSING:
            problems.append(f"{key_path}: required")
    return cls(**values) if len(problems) == before else None


def _is_section(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _coerce(hint: Any, value: Any, path: str, problems: list[str]) -> Any:
    if _is_section(hint):
        return _build(hint, value, path, problems)
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            problems.append(f"{path}: must be one of {list(allowed)}, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            problems.append(f"{path}: must be a list of strings")
            return ()
        return tuple(value)
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    problems.append(f"{path}: must be {_describe(hint)}, got {type(value).__name__} {value!r}")
    return value


def _describe(hint: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _resolve_paths(settings: Settings, base_dir: Path) -> Settings:
    """Relative file paths in the site file are relative to the file."""
    bundle = Path(settings.token.rootcertbundle)
    if not bundle.is_absolute():
        token = dataclasses.replace(settings.token, rootcertbundle=str(base_dir / bundle))
        settings = dataclasses.replace(settings, token=token)
    jwks = settings.token.jwks
    if jwks and not Path(jwks).is_absolute():
        settings = dataclasses.replace(settings, token=dataclasses.replace(settings.token, jwks=str(base_dir / jwks)))
    key = settings.updater.signing_key
    if key and not Path(key).is_absolute():
        settings = dataclasses.replace(
            settings, updater=dataclasses.replace(settings.updater, signing_key=str(base_dir / key))
        )
    return settings


__all__ = [
    "LocalRegistrySettings",
    "NginxSettings",
    "RedisSettings",
    "RoutingSettings",
    "ServerSettings",
    "Settings",
    "TokenSettings",
    "UpdaterSettings",
    "UpstreamSettings",
    "load_settings",
    "redact_url",
]
