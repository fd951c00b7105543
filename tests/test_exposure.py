"""Secrets and exposure on a real development stack (issue 6, item 5).

1. After a realistic run (push and pull through the secondary, replication with notifications
   flowing to the updater, a wrong password, bearer tokens sent to NGINX directly, probes with the
   updater's secrets), no log file under the stack directory holds a bearer token (the ones fetched
   here by value, and any JWT at all, which covers the tokens skopeo fetched itself), a user's
   password (or its Basic header), or the updater's notification secrets; and no file at all under
   it (NGINX's decision cache, on for this stack, the registries' storage, Redis) holds a token
   (issue 11, item 6).
2. The services listen on loopback: the settings' defaults, and every listening socket the stack's
   processes (and their children) hold.
3. The updater's and the auth service's endpoints are not reachable through the public NGINX
   server: NGINX answers itself (404 or 401, no upstream in its access log) for every method, with
   and without credentials, and neither service counts or logs anything meanwhile.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import re
import secrets
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from geo_route.config import load_settings
from geo_route.devstack.client import StackClient
from geo_route.devstack.images import MANIFEST_MEDIA_TYPE, build_oci_image
from geo_route.devstack.processes import descendants, fetch, wait_until
from geo_route.devstack.skopeo import Credentials, SkopeoError, docker_reference
from geo_route.devstack.stack import READER, READER_REPOSITORY, SERVICE, RunningStack, bring_up
from geo_route.render import render_nginx_conf

REPOSITORY = "exposure/app"
JWT = re.compile(rb"eyJ[\w-]{8,}\.eyJ[\w-]{8,}\.[\w-]{8,}")
THIRD_PARTY_LOGS = ("primary.log", "secondary.log")  # docker-registry 2.8 (Debian's docker-registry)
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
INTERNAL_PATHS = (
    "/events/local",
    "/events/primary",
    "/_geo_route/auth",
    "/auth",
    "/metrics",
    "/status",
    "/v2/../status",
    "/healthz",
    "/readyz",
    "/events/local/",
    "/events/local?source=primary",
    "//events//local",
    "/EVENTS/local",
    "/v2/../events/local",
    "/v2/%2e%2e/events/primary",
    "/v2/../auth",
    "/v2/..%2fmetrics",
    "/_geo_route/auth?X-Original-URI=/v2/",
)
ENVELOPE = json.dumps({"events": [{"id": "probe", "action": "push", "target": {"repository": "x", "digest": "y"}}]})


@dataclass
class Run:
    """What the realistic run used (label -> secret value) and what the probes through NGINX saw."""

    secrets: dict[str, str] = field(default_factory=dict)
    probes: list[tuple[str, str, str, int]] = field(default_factory=list)  # (method, path, credential, status)
    probe_log_entries: list[dict[str, object]] = field(default_factory=list)
    counters_before: dict[str, float] = field(default_factory=dict)
    counters_after: dict[str, float] = field(default_factory=dict)
    log_sizes_before: dict[str, int] = field(default_factory=dict)
    log_sizes_after: dict[str, int] = field(default_factory=dict)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningStack, StackClient]]:
    # With the decision cache on: NGINX writes the decisions it may reuse to files under the stack.
    running = bring_up(tmp_path_factory.mktemp("exposure") / "stack", decision_cache=True)
    client = StackClient(running.info, running)
    try:
        yield running, client
    finally:
        client.close()
        running.stop()


@pytest.fixture(scope="module")
def run(stack: tuple[RunningStack, StackClient], tmp_path_factory: pytest.TempPathFactory) -> Run:
    running, client = stack
    work = tmp_path_factory.mktemp("exposure-run")
    settings = load_settings(running.info.site_file, environ={})
    result = Run()
    for user, password in running.info.users.items():
        result.secrets[f"password of {user}"] = password
        result.secrets[f"Basic header of {user}"] = basic(user, password)
    for name in ("local_secret", "primary_secret"):
        value = getattr(settings.updater, name)
        result.secrets[f"updater.{name}"] = value.removeprefix("Bearer ")

    use_the_registry(client, work, result)
    send_bearer_tokens(client, result)
    wait_for_quiet_updater(running)
    probe_internal_paths(running, client, result)
    applied = [key for key, value in result.counters_before.items() if key.startswith("updater ") and value > 0]
    assert any('outcome="applied"' in key for key in applied), "no notification reached the updater"
    return result


def basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def use_the_registry(client: StackClient, work: Path, result: Run) -> None:
    """Push and pull through the secondary (skopeo fetches its own tokens), replicate, a wrong password."""
    image = build_oci_image(work / "image", "v1", layer_count=2)
    assert client.push(image, REPOSITORY, "v1") == image.digest
    client.replicate(REPOSITORY)  # waits until the secondary's notifications reached the index
    assert client.pull(REPOSITORY, "v1", work / "pulled") == image.digest
    client.push(image, READER_REPOSITORY, "v1")
    assert client.pull(READER_REPOSITORY, "v1", work / "reader", user=READER) == image.digest
    wrong = f"wrong-{secrets.token_urlsafe(12)}"
    result.secrets["a wrong password"] = wrong
    with pytest.raises(SkopeoError):
        client.skopeo.copy(
            image.reference,
            docker_reference(client.secondary, REPOSITORY, "v2"),
            dest_creds=Credentials(client.info.username, wrong),
        )
    answer = fetch(token_url(client, REPOSITORY, "pull"), {"Authorization": f"Basic {basic(READER, wrong)}"})
    assert answer.status == 401


def token_url(client: StackClient, repository: str, actions: str) -> str:
    return f"{client.info.token_realm}?service={SERVICE}&scope=repository:{repository}:{actions}"


def send_bearer_tokens(client: StackClient, result: Run) -> None:
    """Tokens from the token service, sent to NGINX directly: allowed, denied, anonymous and forged."""
    tokens = {
        "pull token": client.token(f"repository:{REPOSITORY}:pull"),
        "push token": client.token(f"repository:{REPOSITORY}:pull,push"),
        "reader token": client.token(f"repository:{READER_REPOSITORY}:pull", READER),
        "anonymous token": client.token(f"repository:{REPOSITORY}:pull", anonymous=True),
    }
    header, claims, signature = tokens["pull token"].split(".")
    tokens["forged token"] = f"{header}.{claims}.{signature[::-1]}"
    digest = client.digest_at(client.primary, REPOSITORY, "v1")
    uris = [
        "/v2/",
        f"/v2/{REPOSITORY}/manifests/v1",
        f"/v2/{REPOSITORY}/manifests/{digest}",
        f"/v2/{REPOSITORY}/tags/list",
    ]
    for label, token in tokens.items():
        result.secrets[label] = token
        result.secrets[f"signature of the {label}"] = token.rsplit(".", 1)[1]
        for method, uri in [
            (method, uri) for method in ("GET", "HEAD") for uri in uris if method == "GET" or "/tags/" not in uri
        ]:
            status = request(client.secondary, method, uri, f"Bearer {token}")
            assert status in (200, 401, 404), (label, method, uri, status)
    assert request(client.secondary, "GET", uris[1], f"Bearer {tokens['pull token']}") == 200
    assert request(client.secondary, "GET", uris[1], f"Bearer {tokens['forged token']}") == 401


def request(address: str, method: str, uri: str, authorization: str | None = None, body: str | None = None) -> int:
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    headers = {"Accept": MANIFEST_MEDIA_TYPE}
    if authorization is not None:
        headers["Authorization"] = authorization
    if body is not None:
        headers["Content-Type"] = "application/json"
    try:
        connection.request(method, uri, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def service_counters(running: RunningStack) -> dict[str, float]:
    """Every sample of the auth service's and the updater's /metrics that counts requests they handled."""
    settings = load_settings(running.info.site_file, environ={})
    counters: dict[str, float] = {}
    for name, bind in (("auth", settings.server.bind[0]), ("updater", settings.updater.bind[0])):
        text = fetch(f"http://{bind}/metrics").body.decode()
        for line in text.splitlines():
            if line.startswith("geo_route_") and "_total" in line.split(" ")[0]:
                sample, value = line.rsplit(" ", 1)
                counters[f"{name} {sample}"] = float(value)
    return counters


def wait_for_quiet_updater(running: RunningStack) -> None:
    """Until no notification has arrived for a while (the registries send them asynchronously)."""
    last: dict[str, float] = {}
    quiet_since = time.monotonic()

    def quiet() -> bool:
        nonlocal last, quiet_since
        now = service_counters(running)
        if now != last:
            last, quiet_since = now, time.monotonic()
        return time.monotonic() - quiet_since >= 1.5

    wait_until(quiet, 20.0, "the updater to stop receiving notifications", interval=0.25)


def service_log_sizes(running: RunningStack) -> dict[str, int]:
    return {name: running.processes[name].log_path.stat().st_size for name in ("auth", "updater")}


def probe_internal_paths(running: RunningStack, client: StackClient, result: Run) -> None:
    settings = load_settings(running.info.site_file, environ={})
    credentials = {
        "none": None,
        "pull token": f"Bearer {result.secrets['pull token']}",
        "local_secret": settings.updater.local_secret,
        "primary_secret": settings.updater.primary_secret,
        "Basic": f"Basic {result.secrets[f'Basic header of {client.info.username}']}",
    }
    result.counters_before, result.log_sizes_before = service_counters(running), service_log_sizes(running)
    offset = client.access_log_offset()
    for path in INTERNAL_PATHS:
        for method in METHODS:
            for label, authorization in credentials.items():
                body = ENVELOPE if method in ("POST", "PUT", "PATCH") else None
                status = request(client.secondary, method, path, authorization, body)
                result.probes.append((method, path, label, status))
    client.wait_for_quiet_log()
    with open(client.info.nginx_access_log, "rb") as stream:
        stream.seek(offset)
        result.probe_log_entries = [json.loads(line) for line in stream.read().splitlines() if line.strip()]
    result.counters_after, result.log_sizes_after = service_counters(running), service_log_sizes(running)


def log_files(running: RunningStack) -> list[Path]:
    files = sorted(Path(running.info.directory).rglob("*.log"))
    assert Path(running.info.nginx_access_log) in files
    assert (Path(running.info.directory) / "nginx" / "error.log") in files
    return files


def findings(path: Path, secrets_used: dict[str, str]) -> list[str]:
    data = path.read_bytes()
    found = [label for label, value in secrets_used.items() if value.encode() in data]
    found += [f"a JWT ({match[:12].decode()}...)" for match in JWT.findall(data)[:3]]
    return found


# ---------------------------------------------------------------- 1. secrets stay out of the logs


def test_no_geo_route_log_holds_a_token_password_or_secret(stack: tuple[RunningStack, StackClient], run: Run) -> None:
    running, _ = stack
    ours = [path for path in log_files(running) if path.name not in THIRD_PARTY_LOGS]
    assert {path.name for path in ours} >= {"access.log", "error.log", "auth.log", "updater.log", "token-service.log"}
    assert Path(running.info.nginx_access_log).stat().st_size > 0
    assert JWT.fullmatch(run.secrets["pull token"].encode()), "the JWT pattern must match the tokens in use"
    leaks = {str(path): found for path in ours if (found := findings(path, run.secrets))}
    assert leaks == {}


def test_registry_logs_hold_no_token_password_or_secret(stack: tuple[RunningStack, StackClient], run: Run) -> None:
    """docker-registry 2.8 logs each notification endpoint's headers (our shared secrets) at level info
    when it starts ('configuring endpoint ... headers=map[Authorization:[Bearer ...]]'): the devstack
    runs it at warn, as README advises for a site's registries; its access log still has every request."""
    running, _ = stack
    theirs = [path for path in log_files(running) if path.name in THIRD_PARTY_LOGS]
    assert len(theirs) == 2 and all(path.stat().st_size > 0 for path in theirs)
    leaks = {str(path): found for path in theirs if (found := findings(path, run.secrets))}
    assert leaks == {}


def test_no_file_under_the_stack_holds_a_token(stack: tuple[RunningStack, StackClient], run: Run) -> None:
    """NGINX writes each reusable decision to a file holding its cache key in clear: the key and the
    cached answer must hold a hash of the token at most, never the token."""
    running, _ = stack
    tokens = {label: value for label, value in run.secrets.items() if "token" in label}
    assert len(tokens) == 10, tokens
    cache = Path(load_settings(running.info.site_file, environ={}).nginx.runtime_dir) / "decisions"
    cached = [path for path in cache.rglob("*") if path.is_file()]
    assert cached, "the run left no decision in NGINX's cache"
    files = [path for path in Path(running.info.directory).rglob("*") if path.is_file() and not path.is_symlink()]
    assert set(cached) <= set(files)
    leaks = {str(path): found for path in files if (found := findings(path, tokens))}
    assert leaks == {}
    assert all(re.search(rb"\nKEY: [0-9a-f]{64}\|", path.read_bytes()) for path in cached), "keyed by a hash"


# ---------------------------------------------------------------- 2. loopback by default


def test_the_default_addresses_are_loopback(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    minimal = {
        "local_registry": {"url": "http://127.0.0.1:5000"},
        "primary": {"url": "https://registry.primary.example.com"},
        "token": {"realm": "https://gitlab.example/jwt/auth", "service": SERVICE, "issuer": "i", "rootcertbundle": "b"},
    }
    site.write_text(yaml.safe_dump(minimal), encoding="utf-8")
    settings = load_settings(site, environ={})
    binds = [*settings.server.bind, *settings.updater.bind, *settings.nginx.listen]
    assert binds and all(is_loopback(bind.rsplit(":", 1)[0]) for bind in binds), binds
    listens = re.findall(r"^\s*listen\s+(\S+?)[;\s]", render_nginx_conf(settings), re.MULTILINE)
    assert listens and all(is_loopback(listen.rsplit(":", 1)[0]) for listen in listens), listens


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink()
        except OSError:
            continue
        if str(target).startswith("socket:["):
            inodes.add(int(str(target)[8:-1]))
    return inodes


def bound_sockets() -> dict[int, tuple[str, int]]:
    """inode -> (address, port) of every TCP socket in LISTEN and every UDP socket, IPv4 and IPv6."""
    found: dict[int, tuple[str, int]] = {}
    for table in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if table.startswith("tcp") and fields[3] != "0A":
                continue
            address, port = fields[1].split(":")
            if int(port, 16):  # port 0: a UDP socket that is not bound
                found[int(fields[9])] = (decode_address(address), int(port, 16))
    return found


def decode_address(hex_address: str) -> str:
    """/proc/net's address: 32-bit words in host (little-endian) byte order."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def test_every_listening_socket_of_the_stack_is_on_loopback(stack: tuple[RunningStack, StackClient]) -> None:
    running, _ = stack
    pids = {pid for process in running.processes.values() for pid in (process.pid, *descendants(process.pid))}
    inodes = {inode for pid in pids for inode in socket_inodes(pid)}
    listening = {address for inode, address in bound_sockets().items() if inode in inodes}
    settings = load_settings(running.info.site_file, environ={})
    binds = (*settings.server.bind, *settings.updater.bind, *settings.nginx.listen)
    expected_ports = {int(bind.rsplit(":", 1)[1]) for bind in binds if not bind.startswith("unix:")}
    sockets = [Path(bind.removeprefix("unix:")) for bind in binds if bind.startswith("unix:")]
    assert sockets, "the devstack's NGINX reaches its auth service on a Unix socket"
    assert all(stat.S_IMODE(socket.stat().st_mode) == 0o660 for socket in sockets)  # nobody else may connect
    assert expected_ports <= {port for _, port in listening}
    assert len({port for _, port in listening}) >= len(running.processes)  # one or more per process
    exposed = {(host, port) for host, port in listening if not ipaddress.ip_address(host).is_loopback}
    assert exposed == set()


# ---------------------------------------------------------------- 3. internal endpoints stay internal


def test_nginx_answers_every_internal_path_itself(run: Run) -> None:
    assert len(run.probes) == len(INTERNAL_PATHS) * len(METHODS) * 5
    unexpected = [probe for probe in run.probes if probe[3] not in (401, 404)]
    assert unexpected == []
    assert len(run.probe_log_entries) == len(run.probes)
    proxied = [(e["method"], e["uri"], e["upstream"]) for e in run.probe_log_entries if e["upstream"]]
    assert proxied == []


def test_no_probe_reached_the_updater_or_the_auth_service(run: Run) -> None:
    assert run.counters_before, "no counters read from /metrics"
    changed = {
        key: (run.counters_before.get(key), value)
        for key, value in run.counters_after.items()
        if run.counters_before.get(key) != value
    }
    assert changed == {}
    assert run.log_sizes_after == run.log_sizes_before
