"""Issue 10 end to end: each way the promise broke, tried again on the real devstack.

Real docker-registry 2.8 primary and local registry, NGINX, redis-server, the updater (its resolver)
and the auth service. Every check asks the site (NGINX) and the primary itself the same request
with the same token and compares status, ``Docker-Content-Digest`` and ``Content-Type``; the access
log's ``route``/``reason`` show why the site answered as it did. GitLab-only behaviour (a digest
delete without tag events, ``rename``, events that never arrive) is produced by losing the real
primary's own events (updater down, primary restarted with its queue) and, where GitLab would send
something 2.8 cannot, by POSTing GitLab's envelope to the updater with the primary's secret.

The bullets of issue 10 and their tests:

1. a delete, then an older fact: ``test_a_late_push_event_after_a_delete_does_not_pin_again``,
   ``test_a_reconciliation_answer_older_than_a_delete_does_not_pin_again``
2. a future-stamped event: ``test_an_event_stamped_an_hour_ahead_does_not_freeze_the_tag``
3. Redis back from a snapshot: ``test_redis_restarted_from_a_snapshot_serves_no_old_pin``
4. a delete through the site: ``test_a_delete_through_the_site_is_read_back_at_once``
5. a digest deleted at the primary: ``test_a_digest_deleted_at_the_primary_is_not_served_by_digest``
6. content negotiation: ``test_a_pinned_tag_answers_every_accept_as_the_primary``
7. the decision cache: ``test_the_decision_cache_reads_back_a_push_with_the_same_token``
8. GitLab: ``test_gitlab_digest_delete_without_tag_events``, ``test_gitlab_rename``,
   ``test_gitlab_garbage_collection_is_seen_by_reconciliation``,
   ``test_dropped_events_are_bounded_and_repaired_by_reads``
9. the reconcile lease: ``test_a_killed_reconciliation_blocks_the_next_for_at_most_its_lease``,
   ``test_a_terminated_reconciliation_releases_its_lease_at_once``
10. defaults: ``test_the_shipped_defaults_bound_staleness``
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest

from geo_route.config import load_settings
from geo_route.devstack.client import StackClient, started_stack
from geo_route.devstack.images import OciImage, build_oci_image
from geo_route.devstack.processes import wait_until
from geo_route.devstack.redis_server import RedisProcess
from geo_route.devstack.replicate import replicate_image
from geo_route.devstack.skopeo import docker_reference
from geo_route.devstack.stack import RunningStack, environment_without_settings
from geo_route.errors import IndexUnavailable
from geo_route.index.model import IndexQuery, PrimaryTag, QueryKind
from geo_route.updater.reconcile import LOCK_NAME

pytestmark = pytest.mark.integration

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
ALL_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST, SCHEMA1_SIGNED)
SKOPEO_ACCEPT = (", ".join(ALL_TYPES),)  # skopeo and podman: every type, one header
EVENTS_TYPE = "application/vnd.docker.distribution.events.v1+json"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SETTLE = 15.0  # seconds for an event, a resolution or a reconnection to take effect
LATE_EVENT_WINDOW = 4.0  # the resolver asks a hinted tag 3 times (0.5, 1, 2 s) before it believes the primary
LEASE = 3  # seconds: updater.reconcile_lease for the lease test
MAX_TAG_AGE = 4  # seconds: routing.max_tag_age of the dropped-events stack
T = TypeVar("T")


# -- asking the site and the primary the same question


@dataclass(frozen=True, repr=False)
class Answer:
    status: int
    digest: str  # Docker-Content-Digest
    media_type: str  # Content-Type of a 200

    def __repr__(self) -> str:  # assertion messages: pytest shows the repr
        return f"{self.status} {self.media_type or '-'} {self.digest[:19] or '-'}"


@dataclass(frozen=True, repr=False)
class Compared:
    """The site's answer, the primary's answer to the same request, and the site's access log line."""

    site: Answer
    primary: Answer
    route: str
    reason: str

    @property
    def agree(self) -> bool:
        return self.site == self.primary

    def __repr__(self) -> str:
        return f"site {self.site!r} ({self.route}/{self.reason}), primary {self.primary!r}"


def ask(
    base_url: str,
    path: str,
    token: str,
    accept: Sequence[str] = SKOPEO_ACCEPT,
    *,
    method: str = "GET",
    body: bytes | None = None,
    content_type: str = "",
) -> Answer:
    """One request; ``accept`` is sent as one ``Accept`` header per value (docker sends one per type)."""
    connection = http.client.HTTPConnection(base_url.split("://", 1)[1], timeout=30)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        connection.putheader("Authorization", f"Bearer {token}")
        for value in accept:
            connection.putheader("Accept", value)
        if body is not None:
            connection.putheader("Content-Type", content_type)
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        response.read()
    finally:
        connection.close()
    media_type = response.getheader("Content-Type", "") if response.status == 200 else ""
    return Answer(response.status, response.getheader("Docker-Content-Digest", ""), media_type)


def compare(client: StackClient, path: str, token: str, accept: Sequence[str] = SKOPEO_ACCEPT) -> Compared:
    """GET ``path`` through the site and at the primary; the site's route from NGINX's access log."""
    since = client.access_log_offset()
    site = ask(client.info.secondary_url, path, token, accept)
    primary = ask(client.info.primary_url, path, token, accept)
    logged: list[Any] = []

    def found() -> bool:
        logged[:] = [e for e in client.access_log(since) if e.uri == path and e.method == "GET"]
        return bool(logged)

    wait_until(found, 5, f"the access log line of {path}")
    return Compared(site, primary, logged[-1].route, logged[-1].reason)


def eventually(probe: Callable[[], T], done: Callable[[T], bool], timeout: float) -> T:
    """Probe every 0.2 s until ``done``; the last probe either way (the caller asserts on it)."""
    deadline = time.monotonic() + timeout
    result = probe()
    while not done(result) and time.monotonic() < deadline:
        time.sleep(0.2)
        result = probe()
    return result


def settled(client: StackClient, path: str, token: str) -> Compared:
    """The comparison once the site agrees with the primary, or the last one after ``SETTLE`` seconds."""
    return eventually(lambda: compare(client, path, token), lambda answer: answer.agree, SETTLE)


def manifest_path(repository: str, reference: str) -> str:
    return f"/v2/{repository}/manifests/{reference}"


def pull_token(client: StackClient, repository: str) -> str:
    return client.token(f"repository:{repository}:pull")


# -- publishing at the primary


def image(tmp_path: Path, variant: str) -> OciImage:
    return build_oci_image(tmp_path / f"image-{variant}", "v1", variant=variant)


def push_to_primary(client: StackClient, built: OciImage, repository: str, tag: str, *, fmt: str = "") -> str:
    """Push straight to the primary (CI, or another site): the site only learns of it by events."""
    destination = docker_reference(client.primary, repository, tag)
    if not fmt:
        return client.skopeo.copy(built.reference, destination, dest_creds=client.credentials())
    creds = ["--dest-creds", client.credentials().as_option(), "--dest-tls-verify=false"]
    client.skopeo.run(["copy", "--quiet", "--format", fmt, *creds, built.reference, destination])
    return client.digest_at(client.primary, repository, tag)


def publish(client: StackClient, built: OciImage, repository: str, tag: str = "v1") -> str:
    """Push straight to the primary and wait until the updater pinned the primary's answer."""
    digest = push_to_primary(client, built, repository, tag)
    client.wait_for_pin(repository, tag, digest)
    return digest


def publish_replicated(client: StackClient, built: OciImage, repository: str, tag: str = "v1") -> str:
    digest = publish(client, built, repository, tag)
    client.replicate(repository, [tag])
    return digest


def put_manifest(client: StackClient, base_url: str, repository: str, tag: str, body: bytes, media_type: str) -> str:
    token = client.token(f"repository:{repository}:pull,push")
    answer = ask(base_url, manifest_path(repository, tag), token, (), method="PUT", body=body, content_type=media_type)
    assert answer.status == 201, answer
    return "sha256:" + hashlib.sha256(body).hexdigest()


def delete_manifest(client: StackClient, base_url: str, repository: str, digest: str) -> None:
    token = client.token(f"repository:{repository}:delete")
    answer = ask(base_url, manifest_path(repository, digest), token, (), method="DELETE")
    assert answer.status == 202, answer


def copy_to_local_registry(client: StackClient, repository: str, tag: str) -> None:
    """What Geo replication does, without waiting for a pin (``StackClient.replicate`` waits for one)."""
    creds = client.credentials()
    primary, local = client.primary, client.local_registry
    replicate_image(client.skopeo, primary, local, repository, [tag], source_creds=creds, destination_creds=creds)


def running(client: StackClient) -> RunningStack:
    assert client.stack is not None
    return client.stack


def with_primary_events_lost(client: StackClient, change: Callable[[], None]) -> None:
    """``change`` happens at the primary and none of its events reaches the index: the updater is
    down meanwhile and the primary restarts with them queued (as the fault matrix loses them).
    What GitLab's registry does after 10 failed deliveries, or for online garbage collection."""
    stack = running(client)
    stack.kill_part("updater")
    try:
        change()
        stack.kill_part("primary")
        stack.restart_part("primary")
    finally:
        stack.restart_part("updater")


# -- events the test sends itself (what GitLab's registry sends and 2.8 cannot)


def rfc3339(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event(action: str, repository: str, when: float, **target: Any) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "timestamp": rfc3339(when),
        "action": action,
        "target": {"repository": repository, **target},
        "request": {"id": str(uuid.uuid4()), "method": "PUT", "useragent": "geo-route-test"},
        "actor": {"name": "developer"},
        "source": {"addr": "registry.primary:5000", "instanceID": str(uuid.uuid4())},
    }


def push_event(repository: str, tag: str, digest: str, media_type: str, when: float) -> dict[str, Any]:
    return event("push", repository, when, mediaType=media_type, digest=digest, tag=tag, size=0, length=0)


def post_primary_events(client: StackClient, *events: dict[str, Any]) -> None:
    """POST an envelope to the updater as the primary's registry does (its secret, its content type)."""
    secret = load_settings(client.info.site_file, environ={}).updater.primary_secret
    body = json.dumps({"events": list(events)}).encode()
    connection = http.client.HTTPConnection(client.info.updater_url.split("://", 1)[1], timeout=10)
    try:
        connection.request("POST", "/events/primary", body, {"Authorization": secret, "Content-Type": EVENTS_TYPE})
        response = connection.getresponse()
        answer = response.read()
    finally:
        connection.close()
    assert response.status == 200, answer


# -- stacks


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackClient]:
    """The devstack with its defaults (routing.write_fence 2 s): tests that keep every part running."""
    with started_stack(tmp_path_factory.mktemp("consistency") / "stack") as client:
        yield client


@pytest.fixture(scope="module")
def gitlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackClient]:
    """A stack whose updater never reconciles by itself (``reconcile_interval: 0``): after events are
    lost, only what the test sends (or runs) can repair the index."""
    overrides = {"updater": {"reconcile_interval": 0}}
    with started_stack(tmp_path_factory.mktemp("gitlab") / "stack", site_overrides=overrides) as client:
        yield client


# -- 1. a delete followed by an older fact


def deleted_at_primary(client: StackClient, tmp_path: Path, repository: str) -> str:
    """A replicated image whose tag v1 the primary then deletes (2.8: by digest, with tag events)."""
    digest = publish_replicated(client, image(tmp_path, repository), repository)
    assert compare(client, manifest_path(repository, "v1"), pull_token(client, repository)).route == "local"
    delete_manifest(client, client.info.primary_url, repository, digest)
    wait_until(lambda: client.index.primary_tag(repository, "v1") is None, SETTLE, "the primary's delete events")
    return digest


def test_a_late_push_event_after_a_delete_does_not_pin_again(site: StackClient, tmp_path: Path) -> None:
    repository = "late/push"
    pushed_at = time.time()
    digest = deleted_at_primary(site, tmp_path, repository)
    post_primary_events(site, push_event(repository, "v1", digest, OCI_MANIFEST, pushed_at))  # delivered late
    token = pull_token(site, repository)
    deadline = time.monotonic() + LATE_EVENT_WINDOW
    while time.monotonic() < deadline:  # from the event's arrival until its resolution has settled
        answer = compare(site, manifest_path(repository, "v1"), token)
        assert answer.agree and answer.primary.status == 404, answer
        assert answer.route == "primary", answer
        time.sleep(0.25)


def test_a_reconciliation_answer_older_than_a_delete_does_not_pin_again(site: StackClient, tmp_path: Path) -> None:
    repository = "late/reconcile"
    asked_at = time.time()  # reconciliation asks the primary for v1 here (the index's clock is this host's)
    digest = deleted_at_primary(site, tmp_path, repository)
    # ... and writes the answer it got before the delete back after the delete's events were applied.
    site.index.apply([PrimaryTag(repository, "v1", digest, asked_at, OCI_MANIFEST)])
    answer = compare(site, manifest_path(repository, "v1"), pull_token(site, repository))
    assert answer.agree and answer.primary.status == 404, answer
    assert answer.route == "primary", answer


# -- 2. an event stamped by a clock an hour ahead


def test_an_event_stamped_an_hour_ahead_does_not_freeze_the_tag(site: StackClient, tmp_path: Path) -> None:
    repository = "clock/ahead"
    old = publish_replicated(site, image(tmp_path, "ahead-old"), repository)
    post_primary_events(site, push_event(repository, "v1", old, OCI_MANIFEST, time.time() + 3600))
    new_image = image(tmp_path, "ahead-new")
    new = site.push(new_image, repository, "v1")  # through the site; then the primary's own event
    token = pull_token(site, repository)
    right_after = compare(site, manifest_path(repository, "v1"), token)
    assert right_after.agree and right_after.site.digest == new != old, right_after
    site.wait_for_pin(repository, "v1", new)
    site.replicate(repository, ["v1"])
    later = compare(site, manifest_path(repository, "v1"), token)
    assert later.agree and later.site.digest == new, later
    assert (later.route, later.reason) == ("local", "tag-pinned"), later


# -- 3. Redis restarted from its snapshot


def wait_for_index(client: StackClient) -> None:
    """Until the test's own index connection answers again (after a Redis restart)."""

    def answers() -> bool:
        try:
            client.index.lookup(IndexQuery(QueryKind.BLOB, "probe/probe", "sha256:" + "0" * 64))
        except IndexUnavailable:
            return False
        return True

    wait_until(answers, SETTLE, "the index to answer again")


def test_redis_restarted_from_a_snapshot_serves_no_old_pin(tmp_path: Path) -> None:
    repository = "snapshot/app"
    with started_stack(tmp_path / "stack") as client:
        old = publish_replicated(client, image(tmp_path, "snapshot-old"), repository)
        port = int(client.info.redis_url.rsplit(":", 1)[1].split("/")[0])
        RedisProcess(Path(client.info.directory) / "redis", port=port).save()  # Redis 7's RDB snapshot
        new = publish(client, image(tmp_path, "snapshot-new"), repository)  # moves at the primary
        # The worst case: nothing re-resolves the tag meanwhile. (The snapshot may hold the tag queued
        # for resolution: a running updater would re-pin it from the primary right after the restart.)
        running(client).kill_part("updater")
        running(client).kill_part("redis")  # a crash: the restart loads the snapshot, pin and all
        running(client).restart_part("redis")
        wait_for_index(client)
        restored = client.index.primary_tag(repository, "v1")
        assert restored is not None and restored[0] == old, f"the snapshot brought the old pin back: {restored}"
        token, path = pull_token(client, repository), manifest_path(repository, "v1")
        first = eventually(lambda: compare(client, path, token), lambda c: c.reason != "index-unavailable", SETTLE)
        assert first.agree and first.site.digest == new != old, first
        assert (first.route, first.reason) == ("primary", "tag-unconfirmed"), first
        running(client).restart_part("updater")
        client.replicate(repository, ["v1"])  # re-resolved in the new epoch, then here
        again = compare(client, path, token)
        assert again.agree and again.site.digest == new and again.route == "local", again


# -- 4. a delete through the site


def test_a_delete_through_the_site_is_read_back_at_once(site: StackClient, tmp_path: Path) -> None:
    repository = "site/delete"
    digest = publish_replicated(site, image(tmp_path, "site-delete"), repository)
    token = pull_token(site, repository)
    running(site).kill_part("updater")  # no notification can help: only the site's own write path
    try:
        delete_manifest(site, site.info.secondary_url, repository, digest)
        by_tag = compare(site, manifest_path(repository, "v1"), token)
        by_digest = compare(site, manifest_path(repository, digest), token)
        still_here = ask(site.info.local_registry_url, manifest_path(repository, digest), token)
    finally:
        running(site).restart_part("updater")
    assert still_here.status == 200, "the local registry still holds it: only the index keeps it from being served"
    for answer in (by_tag, by_digest):
        assert answer.agree and answer.primary.status == 404, answer
        assert answer.route == "primary", answer


def test_a_gitlab_rename_through_the_site_takes_the_tags_off_the_index_first(site: StackClient, tmp_path: Path) -> None:
    """GitLab's ``PATCH /gitlab/v1/repositories/<path>/`` passes through the auth service on its way to
    the primary: the repository's tags are invalidated before it is proxied (2.8 itself has no such
    API and answers 404; only what the site does with the request is under test here)."""
    repository = "site/rename/app"
    publish_replicated(site, image(tmp_path, "site-rename"), repository)
    token = pull_token(site, repository)
    assert compare(site, manifest_path(repository, "v1"), token).route == "local"
    running(site).kill_part("updater")  # no event can help, and no resolution can pin it again
    try:
        since = site.access_log_offset()
        patch = ask(
            site.info.secondary_url, "/gitlab/v1/repositories/site/rename/", token, (), method="PATCH", body=b"{}"
        )
        logged = [e for e in site.access_log(since) if e.uri.startswith("/gitlab/v1/")]
        after = compare(site, manifest_path(repository, "v1"), token)
    finally:
        running(site).restart_part("updater")
    assert patch.status == 404, "the primary's own answer (2.8 has no GitLab API)"
    assert [(e.route, e.reason) for e in logged] == [("primary", "write")], logged
    assert after.agree and (after.route, after.reason) == ("primary", "tag-not-pinned"), after


# -- 5. a digest deleted at the primary


def test_a_digest_deleted_at_the_primary_is_not_served_by_digest(site: StackClient, tmp_path: Path) -> None:
    repository = "primary/delete"
    digest = publish_replicated(site, image(tmp_path, "primary-delete"), repository)
    token = pull_token(site, repository)
    delete_manifest(site, site.info.primary_url, repository, digest)  # straight at the primary: its events
    answer = settled(site, manifest_path(repository, digest), token)
    assert answer.agree and answer.primary.status == 404, answer
    assert (answer.route, answer.reason) == ("primary", "manifest-not-local"), answer


# -- 6. content negotiation


NEGOTIATED_REPOSITORIES = {
    OCI_MANIFEST: "neg/oci-manifest",
    OCI_INDEX: "neg/oci-index",
    DOCKER_MANIFEST: "neg/docker-manifest",
    DOCKER_LIST: "neg/docker-list",
}


PLATFORMS = {"amd64": {"architecture": "amd64", "os": "linux"}, "arm64": {"architecture": "arm64", "os": "linux"}}


@dataclass(frozen=True)
class Pinned:
    repository: str
    digest: str


def push_schema2_children(client: StackClient, tmp_path: Path, repository: str) -> list[dict[str, Any]]:
    children = []
    for arch in PLATFORMS:
        digest = push_to_primary(client, image(tmp_path, f"{repository}-{arch}"), repository, arch, fmt="v2s2")
        raw = client.skopeo.inspect_raw(docker_reference(client.primary, repository, arch), client.credentials())
        children.append({"mediaType": DOCKER_MANIFEST, "size": len(raw), "digest": digest, "platform": PLATFORMS[arch]})
    return children


def push_oci_children(client: StackClient, tmp_path: Path, repository: str) -> list[dict[str, Any]]:
    children = []
    for arch in PLATFORMS:
        built = image(tmp_path, f"{repository}-{arch}")
        digest = push_to_primary(client, built, repository, arch)
        children.append(
            {"mediaType": OCI_MANIFEST, "size": built.manifest.size, "digest": digest, "platform": PLATFORMS[arch]}
        )
    return children


def push_negotiable(client: StackClient, tmp_path: Path, media_type: str) -> Pinned:
    """``neg/<kind>:v1`` of each negotiated type at the primary, pinned and replicated."""
    repository = NEGOTIATED_REPOSITORIES[media_type]
    if media_type == OCI_MANIFEST:
        digest = push_to_primary(client, image(tmp_path, repository), repository, "v1")
    elif media_type == DOCKER_MANIFEST:
        digest = push_to_primary(client, image(tmp_path, repository), repository, "v1", fmt="v2s2")
    else:
        docker = media_type == DOCKER_LIST
        children = (push_schema2_children if docker else push_oci_children)(client, tmp_path, repository)
        body = json.dumps({"schemaVersion": 2, "mediaType": media_type, "manifests": children}).encode()
        digest = put_manifest(client, client.info.primary_url, repository, "v1", body, media_type)
    client.wait_for_pin(repository, "v1", digest)
    client.replicate(repository, ["v1"])
    return Pinned(repository, digest)


@pytest.fixture(scope="module")
def negotiable(site: StackClient, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pinned]:
    root = tmp_path_factory.mktemp("negotiation")
    return {kind: push_negotiable(site, root, kind) for kind in NEGOTIATED_REPOSITORIES}


ACCEPTS: dict[str, tuple[str, ...]] = {
    "none": (),
    "oci manifest": (OCI_MANIFEST,),
    "oci index": (OCI_INDEX,),
    "docker manifest": (DOCKER_MANIFEST,),
    "docker list": (DOCKER_LIST,),
    "schema 1": (SCHEMA1_SIGNED,),
    "docker types": (f"{DOCKER_MANIFEST}, {DOCKER_LIST}",),
    "oci types": (f"{OCI_MANIFEST},{OCI_INDEX}",),
    "images, no indexes": (f"{OCI_MANIFEST}, {DOCKER_MANIFEST}",),
    "every type, one header (skopeo)": SKOPEO_ACCEPT,
    "every type, one header each (docker)": ALL_TYPES,
    "with parameters": (f"{DOCKER_LIST}; q=0.9, {OCI_INDEX};q=0.8, {DOCKER_MANIFEST} ;q=0.5, {OCI_MANIFEST};q=0.1",),
    # 2.8 drops everything after ";"; Distribution 3's mime.ParseMediaType refuses such a part (a list
    # then becomes its linux/amd64 child, an OCI manifest a 404).
    "with a parameter Go refuses": (f"{DOCKER_LIST}; q, {OCI_INDEX}; q, {DOCKER_MANIFEST}; q, {OCI_MANIFEST}; q",),
    "any": ("*/*",),
    "json": ("application/json",),
    "upper case": tuple(kind.upper() for kind in ALL_TYPES),
}


@pytest.mark.parametrize("kind", list(NEGOTIATED_REPOSITORIES))
def test_a_pinned_tag_answers_every_accept_as_the_primary(
    site: StackClient, negotiable: dict[str, Pinned], kind: str
) -> None:
    """A pinned tag is fetched from the local registry by digest, where no negotiation happens: the
    site must answer each ``Accept`` exactly as the primary does by tag, and serve locally whenever
    the primary's answer is the pinned manifest itself."""
    pinned = negotiable[kind]
    token = pull_token(site, pinned.repository)
    wrong = []
    for label, accept in ACCEPTS.items():
        answer = compare(site, manifest_path(pinned.repository, "v1"), token, accept)
        is_pinned = answer.primary.status == 200 and answer.primary.digest == pinned.digest
        if not answer.agree or is_pinned != (answer.route == "local"):
            wrong.append(f"Accept {label!r}: {answer}")
    assert not wrong, f"{kind} pinned to {pinned.digest[:19]}:\n" + "\n".join(wrong)


# -- 7. the decision cache


def test_the_decision_cache_reads_back_a_push_with_the_same_token(tmp_path: Path) -> None:
    repository = "cache/app"
    with started_stack(tmp_path / "stack", decision_cache=True) as client:
        old = publish_replicated(client, image(tmp_path, "cache-old"), repository)
        token = client.token(f"repository:{repository}:pull,push")  # one client, one token, as docker keeps it
        path = manifest_path(repository, "v1")
        before = compare(client, path, token)
        assert before.agree and before.site.digest == old and before.route == "local", before
        new_image = image(tmp_path, "cache-new")
        push_to_primary(client, new_image, repository, "staging")  # its blobs are at the primary
        manifest = (new_image.layout / "blobs" / "sha256" / new_image.digest.split(":", 1)[1]).read_bytes()
        new = put_manifest(client, client.info.secondary_url, repository, "v1", manifest, OCI_MANIFEST)
        after = compare(client, path, token)
        assert after.agree and after.site.digest == new != old, after


# -- 8. GitLab: database-mode deletes, renames, garbage collection, dropped events


def run_reconcile(client: StackClient, lease: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        reconcile_argv(client), env=reconcile_env(lease), capture_output=True, text=True, timeout=120, check=False
    )


def reconcile_argv(client: StackClient) -> list[str]:
    return [sys.executable, "-m", "geo_route.cli", "reconcile", "-c", client.info.site_file, "--once"]


def reconcile_env(lease: int | None) -> dict[str, str]:
    env = environment_without_settings()
    if lease is not None:
        env["GEO_ROUTE_UPDATER__RECONCILE_LEASE"] = str(lease)
    return env


def test_gitlab_digest_delete_without_tag_events(gitlab: StackClient, tmp_path: Path) -> None:
    repository = "gitlab/db-delete"
    digest = publish_replicated(gitlab, image(tmp_path, "db-delete"), repository)
    with_primary_events_lost(gitlab, lambda: delete_manifest(gitlab, gitlab.info.primary_url, repository, digest))
    token = pull_token(gitlab, repository)
    stale = compare(gitlab, manifest_path(repository, "v1"), token)
    assert stale.route == "local" and stale.primary.status == 404, f"the events were lost: {stale}"
    post_primary_events(gitlab, event("delete", repository, time.time(), digest=digest))  # GitLab: no tag events
    for path in (manifest_path(repository, "v1"), manifest_path(repository, digest)):
        answer = settled(gitlab, path, token)
        assert answer.agree and answer.primary.status == 404, answer
        assert answer.route == "primary", answer


def test_gitlab_rename(gitlab: StackClient, tmp_path: Path) -> None:
    old_path, new_path = "gitlab/renamed/before", "gitlab/renamed/after"
    built = image(tmp_path, "rename")
    digest = publish_replicated(gitlab, built, old_path)

    def rename_at_primary() -> None:  # what PATCH /gitlab/v1/repositories/... does to the tags
        push_to_primary(gitlab, built, new_path, "v1")
        delete_manifest(gitlab, gitlab.info.primary_url, old_path, digest)

    with_primary_events_lost(gitlab, rename_at_primary)
    token = gitlab.token(f"repository:{old_path}:pull repository:{new_path}:pull")
    stale = compare(gitlab, manifest_path(old_path, "v1"), token)
    assert stale.route == "local" and stale.primary.status == 404, f"the events were lost: {stale}"
    rename = {"type": "name", "from": "before", "to": "after"}
    post_primary_events(gitlab, event("rename", old_path, time.time(), rename=rename))
    answer = settled(gitlab, manifest_path(old_path, "v1"), token)
    assert answer.agree and answer.primary.status == 404 and answer.route == "primary", answer
    moved = compare(gitlab, manifest_path(new_path, "v1"), token)
    assert moved.agree and moved.site.digest == digest, moved


def test_gitlab_garbage_collection_is_seen_by_reconciliation(gitlab: StackClient, tmp_path: Path) -> None:
    """Online GC removes an untagged manifest at the primary and sends no event; the promise for a
    digest deleted at the primary: not served by digest 'at the latest at the next reconciliation'."""
    repository = "gitlab/gc"
    untagged = publish_replicated(gitlab, image(tmp_path, "gc-old"), repository)
    publish(gitlab, image(tmp_path, "gc-new"), repository)  # v1 moves on: the old manifest is untagged
    with_primary_events_lost(gitlab, lambda: delete_manifest(gitlab, gitlab.info.primary_url, repository, untagged))
    done = run_reconcile(gitlab)
    assert done.returncode == 0, done.stdout + done.stderr
    answer = compare(gitlab, manifest_path(repository, untagged), pull_token(gitlab, repository))
    assert answer.agree and answer.primary.status == 404, answer
    assert answer.route == "primary", answer


def test_dropped_events_are_bounded_and_repaired_by_reads(tmp_path: Path) -> None:
    """GitLab drops an event after 10 failed deliveries: the tag moved at the primary and the index
    never heard. A pin older than max_tag_age is not served; reads re-resolve it (no event, no
    reconciliation), so the tag is right, and local again, soon after."""
    repository = "dropped/app"
    overrides = {"routing": {"max_tag_age": MAX_TAG_AGE}, "updater": {"reconcile_interval": 0}}
    with started_stack(tmp_path / "stack", site_overrides=overrides) as client:
        old = publish_replicated(client, image(tmp_path, "dropped-old"), repository)
        new: list[str] = []

        def move_the_tag() -> None:
            new.append(push_to_primary(client, image(tmp_path, "dropped-new"), repository, "v1"))

        with_primary_events_lost(client, move_the_tag)
        copy_to_local_registry(client, repository, "v1")
        confirmed = client.index.primary_tag(repository, "v1")
        assert confirmed is not None and confirmed[0] == old, confirmed
        token, path = pull_token(client, repository), manifest_path(repository, "v1")
        deadline = time.monotonic() + MAX_TAG_AGE + 8
        answer = compare(client, path, token)
        while time.monotonic() < deadline and not (answer.agree and answer.route == "local"):
            assert answer.agree or time.time() < confirmed[1] + MAX_TAG_AGE + 1, f"stale past the bound: {answer}"
            time.sleep(0.3)
            answer = compare(client, path, token)
        assert answer.agree and answer.site.digest == new[0] != old, answer
        assert answer.route == "local", f"reads re-resolved the tag and it is local again: {answer}"


# -- 9. the reconcile lease


def redis_exists(url: str, key: str) -> bool:
    host, port = url.removeprefix("redis://").split("/")[0].split(":")
    command = f"*2\r\n$6\r\nEXISTS\r\n${len(key.encode())}\r\n{key}\r\n".encode()
    with socket.create_connection((host, int(port)), timeout=2) as sock:
        sock.sendall(command)
        return sock.recv(16).startswith(b":1")


def start_reconcile(client: StackClient, log: Path, lease: int | None) -> subprocess.Popen[bytes]:
    with open(log, "ab") as output:
        return subprocess.Popen(
            reconcile_argv(client), stdout=output, stderr=subprocess.STDOUT, env=reconcile_env(lease)
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(10)


def lease_held(client: StackClient) -> Callable[[], bool]:
    lock = client.index.keys.lock(LOCK_NAME)

    def held() -> bool:
        return redis_exists(client.info.redis_url, lock)

    return held


@contextlib.contextmanager
def hung_local_registry(client: StackClient) -> Iterator[None]:
    """SIGSTOP the local registry: a reconciliation walks it first, so a run hangs there holding its lease."""
    local = running(client).processes["secondary"]
    local.pause()
    try:
        yield
    finally:
        local.resume()


def test_a_killed_reconciliation_blocks_the_next_for_at_most_its_lease(gitlab: StackClient, tmp_path: Path) -> None:
    """A run that lives keeps its lease past the lease's length (renewed); SIGKILLed, it blocks the
    next run for at most one lease (``updater.reconcile_lease``), not for the longest run imaginable."""
    held = lease_held(gitlab)
    first = start_reconcile(gitlab, tmp_path / "first.log", LEASE)
    try:
        with hung_local_registry(gitlab):
            wait_until(held, SETTLE, "the first run to take the lease", interval=0.01)
            time.sleep(LEASE + 1.5)
            assert first.poll() is None and held(), "the lease is renewed while its run lives"
            refused = run_reconcile(gitlab, LEASE)
            assert "lock held" in refused.stdout, refused.stdout + refused.stderr
            first.kill()
            killed = time.monotonic()
    finally:
        stop(first)
    still_held = eventually(held, lambda h: not h, LEASE + 5)
    waited = time.monotonic() - killed
    assert not still_held and waited <= LEASE + 1, f"the lease outlived its killed run by {waited:.1f} s"
    after = run_reconcile(gitlab, LEASE)
    assert after.returncode == 0 and "lock held" not in after.stdout, after.stdout + after.stderr


def test_a_terminated_reconciliation_releases_its_lease_at_once(gitlab: StackClient, tmp_path: Path) -> None:
    held = lease_held(gitlab)
    assert not held(), "no earlier run holds the lease (else this run could not take it)"
    log = tmp_path / "terminated.log"
    terminated = start_reconcile(gitlab, log, None)  # the default lease: 60 s
    try:
        with hung_local_registry(gitlab):
            wait_until(held, SETTLE, "the run to take the lease", interval=0.01)
            terminated.send_signal(signal.SIGTERM)
            time.sleep(0.5)  # the signal is handled while the run hangs, not after it could have finished
        terminated.wait(SETTLE)
    finally:
        stop(terminated)
    assert "cancelled" in log.read_text(), "it ended because of the signal"
    assert not held(), "a run ended by SIGTERM released its lease at its end, not left it for 60 s"


# -- 10. defaults


def test_the_shipped_defaults_bound_staleness() -> None:
    settings = load_settings(EXAMPLES / "geo-route.minimal.yaml", environ={})
    assert settings.routing.tag_policy == "pinned"
    assert 0 < settings.routing.max_tag_age <= 3600, "a pin not confirmed within max_tag_age is not served"
    assert settings.updater.reconcile_interval > 0, "reconciliation re-confirms every pin periodically"
