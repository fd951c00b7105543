"""The index updater's endpoints with a real redis-server: answers, hostile bodies, idempotence."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from support import RedisServer
from test_notifications import (
    APP,
    CAPTURED,
    DIGESTS,
    EVENTS_V1,
    EVENTS_V2,
    OTHER,
    USER_JWT,
    captured,
    expected_updates,
    gitlab_event,
)

from geo_route.config import Settings, load_settings
from geo_route.index.model import IndexQuery, PrimaryTag, QueryKind
from geo_route.index.redis_store import RedisIndexStore
from geo_route.updater.notifications import Source
from geo_route.web.updater import RecentEventIds, create_updater_app

LOCAL_SECRET = "Bearer local-secret-0123456789"
PRIMARY_SECRET = "Bearer primary-secret-0123456789"
OCI = "application/vnd.oci.image.manifest.v1+json"
UPDATER = f"""
updater:
  local_secret: "{LOCAL_SECRET}"
  primary_secret: "{PRIMARY_SECRET}"
"""


def digest(n: int) -> str:
    return f"sha256:{n:064x}"


def push(repository: str, n: int, tag: str = "", media_type: str = OCI, event_id: str = "") -> dict[str, Any]:
    target: dict[str, Any] = {"repository": repository, "digest": digest(n), "mediaType": media_type}
    if tag:
        target["tag"] = tag
    return {
        "id": event_id or f"e-{repository}-{n}-{tag}",
        "timestamp": "2026-11-23T19:19:22.3Z",
        "action": "push",
        "target": target,
    }


@pytest.fixture
def updater_settings(site_file: Callable[..., Path], redis_server: RedisServer, redis_settings: Settings) -> Settings:
    path = site_file(redis_url=redis_server.url, prefix=redis_settings.redis.key_prefix, extra=UPDATER)
    return load_settings(path, environ={})


@pytest.fixture
def app(updater_settings: Settings) -> Flask:
    return create_updater_app(updater_settings)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def send(client: FlaskClient, source: str, body: Any, secret: str | None = None) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/vnd.docker.distribution.events.v1+json"}
    headers["Authorization"] = secret if secret is not None else (LOCAL_SECRET if source == "local" else PRIMARY_SECRET)
    response = client.post(f"/events/{source}", data=data, headers=headers)
    return response.status_code, response.get_json(silent=True) or {}


def snapshot(settings: Settings) -> dict[str, Any]:
    """The index's state: every key but ``status`` (when the last envelope arrived and its lag, for
    ``geo-route status``: bookkeeping that a replay rightly updates, not what the index says)."""
    client = redis.Redis.from_url(settings.redis.url)
    status = f"{settings.redis.key_prefix}status".encode()
    keys = sorted(key for key in client.scan_iter(match=f"{settings.redis.key_prefix}*") if key != status)
    state = {key: client.dump(key) for key in keys}
    client.close()
    return state


def test_local_push_events_mark_presence(client: FlaskClient, updater_settings: Settings) -> None:
    body = {"events": [push("group/app", 1, media_type="application/octet-stream"), push("group/app", 2, tag="v1")]}
    assert send(client, "local", body) == (
        200,
        {"status": "ok", "applied": 2, "ignored": 0, "malformed": 0, "duplicates": 0},
    )
    store = RedisIndexStore(updater_settings.redis)
    assert store.lookup(IndexQuery(QueryKind.BLOB, "group/app", digest(1))).present
    assert store.lookup(IndexQuery(QueryKind.MANIFEST, "group/app", digest(2))).present
    assert store.local_tags("group/app") == {"v1": digest(2)}


def test_a_primary_push_invalidates_the_tag_and_queues_its_resolution(
    client: FlaskClient, updater_settings: Settings
) -> None:
    store = RedisIndexStore(updater_settings.redis)
    store.apply([PrimaryTag("group/app", "v1", digest(6), store.now())])
    assert send(client, "primary", {"events": [push("group/app", 7, tag="v1")]})[0] == 200
    assert store.primary_tag("group/app", "v1") is None, "an event is a hint: the old pin is gone, nothing pinned"
    (resolution,) = store.claim_resolutions(10)
    assert (resolution.repository, resolution.tag, resolution.hint) == ("group/app", "v1", digest(7))
    store.close()


@pytest.mark.parametrize("secret", ["", "Bearer wrong", PRIMARY_SECRET, LOCAL_SECRET + " "])
def test_wrong_secret_is_401(client: FlaskClient, updater_settings: Settings, secret: str) -> None:
    before = snapshot(updater_settings)
    assert send(client, "local", {"events": [push("group/app", 1)]}, secret=secret)[0] == 401
    assert snapshot(updater_settings) == before


def test_oversized_body_is_413(client: FlaskClient, updater_settings: Settings) -> None:
    before = snapshot(updater_settings)
    assert send(client, "local", b"{" + b" " * (10 * 1024 * 1024) + b"}")[0] == 413
    assert snapshot(updater_settings) == before


@pytest.mark.parametrize(
    "body",
    [b'{"events": [{"action": "push", "target": {"repos', b"not json", b'{"events": "many"}', b"[1, 2]"],
    ids=["truncated", "not-json", "events-not-a-list", "not-an-object"],
)
def test_bodies_that_are_not_envelopes_are_acknowledged_and_change_nothing(
    client: FlaskClient, updater_settings: Settings, body: bytes
) -> None:
    before = snapshot(updater_settings)
    status, answer = send(client, "local", body)
    assert (status, answer["status"]) == (200, "ignored")
    assert snapshot(updater_settings) == before


def test_bad_events_are_counted_and_good_ones_applied(client: FlaskClient, updater_settings: Settings) -> None:
    body = {
        "events": [
            {"action": "push", "target": {"repository": 5, "digest": digest(1)}},  # wrong type
            {"action": "teleport", "target": {"repository": "group/app", "digest": digest(1)}},  # unknown action
            {"action": "push", "target": {"repository": "group/app"}},  # missing digest
            {"action": "push"},  # missing target
            push("group/app", 3, tag="v3"),
        ]
    }
    status, answer = send(client, "local", body)
    assert (status, answer["applied"], answer["ignored"], answer["malformed"]) == (200, 1, 1, 3)
    assert RedisIndexStore(updater_settings.redis).local_tags("group/app") == {"v3": digest(3)}
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'geo_route_events_total{action="push",outcome="malformed",source="local"} 3.0' in metrics
    assert 'geo_route_events_total{action="teleport",outcome="ignored",source="local"} 1.0' in metrics


def test_ten_thousand_events_in_one_envelope(client: FlaskClient, updater_settings: Settings) -> None:
    events = [push("group/big", n, media_type="application/octet-stream") for n in range(10_000)]
    status, answer = send(client, "local", {"events": events})
    assert (status, answer["applied"]) == (200, 10_000)
    blobs, _ = RedisIndexStore(updater_settings.redis).local_snapshot("group/big")
    assert len(blobs) == 10_000


def test_the_same_envelope_twice_leaves_the_same_state(updater_settings: Settings) -> None:
    body = {
        "events": [
            push("group/app", 1, tag="v1"),
            push("group/app", 2, media_type="application/octet-stream"),
            {"id": "d", "action": "delete", "target": {"repository": "group/app", "tag": "old"}},
        ]
    }
    first = create_updater_app(updater_settings).test_client()  # separate apps: no id memory shared
    assert send(first, "local", body)[0] == 200
    state = snapshot(updater_settings)
    second = create_updater_app(updater_settings).test_client()
    assert send(second, "local", body)[0] == 200
    assert snapshot(updater_settings) == state


def test_redelivered_events_are_skipped_by_id(client: FlaskClient) -> None:
    body = {"events": [push("group/app", 1, tag="v1")]}
    assert send(client, "local", body)[1]["duplicates"] == 0
    assert send(client, "local", body)[1]["duplicates"] == 1
    assert 'geo_route_event_duplicates_total{source="local"} 1.0' in client.get("/metrics").get_data(as_text=True)


def test_redis_down_is_503_so_the_registry_retries(tmp_path: Path, site_file: Callable[..., Path]) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        settings = load_settings(site_file(redis_url=server.url, extra=UPDATER), environ={})
        client = create_updater_app(settings).test_client()
        server.stop()
        body = {"events": [push("group/app", 1, tag="v1")]}
        assert send(client, "local", body)[0] == 503
        assert client.get("/readyz").status_code == 503
        restarted = RedisServer(tmp_path / "redis2")
        restarted.port = server.port
        restarted.start()
        try:
            status, answer = send(client, "local", body)  # the retry: not mistaken for a duplicate
            assert (status, answer["applied"]) == (200, 1)
        finally:
            restarted.stop()
    finally:
        server.stop()


def test_the_dedupe_window_is_bounded() -> None:
    recent = RecentEventIds(1_000)
    for start in range(0, 100_000, 500):
        recent.remember([f"event-{n}" for n in range(start, start + 500)])
    assert len(recent) == 1_000
    assert recent.seen("event-99999") and not recent.seen("event-98999")


# -- every dialect's real envelopes, posted with their own Content-Type -----------------------------------


@pytest.mark.parametrize("dialect", sorted(CAPTURED))
def test_captured_envelopes_are_accepted_with_their_media_type_and_applied(
    client: FlaskClient, updater_settings: Settings, dialect: str
) -> None:
    """Each file as the registry delivered it (2.8: ``events.v1+json``, 3.0: ``events.v2+json``), to
    both endpoints: every event is applied (or deliberately ignored), and the index ends as the
    captured sequence leaves the registry."""
    content_type, files = CAPTURED[dialect]
    d = DIGESTS[dialect]
    for name, operation in files:
        _, body = captured(dialect, name)
        for source in ("local", "primary"):
            secret = LOCAL_SECRET if source == "local" else PRIMARY_SECRET
            headers = {"Content-Type": content_type, "Authorization": secret}
            response = client.post(f"/events/{source}", data=body, headers=headers)
            expected = expected_updates(dialect, operation, Source(source))
            counts = {"applied": 1 if expected else 0, "ignored": 0 if expected else 1, "malformed": 0}
            assert response.status_code == 200, (name, source)
            assert response.get_json() == {"status": "ok", **counts, "duplicates": 0}, (name, source)
    store = RedisIndexStore(updater_settings.redis)
    assert store.local_snapshot(APP) == ({d["config"]}, {d["untagged"]}), "the layer and the v1/v2 manifest deleted"
    assert store.local_snapshot(OTHER) == ({d["layer"]}, set()), "mounted, never deleted there"
    assert store.local_tags(APP) == {}, "v1 and v2 untagged (3.0: one by DELETE by tag, one by the digest delete)"
    assert store.deleted_digests(APP) == {d["tagged"], d["layer"]}, "deleted at the primary"
    assert store.primary_tags(APP) == {}, "no event is pinned: tombstones only"
    queued = {(r.repository, r.tag) for r in store.claim_resolutions(10)}
    assert queued == {(APP, "v1"), (APP, "v2")}, "every tag an event named is re-resolved at the primary"
    assert store.lookup(IndexQuery(QueryKind.MANIFEST, APP, d["untagged"])).present
    assert not store.lookup(IndexQuery(QueryKind.MANIFEST, APP, d["tagged"])).present
    store.close()


@pytest.mark.parametrize("content_type", [EVENTS_V1, EVENTS_V2, "application/json", "text/plain", ""])
def test_the_content_type_is_not_what_decides(
    client: FlaskClient, updater_settings: Settings, content_type: str
) -> None:
    """A registry that sends v2 (or a proxy that rewrites the type) is neither refused nor ignored."""
    body = json.dumps({"events": [push("group/app", 1, tag="v1")]}).encode()
    response = client.post(
        "/events/local", data=body, headers={"Content-Type": content_type, "Authorization": LOCAL_SECRET}
    )
    assert (response.status_code, response.get_json()["applied"]) == (200, 1)
    assert RedisIndexStore(updater_settings.redis).local_tags("group/app") == {"v1": digest(1)}


# -- GitLab: rename, actor.user ------------------------------------------------------------------------------


def test_a_local_rename_drops_presence_under_the_old_path_and_below(
    client: FlaskClient, updater_settings: Settings
) -> None:
    """GitLab's registry at the site renamed foo/foo/project (and foo/foo/project/cache with it): the
    index must stop sending those paths' digests and tags to it; other paths keep theirs."""
    blob = "application/octet-stream"
    setup = [
        push("foo/foo/project", 1, media_type=blob),
        push("foo/foo/project", 2, tag="v1"),
        push("foo/foo/project/cache", 3, tag="c1"),
        push("foo/foo/project-other", 4, tag="v1"),
        push("foo/bar/project", 5, tag="new"),  # pushed under the new path before the event arrived
    ]
    assert send(client, "local", {"events": setup})[1]["applied"] == 5
    rename = gitlab_event(
        "rename", "foo/foo/project", rename={"type": "namespace", "from": "foo/foo/project", "to": "foo/bar/project"}
    )
    assert send(client, "local", {"events": [rename]})[1]["applied"] == 1
    store = RedisIndexStore(updater_settings.redis)
    for path in ("foo/foo/project", "foo/foo/project/cache"):
        assert store.local_snapshot(path) == (set(), set()) and store.local_tags(path) == {}, path
    assert not store.lookup(IndexQuery(QueryKind.BLOB, "foo/foo/project", digest(1))).present
    assert store.local_tags("foo/foo/project-other") == {"v1": digest(4)}, "a sibling is not under the path"
    assert store.local_tags("foo/bar/project") == {"new": digest(5)}, "the new path keeps what its events said"
    store.close()


def test_a_primary_rename_invalidates_pins_under_both_paths(client: FlaskClient, updater_settings: Settings) -> None:
    store = RedisIndexStore(updater_settings.redis)
    now = store.now()
    pins = [("foo/foo/project", "v1"), ("foo/foo/project/cache", "c1"), ("foo/bar/project", "old")]
    store.apply([PrimaryTag(repository, tag, digest(9), now) for repository, tag in pins])
    store.apply([PrimaryTag("foo/foo/project-other", "v1", digest(9), now)])
    rename = gitlab_event(
        "rename", "foo/foo/project", rename={"type": "namespace", "from": "foo/foo/project", "to": "foo/bar/project"}
    )
    assert send(client, "primary", {"events": [rename]})[1]["applied"] == 1
    for repository, tag in pins:
        assert store.primary_tag(repository, tag) is None, (repository, tag)
    assert store.primary_tag("foo/foo/project-other", "v1") is not None
    store.close()


def test_actor_user_is_never_logged_or_stored(
    client: FlaskClient, updater_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """GitLab's ``actor.user`` is a JWT the registry signed: after envelopes carrying it in every
    event (applied, malformed, unknown, not an envelope at all) it is in no log line (at any level),
    no Redis key or value, no answer and no metric."""
    caplog.set_level(logging.DEBUG)
    events = [
        gitlab_event("push", "foo/project", mediaType=EVENTS_V1, digest=digest(1), tag="v1"),
        gitlab_event("delete", "foo/project", digest=digest(1)),
        gitlab_event("rename", "foo/project", rename={"type": "name", "from": "project", "to": "renamed"}),
        gitlab_event("rename", "foo/project", rename={"type": "teleport", "from": "a", "to": "b"}),  # malformed
        gitlab_event("push", "Foo/Project", digest=digest(1)),  # malformed
        gitlab_event("teleport", "foo/project", digest=digest(1)),  # unknown
        gitlab_event("push", "foo/project", digest="sha256:short", tag="v1"),  # malformed
    ]
    answers = []
    for source in ("local", "primary"):
        answers.append(send(client, source, {"events": events}))
        answers.append(send(client, source, json.dumps({"events": events}).encode()[:-3]))  # not an envelope
    answers.append((0, {"metrics": client.get("/metrics").get_data(as_text=True)}))
    assert all(USER_JWT not in json.dumps(answer) for answer in answers)
    assert USER_JWT not in caplog.text
    assert any("malformed" in record.getMessage() for record in caplog.records), "the bad events were logged"
    with redis.Redis.from_url(updater_settings.redis.url) as raw:
        dump = repr(sorted((key, raw.dump(key)) for key in raw.scan_iter(match="*")))
    assert USER_JWT.encode() not in dump.encode() and "eyJ" not in dump


def test_metrics_say_when_the_index_cannot_be_read_at_scrape_time(settings: Settings) -> None:
    """``settings``' Redis is a closed port: the queue gauges are left out, ``geo_route_index_up`` is 0."""
    text = create_updater_app(settings).test_client().get("/metrics").get_data(as_text=True)
    assert "\ngeo_route_index_up 0.0\n" in text
    assert "geo_route_resolution_queue" not in text and "geo_route_last_reconcile" not in text
    assert "# TYPE geo_route_envelopes_rejected" in text  # the process's own metrics are still there
