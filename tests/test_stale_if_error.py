"""Issue 11, item 3, through the real devstack: when the primary cannot be reached, a tag whose last
pin and manifest are local is served from that pin (stale-if-error), within ``routing.stale_if_error``,
marked ``stale`` in the access log; never a tag the site knows was deleted or moved; and with
``stale_if_error: 0`` the registry-style 503 as before.

The stacks run with ``routing.max_tag_age`` of 2 s, so a pin is past its bound (the tag is routed to
the primary, ``tag-stale``) a few seconds after it was asked, as it is 5 minutes into a real outage.
The primary registry is SIGKILLed (connection refused: NGINX's own 502), then a stand-in on its port
answers 503 and 502 itself (what GitLab's front end or a load balancer answers with the registry down).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_consistency_e2e import (
    Answer,
    ask,
    delete_manifest,
    image,
    manifest_path,
    post_primary_events,
    publish_replicated,
    pull_token,
    push_event,
    running,
)
from test_local_fallback import Refusing, refusing

from geo_route.devstack.client import AccessLogEntry, StackClient, started_stack
from geo_route.devstack.processes import wait_until

pytestmark = pytest.mark.integration

MAX_TAG_AGE = 2  # seconds: routing.max_tag_age of these stacks
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
STALE_SERVED = 'geo_route_nginx_requests_total{route="stale",status="2xx"}'


@contextlib.contextmanager
def outage_stack(directory: Path, **routing: int) -> Iterator[StackClient]:
    # A patient Redis client: on a loaded machine a 50 ms timeout makes a lookup "index-unavailable"
    # (no stale copy then: the 503), which is not what these tests are about.
    overrides = {"routing": {"max_tag_age": MAX_TAG_AGE, **routing}, "redis": {"socket_timeout": 2.0}}
    with started_stack(directory, site_overrides=overrides) as client:
        yield client


@pytest.fixture(scope="module")
def stale(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackClient]:
    """stale_if_error at its default (24 h)."""
    with outage_stack(tmp_path_factory.mktemp("stale") / "stack") as client:
        yield client


def log_of(client: StackClient, since: int, repository: str) -> list[AccessLogEntry]:
    return [e for e in client.access_log(since) if e.uri.startswith(f"/v2/{repository}/manifests/")]


@contextlib.contextmanager
def primary_answering(client: StackClient, status: int) -> Iterator[Refusing]:
    """A stand-in on the (killed) primary's port answering every request with ``status``."""
    body = b'{"errors":[{"code":"UNAVAILABLE","message":"service unavailable"}]}'
    with refusing(client.primary, status, body, {}) as server:
        yield server


def past_max_tag_age() -> None:
    time.sleep(MAX_TAG_AGE + 1.0)


def test_a_pinned_local_tag_is_pulled_while_the_primary_is_down(stale: StackClient, tmp_path: Path) -> None:
    repository, deleted, moved = "stale/app", "stale/deleted", "stale/moved"
    digest = publish_replicated(stale, image(tmp_path, "app"), repository)
    # Deleted through the site before the outage: every tag pinned to it gets a tombstone, the digest
    # is marked deleted at the primary; the local registry still holds the manifest.
    gone = publish_replicated(stale, image(tmp_path, "deleted"), deleted)
    delete_manifest(stale, stale.info.secondary_url, deleted, gone)
    wait_until(lambda: stale.index.primary_tag(deleted, "v1") is None, 15, "the tombstone of stale/deleted:v1")
    old = publish_replicated(stale, image(tmp_path, "moved"), moved)
    stack = running(stale)
    stack.kill_part("primary")
    try:
        # Moved at the primary, as its event says (the updater cannot ask the primary now): a tombstone.
        post_primary_events(stale, push_event(moved, "v1", "sha256:" + "7" * 64, OCI_MANIFEST, time.time()))
        wait_until(lambda: stale.index.primary_tag(moved, "v1") is None, 15, "the tombstone of stale/moved:v1")
        past_max_tag_age()

        since = stale.access_log_offset()
        before = stale.nginx_metrics().get(STALE_SERVED, 0)
        assert stale.pull(repository, "v1", tmp_path / "pulled") == digest
        manifests = log_of(stale, since, repository)
        assert [(e.route, e.reason, e.status) for e in manifests if e.method == "GET"] == [
            ("stale", "tag-stale", 200)
        ], manifests
        # NGINX's counters (only NGINX knows a stale answer): the GET and skopeo's HEAD, if any.
        assert stale.nginx_metrics()[STALE_SERVED] - before == len([e for e in manifests if e.route == "stale"])

        token = pull_token(stale, repository)
        head = ask(stale.info.secondary_url, manifest_path(repository, "v1"), token, (OCI_MANIFEST,), method="HEAD")
        assert head == Answer(200, digest, OCI_MANIFEST)
        # An Accept that does not name the pinned type is the primary's to answer: no stale copy.
        assert ask(stale.info.secondary_url, manifest_path(repository, "v1"), token, ("*/*",)).status == 503

        for name, was in ((deleted, gone), (moved, old)):
            answer = ask(stale.info.secondary_url, manifest_path(name, "v1"), pull_token(stale, name))
            assert answer.status == 503, f"{name}:v1 (was {was[:19]}) answered {answer!r}"
            assert {e.route for e in log_of(stale, since, name)} == {"primary"}

        # The primary reached, but answering 503 or 502 itself: the same stale copy; anything else
        # (here a tag listing) gets the registry-style 503, never a local answer.
        for status in (503, 502):
            with primary_answering(stale, status) as server:
                since = stale.access_log_offset()
                answer = ask(stale.info.secondary_url, manifest_path(repository, "v1"), token, (OCI_MANIFEST,))
                assert answer == Answer(200, digest, OCI_MANIFEST), status
                assert ask(stale.info.secondary_url, f"/v2/{repository}/tags/list", token).status == 503
                assert [(e.route, e.status) for e in log_of(stale, since, repository)] == [("stale", 200)]
                assert ("GET", manifest_path(repository, "v1")) in server.requests

        # The local registry cannot answer the stale copy either: the 503, once (no loop, no retry).
        stack.stop_part("secondary")
        try:
            since = stale.access_log_offset()
            assert ask(stale.info.secondary_url, manifest_path(repository, "v1"), token).status == 503
            assert [(e.route, e.status) for e in log_of(stale, since, repository)] == [("stale", 503)]
        finally:
            stack.restart_part("secondary")
    finally:
        stack.restart_part("primary")


def test_without_stale_if_error_the_outage_is_a_503(tmp_path: Path) -> None:
    with outage_stack(tmp_path / "stack", stale_if_error=0) as client:
        repository = "stale/off"
        publish_replicated(client, image(tmp_path, "off"), repository)
        running(client).kill_part("primary")
        past_max_tag_age()
        since = client.access_log_offset()
        answer = ask(client.info.secondary_url, manifest_path(repository, "v1"), pull_token(client, repository))
        assert answer.status == 503
        assert [(e.route, e.reason, e.status) for e in log_of(client, since, repository)] == [
            ("primary", "tag-stale", 503)
        ]
