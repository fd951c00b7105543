"""The index store contract, against a real redis-server the fixtures start on a free port, again
on a real Redis Sentinel topology (a primary, a replica, three sentinels) through
``redis.sentinels``, and on a real Redis Cluster (three primaries) through ``redis.cluster_nodes``;
a subset (``TLS_SUBSET``) also on a Sentinel topology with TLS everywhere (a throwaway CA made
here), an ACL user on the data nodes and a password on the sentinels (``sentinel-tls``). A test
that starts a redis-server of its own (to stop, hang or restart it) runs on that one only."""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import ipaddress
import re
import secrets
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.cluster
from conftest import access
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from support import RedisServer

from geo_route import contract
from geo_route.config import DEFAULT_REDIS_URL, RedisSettings, Settings, load_settings
from geo_route.devstack.processes import wait_until
from geo_route.devstack.redis_cluster import ClusterTopology
from geo_route.devstack.redis_server import RedisSecurity, SentinelTopology
from geo_route.errors import GeoRouteError, IndexUnavailable
from geo_route.index.model import (
    BlobPresence,
    ContentVerified,
    DigestDeleted,
    DigestRestored,
    IndexFigures,
    IndexQuery,
    IndexView,
    LocalRepositoryDropped,
    LocalTag,
    ManifestPresence,
    PrimaryTag,
    QueryKind,
    RepositoryInvalidated,
    StatusRecord,
    TagInvalidated,
    TagResolution,
)
from geo_route.index.redis_store import RedisIndexStore
from geo_route.status import format_status, gather_status
from geo_route.web import create_app
from geo_route.web.status import render_status_html

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
# What also runs through TLS, the ACL user and the sentinels' password: a lookup of each kind, a
# transaction, the claim and the leases (every kind of command the store sends).
TLS_SUBSET = {
    "test_empty_index_knows_nothing",
    "test_pinned_tag_reports_digest_time_and_local_presence",
    "test_apply_is_all_or_nothing",
    "test_a_claim_hides_the_tag_until_it_ends_and_its_pin_or_requeue_releases_it",
    "test_a_lease_is_only_released_by_its_owner",
    "test_a_refetch_is_queued_for_verification_once_and_served_after_it_matched",
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "redis_topology" in metafunc.fixturenames:
        own_server = "tmp_path_factory" in inspect.signature(metafunc.function).parameters
        tls = ["sentinel-tls"] if metafunc.function.__name__ in TLS_SUBSET else []
        metafunc.parametrize("redis_topology", ["single"] if own_server else ["single", "sentinel", "cluster", *tls])


def throwaway_tls(directory: Path) -> RedisSecurity:
    """A CA and a server certificate for 127.0.0.1 (what redis-py checks the host name against),
    made here with ``cryptography``; passwords for the ACL user and the sentinels."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "geo-route test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {name: directory / f"{name}.pem" for name in ("ca", "server", "server-key")}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["server"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    key = server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    paths["server-key"].write_bytes(key)
    paths["server-key"].chmod(0o600)
    return RedisSecurity(
        tls_cert=paths["server"],
        tls_key=paths["server-key"],
        tls_ca=paths["ca"],
        username="geo-route",
        password=secrets.token_hex(16),
        sentinel_password=secrets.token_hex(16),
    )


@pytest.fixture(scope="module")
def sentinel_topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelTopology]:
    topology = SentinelTopology(tmp_path_factory.mktemp("sentinel")).start()
    try:
        yield topology
    finally:
        topology.stop()


@pytest.fixture(scope="module")
def cluster_topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterTopology]:
    topology = ClusterTopology(tmp_path_factory.mktemp("cluster")).start()
    try:
        yield topology
    finally:
        topology.stop()


@pytest.fixture(scope="module")
def sentinel_tls_topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelTopology]:
    root = tmp_path_factory.mktemp("sentinel-tls")
    topology = SentinelTopology(root / "redis", security=throwaway_tls(root / "tls")).start()
    try:
        yield topology
    finally:
        topology.stop()


def sentinel_tls_yaml(topology: SentinelTopology) -> str:
    """The site file's redis section for ``topology``: TLS to the sentinels and the nodes, the
    sentinels' password, the nodes' ACL user."""
    security = topology.security
    return (
        f"  sentinels: [{', '.join(topology.sentinel_addresses)}]\n  master_name: {topology.master_name}\n"
        f'  sentinel_password: "{security.sentinel_password}"\n  sentinel_tls: true\n'
        f'  username: "{security.username}"\n  password: "{security.password}"\n  tls: true\n'
        f'  tls_ca_file: "{security.tls_ca}"\n'
    )


@pytest.fixture
def raw(redis_settings: Settings) -> Iterator[Any]:
    """A plain redis-py client of the test's own on the same Redis (a cluster client on a cluster)."""
    if redis_settings.redis.cluster_nodes:
        host, port = redis_settings.redis.cluster_nodes[0].split(":")
        client: Any = redis.cluster.RedisCluster(host=host, port=int(port), decode_responses=True)
    else:
        client = redis.Redis.from_url(redis_settings.redis.url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def redis_settings(redis_topology: str, site_file: Callable[..., Path], request: pytest.FixtureRequest) -> Settings:
    """Settings with a key prefix of this test's own: on the session's redis-server, or through the
    sentinels (``url`` then names the primary too, for the tests' own raw clients; the store does
    not use it)."""
    prefix = f"t{uuid.uuid4().hex[:12]}:"
    if redis_topology == "cluster":
        nodes = request.getfixturevalue("cluster_topology").addresses
        return load_settings(
            site_file(redis_url=DEFAULT_REDIS_URL, prefix=prefix, extra=f"  cluster_nodes: [{', '.join(nodes)}]\n"),
            environ={},
        )
    if redis_topology == "single":
        return load_settings(
            site_file(redis_url=request.getfixturevalue("redis_server").url, prefix=prefix), environ={}
        )
    if redis_topology == "sentinel-tls":
        topology: SentinelTopology = request.getfixturevalue("sentinel_tls_topology")
        extra = sentinel_tls_yaml(topology)
    else:
        topology = request.getfixturevalue("sentinel_topology")
        extra = f"  sentinels: [{', '.join(topology.sentinel_addresses)}]\n  master_name: {topology.master_name}\n"
    settings = load_settings(site_file(redis_url=DEFAULT_REDIS_URL, prefix=prefix, extra=extra), environ={})
    primary = topology.nodes[topology.master_part()].url
    return dataclasses.replace(settings, redis=dataclasses.replace(settings.redis, url=primary))


@pytest.fixture
def store(redis_settings: Settings) -> Iterator[RedisIndexStore]:
    store = RedisIndexStore(redis_settings.redis)
    yield store
    store.close()


def blob(repository: str, digest: str) -> IndexQuery:
    return IndexQuery(QueryKind.BLOB, repository, digest)


def manifest(repository: str, digest: str) -> IndexQuery:
    return IndexQuery(QueryKind.MANIFEST, repository, digest)


def tag(repository: str, name: str, refresh_after: float = 0.0) -> IndexQuery:
    return IndexQuery(QueryKind.TAG, repository, name, refresh_after)


def without_clock(view: IndexView) -> IndexView:
    return dataclasses.replace(view, now=0.0)


def test_empty_index_knows_nothing(store: RedisIndexStore) -> None:
    assert store.lookup(blob("a/b", D1)) == IndexView(present=False)
    assert store.lookup(manifest("a/b", D1)) == IndexView(present=False)
    view = store.lookup(tag("a/b", "v1"))
    assert without_clock(view) == IndexView()
    assert view.now == pytest.approx(time.time(), abs=5), "the index's clock (Redis TIME) comes with a tag view"


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


def test_deleting_a_primary_tag_leaves_a_tombstone(store: RedisIndexStore) -> None:
    store.apply([PrimaryTag("a/b", "v1", D1, 1.0)])
    store.apply([PrimaryTag("a/b", "v1", "", 2.0)])
    view = store.lookup(tag("a/b", "v1"))
    assert (view.pinned_digest, view.confirmed_at) == ("", 2.0)
    store.apply([PrimaryTag("a/b", "v1", D1, 1.5)])  # an older answer written after the delete
    assert store.primary_tag("a/b", "v1") is None, "an unpin leaves a trace: older facts lose to it"


def test_local_tags_are_kept_apart_from_primary_tags(store: RedisIndexStore) -> None:
    store.apply([LocalTag("a/b", "v1", D1), LocalTag("a/b", "v2", D2)])
    assert store.local_tags("a/b") == {"v1": D1, "v2": D2}
    assert without_clock(store.lookup(tag("a/b", "v1"))) == IndexView(), "a local tag never pins a request"
    store.apply([LocalTag("a/b", "v1", "")])
    assert store.local_tags("a/b") == {"v2": D2}


def test_repositories_are_recorded(store: RedisIndexStore) -> None:
    store.apply([BlobPresence("a/b", D1, True), PrimaryTag("c/d", "v1", D1, 1.0)])
    assert store.repositories() == {"a/b", "c/d"}


def test_applying_the_same_updates_twice_changes_nothing(
    store: RedisIndexStore, redis_settings: Settings, raw: Any
) -> None:
    updates = [
        BlobPresence("a/b", D1, True),
        ManifestPresence("a/b", D2, True),
        PrimaryTag("a/b", "v1", D2, 5.0),
        LocalTag("a/b", "v1", D2),
    ]

    def snapshot() -> dict[str, object]:
        keys = sorted(raw.scan_iter(match=f"{redis_settings.redis.key_prefix}*"))
        return {key: raw.dump(key) for key in keys}

    store.apply(updates)
    first = snapshot()
    store.apply(updates)
    assert snapshot() == first
    assert len(first) == 7  # the five written, and the epoch and its server (of a/b's bucket on a cluster)


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
    store.apply([PrimaryTag("a/b", "v1", D1, 10.0)])  # a late, older answer
    assert store.primary_tag("a/b", "v1") == (D2, 20.0)
    store.apply([PrimaryTag("a/b", "v1", "", 15.0)])  # an older delete
    assert store.primary_tag("a/b", "v1") == (D2, 20.0)
    store.apply([PrimaryTag("a/b", "v1", D1, 20.0)])  # a pin as old as what is held does not land
    assert store.primary_tag("a/b", "v1") == (D2, 20.0)
    store.apply([PrimaryTag("a/b", "v1", "", 20.0)])  # a tombstone as old as it does
    assert store.primary_tag("a/b", "v1") is None


@pytest.fixture
def clocked(redis_settings: Settings) -> Iterator[tuple[RedisIndexStore, list[float]]]:
    now = [1000.0]
    store = RedisIndexStore(redis_settings.redis, index_clock=lambda: now[0])
    yield store, now
    store.close()


def test_an_invalidation_tombstones_the_tag_on_the_index_clock_and_queues_it(
    clocked: tuple[RedisIndexStore, list[float]],
) -> None:
    store, now = clocked
    store.apply([ManifestPresence("a/b", D1, True), PrimaryTag("a/b", "v1", D1, 990.0)])
    store.apply([TagInvalidated("a/b", "v1", hint=D2)])
    view = store.lookup(tag("a/b", "v1"))
    assert (view.pinned_digest, view.confirmed_at) == ("", 1000.0)
    store.apply([PrimaryTag("a/b", "v1", D1, 999.0)])  # asked before the invalidation: loses
    assert store.primary_tag("a/b", "v1") is None
    now[0] = 1001.0
    (claimed,) = store.claim_resolutions(10)
    assert dataclasses.replace(claimed, epoch="") == TagResolution("a/b", "v1", 1001.0, D2, 0, claimed_until=1061.0)
    assert store.claim_resolutions(10) == [], "a claim hides it from other claims"
    store.apply([PrimaryTag("a/b", "v1", D2, 1001.0, "application/x-type", hint=f"{D2} 0")])
    view = store.lookup(tag("a/b", "v1"))
    assert (view.pinned_digest, view.confirmed_at, view.media_type, view.current) == (
        D2,
        1001.0,
        "application/x-type",
        True,
    )


def test_a_claim_hides_the_tag_until_it_ends_and_its_pin_or_requeue_releases_it(
    clocked: tuple[RedisIndexStore, list[float]],
) -> None:
    from geo_route.updater.registry_client import ManifestHead
    from geo_route.updater.resolver import judge

    store, now = clocked
    store.apply([TagInvalidated("a/b", tag) for tag in ("pinned", "requeued", "abandoned")])
    now[0] = 1001.0
    claimed = {r.tag: r for r in store.claim_resolutions(10, 30)}
    assert {r.claimed_until for r in claimed.values()} == {1031.0}
    now[0] = 1030.0
    assert store.claim_resolutions(10, 30) == [], "claimed: nobody else's to ask until the claim ends"
    assert store.queued_resolutions() == 3, "but still queued: a claim is not a removal"
    pin = judge(claimed["pinned"], ManifestHead(D1, "application/x-type")).pin
    assert pin is not None
    store.apply([pin])
    store.requeue(claimed["requeued"], 45.0)  # due at 1046, later than the claim's end
    now[0] = 1031.0
    assert [r.tag for r in store.claim_resolutions(10, 30)] == ["abandoned"], (
        "the claim nobody answered (its updater died) is due again at its end; the pinned one is gone"
    )
    now[0] = 1046.0
    assert [r.tag for r in store.claim_resolutions(10, 30)] == ["requeued"], "the requeue replaced its claim"


def test_an_invalidation_during_a_claim_keeps_the_tag_queued_after_the_answer(
    clocked: tuple[RedisIndexStore, list[float]],
) -> None:
    from geo_route.updater.registry_client import ManifestHead
    from geo_route.updater.resolver import judge

    store, now = clocked
    store.apply([TagInvalidated("a/b", "v1")])
    now[0] = 1001.0
    (claimed,) = store.claim_resolutions(10, 30)
    now[0] = 1005.0
    store.apply([TagInvalidated("a/b", "v1", hint=D2)])  # the tag moved while the question was out
    pin = judge(claimed, ManifestHead(D1, "application/x-type")).pin
    assert pin is not None
    store.apply([pin])  # asked before the invalidation: loses, and must not release the new queueing
    assert store.primary_tag("a/b", "v1") is None
    now[0] = 1006.0
    (again,) = store.claim_resolutions(10, 30)
    assert (again.tag, again.hint) == ("v1", D2), "queued for the invalidation's time, not the claim's end"


def test_a_fenced_invalidation_rejects_answers_until_the_fence_and_queues_after_it(
    clocked: tuple[RedisIndexStore, list[float]],
) -> None:
    store, now = clocked
    store.apply([TagInvalidated("a/b", "v1", fence=30.0)])
    now[0] = 1010.0
    assert store.claim_resolutions(10) == []
    store.apply([PrimaryTag("a/b", "v1", D1, 1010.0)])
    assert store.primary_tag("a/b", "v1") is None, "an answer asked while the write may be in flight"
    store.apply([TagInvalidated("a/b", "v1")])  # an event during the fence keeps the fence
    assert store.lookup(tag("a/b", "v1")).confirmed_at == 1030.0
    now[0] = 1031.0
    assert [r.tag for r in store.claim_resolutions(10)] == ["v1"]


def test_reads_queue_resolutions_for_missing_unconfirmed_and_ageing_pins(
    clocked: tuple[RedisIndexStore, list[float]],
) -> None:
    store, _ = clocked
    store.lookup(tag("a/b", "missing", refresh_after=150))
    store.apply([PrimaryTag("a/b", "young", D1, 990.0), PrimaryTag("a/b", "old", D1, 800.0)])
    store.lookup(tag("a/b", "young", refresh_after=150))
    store.lookup(tag("a/b", "old", refresh_after=150))
    assert sorted(r.tag for r in store.claim_resolutions(10)) == ["missing", "old"]


def test_a_digest_deleted_at_the_primary_is_not_served_and_its_tags_are_invalidated(
    clocked: tuple[RedisIndexStore, list[float]],
) -> None:
    store, _ = clocked
    store.apply([ManifestPresence("a/b", D1, True), ManifestPresence("a/b", D2, True)])
    store.apply(
        [PrimaryTag("a/b", "v1", D1, 990.0), PrimaryTag("a/b", "v2", D1, 990.0), PrimaryTag("a/b", "v3", D2, 990.0)]
    )
    store.apply([DigestDeleted("a/b", D1)])
    assert not store.lookup(manifest("a/b", D1)).present
    assert store.lookup(manifest("a/b", D2)).present
    assert store.primary_tags("a/b") == {"v3": (D2, 990.0)}
    assert sorted(r.tag for r in store.claim_resolutions(10)) == ["v1", "v2"]
    store.apply([DigestRestored("a/b", D1)])
    assert store.lookup(manifest("a/b", D1)).present


def test_a_rename_invalidates_every_tag_under_the_path(clocked: tuple[RedisIndexStore, list[float]]) -> None:
    store, _ = clocked
    in_buckets_of_their_own(store, "g/app", "g/app/sub", "g/apple", "g/other")
    pins = [PrimaryTag(repo, "v1", D1, 990.0) for repo in ("g/app", "g/app/sub", "g/apple", "g/other")]
    store.apply(pins)
    store.apply([RepositoryInvalidated("g/app", subtree=True)])
    assert {repo for repo in ("g/app", "g/app/sub", "g/apple", "g/other") if store.primary_tags(repo)} == {
        "g/apple",
        "g/other",
    }


def test_a_restart_from_an_older_snapshot_makes_every_pin_unconfirmed(
    tmp_path_factory: pytest.TempPathFactory, redis_settings: Settings
) -> None:
    server = RedisServer(tmp_path_factory.mktemp("redis-snapshot")).start()
    try:
        store = RedisIndexStore(dataclasses.replace(redis_settings.redis, url=server.url, unavailable_cooldown=0))
        now = store.now()
        store.apply([ManifestPresence("a/b", D1, True), PrimaryTag("a/b", "v1", D1, now)])
        assert store.lookup(tag("a/b", "v1")).current
        server.save()
        store.apply([PrimaryTag("a/b", "v1", "", store.now())])  # deleted after the snapshot
        server.restart()  # Redis 7 comes back with the snapshot: the old pin is back
        with pytest.raises(IndexUnavailable):
            store.lookup(tag("a/b", "v1"))  # the connection the restart broke
        view = store.lookup(tag("a/b", "v1"))
        assert (view.pinned_digest, view.current) == (D1, False), "the pin is back, but unconfirmed"
        assert store.epochs_started == 2
        assert [r.tag for r in store.claim_resolutions(10)] == ["v1"], "and queued for resolution"
        store.apply([PrimaryTag("a/b", "v1", D1, store.now())])
        assert store.lookup(tag("a/b", "v1")).current
        store.close()
    finally:
        server.stop()


def test_a_claim_from_before_a_restart_does_not_hold_back_the_unconfirmed_tag(
    tmp_path_factory: pytest.TempPathFactory, redis_settings: Settings
) -> None:
    """A snapshot taken while a resolution was claimed brings the claim back with the old pin; the
    updater that claimed it may be gone. A read of the (now unconfirmed) tag makes it due at once
    rather than when that claim would end."""
    server = RedisServer(tmp_path_factory.mktemp("redis-claimed")).start()
    try:
        store = RedisIndexStore(dataclasses.replace(redis_settings.redis, url=server.url, unavailable_cooldown=0))
        store.apply([ManifestPresence("a/b", D1, True), PrimaryTag("a/b", "v1", D1, store.now())])
        store.apply([TagInvalidated("a/b", "v1")])
        (claimed,) = store.claim_resolutions(10, 600)
        server.save()  # the claim is in the snapshot
        server.restart()
        with pytest.raises(IndexUnavailable):
            store.lookup(tag("a/b", "v1"))  # the connection the restart broke
        assert store.claim_resolutions(10, 600) == [], "claimed, 600 s to go"
        view = store.lookup(tag("a/b", "v1", refresh_after=150))
        assert not view.current, "every entry is of the old epoch"
        (again,) = store.claim_resolutions(10, 600)
        assert again.tag == "v1" and again.epoch != claimed.epoch
        store.close()
    finally:
        server.stop()


def test_a_lease_is_renewed_only_by_its_owner(store: RedisIndexStore, redis_settings: Settings) -> None:
    other = RedisIndexStore(redis_settings.redis)
    assert store.try_lock("job", 2)
    assert store.renew_lock("job", 30)
    assert not other.renew_lock("job", 30)
    time.sleep(2.2)
    assert not other.try_lock("job", 30), "renewed past its first expiry"
    store.unlock("job")
    other.close()


def test_snapshots_and_locks(store: RedisIndexStore) -> None:
    store.apply([BlobPresence("a/b", D1, True), ManifestPresence("a/b", D2, True), PrimaryTag("a/b", "v1", D2, 3.0)])
    assert store.local_snapshot("a/b") == ({D1}, {D2})
    assert store.primary_tags("a/b") == {"v1": (D2, 3.0)}
    assert store.try_lock("reconcile", 30)
    assert not store.try_lock("reconcile", 30)
    store.unlock("reconcile")
    assert store.try_lock("reconcile", 30)


def test_local_digests_come_page_by_page_manifests_first(store: RedisIndexStore) -> None:
    manifests = {f"sha256:{n:064x}" for n in range(300)}
    blobs = {f"sha256:{n:064x}" for n in range(100, 2100)}  # 200 of them are manifests too
    for chunk in range(0, 2100, 500):
        store.apply([BlobPresence("big/repo", d, True) for d in sorted(blobs)[chunk : chunk + 500]])
    store.apply([ManifestPresence("big/repo", d, True) for d in sorted(manifests)])
    pages = list(store.local_digest_pages("big/repo", 100))
    read = [item for page in pages for item in page]
    kinds = [manifest for _, manifest in read]
    assert kinds == sorted(kinds, reverse=True), "every manifest before any blob"
    assert {d for d, manifest in read if manifest} == manifests
    assert {d for d, manifest in read if not manifest} == blobs - manifests
    assert all(page == sorted(page) for page in pages)
    assert max(len(page) for page in pages) <= 200, "about COUNT a page, never the whole repository"
    assert len(pages) >= 10
    assert list(store.local_digest_pages("no/such", 100)) == []
    assert store.is_local_manifest("big/repo", min(manifests))
    assert not store.is_local_manifest("big/repo", max(blobs))


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


def test_an_answer_other_than_the_events_hint_is_retried_then_pinned(
    clocked: tuple[RedisIndexStore, list[float]],
) -> None:
    from geo_route.updater.registry_client import ManifestHead
    from geo_route.updater.resolver import HINT_RETRIES, judge

    store, now = clocked
    store.apply([TagInvalidated("a/b", "v1", hint=D2)])  # the primary announced D2 but still answers D1
    for attempt in range(HINT_RETRIES + 1):
        now[0] += 10.0
        (resolution,) = store.claim_resolutions(10)
        assert (resolution.hint, resolution.attempts) == (D2, attempt)
        verdict = judge(resolution, ManifestHead(D1, "application/x-type"))
        if verdict.pin is None:
            store.requeue(resolution, verdict.delay, verdict.attempts)
        else:
            store.apply([verdict.pin])
    assert store.primary_tag("a/b", "v1") == (D1, now[0]), "pinned after the retries: the primary's own answer"
    assert store.claim_resolutions(10) == [], "and nothing left to ask"


# -- verified local content (updater/verify.py) ---------------------------------------------------


def refetch(query: IndexQuery) -> IndexQuery:
    return dataclasses.replace(query, refetch=True)


def in_buckets_of_their_own(store: RedisIndexStore, *repositories: str) -> None:
    """On a cluster, the repositories a test spreads over buckets are in different buckets (so the test
    crosses them); on one Redis there is one bucket."""
    buckets = {store.keys.bucket(repository) for repository in repositories}
    assert len(buckets) == (len(repositories) if store.keys.clustered else 1), buckets


def test_a_quarantined_digest_is_not_local_from_any_repository(store: RedisIndexStore) -> None:
    in_buckets_of_their_own(store, "q/a", "q/b", "q/c")
    store.apply([BlobPresence("q/a", D1, True), BlobPresence("q/b", D1, True), ManifestPresence("q/a", D2, True)])
    store.apply([ContentVerified("q/a", D1, intact=False), ContentVerified("q/a", D2, intact=False, manifest=True)])
    for repository in ("q/a", "q/b"):
        assert store.lookup(blob(repository, D1)) == IndexView(present=False, quarantined=True)
    assert store.lookup(manifest("q/a", D2)) == IndexView(present=False, quarantined=True)
    store.apply([PrimaryTag("q/a", "v1", D2, store.now())])
    assert not store.lookup(tag("q/a", "v1")).present, "a tag pinned to a quarantined manifest is not local"
    # A later presence (a mount, a notification, reconciliation) does not bring it back ...
    store.apply([BlobPresence("q/c", D1, True)])
    assert store.lookup(blob("q/c", D1)).quarantined
    assert set(store.quarantined()) == {D1, D2}
    assert store.quarantined()[D1][1] == "q/a"
    # ... only a read that matches does.
    store.apply([ContentVerified("q/b", D1, intact=True)])
    assert store.lookup(blob("q/a", D1)) == IndexView(present=True)
    assert set(store.quarantined()) == {D2}


def test_a_refetch_is_queued_for_verification_once_and_served_after_it_matched(store: RedisIndexStore) -> None:
    store.apply([BlobPresence("r/a", D1, True), ManifestPresence("r/a", D2, True)])
    assert store.lookup(blob("r/a", D1)) == IndexView(present=True), "a first fetch is served here"
    assert store.lookup(refetch(blob("r/a", D1))) == IndexView(present=False, verifying=True)
    assert store.lookup(refetch(blob("r/a", D1))).verifying, "asked again: still waiting for the verifier"
    assert store.lookup(refetch(manifest("r/a", D2))) == IndexView(present=False, verifying=True)
    assert store.lookup(blob("r/a", D1)).present, "other clients are still served here meanwhile"
    claimed = store.claim_suspects(10)
    assert sorted(claimed) == [("r/a", D1, False), ("r/a", D2, True)], "each queued once"
    assert store.claim_suspects(10) == []
    store.apply([ContentVerified("r/a", D1, intact=True, trust=30.0)])
    assert store.lookup(refetch(blob("r/a", D1))) == IndexView(present=True), "trusted after it matched"
    assert store.lookup(refetch(manifest("r/a", D2))).verifying, "trust is per digest"
    assert store.claim_suspects(10) == [("r/a", D2, True)]


def test_trust_after_a_verification_expires(store: RedisIndexStore) -> None:
    store.apply([BlobPresence("t/a", D1, True), ContentVerified("t/a", D1, intact=True, trust=0.2)])
    assert store.lookup(refetch(blob("t/a", D1))).present
    time.sleep(0.3)
    assert store.lookup(refetch(blob("t/a", D1))).verifying


def test_a_mismatch_ends_trust_and_leaves_the_suspects_queue(store: RedisIndexStore) -> None:
    store.apply([BlobPresence("m/a", D1, True), ContentVerified("m/a", D1, intact=True, trust=60.0)])
    store.apply([ContentVerified("m/a", D1, intact=False)])
    assert store.lookup(refetch(blob("m/a", D1))) == IndexView(present=False, quarantined=True)
    assert store.claim_suspects(10) == []


def test_a_refetch_of_absent_or_deleted_content_queues_nothing(store: RedisIndexStore) -> None:
    store.apply([ManifestPresence("n/a", D2, True), DigestDeleted("n/a", D2)])
    assert store.lookup(refetch(blob("n/a", D1))) == IndexView(present=False)
    assert store.lookup(refetch(manifest("n/a", D2))) == IndexView(present=False)
    assert store.claim_suspects(10) == []


def test_the_verify_cursor_is_kept(store: RedisIndexStore) -> None:
    assert store.verify_cursor() == ""
    store.set_verify_cursor("team/app")
    assert store.verify_cursor() == "team/app"


def test_a_refetch_of_trusted_content_is_served_here_and_rechecked_after_a_while(store: RedisIndexStore) -> None:
    """Machines behind one NAT address refetch all the time: trusted content stays local, but a
    refetch more than ``recheck_after`` after its last verification asks for another one (a copy
    that went bad after it was verified is found within that)."""
    store.apply([BlobPresence("k/a", D1, True), ContentVerified("k/a", D1, intact=True, trust=600.0)])
    query = dataclasses.replace(refetch(blob("k/a", D1)), recheck_after=0.3)
    assert store.lookup(query) == IndexView(present=True)
    assert store.claim_suspects(10) == [], "verified just now: nothing to ask"
    time.sleep(0.4)
    assert store.lookup(query) == IndexView(present=True), "still served here meanwhile"
    assert store.claim_suspects(10) == [("k/a", D1, False)]
    store.apply([ContentVerified("k/a", D1, intact=True)])  # the pass read it too: that counts
    assert store.lookup(query).present
    assert store.claim_suspects(10) == []


OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"


MEDIA_TYPES = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST, "application/x-type", ""]


@pytest.mark.parametrize("media_type", MEDIA_TYPES)
def test_a_pin_keeps_its_media_type_however_it_is_stored(store: RedisIndexStore, raw: Any, media_type: str) -> None:
    """The manifest types are stored as a code (docs/capacity.md), any other type whole."""
    store.apply([ManifestPresence("m/t", D1, True), PrimaryTag("m/t", "v1", D1, store.now(), f"{media_type}; x=1")])
    view = store.lookup(tag("m/t", "v1"))
    assert (view.pinned_digest, view.media_type, view.current, view.present) == (D1, media_type, True, True)
    stored = str(raw.hget(store.keys.primary_tags("m/t"), "v1"))
    assert len(stored) <= (128 if media_type != "application/x-type" else 200), stored


def test_pins_written_before_the_media_type_codes_still_decide(store: RedisIndexStore, raw: Any) -> None:
    """An upgrade over a populated index: a pin holding the whole media type (the encoding before
    the codes) reads as it did, current in its epoch, and is served with no re-resolution; a code
    this version does not know (a newer version's) reads as no media type (the primary answers)."""
    store.apply([ManifestPresence("old/pins", D1, True)])  # the bucket's epoch begins (on a cluster)
    now, epoch = store.stamp("old/pins")
    raw.hset(store.keys.primary_tags("old/pins"), "v1", f"{D1} {now:.6f} {DOCKER_MANIFEST} {epoch}")
    raw.hset(store.keys.primary_tags("old/pins"), "v2", f"{D1} {now:.6f} zz {epoch}")
    store.apply([ManifestPresence("old/pins", D1, True)])
    view = store.lookup(tag("old/pins", "v1"))
    assert (view.pinned_digest, view.media_type, view.current, view.present) == (D1, DOCKER_MANIFEST, True, True)
    assert store.lookup(tag("old/pins", "v2")).media_type == ""
    assert store.queued_resolutions() == 0, "a current pin of the old encoding is not re-resolved"
    store.apply([DigestDeleted("old/pins", D1)])  # the scripts read both encodings alike
    assert store.primary_tags("old/pins") == {}


def test_a_repositorys_pins_fit_a_listpack_with_the_recommended_setting(
    tmp_path_factory: pytest.TempPathFactory, redis_settings: Settings
) -> None:
    """With ``hash-max-listpack-value 128`` (docs/capacity.md) a repository's pins stay a listpack."""
    server = RedisServer(tmp_path_factory.mktemp("redis-listpack")).start()
    try:
        raw = redis.Redis.from_url(server.url, decode_responses=True)
        raw.config_set("hash-max-listpack-value", "128")
        store = RedisIndexStore(dataclasses.replace(redis_settings.redis, url=server.url))
        now = store.now()
        pins = [PrimaryTag("big/repo", f"v1.{n}.{n * 7919}", D2, now, DOCKER_LIST) for n in range(100)]
        store.apply(pins)
        key = f"{redis_settings.redis.key_prefix}primary:tags:big/repo"
        assert raw.object("encoding", key) == "listpack"
        assert store.lookup(tag("big/repo", pins[-1].tag)).media_type == DOCKER_LIST
        store.close()
        raw.close()
    finally:
        server.stop()


def test_a_dropped_repository_forgets_the_local_content_under_it(store: RedisIndexStore) -> None:
    """A rename at the local registry (GitLab): the repository and those under its path lose their
    local content in the index; a sibling sharing the prefix, and the pins, stay."""
    names = ("d/app", "d/app/sub", "d/apple")
    in_buckets_of_their_own(store, *names)
    store.apply([u for name in names for u in (BlobPresence(name, D1, True), LocalTag(name, "v1", D2))])
    store.apply([PrimaryTag("d/app", "v1", D2, store.now())])
    store.apply([LocalRepositoryDropped("d/app", subtree=True)])
    assert [store.lookup(blob(name, D1)).present for name in names] == [False, False, True]
    assert [bool(store.local_tags(name)) for name in names] == [False, False, True]
    assert store.primary_tag("d/app", "v1") is not None, "what the primary publishes is not the local registry's"
    store.apply([BlobPresence("d/apple", D2, True), LocalRepositoryDropped("d/apple")])
    assert not store.lookup(blob("d/apple", D1)).present and not store.lookup(blob("d/apple", D2)).present


def replicas_caught_up(address: str) -> bool:
    """Every replica of the Redis primary at ``address`` has acknowledged its replication offset."""
    host, port = address.rsplit(":", 1)
    with redis.Redis(host=host, port=int(port), socket_timeout=2) as node:
        info = node.info("replication")
    offsets = [value["offset"] for key, value in info.items() if key.startswith("slave") and isinstance(value, dict)]
    return bool(offsets) and min(offsets) >= info["master_repl_offset"]


def test_a_cluster_failover_costs_that_node_s_buckets_a_few_seconds(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One primary of a cluster SIGKILLed: decisions for its buckets are unavailable (routed to the
    primary) until its replica is promoted and the store has asked for the slots again; the promoted
    replica starts the bucket's new epoch (its pins unconfirmed); another primary's buckets never
    fail. One store, one thread: nothing else makes it refresh."""
    topology = ClusterTopology(tmp_path_factory.mktemp("failover"), replicas_per_primary=1).start()
    try:
        nodes = tuple(topology.addresses)
        store = RedisIndexStore(RedisSettings(cluster_nodes=nodes, socket_timeout=0.5, unavailable_cooldown=0.2))
        by_part: dict[str, str] = {}
        for number in range(100):
            name = f"f/app{number}"
            by_part.setdefault(topology.primary_part(store.keys.epoch(store.keys.bucket(name))), name)
        (killed, doomed), (_, spared) = list(by_part.items())[:2]
        for name in (doomed, spared):
            store.apply([ManifestPresence(name, D1, True), PrimaryTag(name, "v1", D1, store.stamp(name)[0])])
            assert store.lookup(tag(name, "v1")).current
        # Replication is asynchronous: a write the replica has not received yet is lost with its
        # primary (then no pin at all, a tag-not-pinned: safe, but not what this test looks at).
        address = topology.nodes[killed].address
        wait_until(lambda: replicas_caught_up(address), 10, f"{killed}'s replica to hold every write")
        topology.nodes[killed].process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        killed_at, recovered_at = time.monotonic(), None
        while time.monotonic() - killed_at < 30 and recovered_at is None:
            assert store.lookup(tag(spared, "v1")).current, "another primary's bucket kept deciding"
            try:
                view = store.lookup(tag(doomed, "v1"))
            except IndexUnavailable:
                time.sleep(0.05)
                continue
            recovered_at = time.monotonic()
            assert (view.pinned_digest, view.current) == (D1, False), "the promoted replica starts a new epoch"
        assert recovered_at is not None, "the store never reached the promoted replica"
        # The store reached the promoted replica; the other nodes learn it by gossip, some a moment later.
        promoted = lambda: topology.primary_part(store.keys.epoch(store.keys.bucket(doomed))) != killed  # noqa: E731
        wait_until(promoted, 10, "every running node to name the promoted replica")
        assert recovered_at - killed_at < 15, recovered_at - killed_at
        store.close()
    finally:
        topology.stop()


# -- Sentinel with TLS, an ACL user and the sentinels' password ------------------------------------


def tls_settings(topology: SentinelTopology, site_file: Callable[..., Path], extra: str = "") -> Settings:
    prefix = f"t{uuid.uuid4().hex[:12]}:"
    yaml = sentinel_tls_yaml(topology) + extra
    return load_settings(site_file(redis_url=DEFAULT_REDIS_URL, prefix=prefix, extra=yaml), environ={})


def test_a_decision_through_sentinel_with_tls_and_passwords(
    sentinel_tls_topology: SentinelTopology, site_file: Callable[..., Path], make_token: Callable[..., str]
) -> None:
    """The auth service on the TLS topology: a pinned tag is decided local, in one round trip
    through TLS to the primary the sentinels (over TLS, with their password) name, as the ACL user."""
    settings = tls_settings(sentinel_tls_topology, site_file)
    app = create_app(settings)
    index = app.extensions["geo_route"]["index"]
    index.apply([PrimaryTag("group/app", "v1", D1, index.now(), OCI_MANIFEST), ManifestPresence("group/app", D1, True)])
    headers = {
        contract.ORIGINAL_METHOD: "HEAD",
        contract.ORIGINAL_URI: "/v2/group/app/manifests/v1",
        contract.AUTHORIZATION: f"Bearer {make_token([access('group/app', 'pull')])}",
        "Accept": OCI_MANIFEST,
    }
    answer = app.test_client().get("/auth", headers=headers)
    assert (answer.status_code, answer.headers[contract.ROUTE], answer.headers[contract.REASON]) == (
        200,
        "local",
        "tag-pinned",
    )
    assert answer.headers[contract.UPSTREAM_PATH] == f"/v2/group/app/manifests/{D1}"
    index.close()


@pytest.mark.parametrize(
    "wrong",
    ["  sentinel_tls: false\n", '  sentinel_password: "wrong"\n', '  password: "wrong"\n', "  tls: false\n"],
    ids=["sentinels-without-tls", "wrong-sentinel-password", "wrong-user-password", "nodes-without-tls"],
)
def test_the_tls_topology_refuses_clients_without_tls_or_the_passwords(
    sentinel_tls_topology: SentinelTopology, site_file: Callable[..., Path], wrong: str
) -> None:
    """So the tests above ran through TLS and the passwords: leave one out and the index is unavailable."""
    key = wrong.split(":")[0].strip()
    yaml = "".join(
        line + "\n" for line in sentinel_tls_yaml(sentinel_tls_topology).splitlines() if f" {key}:" not in line
    )
    settings = load_settings(site_file(redis_url=DEFAULT_REDIS_URL, prefix="refused:", extra=yaml + wrong), environ={})
    store = RedisIndexStore(dataclasses.replace(settings.redis, socket_timeout=1.0, connect_timeout=1.0))
    with pytest.raises(IndexUnavailable):
        store.lookup(blob("a/b", D1))
    store.close()


# --- what `geo-route status` and the updater's /metrics read ---


def test_status_records_keep_the_last_one_per_name_on_the_index_clock(
    clocked: tuple[RedisIndexStore, list[float]],
) -> None:
    store, now = clocked
    store.record_status("reconcile", {"ok": False, "errors": 2})
    now[0] = 1010.0
    store.record_status("reconcile", {"ok": True, "errors": 0, "seconds": 1.5})
    store.record_status("events:local", {"lag": 0.25})
    records = store.status_records()
    assert records["reconcile"] == StatusRecord(1010.0, {"ok": True, "errors": 0, "seconds": 1.5})
    assert records["events:local"] == StatusRecord(1010.0, {"lag": 0.25})
    assert len(records) == 2, "one entry per name: the hash stays small"


def test_figures_count_the_queues_and_how_long_the_oldest_due_has_waited(
    clocked: tuple[RedisIndexStore, list[float]],
) -> None:
    store, now = clocked
    assert store.figures() == IndexFigures(1000.0, 0, 0, 0.0, 0, 0.0, 0, 0)
    store.apply([TagInvalidated("a/b", "v1"), TagInvalidated("a/b", "v2", fence=60.0), BlobPresence("a/b", D1, True)])
    store.lookup(IndexQuery(QueryKind.BLOB, "a/b", D1, refetch=True))  # a refetch: queued for verification
    store.apply([ContentVerified("c/d", D2, intact=False)])
    now[0] = 1012.0
    assert store.figures() == IndexFigures(1012.0, 2, 1, 12.0, 1, 12.0, 1, 1)


def test_pin_entries_list_pins_and_tombstones_with_their_epoch(store: RedisIndexStore) -> None:
    store.apply([PrimaryTag("b/b", "v1", D1, 990.0), PrimaryTag("a/a", "v1", D2, 995.0)])
    store.apply([TagInvalidated("a/a", "old")])
    entries, repositories = store.pin_entries(10)
    assert repositories == 2
    assert [(e.repository, e.tag, e.digest, e.current) for e in entries] == [
        ("a/a", "old", "", True),
        ("a/a", "v1", D2, True),
        ("b/b", "v1", D1, True),
    ]
    assert entries[1].confirmed_at == 995.0
    first, repositories = store.pin_entries(1)
    assert {e.repository for e in first} == {"a/a"} and repositories == 2


def test_the_topology_names_the_primary_and_what_each_sentinel_says(
    store: RedisIndexStore, redis_settings: Settings, redis_topology: str
) -> None:
    topology = store.topology()
    assert (topology.mode, topology.role) == (redis_topology, "master")
    assert topology.version and topology.used_memory
    if redis_topology == "cluster":
        nodes = set(redis_settings.redis.cluster_nodes)
        primaries, replicas = topology.primary.split(", "), [r.split(" ")[0] for r in topology.replicas]
        assert len(primaries) == 3 and set(primaries) | set(replicas) <= nodes and not set(primaries) & set(replicas)
        return
    primary = redis_settings.redis.url.split("//", 1)[1].split("/", 1)[0]  # the tests' url names the primary
    assert topology.primary == primary
    if redis_topology == "single":
        assert topology.sentinels == () and topology.master_name == ""
        return
    assert topology.master_name == redis_settings.redis.master_name
    assert [address for address, _ in topology.sentinels] == list(redis_settings.redis.sentinels)
    assert {answer for _, answer in topology.sentinels} == {primary}
    assert len(topology.replicas) == 1 and " online " in topology.replicas[0]
    assert redis_settings.redis.password not in repr(topology) or not redis_settings.redis.password


def test_status_shows_the_topology_and_names_what_it_could_not_read(
    store: RedisIndexStore, redis_settings: Settings, redis_topology: str
) -> None:
    """``geo-route status`` on either topology, with NGINX's counters unreachable: the rest is shown."""

    def unreachable(url: str) -> str:
        raise GeoRouteError(f"{url}: connection refused")

    store.apply([PrimaryTag("a/b", "v1", D1, store.now() - 400)])
    status = gather_status(redis_settings, store, fetch_text=unreachable)
    text, page = format_status(status), render_status_html(status)
    assert status.traffic is None and any(p.startswith("nginx metrics: ") for p in status.problems)
    assert "traffic: unknown" in text and "problem: nginx metrics" in page
    assert re.search(r"^  a/b:v1 sha256:1{12} 6\.\d min past the bound$", text, re.MULTILINE), text
    if redis_topology == "cluster":
        assert f"redis: cluster, primaries {store.topology().primary} (master," in text
        return
    primary = redis_settings.redis.url.split("//", 1)[1].split("/", 1)[0]
    assert f"redis: {redis_topology}, primary {primary} (master," in text
    for address in redis_settings.redis.sentinels:
        assert f"  sentinel {address}: primary {primary}" in text
        assert f"sentinel {address}</th><td>names {primary}" in page
