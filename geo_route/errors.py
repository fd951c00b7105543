"""The one error hierarchy of geo-route.

An error means "could not decide"; a deny is a value (see ``routing.Decision``), not an exception.
"""

from __future__ import annotations


class GeoRouteError(Exception):
    """Base of every error geo-route raises on purpose."""


class ConfigError(GeoRouteError):
    """The site file or environment is invalid; ``problems`` lists every one with its key path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


class KeyBundleError(GeoRouteError):
    """The PEM certificate bundle could not be read or holds no usable key."""


class TokenError(GeoRouteError):
    """A bearer token was present but is not acceptable. The message never contains the token."""


class IndexUnavailable(GeoRouteError):
    """The digest index (Redis) could not answer in time."""


class DevstackError(GeoRouteError):
    """A development-stack component (binary, process, registry, skopeo) is missing or misbehaved."""
