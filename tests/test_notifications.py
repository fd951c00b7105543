"""Envelope parsing and event semantics (pure), with events shaped exactly as registry 2.8 sends them."""

from __future__ import annotations

import json
from typing import Any

import pytest

from geo_route.index.model import BlobPresence, LocalTag, ManifestPresence, PrimaryTag
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
        [BlobPresence("group/app", D, False), ManifestPresence("group/app", D, False)],
    ),
    (Source.LOCAL, event("delete", tag="v1"), [LocalTag("group/app", "v1", "")]),
    (Source.LOCAL, event("pull", mediaType=OCI, digest=D, tag="v1"), []),
    (Source.PRIMARY, event("push", mediaType=OCI, digest=D, tag="v1"), [PrimaryTag("group/app", "v1", D, 0.0)]),
    (Source.PRIMARY, event("push", mediaType=OCI, digest=D), []),
    (Source.PRIMARY, event("push", mediaType="application/octet-stream", digest=D), []),
    (Source.PRIMARY, event("delete", tag="v1"), [PrimaryTag("group/app", "v1", "", 0.0)]),
    (Source.PRIMARY, event("delete", digest=D), []),
]


@pytest.mark.parametrize(("source", "raw", "expected"), CASES)
def test_event_semantics(source: Source, raw: dict[str, Any], expected: list[Any]) -> None:
    outcome = interpret_event(raw, source, NOW)
    confirmed = read_timestamp(raw["timestamp"])
    assert confirmed is not None
    fixed = [PrimaryTag(u.repository, u.tag, u.digest, confirmed) if isinstance(u, PrimaryTag) else u for u in expected]
    assert list(outcome.updates) == fixed
    assert outcome.status == ("applied" if expected else "ignored")


def test_nanosecond_timestamps_are_read() -> None:
    assert read_timestamp("2026-11-23T19:19:22.300123456Z") == pytest.approx(1795461562.300123, abs=1e-6)
    assert read_timestamp("2026-11-23T19:19:22Z") == pytest.approx(1795461562.0)
    assert read_timestamp("yesterday") is None


def test_missing_timestamp_uses_the_receipt_time() -> None:
    raw = event("push", mediaType=OCI, digest=D, tag="v1")
    del raw["timestamp"]
    assert interpret_event(raw, Source.PRIMARY, NOW).updates == (PrimaryTag("group/app", "v1", D, NOW),)


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
