"""Content negotiation for manifests requested by tag (pure).

A registry reads the client's ``Accept`` only when it answers a manifest request, and differently
by tag and by digest (registry dialects §4): an OCI manifest or index the client does not accept is
a 404; a Docker manifest list requested by tag by a client that does not accept lists becomes its
linux/amd64 child; on 2.8 a schema 2 manifest requested by tag by a client that does not accept
schema 2 becomes a schema 1 conversion. A pinned tag is served locally by its digest, so it is
served locally only when the registry would answer this ``Accept`` with exactly that manifest.

``distribution-2.8`` and ``gitlab`` (``token.dialect``): the pinned media type is named in the
``Accept`` header. Like registry 2.8 (verified), the match is exact on the media type alone:
parameters and ``q`` are dropped, case is not folded (an upper-case type is not matched by 2.8;
GitLab's registry folds case since v2.9, and going to the primary is right for both), ``*/*`` names
nothing.

``distribution-3`` (v3.0.0 ``registry/handlers/manifests.go``, ``GetManifest``; the same in 3.1):
no schema 1 any more, so a schema 2 manifest is answered as itself whatever the ``Accept``; an OCI
index is too (it is read as an ``ocischema.DeserializedImageIndex``, which the handler's type switch
does not recognize, so its 404 for an index the client does not accept never happens); an OCI
manifest and a Docker list are answered as themselves when the ``Accept`` names them as Go's
``mime.ParseMediaType`` reads each comma-separated part (case folded, parameters checked: a part
whose parameters do not parse names nothing). ``go_accepted_media_types`` reads a strict subset of
what Go reads (anything unusual names nothing here: the primary answers, which is always right).
"""

from __future__ import annotations

import re

from geo_route.config import Dialect

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
NEGOTIATED_TYPES = frozenset({OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST})
# Distribution 3 answers these by tag as themselves, whatever the Accept (above).
ANSWERED_AS_THEMSELVES_BY_3 = frozenset({DOCKER_MANIFEST, OCI_INDEX})

# RFC 7230 tchar (Go's token characters also allow "{" and "}": refusing them is the safe side).
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# "; key=value" parameters with plain token values, then at most one trailing ";".
_PARAMETERS = re.compile(rf"(?:[ \t]*;[ \t]*({_TOKEN})[ \t]*=[ \t]*{_TOKEN})*[ \t]*;?[ \t]*")
_PARAMETER_NAME = re.compile(rf";[ \t]*({_TOKEN})[ \t]*=")


def accepted_media_types(accept: str) -> frozenset[str]:
    """The media types an ``Accept`` value names (several headers arrive joined with commas), as 2.8 reads them."""
    return frozenset(part.split(";", 1)[0].strip() for part in accept.split(",") if part.strip())


def go_accepted_media_types(accept: str) -> frozenset[str]:
    """The media types an ``Accept`` value names as Distribution 3 reads them (``mime.ParseMediaType``
    on each comma-separated part; a part it refuses names nothing), restricted to a subset Go surely
    reads the same way: ASCII, space and tab around, token parameter names and values, each name once."""
    named = set()
    for part in accept.split(","):
        base, _, _ = part.partition(";")
        parameters = part[len(base) :]
        if not part.isascii() or not _PARAMETERS.fullmatch(parameters):
            continue
        names = [name.lower() for name in _PARAMETER_NAME.findall(parameters)]
        if len(names) != len(set(names)) or any("*" in name for name in names):
            continue  # Go refuses a repeated name with another value, and reads "*" names as continuations
        media_type = base.strip(" \t").lower()
        if media_type:
            named.add(media_type)
    return frozenset(named)


def serves_pinned_manifest(media_type: str, accept: str, dialect: Dialect) -> bool:
    """True when a request by tag with this ``Accept`` gets the pinned manifest itself from a
    registry of ``dialect``."""
    if media_type not in NEGOTIATED_TYPES:
        return False
    if dialect == "distribution-3":
        return media_type in ANSWERED_AS_THEMSELVES_BY_3 or media_type in go_accepted_media_types(accept)
    return media_type in accepted_media_types(accept)
