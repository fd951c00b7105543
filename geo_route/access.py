"""Access records and grants: what a request needs and what a token allows (registry 2.8 rules)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

WILDCARD_ACTION = "*"


@dataclass(frozen=True, slots=True)
class Access:
    """One (type, name, action) the registry checks, e.g. ``repository:group/app:push``."""

    type: str
    name: str
    action: str


def format_scope(required: Iterable[Access]) -> str:
    """The challenge's ``scope`` value: one ``type:name:a,b`` per resource, space separated, in order."""
    actions: dict[tuple[str, str], list[str]] = {}
    for access in required:
        listed = actions.setdefault((access.type, access.name), [])
        if access.action not in listed:
            listed.append(access.action)
    return " ".join(f"{kind}:{name}:{','.join(acts)}" for (kind, name), acts in actions.items())


@dataclass(frozen=True, slots=True)
class Grants:
    """What a verified token allows: resource → actions, plus the facts a cache needs."""

    subject: str
    expires_at: float
    actions: Mapping[tuple[str, str], frozenset[str]]

    def allows(self, access: Access) -> bool:
        granted = self.actions.get((access.type, access.name))
        return granted is not None and (access.action in granted or WILDCARD_ACTION in granted)

    def allows_all(self, required: Iterable[Access]) -> bool:
        return all(self.allows(access) for access in required)


def parse_access_claim(claim: Any) -> dict[tuple[str, str], frozenset[str]]:
    """The JWT ``access`` claim as a map; raises ``ValueError`` when it is not the registry's shape."""
    if claim is None:
        return {}
    if not isinstance(claim, list):
        raise ValueError("access claim must be a list")
    merged: dict[tuple[str, str], set[str]] = {}
    for entry in claim:
        if not isinstance(entry, dict):
            raise ValueError("access entry must be an object")
        kind, name, actions = entry.get("type"), entry.get("name"), entry.get("actions", [])
        if not isinstance(kind, str) or not isinstance(name, str):
            raise ValueError("access entry needs string type and name")
        if not isinstance(actions, list) or not all(isinstance(a, str) for a in actions):
            raise ValueError("access actions must be a list of strings")
        merged.setdefault((kind, name), set()).update(actions)
    return {key: frozenset(value) for key, value in merged.items()}
