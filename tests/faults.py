"""The fault matrix's machinery: concurrent skopeo pulls through the site while a fault is applied.

``PullLoad`` keeps ``workers`` threads pulling their targets through NGINX with a real skopeo, each
pull into a fresh OCI layout with a hard time limit (a hung pull is killed and counted). skopeo
verifies every blob against its digest, so a pull that returns is byte-correct for the manifest
digest it reports; the matrix checks that digest against what the primary published.

``Outcome`` is one row of the matrix (docs/reliability.md): pulls, failures, wrong content, the
slowest pull, the routes NGINX took while the fault was on, and how the index recovered.

The probes the cells use from outside the site: ``TagWatch`` (when the index learnt of a change),
``post_events`` (a notification as a registry would send it), ``RawRedis`` (what an operator's
``redis-cli`` sees, on the primary ``index_redis_url`` names: under Sentinel, the one the sentinels
name now), ``run_reconcile`` and ``kill_reconcile_mid_run``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from test_local_fallback import last_status

from geo_route.config import load_settings
from geo_route.devstack.client import AccessLogEntry, StackClient, parse_access_log_line
from geo_route.devstack.images import MANIFEST_MEDIA_TYPE
from geo_route.devstack.redis_server import resp_command
from geo_route.devstack.skopeo import Skopeo, SkopeoError, docker_reference
from geo_route.errors import DevstackError, IndexUnavailable
from geo_route.index.model import IndexQuery, QueryKind
from geo_route.index.redis_store import RedisIndexStore

PULL_BOUND = 30.0  # seconds: a pull that takes longer counts as hung


@dataclass(frozen=True)
class Pull:
    target: str  # repository:tag
    started: float  # time.monotonic()
    seconds: float
    digest: str
    error: str

    @property
    def ended(self) -> float:
        return self.started + self.seconds


class PullLoad:
    """``with PullLoad(client, targets, workdir) as load: ...``; ``load.pulls`` afterwards."""

    def __init__(self, client: StackClient, targets: Sequence[str], workdir: Path, workers: int = 3) -> None:
        self.client = client
        self.targets = list(targets)
        self.workdir = workdir
        self.workers = workers
        self.pulls: list[Pull] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []

    def __enter__(self) -> PullLoad:
        for number in range(self.workers):
            thread = threading.Thread(target=self.pull_forever, args=(number,), daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(PULL_BOUND + 10)

    def pull_forever(self, number: int) -> None:
        skopeo = Skopeo(self.workdir / f"worker-{number}", timeout=PULL_BOUND)
        count = 0
        while not self.stopping.is_set():
            target = self.targets[(number + count) % len(self.targets)]
            count += 1
            self.record(self.pull_once(skopeo, target, self.workdir / f"worker-{number}" / f"pull-{count}"))

    def pull_once(self, skopeo: Skopeo, target: str, layout: Path) -> Pull:
        """``target`` is ``repository:tag`` or ``repository@digest``."""
        repository, reference = target.split("@", 1) if "@" in target else target.rsplit(":", 1)
        source = docker_reference(self.client.secondary, repository, reference)
        started = time.monotonic()
        digest, error = "", ""
        try:
            digest = skopeo.copy(source, f"oci:{layout}:pulled", src_creds=self.client.credentials())
        except SkopeoError as exc:
            error = str(exc)
        finally:
            shutil.rmtree(layout, ignore_errors=True)
        return Pull(target, started, time.monotonic() - started, digest, error)

    def record(self, pull: Pull) -> None:
        with self.lock:
            self.pulls.append(pull)

    def snapshot(self) -> list[Pull]:
        with self.lock:
            return list(self.pulls)

    def wait_for_pulls(self, count: int, *, started_after: float = 0.0, timeout: float = 60.0) -> None:
        """Wait until ``count`` pulls that started after ``started_after`` (monotonic) have finished."""
        deadline = time.monotonic() + timeout
        while sum(1 for p in self.snapshot() if p.started > started_after) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} pulls finished within {timeout}s")
            time.sleep(0.05)


@dataclass
class Outcome:
    """One row of the fault matrix."""

    cell: str
    fault: str
    pulls: int = 0
    failed: int = 0
    allowed_failures: int = 0
    wrong_content: int = 0
    stale: int = 0
    slowest_pull_s: float = 0.0
    routes_during_fault: dict[str, int] = field(default_factory=dict)
    recovery: str = ""
    fault_ended: float = 0.0  # time.monotonic() when the fault was lifted (the recovery began)
    index_correct_after_s: float = -1.0  # seconds from fault_ended
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.failed == self.allowed_failures
            and self.wrong_content == 0
            and self.stale == 0
            and self.slowest_pull_s <= PULL_BOUND
            and self.index_correct_after_s >= 0
        )

    def as_json(self) -> dict[str, object]:
        return {**asdict(self), "ok": self.ok}


def judge_pulls(
    outcome: Outcome,
    pulls: Sequence[Pull],
    published: dict[str, set[str]],
    failure_allowed: Callable[[Pull], bool] = lambda pull: False,
) -> None:
    """Count failures (unless allowed), wrong content (a digest the primary never published for that
    tag) and the slowest pull."""
    outcome.pulls = len(pulls)
    outcome.slowest_pull_s = round(max((p.seconds for p in pulls), default=0.0), 2)
    for pull in pulls:
        if pull.error:
            outcome.failed += 1
            if failure_allowed(pull):
                outcome.allowed_failures += 1
            if len(outcome.failures) < 3:
                outcome.failures.append(f"{pull.target}: {pull.error[-300:]}")
        elif pull.digest not in published[pull.target]:
            outcome.wrong_content += 1


def entries_between(client: StackClient, since: int, until: int) -> list[AccessLogEntry]:
    """The access log's complete lines between two byte offsets."""
    with open(client.info.nginx_access_log, "rb") as log:
        log.seek(since)
        lines = log.read(max(0, until - since)).decode("utf-8", "replace").splitlines()
    return [parse_access_log_line(line) for line in lines if line.endswith("}")]


def routes_between(client: StackClient, since: int, until: int) -> dict[str, int]:
    """NGINX routes of the pull requests logged between two byte offsets of the access log."""
    counts: Counter[str] = Counter()
    for entry in entries_between(client, since, until):
        if "/manifests/" in entry.uri or "/blobs/" in entry.uri:
            counts[f"{entry.route or 'nginx'}/{entry.status}"] += 1
    return dict(sorted(counts.items()))


def local_statuses_between(client: StackClient, since: int, until: int) -> dict[str, int]:
    """What the local registry last answered to the pull requests that fell back to the primary
    (``fallback_status``; "502, 401" is a dead kept-alive connection, then the 401)."""
    counts = Counter(
        last_status(entry)
        for entry in entries_between(client, since, until)
        if entry.route == "fallback" and ("/manifests/" in entry.uri or "/blobs/" in entry.uri)
    )
    return dict(sorted(counts.items()))


@dataclass
class Expected:
    """What the index must say once recovered: no pin to anything but the primary's digest, pins for
    replicated tags, and content present locally exactly when it is."""

    pins: dict[str, str] = field(default_factory=dict)  # repository:tag → the digest the primary names
    pin_required: set[str] = field(default_factory=set)  # replicated tags: must be pinned
    present: dict[tuple[str, str], bool] = field(default_factory=dict)  # (repository, digest) → here?


def index_problems(client: StackClient, expected: Expected) -> list[str]:
    try:
        return compare_index(client, expected)
    except IndexUnavailable as exc:  # the test's own connection sees the restart too
        return [str(exc)]


def compare_index(client: StackClient, expected: Expected) -> list[str]:
    problems = []
    for target, digest in expected.pins.items():
        repository, tag = target.rsplit(":", 1)
        view = client.index.lookup(IndexQuery(QueryKind.TAG, repository, tag))
        if not view.available:
            return ["index unavailable"]
        if not (view.pinned_digest and view.current) and target not in expected.pin_required:
            continue  # unpinned, or pinned in an older epoch (unconfirmed): routed to the primary, which is right
        if view.pinned_digest != digest:
            problems.append(f"{target} pinned to {view.pinned_digest or 'nothing'}, the primary says {digest[:19]}")
        elif not view.current:
            problems.append(f"{target} pinned in an older index epoch (unconfirmed)")
    for (repository, digest), present in expected.present.items():
        blob = client.index.lookup(IndexQuery(QueryKind.BLOB, repository, digest))
        manifest = client.index.lookup(IndexQuery(QueryKind.MANIFEST, repository, digest))
        if (blob.present or manifest.present) != present:
            problems.append(f"{repository}@{digest[:19]} present={not present}, expected {present}")
    return problems


def wait_for_index(
    client: StackClient, expected: Expected, since: float, timeout: float = 20.0
) -> tuple[float, list[str]]:
    """Seconds from ``since`` (monotonic) until the index matches ``expected``, checked every 50 ms
    (-1 and the problems if it does not within ``timeout``)."""
    deadline = time.monotonic() + timeout
    problems = index_problems(client, expected)
    while problems:
        if time.monotonic() > deadline:
            return -1.0, problems
        time.sleep(0.05)
        problems = index_problems(client, expected)
    return round(time.monotonic() - since, 2), []


def reasons_between(client: StackClient, since: int, until: int, repository: str) -> dict[str, int]:
    """``route:reason/status`` of the manifest requests for ``repository`` between two offsets."""
    counts = Counter(
        f"{entry.route or 'nginx'}:{entry.reason}/{entry.status}"
        for entry in entries_between(client, since, until)
        if entry.uri.startswith(f"/v2/{repository}/manifests/")
    )
    return dict(sorted(counts.items()))


RECONCILE_COMMAND = (sys.executable, "-m", "geo_route.cli", "reconcile", "--once", "-c")


@dataclass(frozen=True)
class ReconcileRun:
    refused: int  # attempts refused because another run held the lease
    last_refused: float  # time.monotonic() when the last refused attempt was started (0: none)
    started: float  # time.monotonic() when the attempt that ran was started
    ended: float


def run_reconcile(site_file: str, log: Path, patience: float = 30.0) -> ReconcileRun:
    """What an operator runs after an outage: ``geo-route reconcile --once``, started again every
    0.25 s while another run holds the lease (an updater's own run, or a killed one), at most
    ``patience`` seconds; any other failure raises."""
    deadline = time.monotonic() + patience
    refused, last_refused = 0, 0.0
    while True:
        started = time.monotonic()
        result = subprocess.run(
            [*RECONCILE_COMMAND, site_file], capture_output=True, timeout=120, check=False, stdin=subprocess.DEVNULL
        )
        with open(log, "ab") as output:
            output.write(result.stdout + result.stderr)
        if result.returncode == 0:
            return ReconcileRun(refused, last_refused, started, time.monotonic())
        if b"lock held" not in result.stdout or time.monotonic() > deadline:
            raise subprocess.CalledProcessError(result.returncode, RECONCILE_COMMAND, result.stdout, result.stderr)
        refused, last_refused = refused + 1, started
        time.sleep(0.25)


def index_redis_url(site_file: str) -> str:
    """The index's Redis primary as it is now: ``redis.url``; under Sentinel, the node a majority of
    the sentinels name (after a failover, not the first primary the stack started with)."""
    redis = load_settings(site_file, environ={}).redis
    if redis.cluster_nodes:  # its url is the unused default (the machine's own Redis): never that
        raise AssertionError("a Redis Cluster has no one primary: probe its nodes with a cluster client")
    if not redis.sentinels:
        return redis.url
    named: list[tuple[str, str]] = []
    for address in redis.sentinels:
        port = int(address.rpartition(":")[2])  # the devstack's sentinels are on loopback
        try:
            reply = resp_command(port, "SENTINEL", "get-master-addr-by-name", redis.master_name)
        except (OSError, DevstackError):
            continue
        if reply:
            named.append((str(reply[0]), str(reply[1])))
    majority = next((pair for pair in named if named.count(pair) * 2 > len(redis.sentinels)), None)
    if majority is None:
        raise AssertionError(f"no majority of the sentinels names a primary for {redis.master_name}: {named}")
    return f"redis://{majority[0]}:{majority[1]}/{redis.db}"


class RawRedis:
    """A plain RESP connection to the index's redis-server, as ``redis-cli`` would be: no epoch
    check, no key schema. Simple replies only (status, integer, error). Give it
    ``index_redis_url(site_file)``: the stack's ``redis_url`` is only the first primary."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("redis://").split("/")[0].split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.replies = self.sock.makefile("rb")

    def command(self, *args: str) -> str:
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self.sock.sendall(b"".join(parts))
        reply = self.replies.readline().decode().rstrip("\r\n")
        if reply.startswith("-"):
            raise RuntimeError(f"redis-server: {reply[1:]}")
        return reply[1:]

    def close(self) -> None:
        self.replies.close()
        self.sock.close()

    def __enter__(self) -> RawRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class KilledRun:
    at: float  # time.monotonic() of the SIGKILL
    lease_left: float  # seconds the killed run's lease still had


def kill_reconcile_mid_run(site_file: str, log: Path, attempts: int = 5) -> KilledRun:
    """Start ``geo-route reconcile --once`` and SIGKILL it (its own PID) as soon as it holds the
    reconcile lease: a run killed mid-way, by the OOM killer or a node's reboot."""
    settings = load_settings(site_file, environ={})
    lock = f"{settings.redis.key_prefix}lock:reconcile"
    with RawRedis(index_redis_url(site_file)) as redis, open(log, "ab") as output:
        for _ in range(attempts):
            run = subprocess.Popen(
                [*RECONCILE_COMMAND, site_file], stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
            try:
                while run.poll() is None and redis.command("EXISTS", lock) != "1":
                    time.sleep(0.002)
            finally:
                run.kill()
                run.wait(10)
            killed = time.monotonic()
            left = int(redis.command("PTTL", lock))
            if run.returncode == -9 and left > 0:
                return KilledRun(killed, left / 1000)
    raise AssertionError(f"no reconciliation was caught holding its lease in {attempts} attempts")


def observer_store(client: StackClient) -> RedisIndexStore:
    """The test's own view of the index. The decision path's 50 ms timeout and its cooldown serve
    NGINX; a test that waits for the index must not fail because the shared box was busy for 50 ms."""
    redis = load_settings(client.info.site_file, environ={}).redis
    patient = dataclasses.replace(redis, socket_timeout=2.0, connect_timeout=2.0, unavailable_cooldown=0.0)
    return RedisIndexStore(patient)


def observe_patiently(client: StackClient) -> StackClient:
    client.index.close()
    client.index = observer_store(client)
    return client


def monotonic_of(store: RedisIndexStore, stamp: float) -> float:
    """An index-clock stamp (Redis ``TIME``) as ``time.monotonic()``."""
    before = time.monotonic()
    now = store.now()
    return stamp - now + (before + time.monotonic()) / 2


def pin_stamp(store: RedisIndexStore, target: str) -> float:
    """The stamp of ``target``'s pin (it must be pinned), as ``time.monotonic()``."""
    repository, tag = target.rsplit(":", 1)
    pinned = store.primary_tag(repository, tag)
    assert pinned is not None, f"{target} is not pinned"
    return monotonic_of(store, pinned[1])


class TagWatch:
    """Samples one tag's entry in the index every ``interval`` (a plain read: it queues nothing),
    to tell from outside when the site learnt of a change: the first sample, after a moment, in
    which the tag is no longer pinned to a digest it must not serve any more."""

    def __init__(self, client: StackClient, target: str, interval: float = 0.02) -> None:
        self.store = observer_store(client)
        self.repository, self.tag = target.rsplit(":", 1)
        self.interval = interval
        self.samples: list[tuple[float, str]] = []  # (monotonic, pinned digest; "" none or a tombstone)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.sample_forever, daemon=True)

    def __enter__(self) -> TagWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.store.close()

    def sample_forever(self) -> None:
        while not self.stopping.wait(self.interval):
            try:
                pinned = self.store.primary_tag(self.repository, self.tag)
            except IndexUnavailable:
                continue
            self.samples.append((time.monotonic(), pinned[0] if pinned else ""))

    def learnt(self, after: float, outdated: set[str]) -> float:
        """When the index first held something other than an ``outdated`` pin after ``after``."""
        return next((at for at, digest in list(self.samples) if at > after and digest not in outdated), math.inf)


def stale_pulls(pulls: Sequence[Pull], target: str, outdated: set[str], since: float) -> list[Pull]:
    """Pulls of ``target`` that got an ``outdated`` digest although they started after ``since``."""
    return [p for p in pulls if p.target == target and p.digest in outdated and p.started > since]


def notification(
    action: str, repository: str, *, digest: str = "", tag: str = "", at: datetime | None = None
) -> dict[str, Any]:
    """One event as a registry sends it (a fresh id; ``at`` is the sending node's clock)."""
    target: dict[str, Any] = {"repository": repository}
    if digest:
        target["digest"] = digest
    if tag:
        target["tag"] = tag
    if action == "push":
        target["mediaType"] = MANIFEST_MEDIA_TYPE
    stamp = (at or datetime.now(UTC)).isoformat().replace("+00:00", "Z")
    return {"id": str(uuid.uuid4()), "timestamp": stamp, "action": action, "target": target}


NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def post_events(client: StackClient, source: str, events: list[dict[str, Any]], patience: float = 10.0) -> None:
    """POST an envelope to the updater's ``/events/<source>`` with that source's secret, as the
    registry does (it retries a 503)."""
    updater = load_settings(client.info.site_file, environ={}).updater
    secret = updater.primary_secret if source == "primary" else updater.local_secret
    headers = {"Authorization": secret, "Content-Type": "application/vnd.docker.distribution.events.v1+json"}
    body = json.dumps({"events": events}).encode()
    deadline = time.monotonic() + patience
    while True:
        request = urllib.request.Request(f"{client.info.updater_url}/events/{source}", body, headers, method="POST")
        try:
            with NO_PROXY.open(request, timeout=5) as answer:
                reply = json.loads(answer.read())
                assert reply.get("applied") == len(events), reply
                return
        except urllib.error.HTTPError as error:
            error.close()
            if error.code != 503 or time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def delete_manifest_at_primary(client: StackClient, repository: str, digest: str) -> None:
    """``DELETE /v2/<repository>/manifests/<digest>`` straight at the primary (not through the site)."""
    token = client.token(f"repository:{repository}:pull,push,delete")
    url = f"{client.info.primary_url}/v2/{repository}/manifests/{digest}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}, method="DELETE")
    with NO_PROXY.open(request, timeout=10) as answer:
        assert answer.status == 202, answer.status


MATRIX_BEGIN = "<!-- fault-matrix:begin (written by tests/test_faults.py with FAULTS_REPORT=docs/reliability.md) -->"
MATRIX_END = "<!-- fault-matrix:end -->"


def render_matrix(outcomes: Sequence[Outcome], seconds: float) -> str:
    lines = [
        MATRIX_BEGIN,
        "",
        "Measured by `FAULTS_REPORT=docs/reliability.md .venv/bin/python -m pytest -m faults tests/test_faults.py` "
        f"in {seconds:.0f} s "
        f"(3 concurrent skopeo pulls through NGINX during every fault; a pull longer than {PULL_BOUND:.0f} s "
        "counts as hung). *Index correct again* counts from the moment the fault was lifted; "
        "the recovery step named there is part of that time, and the index is first checked once three pulls "
        "have run after it (an upper bound).",
        "",
        "| fault | pulls | failed | wrong content | stale | slowest pull | routes while faulty "
        "| index correct again | ok |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        routes = ", ".join(f"{k} {v}" for k, v in o.routes_during_fault.items()) or "-"
        failed = f"{o.failed}" + (f" (all expected: {o.allowed_failures})" if o.allowed_failures else "")
        index = f"{o.index_correct_after_s:.1f} s ({o.recovery})" if o.index_correct_after_s >= 0 else "NO"
        lines.append(
            f"| **{o.cell}**: {o.fault} | {o.pulls} | {failed} | {o.wrong_content} | {o.stale} | "
            f"{o.slowest_pull_s:.2f} s | {routes} | {index} | {'yes' if o.ok else '**NO**'} |"
        )
    notes = [f"- **{o.cell}**: {note}" for o in outcomes for note in o.notes]
    if notes:
        lines += ["", *notes]
    lines += ["", MATRIX_END]
    return "\n".join(lines)


def write_matrix(path: Path, outcomes: Sequence[Outcome], seconds: float) -> None:
    """Replace the matrix between the markers in ``path`` (or append it), and a JSON copy beside it."""
    table = render_matrix(outcomes, seconds)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if MATRIX_BEGIN in text and MATRIX_END in text:
        head, rest = text.split(MATRIX_BEGIN, 1)
        text = head + table + rest.split(MATRIX_END, 1)[1]
    else:
        text = text + ("\n" if text else "") + table + "\n"
    path.write_text(text, encoding="utf-8")
    json_path = path.with_suffix(".faults.json")
    json_path.write_text(json.dumps([o.as_json() for o in outcomes], indent=2) + "\n", encoding="utf-8")


class ReasonWatch:
    """Reads the NGINX access log every ``interval`` while a fault is on and notes when each pull
    request's decision was logged (the log has no time of its own): how long decisions went to the
    primary for one reason, e.g. ``index-unavailable`` through a Redis failover."""

    def __init__(self, client: StackClient, interval: float = 0.05) -> None:
        self.path = Path(client.info.nginx_access_log)
        self.offset = client.access_log_offset()
        self.interval = interval
        self.seen: list[tuple[float, AccessLogEntry]] = []  # (monotonic when read, entry)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.read_forever, daemon=True)

    def __enter__(self) -> ReasonWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(5)

    def read_forever(self) -> None:
        while not self.stopping.wait(self.interval):
            with open(self.path, "rb") as log:
                log.seek(self.offset)
                data = log.read()
            complete = data[: data.rfind(b"\n") + 1]
            self.offset += len(complete)
            now = time.monotonic()
            for line in complete.decode("utf-8", "replace").splitlines():
                entry = parse_access_log_line(line)
                if "/manifests/" in entry.uri or "/blobs/" in entry.uri:
                    self.seen.append((now, entry))

    def span(self, reason: str, since: float) -> tuple[int, float, float]:
        """(decisions with ``reason`` logged after ``since``, seconds from ``since`` to the first and
        to the last of them, each to within ``interval``); (0, 0, 0) if there was none."""
        times = [at - since for at, entry in list(self.seen) if entry.reason == reason and at > since]
        return (len(times), round(min(times), 2), round(max(times), 2)) if times else (0, 0.0, 0.0)
