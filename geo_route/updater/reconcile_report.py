"""What a reconciliation did, and the progress it reports while it runs."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_ERROR_SAMPLES = 10


@dataclass
class Tally:
    """One kind of index entry: how many the registry showed, how many were added and removed."""

    seen: int = 0
    added: int = 0
    removed: int = 0

    def merge(self, other: Tally) -> None:
        self.seen += other.seen
        self.added += other.added
        self.removed += other.removed

    def format(self) -> str:
        return f"{self.seen} seen, +{self.added} -{self.removed}"


@dataclass
class RepositoryTally:
    """The counts of one repository's reconciliation (merged into the report by the coordinating thread)."""

    manifests: Tally = field(default_factory=Tally)
    blobs: Tally = field(default_factory=Tally)
    local_tags: Tally = field(default_factory=Tally)
    missing_blobs: int = 0  # referenced by a manifest that is here, but not here themselves


@dataclass
class PrimaryTally:
    refreshed: int = 0  # tags the primary answered for (their pins re-confirmed)
    changed: int = 0  # ... of which the digest differed from the pin
    removed: int = 0  # pinned tags the primary no longer has (404)
    deleted: int = 0  # manifests held here that the primary no longer has (404 by digest): marked deleted


@dataclass
class ReconcileReport:
    """Counts of one run; ``ok`` when it ran to the end without an error."""

    locked: bool = False  # another reconciliation holds the lock: nothing was done
    cancelled: bool = False
    repositories: int = 0
    manifests: Tally = field(default_factory=Tally)
    blobs: Tally = field(default_factory=Tally)
    local_tags: Tally = field(default_factory=Tally)
    missing_blobs: int = 0
    primary_tags: PrimaryTally = field(default_factory=PrimaryTally)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.locked and not self.cancelled and self.errors == 0

    def add_repository(self, tally: RepositoryTally) -> None:
        self.repositories += 1
        self.manifests.merge(tally.manifests)
        self.blobs.merge(tally.blobs)
        self.local_tags.merge(tally.local_tags)
        self.missing_blobs += tally.missing_blobs

    def add_errors(self, messages: list[str]) -> None:
        self.errors += len(messages)
        room = MAX_ERROR_SAMPLES - len(self.error_samples)
        self.error_samples += messages[: max(room, 0)]

    def status_fields(self) -> dict[str, float | int | str | bool]:
        """What ``geo-route status`` shows of the last run (kept in the index)."""
        pins = self.primary_tags
        return {
            "ok": self.ok,
            "cancelled": self.cancelled,
            "seconds": round(self.seconds, 3),
            "repositories": self.repositories,
            "added": self.manifests.added + self.blobs.added + self.local_tags.added,
            "removed": self.manifests.removed + self.blobs.removed + self.local_tags.removed,
            "tags_confirmed": pins.refreshed,
            "tags_moved": pins.changed,
            "tags_removed": pins.removed,
            "errors": self.errors,
            **({"first_error": self.error_samples[0][:200]} if self.error_samples else {}),
        }

    def format(self) -> str:
        if self.locked:
            return "reconcile: another reconciliation is running (lock held); nothing done"
        status = "cancelled" if self.cancelled else ("ok" if self.ok else "finished with errors")
        pins = self.primary_tags
        lines = [
            f"reconcile: {status} in {self.seconds:.2f} s, {self.repositories} repositories",
            f"  manifests   {self.manifests.format()}",
            f"  blobs       {self.blobs.format()}, {self.missing_blobs} referenced but missing",
            f"  local tags  {self.local_tags.format()}",
            f"  primary     {pins.refreshed} tags confirmed, {pins.changed} moved, {pins.removed} removed, "
            f"{pins.deleted} manifests deleted there",
            f"  errors      {self.errors}",
        ]
        lines += [f"    {message}" for message in self.error_samples]
        return "\n".join(lines)


@dataclass(frozen=True)
class Progress:
    """Sent to the progress callback every N manifests read."""

    manifests: int
    repositories_done: int
    repositories_total: int
    seconds: float

    def format(self) -> str:
        rate = self.manifests / self.seconds if self.seconds > 0 else 0.0
        done, total = self.repositories_done, self.repositories_total
        seconds = f"{self.seconds:.1f} s ({rate:.0f} manifests/s)"
        return f"reconcile: {self.manifests} manifests, {done}/{total} repositories, {seconds}"
