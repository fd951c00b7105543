"""Reconciliation's pure parts: pull tokens, Link and manifest parsing, the update plan, the report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jwt
import pytest
from conftest import SigningKey
from cryptography.hazmat.primitives import serialization

from geo_route.access import Access
from geo_route.config import Settings
from geo_route.index.model import BlobPresence, LocalTag, ManifestPresence
from geo_route.tokens import TokenVerifier
from geo_route.updater.pull_tokens import CACHE_SIZE, PullTokens, SigningKeyError
from geo_route.updater.reconcile_report import Progress, ReconcileReport
from geo_route.updater.reconcile_walk import Found, Snapshot, plan_updates
from geo_route.updater.registry_client import DOCKER_MANIFEST_LIST, OCI_MANIFEST, parse_manifest, parse_next_link

A, B, C, D = ("sha256:" + c * 64 for c in "abcd")


def with_signing_key(settings: Settings, tmp_path: Path, key: SigningKey) -> Settings:
    path = tmp_path / "signing.key"
    pem = key.private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(pem)
    return dataclasses.replace(settings, updater=dataclasses.replace(settings.updater, signing_key=str(path)))


def test_minted_tokens_verify_as_the_registry_would(settings: Settings, tmp_path: Path, rsa_key: SigningKey) -> None:
    tokens = PullTokens.from_settings(with_signing_key(settings, tmp_path, rsa_key))
    verifier = TokenVerifier.from_settings(settings.token)
    header = tokens.authorization("team/app")
    token = header.removeprefix("Bearer ")
    fields = jwt.get_unverified_header(token)
    assert {name: fields[name] for name in ("alg", "kid", "typ")} == {"alg": "RS256", "kid": rsa_key.kid, "typ": "JWT"}
    assert len(fields["x5c"]) == 1, "the signing key's certificate from the bundle: every dialect accepts that"
    grants = verifier.verify(token)
    assert grants.subject == "geo-route-reconcile"
    assert grants.allows(Access("repository", "team/app", "pull"))
    assert not grants.allows(Access("repository", "team/app", "push"))
    assert not grants.allows(Access("repository", "team/other", "pull"))
    catalog = verifier.verify(tokens.authorization(None).removeprefix("Bearer "))
    assert catalog.allows(Access("registry", "catalog", "*"))
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 300 and claims["aud"] == settings.token.service
    assert tokens.authorization("team/app") == header  # cached while fresh


def test_tokens_are_minted_again_before_they_expire(settings: Settings, tmp_path: Path, rsa_key: SigningKey) -> None:
    now = [1_000_000.0]
    key = with_signing_key(settings, tmp_path, rsa_key).updater.signing_key
    tokens = PullTokens(
        serialization.load_pem_private_key(Path(key).read_bytes(), None),  # type: ignore[arg-type]
        issuer="i",
        service="s",
        clock=lambda: now[0],
    )
    first = tokens.authorization("team/app")
    now[0] += 150
    assert tokens.authorization("team/app") == first
    now[0] += 60  # less than a third of the lifetime left
    assert tokens.authorization("team/app") != first


def test_the_token_cache_keeps_the_most_recently_used_repositories_only(
    settings: Settings, tmp_path: Path, rsa_key: SigningKey
) -> None:
    """Reconciliation and verification walk every repository: one header (~2.2 KiB) kept per
    repository ever asked grew the updater with the site."""
    key = with_signing_key(settings, tmp_path, rsa_key).updater.signing_key
    tokens = PullTokens(
        serialization.load_pem_private_key(Path(key).read_bytes(), None),  # type: ignore[arg-type]
        issuer="i",
        service="s",
        clock=lambda: 1_000_000.0,
    )
    kept = tokens.authorization("team/kept")
    evicted = tokens.authorization("team/app0")
    for number in range(1, CACHE_SIZE + 50):
        tokens.authorization(f"team/app{number}")
        if number % 100 == 0:
            assert tokens.authorization("team/kept") == kept, "a repository in use stays"
    assert tokens.cached() == CACHE_SIZE
    assert tokens.authorization("team/app0") != evicted, "least recently used: out, minted again"
    assert tokens.authorization(f"team/app{CACHE_SIZE + 49}") == tokens.authorization(f"team/app{CACHE_SIZE + 49}")
    assert tokens.cached() == CACHE_SIZE


def test_an_unusable_signing_key_is_a_clear_error(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError, match="not set"):
        PullTokens.from_settings(settings)
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key")
    broken = dataclasses.replace(settings, updater=dataclasses.replace(settings.updater, signing_key=str(garbage)))
    with pytest.raises(SigningKeyError, match="PEM private key"):
        PullTokens.from_settings(broken)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ('</v2/_catalog?last=b&n=2>; rel="next"', "/v2/_catalog?last=b&n=2"),
        ("<https://registry.example/v2/_catalog?n=2&last=b>;rel=next", "/v2/_catalog?n=2&last=b"),
        ('</v2/x?n=1>; rel="prev"', None),
        ("", None),
        (None, None),
    ],
)
def test_the_next_link(header: str | None, expected: str | None) -> None:
    assert parse_next_link(header) == expected


def test_manifests_name_their_blobs_or_children() -> None:
    image = {"mediaType": OCI_MANIFEST, "config": {"digest": A}, "layers": [{"digest": B}, {"digest": B}]}
    parsed = parse_manifest(json.dumps(image).encode(), C, "")
    assert (parsed.blobs, parsed.children, parsed.is_index) == ((A, B), (), False)
    listing = {"mediaType": DOCKER_MANIFEST_LIST, "manifests": [{"digest": A}, {"digest": B}]}
    parsed = parse_manifest(json.dumps(listing).encode(), C, "")
    assert (parsed.blobs, parsed.children, parsed.is_index) == ((), (A, B), True)
    schema1 = {"schemaVersion": 1, "fsLayers": [{"blobSum": D}]}
    assert parse_manifest(json.dumps(schema1).encode(), C, "application/json").blobs == (D,)


def test_the_plan_keeps_what_notifications_changed_during_the_walk() -> None:
    before = Snapshot(frozenset({A, B}), frozenset({C, D}), {"v1": C, "old": D, "moved": C})
    after = Snapshot(frozenset({B}), frozenset({C, D, A}), {"v1": C, "old": D, "moved": D})
    found = Found(tags_listed=True, tags={"v1": A, "moved": A})
    found.manifests = {A: None}
    found.blobs = {A, B}
    found.absent_manifests = {C, D}
    updates, tally = plan_updates("r", before, after, found)
    assert set(updates) == {
        ManifestPresence("r", C, False),  # claimed before and after, the registry says 404
        ManifestPresence("r", D, False),
        LocalTag("r", "v1", A),  # unchanged during the walk: the registry's answer wins
        LocalTag("r", "old", ""),
    }  # blob A: removed by a notification during the walk; manifest A: added during it; "moved": re-tagged
    assert (tally.manifests.added, tally.manifests.removed, tally.blobs.added) == (0, 2, 0)
    assert (tally.local_tags.added, tally.local_tags.removed) == (1, 1)


def test_without_a_tag_list_no_tag_is_removed_and_errors_remove_nothing() -> None:
    before = Snapshot(frozenset({A}), frozenset({C}), {"v1": C})
    found = Found(tags_listed=False, errors=["GET /v2/r/tags/list: HTTP 500"])
    updates, _ = plan_updates("r", before, before, found)
    assert updates == []
    found = Found(tags_listed=True, unread_tags={"v1"}, unknown_manifests={C})
    assert plan_updates("r", before, before, found)[0] == []


def test_the_plan_adds_what_neither_snapshot_held() -> None:
    found = Found(tags_listed=True, tags={"v1": C})
    found.manifests = {C: None}
    found.blobs = {A}
    updates, tally = plan_updates("r", Snapshot(), Snapshot(), found)
    assert updates == [ManifestPresence("r", C, True), BlobPresence("r", A, True), LocalTag("r", "v1", C)]
    assert (tally.manifests.seen, tally.blobs.seen, tally.local_tags.seen) == (1, 1, 1)


def test_report_and_progress_lines() -> None:
    report = ReconcileReport(repositories=2, seconds=1.5)
    report.manifests.seen = 3
    report.add_errors([f"e{i}" for i in range(12)])
    text = report.format()
    assert text.startswith("reconcile: finished with errors in 1.50 s, 2 repositories")
    assert "manifests   3 seen, +0 -0" in text and "errors      12" in text
    assert len(report.error_samples) == 10 and not report.ok
    assert "lock" in ReconcileReport(locked=True).format()
    assert Progress(200, 1, 4, 2.0).format() == "reconcile: 200 manifests, 1/4 repositories, 2.0 s (100 manifests/s)"
