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
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import RedisServer

from geo_route.config import Settings, load_settings
from geo_route.devstack.client import StackClient
from geo_route.devstack.images import OciImage, build_oci_image
from geo_route.devstack.keys import PRIVATE_KEY_FILE
from geo_route.devstack.skopeo import docker_reference
from geo_route.devstack.stack import RunningStack, bring_up
from geo_route.errors import IndexUnavailable
from geo_route.index.model import TagInvalidated
from geo_route.index.redis_store import RedisIndexStore
from geo_route.updater.reconcile import Registries
from geo_route.updater.registry_client import ManifestHead
from geo_route.updater.resolver import Resolver, TagSource

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

    def store(self, **redis: object) -> RedisIndexStore:
        """A store of the test's own: a key prefix of its own, on the stack's Redis unless ``url``."""
        prefix = f"t{uuid.uuid4().hex[:10]}:"
        return RedisIndexStore(dataclasses.replace(self.settings.redis, key_prefix=prefix, **redis))


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
    second = RedisIndexStore(dataclasses.replace(site.settings.redis, key_prefix=first.keys.prefix))
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
