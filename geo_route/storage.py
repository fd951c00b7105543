"""The local registry's filesystem storage layout (Distribution 2.8 and 3, pure): where a blob's or a
manifest's bytes and a repository's link to it live, relative to ``storage.filesystem.rootdirectory``.

Distribution's path mapper (``registry/storage/paths.go``) stores a blob once per digest, under
``docker/registry/v2/blobs/<algorithm>/<first two hex>/<hex>/data``, and records that a repository
holds it with the link file ``docker/registry/v2/repositories/<name>/_layers/<algorithm>/<hex>/link``.
A blob GET/HEAD is answered only when that link exists (``linkedBlobStatter.Stat``): a blob pushed
to one repository is not served from another. A manifest's bytes are a blob too; its repository's
link is the revision ``.../<name>/_manifests/revisions/<algorithm>/<hex>/link``, which a manifest
GET/HEAD by digest needs (``manifestStore.Get`` through the revision-linked blob store). NGINX
serves blobs and manifests straight from these files (``local_registry.storage_root``); the paths
come from here, built only from a validated name and digest, never from the request's URI.
"""

from __future__ import annotations

from dataclasses import dataclass

from geo_route.operations import is_valid_digest, is_valid_name

STORAGE_PREFIX = "/docker/registry/v2"
# NGINX answers a manifest from storage up to this size (Distribution's limit on a manifest PUT,
# maxManifestBodySize); a larger file is the registry's to answer.
MANIFEST_MAX_BYTES = 4 << 20


@dataclass(frozen=True, slots=True)
class BlobFiles:
    """A blob's or manifest's files, as absolute paths below the storage root (each starts with ``/``)."""

    data: str  # the bytes
    link: str  # the repository's link to it: present when the blob belongs to the repository


def blob_files(repository: str, digest: str) -> BlobFiles | None:
    """The files of the blob ``digest`` in ``repository``, or ``None`` for a name or digest the
    registry would refuse (the index never holds one)."""
    return _linked_files(repository, digest, "_layers")


def manifest_files(repository: str, digest: str) -> BlobFiles | None:
    """The files of the manifest ``digest`` in ``repository`` (its revision link), or ``None`` as
    for ``blob_files``."""
    return _linked_files(repository, digest, "_manifests/revisions")


def _linked_files(repository: str, digest: str, links: str) -> BlobFiles | None:
    if not is_valid_name(repository) or not is_valid_digest(digest):
        return None
    algorithm, encoded = digest.split(":", 1)
    return BlobFiles(
        data=f"{STORAGE_PREFIX}/blobs/{algorithm}/{encoded[:2]}/{encoded}/data",
        link=f"{STORAGE_PREFIX}/repositories/{repository}/{links}/{algorithm}/{encoded}/link",
    )
