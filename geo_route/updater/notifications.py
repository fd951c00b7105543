"""Docker Distribution notification envelopes → typed index updates (pure: no I/O, no clock reads).

Every dialect's envelope reads the same (registry dialects §2): Distribution 2.8 and GitLab send
``…events.v1+json``, 3.0 ``…events.v2+json`` with the same JSON; 3.0 writes every target field
even when it has no value (``"digest": ""``, ``"size": 0``), so an empty string is read as absent,
never as a value. GitLab adds ``rename``, ``actor.user`` (a JWT: never read, logged or stored) and
``meta`` (ignored). Semantics as the registries really emit them (protocol notes §1.3):

* ``push``/``mount`` of a blob (mediaType ``application/octet-stream``) → the blob is present;
* ``push`` of a manifest → the manifest is present, and tag → digest when a tag is given;
* ``delete`` with a digest → removed as blob *and* as manifest (2.8 sends the same target for both);
* ``delete`` with a tag (no digest; 3.0's ``DELETE`` by tag, and the tags a digest delete took) →
  the tag is removed;
* ``rename`` (GitLab) → nothing is present under the old path (and the repositories under it) any
  more: the local registry moved it; reconciliation finds it under the new path;
* ``pull`` and unknown actions are ignored; a malformed event is reported, never raised.

From the primary's registry an event is a hint, never a fact to pin (docs/consistency.md): events
arrive late, twice, out of order or never, and their timestamps come from another machine's clock.
An event that concerns a tag invalidates it (a tombstone stamped by the index's own clock) and
queues its resolution at the primary, which pins what the primary then answers:

* ``push`` of a manifest with a tag → that tag (with the pushed digest as a hint);
* ``delete`` with a tag → that tag; ``delete`` with a digest → the digest is deleted at the primary
  (not served by digest here) and every tag pinned to it (GitLab's database mode sends no tag events);
* ``rename`` (GitLab) → every tag of the repository and everything under it, at the old path and
  at the new one (``from`` and ``to``, however GitLab spells them);
* an event that cannot be read but names a valid repository → every tag of that repository.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

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
from geo_route.operations import is_valid_digest, is_valid_name, is_valid_tag

BLOB_MEDIA_TYPE = "application/octet-stream"
HANDLED_ACTIONS = frozenset({"push", "mount", "delete", "rename"})


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
    renamed_from: tuple[str, ...] = ()  # rename: the paths it moved away from (``repository`` included)
    renamed_to: tuple[str, ...] = ()  # rename: the paths it now lives under


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
    """``received_at`` is kept for the signature's callers; no update depends on any clock."""
    try:
        event = read_event(raw)
    except ValueError as exc:
        action = raw.get("action") if isinstance(raw, dict) else None
        label = action[:32] if isinstance(action, str) and action else "unknown"
        updates = unreadable_primary_event(raw) if source is Source.PRIMARY else ()
        return Outcome(label, "malformed", updates, problem=str(exc))
    if event.action not in HANDLED_ACTIONS:
        return Outcome(event.action[:32] if event.action else "unknown", "ignored", event=event)
    found = updates_for_local(event) if source is Source.LOCAL else updates_for_primary(event)
    return Outcome(event.action, "applied" if found else "ignored", tuple(found), event)


def unreadable_primary_event(raw: Any) -> tuple[IndexUpdate, ...]:
    """An event from the primary that cannot be read may still have changed a repository's tags:
    when it names a valid repository, every tag of it is re-resolved."""
    target = raw.get("target") if isinstance(raw, dict) else None
    repository = target.get("repository") if isinstance(target, dict) else None
    if isinstance(repository, str) and is_valid_name(repository):
        return (RepositoryInvalidated(repository),)
    return ()


def read_event(raw: Any) -> Event:
    if not isinstance(raw, dict):
        raise ValueError("event is not an object")  # actor, request, source and meta are never read
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
        if not digest and not (action == "delete" and tag) and action != "rename":
            raise ValueError(f"{action} event without a digest")
    renamed_from, renamed_to = read_rename(target, repository) if action == "rename" else ((), ())
    return Event(
        id=text_field(raw, "id"),
        action=action,
        timestamp=read_timestamp(raw.get("timestamp")),
        repository=repository,
        digest=digest,
        tag=tag,
        media_type=text_field(target, "mediaType"),
        renamed_from=renamed_from,
        renamed_to=renamed_to,
    )


def read_rename(target: dict[str, Any], repository: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(old paths, new paths) of a GitLab ``rename``: ``target.rename = {type, from, to}`` with
    ``type`` ``name`` (the last path component changes) or ``namespace`` (the repository moves
    under another namespace); ``target.repository`` is the old path. GitLab's own sample sends full
    paths (``"from": "foo/foo/project", "to": "foo/bar/project"``); a bare name, or a bare
    namespace, is read too. Every reading that makes a valid path is returned: invalidating a path
    too many costs a resolution, one too few serves a stale tag."""
    rename = target.get("rename")
    if not isinstance(rename, dict):
        raise ValueError("rename event without a rename object")
    kind, old, new = (text_field(rename, key) for key in ("type", "from", "to"))
    if kind not in ("name", "namespace"):
        raise ValueError(f"unknown rename type {kind[:40]!r}")
    old_paths = outermost({repository, *rename_readings(kind, old, repository)})
    new_paths = outermost(rename_readings(kind, new, repository)) - old_paths
    return tuple(sorted(old_paths)), tuple(sorted(new_paths))


def outermost(paths: set[str]) -> set[str]:
    """``paths`` without those under another of them (a rename takes every path under it along)."""
    return {path for path in paths if not any(path.startswith(f"{other}/") for other in paths)}


def rename_readings(kind: str, value: str, repository: str) -> set[str]:
    """The valid paths ``value`` (a rename's ``from`` or ``to``) may stand for. Never a parent of
    ``repository`` (the old path itself): that reading would take a whole namespace along."""
    if not value:
        return set()
    parent, _, last = repository.rpartition("/")
    if kind == "name":  # a full path as it is, a bare name in place of the last component
        readings = {value if "/" in value or not parent else f"{parent}/{value}"}
    else:  # a namespace takes the last component with it; a full path ends with it
        readings = {f"{value}/{last}"} | ({value} if value == last or value.endswith(f"/{last}") else set())
    return {path for path in readings if is_valid_name(path) and not repository.startswith(f"{path}/")}


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
    if event.action == "rename":  # moved away: nothing is here under the old paths; the new ones are
        # left to the local registry's later events and to reconciliation (absent is the safe side)
        return [LocalRepositoryDropped(path, subtree=True) for path in event.renamed_from]
    if event.action == "delete":
        updates: list[IndexUpdate] = []
        if digest:  # gone here too: a later copy of it (the primary has it again) may be served
            updates += [
                BlobPresence(repository, digest, False),
                ManifestPresence(repository, digest, False),
                DigestRestored(repository, digest),
            ]
        if event.tag:
            updates.append(LocalTag(repository, event.tag, ""))
        return updates
    if event.media_type == BLOB_MEDIA_TYPE:
        return [BlobPresence(repository, digest, True)]
    pushed: list[IndexUpdate] = [ManifestPresence(repository, digest, True)]
    if event.tag:
        pushed.append(LocalTag(repository, event.tag, digest))
    return pushed


def updates_for_primary(event: Event) -> list[IndexUpdate]:
    repository = event.repository
    if event.action == "rename":
        paths = (*event.renamed_from, *event.renamed_to)
        return [RepositoryInvalidated(path, subtree=True) for path in paths]
    if event.action == "delete":  # a digest, a tag, or (no dialect sends it, but either is safe) both
        deleted: list[IndexUpdate] = [DigestDeleted(repository, event.digest)] if event.digest else []
        return deleted + ([TagInvalidated(repository, event.tag)] if event.tag else [])
    if event.action == "push" and event.tag and event.media_type != BLOB_MEDIA_TYPE:
        return [TagInvalidated(repository, event.tag, hint=event.digest)]
    return []
