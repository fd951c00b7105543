"""The index contract, free of redis: what a decision asks, what it gets back, what writers apply."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol


class QueryKind(Enum):
    BLOB = "blob"
    MANIFEST = "manifest"
    TAG = "tag"


@dataclass(frozen=True, slots=True)
class IndexQuery:
    """The one lookup a decision needs: a blob or manifest by digest, or a tag's pinned digest."""

    kind: QueryKind
    repository: str
    reference: str  # a digest for BLOB/MANIFEST, a tag for TAG


@dataclass(frozen=True, slots=True)
class IndexView:
    """What the index said. ``available`` False means it could not answer (route to the primary)."""

    available: bool = True
    present: bool = False  # BLOB/MANIFEST: present locally; TAG: the pinned manifest is present locally
    pinned_digest: str = ""  # TAG: the digest the primary last published for the tag
    confirmed_at: float = 0.0  # TAG: when that digest was last confirmed (unix seconds)


UNAVAILABLE = IndexView(available=False)
NOT_ASKED = IndexView()


@dataclass(frozen=True, slots=True)
class BlobPresence:
    repository: str
    digest: str
    present: bool


@dataclass(frozen=True, slots=True)
class ManifestPresence:
    repository: str
    digest: str
    present: bool


@dataclass(frozen=True, slots=True)
class PrimaryTag:
    """The primary's tag → digest, confirmed at a time; ``digest`` empty removes the tag."""

    repository: str
    tag: str
    digest: str
    confirmed_at: float = 0.0


@dataclass(frozen=True, slots=True)
class LocalTag:
    """The local registry's tag → digest; ``digest`` empty removes the tag."""

    repository: str
    tag: str
    digest: str


IndexUpdate = BlobPresence | ManifestPresence | PrimaryTag | LocalTag


class IndexStore(Protocol):
    def lookup(self, query: IndexQuery) -> IndexView:
        """One round trip; raises ``IndexUnavailable`` when the index cannot answer in time."""

    def apply(self, updates: Iterable[IndexUpdate]) -> None:
        """All updates in one transaction, or none; raises ``IndexUnavailable``."""

    def ping(self) -> bool:
        """True when the index answers."""
