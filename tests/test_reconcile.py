"""Reconciliation against the real development stack (two docker-registry 2.8, redis, NGINX).

The stack's updater is stopped at once, so the registries' notifications never reach the index: what
the index holds is what a test (or reconciliation) put there. Images reach the local registry the
way GitLab Geo copies them (``replicate_image``), which writes nothing into the index.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from cryptography.hazmat.primitives.asymmetric import rsa

from geo_route.config import Settings, load_settings
from geo_route.devstack.client import StackClient
from geo_route.devstack.images import OciImage, build_oci_image, canonical_json, tag_manifest, write_blob
from geo_route.devstack.keys import PRIVATE_KEY_FILE, serialize_private_key
from geo_route.devstack.replicate import replicate_image
from geo_route.devstack.skopeo import docker_reference
from geo_route.devstack.stack import bring_up
from geo_route.index.model import BlobPresence, LocalTag, ManifestPresence, PrimaryTag
from geo_route.index.redis_store import RedisIndexStore
from geo_route.updater.reconcile import LOCK_NAME, open_store, reconcile, run_reconcile_command
from geo_route.updater.reconcile_cycle import ReconcileLoop
from geo_route.updater.reconcile_report import Progress
from geo_route.updater.registry_client import OCI_INDEX

PHANTOM = "sha256:" + "0" * 64
PHANTOM_BLOB = "sha256:" + "1" * 64
DURING = "sha256:" + "2" * 64
DURING_BLOB = "sha256:" + "3" * 64
ELSEWHERE = "sha256:" + "4" * 64


@dataclasses.dataclass
class Site:
    client: StackClient
    settings: Settings
    store: RedisIndexStore
    images: Path

    def build(self, tag: str = "v1", variant: str = "") -> OciImage:
        return build_oci_image(self.images / f"image-{variant or 'base'}", tag, variant=variant, layer_count=2)

    def publish(self, built: OciImage, repository: str, tag: str = "v1") -> str:
        """Push to the primary (through NGINX) and copy to the local registry as Geo does."""
        self.client.push(built, repository, tag)
        self.replicate(repository, tag)
        return built.digest

    def replicate(self, repository: str, tag: str) -> None:
        creds = self.client.credentials()
        client = self.client
        replicate_image(
            client.skopeo,
            client.primary,
            client.local_registry,
            repository,
            [tag],
            source_creds=creds,
            destination_creds=creds,
        )

    def flush_index(self) -> None:
        with redis.Redis.from_url(self.client.info.redis_url) as connection:
            connection.flushdb()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    running = bring_up(tmp_path / "stack")
    running.stop_part("updater")  # no notification reaches the index: the tests own it
    client = StackClient(running.info, running)
    key = Path(running.info.directory) / "keys" / PRIVATE_KEY_FILE
    settings = load_settings(running.info.site_file, environ={"GEO_ROUTE_UPDATER__SIGNING_KEY": str(key)})
    store = open_store(settings)
    try:
        yield Site(client, settings, store, tmp_path / "images")
    finally:
        store.close()
        client.close()
        running.stop()


def local_pull_routes(site: Site, repository: str, tag: str, out: Path) -> set[tuple[str, str, int]]:
    since = site.client.access_log_offset()
    site.client.pull(repository, tag, out)
    entries = [
        e
        for e in site.client.access_log(since)
        if e.uri.startswith(f"/v2/{repository}/") and ("/blobs/" in e.uri or "/manifests/" in e.uri)
    ]
    return {(e.route, e.reason, e.status) for e in entries}


def test_an_empty_index_is_filled_and_pulls_become_local(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("geo_route.updater.registry_client.PAGE_SIZE", 1)  # the catalog comes in pages (Link header)
    v1, v2 = site.build("v1"), site.build("v2", variant="two")
    site.publish(v1, "team/app", "v1")
    site.publish(v2, "team/app", "v2")
    other = site.build("v1", variant="other")
    site.publish(other, "team/other", "v1")
    site.flush_index()

    progress: list[Progress] = []
    report = reconcile(site.settings, site.store, progress=progress.append, progress_every=1)

    assert report.ok, report.format()
    assert report.repositories == 2
    app_blobs = set(v1.blob_digests) | set(v2.blob_digests)
    assert (report.manifests.seen, report.manifests.added, report.manifests.removed) == (3, 3, 0)
    expected_blobs = len(app_blobs) + len(other.blob_digests)
    assert (report.blobs.seen, report.blobs.added, report.blobs.removed) == (expected_blobs, expected_blobs, 0)
    assert (report.local_tags.seen, report.local_tags.added, report.local_tags.removed) == (3, 3, 0)
    assert (report.primary_tags.refreshed, report.primary_tags.changed, report.primary_tags.removed) == (3, 0, 0)
    assert report.missing_blobs == 0
    assert [p.manifests for p in progress] == [1, 2, 3]
    assert site.store.local_snapshot("team/app") == (app_blobs, {v1.digest, v2.digest})
    assert site.store.local_tags("team/app") == {"v1": v1.digest, "v2": v2.digest}
    assert site.store.local_tags("team/other") == {"v1": other.digest}
    pin = site.store.primary_tag("team/app", "v2")
    assert pin is not None and pin[0] == v2.digest

    routes = local_pull_routes(site, "team/app", "v2", tmp_path / "out")
    assert {route for route, _, _ in routes} == {"local"}
    assert ("local", "tag-pinned", 200) in routes

    again = reconcile(site.settings, site.store)
    assert again.ok and (again.manifests.added, again.blobs.added, again.local_tags.added) == (0, 0, 0)
    assert (again.manifests.removed, again.blobs.removed, again.local_tags.removed) == (0, 0, 0)
    assert "3 seen, +0 -0" in again.format()


def test_stale_entries_go_but_updates_made_during_the_walk_stay(site: Site) -> None:
    built = site.build()
    site.publish(built, "team/app")
    layer = built.layers[-1].digest
    site.store.apply(
        [
            ManifestPresence("team/app", PHANTOM, True),  # the local registry has neither
            BlobPresence("team/app", PHANTOM_BLOB, True),
            LocalTag("team/app", "gone", PHANTOM),
            ManifestPresence("ghost/app", PHANTOM, True),  # a repository the catalog does not list
            BlobPresence("ghost/app", PHANTOM_BLOB, True),
            LocalTag("ghost/app", "v1", PHANTOM),
            BlobPresence("team/app", layer, True),
            LocalTag("team/app", "v1", built.digest),
        ]
    )

    def notifications_during_the_walk(progress: Progress) -> None:
        site.store.apply(
            [
                ManifestPresence("team/app", DURING, True),  # pushed after the snapshot: kept
                BlobPresence("team/app", DURING_BLOB, True),
                LocalTag("team/app", "new", DURING),
                LocalTag("team/app", "v1", ELSEWHERE),  # re-tagged after the walk read it: not overwritten
                BlobPresence("team/app", layer, False),  # deleted after the walk saw it: not re-added
            ]
        )

    report = reconcile(site.settings, site.store, progress=notifications_during_the_walk, progress_every=1)

    assert report.ok, report.format()
    blobs, manifests = site.store.local_snapshot("team/app")
    assert manifests == {built.digest, DURING}
    assert blobs == (set(built.blob_digests) - {layer}) | {DURING_BLOB}
    assert site.store.local_tags("team/app") == {"v1": ELSEWHERE, "new": DURING}
    assert site.store.local_snapshot("ghost/app") == (set(), set())
    assert site.store.local_tags("ghost/app") == {}
    assert (report.manifests.added, report.manifests.removed) == (1, 2)
    assert (report.blobs.added, report.blobs.removed) == (len(built.blob_digests) - 1, 2)
    assert (report.local_tags.added, report.local_tags.removed) == (0, 2)


def test_primary_pins_follow_the_primary(site: Site, tmp_path: Path) -> None:
    old = site.build()
    site.publish(old, "team/app")
    site.flush_index()
    first = reconcile(site.settings, site.store)
    assert first.ok and first.primary_tags.refreshed == 1
    pin = site.store.primary_tag("team/app", "v1")
    assert pin is not None and pin[0] == old.digest

    moved = site.build(variant="moved")
    primary_v1 = docker_reference(site.client.primary, "team/app", "v1")
    site.client.skopeo.copy(moved.reference, primary_v1, dest_creds=site.client.credentials())  # pushed at the primary
    site.store.apply(
        [
            PrimaryTag("team/app", "deleted", PHANTOM, time.time() - 60),  # the primary has no such tag
            PrimaryTag("team/newer", "v1", ELSEWHERE, time.time() + 3600),  # newer than the question: kept
        ]
    )
    report = reconcile(site.settings, site.store)

    assert report.ok, report.format()
    assert (report.primary_tags.refreshed, report.primary_tags.changed, report.primary_tags.removed) == (1, 1, 2)
    pin = site.store.primary_tag("team/app", "v1")
    assert pin is not None and pin[0] == moved.digest
    assert site.store.primary_tag("team/app", "deleted") is None
    kept = site.store.primary_tag("team/newer", "v1")
    assert kept is not None and kept[0] == ELSEWHERE
    assert site.store.local_tags("team/app") == {"v1": old.digest}  # the local registry still has the old one
    routes = local_pull_routes(site, "team/app", "v1", tmp_path / "out")
    assert ("primary", "tag-not-local", 200) in routes


def test_one_reconciliation_at_a_time(site: Site) -> None:
    site.publish(site.build(), "team/app")
    inside, release = threading.Event(), threading.Event()
    reports = []

    def hold(progress: Progress) -> None:
        inside.set()
        release.wait(30)

    first = threading.Thread(
        target=lambda: reports.append(reconcile(site.settings, site.store, progress=hold, progress_every=1))
    )
    first.start()
    try:
        assert inside.wait(30)
        second = reconcile(site.settings, site.store)
        assert second.locked and not second.ok
        assert "lock" in second.format()
    finally:
        release.set()
        first.join(30)
    assert reports and reports[0].ok
    assert site.store.try_lock(LOCK_NAME, 5)  # released at the end of the run
    site.store.unlock(LOCK_NAME)


def build_image_index(site: Site, tag: str) -> tuple[str, list[OciImage]]:
    """An OCI image index of two platform images, in one OCI layout (skopeo copies it with --all)."""
    layout = site.images / "multi"
    children = [build_oci_image(layout, f"{tag}-{arch}", variant=arch, layer_count=2) for arch in ("amd64", "arm64")]
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {**child.manifest.descriptor(), "platform": {"architecture": arch, "os": "linux"}}
            for child, arch in zip(children, ("amd64", "arm64"), strict=True)
        ],
    }
    blob = write_blob(layout, OCI_INDEX, canonical_json(index))
    tag_manifest(layout, tag, blob)
    return blob.digest, children


def test_an_image_index_and_its_children_are_walked(site: Site) -> None:
    digest, children = build_image_index(site, "multi")
    site.client.skopeo.copy(
        f"oci:{site.images / 'multi'}:multi",
        f"docker://{site.client.secondary}/team/multi:v1",
        dest_creds=site.client.credentials(),
    )
    site.replicate("team/multi", "v1")
    site.flush_index()

    report = reconcile(site.settings, site.store)

    assert report.ok, report.format()
    blobs = {d for child in children for d in child.blob_digests}
    assert (report.manifests.seen, report.manifests.added) == (3, 3)
    assert (report.blobs.seen, report.blobs.added) == (len(blobs), len(blobs))
    assert site.store.local_snapshot("team/multi") == (blobs, {digest, *(c.digest for c in children)})
    assert site.store.local_tags("team/multi") == {"v1": digest}


def test_the_command_and_the_loop(site: Site) -> None:
    site.publish(site.build(), "team/app")
    lines: list[str] = []
    assert run_reconcile_command(site.settings, True, lines.append) == 0
    assert lines[-1].startswith("reconcile: ok")

    unusable = dataclasses.replace(site.settings, updater=dataclasses.replace(site.settings.updater, signing_key=""))
    lines.clear()
    assert run_reconcile_command(unusable, True, lines.append) == 1
    assert "signing_key" in lines[-1]

    site.flush_index()
    every_second = dataclasses.replace(site.settings.updater, reconcile_interval=1)
    loop = ReconcileLoop(dataclasses.replace(site.settings, updater=every_second))
    loop.start()
    try:
        deadline = time.monotonic() + 30
        while loop.runs < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        loop.stop()
    assert loop.runs >= 2
    assert loop.last_report is not None and loop.last_report.ok
    assert site.store.local_tags("team/app") != {}


def test_registry_trouble_removes_nothing(site: Site, tmp_path: Path) -> None:
    built = site.build()
    site.publish(built, "team/app")
    assert reconcile(site.settings, site.store).ok
    filled = site.store.local_snapshot("team/app"), site.store.local_tags("team/app")

    stranger = tmp_path / "stranger.key"  # a key neither registry trusts: every request is refused (401)
    stranger.write_bytes(serialize_private_key(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    untrusted = dataclasses.replace(
        site.settings, updater=dataclasses.replace(site.settings.updater, signing_key=str(stranger))
    )
    refused = reconcile(untrusted, site.store)
    # the catalog, the primary's answer for team/app:v1, and its answer for the manifest held here
    assert not refused.ok and refused.errors == 3
    assert all("HTTP 401" in message for message in refused.error_samples)

    stop = threading.Event()
    stop.set()
    cancelled = reconcile(site.settings, site.store, stop=stop)
    assert cancelled.cancelled and not cancelled.ok and cancelled.repositories == 0

    assert site.client.stack is not None
    site.client.stack.stop_part("secondary")
    unreachable = reconcile(site.settings, site.store)
    assert not unreachable.ok and "ConnectionRefusedError" in unreachable.error_samples[0]
    assert (site.store.local_snapshot("team/app"), site.store.local_tags("team/app")) == filled
