"""Envelope parsing and event semantics (pure): events shaped as registry 2.8 sends them, the real
envelopes captured from Distribution 2.8.2 and 3.0.0 (``tests/fixtures/notifications``, copied from
``../shared/fixtures/notifications``), and GitLab's additions (``rename``, ``actor.user``, ``meta``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from geo_route.index.model import (
    BlobPresence,
    DigestDeleted,
    DigestRestored,
    IndexUpdate,
    LocalRepositoryDropped,
    LocalTag,
    ManifestPresence,
    RepositoryInvalidated,
    TagInvalidated,
)
from geo_route.updater.notifications import (
    EnvelopeError,
    Source,
    interpret_event,
    interpret_events,
    parse_envelope,
    read_timestamp,
)

D = "sha256:" + "d" * 64
NOW = 1_800_000_000.0
OCI = "application/vnd.oci.image.manifest.v1+json"


def event(action: str, **target: Any) -> dict[str, Any]:
    return {
        "id": f"id-{action}-{target.get('tag', '')}-{target.get('digest', '')[-4:]}",
        "timestamp": "2026-11-23T19:19:22.300123456Z",
        "action": action,
        "target": {"repository": "group/app", **target},
    }


CASES = [
    (
        Source.LOCAL,
        event("push", mediaType="application/octet-stream", digest=D, size=3),
        [BlobPresence("group/app", D, True)],
    ),
    (
        Source.LOCAL,
        event("mount", mediaType="application/octet-stream", digest=D, fromRepository="x/y"),
        [BlobPresence("group/app", D, True)],
    ),
    (
        Source.LOCAL,
        event("push", mediaType=OCI, digest=D, tag="v1"),
        [ManifestPresence("group/app", D, True), LocalTag("group/app", "v1", D)],
    ),
    (Source.LOCAL, event("push", mediaType=OCI, digest=D), [ManifestPresence("group/app", D, True)]),
    (
        Source.LOCAL,
        event("delete", digest=D),
        [BlobPresence("group/app", D, False), ManifestPresence("group/app", D, False), DigestRestored("group/app", D)],
    ),
    (Source.LOCAL, event("delete", tag="v1"), [LocalTag("group/app", "v1", "")]),
    (Source.LOCAL, event("pull", mediaType=OCI, digest=D, tag="v1"), []),
    # From the primary an event is a hint: the tag is invalidated and re-resolved, never pinned from it.
    (Source.PRIMARY, event("push", mediaType=OCI, digest=D, tag="v1"), [TagInvalidated("group/app", "v1", hint=D)]),
    (Source.PRIMARY, event("push", mediaType=OCI, digest=D), []),
    (Source.PRIMARY, event("push", mediaType="application/octet-stream", digest=D), []),
    (Source.PRIMARY, event("delete", tag="v1"), [TagInvalidated("group/app", "v1")]),
    # GitLab's database mode deletes by digest with no tag events: the digest's tags are found in the index.
    (Source.PRIMARY, event("delete", digest=D), [DigestDeleted("group/app", D)]),
    (
        Source.PRIMARY,
        event("rename", rename={"type": "name", "from": "app", "to": "web"}),
        [RepositoryInvalidated("group/app", subtree=True), RepositoryInvalidated("group/web", subtree=True)],
    ),
    (
        Source.PRIMARY,
        event("rename", rename={"type": "namespace", "from": "group", "to": "team"}),
        [RepositoryInvalidated("group/app", subtree=True), RepositoryInvalidated("team/app", subtree=True)],
    ),
    # Distribution 3.0 writes every target field: "" and 0 are absent, never values.
    (Source.LOCAL, event("delete", mediaType="", digest="", size=0, tag="v1"), [LocalTag("group/app", "v1", "")]),
    (Source.PRIMARY, event("delete", mediaType="", digest="", size=0, tag="v1"), [TagInvalidated("group/app", "v1")]),
    (Source.PRIMARY, event("push", mediaType=OCI, digest=D, tag=""), []),
    (Source.LOCAL, event("push", mediaType=OCI, digest=D, tag="", url=""), [ManifestPresence("group/app", D, True)]),
    # A delete naming a tag and a digest (no dialect sends one): both are taken off, the safe side.
    (
        Source.PRIMARY,
        event("delete", digest=D, tag="v1"),
        [DigestDeleted("group/app", D), TagInvalidated("group/app", "v1")],
    ),
    (
        Source.LOCAL,
        event("delete", digest=D, tag="v1"),
        [
            BlobPresence("group/app", D, False),
            ManifestPresence("group/app", D, False),
            DigestRestored("group/app", D),
            LocalTag("group/app", "v1", ""),
        ],
    ),
]


@pytest.mark.parametrize(("source", "raw", "expected"), CASES)
def test_event_semantics(source: Source, raw: dict[str, Any], expected: list[Any]) -> None:
    outcome = interpret_event(raw, source, NOW)
    assert list(outcome.updates) == expected
    assert outcome.status == ("applied" if expected else "ignored")


@pytest.mark.parametrize("skew", [-3600.0, 0.0, 3600.0])
def test_no_update_depends_on_the_events_clock(skew: float) -> None:
    raw = event("push", mediaType=OCI, digest=D, tag="v1")
    raw["timestamp"] = (
        "2099-01-01T00:00:00Z" if skew > 0 else ("1999-01-01T00:00:00Z" if skew < 0 else raw["timestamp"])
    )
    assert interpret_event(raw, Source.PRIMARY, NOW + skew).updates == (TagInvalidated("group/app", "v1", hint=D),)


def test_an_unreadable_primary_event_for_a_valid_repository_re_resolves_its_tags() -> None:
    raw = {"action": "push", "target": {"repository": "group/app", "digest": "sha256:short", "tag": "v1"}}
    outcome = interpret_event(raw, Source.PRIMARY, NOW)
    assert outcome.status == "malformed" and outcome.updates == (RepositoryInvalidated("group/app"),)
    assert interpret_event({"action": "push", "target": {"repository": "Bad"}}, Source.PRIMARY, NOW).updates == ()


def test_nanosecond_timestamps_are_read() -> None:
    assert read_timestamp("2026-11-23T19:19:22.300123456Z") == pytest.approx(1795461562.300123, abs=1e-6)
    assert read_timestamp("2026-11-23T19:19:22Z") == pytest.approx(1795461562.0)
    assert read_timestamp("yesterday") is None


@pytest.mark.parametrize(
    "raw",
    [
        "a string",
        {"action": "push"},
        {"action": "push", "target": "x"},
        {"action": "push", "target": {"repository": "Group/App", "digest": D}},
        {"action": "push", "target": {"repository": "group/app", "digest": "sha256:short"}},
        {"action": "push", "target": {"repository": "group/app", "digest": D, "tag": "-bad"}},
        {"action": "push", "target": {"repository": "group/app"}},
        {"action": "delete", "target": {"repository": "group/app"}},
        {"action": 5, "target": {"repository": "group/app", "digest": D}},
        {"action": "push", "target": {"repository": ["group/app"], "digest": D}},
    ],
)
def test_malformed_events_are_reported_not_raised(raw: Any) -> None:
    outcome = interpret_event(raw, Source.LOCAL, NOW)
    assert outcome.status == "malformed" and outcome.updates == () and outcome.problem


def test_unknown_actions_are_ignored() -> None:
    outcome = interpret_event(event("teleport", digest=D), Source.LOCAL, NOW)
    assert (outcome.status, outcome.updates) == ("ignored", ())


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b'{"events": 5}', b'"events"', b"\xff\xfe"])
def test_bodies_that_are_not_envelopes(body: bytes) -> None:
    with pytest.raises(EnvelopeError):
        parse_envelope(body)


def test_a_real_envelope_parses() -> None:
    body = json.dumps({"events": [event("push", mediaType=OCI, digest=D, tag="v1")]}, indent=3).encode()
    assert len(parse_envelope(body)) == 1


# -- the real envelopes: Distribution 2.8.2 and 3.0.0 ------------------------------------------------

FIXTURES = Path(__file__).parent / "fixtures" / "notifications"
EVENTS_V1 = "application/vnd.docker.distribution.events.v1+json"
EVENTS_V2 = "application/vnd.docker.distribution.events.v2+json"
APP, OTHER = "notif/app", "notif/other"
# The digests of each capture: the layer and the config blob, the manifest tagged v1 and v2, the
# manifest pushed by digest.
DIGESTS = {
    "distribution-2.8.2": {
        "layer": "sha256:c3028b988c9a527f839a75391ad2412306b20fc8fa9246286cf353ded71695d6",
        "config": "sha256:bde7cbc16699721d5d62bef5c06c1d530f38053e27c35a0f8d8fed895aae5e16",
        "tagged": "sha256:ba8fd3d9d5196ece64b2b6cba4979798e2d65e961c99ffeafbb8a42fc0d9ee93",
        "untagged": "sha256:10029922d88544f2833aa9929b9da8de28d8e080e8feec9ba94debeba0114b21",
    },
    "distribution-3.0.0": {
        "layer": "sha256:0a9912b7c1ee45db4f364a5544ef2f8bf2a5dc2d8b7156ac0185c1c109db5fe8",
        "config": "sha256:ac8d7975c962d69610ed916bf31bab56452248e417fac6365d8a8ef9eab485f4",
        "tagged": "sha256:1973fbee4c4a7cca65f5f5d5c2834645a4aeadc52b7d9f3338de3af2663373da",
        "untagged": "sha256:b4333899e24d31b15b766a963d7c5afdd2e6a1154442a01a75fc1691a9ac79d8",
    },
}
# Every captured file, in arrival order: the operation it records, and its media type.
CAPTURED = {
    "distribution-2.8.2": (
        EVENTS_V1,
        [
            ("01-push-blob.json", "push layer"),
            ("02-push-blob.json", "push config"),
            ("03-push-manifest.json", "push tagged v1"),
            ("04-push-manifest.json", "push tagged v2"),
            ("05-push-manifest.json", "push untagged"),
            ("06-mount-blob.json", "mount layer"),
            # 2.8 refuses DELETE by tag (400, no event); the digest delete untags v1 and v2
            ("07-delete-digest.json", "delete tagged"),
            ("08-delete-tag-v1.json", "delete tag v1"),
            ("09-delete-tag-v2.json", "delete tag v2"),
            ("10-delete-digest.json", "delete layer"),
        ],
    ),
    "distribution-3.0.0": (
        EVENTS_V2,
        [
            ("01-push-blob.json", "push layer"),
            ("02-push-blob.json", "push config"),
            ("03-push-manifest.json", "push tagged v1"),
            ("04-push-manifest.json", "push tagged v2"),
            ("05-push-manifest.json", "push untagged"),
            ("06-mount-blob.json", "mount layer"),
            ("07-delete-tag-v1.json", "delete tag v1"),  # DELETE by tag: digest "", mediaType "", size 0
            ("08-delete-digest.json", "delete tagged"),
            ("09-delete-tag-v2.json", "delete tag v2"),  # the tag the digest delete took along
            ("10-delete-digest.json", "delete layer"),
        ],
    ),
}


def captured(dialect: str, name: str) -> tuple[str, bytes]:
    """(Content-Type, body) of a captured delivery, the body as the registry sent it (JSON)."""
    saved = json.loads((FIXTURES / dialect / name).read_text())
    return saved["content_type"], json.dumps(saved["body"], indent=3).encode()


def expected_updates(dialect: str, operation: str, source: Source) -> list[IndexUpdate]:
    """What each labelled operation must change, from the local registry or from the primary."""
    d = DIGESTS[dialect]
    local = source is Source.LOCAL
    match operation.split():
        case ["push", "layer" | "config" as blob]:
            return [BlobPresence(APP, d[blob], True)] if local else []
        case ["push", "tagged", tag]:
            return (
                [ManifestPresence(APP, d["tagged"], True), LocalTag(APP, tag, d["tagged"])]
                if local
                else [TagInvalidated(APP, tag, hint=d["tagged"])]
            )
        case ["push", "untagged"]:
            return [ManifestPresence(APP, d["untagged"], True)] if local else []
        case ["mount", "layer"]:
            return [BlobPresence(OTHER, d["layer"], True)] if local else []
        case ["delete", "tag", tag]:
            return [LocalTag(APP, tag, "")] if local else [TagInvalidated(APP, tag)]
        case ["delete", "tagged" | "layer" as what]:
            digest = d[what]
            if not local:
                return [DigestDeleted(APP, digest)]
            return [BlobPresence(APP, digest, False), ManifestPresence(APP, digest, False), DigestRestored(APP, digest)]
    raise AssertionError(f"no expectation for {operation!r}")


def test_every_captured_file_is_labelled() -> None:
    for dialect, (_, files) in CAPTURED.items():
        assert sorted(path.name for path in (FIXTURES / dialect).glob("*.json")) == [name for name, _ in files]


@pytest.mark.parametrize("source", [Source.LOCAL, Source.PRIMARY], ids=["local", "primary"])
@pytest.mark.parametrize(
    ("dialect", "name", "operation"),
    [(dialect, name, operation) for dialect, (_, files) in CAPTURED.items() for name, operation in files],
)
def test_captured_envelopes_give_the_updates_of_their_operation(
    source: Source, dialect: str, name: str, operation: str
) -> None:
    content_type, body = captured(dialect, name)
    assert content_type == CAPTURED[dialect][0]
    (outcome,) = interpret_events(parse_envelope(body), source, NOW)
    expected = expected_updates(dialect, operation, source)
    assert list(outcome.updates) == expected
    assert outcome.status == ("applied" if expected else "ignored")
    assert outcome.event is not None and outcome.event.timestamp is not None


# -- GitLab: rename, actor.user, meta ------------------------------------------------------------------

USER_JWT = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJyb290In0.c2lnbmF0dXJl"


def gitlab_event(action: str, repository: str, **target: Any) -> dict[str, Any]:
    """Shaped as GitLab's registry sends it (its rename MR's sample): ``actor.user`` a JWT, and ``meta``."""
    return {
        "id": "7275155c-d982-4e4f-9a44-ae8ba6731d6a",
        "timestamp": "2024-10-22T18:39:11.410627455Z",
        "action": action,
        "target": {"repository": repository, **target},
        "request": {"id": "8cef8bab", "addr": "127.0.0.1:35140", "method": "PATCH", "useragent": "Go-http-client/1.1"},
        "actor": {"name": "root", "user_type": "personal_access_token", "user": USER_JWT},
        "source": {"addr": "c13aa3fb836c"},
        "meta": {"project_path": "foo/foo"},
    }


RENAMES = [
    # GitLab's own sample: full paths
    (
        "foo/foo/project",
        {"type": "namespace", "from": "foo/foo/project", "to": "foo/bar/project"},
        ["foo/foo/project"],
        ["foo/bar/project"],
    ),
    ("foo/foo/project", {"type": "name", "from": "foo/foo/project", "to": "foo/foo/renamed"}, [], ["foo/foo/renamed"]),
    # bare names and bare namespaces are read too
    ("foo/foo/project", {"type": "name", "from": "project", "to": "renamed"}, [], ["foo/foo/renamed"]),
    ("foo/foo/project", {"type": "namespace", "from": "foo/foo", "to": "foo/bar"}, [], ["foo/bar/project"]),
    ("project", {"type": "name", "from": "project", "to": "renamed"}, [], ["renamed"]),
]


@pytest.mark.parametrize(("repository", "rename", "old", "new"), RENAMES)
def test_a_rename_from_the_primary_invalidates_every_tag_under_both_paths(
    repository: str, rename: dict[str, str], old: list[str], new: list[str]
) -> None:
    outcome = interpret_event(gitlab_event("rename", repository, rename=rename), Source.PRIMARY, NOW)
    paths = sorted({repository, *old}) + new
    assert list(outcome.updates) == [RepositoryInvalidated(path, subtree=True) for path in paths]


@pytest.mark.parametrize(("repository", "rename", "old", "new"), RENAMES)
def test_a_rename_from_the_local_registry_drops_what_was_present_under_the_old_path(
    repository: str, rename: dict[str, str], old: list[str], new: list[str]
) -> None:
    """The local registry moved its content: nothing is here under ``from`` (and under it) any more.
    The new path is left to its later events and to reconciliation."""
    outcome = interpret_event(gitlab_event("rename", repository, rename=rename), Source.LOCAL, NOW)
    assert outcome.status == "applied"
    assert list(outcome.updates) == [LocalRepositoryDropped(path, subtree=True) for path in sorted({repository, *old})]


def test_a_rename_never_reads_a_namespace_as_the_old_path() -> None:
    """``from`` read as a full path would be a parent of the repository: a whole namespace."""
    raw = gitlab_event("rename", "foo/project", rename={"type": "namespace", "from": "foo", "to": "bar"})
    assert interpret_event(raw, Source.LOCAL, NOW).updates == (LocalRepositoryDropped("foo/project", subtree=True),)
    assert interpret_event(raw, Source.PRIMARY, NOW).updates == (
        RepositoryInvalidated("foo/project", subtree=True),
        RepositoryInvalidated("bar/project", subtree=True),
    )


def test_a_rename_of_an_unknown_type_is_malformed_and_re_resolves_the_repository() -> None:
    raw = gitlab_event("rename", "foo/project", rename={"type": "teleport", "from": "a", "to": "b"})
    assert interpret_event(raw, Source.LOCAL, NOW).status == "malformed"
    assert interpret_event(raw, Source.PRIMARY, NOW).updates == (RepositoryInvalidated("foo/project"),)


def test_gitlab_database_mode_digest_delete_takes_the_tags_pinned_to_it() -> None:
    raw = gitlab_event("delete", "foo/project", digest=D)
    assert interpret_event(raw, Source.PRIMARY, NOW).updates == (DigestDeleted("foo/project", D),)


def test_actor_user_never_reaches_an_update_or_a_problem() -> None:
    events = [
        gitlab_event("push", "foo/project", mediaType=OCI, digest=D, tag="v1"),
        gitlab_event("rename", "foo/project", rename={"type": "name", "from": "project", "to": "x"}),
        gitlab_event("push", "foo/project", mediaType=OCI, digest="sha256:short"),  # malformed
    ]
    for source in Source:
        outcomes = interpret_events(events, source, NOW)
        assert USER_JWT not in repr(outcomes)
