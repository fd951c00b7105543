"""The index updater's endpoints with a real redis-server: answers, hostile bodies, idempotence."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from support import RedisServer

from geo_route.config import Settings, load_settings
from geo_route.index.model import IndexQuery, PrimaryTag, QueryKind
from geo_route.index.redis_store import RedisIndexStore
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
    client = redis.Redis.from_url(settings.redis.url)
    keys = sorted(client.scan_iter(match=f"{settings.redis.key_prefix}*"))
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
