"""The decision matrix: pure, table-driven, no Redis and no clock (the view is a value)."""

from __future__ import annotations

import pytest

from geo_route.access import Grants
from geo_route.index.model import (
    NOT_ASKED,
    UNAVAILABLE,
    DigestDeleted,
    IndexQuery,
    IndexView,
    QueryKind,
    RepositoryInvalidated,
    TagInvalidated,
)
from geo_route.negotiation import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST
from geo_route.operations import classify_request
from geo_route.routing import (
    Decision,
    Policy,
    Reason,
    Route,
    cache_seconds,
    decide,
    format_challenge,
    index_query,
    invalidations_for_write,
    stale_path,
)
from geo_route.tokens import TokenProblem

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
NOW = 1_800_000_000.0
PINNED = Policy(realm="https://gitlab.test/jwt/auth", service="container_registry", tag_policy="pinned")
PRIMARY_TAGS = Policy(realm=PINNED.realm, service=PINNED.service, tag_policy="primary")
AGED = Policy(realm=PINNED.realm, service=PINNED.service, tag_policy="pinned", max_tag_age=300)
REFRESHING = Policy(PINNED.realm, PINNED.service, "pinned", max_tag_age=300, refresh_after=150)


def grants(*entries: tuple[str, str, str]) -> Grants:
    actions: dict[tuple[str, str], set[str]] = {}
    for kind, name, action in entries:
        actions.setdefault((kind, name), set()).add(action)
    return Grants("alice", NOW + 300, {key: frozenset(value) for key, value in actions.items()})


ALL = grants(("repository", "app", "*"), ("repository", "src", "pull"), ("registry", "catalog", "*"))
PULL = grants(("repository", "app", "pull"))
PUSH = grants(("repository", "app", "pull"), ("repository", "app", "push"))
NOTHING = grants()
HERE = IndexView(present=True)
ABSENT = IndexView(present=False)


ACCEPT_ALL = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST))


def pin(
    digest: str = D1,
    present: bool = True,
    confirmed_at: float = NOW - 10,
    media_type: str = OCI_MANIFEST,
    current: bool = True,
    now: float = 0.0,
) -> IndexView:
    return IndexView(
        present=present,
        pinned_digest=digest,
        confirmed_at=confirmed_at,
        media_type=media_type,
        current=current,
        now=now,
    )


ROUTED = [
    # method, uri, credential, view, policy, route, reason, upstream path
    ("GET", "/v2/", NOTHING, NOT_ASKED, PINNED, Route.LOCAL, Reason.BASE, ""),
    ("GET", f"/v2/app/blobs/{D1}", PULL, HERE, PINNED, Route.LOCAL, Reason.BLOB_LOCAL, ""),
    ("HEAD", f"/v2/app/blobs/{D1}", PULL, ABSENT, PINNED, Route.PRIMARY, Reason.BLOB_NOT_LOCAL, ""),
    ("GET", f"/v2/app/blobs/{D1}", PULL, UNAVAILABLE, PINNED, Route.PRIMARY, Reason.INDEX_UNAVAILABLE, ""),
    ("GET", f"/v2/app/manifests/{D1}", PULL, HERE, PINNED, Route.LOCAL, Reason.MANIFEST_LOCAL, ""),
    ("GET", f"/v2/app/manifests/{D1}", PULL, ABSENT, PINNED, Route.PRIMARY, Reason.MANIFEST_NOT_LOCAL, ""),
    ("GET", f"/v2/app/manifests/{D1}", PULL, UNAVAILABLE, PINNED, Route.PRIMARY, Reason.INDEX_UNAVAILABLE, ""),
    ("GET", "/v2/app/manifests/v1", PULL, pin(), PINNED, Route.LOCAL, Reason.TAG_PINNED, f"/v2/app/manifests/{D1}"),
    ("HEAD", "/v2/app/manifests/v1", PULL, pin(D2), PINNED, Route.LOCAL, Reason.TAG_PINNED, f"/v2/app/manifests/{D2}"),
    ("GET", "/v2/app/manifests/v1", PULL, pin(present=False), PINNED, Route.PRIMARY, Reason.TAG_NOT_LOCAL, ""),
    ("GET", "/v2/app/manifests/v1", PULL, ABSENT, PINNED, Route.PRIMARY, Reason.TAG_NOT_PINNED, ""),
    ("GET", "/v2/app/manifests/v1", PULL, pin("garbage"), PINNED, Route.PRIMARY, Reason.TAG_NOT_PINNED, ""),
    ("GET", "/v2/app/manifests/v1", PULL, UNAVAILABLE, PINNED, Route.PRIMARY, Reason.INDEX_UNAVAILABLE, ""),
    ("GET", "/v2/app/manifests/v1", PULL, pin(), PRIMARY_TAGS, Route.PRIMARY, Reason.TAG_POLICY_PRIMARY, ""),
    (
        "GET",
        "/v2/app/manifests/v1",
        PULL,
        pin(confirmed_at=NOW - 299),
        AGED,
        Route.LOCAL,
        Reason.TAG_PINNED,
        f"/v2/app/manifests/{D1}",
    ),
    ("GET", "/v2/app/manifests/v1", PULL, pin(confirmed_at=NOW - 301), AGED, Route.PRIMARY, Reason.TAG_STALE, ""),
    # The index's clock decides the age when it gives one (several nodes, one clock).
    (
        "GET",
        "/v2/app/manifests/v1",
        PULL,
        pin(confirmed_at=NOW - 10, now=NOW + 400),
        AGED,
        Route.PRIMARY,
        Reason.TAG_STALE,
        "",
    ),
    ("GET", "/v2/app/manifests/v1", PULL, pin(current=False), PINNED, Route.PRIMARY, Reason.TAG_UNCONFIRMED, ""),
    ("GET", "/v2/app/manifests/v1", PULL, pin(media_type=""), PINNED, Route.PRIMARY, Reason.TAG_NEGOTIATED, ""),
    ("PATCH", "/gitlab/v1/repositories/app/", TokenProblem.MISSING, HERE, PINNED, Route.PRIMARY, Reason.WRITE, ""),
    ("GET", "/v2/app/tags/list", PULL, NOT_ASKED, PINNED, Route.PRIMARY, Reason.LISTING, ""),
    ("GET", f"/v2/app/referrers/{D1}", PULL, NOT_ASKED, PINNED, Route.PRIMARY, Reason.LISTING, ""),
    ("GET", "/v2/_catalog", ALL, NOT_ASKED, PINNED, Route.PRIMARY, Reason.LISTING, ""),
    ("PUT", "/v2/app/manifests/v1", PUSH, HERE, PINNED, Route.PRIMARY, Reason.WRITE, ""),
    ("POST", "/v2/app/blobs/uploads/", PUSH, HERE, PINNED, Route.PRIMARY, Reason.UPLOAD, ""),
    ("POST", f"/v2/app/blobs/uploads/?mount={D1}&from=src", ALL, HERE, PINNED, Route.PRIMARY, Reason.UPLOAD, ""),
    ("PATCH", "/v2/app/blobs/uploads/u1", PUSH, HERE, PINNED, Route.PRIMARY, Reason.UPLOAD, ""),
    ("PUT", f"/v2/app/blobs/uploads/u1?digest={D1}", PUSH, HERE, PINNED, Route.PRIMARY, Reason.UPLOAD, ""),
    ("GET", "/v2/app/blobs/uploads/u1", PUSH, HERE, PINNED, Route.PRIMARY, Reason.UPLOAD, ""),
    ("DELETE", "/v2/app/blobs/uploads/u1", ALL, HERE, PINNED, Route.PRIMARY, Reason.UPLOAD, ""),
    ("DELETE", f"/v2/app/manifests/{D1}", ALL, HERE, PINNED, Route.PRIMARY, Reason.DELETE, ""),
    ("DELETE", f"/v2/app/blobs/{D1}", ALL, HERE, PINNED, Route.PRIMARY, Reason.DELETE, ""),
    # Not a registry operation: the primary answers it (and authenticates it) itself.
    ("GET", "/v2/Bad/manifests/x", TokenProblem.MISSING, HERE, PINNED, Route.PRIMARY, Reason.UNRECOGNIZED, ""),
    ("GET", "/v2/app/blobs/sha256:zz", PULL, HERE, PINNED, Route.PRIMARY, Reason.UNRECOGNIZED, ""),
]


@pytest.mark.parametrize(("method", "uri", "credential", "view", "policy", "route", "reason", "path"), ROUTED)
def test_routing_matrix(
    method: str,
    uri: str,
    credential: Grants | TokenProblem,
    view: IndexView,
    policy: Policy,
    route: Route,
    reason: str,
    path: str,
) -> None:
    decision = decide(classify_request(method, uri), credential, view, policy, NOW, ACCEPT_ALL)
    assert decision == Decision(200, reason, route, path)


# Stale-if-error: which tag reads routed to the primary also name a local copy NGINX may serve if the
# primary cannot be reached. A real pin of the current epoch, at most stale_if_error old on the
# index's clock, local, and what Accept names; never a tombstone, never a write, never when off.
STALE = Policy(PINNED.realm, PINNED.service, "pinned", max_tag_age=300, refresh_after=150, stale_if_error=86400)
STALE_OFF = Policy(PINNED.realm, PINNED.service, "pinned", max_tag_age=300, refresh_after=150)
DAY_OLD = NOW - 86400
STALE_PIN = f"/v2/app/manifests/{D1}"
TOMBSTONE = IndexView(pinned_digest="", confirmed_at=NOW - 10, present=True)
STALE_IF_ERROR = [
    # (method, uri, view, policy, accept, route, reason, stale path)
    ("GET", "/v2/app/manifests/v1", pin(confirmed_at=NOW - 301), STALE, ACCEPT_ALL, Reason.TAG_STALE, STALE_PIN),
    ("HEAD", "/v2/app/manifests/v1", pin(confirmed_at=DAY_OLD), STALE, ACCEPT_ALL, Reason.TAG_STALE, STALE_PIN),
    ("GET", "/v2/app/manifests/v1", pin(confirmed_at=DAY_OLD - 1), STALE, ACCEPT_ALL, Reason.TAG_STALE, ""),
    # the index's clock decides, not the auth worker's
    (
        "GET",
        "/v2/app/manifests/v1",
        pin(confirmed_at=NOW - 301, now=NOW + 86400),
        STALE,
        ACCEPT_ALL,
        Reason.TAG_STALE,
        "",
    ),
    (
        "GET",
        "/v2/app/manifests/v1",
        pin(confirmed_at=DAY_OLD, now=NOW - 10),
        STALE,
        ACCEPT_ALL,
        Reason.TAG_STALE,
        STALE_PIN,
    ),
    ("GET", "/v2/app/manifests/v1", pin(confirmed_at=NOW - 301), STALE_OFF, ACCEPT_ALL, Reason.TAG_STALE, ""),
    (
        "GET",
        "/v2/app/manifests/v1",
        pin(confirmed_at=NOW - 301, present=False),
        STALE,
        ACCEPT_ALL,
        Reason.TAG_STALE,
        "",
    ),
    ("GET", "/v2/app/manifests/v1", pin(present=False), STALE, ACCEPT_ALL, Reason.TAG_NOT_LOCAL, ""),
    ("GET", "/v2/app/manifests/v1", pin(current=False), STALE, ACCEPT_ALL, Reason.TAG_UNCONFIRMED, ""),
    ("GET", "/v2/app/manifests/v1", TOMBSTONE, STALE, ACCEPT_ALL, Reason.TAG_NOT_PINNED, ""),
    ("GET", "/v2/app/manifests/v1", pin("garbage"), STALE, ACCEPT_ALL, Reason.TAG_NOT_PINNED, ""),
    ("GET", "/v2/app/manifests/v1", ABSENT, STALE, ACCEPT_ALL, Reason.TAG_NOT_PINNED, ""),
    ("GET", "/v2/app/manifests/v1", UNAVAILABLE, STALE, ACCEPT_ALL, Reason.INDEX_UNAVAILABLE, ""),
    ("GET", "/v2/app/manifests/v1", pin(), STALE, DOCKER_MANIFEST, Reason.TAG_NEGOTIATED, ""),
    ("GET", "/v2/app/manifests/v1", pin(), STALE, "*/*", Reason.TAG_NEGOTIATED, ""),
    ("GET", "/v2/app/manifests/v1", pin(confirmed_at=NOW - 301), STALE, OCI_MANIFEST, Reason.TAG_STALE, STALE_PIN),
    ("PUT", "/v2/app/manifests/v1", pin(), STALE, ACCEPT_ALL, Reason.WRITE, ""),
    ("DELETE", f"/v2/app/manifests/{D1}", pin(), STALE, ACCEPT_ALL, Reason.DELETE, ""),
    ("GET", f"/v2/app/manifests/{D1}", HERE, STALE, ACCEPT_ALL, Reason.MANIFEST_LOCAL, ""),
    ("GET", f"/v2/app/blobs/{D1}", ABSENT, STALE, ACCEPT_ALL, Reason.BLOB_NOT_LOCAL, ""),
    (
        "GET",
        "/v2/app/manifests/v1",
        pin(),
        Policy(PINNED.realm, PINNED.service, "primary", stale_if_error=86400),
        ACCEPT_ALL,
        Reason.TAG_POLICY_PRIMARY,
        "",
    ),
]


@pytest.mark.parametrize(("method", "uri", "view", "policy", "accept", "reason", "path"), STALE_IF_ERROR)
def test_stale_if_error_names_a_local_copy_only_within_its_bound(
    method: str, uri: str, view: IndexView, policy: Policy, accept: str, reason: str, path: str
) -> None:
    operation = classify_request(method, uri)
    decision = decide(operation, PUSH if method == "PUT" else ALL, view, policy, NOW, accept)
    assert (decision.reason, decision.stale_path) == (reason, path)
    if path:
        assert decision.route is Route.PRIMARY and not decision.upstream_path
    # the function alone: a tag served locally (or any other read) is not its business
    if decision.route is Route.PRIMARY:
        assert stale_path(operation, view, policy, NOW, accept) == path


def test_a_local_answer_names_no_stale_copy() -> None:
    """A tag served locally needs none: if the local registry fails, the primary answers (fallback)."""
    decision = decide(classify_request("GET", "/v2/app/manifests/v1"), PULL, pin(), STALE, NOW, ACCEPT_ALL)
    assert (decision.route, decision.stale_path) == (Route.LOCAL, "")


# What registries 2.8 and 3.0 answer to a request BY TAG for each stored type and Accept (registry
# dialects §4): "itself" (the stored manifest: the same as by digest), or something else (404, the
# list's child, a schema 1 conversion). Local only when the registry would answer "itself".
NEGOTIATION = [
    (OCI_MANIFEST, "", False),
    (OCI_MANIFEST, "*/*", False),
    (OCI_MANIFEST, OCI_MANIFEST, True),
    (OCI_MANIFEST, f"{DOCKER_MANIFEST}, {OCI_MANIFEST};q=0.5", True),
    (OCI_MANIFEST, DOCKER_MANIFEST, False),
    (OCI_INDEX, OCI_MANIFEST, False),
    (OCI_INDEX, f"{OCI_MANIFEST},{OCI_INDEX}", True),
    (DOCKER_MANIFEST_LIST, DOCKER_MANIFEST, False),  # the registry answers the linux/amd64 child
    (DOCKER_MANIFEST_LIST, f"{DOCKER_MANIFEST}, {DOCKER_MANIFEST_LIST}", True),
    (DOCKER_MANIFEST, "", False),  # 2.8: a schema 1 conversion
    (DOCKER_MANIFEST, "application/json", False),
    (DOCKER_MANIFEST, DOCKER_MANIFEST.upper(), False),  # 2.8 does not fold case: a schema 1 conversion
    (DOCKER_MANIFEST, ACCEPT_ALL, True),
    ("application/vnd.docker.distribution.manifest.v1+prettyjws", ACCEPT_ALL, False),
]


@pytest.mark.parametrize(("media_type", "accept", "local"), NEGOTIATION)
def test_a_pinned_tag_is_local_only_when_accept_negotiates_to_the_pin(
    media_type: str, accept: str, local: bool
) -> None:
    decision = decide(
        classify_request("GET", "/v2/app/manifests/v1"), PULL, pin(media_type=media_type), PINNED, NOW, accept
    )
    assert decision.route is (Route.LOCAL if local else Route.PRIMARY)
    assert decision.reason == (Reason.TAG_PINNED if local else Reason.TAG_NEGOTIATED)


# The same by tag on Distribution 3 (v3.0.0 registry/handlers/manifests.go, GetManifest): no schema 1,
# so schema 2 is itself whatever the Accept; an OCI index too (its type switch misses
# ocischema.DeserializedImageIndex); Accept parts read by mime.ParseMediaType (case folded; a part
# whose parameters do not parse names nothing, so "LIST; q" gets the list's child there).
PINNED_3 = Policy(PINNED.realm, PINNED.service, "pinned", dialect="distribution-3")
NEGOTIATION_3 = [
    (OCI_MANIFEST, "", False),  # 404
    (OCI_MANIFEST, "*/*", False),
    (OCI_MANIFEST, OCI_MANIFEST, True),
    (OCI_MANIFEST, OCI_MANIFEST.upper(), True),  # Go folds case
    (OCI_MANIFEST, f" {OCI_MANIFEST} ;q=0.5 ; charset=utf-8;", True),
    (OCI_MANIFEST, f"{OCI_MANIFEST}; q", False),  # "mime: invalid media parameter": named nothing
    (OCI_MANIFEST, f"{OCI_MANIFEST}; q=", False),
    (OCI_MANIFEST, f"{OCI_MANIFEST}; q=1; Q=1", False),  # a repeated name (the same value passes in Go: safe side)
    (OCI_MANIFEST, f'{OCI_MANIFEST}; q="1"', False),  # a quoted value Go reads: safe side
    (OCI_MANIFEST, f"{OCI_MANIFEST};;", False),
    (OCI_INDEX, "", True),
    (OCI_INDEX, OCI_MANIFEST, True),
    (DOCKER_MANIFEST_LIST, DOCKER_MANIFEST, False),  # the linux/amd64 child
    (DOCKER_MANIFEST_LIST, f"{DOCKER_MANIFEST}, {DOCKER_MANIFEST_LIST}", True),
    (DOCKER_MANIFEST_LIST, DOCKER_MANIFEST_LIST.upper(), True),
    (DOCKER_MANIFEST_LIST, f"{DOCKER_MANIFEST_LIST}; q", False),  # 2.8 answers the list, 3 the child
    (DOCKER_MANIFEST_LIST, DOCKER_MANIFEST_LIST.replace("k", "\u212a"), False),  # Kelvin sign: Go lowers it; safe side
    (DOCKER_MANIFEST, "", True),  # no schema 1 conversion
    (DOCKER_MANIFEST, "application/json", True),
    (DOCKER_MANIFEST, DOCKER_MANIFEST.upper(), True),
    ("application/vnd.docker.distribution.manifest.v1+prettyjws", ACCEPT_ALL, False),
]


@pytest.mark.parametrize(("media_type", "accept", "local"), NEGOTIATION_3)
def test_on_distribution_3_a_pinned_tag_is_local_when_3_answers_the_pin_by_tag(
    media_type: str, accept: str, local: bool
) -> None:
    operation = classify_request("GET", "/v2/app/manifests/v1")
    decision = decide(operation, PULL, pin(media_type=media_type), PINNED_3, NOW, accept)
    assert decision.route is (Route.LOCAL if local else Route.PRIMARY)
    assert decision.reason == (Reason.TAG_PINNED if local else Reason.TAG_NEGOTIATED)


@pytest.mark.parametrize(("media_type", "accept", "local"), NEGOTIATION)
def test_the_2_8_negotiation_is_also_the_gitlab_dialects(media_type: str, accept: str, local: bool) -> None:
    policy = Policy(PINNED.realm, PINNED.service, "pinned", dialect="gitlab")
    decision = decide(
        classify_request("GET", "/v2/app/manifests/v1"), PULL, pin(media_type=media_type), policy, NOW, accept
    )
    assert decision.route is (Route.LOCAL if local else Route.PRIMARY)


def test_on_distribution_3_a_stale_copy_follows_3_s_negotiation() -> None:
    policy = Policy(PINNED.realm, PINNED.service, "pinned", stale_if_error=86400, dialect="distribution-3")
    operation = classify_request("GET", "/v2/app/manifests/v1")
    view = pin(media_type=DOCKER_MANIFEST)
    assert stale_path(operation, view, policy, NOW, "") == f"/v2/app/manifests/{view.pinned_digest}"
    view = pin(media_type=DOCKER_MANIFEST_LIST)
    assert stale_path(operation, view, policy, NOW, f"{DOCKER_MANIFEST_LIST}; q") == ""


FENCED = Policy(PINNED.realm, PINNED.service, "pinned", write_fence=30)


@pytest.mark.parametrize(
    ("method", "uri", "credential", "expected"),
    [
        ("PUT", "/v2/app/manifests/v1", PUSH, (TagInvalidated("app", "v1", fence=30),)),
        ("DELETE", "/v2/app/manifests/v1", ALL, (TagInvalidated("app", "v1", fence=30),)),
        ("DELETE", f"/v2/app/manifests/{D1}", ALL, (DigestDeleted("app", D1, fence=30),)),
        ("DELETE", f"/v2/app/blobs/{D1}", ALL, (DigestDeleted("app", D1, fence=30),)),
        ("PATCH", "/gitlab/v1/repositories/app/", PULL, (RepositoryInvalidated("app", subtree=True, fence=30),)),
        ("PATCH", "/gitlab/v1/repositories/app/?dry_run=true", PULL, ()),
        ("PATCH", "/gitlab/v1/repositories/app/", TokenProblem.INVALID, ()),  # a rename needs a valid token
        ("PUT", f"/v2/app/manifests/{D1}", PUSH, ()),  # by digest: no tag moves
        ("GET", "/v2/app/manifests/v1", PULL, ()),
    ],
)
def test_writes_through_the_site_invalidate_what_they_change(
    method: str, uri: str, credential: Grants | TokenProblem, expected: tuple[object, ...]
) -> None:
    assert invalidations_for_write(classify_request(method, uri), credential, FENCED) == expected
    assert invalidations_for_write(classify_request(method, uri), credential, PRIMARY_TAGS) == ()


DENIED = [
    # method, uri, credential, reason, scope, error
    ("GET", "/v2/", TokenProblem.MISSING, Reason.NO_TOKEN, "", ""),
    ("GET", "/v2/", TokenProblem.INVALID, Reason.INVALID_TOKEN, "", "invalid_token"),
    ("GET", "/v2/app/manifests/v1", TokenProblem.MISSING, Reason.NO_TOKEN, "repository:app:pull", ""),
    (
        "PUT",
        "/v2/app/manifests/v1",
        TokenProblem.INVALID,
        Reason.INVALID_TOKEN,
        "repository:app:pull,push",
        "invalid_token",
    ),
    ("GET", "/v2/other/manifests/v1", PULL, Reason.INSUFFICIENT_SCOPE, "repository:other:pull", "insufficient_scope"),
    ("PUT", "/v2/app/manifests/v1", PULL, Reason.INSUFFICIENT_SCOPE, "repository:app:pull,push", "insufficient_scope"),
    (
        "POST",
        "/v2/app/blobs/uploads/",
        PULL,
        Reason.INSUFFICIENT_SCOPE,
        "repository:app:pull,push",
        "insufficient_scope",
    ),
    (
        "DELETE",
        f"/v2/app/manifests/{D1}",
        PUSH,
        Reason.INSUFFICIENT_SCOPE,
        "repository:app:delete",
        "insufficient_scope",
    ),
    (
        "POST",
        f"/v2/app/blobs/uploads/?mount={D1}&from=secret",
        PUSH,
        Reason.INSUFFICIENT_SCOPE,
        "repository:app:pull,push repository:secret:pull",
        "insufficient_scope",
    ),
    ("GET", "/v2/_catalog", PUSH, Reason.INSUFFICIENT_SCOPE, "registry:catalog:*", "insufficient_scope"),
    ("GET", f"/v2/app/blobs/{D1}", NOTHING, Reason.INSUFFICIENT_SCOPE, "repository:app:pull", "insufficient_scope"),
]


@pytest.mark.parametrize(("method", "uri", "credential", "reason", "scope", "error"), DENIED)
def test_denials_carry_the_registry_challenge(
    method: str, uri: str, credential: Grants | TokenProblem, reason: str, scope: str, error: str
) -> None:
    decision = decide(classify_request(method, uri), credential, HERE, PINNED, NOW)
    assert (decision.status, decision.route, decision.reason) == (401, None, reason)
    assert decision.www_authenticate == format_challenge(PINNED, scope, error)


def test_challenge_format_is_the_registry_format() -> None:
    assert format_challenge(PINNED, "repository:a/b:pull,push", "insufficient_scope") == (
        'Bearer realm="https://gitlab.test/jwt/auth",service="container_registry",'
        'scope="repository:a/b:pull,push",error="insufficient_scope"'
    )
    assert format_challenge(PINNED, "") == 'Bearer realm="https://gitlab.test/jwt/auth",service="container_registry"'


@pytest.mark.parametrize(
    ("method", "uri", "policy", "expected"),
    [
        ("GET", f"/v2/app/blobs/{D1}", PINNED, IndexQuery(QueryKind.BLOB, "app", D1)),
        ("GET", f"/v2/app/manifests/{D1}", PINNED, IndexQuery(QueryKind.MANIFEST, "app", D1)),
        ("GET", "/v2/app/manifests/v1", PINNED, IndexQuery(QueryKind.TAG, "app", "v1")),
        ("GET", "/v2/app/manifests/v1", REFRESHING, IndexQuery(QueryKind.TAG, "app", "v1", 150)),
        ("GET", "/v2/app/manifests/v1", PRIMARY_TAGS, None),
        ("PUT", "/v2/app/manifests/v1", PINNED, None),
        ("GET", "/v2/", PINNED, None),
        ("GET", "/v2/app/tags/list", PINNED, None),
    ],
)
def test_index_query_asks_only_what_routing_needs(
    method: str, uri: str, policy: Policy, expected: IndexQuery | None
) -> None:
    assert index_query(classify_request(method, uri), policy) == expected


def test_a_stale_local_tag_is_never_served() -> None:
    # The primary moved v1 to D2; D2 is not replicated yet. Even though D1 (the old target) is here,
    # the view for the tag is about D2, so the request goes to the primary.
    decision = decide(
        classify_request("GET", "/v2/app/manifests/v1"), PULL, pin(D2, present=False), PINNED, NOW, ACCEPT_ALL
    )
    assert (decision.route, decision.reason) == (Route.PRIMARY, Reason.TAG_NOT_LOCAL)


# ---- how long NGINX may reuse a decision -------------------------------------------------------

CACHING = Policy(PINNED.realm, PINNED.service, "pinned", max_tag_age=300, cache_digest_seconds=30)


def reuse(method: str, uri: str, credential: Grants | TokenProblem, view: IndexView, policy: Policy = CACHING) -> int:
    operation = classify_request(method, uri)
    decision = decide(operation, credential, view, policy, NOW, ACCEPT_ALL)
    return cache_seconds(operation, decision, credential, policy, NOW)


def expiring_in(seconds: float) -> Grants:
    return Grants("alice", NOW + seconds, PULL.actions)


@pytest.mark.parametrize(
    ("method", "uri", "credential", "view", "policy", "expected"),
    [
        ("GET", f"/v2/app/blobs/{D1}", PULL, HERE, CACHING, 30),
        ("GET", f"/v2/app/blobs/{D1}", PULL, ABSENT, CACHING, 30),  # "primary" for a blob is safe to reuse
        ("GET", "/v2/", PULL, NOT_ASKED, CACHING, 30),
        ("GET", f"/v2/app/blobs/{D1}", expiring_in(7.9), HERE, CACHING, 7),  # never past the token's exp
        ("GET", f"/v2/app/blobs/{D1}", expiring_in(-1), HERE, CACHING, 0),
        ("GET", f"/v2/app/blobs/{D1}", PULL, UNAVAILABLE, CACHING, 0),  # an outage answer is not reused
        ("GET", f"/v2/app/blobs/{D1}", TokenProblem.MISSING, HERE, CACHING, 0),  # denials are not reused
        ("GET", f"/v2/app/blobs/{D1}", TokenProblem.INVALID, HERE, CACHING, 0),
        ("GET", f"/v2/other/blobs/{D1}", PULL, HERE, CACHING, 0),  # insufficient scope
        # A manifest can be deleted at the primary and a tag can move: the index must answer each time.
        ("GET", f"/v2/app/manifests/{D1}", PULL, HERE, CACHING, 0),
        ("GET", "/v2/app/manifests/v1", PULL, pin(confirmed_at=NOW - 10), CACHING, 0),
        ("GET", "/v2/app/manifests/v1", PULL, pin(confirmed_at=NOW - 10), PINNED, 0),
        ("PUT", "/v2/app/manifests/v1", PUSH, HERE, CACHING, 0),
        ("PATCH", "/v2/app/blobs/uploads/u1", PUSH, HERE, CACHING, 0),
        ("GET", "/v2/app/tags/list", PULL, NOT_ASKED, CACHING, 0),
        ("GET", "/v2/Bad/manifests/x", PULL, NOT_ASKED, CACHING, 0),
    ],
)
def test_decision_reuse_lifetimes(
    method: str, uri: str, credential: Grants | TokenProblem, view: IndexView, policy: Policy, expected: int
) -> None:
    assert reuse(method, uri, credential, view, policy) == expected


# -- verified local content: quarantine and refetches ---------------------------------------------


@pytest.mark.parametrize(
    ("uri", "view", "route", "reason"),
    [
        (f"/v2/app/blobs/{D1}", IndexView(quarantined=True), Route.PRIMARY, Reason.BLOB_QUARANTINED),
        (f"/v2/app/blobs/{D1}", IndexView(verifying=True), Route.PRIMARY, Reason.BLOB_VERIFYING),
        (f"/v2/app/manifests/{D1}", IndexView(quarantined=True), Route.PRIMARY, Reason.MANIFEST_QUARANTINED),
        (f"/v2/app/manifests/{D1}", IndexView(verifying=True), Route.PRIMARY, Reason.MANIFEST_VERIFYING),
        (f"/v2/app/blobs/{D1}", HERE, Route.LOCAL, Reason.BLOB_LOCAL),
    ],
)
def test_quarantined_or_unverified_refetched_content_goes_to_the_primary(
    uri: str, view: IndexView, route: Route, reason: str
) -> None:
    decision = decide(classify_request("GET", uri), PULL, view, REFETCH_TO_PRIMARY, NOW)
    assert (decision.route, decision.reason) == (route, reason)


REFETCH_TO_PRIMARY = Policy(PINNED.realm, PINNED.service, "pinned", refetch_route="primary")


@pytest.mark.parametrize(
    ("uri", "reason"),
    [(f"/v2/app/blobs/{D1}", Reason.BLOB_VERIFYING), (f"/v2/app/manifests/{D1}", Reason.MANIFEST_VERIFYING)],
)
def test_by_default_a_refetch_waiting_for_verification_is_served_here(uri: str, reason: str) -> None:
    """refetch_route "local" (the default): every replicated byte stays local; the verifier's
    verdict (a quarantine, seconds later) is what sends the client's next retry to the primary."""
    decision = decide(classify_request("GET", uri), PULL, IndexView(verifying=True), PINNED, NOW)
    assert (decision.route, decision.reason, decision.stale_path) == (Route.LOCAL, reason, "")
    quarantined = decide(classify_request("GET", uri), PULL, IndexView(quarantined=True), PINNED, NOW)
    assert quarantined.route is Route.PRIMARY


@pytest.mark.parametrize(
    ("method", "uri", "asks_refetch"),
    [
        ("GET", f"/v2/app/blobs/{D1}", True),
        ("GET", f"/v2/app/manifests/{D1}", True),
        ("HEAD", f"/v2/app/blobs/{D1}", False),  # a HEAD sends no bytes a client could reject
        ("GET", "/v2/app/manifests/v1", False),  # by tag: NGINX cannot tell which digest it served
    ],
)
def test_only_a_get_by_digest_is_asked_as_a_refetch(method: str, uri: str, asks_refetch: bool) -> None:
    query = index_query(classify_request(method, uri), PINNED, refetch=True)
    assert query is not None
    assert query.refetch is asks_refetch
    assert not index_query(classify_request(method, uri), PINNED).refetch  # type: ignore[union-attr]


def test_a_refetch_waiting_for_verification_keeps_the_local_copy_if_the_primary_is_down() -> None:
    """Promise 2: with refetch_route "primary" the refetch goes to the primary, but a primary that
    cannot be reached must not fail it (a NATed fleet refetches all the time): NGINX serves the
    local copy instead."""
    verifying = IndexView(verifying=True)
    blob = decide(classify_request("GET", f"/v2/app/blobs/{D1}"), PULL, verifying, REFETCH_TO_PRIMARY, NOW)
    assert (blob.route, blob.stale_path) == (Route.PRIMARY, f"/v2/app/blobs/{D1}")
    listed = decide(classify_request("GET", f"/v2/app/manifests/{D1}"), PULL, verifying, REFETCH_TO_PRIMARY, NOW)
    assert listed.stale_path == f"/v2/app/manifests/{D1}"
    quarantined = decide(classify_request("GET", f"/v2/app/blobs/{D1}"), PULL, IndexView(quarantined=True), PINNED, NOW)
    assert quarantined.stale_path == "", "a copy known to be bad is never the answer"


def test_a_refetch_waiting_for_verification_is_never_reused() -> None:
    """Its verdict lands within a second: NGINX must ask again, not reuse "served here"."""
    caching = Policy(PINNED.realm, PINNED.service, "pinned", cache_digest_seconds=30)
    operation = classify_request("GET", f"/v2/app/blobs/{D1}")
    verifying = decide(operation, PULL, IndexView(verifying=True), caching, NOW)
    assert verifying.route is Route.LOCAL
    assert cache_seconds(operation, verifying, PULL, caching, NOW) == 0
    assert cache_seconds(operation, decide(operation, PULL, HERE, caching, NOW), PULL, caching, NOW) == 30


STORAGE = Policy(PINNED.realm, PINNED.service, "pinned", from_storage=True)
BLOB_FILE = f"/docker/registry/v2/blobs/sha256/11/{'1' * 64}/data"
BLOB_LINK = f"/docker/registry/v2/repositories/group/app/_layers/sha256/{'1' * 64}/link"


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_blob_present_here_names_its_files_when_blobs_come_from_storage(method: str) -> None:
    operation = classify_request(method, f"/v2/group/app/blobs/{D1}")
    decision = decide(operation, grants(("repository", "group/app", "pull")), HERE, STORAGE, NOW)
    assert (decision.route, decision.reason) == (Route.LOCAL, Reason.BLOB_LOCAL)
    assert (decision.storage_path, decision.storage_link) == (BLOB_FILE, BLOB_LINK)


MANIFEST_FILE = f"/docker/registry/v2/blobs/sha256/22/{'2' * 64}/data"
MANIFEST_LINK = f"/docker/registry/v2/repositories/group/app/_manifests/revisions/sha256/{'2' * 64}/link"


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize(("reference", "view"), [(D2, HERE), ("v1", pin(D2))])
def test_a_manifest_present_here_names_its_revision_files(method: str, reference: str, view: IndexView) -> None:
    """By digest, and a tag by its pinned digest (the registry answers a local tag by that digest)."""
    operation = classify_request(method, f"/v2/group/app/manifests/{reference}")
    decision = decide(operation, grants(("repository", "group/app", "pull")), view, STORAGE, NOW, OCI_MANIFEST)
    assert decision.route is Route.LOCAL
    assert (decision.storage_path, decision.storage_link) == (MANIFEST_FILE, MANIFEST_LINK)


@pytest.mark.parametrize(
    ("policy", "uri", "view", "credential"),
    [
        (PINNED, f"/v2/app/blobs/{D1}", HERE, PULL),  # the setting is off
        (STORAGE, f"/v2/app/blobs/{D1}", ABSENT, PULL),  # not here: the primary
        (STORAGE, f"/v2/app/blobs/{D1}", IndexView(quarantined=True), PULL),
        (STORAGE, f"/v2/app/blobs/{D1}", IndexView(verifying=True), PULL),  # a refetch: the registry serves it
        (STORAGE, f"/v2/app/blobs/{D1}", HERE, NOTHING),  # a denial names nothing
        (STORAGE, f"/v2/app/blobs/{D1}", HERE, TokenProblem.MISSING),
        (STORAGE, f"/v2/app/manifests/{D1}", IndexView(verifying=True), PULL),
        (STORAGE, f"/v2/app/manifests/{D1}", ABSENT, PULL),
        (STORAGE, "/v2/app/manifests/v1", pin(present=False), PULL),  # the pinned manifest is not here
        (STORAGE, "/v2/app/manifests/v1", pin(confirmed_at=0.0, current=False), PULL),
        (STORAGE, "/v2/app/manifests/v1", pin(), NOTHING),
    ],
)
def test_nothing_else_names_storage_files(policy: Policy, uri: str, view: IndexView, credential: object) -> None:
    decision = decide(classify_request("GET", uri), credential, view, policy, NOW)  # type: ignore[arg-type]
    assert decision.storage_path == decision.storage_link == ""
