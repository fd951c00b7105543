"""Constants and the error type every benchmark module shares."""

from __future__ import annotations

LOOPBACK = "127.0.0.1"
REPOSITORY = "bench/app"
BLOB_DIGEST = "sha256:" + "ab" * 32
REQUEST_URI = f"/v2/{REPOSITORY}/blobs/{BLOB_DIGEST}"
ISSUER = "geo-route-bench-issuer"
SERVICE = "container_registry"
EXPECTED_DECISION = ("local", "blob-local", "blob")  # the decisions counter's (route, reason, operation)

TARGET_RPS = 2000.0
TARGET_P99_MS = 10.0
TARGET_CONNECTIONS = 32
PACED_RATE_TOLERANCE = 0.02  # a paced run counts as "at the requested rate" within 2 % below it


class BenchError(Exception):
    """The benchmark itself could not be set up or run (as opposed to the service erring under load)."""


def build_auth_headers(token: str) -> dict[str, str]:
    """The headers NGINX's ``auth_request`` subrequest carries for one blob pull."""
    return {"X-Original-Method": "GET", "X-Original-URI": REQUEST_URI, "Authorization": f"Bearer {token}"}
