"""Docker Distribution notification envelopes → typed index updates (pure: no I/O, no clock reads).

Semantics as registry 2.8 really emits them (protocol notes §1.3):

* ``push``/``mount`` of a blob (mediaType ``application/octet-stream``) → the blob is present;
* ``push`` of a manifest → the manifest is present, and tag → digest when a tag is given;
* ``delete`` with a digest → removed as blob *and* as manifest (2.8 sends the same target for both);
* ``delete`` with a tag (no digest) → the tag is removed;
* ``pull`` and unknown actions are ignored; a malformed event is reported, never raised.

From the primary's registry only tags matter: a manifest push with a tag pins tag → digest with the
event's time; a tag delete removes the pin.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

from geo_route.index.model import BlobPresence, IndexUpdate, LocalTag, ManifestPresence, PrimaryTag
from geo_route.operations import is_valid_digest, is_valid_name, is_valid_tag

BLOB_MEDIA_TYPE = "application/octet-stream"
HANDLED_ACTIONS = frozenset({"push", "mount", "delete"})


class Source(Enum):
    LOCAL = "local"
    PRIMARY = "primary"


class EnvelopeError(ValueError):
    """The body is not a notification envelope at all (not JSON, no ``events`` list)."""


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    action: str
    timestamp: float | None
    repository: str
    digest: str
    tag: str
    media_type: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one event: its updates, or why it was ignored or rejected."""

    action: str
    status: str  # "applied" | "ignored" | "malformed"
    updates: tuple[IndexUpdate, ...] = ()
    event: Event | None = None
    problem: str = ""


def parse_envelope(body: bytes) -> list[Any]:
    """The raw ``events`` list; raises ``EnvelopeError`` when the body is not an envelope."""
    try:
        envelope = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EnvelopeError(f"not JSON: {exc}") from None
    except RecursionError:  # hostile nesting ("[[[[...") exhausts the decoder's stack: still not an envelope
        raise EnvelopeError("not JSON: nested too deeply") from None
    if not isinstance(envelope, dict) or not isinstance(envelope.get("events"), list):
        raise EnvelopeError("not an envelope: expected an object with an 'events' list")
    return list(envelope["events"])


def interpret_events(raw_events: Iterable[Any], source: Source, received_at: float) -> list[Outcome]:
    return [interpret_event(raw, source, received_at) for raw in raw_events]


def interpret_event(raw: Any, source: Source, received_at: float) -> Outcome:
    try:
        event = read_event(raw)
    except ValueError as exc:
        action = raw.get("action") if isinstance(raw, dict) else None
        return Outcome(action[:32] if isinstance(action, str) and action else "unknown", "malformed", problem=str(exc))
    if event.action not in HANDLED_ACTIONS:
        return Outcome(event.action[:32] if event.action else "unknown", "ignored", event=event)
    confirmed_at = event.timestamp if event.timestamp is not None else received_at
    updates = updates_for_local(event) if source is Source.LOCAL else updates_for_primary(event, confirmed_at)
    return Outcome(event.action, "applied" if updates else "ignored", tuple(updates), event)


def read_event(raw: Any) -> Event:
    if not isinstance(raw, dict):
        raise ValueError("event is not an object")
    target = raw.get("target")
    if not isinstance(target, dict):
        raise ValueError("event has no target object")
    action = text_field(raw, "action")
    repository = text_field(target, "repository")
    digest = text_field(target, "digest")
    tag = text_field(target, "tag")
    if action in HANDLED_ACTIONS:
        if not is_valid_name(repository):
            raise ValueError(f"invalid repository {repository[:80]!r}")
        if digest and not is_valid_digest(digest):
            raise ValueError(f"invalid digest {digest[:80]!r}")
        if tag and not is_valid_tag(tag):
            raise ValueError(f"invalid tag {tag[:80]!r}")
        if not digest and not (action == "delete" and tag):
            raise ValueError(f"{action} event without a digest")
    return Event(
        id=text_field(raw, "id"),
        action=action,
        timestamp=read_timestamp(raw.get("timestamp")),
        repository=repository,
        digest=digest,
        tag=tag,
        media_type=text_field(target, "mediaType"),
    )


def text_field(mapping: dict[str, Any], key: str) -> str:
    value = mapping.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string")
    return value


def read_timestamp(value: Any) -> float | None:
    """RFC 3339 (Go's ``time.Time`` JSON, nanoseconds included) as unix seconds, or None."""
    if not isinstance(value, str) or not value:
        return None
    text = value.replace("Z", "+00:00")
    if "." in text:  # Python parses at most microseconds
        head, _, rest = text.partition(".")
        digits = "".join(c for c in rest if c.isdigit())
        zone = rest[len(digits) :]
        text = f"{head}.{digits[:6] or '0'}{zone}"
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def updates_for_local(event: Event) -> list[IndexUpdate]:
    repository, digest = event.repository, event.digest
    if event.action == "delete":
        if digest:
            return [BlobPresence(repository, digest, False), ManifestPresence(repository, digest, False)]
        return [LocalTag(repository, event.tag, "")]
    if event.media_type == BLOB_MEDIA_TYPE:
        return [BlobPresence(repository, digest, True)]
    updates: list[IndexUpdate] = [ManifestPresence(repository, digest, True)]
    if event.tag:
        updates.append(LocalTag(repository, event.tag, digest))
    return updates


def updates_for_primary(event: Event, confirmed_at: float) -> list[IndexUpdate]:
    if event.action == "delete" and event.tag and not event.digest:
        return [PrimaryTag(event.repository, event.tag, "", confirmed_at)]
    if event.action == "push" and event.tag and event.media_type != BLOB_MEDIA_TYPE:
        return [PrimaryTag(event.repository, event.tag, event.digest, confirmed_at)]
    return []
