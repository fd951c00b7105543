"""Several nodes per site (issue 13, item 3): a devstack of two nodes, each an auth service, an NGINX
and an updater, on one index.

Pulls run through both NGINX while node 2's auth service is SIGKILLed and restarted: none fails
(node 2 routes to the primary as ``auth-unavailable`` meanwhile, node 1 keeps its local routes).
The updaters run their background loops at once on the one index: every queued tag resolution is
asked at the primary exactly once and every pin lands; of two reconciliations at once (one per
node) the second is refused by the lease; the verification lease is held by one updater, the other
refused until the holder leaves.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from faults import (
    NO_PROXY,
    RECONCILE_COMMAND,
    Outcome,
    PullLoad,
    RawRedis,
    index_redis_url,
    judge_pulls,
    notification,
    observe_patiently,
    post_events,
    routes_between,
)

from geo_route.config import load_settings
from geo_route.devstack.client import StackClient
from geo_route.devstack.images import MANIFEST_MEDIA_TYPE, build_oci_image
from geo_route.devstack.stack import RunningStack, bring_up

pytestmark = pytest.mark.integration

PULLED = "nodes/app:v1"
RESOLVED = "nodes/resolved"
RESOLVED_TAGS = [f"t{number}" for number in range(24)]
LEASE = 6  # seconds (updater.reconcile_lease, also the verification lease): short, for the test's time
# Small resolution batches, so that both updaters' resolvers claim from the queue while it drains.
OVERRIDES = {"updater": {"resolve_batch": 2, "resolve_concurrency": 2, "reconcile_lease": LEASE}}


@dataclass
class Site:
    stack: RunningStack
    nodes: dict[int, StackClient]
    root: Path

    def redis(self) -> RawRedis:
        return RawRedis(index_redis_url(self.stack.info.site_file))

    def lock_key(self, name: str) -> str:
        return f"{load_settings(self.stack.info.site_file, environ={}).redis.key_prefix}lock:{name}"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("nodes")
    stack = bring_up(root / "stack", site_overrides=OVERRIDES, nodes=2)
    nodes = {number: observe_patiently(StackClient(stack.info.node(number), stack)) for number in (1, 2)}
    try:
        yield Site(stack, nodes, root)
    finally:
        for client in nodes.values():
            client.close()
        stack.stop()


def test_stack_lists_every_node(site: Site) -> None:
    info = site.stack.info
    assert [node.number for node in info.nodes] == [1, 2]
    assert info.nodes[0].secondary_url == info.secondary_url
    assert len({node.secondary_url for node in info.nodes}) == 2
    assert len({node.nginx_access_log for node in info.nodes}) == 2
    assert len({node.updater_url for node in info.nodes}) == 2
    assert {"auth-2", "nginx-2", "updater-2"} <= set(info.pids)


def test_pulls_through_both_nodes_while_one_auth_service_is_killed(site: Site) -> None:
    one = site.nodes[1]
    repository, tag = PULLED.rsplit(":", 1)
    image = build_oci_image(site.root / "images" / "app", tag, variant="nodes", layer_count=2, layer_bytes=64 * 1024)
    one.push(image, repository, tag)
    one.replicate(repository, [tag])
    start = {number: client.access_log_offset() for number, client in site.nodes.items()}
    loads = {
        number: PullLoad(client, [PULLED], site.root / f"pulls-{number}", workers=2)
        for number, client in site.nodes.items()
    }
    with loads[1], loads[2]:
        for load in loads.values():
            load.wait_for_pulls(2)
        before = {number: client.access_log_offset() for number, client in site.nodes.items()}
        fault_on = time.monotonic()
        site.stack.kill_part("auth-2")
        time.sleep(2.0)
        loads[2].wait_for_pulls(2, started_after=fault_on)
        during = {number: client.access_log_offset() for number, client in site.nodes.items()}
        site.stack.restart_part("auth-2")
        time.sleep(0.5)  # requests that asked the dead auth service and ended since are logged by now
        restored = time.monotonic()
        after = {number: client.access_log_offset() for number, client in site.nodes.items()}
        for load in loads.values():
            load.wait_for_pulls(2, started_after=restored)
    end = {number: client.access_log_offset() for number, client in site.nodes.items()}

    outcomes = {}
    for number, load in loads.items():
        outcomes[number] = outcome = Outcome(f"node-{number}", "auth-2 SIGKILLed")
        judge_pulls(outcome, load.snapshot(), {PULLED: {image.digest}})
        assert outcome.pulls > 0 and outcome.failed == 0 and outcome.wrong_content == 0, outcome.as_json()
    routes = {
        (number, phase): routes_between(site.nodes[number], since[number], until[number])
        for number in (1, 2)
        for phase, since, until in (("before", start, before), ("during", before, during), ("after", after, end))
    }
    print(f"\nnodes: pulls {[o.pulls for o in outcomes.values()]}, failed {[o.failed for o in outcomes.values()]}")
    print(f"nodes: routes {routes}")
    # Every request answered 200; local routes on both nodes before and after; node 2 routed to the
    # primary as auth-unavailable while its auth service was down, and only then. (A "primary" route
    # is the index's 50 ms timeout on a loaded machine, index-unavailable: by design, not this fault.)
    assert all(route.endswith("/200") for counts in routes.values() for route in counts), routes
    for number in (1, 2):
        assert routes[number, "before"].get("local/200", 0) > 0, routes
        assert routes[number, "after"].get("local/200", 0) > 0, routes
    assert routes[2, "during"].get("auth-unavailable/200", 0) > 0, routes
    assert [key for key, counts in routes.items() if "auth-unavailable/200" in counts] == [(2, "during")], routes


def test_each_queued_resolution_is_asked_once_across_updaters(site: Site) -> None:
    one = site.nodes[1]
    image = build_oci_image(site.root / "images" / "resolved", "t0", variant="resolved", layer_count=1)
    one.push(image, RESOLVED, "base")
    manifest = fetch_manifest(one, image.digest)
    for tag in RESOLVED_TAGS:  # straight at the primary: one request a tag (its notification queues a resolution)
        put_manifest(one, tag, manifest)
    wait_for_pins(one, RESOLVED_TAGS, image.digest, after=0.0)
    time.sleep(1.0)  # a late duplicate of those resolutions would land in the window below

    primary_log = Path(site.stack.processes["primary"].log_path)
    offset = primary_log.stat().st_size
    queued_at = one.index.now()
    events = [notification("push", RESOLVED, digest=image.digest, tag=tag) for tag in RESOLVED_TAGS]
    post_events(one, "primary", events)  # updater 1; both updaters' resolvers claim from the one queue
    wait_for_pins(one, RESOLVED_TAGS, image.digest, after=queued_at)
    time.sleep(1.5)  # a double claim would have asked again by now

    heads = {tag: count for tag, count in manifest_heads(primary_log, offset, RESOLVED).items() if tag != "base"}
    print(f"\nnodes: HEADs at the primary per tag after {len(events)} invalidations: {dict(sorted(heads.items()))}")
    assert heads == dict.fromkeys(RESOLVED_TAGS, 1)


def test_two_reconciliations_at_once_one_refused_by_the_lease(site: Site) -> None:
    """Node 1's ``reconcile --once`` is frozen (SIGSTOP) while it holds the lease; node 2's run then
    is refused; node 1's, resumed, completes."""
    sites = [node.site_file for node in site.stack.info.nodes]
    log = site.root / "reconcile.log"
    with site.redis() as redis, open(log, "ab") as output:
        first = subprocess.Popen(
            [*RECONCILE_COMMAND, sites[0]], stdout=subprocess.PIPE, stderr=output, stdin=subprocess.DEVNULL
        )
        try:
            while first.poll() is None and redis.command("EXISTS", site.lock_key("reconcile")) != "1":
                time.sleep(0.002)
            os.kill(first.pid, signal.SIGSTOP)
            assert first.poll() is None, "node 1's reconciliation ended before it was seen holding the lease"
            second = subprocess.run(
                [*RECONCILE_COMMAND, sites[1]], capture_output=True, timeout=60, check=False, stdin=subprocess.DEVNULL
            )
        finally:
            os.kill(first.pid, signal.SIGCONT)
        out, _ = first.communicate(timeout=60)
    print(f"\nnodes: reconcile on node 2 while node 1's ran: {second.stdout.decode().strip()!r}")
    assert second.returncode == 1 and b"lock held" in second.stdout, second
    assert first.returncode == 0 and b"lock held" not in out, out


def test_verify_lease_held_by_one_updater_at_a_time(site: Site) -> None:
    """Updater 1 leaves: updater 2 takes the verification lease. Updater 1 comes back: it is refused
    while updater 2 holds it (one owner throughout). Updater 2 leaves: updater 1 takes it over."""
    key = site.lock_key("verify")
    with site.redis() as redis:
        owner = lambda: redis_get(redis, key)  # noqa: E731
        site.stack.stop_part("updater")
        holder_2 = wait_for_owner(owner, lambda value: bool(value), LEASE * 2)
        site.stack.restart_part("updater")
        samples = sample(owner, LEASE * 0.75)  # updater 1 tries at once and then every LEASE/2
        assert set(samples) == {holder_2}, Counter(samples)
        site.stack.stop_part("updater-2")
        holder_1 = wait_for_owner(owner, lambda value: bool(value) and value != holder_2, LEASE * 2)
        site.stack.restart_part("updater-2")
        samples_after = sample(owner, LEASE * 0.75)
        assert set(samples_after) == {holder_1}, Counter(samples_after)
    print(f"\nnodes: verify lease: updater 2 held it over {len(samples)} samples while updater 1 ran; then updater 1")


def fetch_manifest(client: StackClient, digest: str) -> bytes:
    token = client.token(f"repository:{RESOLVED}:pull,push")
    request = urllib.request.Request(
        f"{client.info.primary_url}/v2/{RESOLVED}/manifests/{digest}",
        headers={"Authorization": f"Bearer {token}", "Accept": MANIFEST_MEDIA_TYPE},
    )
    with NO_PROXY.open(request, timeout=10) as answer:
        return bytes(answer.read())


def put_manifest(client: StackClient, tag: str, manifest: bytes) -> None:
    token = client.token(f"repository:{RESOLVED}:pull,push")
    headers = {"Authorization": f"Bearer {token}", "Content-Type": json.loads(manifest)["mediaType"]}
    url = f"{client.info.primary_url}/v2/{RESOLVED}/manifests/{tag}"
    request = urllib.request.Request(url, manifest, headers, method="PUT")
    with NO_PROXY.open(request, timeout=10) as answer:
        assert answer.status == 201, answer.status


def wait_for_pins(client: StackClient, tags: list[str], digest: str, *, after: float, timeout: float = 20.0) -> None:
    """Until every tag is pinned to ``digest`` with a stamp (the index's clock) later than ``after``."""
    deadline = time.monotonic() + timeout
    missing = list(tags)
    while missing:
        pins = client.index.primary_tags(RESOLVED)
        missing = [tag for tag in tags if tag not in pins or pins[tag][0] != digest or pins[tag][1] <= after]
        assert time.monotonic() < deadline, f"pins never landed: {missing}"
        time.sleep(0.05)


HEAD_LINE = re.compile(r'"HEAD /v2/(?P<repository>[^ ]+)/manifests/(?P<reference>[^ ?]+)[^"]*" (?P<status>\d+)')


def manifest_heads(log: Path, offset: int, repository: str) -> dict[str, int]:
    """HEADs of ``repository``'s manifests by reference in the registry's access log after ``offset``."""
    with open(log, "rb") as stream:
        stream.seek(offset)
        text = stream.read().decode("utf-8", "replace")
    found = (match for match in HEAD_LINE.finditer(text) if match["repository"] == repository)
    return dict(Counter(match["reference"] for match in found))


def redis_get(redis: RawRedis, key: str) -> str:
    """GET with a bulk reply (``RawRedis`` reads simple replies): "" when the key is absent."""
    redis.sock.sendall(f"*2\r\n$3\r\nGET\r\n${len(key)}\r\n{key}\r\n".encode())
    header = redis.replies.readline().decode().rstrip("\r\n")
    if header == "$-1":
        return ""
    return redis.replies.readline().decode().rstrip("\r\n")


def wait_for_owner(owner: Callable[[], str], accept: Callable[[str], bool], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        value = owner()
        if accept(value):
            return value
        assert time.monotonic() < deadline, f"no updater took the verification lease within {timeout}s"
        time.sleep(0.05)


def sample(owner: Callable[[], str], seconds: float) -> list[str]:
    deadline, values = time.monotonic() + seconds, []
    while time.monotonic() < deadline:
        values.append(owner())
        time.sleep(0.1)
    return values
