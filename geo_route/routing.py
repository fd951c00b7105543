"""The routing decision: a pure function of (operation, credential, index view, policy, now).

No Flask, no redis, no clock reads. The web shell calls ``authorize`` first (a deny needs no index),
asks the index the one question ``index_query`` names, then calls ``route``; ``decide`` is the two
steps together for callers that already hold a view.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

from geo_route.access import Grants, format_scope
from geo_route.config import Dialect, RefetchRoute, Settings, TagPolicy
from geo_route.index.model import (
    DigestDeleted,
    IndexQuery,
    IndexUpdate,
    IndexView,
    QueryKind,
    RepositoryInvalidated,
    TagInvalidated,
)
from geo_route.negotiation import serves_pinned_manifest
from geo_route.operations import Kind, Operation, is_valid_digest
from geo_route.storage import blob_files, manifest_files
from geo_route.tokens import Credential, TokenProblem


class Route(Enum):
    LOCAL = "local"
    PRIMARY = "primary"


class Reason:
    """Machine-readable reasons sent in ``X-Geo-Reason`` and used as a metrics label."""

    BASE = "base"
    BLOB_LOCAL = "blob-local"
    BLOB_NOT_LOCAL = "blob-not-local"
    MANIFEST_LOCAL = "manifest-local"
    MANIFEST_NOT_LOCAL = "manifest-not-local"
    # The local copy failed verification (quarantined), or a refetch is waiting for its verification.
    BLOB_QUARANTINED = "blob-quarantined"
    BLOB_VERIFYING = "blob-verifying"
    MANIFEST_QUARANTINED = "manifest-quarantined"
    MANIFEST_VERIFYING = "manifest-verifying"
    TAG_PINNED = "tag-pinned"
    TAG_NOT_PINNED = "tag-not-pinned"
    TAG_NOT_LOCAL = "tag-not-local"
    TAG_STALE = "tag-stale"
    TAG_UNCONFIRMED = "tag-unconfirmed"
    TAG_NEGOTIATED = "tag-negotiated"
    TAG_POLICY_PRIMARY = "tag-policy-primary"
    LISTING = "listing"
    WRITE = "write"
    UPLOAD = "upload"
    DELETE = "delete"
    UNRECOGNIZED = "unrecognized"
    INDEX_UNAVAILABLE = "index-unavailable"
    INTERNAL_ERROR = "internal-error"
    NO_TOKEN = "no-token"
    INVALID_TOKEN = "invalid-token"
    INSUFFICIENT_SCOPE = "insufficient-scope"


UPLOAD_KINDS = frozenset(
    {
        Kind.UPLOAD_START,
        Kind.UPLOAD_MOUNT,
        Kind.UPLOAD_CONTINUE,
        Kind.UPLOAD_FINISH,
        Kind.UPLOAD_STATUS,
        Kind.UPLOAD_CANCEL,
    }
)
PRIMARY_BY_KIND = {
    Kind.CATALOG: Reason.LISTING,
    Kind.TAGS_LIST: Reason.LISTING,
    Kind.REFERRERS: Reason.LISTING,
    Kind.REPOSITORY_RENAME: Reason.WRITE,
    Kind.MANIFEST_PUT: Reason.WRITE,
    Kind.MANIFEST_DELETE: Reason.DELETE,
    Kind.BLOB_DELETE: Reason.DELETE,
    Kind.UNRECOGNIZED: Reason.UNRECOGNIZED,
    **{kind: Reason.UPLOAD for kind in UPLOAD_KINDS},
}


@dataclass(frozen=True, slots=True)
class Policy:
    """The settings a decision depends on."""

    realm: str
    service: str
    tag_policy: TagPolicy = "pinned"
    max_tag_age: float = 0.0  # seconds; 0 = a pinned tag never goes stale
    refresh_after: float = 0.0  # a read of a pin older than this queues its re-resolution (0: never)
    write_fence: float = 0.0  # a write through the site keeps its tags off the index this long
    cache_digest_seconds: float = 0.0  # how long NGINX may reuse a decision about a blob
    stale_if_error: float = 0.0  # a pin at most this old may be served if the primary is unreachable (0: never)
    dialect: Dialect = "distribution-2.8"  # the registries' challenge text and negotiation (token.dialect)
    refetch_recheck: float = 0.0  # a refetch of content verified longer ago asks for another verification
    refetch_route: RefetchRoute = "local"  # where a refetch waiting for its verification is served
    from_storage: bool = False  # NGINX sends a blob or manifest present here from the registry's files

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(
            realm=settings.token.realm,
            service=settings.token.service,
            tag_policy=settings.routing.tag_policy,
            max_tag_age=settings.routing.max_tag_age,
            refresh_after=settings.routing.refresh_after,
            write_fence=settings.routing.write_fence,
            cache_digest_seconds=settings.routing.cache_digest_seconds,
            stale_if_error=settings.routing.stale_if_error,
            dialect=settings.token.dialect,
            refetch_recheck=settings.routing.refetch_recheck,
            refetch_route=settings.routing.refetch_route,
            from_storage=bool(settings.local_registry.storage_root),
        )


@dataclass(frozen=True, slots=True)
class Decision:
    """200 with a route, or 401 with a challenge. Never anything else."""

    status: int
    reason: str
    route: Route | None = None
    upstream_path: str = ""
    www_authenticate: str = ""
    # PRIMARY: served from here instead if the primary is unreachable (a tag's last pin within
    # stale_if_error; a refetched blob or manifest waiting for its verification)
    stale_path: str = ""
    # LOCAL, a blob or manifest present here with from_storage: its file and the repository's link
    # to it, below the registry's storage root (NGINX sends the file if both exist, else asks the
    # registry)
    storage_path: str = ""
    storage_link: str = ""


def primary(reason: str) -> Decision:
    return Decision(200, reason, Route.PRIMARY)


def local(reason: str, upstream_path: str = "") -> Decision:
    return Decision(200, reason, Route.LOCAL, upstream_path)


def decide(
    operation: Operation, credential: Credential, view: IndexView, policy: Policy, now: float, accept: str = ""
) -> Decision:
    """Authorize, then route with the index view."""
    return authorize(operation, credential, policy) or route(operation, view, policy, now, accept)


def authorize(operation: Operation, credential: Credential, policy: Policy) -> Decision | None:
    """A 401 decision when the credential does not cover the operation, else ``None``.

    Unrecognized requests and GitLab's own API are not judged here: they go to the primary, which
    answers them itself.
    """
    if operation.kind in (Kind.UNRECOGNIZED, Kind.REPOSITORY_RENAME):
        return None
    scope = format_scope(operation.required)
    if isinstance(credential, TokenProblem):
        reason = Reason.NO_TOKEN if credential is TokenProblem.MISSING else Reason.INVALID_TOKEN
        challenge = format_challenge(policy, scope, challenge_error(policy, credential))
        return Decision(401, reason, www_authenticate=challenge)
    if not credential.allows_all(operation.required):
        challenge = format_challenge(policy, scope, "insufficient_scope")
        return Decision(401, Reason.INSUFFICIENT_SCOPE, www_authenticate=challenge)
    return None


def index_query(operation: Operation, policy: Policy, refetch: bool = False) -> IndexQuery | None:
    """The one index lookup ``route`` needs for this operation, or ``None`` when it needs none.

    ``refetch``: NGINX saw this client address fetch the same content whole from here just before
    (a GET of a blob or manifest by digest only)."""
    refetch = refetch and operation.method == "GET"
    recheck = policy.refetch_recheck
    if operation.kind is Kind.BLOB:
        return IndexQuery(
            QueryKind.BLOB, operation.repository, operation.digest, refetch=refetch, recheck_after=recheck
        )
    if operation.kind is Kind.MANIFEST_BY_DIGEST:
        digest = operation.digest
        return IndexQuery(QueryKind.MANIFEST, operation.repository, digest, refetch=refetch, recheck_after=recheck)
    if operation.kind is Kind.MANIFEST_BY_TAG and policy.tag_policy == "pinned":
        return IndexQuery(QueryKind.TAG, operation.repository, operation.tag, policy.refresh_after)
    return None


def route(operation: Operation, view: IndexView, policy: Policy, now: float, accept: str = "") -> Decision:
    """Where an authorized operation is served. Anything unsure goes to the primary.

    ``accept`` is the client's ``Accept`` header (a tag is local only when it negotiates to the pin).
    """
    kind = operation.kind
    if kind is Kind.BASE:
        return local(Reason.BASE)
    if kind in PRIMARY_BY_KIND:
        return primary(PRIMARY_BY_KIND[kind])
    if kind is Kind.MANIFEST_BY_TAG and policy.tag_policy == "primary":
        return primary(Reason.TAG_POLICY_PRIMARY)
    if not view.available:
        return primary(Reason.INDEX_UNAVAILABLE)
    if kind is Kind.BLOB:
        reasons = (Reason.BLOB_LOCAL, Reason.BLOB_NOT_LOCAL, Reason.BLOB_QUARANTINED, Reason.BLOB_VERIFYING)
        decision = _route_content(view, policy, f"/v2/{operation.repository}/blobs/{operation.digest}", *reasons)
        return with_storage_files(decision, operation, policy)
    if kind is Kind.MANIFEST_BY_DIGEST:
        path = f"/v2/{operation.repository}/manifests/{operation.digest}"
        reasons = (
            Reason.MANIFEST_LOCAL,
            Reason.MANIFEST_NOT_LOCAL,
            Reason.MANIFEST_QUARANTINED,
            Reason.MANIFEST_VERIFYING,
        )
        decision = _route_content(view, policy, path, *reasons)
        return with_storage_files(decision, operation, policy)
    if kind is Kind.MANIFEST_BY_TAG:
        decision = _route_pinned_tag(operation, view, policy, now, accept)
        if decision.route is Route.PRIMARY:
            return replace(decision, stale_path=stale_path(operation, view, policy, now, accept))
        return with_storage_files(decision, operation, policy, view.pinned_digest)
    return primary(Reason.UNRECOGNIZED)  # pragma: no cover - every kind is handled above


def _route_content(
    view: IndexView, policy: Policy, local_path: str, here: str, absent: str, quarantined: str, verifying: str
) -> Decision:
    """A blob or manifest by digest. A refetch waiting for its verification is served where
    ``refetch_route`` says; sent to the primary, the local copy (not known to be bad) stays the
    answer if the primary cannot be reached."""
    if view.present:
        return local(here)
    if view.quarantined:
        return primary(quarantined)
    if view.verifying and policy.refetch_route == "local":
        return local(verifying)
    if view.verifying:
        return replace(primary(verifying), stale_path=local_path)
    return primary(absent)


# The local answers NGINX may give from storage, and the files each is in.
STORED_REASONS = {
    Reason.BLOB_LOCAL: blob_files,
    Reason.MANIFEST_LOCAL: manifest_files,
    Reason.TAG_PINNED: manifest_files,
}


def with_storage_files(decision: Decision, operation: Operation, policy: Policy, digest: str = "") -> Decision:
    """A blob or manifest present here, or a tag's pinned manifest (never a refetch waiting for its
    verification), names its files when NGINX may send them itself (``local_registry.storage_root``).
    ``digest``: the pinned digest of a tag (else the operation's own)."""
    files_of = STORED_REASONS.get(decision.reason)
    if not policy.from_storage or files_of is None:
        return decision
    files = files_of(operation.repository, digest or operation.digest)
    if files is None:
        return decision
    return replace(decision, storage_path=files.data, storage_link=files.link)


def _route_pinned_tag(operation: Operation, view: IndexView, policy: Policy, now: float, accept: str) -> Decision:
    """Local only for a pin of the index's current epoch, within ``max_tag_age`` (on the index's
    clock when it gave one), whose manifest is here and is what this ``Accept`` negotiates to."""
    problem = pin_problem(view, now, accept, policy.max_tag_age, policy.dialect)
    if problem:
        return primary(problem)
    return local(Reason.TAG_PINNED, f"/v2/{operation.repository}/manifests/{view.pinned_digest}")


def pin_problem(view: IndexView, now: float, accept: str, max_age: float, dialect: Dialect) -> str:
    """Why a tag view cannot be answered locally from its pin (a ``Reason``), or "" when it can;
    ``max_age`` 0 means no bound on the pin's age; ``dialect`` the registries' (their negotiation)."""
    if not view.pinned_digest or not is_valid_digest(view.pinned_digest):
        return Reason.TAG_NOT_PINNED
    if not view.current:
        return Reason.TAG_UNCONFIRMED
    if max_age > 0 and (view.now or now) - view.confirmed_at > max_age:
        return Reason.TAG_STALE
    if not view.present:
        return Reason.TAG_NOT_LOCAL
    if not serves_pinned_manifest(view.media_type, accept, dialect):
        return Reason.TAG_NEGOTIATED
    return ""


def stale_path(operation: Operation, view: IndexView, policy: Policy, now: float, accept: str = "") -> str:
    """Stale-if-error: the local digest path NGINX may serve a tag read from when the primary
    cannot be reached, or "" when there is none.

    Only a GET/HEAD by tag; only a real pin (never a tombstone: the site knows the tag was deleted,
    moved or renamed away) of the index's current epoch, at most ``stale_if_error`` seconds old on
    the index's clock, whose manifest is here and is what this ``Accept`` negotiates to (the same
    rules as a local answer, ``pin_problem``, with ``stale_if_error`` in place of ``max_tag_age``).
    """
    if operation.kind is not Kind.MANIFEST_BY_TAG or policy.tag_policy != "pinned" or policy.stale_if_error <= 0:
        return ""
    if not view.available or pin_problem(view, now, accept, policy.stale_if_error, policy.dialect):
        return ""
    return f"/v2/{operation.repository}/manifests/{view.pinned_digest}"


def invalidations_for_write(operation: Operation, credential: Credential, policy: Policy) -> tuple[IndexUpdate, ...]:
    """What a write through this site changes at the primary, to take off the index before the
    write is proxied (read-your-writes): the tag a manifest ``PUT`` or ``DELETE`` names; every tag
    pinned to a manifest (or blob) deleted by digest, and the digest itself; every tag of a
    repository GitLab renames (and of the repositories under it). Each is fenced for
    ``write_fence`` seconds, so no answer the primary gives before the write lands can pin the old
    digest again. Only for a credential that passed ``authorize`` (a rename needs a valid token).
    """
    if policy.tag_policy != "pinned" or not isinstance(credential, Grants):
        return ()
    kind, repository, fence = operation.kind, operation.repository, policy.write_fence
    if kind in (Kind.MANIFEST_PUT, Kind.MANIFEST_DELETE) and operation.tag:
        return (TagInvalidated(repository, operation.tag, fence=fence),)
    if kind in (Kind.MANIFEST_DELETE, Kind.BLOB_DELETE) and operation.digest:
        return (DigestDeleted(repository, operation.digest, fence=fence),)
    if kind is Kind.REPOSITORY_RENAME:
        return (RepositoryInvalidated(repository, subtree=True, fence=fence),)
    return ()


BLOB_CACHEABLE = frozenset({Kind.BASE, Kind.BLOB})
# An outage answer, or a refetch waiting for its verification (its verdict lands within a second).
UNCACHEABLE_REASONS = frozenset(
    {Reason.INDEX_UNAVAILABLE, Reason.INTERNAL_ERROR, Reason.BLOB_VERIFYING, Reason.MANIFEST_VERIFYING}
)


def cache_seconds(operation: Operation, decision: Decision, credential: Credential, policy: Policy, now: float) -> int:
    """How long NGINX may reuse this decision for the same token, method and URI (0: not at all).

    Only blobs and ``/v2/`` are reused, for ``cache_digest_seconds`` and never past the token's
    ``exp``: a manifest decision (by tag or by digest) is never reused, because a tag moves and a
    manifest can be deleted at the primary, and the next answer must reflect the index at once
    (read-your-writes included). A denial or an outage answer is never reused.
    """
    if decision.status != 200 or decision.reason in UNCACHEABLE_REASONS or not isinstance(credential, Grants):
        return 0
    if operation.kind not in BLOB_CACHEABLE:
        return 0
    return max(0, int(min(policy.cache_digest_seconds, credential.expires_at - now)))


def challenge_error(policy: Policy, problem: TokenProblem) -> str:
    """The challenge's ``error`` for a refused token, as the site's registry dialect writes it:
    Distribution 3 passes go-jose's own error for a bad signature or undecodable claims, and its
    challenge then has no ``error`` at all; 2.8 and GitLab say ``invalid_token`` for every refusal."""
    if problem is TokenProblem.MISSING:
        return ""
    if problem is TokenProblem.UNVERIFIABLE and policy.dialect == "distribution-3":
        return ""
    return "invalid_token"


def format_challenge(policy: Policy, scope: str, error: str = "") -> str:
    """``WWW-Authenticate`` exactly as the registries build it (realm, service, scope, error)."""
    challenge = f"Bearer realm={_quote(policy.realm)},service={_quote(policy.service)}"
    if scope:
        challenge += f",scope={_quote(scope)}"
    if error:
        challenge += f",error={_quote(error)}"
    return challenge


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
