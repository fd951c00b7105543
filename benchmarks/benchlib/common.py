"""Constants and the error type every benchmark module shares."""

from __future__ import annotations

from dataclasses import dataclass

LOOPBACK = "127.0.0.1"
REPOSITORY = "bench/app"
BLOB_DIGEST = "sha256:" + "ab" * 32
MANIFEST_DIGEST = "sha256:" + "cd" * 32
TAG = "v1"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"  # the tag's pin: what the primary answered
# A tag request's Accept as Docker sends it; the pinned type is named, so the tag is served locally.
TAG_ACCEPT = ", ".join(
    (
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.index.v1+json",
        MANIFEST_MEDIA_TYPE,
    )
)
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


@dataclass(frozen=True)
class BenchRequest:
    """One kind of decision the load asks for (``--request``) and the only answer it may get."""

    name: str
    uri: str
    decision: tuple[str, str, str]  # the decisions counter's (route, reason, operation)
    accept: str = ""
    index_work: str = ""  # what the index does for it (printed)

    @property
    def answer(self) -> str:
        return "/".join(self.decision[:2])


BLOB = BenchRequest("blob", REQUEST_URI, EXPECTED_DECISION, index_work="one SISMEMBER")
MANIFEST = BenchRequest(
    "manifest",
    f"/v2/{REPOSITORY}/manifests/{MANIFEST_DIGEST}",
    ("local", "manifest-local", "manifest-by-digest"),
    index_work="one Lua script since issue 10 (present, not deleted at the primary); SISMEMBER before",
)
TAG_REQUEST = BenchRequest(
    "tag",
    f"/v2/{REPOSITORY}/manifests/{TAG}",
    ("local", "tag-pinned", "manifest-by-tag"),
    accept=TAG_ACCEPT,
    index_work="one Lua script (pin, epoch, presence, TIME; queues a refresh when due)",
)
REQUESTS = {request.name: request for request in (BLOB, MANIFEST, TAG_REQUEST)}


def build_auth_headers(token: str, request: BenchRequest = BLOB) -> dict[str, str]:
    """The headers NGINX's ``auth_request`` subrequest carries for one request of ``request``'s kind."""
    headers = {"X-Original-Method": "GET", "X-Original-URI": request.uri, "Authorization": f"Bearer {token}"}
    if request.accept:
        headers["Accept"] = request.accept  # the subrequest carries the client's own headers
    return headers
