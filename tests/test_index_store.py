"""The index store contract, against a real redis-server the fixtures start on a free port."""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Iterator

import pytest
import redis
from support import RedisServer

from geo_route.config import Settings
from geo_route.errors import IndexUnavailable
from geo_route.index.model import BlobPresence, IndexQuery, IndexView, LocalTag, ManifestPresence, PrimaryTag, QueryKind
from geo_route.index.redis_store import RedisIndexStore

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


@pytest.fixture
def store(redis_settings: Settings) -> Iterator[RedisIndexStore]:
    store = RedisIndexStore(redis_settings.redis)
    yield store
    store.close()


def blob(repository: str, digest: str) -> IndexQuery:
    return IndexQuery(QueryKind.BLOB, repository, digest)


def manifest(repository: str, digest: str) -> IndexQuery:
    return IndexQuery(QueryKind.MANIFEST, repository, digest)


def tag(repository: str, name: str) -> IndexQuery:
    return IndexQuery(QueryKind.TAG, repository, name)


def test_empty_index_knows_nothing(store: RedisIndexStore) -> None:
    assert store.lookup(blob("a/b", D1)) == IndexView(present=False)
    assert store.lookup(manifest("a/b", D1)) == IndexView(present=False)
    assert store.lookup(tag("a/b", "v1")) == IndexView()


def test_blob_presence_is_per_repository(store: RedisIndexStore) -> None:
    store.apply([BlobPresence("a/b", D1, True)])
    assert store.lookup(blob("a/b", D1)).present
    assert not store.lookup(blob("a/c", D1)).present
    assert not store.lookup(manifest("a/b", D1)).present, "a blob is not a manifest"
    store.apply([BlobPresence("a/b", D1, False)])
    assert not store.lookup(blob("a/b", D1)).present


def test_manifest_presence(store: RedisIndexStore) -> None:
    store.apply([ManifestPresence("a/b", D1, True)])
    assert store.lookup(manifest("a/b", D1)).present
    assert not store.lookup(blob("a/b", D1)).present
    store.apply([ManifestPresence("a/b", D1, False)])
    assert not store.lookup(manifest("a/b", D1)).present


def test_pinned_tag_reports_digest_time_and_local_presence(store: RedisIndexStore) -> None:
    confirmed = time.time()
    store.apply([PrimaryTag("a/b", "v1", D1, confirmed)])
    view = store.lookup(tag("a/b", "v1"))
    assert (view.pinned_digest, view.present) == (D1, False)
    assert view.confirmed_at == pytest.approx(confirmed, abs=0.001)
    store.apply([ManifestPresence("a/b", D1, True)])
    assert store.lookup(tag("a/b", "v1")).present


def test_moving_a_tag_on_the_primary_changes_the_pin(store: RedisIndexStore) -> None:
    store.apply([ManifestPresence("a/b", D1, True), PrimaryTag("a/b", "v1", D1, 1.0)])
    store.apply([PrimaryTag("a/b", "v1", D2, 2.0)])
    view = store.lookup(tag("a/b", "v1"))
    assert (view.pinned_digest, view.present, view.confirmed_at) == (D2, False, 2.0)


def test_deleting_a_primary_tag_unpins_it(store: RedisIndexStore) -> None:
    store.apply([PrimaryTag("a/b", "v1", D1, 1.0)])
    store.apply([PrimaryTag("a/b", "v1", "", 2.0)])
    assert store.lookup(tag("a/b", "v1")) == IndexView()


def test_local_tags_are_kept_apart_from_primary_tags(store: RedisIndexStore) -> None:
    store.apply([LocalTag("a/b", "v1", D1), LocalTag("a/b", "v2", D2)])
    assert store.local_tags("a/b") == {"v1": D1, "v2": D2}
    assert store.lookup(tag("a/b", "v1")) == IndexView(), "a local tag never pins a request"
    store.apply([LocalTag("a/b", "v1", "")])
    assert store.local_tags("a/b") == {"v2": D2}


def test_repositories_are_recorded(store: RedisIndexStore) -> None:
    store.apply([BlobPresence("a/b", D1, True), PrimaryTag("c/d", "v1", D1, 1.0)])
    assert store.repositories() == {"a/b", "c/d"}


def test_applying_the_same_updates_twice_changes_nothing(store: RedisIndexStore, redis_settings: Settings) -> None:
    updates = [
        BlobPresence("a/b", D1, True),
        ManifestPresence("a/b", D2, True),
        PrimaryTag("a/b", "v1", D2, 5.0),
        LocalTag("a/b", "v1", D2),
    ]
    client = redis.Redis.from_url(redis_settings.redis.url, decode_responses=True)

    def snapshot() -> dict[str, object]:
        keys = sorted(client.scan_iter(match=f"{redis_settings.redis.key_prefix}*"))
        return {key: client.dump(key) for key in keys}

    store.apply(updates)
    first = snapshot()
    store.apply(updates)
    assert snapshot() == first
    assert len(first) == 5
    client.close()


def test_apply_is_all_or_nothing(store: RedisIndexStore) -> None:
    class NotAnUpdate:
        repository = "a/b"

    with pytest.raises(TypeError):
        store.apply([BlobPresence("a/b", D1, True), NotAnUpdate()])  # type: ignore[list-item]
    assert not store.lookup(blob("a/b", D1)).present


def test_key_prefixes_isolate_sites(store: RedisIndexStore, redis_settings: Settings) -> None:
    other = RedisIndexStore(dataclasses.replace(redis_settings.redis, key_prefix="other-site:"))
    store.apply([BlobPresence("a/b", D1, True)])
    assert not other.lookup(blob("a/b", D1)).present
    other.close()


def test_a_stopped_redis_makes_the_index_unavailable_fast(
    tmp_path_factory: pytest.TempPathFactory, redis_settings: Settings
) -> None:
    server = RedisServer(tmp_path_factory.mktemp("redis-stopped")).start()
    try:
        settings = dataclasses.replace(redis_settings.redis, url=server.url, unavailable_cooldown=0.2)
        store = RedisIndexStore(settings)
        store.apply([BlobPresence("a/b", D1, True)])
        assert store.ping()
        server.stop()
        started = time.monotonic()
        with pytest.raises(IndexUnavailable):
            store.lookup(blob("a/b", D1))
        with pytest.raises(IndexUnavailable):  # within the cooldown: not even tried
            store.lookup(blob("a/b", D1))
        with pytest.raises(IndexUnavailable):
            store.apply([BlobPresence("a/b", D2, True)])
        assert not store.ping()
        assert time.monotonic() - started < 1.0
        store.close()
    finally:
        server.stop()


def test_a_hung_redis_times_out_within_the_socket_timeout(
    tmp_path_factory: pytest.TempPathFactory, redis_settings: Settings
) -> None:
    server = RedisServer(tmp_path_factory.mktemp("redis-hung")).start()
    assert server.process is not None
    try:
        settings = dataclasses.replace(
            redis_settings.redis, url=server.url, socket_timeout=0.05, unavailable_cooldown=0
        )
        store = RedisIndexStore(settings)
        assert store.ping()
        server.process.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(IndexUnavailable):
            store.lookup(blob("a/b", D1))
        assert time.monotonic() - started < 0.5
        server.process.send_signal(signal.SIGCONT)
        store.close()
    finally:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGCONT)
        server.stop()


def test_an_older_primary_pin_never_overwrites_a_newer_one(store: RedisIndexStore) -> None:
    store.apply([PrimaryTag("a/b", "v1", D2, 20.0)])
    store.apply([PrimaryTag("a/b", "v1", D1, 10.0)])  # a late, older notification
    assert store.primary_tag("a/b", "v1") == (D2, 20.0)
    store.apply([PrimaryTag("a/b", "v1", "", 15.0)])  # an older delete
    assert store.primary_tag("a/b", "v1") == (D2, 20.0)
    store.apply([PrimaryTag("a/b", "v1", "", 25.0)])
    assert store.primary_tag("a/b", "v1") is None


def test_snapshots_and_locks(store: RedisIndexStore) -> None:
    store.apply([BlobPresence("a/b", D1, True), ManifestPresence("a/b", D2, True), PrimaryTag("a/b", "v1", D2, 3.0)])
    assert store.local_snapshot("a/b") == ({D1}, {D2})
    assert store.primary_tags("a/b") == {"v1": (D2, 3.0)}
    assert store.try_lock("reconcile", 30)
    assert not store.try_lock("reconcile", 30)
    store.unlock("reconcile")
    assert store.try_lock("reconcile", 30)


def test_a_lease_is_only_released_by_its_owner(store: RedisIndexStore, redis_settings: Settings) -> None:
    other = RedisIndexStore(redis_settings.redis)
    assert store.try_lock("job", 30)
    other.unlock("job")  # not its lease: nothing happens
    assert not other.try_lock("job", 30)
    store.unlock("job")
    assert other.try_lock("job", 30)
    store.unlock("job")  # ours expired/was released; the other's lease stays
    assert not store.try_lock("job", 30)
    other.close()
