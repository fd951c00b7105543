"""Scopes a client asks the token service for, and the access a user's rules grant (pure).

Grammar (``docs/spec/auth/scope.md``): ``type[(class)]:name:action[,action]*``; ``scope`` may repeat and
each value may hold several space-separated scopes. A name may contain one ``:`` (``host:port/repo``),
so the type is split off on the left and the actions on the right.

Granting follows the registry's token spec: never refuse for insufficient access, grant the
intersection of what was asked and what the rules allow (an allowed ``*`` allows any action).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

WILDCARD_ACTION = "*"
REGISTRY_RULE_PREFIX = "registry:"

Rules = Mapping[str, Collection[str]]
"""Rule key → allowed actions. A key is a repository name or glob (``group/*``; ``*`` also matches ``/``),
or ``registry:<name>`` for a registry resource, e.g. ``registry:catalog``."""


@dataclass(frozen=True)
class Scope:
    """One requested resource and the actions asked for it, in the client's order."""

    type: str
    name: str
    actions: tuple[str, ...]


def parse_scope(text: str) -> Scope:
    """``repository:group/app:pull,push`` → ``Scope``; ``ValueError`` when it is not ``type:name:actions``."""
    kind, separator, rest = text.partition(":")
    name, separator2, actions = rest.rpartition(":")
    if not (separator and separator2 and kind and name):
        raise ValueError(f"scope {text!r} is not type:name:actions")
    return Scope(kind, name, tuple(action for action in actions.split(",") if action))


def parse_scopes(values: Iterable[str]) -> list[Scope]:
    """Every scope of repeated, space-separated ``scope`` parameters, in order."""
    return [parse_scope(item) for value in values for item in value.split()]


def rule_matches(key: str, scope: Scope) -> bool:
    if key.startswith(REGISTRY_RULE_PREFIX):
        return scope.type == "registry" and scope.name == key[len(REGISTRY_RULE_PREFIX) :]
    return scope.type == "repository" and fnmatchcase(scope.name, key)


def allowed_actions(rules: Rules, scope: Scope) -> frozenset[str]:
    """The union of the actions of every rule that matches the scope's resource."""
    return frozenset(action for key, actions in rules.items() if rule_matches(key, scope) for action in actions)


def granted_actions(requested: Iterable[str], allowed: Collection[str]) -> list[str]:
    """The requested actions the rules allow, deduplicated, in the requested order."""
    granted: list[str] = []
    for action in requested:
        if (action in allowed or WILDCARD_ACTION in allowed) and action not in granted:
            granted.append(action)
    return granted


def grant_access(scopes: Iterable[Scope], rules: Rules) -> list[dict[str, Any]]:
    """The JWT ``access`` claim: one entry per resource that is granted at least one action."""
    merged: dict[tuple[str, str], list[str]] = {}
    for scope in scopes:
        actions = merged.setdefault((scope.type, scope.name), [])
        for action in granted_actions(scope.actions, allowed_actions(rules, scope)):
            if action not in actions:
                actions.append(action)
    return [{"type": kind, "name": name, "actions": actions} for (kind, name), actions in merged.items() if actions]
