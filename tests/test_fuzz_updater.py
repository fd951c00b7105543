"""Fuzzing the notification endpoints: random, broken, truncated, oversized and unauthenticated bodies.

Every answer is one the updater specifies (200, 401, 413; its 503 needs Redis down and is tested in
``test_updater``), and the index is never half-applied: after each request the keys under the test's
prefix equal, type for type, an in-memory model of the key schema (``index/redis_store.py``) to
which the test applied either nothing (a refusal, or a body that is not an envelope) or every update
of the envelope's fresh events, as the project's pure ``parse_envelope``/``interpret_events`` derive
them.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from support import RedisServer

from geo_route.config import Settings, load_settings
from geo_route.index.model import (
    BlobPresence,
    DigestDeleted,
    DigestRestored,
    IndexUpdate,
    LocalRepositoryDropped,
    LocalTag,
    ManifestPresence,
    PrimaryTag,
    RepositoryInvalidated,
    TagInvalidated,
)
from geo_route.index.redis_store import RedisIndexStore
from geo_route.updater.notifications import EnvelopeError, Source, interpret_events, parse_envelope
from geo_route.web.updater import create_updater_app

EXAMPLES = 2_000
SECRETS = {"local": "Bearer fuzz-local-secret-0123456789", "primary": "Bearer fuzz-primary-secret-0123456789"}
MAX_BODY = 16_384  # updater.max_body_bytes here: oversized bodies stay cheap
START = datetime(2026, 11, 23, 19, 19, 20, tzinfo=UTC).timestamp()
BLOB = "application/octet-stream"
OCI = "application/vnd.oci.image.manifest.v1+json"
DOCKER = "application/vnd.docker.distribution.manifest.v2+json"
EVENTS_TYPE = "application/vnd.docker.distribution.events.v1+json"
EVENTS_V2_TYPE = "application/vnd.docker.distribution.events.v2+json"  # Distribution 3.0


def digest(n: int) -> str:
    return f"sha256:{n:064x}"


# The index every fuzzed sequence starts from: pins older and newer than the fuzzed events' times.
SEED: tuple[IndexUpdate, ...] = (
    BlobPresence("group/app", digest(1), True),
    ManifestPresence("group/app", digest(1), True),
    LocalTag("group/app", "v1", digest(1)),
    PrimaryTag("group/app", "v1", digest(1), START),
    PrimaryTag("x/y", "v2", digest(2), START + 100),
)


# --- the model ------------------------------------------------------------------------------------------


class IndexModel:
    """The key schema of ``redis_store`` in memory: what Redis must hold (an independent oracle of
    its scripts' rules: pins strictly newer, tombstones at least as new, invalidations queued)."""

    def __init__(self, prefix: str, epoch: str) -> None:
        self.prefix = prefix
        self.epoch = epoch
        self.sets: defaultdict[str, set[str]] = defaultdict(set)
        self.hashes: defaultdict[str, dict[str, str]] = defaultdict(dict)
        self.queue: dict[str, float] = {}
        self.strings: dict[str, str] = {}
        self.now = 0.0

    def apply(self, updates: Iterable[IndexUpdate]) -> None:
        for update in updates:
            self.apply_one(update)

    def apply_one(self, update: IndexUpdate) -> None:
        repository, prefix = update.repository, self.prefix
        if isinstance(update, BlobPresence | ManifestPresence):
            kind = "blobs" if isinstance(update, BlobPresence) else "manifests"
            members = self.sets[f"{prefix}local:{kind}:{repository}"]
            if update.present:
                self.sets[f"{prefix}repos"].add(repository)
                members.add(update.digest)
            else:
                members.discard(update.digest)
        elif isinstance(update, LocalTag):
            if update.digest:
                self.sets[f"{prefix}repos"].add(repository)
            self.set_field(f"{prefix}local:tags:{repository}", update.tag, update.digest)
        elif isinstance(update, PrimaryTag):
            self.sets[f"{prefix}repos"].add(repository)
            self.pin(update)
        elif isinstance(update, TagInvalidated):
            self.sets[f"{prefix}repos"].add(repository)
            self.invalidate(repository, update.tag, self.now + update.fence, update.hint)
        elif isinstance(update, DigestDeleted):
            marks = self.hashes[f"{prefix}primary:deleted:{repository}"]
            stamp = self.now + update.fence
            if update.digest not in marks or float(marks[update.digest]) < stamp:
                marks[update.digest] = f"{stamp:.6f}"
            self.invalidate_pinned([repository], stamp, update.digest)
        elif isinstance(update, RepositoryInvalidated):
            under = sorted(n for n in self.sets[f"{prefix}repos"] if update.subtree and n.startswith(repository + "/"))
            names = [repository, *under]
            stamp = self.now + update.fence
            for name in names:  # the repository's floor: no answer asked before it lands
                key = f"{prefix}primary:invalidated:{name}"
                if key not in self.strings or float(self.strings[key]) < stamp:
                    self.strings[key] = f"{stamp:.6f}"
            self.invalidate_pinned(names, stamp, "")
        elif isinstance(update, DigestRestored):
            self.hashes[f"{prefix}primary:deleted:{repository}"].pop(update.digest, None)
        elif isinstance(update, LocalRepositoryDropped):
            under = [n for n in self.sets[f"{prefix}repos"] if update.subtree and n.startswith(repository + "/")]
            for name in (repository, *under):
                for kind in ("blobs", "manifests"):
                    self.sets.pop(f"{prefix}local:{kind}:{name}", None)
                self.hashes.pop(f"{prefix}local:tags:{name}", None)

    def pin(self, update: PrimaryTag) -> None:
        tags = self.hashes[f"{self.prefix}primary:tags:{update.repository}"]
        held = tags.get(update.tag)
        if held is not None:
            held_stamp = float(held.split(" ")[1])
            if update.confirmed_at < held_stamp or (update.digest and update.confirmed_at == held_stamp):
                return
        media = update.media_type or "-"
        tags[update.tag] = f"{update.digest or '-'} {update.confirmed_at:.6f} {media} {self.epoch}"

    def invalidate(self, repository: str, tag: str, stamp: float, hint: str) -> None:
        tags = self.hashes[f"{self.prefix}primary:tags:{repository}"]
        held = tags.get(tag)
        if held is not None:
            stamp = max(stamp, float(held.split(" ")[1]))
        tags[tag] = f"- {stamp:.6f} - {self.epoch}"
        member = f"{repository} {tag}"
        self.queue[member] = float(f"{stamp:.6f}")
        if hint:
            self.hashes[f"{self.prefix}resolve:hints"][member] = f"{hint} 0"

    def invalidate_pinned(self, repositories: list[str], stamp: float, digest: str) -> None:
        for name in repositories:
            for tag, value in sorted(self.hashes[f"{self.prefix}primary:tags:{name}"].items()):
                pinned = value.split(" ")[0]
                if pinned != "-" and (not digest or pinned == digest):
                    self.invalidate(name, tag, stamp, "")

    def set_field(self, key: str, name: str, value: str) -> None:
        if value:
            self.hashes[key][name] = value
        else:
            self.hashes[key].pop(name, None)

    def dump(self) -> dict[str, tuple[str, Any]]:
        state: dict[str, tuple[str, Any]] = {key: ("set", frozenset(v)) for key, v in self.sets.items() if v}
        state.update((key, ("hash", dict(fields))) for key, fields in self.hashes.items() if fields)
        state.update((key, ("string", value)) for key, value in self.strings.items())
        if self.queue:
            state[f"{self.prefix}resolve"] = ("zset", sorted(self.queue.items()))
        return state


def redis_dump(client: redis.Redis, prefix: str) -> dict[str, tuple[str, Any]]:
    """Every key under ``prefix`` with its type and value (sets, hashes, strings; other types by name),
    but ``status``: when the last envelope arrived and its lag (for ``geo-route status``), not index state."""
    keys = sorted(key for key in client.scan_iter(match=f"{prefix}*", count=1000) if key != f"{prefix}status")
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.type(key)
        kinds = pipe.execute()
        readers = {"set": pipe.smembers, "hash": pipe.hgetall, "string": pipe.get}
        for key, kind in zip(keys, kinds, strict=True):
            if kind == "zset":
                pipe.zrange(key, 0, -1, withscores=True)
            else:
                readers.get(kind, pipe.type)(key)
        values = pipe.execute()
    return {
        key: (kind, frozenset(value) if kind == "set" else (sorted(value) if kind == "zset" else value))
        for key, kind, value in zip(keys, kinds, values, strict=True)
    }


@dataclass(frozen=True)
class Delivery:
    source: str  # "local" | "primary"
    authorization: str | None  # None: no Authorization header
    body: bytes
    content_type: str = EVENTS_TYPE


class Updater:
    """The updater under test and the model it must match, one request at a time."""

    def __init__(self, settings: Settings, store: RedisIndexStore, client: redis.Redis, clock: list[float]) -> None:
        self.settings = settings
        self.clock = clock
        self.prefix = settings.redis.key_prefix
        self.store = store
        self.redis = client
        self.reset()

    def reset(self) -> None:
        """A fresh updater (no memory of event ids) on a freshly seeded index, and its model."""
        stale = list(self.redis.scan_iter(match=f"{self.prefix}*", count=1000))
        if stale:
            self.redis.delete(*stale)
        self.now = self.clock[0] = START
        self.store.apply(SEED)
        strings = {key: str(self.redis.get(key)) for key in (f"{self.prefix}epoch", f"{self.prefix}server")}
        strings = {key: value for key, value in strings.items() if value != "None"}
        self.model = IndexModel(self.prefix, strings.get(f"{self.prefix}epoch", "-"))
        self.model.strings = strings
        self.model.now = self.now
        self.model.apply(SEED)
        self.seen_ids: set[tuple[str, str]] = set()
        app = create_updater_app(self.settings, index=self.store, clock=lambda: self.now)
        self.client: FlaskClient = app.test_client()

    def deliver(self, delivery: Delivery) -> tuple[int, dict[str, Any]]:
        """Send, check the answer and the whole index against the model, and return the answer."""
        self.now += 1.0
        self.clock[0] = self.now
        headers = {"Content-Type": delivery.content_type}
        if delivery.authorization is not None:
            headers["Authorization"] = delivery.authorization
        response = self.client.post(f"/events/{delivery.source}", data=delivery.body, headers=headers)
        answer = response.get_json(silent=True) or {}
        expected_status, expected_answer = self.expect(delivery)
        assert response.status_code == expected_status, (response.status_code, answer)
        assert {key: answer.get(key) for key in expected_answer} == expected_answer
        assert redis_dump(self.redis, self.prefix) == self.model.dump(), "the index is not what the envelope says"
        return response.status_code, answer

    def expect(self, delivery: Delivery) -> tuple[int, dict[str, Any]]:
        """The updater's specified answer; applies the envelope's fresh events to the model."""
        if delivery.authorization != SECRETS[delivery.source]:
            return 401, {"status": "refused"}
        if len(delivery.body) > MAX_BODY:
            return 413, {"status": "refused"}
        try:
            raw_events = parse_envelope(delivery.body)
        except EnvelopeError:
            return 200, {"status": "ignored"}
        outcomes = interpret_events(raw_events, Source(delivery.source), self.now)
        self.model.now = self.now
        source = delivery.source  # event ids are remembered per endpoint
        fresh = [o for o in outcomes if o.event is None or not o.event.id or (source, o.event.id) not in self.seen_ids]
        self.model.apply(update for outcome in fresh for update in outcome.updates)
        self.seen_ids.update((source, o.event.id) for o in fresh if o.event is not None and o.event.id)
        counts = Counter(outcome.status for outcome in fresh)
        tally = {status: counts[status] for status in ("applied", "ignored", "malformed")}
        return 200, {"status": "ok", **tally, "duplicates": len(outcomes) - len(fresh)}


@pytest.fixture
def fuzz_settings(site_file: Callable[..., Path], redis_server: RedisServer) -> Settings:
    extra = f"""  socket_timeout: 5
updater:
  local_secret: "{SECRETS["local"]}"
  primary_secret: "{SECRETS["primary"]}"
  max_body_bytes: {MAX_BODY}
"""
    prefix = f"t{uuid.uuid4().hex[:12]}:"
    return load_settings(site_file(redis_url=redis_server.url, prefix=prefix, extra=extra), environ={})


@pytest.fixture
def updater(fuzz_settings: Settings) -> Iterator[Updater]:
    clock = [START]  # the index's clock, moved by the updater under test (stamps are then predictable)
    store = RedisIndexStore(fuzz_settings.redis, index_clock=lambda: clock[0])
    client = redis.Redis.from_url(fuzz_settings.redis.url, decode_responses=True)
    try:
        yield Updater(fuzz_settings, store, client, clock)
    finally:
        client.close()
        store.close()


# --- the bodies -----------------------------------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=8,
)


def mostly(*values: Any) -> st.SearchStrategy[Any]:
    """One of ``values`` most of the time, now and then any JSON scalar (a wrong type, a null)."""
    return st.one_of(st.sampled_from(values), st.sampled_from(values), st.sampled_from(values), json_scalars)


REPOSITORIES = ("group/app", "group/app", "x/y", "library/ubuntu", "Group/App", "a" * 256, "group//app", "")
DIGESTS = (digest(1), digest(1), digest(2), digest(3), "sha512:" + "5" * 128, "sha256:" + "1" * 63, "md5:00", "")
TAGS = ("v1", "v1", "v2", "latest", "", "-v1", "a" * 129, "v\u00fc")
TIMESTAMPS = (
    "2026-11-23T19:19:22.3Z",
    "2026-11-23T19:19:19Z",
    "2026-11-23T19:19:22.300123456Z",
    "2026-11-23T21:19:23+02:00",
    "2026-11-23T19:19:22",
    "2026-11-23T19:19:22.",
    "2026-11-23T19:21:00.5Z",
    "",
    "yesterday",
    "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59.999999999-23:59",
    "2026-13-01T00:00:00Z",
)
offsets = st.timedeltas(min_value=-timedelta(hours=23, minutes=59), max_value=timedelta(hours=23, minutes=59))
timestamps = st.one_of(
    st.sampled_from(TIMESTAMPS),
    st.sampled_from(TIMESTAMPS),
    st.datetimes(timezones=st.one_of(st.none(), st.just(UTC), st.builds(timezone, offsets))).map(
        lambda moment: moment.isoformat().replace("+00:00", "Z")
    ),
    json_scalars,
)
plausible_targets = st.fixed_dictionaries(
    {
        "repository": st.sampled_from(("group/app", "group/app", "x/y", "library/ubuntu")),
        "digest": st.sampled_from((digest(1), digest(2), digest(3), "sha512:" + "5" * 128)),
        "mediaType": st.sampled_from((BLOB, OCI, DOCKER)),
    },
    optional={"tag": st.sampled_from(("v1", "v1", "v2", "latest")), "size": st.integers(0, 10**6)},
)
# Distribution 3.0: every target field present, "" and 0 where there is no value (a DELETE by tag).
tag_deletes_v3 = st.fixed_dictionaries(
    {
        "repository": st.sampled_from(("group/app", "x/y")),
        "tag": st.sampled_from(("v1", "v2")),
        "digest": st.just(""),
        "mediaType": st.just(""),
        "size": st.just(0),
    }
)
# GitLab: a rename (its sample's full paths, or bare names), with actor.user and meta around it.
renames = st.fixed_dictionaries(
    {
        "repository": st.sampled_from(("group/app", "group", "x/y")),
        "rename": st.fixed_dictionaries(
            {
                "type": st.sampled_from(("name", "namespace", "other")),
                "from": st.sampled_from(("group/app", "app", "group", "")),
                "to": st.sampled_from(("group/web", "web", "team", "team/app", "")),
            }
        ),
    }
)
plausible_events = st.one_of(
    st.fixed_dictionaries(
        {"action": st.sampled_from(("push", "push", "push", "mount", "delete", "pull")), "target": plausible_targets},
        optional={"id": st.sampled_from(("e1", "e2", "e3")), "timestamp": st.sampled_from(TIMESTAMPS)},
    ),
    st.fixed_dictionaries(
        {"action": st.just("delete"), "target": tag_deletes_v3},
        optional={"id": st.sampled_from(("e1", "e4")), "timestamp": st.sampled_from(TIMESTAMPS)},
    ),
    st.fixed_dictionaries(
        {"action": st.just("rename"), "target": renames},
        optional={
            "id": st.sampled_from(("e1", "e5")),
            "actor": st.just({"name": "root", "user_type": "personal_access_token", "user": "eyJhbGciOi.e30.sig"}),
            "meta": json_values,
        },
    ),
)
odd_targets = st.fixed_dictionaries(
    {"repository": mostly(*REPOSITORIES), "digest": mostly(*DIGESTS), "mediaType": mostly(BLOB, OCI, DOCKER, "")},
    optional={"tag": mostly(*TAGS), "size": json_scalars, "fromRepository": mostly(*REPOSITORIES)},
)
odd_events = st.one_of(
    st.fixed_dictionaries(
        {
            "action": mostly("push", "push", "mount", "delete", "pull", "teleport", "PUSH"),
            "target": st.one_of(plausible_targets, odd_targets, odd_targets, json_values),
        },
        optional={"id": mostly("e1", "e2", "e3", ""), "timestamp": timestamps, "request": json_values},
    ),
    st.fixed_dictionaries(
        {}, optional={"id": mostly("e1", "e2"), "action": mostly("push", "delete"), "target": json_values}
    ),
    json_values,
)
events = st.one_of(plausible_events, plausible_events, odd_events)
envelopes = st.fixed_dictionaries({"events": st.lists(events, min_size=1, max_size=8)}, optional={"extra": json_values})


@st.composite
def encoded(draw: st.DrawFn, values: st.SearchStrategy[Any]) -> bytes:
    """JSON as a registry sends it (compact UTF-8), or indented, escaped, or in UTF-16/32 (also JSON)."""
    text = json.dumps(draw(values), ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from((None, None, 2))))
    return text.encode(draw(st.sampled_from(("utf-8", "utf-8", "utf-8", "utf-16", "utf-32"))))


@st.composite
def truncated(draw: st.DrawFn) -> bytes:
    body = draw(encoded(envelopes))
    return body[: draw(st.integers(0, len(body)))]


@st.composite
def padded(draw: st.DrawFn) -> bytes:
    """An envelope padded with whitespace to just under, at, or just over the size limit."""
    body = draw(encoded(envelopes))
    size = draw(st.sampled_from((MAX_BODY - 1, MAX_BODY, MAX_BODY + 1, MAX_BODY + 4096)))
    return body + b" " * max(0, size - len(body))


# Nesting near the interpreter's recursion limit (about 1,000) parses or not by how deep the caller's own
# stack is, so the test (shallower than Flask's view) could not predict it; both answers are 200 anyway.
nested = st.one_of(st.integers(1, 200), st.integers(2_000, 8_000)).flatmap(
    lambda depth: st.sampled_from(
        (b'{"events": [' + b"[" * depth + b"]" * depth + b"]}", b"[" * depth, b'{"events": [{"target": ' * depth)
    )
)
bodies = st.one_of(
    st.binary(max_size=300),
    encoded(json_values),
    encoded(st.fixed_dictionaries({"events": json_values})),
    encoded(envelopes),
    encoded(envelopes),
    encoded(envelopes),
    truncated(),
    padded(),
    nested,
)


def authorizations(source: str) -> st.SearchStrategy[str | None]:
    right, other = SECRETS[source], SECRETS["primary" if source == "local" else "local"]
    spoofed = (
        None,
        "",
        other,
        right + " ",
        " " + right,
        right[:-1],
        right + "0",
        right.upper(),
        right.removeprefix("Bearer "),
        f"{right}, {right}",
        "Basic " + right,
        right + "\x00",
    )
    garbage = st.text(st.characters(codec="latin-1", exclude_characters="\r\n"), max_size=40)
    return st.one_of(st.just(right), st.just(right), st.just(right), st.just(right), st.sampled_from(spoofed), garbage)


@st.composite
def deliveries(draw: st.DrawFn) -> Delivery:
    source = draw(st.sampled_from(("local", "primary")))
    return Delivery(
        source=source,
        authorization=draw(authorizations(source)),
        body=draw(bodies),
        content_type=draw(
            st.sampled_from(
                (EVENTS_TYPE, EVENTS_TYPE, EVENTS_V2_TYPE, EVENTS_V2_TYPE, "application/json", "text/plain", "")
            )
        ),
    )


# --- the tests ------------------------------------------------------------------------------------------


def test_fuzzed_deliveries_get_specified_answers_and_apply_whole_envelopes_or_nothing(updater: Updater) -> None:
    tally: Counter[str] = Counter()

    @hypothesis_settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )
    @given(sequence=st.lists(deliveries(), min_size=1, max_size=3))
    def check(sequence: list[Delivery]) -> None:
        updater.reset()
        for delivery in sequence:
            status, answer = updater.deliver(delivery)
            tally[f"{status} {answer.get('status')}"] += 1
            tally["events applied"] += answer.get("applied", 0)
            tally["duplicates"] += answer.get("duplicates", 0)

    check()
    for outcome in ("200 ok", "200 ignored", "401 refused", "413 refused", "events applied", "duplicates"):
        assert tally[outcome] > 0, (outcome, tally)


def envelope(source: str) -> dict[str, Any]:
    """A multi-event envelope touching every kind of key, with a non-ASCII field to cut through."""

    def event(n: int, action: str, **target: Any) -> dict[str, Any]:
        stamp = f"2026-11-23T19:19:{30 + n}.123456789Z"
        return {"id": f"{source}-{n}", "timestamp": stamp, "action": action, "target": target}

    return {
        "events": [
            event(0, "push", repository="group/app", digest=digest(4), mediaType=BLOB, size=3),
            event(1, "push", repository="group/app", digest=digest(5), mediaType=OCI, tag="v1"),
            event(2, "mount", repository="x/y", digest=digest(4), mediaType=BLOB, fromRepository="group/app"),
            event(3, "delete", repository="group/app", digest=digest(1)),
            event(4, "delete", repository="group/app", tag="v1"),
            event(5, "push", repository="x/y", digest=digest(6), mediaType=DOCKER, tag="v2"),
            event(6, "push", repository="group/app", digest=digest(7), mediaType=OCI, tag="caf\u00e9"),
            event(7, "pull", repository="group/app", digest=digest(5), mediaType=OCI, tag="v1"),
            event(8, "delete", repository="x/y", digest="", mediaType="", size=0, tag="v2"),
            event(9, "rename", repository="x/y", rename={"type": "name", "from": "x/y", "to": "x/z"}),
        ]
    }


@pytest.mark.parametrize("source", ["local", "primary"])
@pytest.mark.parametrize("indent", [None, 2], ids=["compact", "indented"])
def test_every_truncation_of_an_envelope_changes_nothing(updater: Updater, source: str, indent: int | None) -> None:
    body = json.dumps(envelope(source), ensure_ascii=False, indent=indent).encode() + b"\n"
    whole = len(body.rstrip())
    seeded = redis_dump(updater.redis, updater.prefix)
    for cut in range(len(body) + 1):  # deliver() checks the index against the model after each one
        status, answer = updater.deliver(Delivery(source, SECRETS[source], body[:cut]))
        assert (status, answer["status"]) == (200, "ignored" if cut < whole else "ok"), cut
    assert answer["duplicates"] > 0, "the last delivery repeats the whole envelope"
    assert redis_dump(updater.redis, updater.prefix) != seeded, "the whole envelope changed the index"


@pytest.mark.parametrize("source", ["local", "primary"])
def test_spoofed_secrets_are_refused_and_change_nothing(updater: Updater, source: str) -> None:
    right, other = SECRETS[source], SECRETS["primary" if source == "local" else "local"]
    body = json.dumps(envelope(source)).encode()
    for spoofed in (None, "", other, right.lower(), right[:-1], right + "\t", "x" + right, right.encode().hex()):
        assert updater.deliver(Delivery(source, spoofed, body))[0] == 401, spoofed
    assert updater.deliver(Delivery(source, right, body))[1]["applied"] > 0


def test_oversized_bodies_are_refused_whatever_their_length_header_says(updater: Updater) -> None:
    body = json.dumps(envelope("local")).encode()
    exactly = body + b" " * (MAX_BODY - len(body))
    headers = {"Authorization": SECRETS["local"], "Content-Type": EVENTS_TYPE}
    before = redis_dump(updater.redis, updater.prefix)
    for data, environ in [
        (exactly + b" ", {}),  # one byte too many
        (body, {"CONTENT_LENGTH": str(MAX_BODY + 1)}),  # a length header saying too many
        (exactly + b" " * 4096, {"CONTENT_LENGTH": None, "wsgi.input_terminated": True}),  # chunked: no length
    ]:
        response = updater.client.post("/events/local", data=data, headers=headers, environ_overrides=environ)
        assert response.status_code == 413, (len(data), environ)
        assert redis_dump(updater.redis, updater.prefix) == before
    assert updater.deliver(Delivery("local", SECRETS["local"], exactly))[1]["applied"] > 0


@pytest.mark.parametrize(
    "body", [b"[" * 5000, b'{"events": [' + b"[" * 5000 + b"]" * 5000 + b"]}"], ids=["open", "closed"]
)
def test_json_nested_too_deeply_is_not_an_envelope(updater: Updater, body: bytes) -> None:
    """It once made the decoder raise RecursionError: a 500, which blocks the registry's queue forever."""
    assert updater.deliver(Delivery("local", SECRETS["local"], body))[1]["status"] == "ignored"
