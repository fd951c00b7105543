"""One repository of the local registry, walked and compared with what the index held before.

``RepositoryWalker.walk`` lists the tags, reads every tagged manifest (``Accept`` with the OCI and
Docker types), the children of image indexes by digest, ``HEAD``s every referenced blob, and finally
asks directly about every digest the *before* snapshot claims that the walk did not meet (an untagged
manifest, a blob of an old image), so a removal is always backed by a 404 of its own.

``plan_updates`` (pure) turns that into index updates, using a second snapshot taken just before
they are applied, so notifications processed during the walk win:

* added: what the walk found and neither snapshot held (something a notification removed during the
  walk, in *before* but not *after*, is not re-added);
* removed: what the registry answered 404 for and both snapshots still held (anything a notification
  added during the walk is not in *before*, so it is never removed);
* local tags: set when the walk saw another digest and the tag did not change during the walk;
  removed only when the tag list was read, the tag is not in it, and the tag still has its old value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TypeVar

from geo_route.index.model import BlobPresence, IndexUpdate, LocalTag, ManifestPresence
from geo_route.updater.reconcile_report import RepositoryTally
from geo_route.updater.registry_client import Manifest, RegistryClient, RegistryError

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Snapshot:
    """What the index held as present locally for one repository at one moment."""

    blobs: frozenset[str] = frozenset()
    manifests: frozenset[str] = frozenset()
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Found:
    """What the local registry answered for one repository."""

    tags_listed: bool = False
    tags: dict[str, str] = field(default_factory=dict)  # tag → manifest digest
    unread_tags: set[str] = field(default_factory=set)  # listed, but reading the manifest failed
    manifests: dict[str, Manifest | None] = field(default_factory=dict)  # None: present, not read (HEAD)
    blobs: set[str] = field(default_factory=set)
    absent_manifests: set[str] = field(default_factory=set)  # answered 404
    absent_blobs: set[str] = field(default_factory=set)  # answered 404
    unknown_manifests: set[str] = field(default_factory=set)  # reading failed: neither added nor removed
    referenced_blobs: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)


def gather(pool: Executor, call: Callable[[T], R], items: Iterable[T]) -> list[tuple[T, R | RegistryError]]:
    """``call`` for every item on the pool; a ``RegistryError`` is returned in place of its result."""

    def captured(item: T) -> R | RegistryError:
        try:
            return call(item)
        except RegistryError as exc:
            return exc

    futures = [(item, pool.submit(captured, item)) for item in items]
    return [(item, future.result()) for item, future in futures]


class RepositoryWalker:
    """Walks repositories of one registry; every request runs on ``pool`` (that bounds the concurrency)."""

    def __init__(self, client: RegistryClient, pool: Executor, on_manifest: Callable[[], None]) -> None:
        self.client = client
        self.pool = pool
        self.on_manifest = on_manifest

    def walk(self, repository: str, before: Snapshot) -> Found:
        found = Found()
        ((_, tags),) = gather(self.pool, self.client.list_tags, [repository])
        if isinstance(tags, RegistryError):
            found.errors.append(str(tags))
            tags = []
        else:
            found.tags_listed = True
        self.read_tagged_manifests(repository, tags or [], found)
        self.read_children(repository, found)
        self.check_blobs(repository, sorted(found.referenced_blobs), found)
        unmet = before.manifests - found.manifests.keys() - found.absent_manifests - found.unknown_manifests
        self.verify_manifests(repository, sorted(unmet), found)
        self.check_blobs(repository, sorted(before.blobs - found.blobs - found.absent_blobs), found)
        return found

    def read_tagged_manifests(self, repository: str, tags: list[str], found: Found) -> None:
        for tag, manifest in gather(self.pool, lambda tag: self.read_manifest(repository, tag), tags):
            if isinstance(manifest, RegistryError):
                found.unread_tags.add(tag)
                found.errors.append(str(manifest))
            elif manifest is not None:  # None: the tag went away between the list and the read
                found.tags[tag] = manifest.digest
                self.record(manifest, found)

    def read_children(self, repository: str, found: Found) -> None:
        """Children of image indexes, by digest, level by level (an index may hold indexes)."""
        pending = self.unread_children(found)
        while pending:
            for digest, manifest in gather(self.pool, lambda d: self.read_manifest(repository, d), pending):
                if isinstance(manifest, RegistryError):
                    found.errors.append(str(manifest))
                    found.unknown_manifests.add(digest)
                elif manifest is None:
                    found.absent_manifests.add(digest)
                else:
                    self.record(manifest, found)
            pending = self.unread_children(found)

    @staticmethod
    def unread_children(found: Found) -> list[str]:
        children = {c for m in found.manifests.values() if m is not None for c in m.children}
        return sorted(children - found.manifests.keys() - found.absent_manifests - found.unknown_manifests)

    def read_manifest(self, repository: str, reference: str) -> Manifest | None:
        manifest = self.client.get_manifest(repository, reference)
        if manifest is not None:
            self.on_manifest()
        return manifest

    @staticmethod
    def record(manifest: Manifest, found: Found) -> None:
        found.manifests[manifest.digest] = manifest
        found.referenced_blobs.update(manifest.blobs)

    def check_blobs(self, repository: str, digests: list[str], found: Found) -> None:
        for digest, present in gather(self.pool, lambda d: self.client.has_blob(repository, d), digests):
            if isinstance(present, RegistryError):
                found.errors.append(str(present))
            elif present:
                found.blobs.add(digest)
            else:
                found.absent_blobs.add(digest)

    def verify_manifests(self, repository: str, digests: list[str], found: Found) -> None:
        """Digests the index claims and the walk did not meet: ``HEAD`` each one by digest."""
        for digest, answer in gather(self.pool, lambda d: self.client.head_manifest(repository, d), digests):
            if isinstance(answer, RegistryError):
                found.errors.append(str(answer))
            elif answer is None:
                found.absent_manifests.add(digest)
            else:
                found.manifests.setdefault(digest, None)


def plan_updates(
    repository: str, before: Snapshot, after: Snapshot, found: Found
) -> tuple[list[IndexUpdate], RepositoryTally]:
    """The index updates for one walked repository, and their counts (see the module docstring)."""
    tally = RepositoryTally(missing_blobs=len(found.referenced_blobs & found.absent_blobs))
    present = set(found.manifests)
    updates: list[IndexUpdate] = []

    add_manifests = present - before.manifests - after.manifests
    remove_manifests = found.absent_manifests & before.manifests & after.manifests
    updates += [ManifestPresence(repository, d, True) for d in sorted(add_manifests)]
    updates += [ManifestPresence(repository, d, False) for d in sorted(remove_manifests)]
    tally.manifests.seen, tally.manifests.added, tally.manifests.removed = (
        len(present),
        len(add_manifests),
        len(remove_manifests),
    )

    add_blobs = found.blobs - before.blobs - after.blobs
    remove_blobs = found.absent_blobs & before.blobs & after.blobs
    updates += [BlobPresence(repository, d, True) for d in sorted(add_blobs)]
    updates += [BlobPresence(repository, d, False) for d in sorted(remove_blobs)]
    tally.blobs.seen, tally.blobs.added, tally.blobs.removed = len(found.blobs), len(add_blobs), len(remove_blobs)

    tag_updates = plan_tag_updates(repository, before, after, found)
    tally.local_tags.seen = len(found.tags)
    tally.local_tags.added = sum(1 for u in tag_updates if u.digest)
    tally.local_tags.removed = len(tag_updates) - tally.local_tags.added
    return updates + list(tag_updates), tally


def plan_tag_updates(repository: str, before: Snapshot, after: Snapshot, found: Found) -> list[LocalTag]:
    updates = [
        LocalTag(repository, tag, digest)
        for tag, digest in sorted(found.tags.items())
        if before.tags.get(tag) == after.tags.get(tag) != digest
    ]
    if found.tags_listed:
        updates += [
            LocalTag(repository, tag, "")
            for tag, digest in sorted(before.tags.items())
            if tag not in found.tags and tag not in found.unread_tags and after.tags.get(tag) == digest
        ]
    return updates
