"""The updater with real registries sending real notifications (the devstack wires them)."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from geo_route.devstack.client import StackClient, started_stack
from geo_route.devstack.images import build_oci_image
from geo_route.devstack.processes import wait_until
from geo_route.devstack.redis_server import RedisProcess
from geo_route.index.model import IndexQuery, QueryKind


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[StackClient]:
    with started_stack(tmp_path / "stack") as client:
        yield client


def manifest_present(client: StackClient, repository: str, digest: str) -> bool:
    return client.index.lookup(IndexQuery(QueryKind.MANIFEST, repository, digest)).present


def test_a_push_event_reaches_the_index(stack: StackClient, tmp_path: Path) -> None:
    image = build_oci_image(tmp_path / "image", "v1")
    stack.push(image, "group/app", "v1")
    stack.wait_for_pin("group/app", "v1", image.digest, present=False)  # the primary's event pinned the tag


def test_deletes_in_the_local_registry_remove_entries(stack: StackClient, tmp_path: Path) -> None:
    image = build_oci_image(tmp_path / "image", "v1")
    stack.push(image, "group/app", "v1")
    stack.replicate("group/app")
    assert manifest_present(stack, "group/app", image.digest)
    assert stack.index.local_tags("group/app") == {"v1": image.digest}
    token = stack.token("repository:group/app:delete")
    url = f"{stack.info.local_registry_url}/v2/group/app/manifests/{image.digest}"
    request = urllib.request.Request(url, method="DELETE", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 202
    wait_until(lambda: not manifest_present(stack, "group/app", image.digest), 15, "the manifest delete event")
    wait_until(lambda: stack.index.local_tags("group/app") == {}, 15, "the tag delete event")


def test_redis_down_during_delivery_then_the_registry_retry_lands(stack: StackClient, tmp_path: Path) -> None:
    assert stack.stack is not None
    redis_process = stack.stack.processes["redis"]
    port = int(stack.info.redis_url.rsplit(":", 1)[1].split("/")[0])
    stack.stack.stop_part("redis")
    image = build_oci_image(tmp_path / "image", "v1")
    stack.push(image, "group/app", "v1")  # NGINX: index unavailable → primary; the event gets 503s
    wait_until(lambda: "503" in updater_answers(stack), 15, "the updater refusing the event with 503")
    restarted = RedisProcess(Path(stack.info.directory) / "redis-again", port=port).start()
    assert restarted.logged is not None
    stack.stack.processes["redis"] = restarted.logged  # stopped with the stack
    assert not redis_process.is_running()
    stack.wait_for_pin("group/app", "v1", image.digest)  # the registry's own retry delivered it


def updater_answers(stack: StackClient) -> str:
    with urllib.request.urlopen(f"{stack.info.updater_url}/metrics", timeout=5) as answer:
        metrics = answer.read().decode()
    rejected = [line for line in metrics.splitlines() if line.startswith("geo_route_envelopes_rejected_total{")]
    return "503" if any('reason="index-unavailable"' in line and not line.endswith(" 0.0") for line in rejected) else ""
