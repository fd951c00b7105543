"""The fault matrix under load (issue 6): every fault is applied while three skopeo pulls run
through NGINX, on one real devstack, one cell after another (each cell leaves the stack healthy).

For every cell: no failed pull for content a reachable registry holds, no pull with content the
primary did not publish for that tag, no pull slower than ``PULL_BOUND``, and the index correct
again after recovery (the registries' notification retries, or ``geo-route reconcile --once``
where an operator would run it). ``FAULTS_REPORT=docs/reliability.md`` writes the measured matrix.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from faults import (
    Expected,
    Outcome,
    Pull,
    PullLoad,
    judge_pulls,
    routes_between,
    run_reconcile,
    wait_for_index,
    write_matrix,
)

from geo_route.devstack.client import StackClient
from geo_route.devstack.images import OciImage, build_oci_image
from geo_route.devstack.replicate import replicate_image
from geo_route.devstack.skopeo import docker_reference
from geo_route.devstack.stack import RunningStack, bring_up

pytestmark = [pytest.mark.integration, pytest.mark.faults]

REPLICATED = "faults/replicated:v1"
PRIMARY_ONLY = "faults/primary-only:v1"
FAULT_HOLD = 3.0  # seconds a fault stays on (at least; until 3 pulls ran under it)
# Short NGINX timeouts so that hung registries show their bound within the test's time (defaults:
# local_timeout 30 s, proxy_timeout 900 s; the bound is the setting, whatever its value).
LOCAL_TIMEOUT, PROXY_TIMEOUT = 2, 5
TIMEOUTS = {"local_timeout": LOCAL_TIMEOUT, "proxy_timeout": PROXY_TIMEOUT}
MAX_TAG_AGE = 3  # seconds, for the cell that shows routing.max_tag_age bounding lost notifications


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

    def reconcile(self) -> None:
        run_reconcile(self.client.info.site_file, self.root / "reconcile.log")


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    started = time.monotonic()
    root = tmp_path_factory.mktemp("faults")
    stack = bring_up(root / "stack", site_overrides={"nginx": TIMEOUTS})
    client = StackClient(stack.info, stack)
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
    apply: Callable[[], None],
    restore: Callable[[], None],
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


def assert_ok(outcome: Outcome) -> None:
    assert outcome.ok, outcome.as_json()


def flush_redis(url: str) -> None:
    host, port = url.removeprefix("redis://").split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=2) as sock:
        sock.sendall(b"FLUSHALL\r\n")
        assert sock.recv(16).startswith(b"+OK")


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
    under_fault(
        matrix, outcome, [REPLICATED, PRIMARY_ONLY], lambda: flush_redis(matrix.client.info.redis_url), matrix.reconcile
    )
    assert_ok(recovered(matrix, outcome, "reconcile --once"))


def test_redis_slowed_past_its_timeout(matrix: Matrix) -> None:
    outcome = Outcome(
        "redis-slow", "redis-server SIGSTOPped for 3 s (accepts, never answers: past redis.socket_timeout)"
    )
    redis = matrix.stack.processes["redis"]
    under_fault(matrix, outcome, [REPLICATED, PRIMARY_ONLY], redis.pause, redis.resume)
    assert_ok(recovered(matrix, outcome, "SIGCONT, nothing else"))


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

    pulls = under_fault(matrix, outcome, [target], move, replicate_new)
    order = {matrix.image(name).digest: rank for rank, name in enumerate(("moving-0", "moving-1", "moving-2"))}
    # After a push through the site completes, no pull starting later may see an older digest;
    # after a push straight to the primary, not once the primary's notification has moved the pin.
    newest_at = lambda t: 2 if t > moves["pin moved"] else 1 if t > moves["through the site"] else 0  # noqa: E731
    outcome.stale = sum(1 for p in pulls if p.digest and order[p.digest] < newest_at(p.started))
    window = [p for p in pulls if moves["pushed at the primary"] < p.started < moves["pin moved"]]
    outcome.notes.append(
        f"a push straight to the primary (not through this site) moved the pin "
        f"{1000 * (moves['pin moved'] - moves['pushed at the primary']):.0f} ms later (its notification); "
        f"{len(window)} pull(s) started in that window"
    )
    assert_ok(recovered(matrix, outcome, "replication and its notifications"))


def lose_notifications(m: Matrix, target: str, new: OciImage) -> None:
    """The updater down while ``new`` is pushed straight to the primary; then the primary restarts,
    and the notification queued in its memory is gone for good."""
    m.stack.kill_part("updater")
    m.publish(target, new, replicated=False, through_site=False)
    m.stack.kill_part("primary")
    m.stack.restart_part("primary")
    m.stack.restart_part("updater")


def test_notifications_dropped_then_reconciled(matrix: Matrix) -> None:
    outcome = Outcome(
        "notifications-lost",
        "the updater down while the tag moves at the primary; the primary restarted (its queued events lost)",
    )
    target = "faults/dropped:v1"
    old, new = matrix.image("dropped-old"), matrix.image("dropped-new")
    matrix.publish(target, old, replicated=True)
    times: dict[str, float] = {}

    def lose() -> None:
        lose_notifications(matrix, target, new)
        times["moved"] = time.monotonic()

    def reconcile() -> None:
        matrix.reconcile()
        times["reconciled"] = time.monotonic()

    pulls = under_fault(matrix, outcome, [target], lose, reconcile)
    before = [p for p in pulls if times["moved"] < p.started < times["reconciled"] and p.digest == old.digest]
    outcome.stale = sum(1 for p in pulls if p.started > times["reconciled"] and p.digest != new.digest)
    outcome.notes.append(
        f"with the default routing.max_tag_age 0, {len(before)} pull(s) between the lost notification and "
        "reconciliation got the tag's previous digest (published, but stale); none after it. "
        "See notifications-lost, max_tag_age for the bound"
    )
    assert_ok(recovered(matrix, outcome, "reconcile --once"))


def test_lost_notifications_are_bounded_by_max_tag_age(matrix: Matrix, tmp_path: Path) -> None:
    """The same loss on a stack with routing.max_tag_age: a pin not confirmed for that long is not
    trusted, so the previous digest is served at most until then, and the primary answers after."""
    outcome = Outcome(
        "notifications-lost, max_tag_age",
        f"the same, with routing.max_tag_age {MAX_TAG_AGE} s (a stack of its own)",
    )
    overrides = {"nginx": TIMEOUTS, "routing": {"max_tag_age": MAX_TAG_AGE}}
    stack = bring_up(tmp_path / "stack", site_overrides=overrides)
    client = StackClient(stack.info, stack)
    try:
        m = Matrix(client, stack, tmp_path, images=matrix.images)
        target = "faults/bounded:v1"
        old, new = m.image("dropped-old"), m.image("dropped-new")
        m.publish(target, old, replicated=True)
        confirmed = time.monotonic()  # the primary's notification confirmed the pin before this
        pulls = under_fault(m, outcome, [target], lambda: lose_notifications(m, target, new), m.reconcile)
        trusted_until = confirmed + MAX_TAG_AGE
        outcome.stale = sum(1 for p in pulls if p.started > trusted_until + 0.5 and p.digest != new.digest)
        served_old = sum(1 for p in pulls if p.digest == old.digest and p.started <= trusted_until + 0.5)
        got_new = [p for p in pulls if p.started > trusted_until + 0.5]
        assert got_new, "pulls after the staleness bound"
        outcome.notes.append(
            f"{served_old} pull(s) got the previous digest, all within max_tag_age ({MAX_TAG_AGE} s) of the pin's "
            f"last confirmation; all {len(got_new)} later pulls got the new digest from the primary (reason "
            "tag-stale) before reconciliation ran. Pair max_tag_age with a shorter updater.reconcile_interval, "
            "which re-confirms pins, or tags stop being served locally once their notifications are older"
        )
        recovered(m, outcome, "reconcile --once")
        matrix.outcomes.append(m.outcomes.pop())
    finally:
        client.close()
        stack.stop()
    assert_ok(outcome)


def test_blob_deleted_behind_the_index(matrix: Matrix) -> None:
    outcome = Outcome("blob-deleted", "a replicated layer's data file deleted from the local registry's storage")
    repository = REPLICATED.rsplit(":", 1)[0]
    image = matrix.image("replicated")
    layer = image.layers[1].digest  # its own layer (layer 0 is shared with every other image)
    storage = matrix.stack.processes["secondary"].log_path.parent / "storage"
    data = storage / "docker/registry/v2/blobs/sha256" / layer[7:9] / layer[7:] / "data"
    assert data.exists(), data
    under_fault(matrix, outcome, [REPLICATED], data.unlink, matrix.reconcile)
    matrix.expected.present[(repository, layer)] = False
    assert_ok(recovered(matrix, outcome, "reconcile --once"))
    assert "fallback/200" in outcome.routes_during_fault
