"""The index contract, free of redis: what a decision asks, what it gets back, what writers apply."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol, runtime_checkable

from geo_route.errors import GeoRouteError


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
    # TAG: a pin older than this (or none, or one of an older index epoch) is queued for
    # resolution at the primary by the same round trip; 0: only missing or unconfirmed entries.
    refresh_after: float = 0.0
    # BLOB/MANIFEST: NGINX saw this client address fetch it whole from here just before (a client
    # that rejected the bytes retries): present only if verified within routing.refetch_trust,
    # else queued for verification first (``IndexView.verifying``).
    refetch: bool = False
    # BLOB/MANIFEST with ``refetch``: a verification older than this is asked for again (the content
    # is still served here meanwhile); 0: never.
    recheck_after: float = 0.0


@dataclass(frozen=True, slots=True)
class IndexView:
    """What the index said. ``available`` False means it could not answer (route to the primary)."""

    available: bool = True
    present: bool = False  # BLOB/MANIFEST: present locally (and not deleted at the primary);
    #                        TAG: the pinned manifest is present locally
    pinned_digest: str = ""  # TAG: the digest the primary answered for the tag ("" none, or a tombstone)
    confirmed_at: float = 0.0  # TAG: when the primary was asked for it (the index's clock, unix seconds)
    media_type: str = ""  # TAG: the media type the primary answered with that digest
    current: bool = True  # TAG: the pin was written in the index's current epoch (see docs/consistency.md)
    now: float = 0.0  # TAG: the index's clock when it answered (0: not given)
    quarantined: bool = False  # BLOB/MANIFEST: the local copy failed verification (never served here)
    verifying: bool = False  # BLOB/MANIFEST: a refetch, and the local copy is queued for verification


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
    """The primary's answer for a tag, asked at ``confirmed_at`` on the index's clock.

    ``digest`` empty: the primary answered 404 (a tombstone). It lands only if it is newer than
    what the index holds (a pin strictly newer; a tombstone at least as new), deletes included.
    ``hint`` is the claimed resolution's hint, cleared when the pin lands (see ``TagResolution``);
    ``claimed_until`` the claim it answers, released as the pin is written (0: none).
    """

    repository: str
    tag: str
    digest: str
    confirmed_at: float = 0.0
    media_type: str = ""
    hint: str = ""
    epoch: str = ""  # the index epoch it was asked in ("" = any): an answer from before a restart never lands
    claimed_until: float = 0.0


@dataclass(frozen=True, slots=True)
class TagInvalidated:
    """Something changed a tag (an event, or a write through this site): tombstone it now and queue
    a resolution. ``fence`` seconds push the tombstone's stamp (and the resolution) into the future,
    so no answer asked before then lands (a write still in flight). ``hint``: the digest an event
    says the tag now has (a resolution that answers otherwise is retried before it pins)."""

    repository: str
    tag: str
    hint: str = ""
    fence: float = 0.0


@dataclass(frozen=True, slots=True)
class DigestDeleted:
    """A manifest (or blob) deleted at the primary: not served by digest here any more, and every
    tag the index pins to it is invalidated."""

    repository: str
    digest: str
    fence: float = 0.0


@dataclass(frozen=True, slots=True)
class DigestRestored:
    """The primary had ``digest`` again when asked at ``asked_at`` (index clock): clear a deletion
    mark older than that. ``asked_at`` None: unconditionally (the local registry deleted it too)."""

    repository: str
    digest: str
    asked_at: float | None = None


@dataclass(frozen=True, slots=True)
class RepositoryInvalidated:
    """Every tag the index pins in ``repository`` (and, with ``subtree``, in every repository under
    ``repository/``) is invalidated: a rename, or an event that could not be read."""

    repository: str
    subtree: bool = False
    fence: float = 0.0


@dataclass(frozen=True, slots=True)
class ContentVerified:
    """The verifier read ``digest`` back from the local registry (as ``repository``'s blob or
    manifest) and compared its digest: ``intact`` False quarantines it (not served here from any
    repository: registries store content once per digest, so every repository shares the bad
    copy), True lifts a quarantine; ``trust`` > 0 (a verification a refetch asked for) serves
    refetches of it locally for that many seconds."""

    repository: str
    digest: str
    intact: bool
    trust: float = 0.0
    manifest: bool = False  # read as a manifest (by digest), not as a blob


@dataclass(frozen=True, slots=True)
class LocalRepositoryDropped:
    """The local registry has nothing under ``repository`` any more (GitLab renamed it away): its
    blobs, manifests and tags are forgotten, with ``subtree`` those of every repository under it
    too. Reconciliation finds the content under its new path."""

    repository: str
    subtree: bool = False


@dataclass(frozen=True, slots=True)
class LocalTag:
    """The local registry's tag → digest; ``digest`` empty removes the tag."""

    repository: str
    tag: str
    digest: str


@dataclass(frozen=True, slots=True)
class TagResolution:
    """A queued question for the primary: what does ``repository:tag`` point at now?

    ``asked_at`` is the index's clock when it was claimed (before the question is sent), ``epoch``
    the index's epoch then; ``hint`` the digest an event announced (``""`` none) and ``attempts``
    how often it was already retried. ``claimed_until``: the claim's end on the index's clock; until
    then the tag stays in the queue, invisible to other claims, and its pin or requeue releases it.
    An updater that dies (or meets a failed write) before either leaves it to be claimed again then."""

    repository: str
    tag: str
    asked_at: float
    hint: str = ""
    attempts: int = 0
    epoch: str = ""
    claimed_until: float = 0.0


IndexUpdate = (
    BlobPresence
    | ManifestPresence
    | PrimaryTag
    | LocalTag
    | LocalRepositoryDropped
    | TagInvalidated
    | DigestDeleted
    | DigestRestored
    | RepositoryInvalidated
    | ContentVerified
)


class IndexStore(Protocol):
    def lookup(self, query: IndexQuery) -> IndexView:
        """One round trip; raises ``IndexUnavailable`` when the index cannot answer in time."""

    def apply(self, updates: Iterable[IndexUpdate]) -> None:
        """All updates in one transaction, or none; raises ``IndexUnavailable``."""

    def ping(self) -> bool:
        """True when the index answers."""


@dataclass(frozen=True, slots=True)
class IndexFigures:
    """The updater's queues and the quarantine, read in one round trip (``/metrics``, ``status``).

    ``*_oldest_due``: how long the longest-waiting due entry has waited (0 when none is due)."""

    now: float
    resolutions: int
    resolutions_due: int
    resolutions_oldest_due: float
    suspects: int
    suspects_oldest_due: float
    quarantined: int
    repositories: int


@dataclass(frozen=True, slots=True)
class PinEntry:
    """One tag's entry on the index as ``status`` shows it: a pin or a tombstone (``digest`` "")."""

    repository: str
    tag: str
    digest: str
    confirmed_at: float
    current: bool  # of the index's current epoch


@dataclass(frozen=True, slots=True)
class StatusRecord:
    """What the updater last recorded under a name (``reconcile``, ``verify``, ``events:local``...):
    when (the index's clock) and a few figures."""

    at: float
    fields: dict[str, float | int | str | bool]


@dataclass(frozen=True, slots=True)
class RedisTopology:
    """Where the index lives, without credentials: addresses, roles and what each sentinel says."""

    mode: str  # "single" | "sentinel"
    primary: str  # host:port (or unix path) of the node the store talks to
    role: str = ""
    version: str = ""
    used_memory: str = ""
    replicas: tuple[str, ...] = ()  # "host:port state lag"
    master_name: str = ""
    sentinels: tuple[tuple[str, str], ...] = ()  # (sentinel address, the primary it names or "unreachable")


@runtime_checkable
class StatusRecorder(Protocol):
    def record_status(self, name: str, fields: dict[str, float | int | str | bool]) -> None:
        """Keep ``fields`` under ``name``, stamped with the index's clock (one small hash, bounded)."""


def record_status_of(store: object, name: str, fields: dict[str, float | int | str | bool]) -> bool:
    """Record ``fields`` if ``store`` keeps status records (the Redis store does; test doubles may
    not). Best effort: False when it could not, never raised (the work it describes is done)."""
    if not isinstance(store, StatusRecorder):
        return False
    try:
        store.record_status(name, fields)
    except GeoRouteError:
        return False
    return True
