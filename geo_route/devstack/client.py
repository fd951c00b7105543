"""Drive a running development stack the way users and GitLab Geo do: skopeo through the secondary
URL, replication from the primary to the secondary, and the index facts replication produces.

The index is filled by the stack's updater from both registries' notifications and the tag
resolutions they trigger; ``replicate`` and ``wait_for_pin`` wait until it has caught up.
``presence_updates`` lists what a replicated image should put in the index (tests use it to make
the index claim things).
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from geo_route.config import load_settings
from geo_route.devstack.images import OciImage
from geo_route.devstack.processes import fetch, wait_until
from geo_route.devstack.replicate import ReplicatedTag, replicate_image
from geo_route.devstack.skopeo import Credentials, Skopeo, docker_reference
from geo_route.devstack.stack import SERVICE, RunningStack, StackInfo, bring_up
from geo_route.errors import DevstackError, IndexUnavailable
from geo_route.index.model import IndexQuery, QueryKind
from geo_route.index.redis_store import RedisIndexStore

NOTIFICATION_WAIT = 15.0  # seconds for a registry notification to reach the index
INDEX_MEDIA_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)


@dataclass(frozen=True)
class AccessLogEntry:
    method: str
    uri: str
    status: int  # 0: NGINX sent no answer (it logs "000", e.g. the client left while the decision was pending)
    bytes_sent: int
    route: str
    reason: str
    fallback_status: str = ""  # what the local registry answered when a request fell back, e.g. "401"
    upstream: str = ""  # the registries NGINX asked ("" when NGINX answered itself, e.g. from storage)


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

    def token(self, scope: str, user: str | None = None, *, anonymous: bool = False) -> str:
        """A token for ``scope`` (``repository:NAME:ACTIONS``) from the stack's token service, fetched
        as clients do after a challenge: Basic credentials of ``user`` (the developer by default),
        or none at all with ``anonymous``."""
        headers = {}
        if not anonymous:
            credentials = self.credentials(user)
            basic = base64.b64encode(f"{credentials.username}:{credentials.password}".encode()).decode()
            headers["Authorization"] = f"Basic {basic}"
        answer = fetch(f"{self.info.token_realm}?{urlencode({'service': SERVICE, 'scope': scope})}", headers)
        if answer.status != 200:
            raise DevstackError(f"the token service answered {answer.status}: {answer.body[:200]!r}")
        return str(json.loads(answer.body)["token"])

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
        """Copy tags from the primary to the secondary registry (GitLab Geo's job). The secondary's
        notifications reach the index through the updater; wait until they have."""
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
        for replicated in copied:
            self.wait_for_pin(repository, replicated.tag, replicated.digest, present=True)
        return copied

    def wait_for_pin(self, repository: str, tag: str, digest: str, *, present: bool | None = None) -> None:
        """Wait until the index pins ``tag`` to ``digest`` (and, if asked, has that manifest locally)."""

        def pinned() -> bool:
            try:
                view = self.index.lookup(IndexQuery(QueryKind.TAG, repository, tag))
            except IndexUnavailable:  # the site's 50 ms Redis timeout, missed on a loaded machine: ask again
                return False
            return view.pinned_digest == digest and (present is None or view.present == present)

        wait_until(pinned, NOTIFICATION_WAIT, f"the index to pin {repository}:{tag} to {digest[:19]}")

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

    def nginx_metrics(self) -> dict[str, float]:
        """NGINX's counters (``nginx.metrics_listen``): series (``name{labels}``) to value."""
        answer = fetch(self.info.nginx_metrics_url)
        if answer.status != 200:
            raise DevstackError(f"NGINX's metrics answered {answer.status}")
        return parse_prometheus_text(answer.body.decode("utf-8"))

    def close(self) -> None:
        self.index.close()


@contextlib.contextmanager
def started_stack(directory: Path, **options: Any) -> Iterator[StackClient]:
    """``bring_up(directory, **options)`` and a client of it; on exit the client is closed and every
    process of the stack stopped, also when the body failed."""
    stack = bring_up(directory, **options)
    client = StackClient(stack.info, stack)
    try:
        yield client
    finally:
        client.close()
        stack.stop()


def parse_access_log_line(line: str) -> AccessLogEntry:
    entry = json.loads(line)
    return AccessLogEntry(
        method=entry["method"],
        uri=entry["uri"],
        status=int(entry["status"]),
        bytes_sent=int(entry["bytes_sent"]),
        route=entry["route"],
        reason=entry["reason"],
        fallback_status=entry.get("fallback_status", ""),
        upstream=entry.get("upstream", ""),
    )


def parse_prometheus_text(text: str) -> dict[str, float]:
    """Prometheus text format, no timestamps: ``{'name{a="b"}': value}``; comments skipped."""
    series = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            series[name] = float(value)
    return series


def address_of(url: str) -> str:
    return url.split("://", 1)[1].rstrip("/")
