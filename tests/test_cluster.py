"""The site on a Redis Cluster (issue 13, item 2): a devstack whose index is a real cluster of three
primaries, each with a replica (``bring_up(redis="cluster")``), pulled through end to end with skopeo.

The repositories are chosen so that their buckets live on all three primaries: each decision, each
applied notification and each resolution runs on the primary of its repository's bucket.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from faults import observe_patiently

from geo_route.config import load_settings
from geo_route.devstack.client import AccessLogEntry, StackClient
from geo_route.devstack.images import OciImage, build_oci_image
from geo_route.devstack.redis_cluster import ClusterTopology
from geo_route.devstack.stack import bring_up
from geo_route.index.redis_store import KeySchema

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackClient]:
    stack = bring_up(tmp_path_factory.mktemp("cluster") / "stack", redis="cluster")
    client = observe_patiently(StackClient(stack.info, stack))  # the test's own lookups wait longer
    try:
        yield client
    finally:
        client.close()
        stack.stop()


def topology(client: StackClient) -> ClusterTopology:
    assert client.stack is not None and isinstance(client.stack.redis_topology, ClusterTopology)
    return client.stack.redis_topology


def repositories_on_every_primary(client: StackClient) -> list[str]:
    """One repository whose bucket is on each primary of the cluster."""
    keys = KeySchema(load_settings(client.info.site_file, environ={}).redis.key_prefix, 256)
    by_primary: dict[str, str] = {}
    for number in range(200):
        repository = f"cluster/app{number}"
        by_primary.setdefault(topology(client).primary_part(keys.epoch(keys.bucket(repository))), repository)
        if len(by_primary) == 3:
            return sorted(by_primary.values())
    raise AssertionError(f"200 repositories did not reach 3 primaries: {by_primary}")


def image(tmp_path: Path, variant: str) -> OciImage:
    return build_oci_image(tmp_path / f"image-{variant}", "v1", variant=variant, layer_count=2)


def pull_entries(client: StackClient, repository: str, since: int) -> list[AccessLogEntry]:
    return [e for e in client.access_log(since) if e.uri.startswith(f"/v2/{repository}/") and e.method == "GET"]


def test_the_index_is_spread_over_three_primaries(site: StackClient) -> None:
    assert site.info.redis_cluster_nodes == topology(site).addresses
    assert len(topology(site).nodes) == 6
    assert len({topology(site).primary_part(f"{{g{n}}}") for n in range(256)}) == 3


def test_push_replicate_pull_and_a_moved_tag_on_every_primary(site: StackClient, tmp_path: Path) -> None:
    for repository in repositories_on_every_primary(site):
        out = tmp_path / repository.replace("/", "-")  # a layout of its own: skopeo skips blobs a layout has
        first, moved = image(tmp_path, f"{repository}-1"), image(tmp_path, f"{repository}-2")
        site.push(first, repository, "v1")
        since = site.access_log_offset()
        assert site.pull(repository, "v1", out / "before") == first.digest
        assert {e.route for e in pull_entries(site, repository, since)} == {"primary"}, "not replicated yet"

        site.replicate(repository)
        since = site.access_log_offset()
        assert site.pull(repository, "v1", out / "after") == first.digest
        entries = pull_entries(site, repository, since)
        assert len(entries) == 1 + len(first.blob_digests)
        assert {(e.route, e.status) for e in entries} == {("local", 200)}, entries

        site.push(moved, repository, "v1")
        assert site.pull(repository, "v1", out / "moved") == moved.digest != first.digest
        site.wait_for_pin(repository, "v1", moved.digest)  # the primary's notification, on the bucket's primary
        site.replicate(repository)
        since = site.access_log_offset()
        assert site.pull(repository, "v1", out / "moved-local") == moved.digest
        assert {e.route for e in pull_entries(site, repository, since)} == {"local"}
