"""The updater's background work survives failures and spreads its load, against the real stack
(two docker-registry 2.8, redis-server, NGINX; the stack's own updater stopped, so the tests own the
index):

- a claimed resolution is never lost: not when Redis dies between the claim and the pin's write,
  not when the updater that claimed it dies (``resolver.py``, ``claim_resolutions``);
- the periodic reconciliation walks the repositories in slices spread over
  ``updater.reconcile_interval`` with a cursor in the index (``reconcile_cycle.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import RedisServer

from geo_route.config import Settings, load_settings
from geo_route.devstack.client import StackClient
from geo_route.devstack.images import OciImage, build_oci_image
from geo_route.devstack.keys import PRIVATE_KEY_FILE
from geo_route.devstack.replicate import replicate_image
from geo_route.devstack.skopeo import docker_reference
from geo_route.devstack.stack import RunningStack, bring_up
from geo_route.errors import IndexUnavailable
from geo_route.index.model import BlobPresence, PrimaryTag, TagInvalidated
from geo_route.index.redis_store import RedisIndexStore
from geo_route.updater.pull_tokens import PullTokens
from geo_route.updater.reconcile import Registries, reconcile
from geo_route.updater.reconcile_cycle import Cursor, ReconcileCycle
from geo_route.updater.reconcile_report import ReconcileReport
from geo_route.updater.registry_client import Answer, ManifestHead, RegistryClient
from geo_route.updater.resolver import Resolver, TagSource
from geo_route.updater.verify import RateLimiter

CLAIM_SECONDS = 1  # updater.resolve_claim_seconds, short for the tests' time


@dataclasses.dataclass
class Site:
    stack: RunningStack
    client: StackClient
    settings: Settings
    registries: Registries
    images: Path
    built: dict[str, OciImage] = dataclasses.field(default_factory=dict)

    def image(self, variant: str) -> OciImage:
        if variant not in self.built:
            self.built[variant] = build_oci_image(self.images / variant, "v1", variant=variant, layer_count=1)
        return self.built[variant]

    def push_to_primary(self, repository: str, variant: str, tag: str = "v1") -> str:
        """Straight to the primary (no notification reaches the index: the stack's updater is stopped)."""
        image = self.image(variant)
        destination = docker_reference(self.client.primary, repository, tag)
        self.client.skopeo.copy(image.reference, destination, dest_creds=self.client.credentials())
        return image.digest

    def store(self, index_clock: Callable[[], float] | None = None, **redis: Any) -> RedisIndexStore:
        """A store of the test's own: a key prefix of its own, on the stack's Redis unless ``url``, with
        the patient timeouts of the updater's background work (a shared box may be busy for 50 ms)."""
        patient = {"socket_timeout": 5.0, "connect_timeout": 5.0, "unavailable_cooldown": 0.0, **redis}
        prefix = f"t{uuid.uuid4().hex[:10]}:"
        return RedisIndexStore(
            dataclasses.replace(self.settings.redis, key_prefix=prefix, **patient), index_clock=index_clock
        )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("durable")
    running = bring_up(root / "stack")
    try:
        running.stop_part("updater")  # the tests own the index
        client = StackClient(running.info, running)
        key = Path(running.info.directory) / "keys" / PRIVATE_KEY_FILE
        settings = load_settings(running.info.site_file, environ={"GEO_ROUTE_UPDATER__SIGNING_KEY": str(key)})
        registries = Registries.from_settings(settings)
        try:
            yield Site(running, client, settings, registries, root / "images")
        finally:
            registries.close()
            client.close()
    finally:
        running.stop()


# -- 1. a claimed resolution is never lost ------------------------------------------------------------


class AskThen:
    """The real primary (``RegistryClient``), with ``before`` run as each question goes out: the
    moment between a resolution's claim and its pin's write."""

    def __init__(self, primary: TagSource, before: Callable[[], None]) -> None:
        self.primary = primary
        self.before = before
        self.asked: list[str] = []

    def head_manifest(self, repository: str, reference: str) -> ManifestHead | None:
        self.asked.append(f"{repository}:{reference}")
        self.before()
        return self.primary.head_manifest(repository, reference)


def resolve_until_pinned(resolver: Resolver, store: RedisIndexStore, repository: str, patience: float) -> float:
    """Run the resolver as its loop does (an unavailable index is logged and retried) until the tag
    is pinned; the seconds it took."""
    started = time.monotonic()
    while store.primary_tag(repository, "v1") is None:
        assert time.monotonic() - started < patience, (
            f"{repository}:v1 was never pinned: the resolution claimed before the failure is lost "
            f"(queued: {store.queued_resolutions()})"
        )
        with contextlib.suppress(IndexUnavailable):
            resolver.resolve_due()
        time.sleep(0.05)
    return time.monotonic() - started


def test_a_resolution_claimed_when_redis_dies_before_the_pin_is_written_is_claimed_again(
    site: Site, tmp_path: Path
) -> None:
    """redis-server SIGKILLed while the question is out (its snapshot taken just before: the claim
    is durable, as with AOF or a replica that had it), restarted from the snapshot: the pin's write
    failed, and the tag is resolved again once the claim ends, not left unpinned."""
    digest = site.push_to_primary("durable/redis-died", "redis-died")
    server = RedisServer(tmp_path / "redis").start()
    store = site.store(url=server.url, unavailable_cooldown=0.0, socket_timeout=2.0)
    try:
        store.apply([TagInvalidated("durable/redis-died", "v1")])
        dying = [True]

        def crash_redis() -> None:
            if dying.pop() if dying else False:
                server.save()
                assert server.logged is not None
                server.logged.kill()

        source = AskThen(site.registries.primary, crash_redis)
        resolver = Resolver(store, source, claim_seconds=CLAIM_SECONDS)
        with pytest.raises(IndexUnavailable):
            resolver.resolve_due()  # asked, then the pin's write met a dead Redis
        server.start()  # from the snapshot: the claim is there, the pin is not
        took = resolve_until_pinned(resolver, store, "durable/redis-died", patience=CLAIM_SECONDS + 10)
        assert store.primary_tag("durable/redis-died", "v1") == (digest, pytest.approx(time.time(), abs=30))
        assert source.asked == ["durable/redis-died:v1"] * 2, "asked again once, after the claim ended"
        assert took >= CLAIM_SECONDS - 0.5, f"claimed again after {took:.1f} s: before its claim ended"
        resolver.close()
    finally:
        store.close()
        server.stop()


def test_a_resolution_claimed_by_an_updater_that_dies_is_claimed_again_by_another(site: Site) -> None:
    """Updater 1 claims and dies before it writes anything (its process is gone: nothing of it runs
    again); updater 2 does not ask while the claim lives, and resolves the tag once it has ended."""
    digest = site.push_to_primary("durable/updater-died", "updater-died")
    first = site.store()
    second = RedisIndexStore(dataclasses.replace(site.settings.redis, key_prefix=first.keys.prefix, socket_timeout=5.0))
    try:
        first.apply([TagInvalidated("durable/updater-died", "v1")])
        (claimed,) = first.claim_resolutions(10, CLAIM_SECONDS)
        first.close()  # updater 1 is gone
        source = AskThen(site.registries.primary, lambda: None)
        resolver = Resolver(second, source, claim_seconds=CLAIM_SECONDS)
        assert resolver.resolve_due() == 0, "a live claim is nobody else's to ask"
        took = resolve_until_pinned(resolver, second, "durable/updater-died", patience=CLAIM_SECONDS + 10)
        assert (second.primary_tag("durable/updater-died", "v1") or ("",))[0] == digest
        assert source.asked == ["durable/updater-died:v1"], "asked once, by updater 2"
        assert took >= claimed.claimed_until - claimed.asked_at - 0.5
        assert second.queued_resolutions() == 0, "its pin released the claim"
        resolver.close()
    finally:
        second.close()


# -- 2. reconciliation spread over its interval -------------------------------------------------------

CYCLE_REPOSITORIES = [f"cycle/r{n}" for n in range(1, 7)]


class RecordingClient(RegistryClient):
    """The real registry client, noting each request once answered: (time, side, method, target)."""

    def __init__(self, side: str, seen: list[tuple[float, str, str, str]], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.side = side
        self.seen = seen

    def request(self, method: str, target: str, repository: str | None, accept: str | None = None) -> Answer:
        answer = super().request(method, target, repository, accept)
        self.seen.append((time.monotonic(), self.side, method, target))
        return answer


def recording_registries(settings: Settings, seen: list[tuple[float, str, str, str]], rate: int = 0) -> Registries:
    tokens = PullTokens.from_settings(settings)
    limiter = RateLimiter(rate)
    throttle = (lambda: limiter.take(1)) if rate else None
    local = RecordingClient("local", seen, settings.local_registry.url, tokens, timeout=30, throttle=throttle)
    primary = RecordingClient("primary", seen, settings.primary.url, tokens, timeout=30, throttle=throttle)
    return Registries(local, primary)


@pytest.fixture(scope="module")
def cycle_site(site: Site) -> Site:
    """Six repositories at the primary, each replicated to the local registry (Geo's copy: no event)."""
    for repository in CYCLE_REPOSITORIES:
        site.push_to_primary(repository, "cycle")
        creds = site.client.credentials()
        replicate_image(
            site.client.skopeo,
            site.client.primary,
            site.client.local_registry,
            repository,
            ["v1"],
            source_creds=creds,
            destination_creds=creds,
        )
    return site


def cycle_settings(site: Site, interval: int, rate: int = 0) -> Settings:
    updater = dataclasses.replace(
        site.settings.updater, reconcile_interval=interval, reconcile_requests_per_second=rate
    )
    return dataclasses.replace(site.settings, updater=updater)


def repositories_named(seen: list[tuple[float, str, str, str]], side: str = "local") -> list[str]:
    """The cycle repositories the requests on ``side`` named, in order, each once."""
    named = [r for _, s, _, target in seen if s == side for r in CYCLE_REPOSITORIES if target.startswith(f"/v2/{r}/")]
    return list(dict.fromkeys(named))


def test_a_cycle_is_spread_over_its_interval_and_resumes_at_its_cursor(cycle_site: Site) -> None:
    """On the index's clock (controlled here): with the six repositories known, each is due one
    sixth of the interval after the last, one slice at a time, with the primary asked only about that
    slice's tags and manifests; a new updater (a restart) carries on after the cursor; a full run
    (``reconcile --once``) fits between two slices."""
    site, now = cycle_site, [1_000_000.0]
    store = site.store(index_clock=lambda: now[0])
    try:
        assert reconcile(site.settings, store, registries=site.registries).ok  # the index knows them all
        settings = cycle_settings(site, interval=60)
        seen: list[tuple[float, str, str, str]] = []
        first = recording_registries(settings, seen)
        cycle = ReconcileCycle(settings, store, first)
        slices: list[list[str]] = []
        heads_per_slice: list[int] = []
        waits: list[float] = []
        for _ in range(3):
            before = len(seen)
            assert cycle.step() == 0.0
            slices.append(repositories_named(seen[before:]))
            heads_per_slice.append(
                sum(1 for _, side, method, _ in seen[before:] if (side, method) == ("primary", "HEAD"))
            )
            waits.append(cycle.step())  # nothing more is due yet
            now[0] += waits[-1]
        assert slices == [[r] for r in CYCLE_REPOSITORIES[:3]], "one repository every interval / 6, in catalog order"
        assert waits == [pytest.approx(10.0)] * 3
        assert heads_per_slice == [2, 2, 2], "the primary asked about that slice's tag and manifest only"
        assert reconcile(site.settings, store, registries=site.registries).ok, "a full run between two slices"

        same_index = dataclasses.replace(site.settings.redis, key_prefix=store.keys.prefix, socket_timeout=5.0)
        restarted = RedisIndexStore(same_index, index_clock=lambda: now[0])
        resumed: list[tuple[float, str, str, str]] = []
        first.close()  # the first updater is gone
        second = recording_registries(settings, resumed)
        cycle = ReconcileCycle(settings, restarted, second)
        finished: list[ReconcileReport] = []
        cycle.on_cycle = finished.append
        while not finished:
            now[0] += cycle.step()
        assert repositories_named(resumed) == CYCLE_REPOSITORIES[3:], "resumed after the cursor, nothing done twice"
        assert now[0] == pytest.approx(1_000_050.0), "the last slice was due 50 s in, and found the catalog's end"
        assert finished[0].ok and finished[0].repositories == 3, finished[0].format()
        following = Cursor.decode(restarted.reconcile_cursor())
        assert following == Cursor(1_000_060.0, 6), "the next cycle starts one interval after this one started"
        second.close()
        restarted.close()
    finally:
        store.close()


RATE = 15  # updater.reconcile_requests_per_second for the test below


def test_a_cycle_repairs_everything_within_its_rate(cycle_site: Site) -> None:
    """A real-time cycle over an index that knows two of the six repositories, one of them with a
    blob the registry does not have, the other with a wrong pin: at its end every repository is
    right. Its registry requests never exceed the rate cap (a token bucket: one second's burst)."""
    site, image = cycle_site, cycle_site.image("cycle")
    phantom, wrong = "sha256:" + "0" * 64, "sha256:" + "9" * 64
    store = site.store()
    try:
        store.apply([BlobPresence("cycle/r1", phantom, True), PrimaryTag("cycle/r2", "v1", wrong, store.now() - 10)])
        settings = cycle_settings(site, interval=2, rate=RATE)
        seen: list[tuple[float, str, str, str]] = []
        registries = recording_registries(settings, seen, rate=RATE)
        finished: list[ReconcileReport] = []
        cycle = ReconcileCycle(settings, store, registries, on_cycle=finished.append)
        started = time.monotonic()
        while not finished:
            assert time.monotonic() - started < 60, "the cycle never ended"
            time.sleep(min(cycle.step(), 0.1))
        registries.close()
        elapsed = time.monotonic() - started

        assert finished[0].ok and finished[0].repositories == 6, finished[0].format()
        record = store.status_records()["reconcile"]
        assert (record.fields["ok"], record.fields["repositories"]) == (True, 6), "geo-route status shows the cycle"
        for repository in CYCLE_REPOSITORIES:
            assert store.local_snapshot(repository) == (set(image.blob_digests), {image.digest}), repository
            assert store.local_tags(repository) == {"v1": image.digest}, repository
            assert (store.primary_tag(repository, "v1") or ("",))[0] == image.digest, repository
        times = [at for at, *_ in seen]
        busiest = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
        print(
            f"cycle: {len(times)} registry requests in {elapsed:.1f} s, at most {busiest} in one second (cap {RATE}/s)"
        )
        assert busiest <= 2 * RATE, f"{busiest} requests within one second (cap {RATE}/s, one second's burst)"
        assert elapsed >= (len(times) - RATE) / RATE - 0.5, "faster than the cap allows"
    finally:
        store.close()


def test_the_reconcile_command_without_once_runs_the_spread_cycle(cycle_site: Site, tmp_path: Path) -> None:
    """``geo-route reconcile`` (no ``--once``) runs cycles in the foreground, prints each one's
    report, keeps its cursor in the index, and ends at SIGTERM with 0."""
    site = cycle_site
    environ = {
        **os.environ,
        "GEO_ROUTE_UPDATER__SIGNING_KEY": site.settings.updater.signing_key,
        "GEO_ROUTE_UPDATER__RECONCILE_INTERVAL": "2",
        "GEO_ROUTE_REDIS__KEY_PREFIX": f'"t{uuid.uuid4().hex[:10]}:"',  # YAML: quoted
    }
    log = tmp_path / "reconcile.log"
    with open(log, "wb") as output:
        command = [sys.executable, "-m", "geo_route.cli", "reconcile", "-c", site.client.info.site_file]
        run = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=environ)
        try:
            deadline = time.monotonic() + 60
            while log.read_text().count("reconcile: ok") < 2:
                assert run.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            run.send_signal(signal.SIGTERM)
            assert run.wait(30) == 0, log.read_text()
        finally:
            if run.poll() is None:
                run.kill()
                run.wait(10)
    settings = load_settings(site.client.info.site_file, environ=environ)
    store = RedisIndexStore(dataclasses.replace(settings.redis, socket_timeout=5.0))
    try:
        cursor = Cursor.decode(store.reconcile_cursor())
        assert cursor is not None and cursor.total == len(CYCLE_REPOSITORIES), store.reconcile_cursor()
        assert store.local_tags("cycle/r6") == {"v1": site.image("cycle").digest}
    finally:
        store.close()
