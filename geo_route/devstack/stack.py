"""The whole development stack of a geo-route site on loopback: what tests, the demo and benchmarks share.

``bring_up(directory)`` starts, each on a free 127.0.0.1 port and each with its log in ``directory``:
redis-server (or, with ``redis="sentinel"``, a primary, a replica and three sentinels the site
reaches through ``redis.sentinels``), the development token service, two Docker Distribution registries (primary and
secondary, token auth with one shared key; Debian's 2.8, or the binary ``DEVSTACK_REGISTRY_BINARY``
names), the geo-route auth service under gunicorn and NGINX
from the rendered site config (``nodes=N``: N of each, and N updaters; see ``nodes.py``). It waits
until every part answers, writes ``stack.json`` and returns;
the processes keep running. ``tear_down(directory)`` stops exactly the PIDs in ``stack.json``.
If start-up fails half-way, what was started is stopped again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from geo_route.config import load_settings
from geo_route.devstack.keys import SigningKeyFiles, generate_signing_key
from geo_route.devstack.nodes import (
    AUTH_SOCKET,
    NodeInfo,
    start_auth_service,
    start_nginx,
    start_node,
    start_updater,
    write_node_site,
)
from geo_route.devstack.nodes import (
    environment_without_settings as environment_without_settings,  # tests import it from here
)
from geo_route.devstack.processes import LOOPBACK, LoggedProcess, free_port, require_binary, stop_pid
from geo_route.devstack.redis_cluster import ClusterTopology
from geo_route.devstack.redis_server import RedisProcess, SentinelTopology
from geo_route.devstack.registry import (
    JWKS_FILE,
    NotificationEndpoint,
    TokenAuth,
    bundle_jwks,
    registry_binary,
    registry_major_version,
    start_registry,
)
from geo_route.devstack.token_config import TokenServiceConfig, TokenUser
from geo_route.devstack.token_service import start_token_service
from geo_route.errors import DevstackError

STACK_FILE = "stack.json"
UNIX_PATH_MAX = 108  # sun_path, with its terminating NUL
ISSUER = "geo-route-devstack"
SERVICE = "container_registry"
USERNAME = "developer"
READER = "reader"  # may pull only READER_REPOSITORY: for tests of cross-repository access
READER_REPOSITORY = "team-a/app"
DEVSTACK_WRITE_FENCE = 2
# NGINX's default nginx.open_files_limit; the devstack's NGINX gets at most the hard limit it runs
# under (without CAP_SYS_RESOURCE, NGINX cannot raise its workers' limit past it).
NGINX_OPEN_FILES = 65536
STOP_ORDER: tuple[str, ...] = ("nginx", "auth", "secondary", "primary", "updater", "token-service")
STOP_ORDER += ("sentinel-1", "sentinel-2", "sentinel-3", "redis", "redis-replica", "redis-cluster")
RedisTopology = Literal["single", "sentinel", "cluster"]
SENTINEL_MASTER = "geo-route"


@dataclass(frozen=True)
class StackInfo:
    """What ``stack.json`` holds: URLs, credentials, files and the PID of every process started."""

    directory: str
    secondary_url: str
    primary_url: str
    local_registry_url: str
    token_realm: str
    username: str
    password: str
    redis_url: str  # the primary's when the stack started (under Sentinel, another node may be it now)
    nginx_access_log: str
    site_file: str
    updater_url: str = ""
    nginx_metrics_url: str = ""  # NGINX's Prometheus counters (nginx.metrics_listen), ".../metrics"
    users: dict[str, str] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    redis_sentinels: list[str] = field(default_factory=list)  # host:port of each sentinel (redis="sentinel")
    redis_cluster_nodes: list[str] = field(default_factory=list)  # host:port of each node (redis="cluster")
    nodes: list[NodeInfo] = field(default_factory=list)  # every node, node 1 (the fields above) first

    def node(self, number: int) -> StackInfo:
        """This stack as node ``number`` serves it: its URL, access log, metrics and site file (and its
        updater, if it runs one), e.g. for a ``StackClient`` that pulls through that node."""
        node = next((node for node in self.nodes if node.number == number), None)
        if node is None:
            raise DevstackError(f"the stack has no node {number} (nodes: {[n.number for n in self.nodes]})")
        return dataclasses.replace(
            self,
            secondary_url=node.secondary_url,
            nginx_access_log=node.nginx_access_log,
            nginx_metrics_url=node.nginx_metrics_url,
            site_file=node.site_file,
            updater_url=node.updater_url or self.updater_url,
        )

    def write(self) -> Path:
        path = Path(self.directory) / STACK_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        path.chmod(0o600)
        return path

    @classmethod
    def read(cls, directory: Path) -> StackInfo:
        path = directory / STACK_FILE
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
            values["nodes"] = [NodeInfo(**node) for node in values.get("nodes", [])]
            return cls(**values)
        except (OSError, ValueError, TypeError) as exc:
            raise DevstackError(f"no usable {path}: {exc}") from None


@dataclass
class RunningStack:
    """A stack this process started: ``info`` plus the process handles, so it can stop and reap them."""

    info: StackInfo
    processes: dict[str, LoggedProcess]
    redis_topology: SentinelTopology | ClusterTopology | None = None  # which node is a primary now

    def stop_part(self, name: str) -> None:
        self.processes[name].stop()

    def kill_part(self, name: str) -> None:
        """SIGKILL a part (``nginx``, ``auth-2``, ...) and the processes it started (a crash);
        ``restart_part`` brings it back."""
        self.processes[name].kill()

    def restart_part(self, name: str, timeout: float = 30.0) -> None:
        """Start a stopped or killed part again with the same command, port and files; update stack.json."""
        self.processes[name] = self.processes[name].restart(timeout)
        self.info = dataclasses.replace(self.info, pids={**self.info.pids, name: self.processes[name].pid})
        self.info.write()

    def add_node(self, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> NodeInfo:
        """One more node (an auth service and an NGINX, no updater) on the same index and registries,
        its site file being node 1's with ``overrides`` merged in (``write_node_site``): e.g. the same
        site with another ``server`` section, measured side by side with node 1."""
        directory, number = Path(self.info.directory), max(node.number for node in self.info.nodes) + 1
        site = write_node_site(directory, Path(self.info.site_file), number, overrides)
        node = start_node(directory, site, number, self.processes, with_updater=False)
        pids = {name: process.pid for name, process in self.processes.items()}
        self.info = dataclasses.replace(self.info, nodes=[*self.info.nodes, node], pids=pids)
        self.info.write()
        return node

    def stop(self) -> None:
        for name in ordered(self.processes):
            self.processes[name].stop()


def bring_up(
    directory: Path,
    *,
    tag_policy: str = "pinned",
    decision_cache: bool = False,
    primary_front: Callable[[str], str] | None = None,
    site_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    redis: RedisTopology = "single",
    nodes: int = 1,
    updaters: int | None = None,
) -> RunningStack:
    """Start every part in ``directory`` (created if needed); stop them all again if one fails.

    ``redis="sentinel"`` runs the index on a ``SentinelTopology`` (parts ``redis``, ``redis-replica``,
    ``sentinel-1`` to ``-3``; Debian's redis-sentinel) and the site on ``redis.sentinels``;
    ``redis="cluster"`` on a ``ClusterTopology`` (three primaries and a replica of each, parts
    ``redis-cluster-1`` to ``-6``) and the site on ``redis.cluster_nodes``.

    ``site_overrides`` merges keys into sections of the generated site file, e.g.
    ``{"routing": {"max_tag_age": 5}}``.

    ``primary_front``, if given, is called with the primary registry's ``127.0.0.1:PORT`` (before the
    site file is written) and returns the address NGINX and clients use for the primary instead, e.g.
    a simulated WAN in front of it. The registries' notifications and the updater are unaffected.

    ``nodes`` runs that many auth services and NGINX in front of the one index (``nodes.py``: node N's
    parts are ``auth-N`` and ``nginx-N``, its site file ``site-N.yaml``); ``updaters`` (at most
    ``nodes``; as many as ``nodes`` by default) runs an updater on the first that many nodes. The
    registries notify updater 1 only (a notification endpoint is one URL); every updater runs the
    background loops (tag resolution, reconciliation, verification) on the one index.
    """
    updaters = nodes if updaters is None else updaters
    if not 1 <= updaters <= max(nodes, 1):
        raise DevstackError(f"updaters must be between 1 and nodes ({nodes}), not {updaters}")
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    more_binaries = {"sentinel": ("redis-sentinel",), "cluster": ("redis-cli",)}.get(redis, ())
    for binary in ("redis-server", "nginx", "skopeo", *more_binaries):
        require_binary(binary)
    registry_binary()  # DEVSTACK_REGISTRY_BINARY or docker-registry
    processes: dict[str, LoggedProcess] = {}
    topology: SentinelTopology | ClusterTopology | None = None
    if redis == "sentinel":
        topology = SentinelTopology(directory / "redis", SENTINEL_MASTER)
    elif redis == "cluster":
        topology = ClusterTopology(directory / "redis", replicas_per_primary=1)
    try:
        info = start_all(directory, tag_policy, decision_cache, processes, primary_front, site_overrides, topology)
        info = start_more_nodes(info, nodes, updaters, processes)
    except BaseException:
        RunningStack(None, processes).stop()  # type: ignore[arg-type]
        raise
    return RunningStack(info, processes, topology)


def start_all(
    directory: Path,
    tag_policy: str,
    decision_cache: bool,
    processes: dict[str, LoggedProcess],
    primary_front: Callable[[str], str] | None = None,
    site_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    redis_topology: SentinelTopology | ClusterTopology | None = None,
) -> StackInfo:
    keys = generate_signing_key(directory / "keys")
    redis_section, sentinels, redis_url = start_redis(directory, redis_topology, processes)

    users = {USERNAME: secrets.token_urlsafe(12), READER: secrets.token_urlsafe(12)}
    token = start_token_service(token_config(str(keys.private_key), users), directory / "token-service")
    processes["token-service"] = token.logged

    primary_port, secondary_port, nginx_port = free_port(), free_port(), free_port()
    primary_url = f"http://{LOOPBACK}:{primary_port}"
    if primary_front is not None:
        primary_url = f"http://{primary_front(f'{LOOPBACK}:{primary_port}')}"
    jwks = registry_jwks(keys)
    site = write_site_file(
        directory,
        primary_url,
        f"http://{LOOPBACK}:{secondary_port}",
        token.realm,
        keys,
        redis_section,
        nginx_port,
        tag_policy,
        decision_cache,
        with_registry_token_section(site_overrides, jwks),
    )
    settings = load_settings(site, environ={})
    processes["updater"] = start_updater(directory / "updater", site)

    auth = TokenAuth(
        realm=token.realm, service=SERVICE, issuer=ISSUER, rootcertbundle=Path(keys.certificate), jwks=jwks
    )
    updater_url = f"http://{settings.updater.bind[0]}"
    primary = start_registry(
        directory / "primary",
        auth,
        name="primary",
        port=primary_port,
        notifications=[
            NotificationEndpoint("geo-route", f"{updater_url}/events/primary", settings.updater.primary_secret)
        ],
    )
    processes["primary"] = primary.logged
    secondary = start_registry(
        directory / "secondary",
        auth,
        name="secondary",
        port=secondary_port,
        notifications=[NotificationEndpoint("geo-route", f"{updater_url}/events/local", settings.updater.local_secret)],
    )
    processes["secondary"] = secondary.logged

    processes["auth"] = start_auth_service(directory / "auth", site)
    processes["nginx"] = start_nginx(directory / "nginx", site)

    info = StackInfo(
        directory=str(directory),
        secondary_url=f"http://{LOOPBACK}:{nginx_port}",
        primary_url=primary.url if primary_front is None else primary_url,
        local_registry_url=secondary.url,
        token_realm=token.realm,
        username=USERNAME,
        password=users[USERNAME],
        redis_url=redis_url,
        nginx_access_log=str(directory / "nginx" / "access.log"),
        site_file=str(site),
        updater_url=updater_url,
        nginx_metrics_url=f"http://{settings.nginx.metrics_listen}/metrics" if settings.nginx.metrics_listen else "",
        users=users,
        pids={name: process.pid for name, process in processes.items()},
        redis_sentinels=sentinels,
        redis_cluster_nodes=list(redis_section.get("cluster_nodes", [])),
        nodes=[
            NodeInfo(
                number=1,
                secondary_url=f"http://{LOOPBACK}:{nginx_port}",
                nginx_access_log=str(directory / "nginx" / "access.log"),
                nginx_metrics_url=f"http://{settings.nginx.metrics_listen}/metrics"
                if settings.nginx.metrics_listen
                else "",
                site_file=str(site),
                auth_url=f"http://{settings.server.bind[0]}",
                updater_url=updater_url,
            )
        ],
    )
    info.write()
    return info


def start_more_nodes(info: StackInfo, nodes: int, updaters: int, processes: dict[str, LoggedProcess]) -> StackInfo:
    """Nodes 2 to ``nodes`` (updaters on nodes 2 to ``updaters``); ``stack.json`` lists them all."""
    directory, site = Path(info.directory), Path(info.site_file)
    more = [
        start_node(
            directory, write_node_site(directory, site, number), number, processes, with_updater=number <= updaters
        )
        for number in range(2, nodes + 1)
    ]
    if not more:
        return info
    pids = {name: process.pid for name, process in processes.items()}
    info = dataclasses.replace(info, nodes=[*info.nodes, *more], pids=pids)
    info.write()
    return info


def start_redis(
    directory: Path, topology: SentinelTopology | ClusterTopology | None, processes: dict[str, LoggedProcess]
) -> tuple[dict[str, Any], list[str], str]:
    """The index's Redis: (the site file's redis section, the sentinels, the primary's URL now)."""
    if isinstance(topology, ClusterTopology):
        topology.start()
        processes.update(topology.processes())
        return {"cluster_nodes": topology.addresses}, [], next(iter(topology.nodes.values())).url
    if topology is not None:
        topology.start()  # stops what it started if it fails
        processes.update(topology.processes())
        section = {"sentinels": topology.sentinel_addresses, "master_name": topology.master_name}
        return section, topology.sentinel_addresses, topology.nodes["redis"].url
    redis = RedisProcess(directory / "redis").start()
    assert redis.logged is not None
    processes["redis"] = redis.logged
    return {"url": redis.url}, [], redis.url


def registry_jwks(keys: SigningKeyFiles) -> Path | None:
    """The ``auth.token.jwks`` file both registries get when they are Distribution 3 (the bundle's
    keys under libtrust fingerprint and thumbprint, as ``geo-route jwks`` writes it), else ``None``."""
    if registry_major_version(registry_binary()) < 3:
        return None
    return bundle_jwks(Path(keys.certificate), Path(keys.certificate).parent / JWKS_FILE)


def with_registry_token_section(
    overrides: Mapping[str, Mapping[str, Any]] | None, jwks: Path | None
) -> dict[str, Mapping[str, Any]]:
    """``overrides`` with the ``token`` settings that follow the registries' dialect under its own
    ``token`` keys (those win): with Distribution 3 registries (``jwks`` set), ``token.dialect:
    distribution-3`` (their challenge and negotiation) and ``token.jwks``: the very JWKS file they
    trust, so the site trusts each key under the same ids as they do."""
    merged = dict(overrides or {})
    if jwks is not None:
        merged["token"] = {"dialect": "distribution-3", "jwks": str(jwks), **merged.get("token", {})}
    return merged


def token_config(private_key: str, users: dict[str, str]) -> TokenServiceConfig:
    table = {
        USERNAME: TokenUser(users[USERNAME], {"*": ["pull", "push", "delete"]}),
        READER: TokenUser(users[READER], {READER_REPOSITORY: ["pull"]}),
    }
    return TokenServiceConfig(ISSUER, SERVICE, private_key, f"{LOOPBACK}:{free_port()}", table)


def write_site_file(
    directory: Path,
    primary_url: str,
    secondary_url: str,
    realm: str,
    keys: SigningKeyFiles,
    redis: Mapping[str, Any],
    nginx_port: int,
    tag_policy: str,
    decision_cache: bool = False,
    site_overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    nginx_dir = directory / "nginx"
    (nginx_dir / "run").mkdir(parents=True, exist_ok=True)
    site: dict[str, Any] = {
        "local_registry": {"url": secondary_url},
        "primary": {"url": primary_url},
        "token": {"realm": realm, "service": SERVICE, "issuer": ISSUER, "rootcertbundle": str(keys.certificate)},
        "redis": dict(redis),
        # A short write fence: the devstack's writes take milliseconds, and tests wait for pins.
        "routing": {"tag_policy": tag_policy, "write_fence": DEVSTACK_WRITE_FENCE},
        "server": {"bind": auth_binds(directory / "auth"), "workers": 2, "log_level": "warning"},
        "nginx": {
            "listen": [f"{LOOPBACK}:{nginx_port}"],
            "runtime_dir": str(nginx_dir / "run"),
            "access_log": str(nginx_dir / "access.log"),
            "error_log": str(nginx_dir / "error.log"),
            "worker_processes": "2",
            "user": "root" if os.geteuid() == 0 else "",
            "decision_cache": decision_cache,
            "open_files_limit": nginx_open_files_limit(),
            "metrics_listen": f"{LOOPBACK}:{free_port()}",
        },
        "updater": {
            "bind": [f"{LOOPBACK}:{free_port()}"],
            "local_secret": f"Bearer {secrets.token_urlsafe(24)}",
            "primary_secret": f"Bearer {secrets.token_urlsafe(24)}",
            "signing_key": str(keys.private_key),
            "log_level": "warning",
        },
    }
    for section, values in (site_overrides or {}).items():
        site[section] = {**site.get(section, {}), **values}
    path = directory / "site.yaml"
    path.write_text(yaml.safe_dump(site, sort_keys=False), encoding="utf-8")
    load_settings(path, environ={})  # fail here, with every problem listed, rather than in a child process
    return path


def auth_binds(directory: Path) -> list[str]:
    """The auth service's binds: TCP first (tests and scrapers use ``server.bind[0]``), then the Unix
    socket NGINX uses (``Settings.auth_server``), unless its path, or a worker's ``PATH.N``
    (``server.socket_per_worker``), is too long for one (108 bytes)."""
    socket = directory / AUTH_SOCKET
    unix = [f"unix:{socket}"] if len(str(socket).encode()) + len(".99") < UNIX_PATH_MAX else []
    return [f"{LOOPBACK}:{free_port()}", *unix]


def nginx_open_files_limit() -> int:
    """NGINX's default, or the hard descriptor limit the stack runs under if that is lower."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return NGINX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(NGINX_OPEN_FILES, hard)


def tear_down(directory: Path) -> dict[str, bool]:
    """Stop exactly the PIDs ``stack.json`` names; remove nothing. Returns name → stopped."""
    return stop_pids(StackInfo.read(directory.resolve()).pids)


def stop_pids(pids: dict[str, int]) -> dict[str, bool]:
    return {name: stop_pid(pids[name]) for name in ordered(pids) if pids[name] > 0}


def ordered(names: Iterable[str]) -> list[str]:
    """Front to back: NGINX first (every node's), Redis last."""
    return sorted(names, key=stop_rank)


def stop_rank(name: str) -> int:
    """``name``'s place in ``STOP_ORDER``; node N's parts (``nginx-2``) rank as node 1's (``nginx``)."""
    base, _, number = name.rpartition("-")
    for candidate in (name, base if number.isdigit() else name):
        if candidate in STOP_ORDER:
            return STOP_ORDER.index(candidate)
    return len(STOP_ORDER)
