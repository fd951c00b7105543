"""Envelope parsing and event semantics (pure), with events shaped exactly as registry 2.8 sends them."""

from __future__ import annotations

import json
from typing import Any

import pytest

from geo_route.index.model import (
    BlobPresence,
    DigestDeleted,
    DigestRestored,
    LocalTag,
    ManifestPresence,
    RepositoryInvalidated,
    TagInvalidated,
)
from geo_route.updater.notifications import (
    EnvelopeError,
    Source,
    interpret_event,
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
    (Source.LOCAL, event("rename", rename={"type": "name", "from": "app", "to": "web"}), []),
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
