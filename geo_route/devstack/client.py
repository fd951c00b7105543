"""Drive a running development stack the way users and GitLab Geo do: skopeo through the secondary
URL, replication from the primary to the secondary, and the index facts replication produces.

Until the index updater exists (issue 4), ``replicate`` records in the index what the secondary's
notifications will report (manifests and blobs now present, the local tags) and what the primary's
notifications will report (the tag's digest), and ``confirm_primary_tag`` asks the primary for a
tag's digest the way reconciliation will. Both use the index's own write API.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geo_route.config import load_settings
from geo_route.devstack.images import OciImage
from geo_route.devstack.replicate import ReplicatedTag, replicate_image
from geo_route.devstack.skopeo import Credentials, Skopeo, docker_reference
from geo_route.devstack.stack import RunningStack, StackInfo
from geo_route.index.model import BlobPresence, IndexUpdate, LocalTag, ManifestPresence, PrimaryTag
from geo_route.index.redis_store import RedisIndexStore

INDEX_MEDIA_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)


@dataclass(frozen=True)
class AccessLogEntry:
    method: str
    uri: str
    status: int
    bytes_sent: int
    route: str
    reason: str


class StackClient:
    def __init__(self, info: StackInfo, stack: RunningStack | None = None) -> None:
        self.info = info
        self.stack = stack  # set when this process started the stack and may stop its parts
        self.skopeo = Skopeo(Path(info.directory) / "skopeo")
        self.index = RedisIndexStore(load_settings(info.site_file, environ={}).redis)

    @property
    def secondary(self) -> str:
        return address_of(self.info.secondary_url)

    @property
    def primary(self) -> str:
        return address_of(self.info.primary_url)

    @property
    def local_registry(self) -> str:
        return address_of(self.info.local_registry_url)

    def credentials(self, user: str | None = None) -> Credentials:
        user = user or self.info.username
        return Credentials(user, self.info.users.get(user, self.info.password))

    def push(self, image: OciImage, repository: str, tag: str, user: str | None = None) -> str:
        """Push through the secondary URL (NGINX routes it to the primary); returns the manifest digest."""
        destination = docker_reference(self.secondary, repository, tag)
        return self.skopeo.copy(image.reference, destination, dest_creds=self.credentials(user))

    def pull(self, repository: str, tag: str, layout: Path, user: str | None = None) -> str:
        """Pull through the secondary URL into an OCI layout; returns the manifest digest."""
        layout.mkdir(parents=True, exist_ok=True)
        source = docker_reference(self.secondary, repository, tag)
        return self.skopeo.copy(source, f"oci:{layout}:{tag}", src_creds=self.credentials(user))

    def digest_at(self, address: str, repository: str, tag: str) -> str:
        return self.skopeo.manifest_digest(docker_reference(address, repository, tag), self.credentials())

    def replicate(self, repository: str, tags: list[str] | None = None) -> list[ReplicatedTag]:
        """Copy tags from the primary to the secondary registry (GitLab Geo's job) and index the result."""
        creds = self.credentials()
        copied = replicate_image(
            self.skopeo,
            self.primary,
            self.local_registry,
            repository,
            tags,
            source_creds=creds,
            destination_creds=creds,
        )
        updates: list[IndexUpdate] = []
        for replicated in copied:
            updates += self.presence_updates(repository, replicated.digest)
            updates.append(LocalTag(repository, replicated.tag, replicated.digest))
            updates.append(PrimaryTag(repository, replicated.tag, replicated.digest, time.time()))
        self.index.apply(updates)
        return copied

    def presence_updates(self, repository: str, digest: str) -> list[IndexUpdate]:
        """The manifest, its children (for an index) and every blob it references, as present locally."""
        reference = docker_reference(self.local_registry, repository, digest)
        manifest: dict[str, Any] = json.loads(self.skopeo.inspect_raw(reference, self.credentials()))
        updates: list[IndexUpdate] = [ManifestPresence(repository, digest, True)]
        if manifest.get("mediaType") in INDEX_MEDIA_TYPES or "manifests" in manifest:
            for child in manifest.get("manifests", []):
                updates += self.presence_updates(repository, child["digest"])
            return updates
        blobs = [manifest["config"], *manifest.get("layers", [])]
        return updates + [BlobPresence(repository, blob["digest"], True) for blob in blobs]

    def confirm_primary_tag(self, repository: str, tag: str) -> str:
        """Ask the primary which digest ``tag`` names now and pin it in the index."""
        digest = self.digest_at(self.primary, repository, tag)
        self.index.apply([PrimaryTag(repository, tag, digest, time.time())])
        return digest

    def access_log_offset(self) -> int:
        path = Path(self.info.nginx_access_log)
        return path.stat().st_size if path.exists() else 0

    def access_log(self, since: int = 0) -> list[AccessLogEntry]:
        """Entries written after byte offset ``since``, once the log has stopped growing for a moment
        (NGINX writes a request's line just after the response is sent)."""
        self.wait_for_quiet_log()
        with open(self.info.nginx_access_log, "rb") as stream:
            stream.seek(since)
            lines = stream.read().decode("utf-8").splitlines()
        return [parse_access_log_line(line) for line in lines if line.strip()]

    def wait_for_quiet_log(self, quiet: float = 0.05, limit: float = 2.0) -> None:
        deadline = time.monotonic() + limit
        size = self.access_log_offset()
        while time.monotonic() < deadline:
            time.sleep(quiet)
            grown = self.access_log_offset()
            if grown == size:
                return
            size = grown

    def close(self) -> None:
        self.index.close()


def parse_access_log_line(line: str) -> AccessLogEntry:
    entry = json.loads(line)
    return AccessLogEntry(
        method=entry["method"],
        uri=entry["uri"],
        status=int(entry["status"]),
        bytes_sent=int(entry["bytes_sent"]),
        route=entry["route"],
        reason=entry["reason"],
    )


def address_of(url: str) -> str:
    return url.split("://", 1)[1].rstrip("/")
