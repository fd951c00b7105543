"""Replicate images from the primary registry to a secondary the way GitLab Geo does: pull from the
primary and push to the secondary with the real ``skopeo copy --all --preserve-digests``, each side
authenticated through the token flow with its own Basic credentials.

Digests are preserved, so a replicated tag names the same manifest digest on both sites.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from geo_route.devstack.skopeo import Credentials, Skopeo, SkopeoError, docker_reference


@dataclass(frozen=True)
class ReplicatedTag:
    repository: str
    tag: str
    digest: str


def replicate_tag(
    skopeo: Skopeo,
    primary: str,
    secondary: str,
    repository: str,
    tag: str,
    *,
    source_creds: Credentials,
    destination_creds: Credentials,
) -> ReplicatedTag:
    """Copy ``repository:tag`` from ``primary`` to ``secondary`` (both ``127.0.0.1:PORT``)."""
    source = docker_reference(primary, repository, tag)
    destination = docker_reference(secondary, repository, tag)
    digest = skopeo.copy(source, destination, src_creds=source_creds, dest_creds=destination_creds)
    return ReplicatedTag(repository, tag, digest)


def replicate_image(
    skopeo: Skopeo,
    primary: str,
    secondary: str,
    repository: str,
    tags: Sequence[str] | None = None,
    *,
    source_creds: Credentials,
    destination_creds: Credentials,
) -> list[ReplicatedTag]:
    """Copy the given tags of ``repository`` (all of the primary's tags when ``tags`` is None), in order."""
    if tags is None:
        tags = skopeo.list_tags(f"docker://{primary}/{repository}", source_creds)
    if not tags:
        raise SkopeoError(f"{repository} has no tags to replicate on {primary}", None, "")
    return [
        replicate_tag(
            skopeo, primary, secondary, repository, tag, source_creds=source_creds, destination_creds=destination_creds
        )
        for tag in tags
    ]
