"""Content negotiation for manifests requested by tag (pure).

A registry reads the client's ``Accept`` only when it answers a manifest request, and differently
by tag and by digest (registry dialects §4): an OCI manifest or index the client does not accept is
a 404; a Docker manifest list requested by tag by a client that does not accept lists becomes its
linux/amd64 child; on 2.8 a schema 2 manifest requested by tag by a client that does not accept
schema 2 becomes a schema 1 conversion. A pinned tag is served locally by its digest, so it is
served locally only when the registry would answer this ``Accept`` with exactly that manifest: the
pinned media type is named in the ``Accept`` header. Like registry 2.8 (verified), the match is
exact on the media type alone: parameters and ``q`` are dropped, case is not folded (an upper-case
type is not matched by 2.8; GitLab's registry folds case since v2.9, and going to the primary is
right for both), ``*/*`` names nothing.
"""

from __future__ import annotations

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
NEGOTIATED_TYPES = frozenset({OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST})


def accepted_media_types(accept: str) -> frozenset[str]:
    """The media types an ``Accept`` value names (several headers arrive joined with commas)."""
    return frozenset(part.split(";", 1)[0].strip() for part in accept.split(",") if part.strip())


def serves_pinned_manifest(media_type: str, accept: str) -> bool:
    """True when a request by tag with this ``Accept`` gets the pinned manifest itself."""
    return media_type in NEGOTIATED_TYPES and media_type in accepted_media_types(accept)
