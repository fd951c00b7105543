"""The consistency model (docs/consistency.md), checked against generated histories.

Hypothesis generates histories of a primary registry and a site: pushes, tag moves, tag deletes and
digest deletes (with or without the tag events GitLab's database mode leaves out) and GitLab renames
(of a name, taking the repositories under it along, and of a namespace; ``from``/``to`` spelled as
full paths, as GitLab's sample does, or bare) at the primary; manifest PUTs and DELETEs and GitLab
renames (``PATCH /gitlab/v1/repositories/<path>/``) through the site; notifications delivered late,
twice, out of order, never (GitLab drops them after its retries), or stamped by a clock an hour off;
resolutions and reconciliations started at one step and finished at any later one; Redis restarted
empty or from an older snapshot; time moving on. The index is the real ``RedisIndexStore`` on a real
``redis-server``; events go through the real ``interpret_event``; resolutions use the real ``judge``
and reconciliation's real ``pin_update``; every answer is computed with the real
``index_query``/``route``. The primary is an in-memory model (a double of the ``TagSource`` protocol
only).

After every step, for every tag and every ``Accept`` a client may send, the site's answer is a
route to the primary, or a local manifest that is the digest the primary published for that tag at
some moment within ``max_tag_age`` of now (on the index's clock) and that this ``Accept`` gets from
the primary as itself; after a write through the site completed within the fence, nothing older than
that write; a manifest by digest is never local once the primary's delete of it has been applied
(unless the primary has it again).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from support import RedisServer

from geo_route.access import Grants
from geo_route.config import Settings
from geo_route.errors import IndexUnavailable
from geo_route.index.model import (
    UNAVAILABLE,
    IndexUpdate,
    ManifestPresence,
    QueryKind,
    TagResolution,
)
from geo_route.index.redis_store import RedisIndexStore
from geo_route.negotiation import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST
from geo_route.operations import classify_request
from geo_route.routing import Policy, Route, index_query, invalidations_for_write, route
from geo_route.updater.notifications import Source, interpret_event
from geo_route.updater.reconcile import pin_update
from geo_route.updater.reconcile_report import PrimaryTally
from geo_route.updater.registry_client import ManifestHead
from geo_route.updater.resolver import judge

HISTORIES = int(os.environ.get("MODEL_HISTORIES", "500"))
MAX_TAG_AGE = 300.0
FENCE = 30.0
REPOS = ("g/app", "g/web", "g/app/web")  # g/app/web: under g/app, so a rename of g/app takes it along
TAGS = ("v1",)  # one tag per repository: histories collide on it more often
# GitLab's renames: a name (g/app → g/web, g/app/web → g/web/web with it) and a namespace (g/app/web →
# g/web), each as the event may spell ``from``/``to``: full paths (GitLab's sample) or bare.
RENAMES = {
    "name": ("g/app", "g/web", (("g/app", "g/web"), ("app", "web"))),
    "namespace": ("g/app/web", "g/web", (("g/app/web", "g/web"), ("g/app", "g"))),
}
EVENT_IDS = itertools.count()
DIGESTS = tuple(f"sha256:{n:064x}" for n in range(1, 5))
MEDIA_TYPES = {
    d: t for d, t in zip(DIGESTS, (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST), strict=True)
}
ACCEPTS = ("", OCI_MANIFEST, DOCKER_MANIFEST, ", ".join(MEDIA_TYPES.values()), f"{DOCKER_MANIFEST}, {OCI_INDEX}")
POLICY = Policy(
    realm="https://gitlab.test/jwt/auth",
    service="container_registry",
    max_tag_age=MAX_TAG_AGE,
    refresh_after=MAX_TAG_AGE / 2,
    write_fence=FENCE,
)
# The same site with Distribution 3 registries: only what a tag negotiates to differs (``answered_by``).
POLICY_3 = dataclasses.replace(POLICY, dialect="distribution-3")


PUSHER = Grants("alice", 4_000_000_000.0, {("repository", r): frozenset({"pull", "push", "delete"}) for r in REPOS})


@dataclasses.dataclass
class ModelPrimary:
    """The primary registry: tags per repository, digests it holds, and every tag's history."""

    now: float = 0.0
    tags: dict[tuple[str, str], str] = dataclasses.field(default_factory=dict)
    digests: dict[str, set[str]] = dataclasses.field(default_factory=lambda: {r: set() for r in REPOS})
    history: dict[tuple[str, str], list[tuple[float, str]]] = dataclasses.field(default_factory=dict)
    gained: dict[tuple[str, str], float] = dataclasses.field(default_factory=dict)  # (repo, digest) pushed last

    def set_tag(self, repository: str, tag: str, digest: str) -> None:
        if digest:
            self.tags[(repository, tag)] = digest
            self.digests[repository].add(digest)
            self.gained[(repository, digest)] = self.now
        else:
            self.tags.pop((repository, tag), None)
        self.history.setdefault((repository, tag), [(0.0, "")]).append((self.now, digest))

    def named_from(self, repository: str, tag: str, moment: float) -> set[str]:
        """Every digest the tag named from ``moment`` on (a write that completed then, included)."""
        entries = self.history.get((repository, tag), [(0.0, "")])
        return {digest for at, digest in entries if at >= moment} | (
            set() if any(at == moment for at, _ in entries) else self.published_since(repository, tag, moment)
        )

    def published_since(self, repository: str, tag: str, since: float) -> set[str]:
        """Every digest the tag named at some moment at or after ``since``."""
        entries = self.history.get((repository, tag), [(0.0, "")])
        found = {digest for at, digest in entries if at >= since}
        before = [digest for at, digest in entries if at < since]
        if before:
            found.add(before[-1])  # what it named at ``since`` itself
        return found

    def rename(self, old: str, new: str) -> None:
        """GitLab's rename: ``old`` and every repository under it move to ``new`` (what lands
        outside the model's repositories is gone from it); what the new paths held is replaced."""
        moved = {r: new + r[len(old) :] for r in REPOS if r == old or r.startswith(old + "/")}
        tags = {(r, tag): self.tags.get((r, tag), "") for r in moved for tag in TAGS}
        digests = {r: set(self.digests[r]) for r in moved}
        for r in moved:
            for tag in TAGS:
                self.set_tag(r, tag, "")
            self.digests[r] = set()
        for r, target in moved.items():
            if target in REPOS:
                for tag in TAGS:
                    self.set_tag(target, tag, tags[(r, tag)])
                self.digests[target] = digests[r]
                self.gained.update({(target, d): self.now for d in digests[r]})

    def head(self, repository: str, reference: str) -> ManifestHead | None:
        digest = self.tags.get((repository, reference))
        return ManifestHead(digest, MEDIA_TYPES[digest]) if digest else None


def named_types(accept: str) -> set[str]:
    """The media types an Accept header names, as the registry reads it (the test's own oracle)."""
    return {part.split(";")[0].strip() for part in accept.split(",")}


def answered_by(policy: Policy, media_type: str, accept: str) -> bool:
    """Whether the primary answers a tag of ``media_type`` as itself for ``accept`` (the test's own
    oracle, for ACCEPTS' plain types): 2.8 when the Accept names it; Distribution 3 also a schema 2
    manifest and an OCI index whatever the Accept (no schema 1, no 404 for an index)."""
    if policy.dialect == "distribution-3" and media_type in (DOCKER_MANIFEST, OCI_INDEX):
        return True
    return media_type in named_types(accept)


def envelope_event(action: str, repository: str, skew: float, **target: Any) -> dict[str, Any]:
    stamp = "2030-01-01T00:00:00Z" if skew > 0 else ("2020-01-01T00:00:00Z" if skew < 0 else "2026-12-04T00:00:00Z")
    return {
        "id": f"e{next(EVENT_IDS)}",
        "timestamp": stamp,
        "action": action,
        "target": {"repository": repository, **target},
    }


class SiteHistory(RuleBasedStateMachine):
    server: RedisServer
    redis_settings: Settings

    histories = 0

    def __init__(self) -> None:
        super().__init__()
        SiteHistory.histories += 1
        self.primary = ModelPrimary(now=1_000_000.0)
        self.clock = [1_000_000.0]
        (Path(self.server.directory) / "dump.rdb").unlink(missing_ok=True)
        with redis.Redis.from_url(self.server.url) as client:
            client.flushall()
        self.store = RedisIndexStore(self.redis_settings.redis, index_clock=lambda: self.clock[0])
        self.pending: list[dict[str, Any]] = []
        self.in_flight: list[tuple[TagResolution, ManifestHead | None]] = []
        self.reconciling: list[tuple[float, str, list[tuple[str, str, ManifestHead | None, str | None]]]] = []
        self.writes: dict[tuple[str, str], tuple[float, str]] = {}  # started site writes: (started, digest)
        self.site_renames: list[tuple[float, str]] = []  # renames through the site in flight: (started, kind)
        self.renamed: dict[str, set[str]] = {}  # a rename event's id -> the repositories it concerns
        self.read_your_writes: dict[tuple[str, str], float] = {}  # completed in the fence: completed at
        # When the index was told of each digest's latest delete (a later push at the primary supersedes it).
        self.deletes_applied: dict[tuple[str, str], float] = {}
        # The newest invalidation of each tag the index acknowledged (an event about the tag, a write
        # through the site, a rename): no local answer may come from a pin asked before it, even
        # after Redis came back from an older snapshot (the epoch's job).
        self.acked: dict[tuple[str, str], float] = {}
        self.snapshot_deletes: dict[tuple[str, str], float] | None = None
        self.restarted = False

    def teardown(self) -> None:
        self.store.close()

    @initialize()
    def replicate_everything(self) -> None:
        # Presence is not under test here: every digest is replicated to the site.
        self.apply([ManifestPresence(r, d, True) for r in REPOS for d in DIGESTS])

    # ---- the index, as the site's processes use it ------------------------------------------------

    def apply(self, updates: list[IndexUpdate]) -> bool:
        """As the updater and the auth service apply: an unavailable index applies nothing."""
        try:
            self.store.apply(updates)
            return True
        except IndexUnavailable:
            return False

    def emit(self, event: dict[str, Any]) -> None:
        self.pending.append(event)

    # ---- the primary ------------------------------------------------------------------------------

    @rule(
        repository=st.sampled_from(REPOS),
        tag=st.sampled_from(TAGS),
        digest=st.sampled_from(DIGESTS),
        skew=st.sampled_from((-3600.0, 0.0, 3600.0)),
    )
    def push_at_the_primary(self, repository: str, tag: str, digest: str, skew: float) -> None:
        self.primary.set_tag(repository, tag, digest)
        self.emit(envelope_event("push", repository, skew, mediaType=MEDIA_TYPES[digest], digest=digest, tag=tag))

    @rule(repository=st.sampled_from(REPOS), tag=st.sampled_from(TAGS))
    def delete_tag_at_the_primary(self, repository: str, tag: str) -> None:
        self.primary.set_tag(repository, tag, "")
        self.emit(envelope_event("delete", repository, 0.0, tag=tag))

    @rule(repository=st.sampled_from(REPOS), digest=st.sampled_from(DIGESTS), tag_events=st.booleans())
    def delete_digest_at_the_primary(self, repository: str, digest: str, tag_events: bool) -> None:
        tagged = [tag for (repo, tag), d in self.primary.tags.items() if repo == repository and d == digest]
        for tag in tagged:
            self.primary.set_tag(repository, tag, "")
        self.primary.digests[repository].discard(digest)
        self.emit(envelope_event("delete", repository, 0.0, digest=digest))
        if tag_events:  # 2.8 and 3.0 send them; GitLab's database mode does not
            for tag in tagged:
                self.emit(envelope_event("delete", repository, 0.0, tag=tag))

    @rule(kind=st.sampled_from(sorted(RENAMES)), spelling=st.sampled_from((0, 0, 1)))  # 0: GitLab's own spelling
    def rename_at_the_primary(self, kind: str, spelling: int) -> None:
        old, new, spellings = RENAMES[kind]
        self.primary.rename(old, new)
        given_from, given_to = spellings[spelling]
        event = envelope_event("rename", old, 0.0, rename={"type": kind, "from": given_from, "to": given_to})
        event["actor"] = {"name": "root", "user_type": "personal_access_token", "user": "eyJhbGciOi.e30.sig"}
        self.renamed[event["id"]] = {r for r in REPOS for path in (old, new) if r == path or r.startswith(path + "/")}
        self.emit(event)

    # ---- notifications: late, twice, out of order, never --------------------------------------------

    @precondition(lambda self: self.pending)
    @rule(data=st.data(), fate=st.sampled_from(("delivered", "delivered, and again later", "lost")))
    def deliver_an_event(self, data: st.DataObject, fate: str) -> None:
        index = data.draw(st.integers(0, len(self.pending) - 1))
        event = self.pending[index] if fate.endswith("later") else self.pending.pop(index)
        if fate == "lost":
            return
        outcome = interpret_event(event, Source.PRIMARY, self.clock[0])
        if self.apply(list(outcome.updates)):  # what the index was told, read from the event itself
            target, now = event["target"], self.clock[0]
            if event["action"] == "delete" and target.get("digest"):
                self.deletes_applied[(target["repository"], target["digest"])] = now
            elif target.get("tag"):
                self.acknowledge(target["repository"], target["tag"], now)
            elif event["action"] == "rename":  # every tag under the old path and under the new one
                for repository, tag in itertools.product(self.renamed[event["id"]], TAGS):
                    self.acknowledge(repository, tag, now)

    def acknowledge(self, repository: str, tag: str, stamp: float) -> None:
        if repository in REPOS:
            self.acked[(repository, tag)] = max(stamp, self.acked.get((repository, tag), stamp))

    # ---- writes through the site --------------------------------------------------------------------

    @rule(repository=st.sampled_from(REPOS), tag=st.sampled_from(TAGS), digest=st.sampled_from(DIGESTS))
    def start_a_push_through_the_site(self, repository: str, tag: str, digest: str) -> None:
        operation = classify_request("PUT", f"/v2/{repository}/manifests/{tag}")
        if self.apply(list(invalidations_for_write(operation, PUSHER, POLICY))):
            self.writes[(repository, tag)] = (self.clock[0], digest)
        else:  # the index could not be told: the write still lands, read-your-writes is not promised
            self.primary.set_tag(repository, tag, digest)

    @precondition(lambda self: self.writes)
    @rule(data=st.data())
    def finish_a_push_through_the_site(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.writes)))
        started, digest = self.writes.pop(key)
        self.primary.set_tag(*key, digest)
        self.emit(envelope_event("push", key[0], 0.0, mediaType=MEDIA_TYPES[digest], digest=digest, tag=key[1]))
        if self.clock[0] - started <= FENCE:  # landed within its fence (and no restart lost the fence)
            self.read_your_writes[key] = self.clock[0]
            self.acknowledge(*key, self.clock[0])

    @rule(repository=st.sampled_from(REPOS), digest=st.sampled_from(DIGESTS))
    def delete_a_digest_through_the_site(self, repository: str, digest: str) -> None:
        operation = classify_request("DELETE", f"/v2/{repository}/manifests/{digest}")
        if self.apply(list(invalidations_for_write(operation, PUSHER, POLICY))):
            self.deletes_applied[(repository, digest)] = self.clock[0]
        self.delete_digest_at_the_primary(repository, digest, True)

    @rule(kind=st.sampled_from(sorted(RENAMES)))
    def start_a_rename_through_the_site(self, kind: str) -> None:
        """GitLab's ``PATCH /gitlab/v1/repositories/<path>/`` passes the auth service: the site
        knows the old path (the new one is in the body, which the auth service never sees)."""
        operation = classify_request("PATCH", f"/gitlab/v1/repositories/{RENAMES[kind][0]}/")
        if self.apply(list(invalidations_for_write(operation, PUSHER, POLICY))):
            self.site_renames.append((self.clock[0], kind))
        else:  # the index could not be told: the rename still happens, read-your-writes is not promised
            self.rename_at_the_primary(kind, 0)

    @precondition(lambda self: self.site_renames)
    @rule(data=st.data(), spelling=st.sampled_from((0, 1)))
    def finish_a_rename_through_the_site(self, data: st.DataObject, spelling: int) -> None:
        started, kind = self.site_renames.pop(data.draw(st.integers(0, len(self.site_renames) - 1)))
        self.rename_at_the_primary(kind, spelling)
        if self.clock[0] - started <= FENCE:  # landed within its fence: nothing under the old path is local
            old = RENAMES[kind][0]
            for repository in (r for r in REPOS if r == old or r.startswith(old + "/")):
                for tag in TAGS:
                    self.read_your_writes[(repository, tag)] = self.clock[0]
                    self.acknowledge(repository, tag, self.clock[0])

    # ---- resolution and reconciliation, interleaved anywhere ---------------------------------------

    @rule()
    def claim_a_resolution(self) -> None:
        try:
            claimed = self.store.claim_resolutions(len(REPOS) * len(TAGS))  # every due one: more in flight
        except IndexUnavailable:
            return
        for resolution in claimed:  # asked now; answered with the primary's state now
            self.in_flight.append((resolution, self.primary.head(resolution.repository, resolution.tag)))

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data(), then_snapshot=st.booleans())
    def finish_a_resolution(self, data: st.DataObject, then_snapshot: bool) -> None:
        """Apply an answer; half the time Redis then writes a snapshot (a restart may bring it back)."""
        resolution, answer = self.in_flight.pop(data.draw(st.integers(0, len(self.in_flight) - 1)))
        verdict = judge(resolution, answer)
        if verdict.pin is not None:
            self.apply([verdict.pin])
        else:
            with contextlib.suppress(IndexUnavailable):
                self.store.requeue(resolution, verdict.delay, verdict.attempts)
        if then_snapshot:
            self.snapshot_redis()

    @rule()
    def start_a_reconciliation(self) -> None:
        try:
            asked_at, epoch = self.store.stamp()
            known = [(r, t, d) for r in REPOS for t, (d, _) in self.store.primary_tags(r).items()]
        except IndexUnavailable:
            return
        answers: list[tuple[str, str, ManifestHead | None, str | None]] = [
            (r, t, self.primary.head(r, t), d) for r, t, d in known
        ]
        self.reconciling.append((asked_at, epoch, answers))

    @precondition(lambda self: self.reconciling)
    @rule()
    def finish_a_reconciliation(self) -> None:
        asked_at, epoch, answers = self.reconciling.pop(0)
        tally = PrimaryTally()
        updates = [pin_update(r, t, answer, pinned, asked_at, tally, epoch) for r, t, answer, pinned in answers]
        self.apply([u for u in updates if u is not None])

    # ---- time and Redis -----------------------------------------------------------------------------

    @rule(seconds=st.sampled_from((0.5, 2.0, 20.0, 100.0, 200.0, 400.0)))
    def time_passes(self, seconds: float) -> None:
        self.clock[0] += seconds
        self.primary.now = self.clock[0]

    def snapshot_redis(self) -> None:
        self.server.save()
        self.snapshot_deletes = dict(self.deletes_applied)

    @precondition(lambda self: not self.restarted)
    @rule(from_snapshot=st.booleans())
    def restart_redis(self, from_snapshot: bool) -> None:
        self.restarted = True  # one restart per history keeps 500 histories quick
        if not from_snapshot:
            (Path(self.server.directory) / "dump.rdb").unlink(missing_ok=True)
        self.server.restart()
        self.writes = {key: (-FENCE * 10, digest) for key, (_, digest) in self.writes.items()}  # fences may be lost
        self.site_renames = [(-FENCE * 10, kind) for _, kind in self.site_renames]
        had_snapshot = from_snapshot and self.snapshot_deletes is not None
        self.deletes_applied = dict(self.snapshot_deletes or {}) if had_snapshot else {}
        presence: list[IndexUpdate] = [ManifestPresence(r, d, True) for r in REPOS for d in DIGESTS]
        self.apply(presence) or self.apply(presence)  # the first use of a broken connection fails

    # ---- the promise ----------------------------------------------------------------------------------

    def decide(
        self,
        kind: QueryKind,
        repository: str,
        reference: str,
        accepts: tuple[str, ...],
        policy: Policy = POLICY,
    ) -> list[tuple[Route | None, str, float]]:
        """The site's answer for each ``Accept``: one index lookup (an ``Accept`` does not change
        what the index is asked), then the real routing for each, under ``policy``."""
        method_uri = f"/v2/{repository}/manifests/{reference}"
        operation = classify_request("GET", method_uri)
        query = index_query(operation, POLICY)
        assert query is not None and query.kind is kind
        try:
            view = self.store.lookup(query)
        except IndexUnavailable:
            view = UNAVAILABLE
        answers = []
        for accept in accepts:
            decision = route(operation, view, policy, self.clock[0], accept)
            answers.append((decision.route, decision.upstream_path.rsplit("/", 1)[-1], view.confirmed_at))
        return answers

    @invariant()
    def check_every_answer_and_tick(self) -> None:
        """After every step: check, then let a quarter second pass (no two steps share a moment)."""
        self.check_every_answer()
        self.time_passes(0.25)

    def check_every_answer(self) -> None:
        now = self.clock[0]
        for repository in REPOS:
            for tag, policy in itertools.product(TAGS, (POLICY, POLICY_3)):
                for accept, (where, digest, asked_at) in zip(
                    ACCEPTS, self.decide(QueryKind.TAG, repository, tag, ACCEPTS, policy), strict=True
                ):
                    if where is not Route.LOCAL:
                        continue
                    allowed = self.primary.published_since(repository, tag, now - MAX_TAG_AGE)
                    assert digest in allowed, f"{repository}:{tag} served {digest[-4:]}, the primary had {allowed}"
                    assert answered_by(policy, MEDIA_TYPES[digest], accept), "the primary answers this Accept otherwise"
                    assert asked_at >= self.acked.get((repository, tag), 0.0), "a pin older than an invalidation"
                    completed = self.read_your_writes.get((repository, tag))
                    if completed is not None:
                        assert digest in self.primary.named_from(repository, tag, completed), "read-your-writes"
            for digest in DIGESTS:
                ((where, _, _),) = self.decide(QueryKind.MANIFEST, repository, digest, ("",))
                deleted_at = self.deletes_applied.get((repository, digest))
                superseded = (
                    deleted_at is not None and self.primary.gained.get((repository, digest), -1.0) >= deleted_at
                )
                if where is Route.LOCAL and deleted_at is not None and not superseded:
                    assert digest in self.primary.digests[repository], f"{digest[-4:]} deleted at the primary, served"


@pytest.fixture(scope="module")
def model_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("model-redis")).start()
    yield server
    server.stop()


def test_every_answer_the_site_gives_keeps_the_promise(model_redis: RedisServer, redis_settings: Settings) -> None:
    SiteHistory.server = model_redis
    SiteHistory.redis_settings = dataclasses.replace(
        redis_settings, redis=dataclasses.replace(redis_settings.redis, url=model_redis.url, unavailable_cooldown=0.0)
    )
    run_state_machine_as_test(
        SiteHistory,
        settings=settings(
            max_examples=HISTORIES,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            derandomize=False,
        ),
    )
    assert SiteHistory.histories >= HISTORIES


class Always:
    """Draws the first choice (a scripted history instead of a generated one)."""

    def draw(self, strategy: Any) -> int:
        return 0


@pytest.mark.parametrize(("kind", "spelling"), [(kind, spelling) for kind in sorted(RENAMES) for spelling in (0, 1)])
def test_a_gitlab_rename_event_takes_the_new_paths_pins_off(
    model_redis: RedisServer, redis_settings: Settings, kind: str, spelling: int
) -> None:
    """One history, scripted: g/web is pinned, then a rename moves another repository onto it and
    its event arrives. No pin asked before the event may answer for g/web or the old path."""
    SiteHistory.server = model_redis
    SiteHistory.redis_settings = dataclasses.replace(
        redis_settings, redis=dataclasses.replace(redis_settings.redis, url=model_redis.url, unavailable_cooldown=0.0)
    )
    history = SiteHistory()
    try:
        history.replicate_everything()
        for repository in REPOS:
            history.push_at_the_primary(repository, "v1", DIGESTS[REPOS.index(repository)], 0.0)
        history.check_every_answer_and_tick()  # the reads queue every tag's resolution
        history.claim_a_resolution()
        while history.in_flight:
            history.finish_a_resolution(Always(), then_snapshot=False)
        pinned = history.decide(QueryKind.TAG, "g/web", "v1", (ACCEPTS[3],))
        assert pinned[0][0] is Route.LOCAL, "the scripted history starts with g/web served here"
        history.pending.clear()
        history.time_passes(1.0)
        history.rename_at_the_primary(kind, spelling)
        history.deliver_an_event(Always(), "delivered")
        history.check_every_answer()
    finally:
        history.teardown()
