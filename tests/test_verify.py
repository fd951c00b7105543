"""Content verification (updater/verify.py): the rate limit, the digest check, and passes against a
real redis-server. The local registry here is an in-memory double of the verifier's own reader
protocol (``ContentReader``); tests/test_scrub.py runs the same code against real registries."""

from __future__ import annotations

import hashlib
import threading
import tracemalloc
from collections.abc import Callable, Iterator

import pytest

from geo_route.config import Settings
from geo_route.index.model import BlobPresence, IndexQuery, ManifestPresence, QueryKind
from geo_route.index.redis_store import RedisIndexStore
from geo_route.lru import Lru
from geo_route.updater.registry_client import RegistryError
from geo_route.updater.verify import RateLimiter, Result, Verifier, check_content


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Registry:
    """Content by digest, served in 1 KiB chunks; ``reads`` records every (repository, digest, manifest)."""

    def __init__(self) -> None:
        self.content: dict[str, bytes] = {}
        self.failing: set[str] = set()
        self.unlinked: set[tuple[str, str]] = set()  # (repository, digest): 404 there only
        self.reads: list[tuple[str, str, bool]] = []

    def put(self, data: bytes) -> str:
        digest = sha256(data)
        self.content[digest] = data
        return digest

    def stream_content(self, repository: str, digest: str, *, manifest: bool, sink: Callable[[bytes], None]) -> bool:
        self.reads.append((repository, digest, manifest))
        if digest in self.failing:
            raise RegistryError("connection reset", 0)
        data = self.content.get(digest) if (repository, digest) not in self.unlinked else None
        if data is None:
            return False
        for start in range(0, len(data), 1024):
            sink(data[start : start + 1024])
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_the_rate_limit_allows_one_second_of_burst_then_paces() -> None:
    clock = Clock()
    limiter = RateLimiter(1000, clock=clock, sleep=clock.sleep)
    limiter.take(1000)
    assert clock.slept == []
    limiter.take(500)
    assert clock.slept == [pytest.approx(0.5)]
    clock.now += 10  # idle time earns at most one second of burst
    limiter.take(1000)
    limiter.take(1000)
    assert clock.slept[-1] == pytest.approx(1.0)
    assert sum(clock.slept) == pytest.approx(1.5)


def test_a_rate_of_zero_never_waits() -> None:
    clock = Clock()
    limiter = RateLimiter(0, clock=clock, sleep=clock.sleep)
    limiter.take(10**12)
    assert clock.slept == []


def test_check_content_compares_the_digest_of_every_byte_read() -> None:
    registry = Registry()
    unlimited = RateLimiter(0)
    good = registry.put(b"x" * 5000)
    assert check_content(registry, "a", good, manifest=False, limiter=unlimited).result is Result.INTACT
    bad = registry.put(b"y" * 5000)
    registry.content[bad] = b"y" * 4999 + b"z"  # one byte flipped, same size
    check = check_content(registry, "a", bad, manifest=False, limiter=unlimited)
    assert (check.result, check.size, check.actual) == (Result.MISMATCH, 5000, sha256(b"y" * 4999 + b"z"))
    assert check_content(registry, "a", sha256(b"absent"), manifest=False, limiter=unlimited).result is Result.MISSING
    registry.failing.add(good)
    assert check_content(registry, "a", good, manifest=False, limiter=unlimited).result is Result.ERROR
    sha512 = "sha512:" + hashlib.sha512(b"q").hexdigest()
    registry.content[sha512] = b"q"
    assert check_content(registry, "a", sha512, manifest=False, limiter=unlimited).result is Result.INTACT
    assert check_content(registry, "a", "md5:abc", manifest=False, limiter=unlimited).result is Result.SKIPPED


@pytest.fixture
def store(redis_settings: Settings) -> Iterator[RedisIndexStore]:
    store = RedisIndexStore(redis_settings.redis)
    yield store
    store.close()


def blob_view(store: RedisIndexStore, repository: str, digest: str, refetch: bool = False) -> tuple[bool, bool, bool]:
    view = store.lookup(IndexQuery(QueryKind.BLOB, repository, digest, refetch=refetch))
    return view.present, view.quarantined, view.verifying


def test_a_pass_quarantines_a_corrupted_blob_and_lifts_it_once_repaired(store: RedisIndexStore) -> None:
    registry = Registry()
    layer, config, manifest = registry.put(b"layer" * 1000), registry.put(b"{}"), registry.put(b'{"m":1}')
    store.apply(
        [
            BlobPresence("app/a", layer, True),
            BlobPresence("app/b", layer, True),  # the same content in a second repository: read once
            BlobPresence("app/a", config, True),
            ManifestPresence("app/a", manifest, True),
        ]
    )
    registry.content[layer] = b"layer" * 999 + b"layeR"
    verifier = Verifier(store, registry, RateLimiter(0), trust=60)
    report = verifier.run_pass(threading.Event())
    assert (report.results["intact"], report.results["mismatch"]) == (2, 1)
    assert (report.manifests, report.blobs, report.quarantined) == (1, 2, 1)
    assert registry.reads[0] == ("app/a", manifest, True), "manifests first"
    assert sorted(d for _, d, _ in registry.reads) == sorted([layer, config, manifest]), "each digest read once"
    assert not report.ok
    assert "mismatched 1 (quarantined)" in report.format()
    assert blob_view(store, "app/a", layer) == (False, True, False)
    assert blob_view(store, "app/b", layer) == (False, True, False)
    # The operator repairs the copy; the next pass reads the quarantined digest again and lifts it.
    registry.content[layer] = b"layer" * 1000
    report = verifier.run_pass(threading.Event())
    assert report.ok and report.quarantined == 0
    assert blob_view(store, "app/b", layer) == (True, False, False)


def test_suspects_are_verified_and_trusted_for_refetches(store: RedisIndexStore) -> None:
    registry = Registry()
    good, bad = registry.put(b"good" * 100), registry.put(b"bad" * 100)
    store.apply([BlobPresence("s/a", good, True), BlobPresence("s/a", bad, True)])
    registry.content[bad] = b"BAD" * 100
    assert blob_view(store, "s/a", good, refetch=True) == (False, False, True)
    assert blob_view(store, "s/a", bad, refetch=True) == (False, False, True)
    verifier = Verifier(store, registry, RateLimiter(0), trust=60)
    assert verifier.verify_suspects() == 2
    assert blob_view(store, "s/a", good, refetch=True) == (True, False, False), "verified: refetches served here"
    assert blob_view(store, "s/a", bad) == (False, True, False), "corrupt: nobody is served it here"


def test_a_resumed_pass_starts_after_the_last_finished_repository(store: RedisIndexStore) -> None:
    registry = Registry()
    digests = {name: registry.put(name.encode()) for name in ("r/1", "r/2", "r/3")}
    store.apply([BlobPresence(name, digest, True) for name, digest in digests.items()])
    store.set_verify_cursor("r/1")
    verifier = Verifier(store, registry, RateLimiter(0), trust=60)
    verifier.run_pass(threading.Event(), resume=True)
    assert [repository for repository, _, _ in registry.reads] == ["r/2", "r/3"]
    assert store.verify_cursor() == "", "a finished pass starts the next one from the beginning"


def test_a_pass_holds_a_page_of_a_repository_in_memory_never_the_whole_repository(store: RedisIndexStore) -> None:
    """A pass over 30,000 blobs of one repository once held them all, in a set, a sorted list and the
    pass's set of every digest met: about 350 bytes a digest (10 MiB here) for as long as the pass
    lasted (``benchmarks/load.py``: the updater stepped up 17 MiB at 70,000 notified blobs). Now one
    page and the last SEEN_DIGESTS digests read, whatever the repository's size."""
    count = 30_000
    registry = CountingRegistry({sha256(str(n).encode()): str(n).encode() for n in range(count)})
    digests = sorted(registry.content)
    for start in range(0, count, 5000):
        store.apply([BlobPresence("many/blobs", d, True) for d in digests[start : start + 5000]])
    verifier = Verifier(store, registry, RateLimiter(0), trust=60)
    tracemalloc.start()
    try:
        report = verifier.run_pass(threading.Event())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (report.blobs, report.results["intact"], registry.reads) == (count, count, count), "each read once"
    assert peak < 2.5 * 1024 * 1024, f"a pass over {count} digests peaked at {peak / 1024 / 1024:.1f} MiB"


class CountingRegistry:
    """Content by digest, in one chunk; counts the reads rather than listing them."""

    def __init__(self, content: dict[str, bytes]) -> None:
        self.content = content
        self.reads = 0

    def stream_content(self, repository: str, digest: str, *, manifest: bool, sink: Callable[[bytes], None]) -> bool:
        self.reads += 1
        data = self.content.get(digest)
        if data is not None:
            sink(data)
        return data is not None


def test_a_pass_remembers_the_digests_it_read_last() -> None:
    recent: Lru[str, None] = Lru(3)  # as run_pass keeps them
    for digest in ("a", "b", "c"):
        recent.put(digest, None)
    assert recent.touch("a")
    recent.put("d", None)
    assert not recent.touch("b"), "b, least recently met, made way"
    assert [recent.touch(d) for d in ("a", "c", "d")] == [True, True, True], "a stayed: it was met again"
    assert len(recent) == 3


def test_content_another_repository_lacks_is_still_read_where_it_is(store: RedisIndexStore) -> None:
    """A 404 (the link missing in one repository) or a failed read says nothing of another
    repository's copy: the pass reads it there too. Content read once is not read again."""
    registry = Registry()
    shared, flaky = registry.put(b"shared layer" * 100), registry.put(b"flaky" * 100)
    store.apply([BlobPresence(name, digest, True) for name in ("a/1", "a/2", "a/3") for digest in (shared, flaky)])
    registry.unlinked.add(("a/1", shared))
    registry.failing.add(flaky)
    report = Verifier(store, registry, RateLimiter(0), trust=60).run_pass(threading.Event())
    read = sorted((repository, digest) for repository, digest, _ in registry.reads)
    assert read == sorted([("a/1", shared), ("a/2", shared), *((name, flaky) for name in ("a/1", "a/2", "a/3"))])
    assert (report.results["missing"], report.results["intact"], report.results["error"]) == (1, 1, 3)


def test_stopping_ends_a_read_in_progress_without_a_verdict() -> None:
    registry = Registry()
    digest = registry.put(b"z" * 10_000)
    stop = threading.Event()
    chunks = 0

    def take(count: int) -> None:
        nonlocal chunks
        chunks += 1
        if chunks == 2:
            stop.set()  # SIGTERM in the middle of a large blob

    limiter = RateLimiter(0)
    limiter.take = take  # type: ignore[method-assign]
    check = check_content(registry, "a", digest, manifest=False, limiter=limiter, stop=stop)
    assert (check.result, check.size) == (Result.ERROR, 2048), "the read ends at the chunk after the stop"
    assert chunks == 2
