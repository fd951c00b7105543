"""The fault matrix under load (issues 6, 10 and 11): every fault is applied while three skopeo pulls
run through NGINX, on one real devstack, one cell after another (each cell leaves the stack healthy).

For every cell: no failed pull for content a reachable registry holds, no pull with content the
primary did not publish for that tag, no stale pull (docs/consistency.md's bound: none once the
site knew of the change, as events flowing make it know; with events lost, none later than
``routing.max_tag_age`` after the pin's stamp), no pull slower than ``PULL_BOUND``, and the index
correct again after recovery (the registries' notification retries, or ``geo-route reconcile
--once`` where an operator would run it). ``FAULTS_REPORT=docs/reliability.md`` writes the
measured matrix.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from faults import (
    Expected,
    KilledRun,
    Outcome,
    Pull,
    PullLoad,
    RawRedis,
    ReasonWatch,
    ReconcileRun,
    TagWatch,
    delete_manifest_at_primary,
    index_redis_url,
    judge_pulls,
    kill_reconcile_mid_run,
    local_statuses_between,
    notification,
    observe_patiently,
    pin_stamp,
    post_events,
    reasons_between,
    routes_between,
    run_reconcile,
    stale_pulls,
    wait_for_index,
    write_matrix,
)
from test_local_fallback import REFUSALS, Refusing, Site, local_registry_replaced, local_registry_trusting
from test_stale_if_error import primary_answering

from geo_route.config import load_settings
from geo_route.devstack.client import StackClient
from geo_route.devstack.images import OciImage, build_oci_image
from geo_route.devstack.keys import generate_signing_key
from geo_route.devstack.redis_cluster import ClusterTopology
from geo_route.devstack.redis_server import RedisProcess
from geo_route.devstack.replicate import replicate_image
from geo_route.devstack.skopeo import SkopeoError, docker_reference
from geo_route.devstack.stack import RedisTopology, RunningStack, bring_up
from geo_route.errors import IndexUnavailable
from geo_route.index.model import IndexQuery, QueryKind

pytestmark = [pytest.mark.integration, pytest.mark.faults]

REPLICATED = "faults/replicated:v1"
PRIMARY_ONLY = "faults/primary-only:v1"
FAULT_HOLD = 3.0  # seconds a fault stays on (at least; until 3 pulls ran under it)
# Short NGINX timeouts so that hung registries show their bound within the test's time (defaults:
# local_timeout 30 s, proxy_timeout 900 s; the bound is the setting, whatever its value).
LOCAL_TIMEOUT, PROXY_TIMEOUT = 2, 5
TIMEOUTS = {"local_timeout": LOCAL_TIMEOUT, "proxy_timeout": PROXY_TIMEOUT}
MAX_TAG_AGE = 3  # seconds, for the cell that shows routing.max_tag_age bounding lost notifications
DEFAULT_MAX_TAG_AGE = 300  # routing.max_tag_age's default, which the matrix's own stack runs with
# A short reconcile lease so that a killed reconciliation's bound shows within the test's time
# (default 60 s; renewed every third of it while a run lives).
RECONCILE_LEASE = 4
OVERRIDES = {"nginx": TIMEOUTS, "updater": {"reconcile_lease": RECONCILE_LEASE}}


@dataclass
class Matrix:
    client: StackClient
    stack: RunningStack
    root: Path
    published: dict[str, set[str]] = field(default_factory=dict)
    expected: Expected = field(default_factory=Expected)
    outcomes: list[Outcome] = field(default_factory=list)

    images: dict[str, OciImage] = field(default_factory=dict)

    def image(self, name: str) -> OciImage:
        """A 3-layer image of its own (layer 0 is shared by every image, as base layers are)."""
        if name not in self.images:
            layout = self.root / "images" / name
            self.images[name] = build_oci_image(layout, "v1", variant=name, layer_count=3, layer_bytes=256 * 1024)
        return self.images[name]

    def publish(self, target: str, image: OciImage, *, replicated: bool, through_site: bool = True) -> None:
        """Push ``image`` to the primary as ``target`` (through the site, or straight to the primary),
        optionally replicate it, and record what the index must say about it."""
        repository, tag = target.rsplit(":", 1)
        if through_site:
            self.client.push(image, repository, tag)
        else:
            destination = docker_reference(self.client.primary, repository, tag)
            self.client.skopeo.copy(image.reference, destination, dest_creds=self.client.credentials())
        self.published.setdefault(target, set()).add(image.digest)
        self.expected.pins[target] = image.digest
        if replicated:
            self.client.replicate(repository, [tag])
            self.expect_present(repository, image, True)
            self.expected.pin_required.add(target)
        else:
            self.expected.present[(repository, image.digest)] = False

    def expect_present(self, repository: str, image: OciImage, present: bool) -> None:
        for digest in (image.digest, *image.blob_digests):
            self.expected.present[(repository, digest)] = present

    def reconcile(self) -> ReconcileRun:
        return run_reconcile(self.client.info.site_file, self.root / "reconcile.log")

    def forget_pin(self, target: str) -> None:
        """The primary no longer has ``target``: the index must not pin it (a tombstone is right)."""
        self.expected.pins[target] = ""
        self.expected.pin_required.discard(target)

    def redis_command(self, *args: str) -> str:
        with RawRedis(index_redis_url(self.client.info.site_file)) as redis:
            return redis.command(*args)

    def key(self, name: str) -> str:
        return load_settings(self.client.info.site_file, environ={}).redis.key_prefix + name


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    started = time.monotonic()
    root = tmp_path_factory.mktemp("faults")
    stack = bring_up(root / "stack", site_overrides=OVERRIDES)
    client = observe_patiently(StackClient(stack.info, stack))
    try:
        m = Matrix(client, stack, root)
        m.publish(REPLICATED, m.image("replicated"), replicated=True)
        m.publish(PRIMARY_ONLY, m.image("primary-only"), replicated=False)
        yield m
    finally:
        client.close()
        stack.stop()
    report = os.environ.get("FAULTS_REPORT")
    if report:
        write_matrix(Path(report), m.outcomes, time.monotonic() - started)


def under_fault(
    m: Matrix,
    outcome: Outcome,
    targets: Sequence[str],
    apply: Callable[[], object],
    restore: Callable[[], object],
    failure_allowed: Callable[[Pull], bool] = lambda pull: False,
) -> list[Pull]:
    """Pulls run; ``apply`` the fault; hold it; ``restore``; pulls go on; the pulls are judged."""
    with PullLoad(m.client, targets, m.root / outcome.cell) as load:
        load.wait_for_pulls(3)
        since = m.client.access_log_offset()
        fault_on = time.monotonic()
        apply()
        time.sleep(FAULT_HOLD)
        load.wait_for_pulls(3, started_after=fault_on)
        until = m.client.access_log_offset()
        outcome.fault_ended = time.monotonic()
        restore()
        load.wait_for_pulls(3, started_after=time.monotonic())
    pulls = load.snapshot()
    judge_pulls(outcome, pulls, m.published, failure_allowed)
    outcome.routes_during_fault = routes_between(m.client, since, until)
    return pulls


def recovered(m: Matrix, outcome: Outcome, how: str) -> Outcome:
    outcome.recovery = how
    outcome.index_correct_after_s, problems = wait_for_index(m.client, m.expected, outcome.fault_ended)
    outcome.failures += problems
    m.outcomes.append(outcome)
    return outcome


def judge_old_pin(
    outcome: Outcome, pulls: list[Pull], watch: TagWatch, target: str, old: str, moved: float, back: float
) -> tuple[int, int]:
    """For the cells where an older pin comes back (a Redis snapshot, a resumed old Sentinel
    primary): no pull of ``target`` got ``old`` once the site knew the tag had moved (``moved``);
    how many pulls of it started after the older state was ``back``, and how many of them got ``old``."""
    learnt = watch.learnt(moved, {old})
    outcome.stale = len(stale_pulls(pulls, target, {old}, learnt))
    later = [p for p in pulls if p.target == target and p.started > back]
    return len(later), sum(1 for p in later if p.digest == old)


def assert_ok(outcome: Outcome) -> None:
    assert outcome.ok, outcome.as_json()


def flush_redis(m: Matrix) -> None:
    assert m.redis_command("FLUSHALL") == "OK"


# -- Redis


def test_redis_killed_then_restarted_empty(matrix: Matrix) -> None:
    outcome = Outcome("redis-killed", "redis-server SIGKILLed for 3 s, restarted (empty: no persistence)")
    under_fault(
        matrix,
        outcome,
        [REPLICATED, PRIMARY_ONLY],
        lambda: matrix.stack.kill_part("redis"),
        lambda: matrix.stack.restart_part("redis"),
    )
    matrix.reconcile()
    assert_ok(recovered(matrix, outcome, "reconcile --once"))
    assert outcome.routes_during_fault.get("primary/200", 0) > 0, outcome.routes_during_fault


def test_redis_flushed(matrix: Matrix) -> None:
    outcome = Outcome("redis-emptied", "every key gone at once (FLUSHALL: a restart without persistence, no downtime)")
    under_fault(matrix, outcome, [REPLICATED, PRIMARY_ONLY], lambda: flush_redis(matrix), matrix.reconcile)
    assert_ok(recovered(matrix, outcome, "reconcile --once"))


def test_redis_slowed_past_its_timeout(matrix: Matrix) -> None:
    outcome = Outcome(
        "redis-slow", "redis-server SIGSTOPped for 3 s (accepts, never answers: past redis.socket_timeout)"
    )
    redis = matrix.stack.processes["redis"]
    under_fault(matrix, outcome, [REPLICATED, PRIMARY_ONLY], redis.pause, redis.resume)
    assert_ok(recovered(matrix, outcome, "SIGCONT, nothing else"))


def test_redis_restarted_from_an_older_snapshot(matrix: Matrix) -> None:
    """Redis 7 restarts from its last RDB snapshot: pins older than what the site knew come back.
    They belong to the previous index epoch, so they are unconfirmed: the primary answers, and a
    read queues the tag's resolution. Never the old digest once the site knew the new one."""
    outcome = Outcome(
        "redis-snapshot",
        "a snapshot saved (SAVE), the tag moved at the primary (its event applied), then redis-server "
        "SIGKILLed and restarted from that older snapshot (the old pin is back)",
    )
    target, repository = "faults/snapshot:v1", "faults/snapshot"
    old, new = matrix.image("snapshot-old"), matrix.image("snapshot-new")
    matrix.publish(target, old, replicated=True)
    redis_dir = matrix.stack.processes["redis"].log_path.parent
    redis = RedisProcess(redis_dir, int(matrix.client.info.redis_url.rsplit(":", 1)[1].split("/")[0]))
    marks: dict[str, float] = {}

    def restart_from_snapshot() -> None:
        redis.save()
        matrix.publish(target, new, replicated=False, through_site=False)
        marks["moved"] = time.monotonic()
        matrix.client.wait_for_pin(repository, "v1", new.digest)
        marks["log"] = matrix.client.access_log_offset()
        matrix.stack.kill_part("redis")
        matrix.stack.restart_part("redis")
        marks["restarted"] = time.monotonic()

    def reconcile_and_forget_the_snapshot() -> None:
        (redis_dir / "dump.rdb").unlink()  # later restarts of this stack's Redis start empty again
        matrix.reconcile()

    with TagWatch(matrix.client, target) as watch:
        pulls = under_fault(matrix, outcome, [target], restart_from_snapshot, reconcile_and_forget_the_snapshot)
    after, older = judge_old_pin(outcome, pulls, watch, target, old.digest, marks["moved"], marks["restarted"])
    back = [at for at, digest in watch.samples if at > marks["restarted"] and digest == old.digest]
    reads = reasons_between(matrix.client, int(marks["log"]), matrix.client.access_log_offset(), repository)
    outcome.notes.append(
        f"the snapshot brought the old pin back ({'seen' if back else 'not seen'} by a reader of the index); "
        f"reads of the tag from the restart on: {', '.join(f'{k} {v}' for k, v in reads.items())}; "
        f"{after} pulls after the restart, {older} with the old digest"
    )
    assert_ok(recovered(matrix, outcome, "reconcile --once"))
    assert reads.get("primary:tag-unconfirmed/200", 0) > 0, reads


# -- the auth service and the updater


def test_auth_service_killed_and_restarted(matrix: Matrix) -> None:
    outcome = Outcome("auth-killed", "gunicorn master and workers SIGKILLed for 3 s, then restarted")
    under_fault(
        matrix,
        outcome,
        [REPLICATED, PRIMARY_ONLY],
        lambda: matrix.stack.kill_part("auth"),
        lambda: matrix.stack.restart_part("auth"),
    )
    assert_ok(recovered(matrix, outcome, "restart, nothing else"))
    assert set(outcome.routes_during_fault) <= {"auth-unavailable/200", "local/200", "primary/200"}


def test_one_of_two_nodes_loses_its_auth_service(matrix: Matrix, tmp_path: Path) -> None:
    """Two nodes (each NGINX, an auth service and an updater) on one index, a stack of its own:
    pulls through both while node 2's auth service is SIGKILLed. Node 2's NGINX routes to the
    primary (auth-unavailable) meanwhile; node 1 is untouched."""
    outcome = Outcome(
        "node-auth-killed (2 nodes)",
        "two nodes on one index, pulls through both; node 2's auth service (gunicorn master and workers) "
        "SIGKILLed for 3 s, then restarted",
    )
    stack = bring_up(tmp_path / "stack", site_overrides=OVERRIDES, nodes=2)
    one, two = (observe_patiently(StackClient(stack.info.node(number), stack)) for number in (1, 2))
    try:
        m = Matrix(one, stack, tmp_path, images=matrix.images)
        m.publish(REPLICATED, m.image("replicated"), replicated=True)
        m.publish(PRIMARY_ONLY, m.image("primary-only"), replicated=False)
        offsets: dict[str, int] = {}

        def kill_node_2s_auth() -> None:
            offsets["since"] = two.access_log_offset()
            stack.kill_part("auth-2")

        def restart_node_2s_auth() -> None:
            offsets["until"] = two.access_log_offset()
            stack.restart_part("auth-2")

        with PullLoad(two, [REPLICATED, PRIMARY_ONLY], tmp_path / "node-2") as node_2:
            node_2.wait_for_pulls(3)
            node_1_pulls = under_fault(m, outcome, [REPLICATED, PRIMARY_ONLY], kill_node_2s_auth, restart_node_2s_auth)
            node_2.wait_for_pulls(3, started_after=time.monotonic())
        node_2_pulls = node_2.snapshot()
        judge_pulls(outcome, node_2_pulls, m.published)
        outcome.pulls = len(node_1_pulls) + len(node_2_pulls)
        outcome.slowest_pull_s = round(max(p.seconds for p in [*node_1_pulls, *node_2_pulls]), 2)
        node_2_routes = routes_between(two, offsets["since"], offsets["until"])
        outcome.notes.append(
            f"{len(node_1_pulls)} pulls through node 1 and {len(node_2_pulls)} through node 2; while node 2's "
            f"auth service was down, node 1's routes: {listed(outcome.routes_during_fault)}; node 2's: "
            f"{listed(node_2_routes)}"
        )
        recovered(m, outcome, "restart, nothing else")
        matrix.outcomes.append(m.outcomes.pop())
    finally:
        one.close()
        two.close()
        stack.stop()
    assert_ok(outcome)
    assert node_2_routes.get("auth-unavailable/200", 0) > 0, node_2_routes
    assert "auth-unavailable/200" not in outcome.routes_during_fault, outcome.routes_during_fault


def test_updater_killed_while_notifications_arrive(matrix: Matrix) -> None:
    outcome = Outcome("updater-killed", "updater SIGKILLed; an image pushed and replicated meanwhile; restarted")
    late = matrix.image("late")

    def push_and_replicate_while_down() -> None:
        matrix.stack.kill_part("updater")
        matrix.client.push(late, "faults/late", "v1")  # the primary's notification fails and is retried
        creds = matrix.client.credentials()
        replicate_image(  # the local registry's notifications fail and are retried
            matrix.client.skopeo,
            matrix.client.primary,
            matrix.client.local_registry,
            "faults/late",
            ["v1"],
            source_creds=creds,
            destination_creds=creds,
        )
        matrix.published["faults/late:v1"] = {late.digest}

    pulls = under_fault(
        matrix,
        outcome,
        [REPLICATED, PRIMARY_ONLY],
        push_and_replicate_while_down,
        lambda: matrix.stack.restart_part("updater"),
    )
    matrix.expected.pins["faults/late:v1"] = late.digest
    matrix.expected.pin_required.add("faults/late:v1")
    matrix.expect_present("faults/late", late, True)
    assert_ok(recovered(matrix, outcome, "restart; the registries' own notification retries"))
    assert pulls


def test_reconciliation_killed_mid_run(matrix: Matrix) -> None:
    """A reconciliation killed (SIGKILL: no handler runs) keeps its lease until it expires: the
    lease is renewed only while a run lives, so the next run starts within updater.reconcile_lease."""
    outcome = Outcome(
        "reconcile-killed",
        "the index emptied (FLUSHALL) and its rebuild (reconcile --once) SIGKILLed mid-run, holding the lease "
        f"(updater.reconcile_lease {RECONCILE_LEASE} s); the next run started at once and again every 0.25 s "
        "until it ran (index correct again counted from the kill)",
    )
    log = matrix.root / "reconcile.log"
    runs: dict[str, object] = {}

    def next_run() -> None:
        try:
            runs["next"] = run_reconcile(matrix.client.info.site_file, log, patience=RECONCILE_LEASE + 10)
        except Exception as exc:  # reported by the assertions below
            runs["next"] = exc

    retrying = threading.Thread(target=next_run, daemon=True)

    def empty_then_kill_the_rebuild() -> None:
        flush_redis(matrix)
        runs["killed"] = kill_reconcile_mid_run(matrix.client.info.site_file, log)
        retrying.start()

    under_fault(matrix, outcome, [REPLICATED, PRIMARY_ONLY], empty_then_kill_the_rebuild, retrying.join)
    killed, following = runs["killed"], runs["next"]
    assert isinstance(killed, KilledRun) and isinstance(following, ReconcileRun), runs
    waited = following.started - killed.at
    outcome.notes.append(
        f"the killed run's lease had {killed.lease_left:.1f} s left at the kill (a live run renews it every "
        f"{RECONCILE_LEASE / 3:.1f} s; nothing renews a killed one); the next run was refused "
        f"{following.refused} time(s), all while that lease lived, and ran {waited:.1f} s after the kill "
        f"(bound: updater.reconcile_lease {RECONCILE_LEASE} s; default 60 s), ending "
        f"{following.ended - killed.at:.1f} s after it"
    )
    outcome.fault_ended = killed.at
    assert_ok(recovered(matrix, outcome, f"the next run, {waited:.1f} s after the kill"))
    assert killed.lease_left <= RECONCILE_LEASE, killed
    # Every refusal came while the killed run's lease lived; the run after it is then only as late as
    # a process start on a shared box.
    assert following.refused and following.last_refused < killed.at + killed.lease_left, (killed, following)
    assert waited <= RECONCILE_LEASE + 3, (waited, following)


# -- the registries


class FaultWindow:
    """From just before a fault was applied to just after it was lifted: the pulls that overlap it
    are the only ones a fault may legitimately fail."""

    def __init__(self) -> None:
        self.start = self.end = 0.0

    def applying(self, action: Callable[[], None]) -> Callable[[], None]:
        def apply() -> None:
            self.start = time.monotonic()
            action()

        return apply

    def lifting(self, action: Callable[[], None]) -> Callable[[], None]:
        def lift() -> None:
            action()
            self.end = time.monotonic()

        return lift

    def overlaps(self, pull: Pull) -> bool:
        return pull.started < self.end and pull.ended > self.start

    def contains(self, pull: Pull) -> bool:
        return pull.started > self.start and pull.ended < self.end


def cut_mid_blob(window: FaultWindow) -> Callable[[Pull], bool]:
    """A blob that was streaming from the local registry when it died or stopped is cut (EOF): NGINX
    cannot resume a response it has begun, clients retry it (docker does; the matrix's skopeo does
    not). Allowed, counted and noted, only for pulls that overlapped the fault."""
    return lambda pull: "EOF" in pull.error and window.overlaps(pull)


def primary_only_while_faulty(window: FaultWindow) -> Callable[[Pull], bool]:
    """Only what exists nowhere else, and only while the primary was faulty, may fail."""
    return lambda pull: pull.target == PRIMARY_ONLY and window.overlaps(pull)


def note_cuts(outcome: Outcome) -> None:
    if outcome.allowed_failures:
        outcome.notes.append(
            f"{outcome.allowed_failures} pull(s) were cut mid-blob (EOF) by the fault: a response under way "
            "cannot be moved to the primary; a retrying client (docker) recovers"
        )


def test_local_registry_killed(matrix: Matrix) -> None:
    outcome = Outcome("local-killed", "the local registry SIGKILLed for 3 s, then restarted")
    window = FaultWindow()
    under_fault(
        matrix,
        outcome,
        [REPLICATED, PRIMARY_ONLY],
        window.applying(lambda: matrix.stack.kill_part("secondary")),
        window.lifting(lambda: matrix.stack.restart_part("secondary")),
        cut_mid_blob(window),
    )
    note_cuts(outcome)
    assert_ok(recovered(matrix, outcome, "restart, nothing else"))
    assert "fallback/200" in outcome.routes_during_fault


def test_local_registry_hung(matrix: Matrix) -> None:
    outcome = Outcome("local-hung", f"the local registry SIGSTOPped for 3 s (nginx.local_timeout {LOCAL_TIMEOUT} s)")
    secondary = matrix.stack.processes["secondary"]
    window = FaultWindow()
    under_fault(
        matrix,
        outcome,
        [REPLICATED, PRIMARY_ONLY],
        window.applying(secondary.pause),
        window.lifting(secondary.resume),
        cut_mid_blob(window),
    )
    note_cuts(outcome)
    assert_ok(recovered(matrix, outcome, "SIGCONT, nothing else"))
    assert "fallback/200" in outcome.routes_during_fault


def listed(counts: dict[str, int]) -> str:
    return ", ".join(f"{key} {count}" for key, count in counts.items()) or "none"


def test_local_registry_refusing_every_token(matrix: Matrix) -> None:
    """A key rotation rolled out at the primary but not yet at the local registry: every valid token
    gets the local registry's 401, and every GET/HEAD routed there falls back to the primary once."""
    outcome = Outcome(
        "local-refusing-401",
        "the local registry SIGKILLed and restarted with a token certificate bundle that does not hold the signing "
        "key (a key rotation not rolled out there yet): 401 to every pull for 3 s; then again with its own bundle",
    )
    untrusted = generate_signing_key(matrix.root / "other-keys").certificate
    site = Site(matrix.client, matrix.image("replicated"), untrusted)
    window, marks = FaultWindow(), dict[str, int]()
    with contextlib.ExitStack() as rotation:

        def untrust() -> None:
            rotation.enter_context(local_registry_trusting(site, untrusted))
            marks["on"] = matrix.client.access_log_offset()

        def trust_again() -> None:
            marks["off"] = matrix.client.access_log_offset()
            rotation.close()
            marks["back"] = matrix.client.access_log_offset()

        under_fault(
            matrix,
            outcome,
            [REPLICATED, PRIMARY_ONLY],
            window.applying(untrust),
            window.lifting(trust_again),
            cut_mid_blob(window),
        )
    statuses = local_statuses_between(matrix.client, marks["on"], marks["off"])
    offset = matrix.client.access_log_offset()
    after = routes_between(matrix.client, marks["back"], offset)
    outcome.notes.append(
        f"while it refused, the access log's fallback_status (the local registry's answer): {listed(statuses)}; "
        f"after the restore: {listed(after)}"
    )
    note_cuts(outcome)
    assert_ok(recovered(matrix, outcome, "restart with its own bundle, nothing else"))
    # (502: a request logged after the restart that had found the registry down while it restarted)
    assert statuses.get("401", 0) > 0 and set(statuses) <= {"401", "502"}, statuses
    manifests = reasons_between(matrix.client, marks["back"], offset, REPLICATED.split(":")[0])
    assert after.get("local/200", 0) > 0, (after, manifests)


REFUSING_CELLS = {
    429: ("local-rate-limited", "429 Too Many Requests with Retry-After: 60 (a rate limit in front of it)"),
    403: ("local-refusing-403", "403 Forbidden, DENIED (a policy or a proxy in front of it)"),
}


@pytest.mark.parametrize("status", sorted(REFUSING_CELLS, reverse=True))
def test_local_registry_refusing_pulls(matrix: Matrix, status: int) -> None:
    """Distribution 2.8 never answers a pull 403 or 429: a stand-in on the local registry's port does
    (tests/test_local_fallback.py's), the registry killed meanwhile."""
    cell, what = REFUSING_CELLS[status]
    outcome = Outcome(
        cell,
        f"the local registry SIGKILLed and a stand-in on its port answering every request {what} for 3 s; "
        "then the registry restarted",
    )
    body, headers = REFUSALS[status]
    site = Site(matrix.client, matrix.image("replicated"), Path())  # (no certificate needed here)
    window, marks, stand_ins = FaultWindow(), dict[str, int](), list[Refusing]()
    with contextlib.ExitStack() as replaced:

        def refuse() -> None:
            stand_ins.append(replaced.enter_context(local_registry_replaced(site, status, body, headers)))
            marks["on"] = matrix.client.access_log_offset()

        def restore() -> None:
            marks["off"] = matrix.client.access_log_offset()
            replaced.close()

        under_fault(
            matrix,
            outcome,
            [REPLICATED, PRIMARY_ONLY],
            window.applying(refuse),
            window.lifting(restore),
            cut_mid_blob(window),
        )
    statuses = local_statuses_between(matrix.client, marks["on"], marks["off"])
    requests = stand_ins[0].requests
    outcome.notes.append(
        f"the stand-in answered {len(requests)} requests ({', '.join(sorted({m for m, _ in requests}))}); "
        f"the access log's fallback_status: {listed(statuses)}"
    )
    note_cuts(outcome)
    assert_ok(recovered(matrix, outcome, "the registry restarted, nothing else"))
    # (502: a request logged after the switch that had found the port closed while the stand-in started)
    assert statuses.get(str(status), 0) > 0 and set(statuses) <= {str(status), "502"}, statuses
    assert requests and {method for method, _ in requests} <= {"GET", "HEAD"}, requests


def test_primary_hung(matrix: Matrix) -> None:
    outcome = Outcome("primary-hung", f"the primary SIGSTOPped for 3 s (nginx.proxy_timeout {PROXY_TIMEOUT} s)")
    primary = matrix.stack.processes["primary"]
    window = FaultWindow()
    pulls = under_fault(
        matrix,
        outcome,
        [REPLICATED, PRIMARY_ONLY],
        window.applying(primary.pause),
        window.lifting(primary.resume),
        primary_only_while_faulty(window),
    )
    failed = [p for p in pulls if p.error]
    for pull in failed:  # the site's 503 before any byte was sent, else the transfer is cut (EOF)
        assert "503" in pull.error or "EOF" in pull.error, pull.error
        assert pull.seconds < PROXY_TIMEOUT + 5, (pull.seconds, pull.error)
    if failed:
        cut = sum(1 for p in failed if "503" not in p.error)
        slowest = max(p.seconds for p in failed)
        outcome.notes.append(
            f"{len(failed)} pull(s) of the primary-only image failed, each within {slowest:.1f} s "
            f"(nginx.proxy_timeout {PROXY_TIMEOUT} s): {len(failed) - cut} with the site's 503, {cut} cut mid-blob "
            "(the primary stopped after the response had begun)"
        )
    assert_ok(recovered(matrix, outcome, "SIGCONT, nothing else"))


def test_primary_unreachable(matrix: Matrix) -> None:
    outcome = Outcome("primary-down", "the primary registry SIGKILLed for 3 s, then restarted")
    window = FaultWindow()
    pulls = under_fault(
        matrix,
        outcome,
        [REPLICATED, PRIMARY_ONLY],
        window.applying(lambda: matrix.stack.kill_part("primary")),
        window.lifting(lambda: matrix.stack.restart_part("primary")),
        primary_only_while_faulty(window),
    )
    failed = [p for p in pulls if p.error]
    replicated_during = [p for p in pulls if p.target == REPLICATED and window.contains(p)]
    assert replicated_during and all(not p.error for p in replicated_during), "replicated content is served locally"
    assert failed, "pulls of content only the primary holds fail while it is down"
    for pull in failed:  # the site's 503, or EOF for a blob that was under way when the primary died
        assert "503" in pull.error or "EOF" in pull.error, pull.error
        assert pull.seconds < 10, f"a clear error, not a hang: {pull.seconds:.1f} s"
    clear = [p for p in failed if "503" in p.error]
    outcome.notes.append(
        f"{len(failed)} pulls of the primary-only image failed while the primary was down, each within "
        f"{max(p.seconds for p in failed):.1f} s; {len(clear)} with the site's registry error"
        + (f" (`{clear[0].error[-150:]}`)" if clear else "")
        + f", {len(failed) - len(clear)} cut mid-blob by the kill"
    )
    assert_ok(recovered(matrix, outcome, "restart, nothing else"))


def test_primary_down_past_max_tag_age_serves_the_last_pin(matrix: Matrix, tmp_path: Path) -> None:
    """Stale-if-error: the primary down until the tag's pin is past routing.max_tag_age (the tag is
    then the primary's to answer), first refusing connections (NGINX's 502), then a stand-in on its
    port answering 503 (its front end up, the registry down). The pin's digest, local and at most
    routing.stale_if_error old, is served instead of an error; once the primary is back, never."""
    outcome = Outcome(
        "primary-down, stale-if-error",
        f"the primary registry SIGKILLed until the tag's pin was past routing.max_tag_age ({MAX_TAG_AGE} s; a stack "
        "of its own, routing.stale_if_error at its default 24 h), then a stand-in answering 503 on its port for 3 s "
        "(its front end up, the registry down); then the primary restarted",
    )
    overrides = {"nginx": TIMEOUTS, "routing": {"max_tag_age": MAX_TAG_AGE}}
    stack = bring_up(tmp_path / "stack", site_overrides=overrides)
    client = observe_patiently(StackClient(stack.info, stack))
    try:
        m = Matrix(client, stack, tmp_path, images=matrix.images)
        target, repository = "faults/stale:v1", "faults/stale"
        m.publish(target, m.image("stale"), replicated=True)
        marks: dict[str, float] = {}
        front_end = contextlib.ExitStack()

        def primary_down_past_the_bound() -> None:
            m.stack.kill_part("primary")
            marks["confirmed"] = pin_stamp(m.client.index, target)  # nothing can confirm it from now on
            marks["log"] = m.client.access_log_offset()
            time.sleep(max(0.0, marks["confirmed"] + MAX_TAG_AGE + 1.5 - time.monotonic()))
            marks["503 log"] = m.client.access_log_offset()
            front_end.enter_context(primary_answering(m.client, 503))

        def primary_back() -> None:
            front_end.close()
            m.stack.restart_part("primary")
            marks["back log"] = m.client.access_log_offset()

        pulls = under_fault(m, outcome, [target], primary_down_past_the_bound, primary_back)
        refused = reasons_between(m.client, int(marks["log"]), int(marks["503 log"]), repository)
        answered_503 = reasons_between(m.client, int(marks["503 log"]), int(marks["back log"]), repository)
        after = reasons_between(m.client, int(marks["back log"]), m.client.access_log_offset(), repository)
        bound = marks["confirmed"] + MAX_TAG_AGE
        past = [p for p in pulls if bound + 0.1 < p.started and p.ended < outcome.fault_ended]
        oldest = max((p.ended - marks["confirmed"] for p in past), default=0.0)
        outcome.notes.append(
            f"{sum(1 for p in past if p.digest)} of the {len(past)} pull(s) that ran wholly past max_tag_age while the "
            f"primary was down got the pin's digest (still the primary's) stale-if-error, the pin {MAX_TAG_AGE:.1f} to "
            f"{oldest:.1f} s old; manifest reads "
            f"with the primary refusing connections: {listed(refused)}; with the stand-in's 503: "
            f"{listed(answered_503)}; after the restart: {listed(after)}"
        )
        recovered(m, outcome, "restart, nothing else")
        matrix.outcomes.append(m.outcomes.pop())
    finally:
        client.close()
        stack.stop()
    assert_ok(outcome)
    assert past and all(p.digest in m.published[target] for p in past), past
    assert refused.get("stale:tag-stale/200", 0) > 0 and answered_503.get("stale:tag-stale/200", 0) > 0, marks
    assert after and all(read.startswith(("local:", "primary:")) and read.endswith("/200") for read in after), after


def test_the_primary_tag_moves_while_it_is_pulled(matrix: Matrix) -> None:
    outcome = Outcome("tag-moved", "the tag pushed anew through the site, then straight to the primary, during pulls")
    target = "faults/moving:v1"
    matrix.publish(target, matrix.image("moving-0"), replicated=True)
    moves: dict[str, float] = {}
    second = matrix.image("moving-2")

    def move() -> None:
        matrix.publish(target, matrix.image("moving-1"), replicated=False)
        moves["through the site"] = time.monotonic()
        time.sleep(1.0)
        matrix.publish(target, second, replicated=False, through_site=False)
        moves["pushed at the primary"] = time.monotonic()
        matrix.client.wait_for_pin("faults/moving", "v1", second.digest)
        moves["pin moved"] = time.monotonic()

    def replicate_new() -> None:
        matrix.client.replicate("faults/moving", ["v1"])
        matrix.expect_present("faults/moving", second, True)
        matrix.expected.pin_required.add(target)

    # Distribution 2.8 answers a GET of a tag whose link it is rewriting at that moment with its own
    # 500 ("invalid checksum digest format"): the primary's answer, passed on as it is (the site
    # routes a moving tag to the primary). Allowed, counted and noted, only while the tag moves.
    window = FaultWindow()

    def primary_mid_push(pull: Pull) -> bool:
        return "500 Internal Server Error" in pull.error and window.overlaps(pull)

    with TagWatch(matrix.client, target) as watch:
        pulls = under_fault(
            matrix, outcome, [target], window.applying(move), window.lifting(replicate_new), primary_mid_push
        )
    if outcome.allowed_failures:
        outcome.notes.append(
            f"{outcome.allowed_failures} pull(s) got the primary's own 500 (registry 2.8 reading a tag link "
            "it was rewriting), passed on as the primary answered it"
        )
    order = {matrix.image(name).digest: rank for rank, name in enumerate(("moving-0", "moving-1", "moving-2"))}
    # After a push through the site completes, no pull starting later may see an older digest; after
    # a push straight to the primary, none once its notification reached the index (events flowing:
    # the tag is then answered by the primary until it is re-resolved).
    learnt = min(watch.learnt(moves["pushed at the primary"], set(order) - {second.digest}), moves["pin moved"])

    def newest_at(started: float) -> int:
        return 2 if started > learnt else 1 if started > moves["through the site"] else 0

    outcome.stale = sum(1 for p in pulls if p.digest and order[p.digest] < newest_at(p.started))
    window = [p for p in pulls if moves["pushed at the primary"] < p.started < learnt]
    outcome.notes.append(
        "a push straight to the primary (not through this site): the index stopped pinning the previous digest "
        f"{1000 * (learnt - moves['pushed at the primary']):.0f} ms after the push returned (its notification) and "
        f"pinned the new one {1000 * (moves['pin moved'] - moves['pushed at the primary']):.0f} ms after it (the "
        f"updater's resolution); {len(window)} pull(s) started between the push and the notification"
    )
    assert_ok(recovered(matrix, outcome, "replication and its notifications"))


def test_a_notification_from_a_clock_an_hour_ahead(matrix: Matrix) -> None:
    """Event times come from the sending node's clock and decide nothing: a push notification
    stamped an hour ahead only has the tag re-resolved, and the next move is served as usual."""
    outcome = Outcome(
        "event-from-the-future",
        "a push notification for the tag stamped one hour ahead (a primary node's clock), then the tag moved "
        "at the primary",
    )
    target, repository = "faults/future:v1", "faults/future"
    old, new = matrix.image("future-old"), matrix.image("future-new")
    matrix.publish(target, old, replicated=True)
    marks: dict[str, float] = {}

    def event_from_the_future_then_move() -> None:
        ahead = datetime.now(UTC) + timedelta(hours=1)
        post_events(matrix.client, "primary", [notification("push", repository, digest=old.digest, tag="v1", at=ahead)])
        matrix.client.wait_for_pin(repository, "v1", old.digest)  # re-resolved: the primary still says old
        marks["pin age"] = time.monotonic() - pin_stamp(matrix.client.index, target)
        matrix.publish(target, new, replicated=False, through_site=False)
        marks["moved"] = time.monotonic()
        matrix.client.wait_for_pin(repository, "v1", new.digest)
        marks["pinned"] = time.monotonic()

    def replicate_new() -> None:
        matrix.client.replicate(repository, ["v1"])
        matrix.expect_present(repository, new, True)

    with TagWatch(matrix.client, target) as watch:
        pulls = under_fault(matrix, outcome, [target], event_from_the_future_then_move, replicate_new)
    learnt = min(watch.learnt(marks["moved"], {old.digest}), marks["pinned"])
    outcome.stale = len(stale_pulls(pulls, target, {old.digest}, learnt))
    outcome.notes.append(
        f"the event stamped an hour ahead only had the tag re-resolved: the pin's stamp was "
        f"{marks['pin age']:.1f} s old right after (the index's clock), not in the future; the move's notification "
        f"reached the index {1000 * (learnt - marks['moved']):.0f} ms after the push returned, the new pin "
        f"{1000 * (marks['pinned'] - marks['moved']):.0f} ms after it"
    )
    assert_ok(recovered(matrix, outcome, "replication and its notifications"))
    assert -1.0 < marks["pin age"] < 60, marks


def manifest_unknown_after(moment: dict[str, float], targets: set[str]) -> Callable[[Pull], bool]:
    """Pulls of what the primary deleted fail with the primary's own 404 once it is deleted (a pull
    that began just before may read the manifest just after)."""
    return lambda pull: pull.target in targets and pull.ended > moment["deleted"] and "manifest unknown" in pull.error


def test_a_tag_delete_then_an_older_push_replayed(matrix: Matrix) -> None:
    """A tag deleted at the primary (Distribution 3 and GitLab delete tags; 2.8 cannot, so its tag
    link is removed from the primary's storage, and the notification those registries send is
    posted), then an older push notification for the tag replayed: the tag stays deleted."""
    outcome = Outcome(
        "tag-deleted, push replayed",
        "the tag deleted at the primary, its tag-delete notification, then a replay of the older push "
        "notification for the tag",
    )
    target, repository = "faults/replayed:v1", "faults/replayed"
    old = matrix.image("replayed")
    matrix.publish(target, old, replicated=True)
    pushed_at = datetime.now(UTC)
    tag_link = matrix.stack.processes["primary"].log_path.parent / "storage"
    tag_link = tag_link / "docker/registry/v2/repositories" / repository / "_manifests/tags/v1"
    assert tag_link.is_dir(), tag_link
    marks: dict[str, float] = {}

    def delete_then_replay() -> None:
        shutil.rmtree(tag_link)
        marks["deleted"] = time.monotonic()
        post_events(matrix.client, "primary", [notification("delete", repository, tag="v1")])
        marks["told"] = time.monotonic()
        time.sleep(0.5)
        push = notification("push", repository, digest=old.digest, tag="v1", at=pushed_at)
        post_events(matrix.client, "primary", [push])
        marks["replayed"] = time.monotonic()

    with TagWatch(matrix.client, target) as watch:
        pulls = under_fault(
            matrix,
            outcome,
            [target, REPLICATED],
            delete_then_replay,
            lambda: None,
            manifest_unknown_after(marks, {target}),
        )
    matrix.forget_pin(target)
    learnt = min(watch.learnt(marks["deleted"], {old.digest}), marks["told"])
    outcome.stale = len(stale_pulls(pulls, target, {old.digest}, learnt))
    back = [at for at, digest in watch.samples if at > learnt and digest == old.digest]
    outcome.notes.append(
        f"the tag-delete notification reached the index {1000 * (learnt - marks['deleted']):.0f} ms after the "
        f"delete; the replayed push (an older event, fresh id) only had the tag re-resolved: the primary's 404 "
        f"(asked again while it contradicted the replayed digest) kept it a tombstone, the old pin "
        f"{'came back' if back else 'never came back'}; {outcome.allowed_failures} pull(s) of the tag failed "
        "with the primary's own 404 (manifest unknown), as they should"
    )
    assert_ok(recovered(matrix, outcome, "nothing (the tombstone stays)"))
    assert not back, back


def served_after_reconciliation(m: Matrix, repository: str, digest: str) -> str:
    """Pull a manifest the primary deleted with no notification at all, by digest, after reconcile
    --once ran: what reconciliation does about such a delete (it is the bound consistency.md names)."""
    since = m.client.access_log_offset()
    try:
        m.client.pull(repository, digest, m.root / "quiet")
        answer = "got it"
    except SkopeoError:
        answer = "failed"
    routes = [f"{e.route}:{e.reason}/{e.status}" for e in m.client.access_log(since) if e.uri.endswith(digest)]
    where = "still served from the local registry" if "local:manifest-local/200" in routes else "not served here"
    return (
        f"a second manifest deleted the same way, of which no notification ever arrived: after reconcile --once, a "
        f"pull by its digest {answer} ({', '.join(routes)}): {where}"
    )


def lose_notifications(m: Matrix, target: str, change: Callable[[], object], *, updater_back: bool = True) -> float:
    """The updater down while ``change`` happens at the primary; then the primary restarts, and the
    notifications queued in its memory are gone for good. Returns when the tag's pin was last
    confirmed (its stamp, as ``time.monotonic()``): nothing confirms it while the updater is down."""
    m.stack.kill_part("updater")
    confirmed = pin_stamp(m.client.index, target)
    change()
    m.stack.kill_part("primary")
    m.stack.restart_part("primary")
    if updater_back:
        m.stack.restart_part("updater")  # its first reconciliation runs at once (updater.reconcile_interval)
    return confirmed


def test_notifications_dropped_then_reconciled(matrix: Matrix) -> None:
    outcome = Outcome(
        "notifications-lost",
        "the updater down while the tag moves at the primary; the primary restarted (its queued events lost)",
    )
    target = "faults/dropped:v1"
    old, new = matrix.image("dropped-old"), matrix.image("dropped-new")
    matrix.publish(target, old, replicated=True)
    marks: dict[str, float] = {}

    def move() -> None:
        matrix.publish(target, new, replicated=False, through_site=False)
        marks["moved"] = time.monotonic()

    def lose() -> None:
        marks["confirmed"] = lose_notifications(matrix, target, move)

    with TagWatch(matrix.client, target) as watch:
        pulls = under_fault(matrix, outcome, [target], lose, matrix.reconcile)
    learnt = watch.learnt(marks["moved"], {old.digest})
    bound = marks["confirmed"] + DEFAULT_MAX_TAG_AGE
    outcome.stale = len(stale_pulls(pulls, target, {old.digest}, min(learnt, bound)))
    served_old = [p for p in pulls if p.digest == old.digest and p.started > marks["moved"]]
    outcome.notes.append(
        f"{len(served_old)} pull(s) after the lost move got the tag's previous digest (published, but stale), "
        f"all within routing.max_tag_age ({DEFAULT_MAX_TAG_AGE} s, the default) of the pin's stamp; the index "
        f"dropped that pin {learnt - marks['moved']:.1f} s after the move ("
        + ("the restarted updater's own first reconciliation" if learnt < outcome.fault_ended else "reconcile --once")
        + ")"
    )
    assert_ok(recovered(matrix, outcome, "reconcile --once"))


def test_lost_notifications_are_bounded_by_max_tag_age(matrix: Matrix, tmp_path: Path) -> None:
    """The same loss with the updater kept down (nothing re-resolves, nothing refreshes), on a stack
    with a short routing.max_tag_age: the previous digest is served at most until the pin is that
    old, and the primary answers after (tag-stale)."""
    outcome = Outcome(
        "notifications-lost, max_tag_age",
        f"the same, the updater kept down, with routing.max_tag_age {MAX_TAG_AGE} s (a stack of its own)",
    )
    overrides = {"nginx": TIMEOUTS, "routing": {"max_tag_age": MAX_TAG_AGE}}
    stack = bring_up(tmp_path / "stack", site_overrides=overrides)
    client = observe_patiently(StackClient(stack.info, stack))
    try:
        m = Matrix(client, stack, tmp_path, images=matrix.images)
        target, repository = "faults/bounded:v1", "faults/bounded"
        old, new = m.image("dropped-old"), m.image("dropped-new")
        m.publish(target, old, replicated=True)
        marks: dict[str, float] = {}

        def lose_and_outlive_the_bound() -> None:
            moved = lambda: m.publish(target, new, replicated=False, through_site=False)  # noqa: E731
            marks["confirmed"] = lose_notifications(m, target, moved, updater_back=False)
            marks["log"] = m.client.access_log_offset()
            # the fault's hold (FAULT_HOLD) then ends at least a second after the bound
            time.sleep(max(0.0, marks["confirmed"] + MAX_TAG_AGE + 1.0 - FAULT_HOLD - time.monotonic()))

        def updater_back() -> None:
            marks["updater back"] = time.monotonic()
            m.stack.restart_part("updater")
            m.reconcile()

        pulls = under_fault(m, outcome, [target], lose_and_outlive_the_bound, updater_back)
        trusted_until = marks["confirmed"] + MAX_TAG_AGE
        outcome.stale = len(stale_pulls(pulls, target, {old.digest}, trusted_until + 0.1))
        served_old = [p for p in pulls if p.digest == old.digest and p.started > marks["confirmed"]]
        got_new = [p for p in pulls if trusted_until + 0.1 < p.started < marks["updater back"]]
        reads = reasons_between(m.client, int(marks["log"]), m.client.access_log_offset(), repository)
        latest = max((p.started - marks["confirmed"] for p in served_old), default=0.0)
        outcome.notes.append(
            f"{len(served_old)} pull(s) got the previous digest, the latest starting {latest:.1f} s after the pin's "
            f"stamp (max_tag_age {MAX_TAG_AGE} s); all {len(got_new)} pulls after the bound and before the updater "
            f"came back got the new digest from the primary ({reads.get('primary:tag-stale/200', 0)} reads with "
            "reason tag-stale)"
        )
        recovered(m, outcome, "updater restarted, reconcile --once")
        matrix.outcomes.append(m.outcomes.pop())
    finally:
        client.close()
        stack.stop()
    assert_ok(outcome)
    assert got_new and all(p.digest == new.digest for p in got_new), got_new
    assert reads.get("primary:tag-stale/200", 0) > 0, reads


def test_a_digest_deleted_with_no_tag_events(matrix: Matrix) -> None:
    """GitLab in database mode deletes a manifest by digest and sends only ``delete{digest}``: no
    event for the tags that pointed at it. The primary's own (2.8) events are lost for this, and the
    updater's reconciliation is held off (another run holds the lease), so the event alone acts."""
    outcome = Outcome(
        "digest-deleted, no tag events",
        "the manifest deleted by digest at the primary, its own events lost (updater down, primary restarted), "
        "then only a delete{digest} notification (GitLab's database mode)",
    )
    target, repository = "faults/gitlab:v1", "faults/gitlab"
    old = matrix.image("gitlab")
    matrix.publish(target, old, replicated=True)
    by_digest = f"{repository}@{old.digest}"
    matrix.published[by_digest] = {old.digest}
    quiet_target, quiet_repository = "faults/gitlab-quiet:v1", "faults/gitlab-quiet"
    quiet = matrix.image("gitlab-quiet")  # deleted the same way, and no notification about it ever arrives
    matrix.publish(quiet_target, quiet, replicated=True)
    lease = matrix.key("lock:reconcile")
    marks: dict[str, float] = {}

    def delete_lose_then_tell() -> None:
        def delete() -> None:
            delete_manifest_at_primary(matrix.client, repository, old.digest)
            delete_manifest_at_primary(matrix.client, quiet_repository, quiet.digest)
            marks["deleted"] = time.monotonic()

        assert matrix.redis_command("SET", lease, "fault-matrix", "EX", "60") == "OK"
        marks["confirmed"] = lose_notifications(matrix, target, delete)
        marks["telling"] = time.monotonic()
        post_events(matrix.client, "primary", [notification("delete", repository, digest=old.digest)])
        marks["told"] = time.monotonic()

    def release_and_reconcile() -> None:
        matrix.redis_command("DEL", lease)
        matrix.reconcile()

    with TagWatch(matrix.client, target) as watch:
        pulls = under_fault(
            matrix,
            outcome,
            [target, by_digest],
            delete_lose_then_tell,
            release_and_reconcile,
            manifest_unknown_after(marks, {target, by_digest}),
        )
    matrix.forget_pin(target)
    matrix.forget_pin(quiet_target)
    # Neither manifest is served by digest here any more (their blobs still are: content-addressed):
    # one after its notification, the other once reconciliation asked the primary about it.
    matrix.expected.present[(repository, old.digest)] = False
    matrix.expected.present[(quiet_repository, quiet.digest)] = False
    learnt = watch.learnt(marks["deleted"], {old.digest})
    bound = min(learnt, marks["told"], marks["confirmed"] + DEFAULT_MAX_TAG_AGE)
    stale = stale_pulls(pulls, target, {old.digest}, bound) + stale_pulls(pulls, by_digest, {old.digest}, marks["told"])
    outcome.stale = len(stale)
    before = [p for p in pulls if marks["deleted"] < p.started < marks["told"] and p.digest]
    outcome.notes.append(
        f"between the delete and its notification (events lost) {len(before)} pull(s) by tag or digest got the "
        f"deleted manifest from the local registry (within max_tag_age of the pin's stamp); the delete{{digest}} "
        f"notification tombstoned the tag pinned to it (seen {1000 * (learnt - marks['telling']):.0f} ms after it was "
        f"sent; the restarted updater's own reconciliation was held off by a lease the test held, so the event "
        f"alone acted) and stopped the digest being served here; {outcome.allowed_failures} pull(s) after the "
        "delete failed with the primary's own 404 (manifest unknown)"
    )
    assert_ok(recovered(matrix, outcome, "lease released, reconcile --once"))
    outcome.notes.append(served_after_reconciliation(matrix, quiet_repository, quiet.digest))
    assert marks["telling"] < learnt < marks["told"] + 2.0, "the delete{digest} notification alone invalidated the tag"


def test_blob_deleted_behind_the_index(matrix: Matrix) -> None:
    outcome = Outcome("blob-deleted", "a replicated layer's data file deleted from the local registry's storage")
    repository = REPLICATED.rsplit(":", 1)[0]
    image = matrix.image("replicated")
    layer = image.layers[1].digest  # its own layer (layer 0 is shared with every other image)
    storage = matrix.stack.processes["secondary"].log_path.parent / "storage"
    data = storage / "docker/registry/v2/blobs/sha256" / layer[7:9] / layer[7:] / "data"
    assert data.exists(), data
    window = FaultWindow()
    # A GET that the registry had begun (size known, headers sent) when the file went is cut (EOF).
    under_fault(
        matrix,
        outcome,
        [REPLICATED],
        window.applying(data.unlink),
        window.lifting(matrix.reconcile),
        cut_mid_blob(window),
    )
    note_cuts(outcome)
    matrix.expected.present[(repository, layer)] = False
    assert_ok(recovered(matrix, outcome, "reconcile --once"))
    assert "fallback/200" in outcome.routes_during_fault


# -- local content that goes bad


CORRUPTED = "faults/corrupted:v1"
VERIFY_COMMAND = (sys.executable, "-m", "geo_route.cli", "reconcile", "--once", "--verify", "-c")


def test_a_corrupted_local_blob(matrix: Matrix) -> None:
    """One byte of a replicated layer flipped in the local registry's storage (same size) before
    anyone pulled it: the pulls that get the bad copy fail (nothing can fall back after a 200); the
    first refetch (the pullers share one address) has the verifier read the layer, which
    quarantines it for everyone, after which every pull succeeds. Repaired by hand (the file
    restored, then ``reconcile --once --verify``), the layer is served here again."""
    outcome = Outcome(
        "corrupted-blob",
        "one byte of a replicated layer flipped in the local registry's storage (same size), before any pull",
    )
    repository = CORRUPTED.rsplit(":", 1)[0]
    image = matrix.image("corrupted")
    matrix.publish(CORRUPTED, image, replicated=True)
    layer = image.layers[1].digest
    storage = matrix.stack.processes["secondary"].log_path.parent / "storage"
    data = storage / "docker/registry/v2/blobs/sha256" / layer[7:9] / layer[7:] / "data"
    original = data.read_bytes()
    corrupted = bytearray(original)
    corrupted[len(corrupted) // 2] ^= 0x01
    data.write_bytes(bytes(corrupted))
    view = IndexQuery(QueryKind.BLOB, repository, layer)
    since = matrix.client.access_log_offset()
    corrupted_at = time.monotonic()
    quarantined_at = 0.0
    with PullLoad(matrix.client, [CORRUPTED], matrix.root / outcome.cell) as load:
        deadline = corrupted_at + 60
        while not quarantined_at and time.monotonic() < deadline:
            if matrix.client.index.lookup(view).quarantined:
                quarantined_at = time.monotonic()
            time.sleep(0.02)
        assert quarantined_at, "the site never learnt that the layer is corrupt"
        load.wait_for_pulls(3, started_after=quarantined_at)
        until = matrix.client.access_log_offset()
        outcome.fault_ended = time.monotonic()
        data.write_bytes(original)
        result = subprocess.run(
            [*VERIFY_COMMAND, matrix.client.info.site_file], capture_output=True, text=True, timeout=120, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
        load.wait_for_pulls(3, started_after=time.monotonic())
    pulls = load.snapshot()

    def got_the_bad_copy(pull: Pull) -> bool:
        return "Digest did not match" in pull.error and pull.started < quarantined_at

    judge_pulls(outcome, pulls, matrix.published, got_the_bad_copy)
    outcome.routes_during_fault = routes_between(matrix.client, since, until)
    layer_reads = [
        e for e in matrix.client.access_log(since) if e.uri == f"/v2/{repository}/blobs/{layer}" and e.method == "GET"
    ]
    by_reason: dict[str, int] = {}
    for entry in layer_reads:
        key = f"{entry.route}:{entry.reason}/{entry.status}"
        by_reason[key] = by_reason.get(key, 0) + 1
    outcome.notes.append(
        f"the layer was quarantined {quarantined_at - corrupted_at:.1f} s after it was corrupted "
        f"({outcome.allowed_failures} pull(s) got the bad copy before that, none after); the layer's GETs: "
        f"{', '.join(f'{k} {v}' for k, v in sorted(by_reason.items()))}; "
        "restored and lifted by reconcile --verify"
    )
    assert_ok(recovered(matrix, outcome, "file restored, reconcile --once --verify"))
    assert quarantined_at - corrupted_at < 10, "the first refetch has the layer read within seconds"
    assert any(key.startswith("primary:blob-quarantined/") for key in by_reason), by_reason
    assert not matrix.client.index.lookup(view).quarantined


# -- Redis under Sentinel (a stack of its own: a primary, a replica, three sentinels, down-after 1 s)

SENTINEL_BOUND = 10.0  # seconds: index-unavailable decisions must end within this of the fault


def topology_matrix(matrix: Matrix, root: Path, redis: RedisTopology) -> Iterator[Matrix]:
    """A matrix on a stack of its own whose index runs on ``redis`` (sharing the main matrix's images)."""
    stack = bring_up(root / "stack", site_overrides=OVERRIDES, redis=redis)
    client = observe_patiently(StackClient(stack.info, stack))
    try:
        m = Matrix(client, stack, root, images=matrix.images)
        m.publish(REPLICATED, m.image("replicated"), replicated=True)
        m.publish(PRIMARY_ONLY, m.image("primary-only"), replicated=False)
        yield m
    finally:
        client.close()
        stack.stop()


@pytest.fixture(scope="module")
def sentinel_matrix(matrix: Matrix, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    yield from topology_matrix(matrix, tmp_path_factory.mktemp("faults-sentinel"), "sentinel")


def sentinel_failover(m: Matrix, fault: Callable[[str], object], marks: dict[str, float | str]) -> None:
    """Apply ``fault`` to the Redis primary and wait until the sentinels have promoted another node."""
    topology = m.stack.redis_topology
    assert topology is not None
    part = marks["part"] = topology.master_part()
    marks["at"] = time.monotonic()
    fault(part)
    deadline = time.monotonic() + 30
    while topology.master_port() in (None, topology.nodes[part].port):
        assert time.monotonic() < deadline, "the sentinels promoted no replica within 30 s"
        time.sleep(0.05)
    marks["promoted"] = time.monotonic()


def wait_for_pin_through_failover(m: Matrix, repository: str, tag: str, digest: str, timeout: float = 60) -> None:
    """``wait_for_pin``, where the observer's own idle connection may still face the hung old primary
    (it times out once, is dropped, and the next lookup asks the sentinels)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(IndexUnavailable):
            if m.client.index.lookup(IndexQuery(QueryKind.TAG, repository, tag)).pinned_digest == digest:
                return
        assert time.monotonic() < deadline, f"{repository}:{tag} was not pinned to {digest[:19]} within {timeout} s"
        time.sleep(0.05)


def sentinel_note(outcome: Outcome, watch: ReasonWatch, marks: dict[str, float | str]) -> tuple[int, float]:
    at = float(marks["at"])
    count, first, last = watch.span("index-unavailable", at)
    outcome.notes.append(
        f"a replica was promoted {float(marks['promoted']) - at:.1f} s after the fault; {count} decisions went to "
        f"the primary as index-unavailable, from {first:.1f} to {last:.1f} s after it (seen in the access log "
        f"every 0.05 s); routes meanwhile: {listed(outcome.routes_during_fault)}"
    )
    print(f"{outcome.cell}: {outcome.notes[-1]}")
    return count, last


def test_redis_sentinel_primary_killed(sentinel_matrix: Matrix, matrix: Matrix) -> None:
    m = sentinel_matrix
    outcome = Outcome(
        "redis-sentinel-killed",
        "under Sentinel (down-after 1 s), the Redis primary SIGKILLed: a replica promoted; the old primary "
        "restarted (empty) and made a replica by the sentinels",
    )
    marks: dict[str, float | str] = {}
    topology = m.stack.redis_topology
    assert topology is not None

    def restart_the_old_primary() -> None:
        m.stack.restart_part(str(marks["part"]))
        marks["settled_s"] = round(topology.wait_until_settled(60), 1)

    with ReasonWatch(m.client) as watch:
        under_fault(
            m,
            outcome,
            [REPLICATED, PRIMARY_ONLY],
            lambda: sentinel_failover(m, m.stack.kill_part, marks),
            restart_the_old_primary,
        )
    count, last = sentinel_note(outcome, watch, marks)
    recovered(m, outcome, "nothing (Sentinel's failover; the old primary restarted as a replica)")
    matrix.outcomes.append(m.outcomes.pop())
    print(f"{outcome.cell}: {outcome.as_json()}")
    assert_ok(outcome)
    assert count > 0 and last < SENTINEL_BOUND, (count, last)


def test_redis_sentinel_primary_stopped_past_down_after(sentinel_matrix: Matrix, matrix: Matrix) -> None:
    """The primary hangs (SIGSTOP) past down-after: promoted replica; the tag moves meanwhile (its event
    lands on the new primary); SIGCONT: the old primary, holding the older pin in the epoch it had, is
    turned into a replica. No pull gets the older digest once the site knew the new one."""
    m = sentinel_matrix
    outcome = Outcome(
        "redis-sentinel-stopped",
        "under Sentinel, the Redis primary SIGSTOPped past down-after (1 s): a replica promoted, the tag moved "
        "at the primary meanwhile; SIGCONT: the old primary (with the older pin) comes back and is made a replica",
    )
    target, repository = "faults/sentinel:v1", "faults/sentinel"
    old, new = m.image("sentinel-old"), m.image("sentinel-new")
    m.publish(target, old, replicated=True)
    m.client.wait_for_pin(repository, "v1", old.digest)
    marks: dict[str, float | str] = {}
    topology = m.stack.redis_topology
    assert topology is not None

    def stop_and_move() -> None:
        sentinel_failover(m, lambda part: m.stack.processes[part].pause(), marks)
        m.publish(target, new, replicated=False, through_site=False)
        marks["moved"] = time.monotonic()
        wait_for_pin_through_failover(m, repository, "v1", new.digest)

    def resume() -> None:
        m.stack.processes[str(marks["part"])].resume()
        marks["resumed"] = time.monotonic()
        marks["settled_s"] = round(topology.wait_until_settled(60), 1)

    with ReasonWatch(m.client) as watch, TagWatch(m.client, target) as tags:
        pulls = under_fault(m, outcome, [target, REPLICATED], stop_and_move, resume)
    count, last = sentinel_note(outcome, watch, marks)
    moved, resumed = float(marks["moved"]), float(marks["resumed"])
    after, older = judge_old_pin(outcome, pulls, tags, target, old.digest, moved, resumed)
    outcome.notes.append(
        f"the old primary was a replica again {marks['settled_s']} s after SIGCONT; {after} pulls of the tag "
        f"after it, {older} with the older digest"
    )
    recovered(m, outcome, "SIGCONT, nothing else (the sentinels make the old primary a replica)")
    matrix.outcomes.append(m.outcomes.pop())
    print(f"{outcome.cell}: {outcome.as_json()}")
    assert_ok(outcome)
    assert count > 0 and last < SENTINEL_BOUND, (count, last)


# -- Redis Cluster (a stack of its own: three primaries, a replica of each, cluster-node-timeout 1 s)


@pytest.fixture(scope="module")
def cluster_matrix(matrix: Matrix, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    yield from topology_matrix(matrix, tmp_path_factory.mktemp("faults-cluster"), "cluster")


def test_redis_cluster_primary_killed(cluster_matrix: Matrix, matrix: Matrix) -> None:
    """The primary holding the replicated repository's bucket is SIGKILLed: the cluster promotes its
    replica; the other primaries' buckets are never unavailable; the old primary restarts and rejoins
    as a replica. The promoted replica is a new run_id: the bucket starts a new epoch."""
    m = cluster_matrix
    outcome = Outcome(
        "redis-cluster-killed",
        "on a Redis Cluster (3 primaries with a replica each, node timeout 1 s), the primary of the replicated "
        "repository's bucket SIGKILLed: its replica promoted; the old primary restarted, rejoining as a replica",
    )
    topology = m.stack.redis_topology
    assert isinstance(topology, ClusterTopology)
    keys = m.client.index.keys
    slot_key = keys.epoch(keys.bucket(REPLICATED.split(":")[0]))
    marks: dict[str, float | str] = {}

    def kill() -> None:
        part = marks["part"] = topology.primary_part(slot_key)
        marks["at"] = time.monotonic()
        m.stack.kill_part(part)
        deadline = time.monotonic() + 30
        while topology.primary_part(slot_key) == part:
            assert time.monotonic() < deadline, "the cluster promoted no replica within 30 s"
            time.sleep(0.05)
        marks["promoted"] = time.monotonic()

    def restart_the_old_primary() -> None:
        m.stack.restart_part(str(marks["part"]))
        marks["settled_s"] = round(topology.wait_until_settled(60), 1)

    with ReasonWatch(m.client) as watch:
        under_fault(m, outcome, [REPLICATED, PRIMARY_ONLY], kill, restart_the_old_primary)
    count, last = sentinel_note(outcome, watch, marks)
    outcome.notes.append(f"the old primary was a replica again {marks['settled_s']} s after its restart")
    recovered(m, outcome, "nothing (the cluster's failover; the old primary restarted as a replica)")
    matrix.outcomes.append(m.outcomes.pop())
    print(f"{outcome.cell}: {outcome.as_json()}")
    assert_ok(outcome)
    assert count > 0 and last < SENTINEL_BOUND, (count, last)
