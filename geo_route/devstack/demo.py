"""``geo-route demo``: the promise, shown with real components.

Push a multi-layer image to the primary through the secondary URL, pull it right away (the
primary serves it), replicate, pull again (the local registry serves every byte), move the tag on
the primary and pull once more (the new digest, never the old one). Prints a table per step and
exits 0 only if every request was routed as expected.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from geo_route.devstack.client import AccessLogEntry, StackClient
from geo_route.devstack.images import OciImage, build_oci_image
from geo_route.devstack.stack import bring_up

REPOSITORY = "demo/app"
TAG = "v1"


@dataclass(frozen=True)
class Step:
    name: str
    routes: Counter[str]
    bytes_by_route: Counter[str]
    seconds: float
    expected: str
    ok: bool


def run_demo(directory: Path | None = None, print_line: Callable[[str], None] = print) -> bool:
    with tempfile.TemporaryDirectory(prefix="geo-route-demo-") as temporary:
        root = directory or Path(temporary)
        print_line(f"starting the development stack in {root} ...")
        stack = bring_up(root / "stack")
        client = StackClient(stack.info)
        try:
            steps = run_steps(client, root)
        finally:
            client.close()
            stack.stop()
    print_table(steps, print_line)
    ok = all(step.ok for step in steps)
    print_line("demo: every request was routed as expected" if ok else "demo: FAILED, see the table")
    return ok


def run_steps(client: StackClient, root: Path) -> list[Step]:
    first = build_oci_image(root / "image", TAG, layer_count=3, layer_bytes=256 * 1024)
    steps = [
        measure(client, "push via the secondary URL", lambda: client.push(first, REPOSITORY, TAG), writes_to_primary())
    ]
    pulled: list[str] = []
    steps.append(
        measure(
            client,
            "pull right after the push",
            lambda: pulled.append(client.pull(REPOSITORY, TAG, root / "pull1")),
            only("primary"),
        )
    )
    steps.append(measure(client, "replicate primary → secondary", lambda: client.replicate(REPOSITORY), nothing()))
    steps.append(
        measure(
            client,
            "pull after replication",
            lambda: pulled.append(client.pull(REPOSITORY, TAG, root / "pull2")),
            only("local"),
        )
    )
    moved = build_oci_image(root / "image", TAG, variant="moved", layer_count=3, layer_bytes=256 * 1024)
    steps.append(measure(client, "move the tag on the primary", lambda: move_tag(client, moved), writes_to_primary()))
    steps.append(
        measure(
            client,
            "pull the moved tag",
            lambda: pulled.append(client.pull(REPOSITORY, TAG, root / "pull3")),
            not_local_manifest(),
        )
    )
    digests_ok = pulled == [first.digest, first.digest, moved.digest]
    steps.append(Step("digests pulled", Counter(), Counter(), 0.0, "old, old, new", digests_ok))
    return steps


def move_tag(client: StackClient, image: OciImage) -> None:
    client.push(image, REPOSITORY, TAG)
    client.wait_for_pin(REPOSITORY, TAG, image.digest)  # the primary's notification, through the updater


Expectation = tuple[str, Callable[[list[AccessLogEntry]], bool]]


def only(route: str) -> Expectation:
    return f"all {route}", lambda entries: bool(entries) and all(e.route == route for e in entries)


def writes_to_primary() -> Expectation:
    def check(entries: list[AccessLogEntry]) -> bool:
        writes = [e for e in entries if e.method not in ("GET", "HEAD")]
        return bool(writes) and all(e.route == "primary" for e in writes)

    return "every write primary", check


def nothing() -> Expectation:
    return "no client traffic", lambda entries: not entries


def not_local_manifest() -> Expectation:
    def check(entries: list[AccessLogEntry]) -> bool:
        manifests = [e for e in entries if "/manifests/" in e.uri]
        return bool(manifests) and all(e.route == "primary" for e in manifests)

    return "manifest from primary", check


def measure(client: StackClient, name: str, action: Callable[[], object], expectation: Expectation) -> Step:
    offset = client.access_log_offset()
    started = time.monotonic()
    action()
    seconds = time.monotonic() - started
    entries = [e for e in client.access_log(offset) if e.uri.startswith(f"/v2/{REPOSITORY}/")]
    routes = Counter(e.route for e in entries)
    sizes: Counter[str] = Counter()
    for entry in entries:
        sizes[entry.route] += entry.bytes_sent
    description, check = expectation
    return Step(name, routes, sizes, seconds, description, check(entries))


def print_table(steps: list[Step], print_line: Callable[[str], None]) -> None:
    header = f"{'step':<32} {'requests by route':<28} {'bytes':>12} {'seconds':>8}  {'expected':<22} ok"
    print_line(header)
    print_line("-" * len(header))
    for step in steps:
        routes = ", ".join(f"{route} {count}" for route, count in sorted(step.routes.items())) or "-"
        total = sum(step.bytes_by_route.values())
        mark = "yes" if step.ok else "NO"
        print_line(f"{step.name:<32} {routes:<28} {total:>12,} {step.seconds:>8.2f}  {step.expected:<22} {mark}")
