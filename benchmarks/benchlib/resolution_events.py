"""Part ``events`` of resolution_load.py: the HEADs the primary receives per notification event.

The devstack with ``tests/support.py``'s recording relay in front of the primary (the caller puts
the repository root on ``sys.path``). Pushes and deletes go to the primary's own port, past the
relay, so the relay sees exactly what the updater (and NGINX, unused here) asks the primary.
"""

from __future__ import annotations

import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from benchlib.common import BenchError
from geo_route.devstack.client import StackClient, started_stack
from geo_route.devstack.images import OciImage, build_oci_image
from geo_route.devstack.skopeo import docker_reference
from geo_route.index.redis_store import RedisIndexStore
from tests.support import REQUEST_LINE, RecordingRelay

QUIET_SECONDS = 3.0  # longer than the longest hint-retry delay (2 s): no question is still to come
SETTLE_LIMIT = 30.0  # seconds of watching after the last push; the designed worst case is 3.5 s of retries
RATE_WINDOW = 10.0  # a scenario not settled by then: the HEAD rate over its last seconds

Expectation = str | None  # the digest a tag must end pinned to; None: a tombstone (deleted)


class HeadCountingRelay(RecordingRelay):
    """``tests/support.py``'s relay, also keeping each request's method: what the primary received."""

    def __init__(self, target: str) -> None:
        self.requests: list[tuple[str, str]] = []  # (method, request target)
        super().__init__(target)

    def record(self, data: bytes) -> bytes:
        *lines, rest = data.split(b"\n")
        for line in lines:
            if match := REQUEST_LINE.search(line):
                with self.lock:
                    self.requests.append((match.group(1).decode(), match.group(2).decode("latin-1")))
        return rest[-8192:]

    def since(self, start: int) -> list[tuple[str, str]]:
        with self.lock:
            return self.requests[start:]


@dataclass
class EventScenario:
    """One scenario's pushes and deletes, and what the primary was asked meanwhile."""

    name: str
    repository: str
    tags: int
    tag_changes: int = 0  # manifest pushes and deletes made at the primary
    heads_by_tag: dict[str, int] = field(default_factory=dict)
    other_requests: list[str] = field(default_factory=list)
    events: dict[str, int] = field(default_factory=dict)  # "action/outcome" -> count, from the updater
    seconds: float = 0.0
    still_asking: list[str] = field(default_factory=list)  # tags HEADed in the last RATE_WINDOW s of SETTLE_LIMIT
    ongoing_heads_per_s: float = 0.0  # over that window

    @property
    def settled(self) -> bool:
        return not self.still_asking

    @property
    def heads(self) -> int:
        return sum(self.heads_by_tag.values())

    @property
    def per_change(self) -> float:
        return self.heads / self.tag_changes if self.tag_changes else 0.0

    @property
    def applied_events(self) -> int:
        """Events from the primary the updater applied (tag pushes and deletes; blob pushes are ignored)."""
        return sum(n for key, n in self.events.items() if key.endswith("/applied"))

    @property
    def per_applied_event(self) -> float:
        return self.heads / self.applied_events if self.applied_events else 0.0

    def distribution(self) -> str:
        """``tags x HEADs each``, e.g. ``18 x 1, 2 x 4``."""
        counts = Counter(self.heads_by_tag.values())
        return ", ".join(f"{n} x {heads}" for heads, n in sorted(counts.items()))

    def describe(self) -> str:
        text = (
            f"{self.tags} tags, {self.tag_changes} tag changes: {self.heads} HEADs ({self.per_change:.2f} per "
            f"change; tags x HEADs {self.distribution()}) in {self.seconds:.1f} s"
        )
        if not self.settled:
            text += (
                f"; NOT SETTLED after {SETTLE_LIMIT:g} s: {len(self.still_asking)} tags still asked, "
                f"{self.ongoing_heads_per_s:.2f} HEAD/s over the last {RATE_WINDOW:g} s"
            )
        return text


@dataclass
class StackHandle:
    client: StackClient
    relay: HeadCountingRelay
    primary: str  # the primary's own 127.0.0.1:PORT, behind the relay
    images: Path


ScenarioStep = Callable[[StackHandle, str, str, int], tuple[Expectation, int]]


def measure_events(tags: int, directory: Path) -> list[EventScenario]:
    """The three scenarios on one devstack. ``push+delete`` runs last: a tag still being asked about
    would keep the resolution queue busy, and a later scenario could not tell when it has settled."""
    fronts: list[tuple[HeadCountingRelay, str]] = []

    def front(address: str) -> str:
        relay = HeadCountingRelay(address)
        fronts.append((relay, address))
        return relay.address

    try:
        with started_stack(directory / "stack", primary_front=front) as client:
            relay, primary = fronts[0]
            handle = StackHandle(client, relay, primary, directory / "images")
            print(f"  devstack up: primary {primary} behind the counting relay {relay.address}", flush=True)
            return [
                run_scenario(handle, "push", tags, push_once),
                run_scenario(handle, "move", tags, push_twice),
                run_scenario(handle, "push+delete", tags, push_then_delete),
            ]
    finally:
        for relay, _ in fronts:
            relay.close()


def run_scenario(handle: StackHandle, name: str, tags: int, step: ScenarioStep) -> EventScenario:
    repository = f"resolution-load/{name.replace('+', '-')}"
    scenario = EventScenario(name, repository, tags)
    events_before = read_primary_events(handle.client)
    start, started = len(handle.relay.since(0)), time.monotonic()
    expected: dict[str, Expectation] = {}
    for index in range(tags):
        tag = f"t{index:03d}"
        expected[tag], changes = step(handle, repository, tag, index)
        scenario.tag_changes += changes
    window = wait_until_settled(handle, repository, expected, start)
    scenario.seconds = time.monotonic() - started
    if window is not None:
        asked = heads_by_tag(handle.relay.since(window), repository)
        scenario.still_asking = sorted(set(asked))
        scenario.ongoing_heads_per_s = len(asked) / RATE_WINDOW
    requests = handle.relay.since(start)
    scenario.heads_by_tag = dict(Counter(heads_by_tag(requests, repository)))
    prefix = f"/v2/{repository}/manifests/"
    scenario.other_requests = [f"{m} {t}" for m, t in requests if m != "HEAD" or not t.startswith(prefix)]
    scenario.events = subtract(read_primary_events(handle.client), events_before)
    print(f"  {name:<12} {scenario.describe()}", flush=True)
    return scenario


def heads_by_tag(requests: list[tuple[str, str]], repository: str) -> list[str]:
    """The tag of every ``HEAD /v2/<repository>/manifests/<tag>`` among ``requests``."""
    prefix = f"/v2/{repository}/manifests/"
    return [target[len(prefix) :] for method, target in requests if method == "HEAD" and target.startswith(prefix)]


def build_image(handle: StackHandle, variant: str) -> OciImage:
    """A small image whose manifest is new (its config names ``variant``), sharing the base layer."""
    return build_oci_image(handle.images, variant, variant=variant, layer_count=1, layer_bytes=4096)


def push_direct(handle: StackHandle, image: OciImage, repository: str, tag: str) -> str:
    """Push to the primary's own port: past the relay and NGINX, so no write fence applies."""
    destination = docker_reference(handle.primary, repository, tag)
    return handle.client.skopeo.copy(image.reference, destination, dest_creds=handle.client.credentials())


def push_once(handle: StackHandle, repository: str, tag: str, index: int) -> tuple[Expectation, int]:
    return push_direct(handle, build_image(handle, f"push-{index}"), repository, tag), 1


def push_twice(handle: StackHandle, repository: str, tag: str, index: int) -> tuple[Expectation, int]:
    push_direct(handle, build_image(handle, f"move-{index}-a"), repository, tag)
    return push_direct(handle, build_image(handle, f"move-{index}-b"), repository, tag), 2


def push_then_delete(handle: StackHandle, repository: str, tag: str, index: int) -> tuple[Expectation, int]:
    """Push, then delete the manifest by digest at once (registry 2.8 untags it too)."""
    digest = push_direct(handle, build_image(handle, f"delete-{index}"), repository, tag)
    token = handle.client.token(f"repository:{repository}:delete")
    url = f"http://{handle.primary}/v2/{repository}/manifests/{digest}"
    request = urllib.request.Request(url, method="DELETE", headers={"Authorization": f"Bearer {token}"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=10) as answer:
        if answer.status != 202:
            raise BenchError(f"DELETE {url} answered {answer.status}")
    return None, 2


def wait_until_settled(
    handle: StackHandle, repository: str, expected: dict[str, Expectation], start: int
) -> int | None:
    """Until every tag is pinned as expected (a tombstone for None), nothing is queued and the primary
    has been quiet for ``QUIET_SECONDS``: ``None``. After ``SETTLE_LIMIT`` seconds: the relay's
    position ``RATE_WINDOW`` seconds before (what the primary was still asked is counted from it)."""
    index = handle.client.index
    started = time.monotonic()
    seen, quiet_since, window = -1, started, len(handle.relay.since(0))
    while time.monotonic() - started < SETTLE_LIMIT:
        count = len(handle.relay.since(start))
        if time.monotonic() - started < SETTLE_LIMIT - RATE_WINDOW:
            window = start + count
        if count != seen:
            seen, quiet_since = count, time.monotonic()
        elif time.monotonic() - quiet_since >= QUIET_SECONDS and settled(index, repository, expected):
            return None
        time.sleep(0.1)
    return window


def settled(index: RedisIndexStore, repository: str, expected: dict[str, Expectation]) -> bool:
    if index.queued_resolutions():
        return False
    return all(pinned_digest(index, repository, tag) == want for tag, want in expected.items())


def pinned_digest(index: RedisIndexStore, repository: str, tag: str) -> str | None:
    pin = index.primary_tag(repository, tag)
    return pin[0] if pin else None


def read_primary_events(client: StackClient) -> dict[str, int]:
    """The updater's count of events from the primary, "action/outcome" -> n (every worker's)."""
    with urllib.request.urlopen(f"{client.info.updater_url}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    counts: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "geo_route_events_total" and sample.labels.get("source") == "primary":
                key = f"{sample.labels['action']}/{sample.labels['outcome']}"
                counts[key] = counts.get(key, 0) + int(sample.value)
    return counts


def subtract(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {key: n - before.get(key, 0) for key, n in sorted(after.items()) if n - before.get(key, 0)}
