"""Issue 11, item 2, through the real devstack: one corrupted local blob (one byte flipped, same
size) no longer fails every pull of its image forever.

- ``geo-route reconcile --once --verify`` reads every local manifest and blob back, finds the
  mismatch, quarantines the digest (exit 1, the report names it); pulls then get that blob from the
  primary (``blob-quarantined``) and succeed. Repaired, the next ``--verify`` lifts the quarantine.
- The updater finds it by itself (periodic verification), with nothing run by hand.
- A client that got the corrupted copy and pulls again makes the updater read the copy (NGINX
  remembers the complete local answer per client address: ``blob-verifying``), which quarantines it
  for everyone seconds later, so the client's next retry succeeds; with ``routing.refetch_route:
  primary`` the refetch itself goes to the primary.

The stacks run the updater's verification with ``updater.verify_interval`` long (one pass when the
updater starts, over an empty index) except the periodic test's own stack, so that each test shows
one way of finding the corruption.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from geo_route.config import load_settings
from geo_route.devstack.client import AccessLogEntry, StackClient, parse_prometheus_text, started_stack
from geo_route.devstack.images import OciImage, build_oci_image
from geo_route.devstack.processes import fetch, wait_until
from geo_route.devstack.skopeo import SkopeoError
from geo_route.index.model import IndexQuery, IndexView, QueryKind
from geo_route.updater.reconcile import Registries
from geo_route.updater.verify import RateLimiter, Result, Verifier

pytestmark = pytest.mark.integration

VERIFY_COMMAND = (sys.executable, "-m", "geo_route.cli", "reconcile", "--once", "--verify", "-c")
LOCAL_PART = "secondary"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackClient]:
    overrides = {"updater": {"verify_interval": 3600}}
    with started_stack(tmp_path_factory.mktemp("scrub") / "stack", site_overrides=overrides) as client:
        yield client


def publish(client: StackClient, workdir: Path, repository: str) -> OciImage:
    """An image pushed through the site and replicated (every blob and the manifest local)."""
    built = build_oci_image(workdir / "image", "v1", variant=repository.replace("/", "-"), layer_count=2)
    client.push(built, repository, "v1")
    client.replicate(repository, ["v1"])
    for digest in built.blob_digests:
        wait_until(lambda d=digest: blob_view(client, repository, d).present, 30, f"{digest[:19]} local")
    return built


def blob_data(client: StackClient, digest: str) -> Path:
    storage = Path(client.info.directory) / LOCAL_PART / "storage"
    data = storage / "docker/registry/v2/blobs/sha256" / digest[7:9] / digest[7:] / "data"
    assert data.is_file(), data
    return data


def flip_one_byte(path: Path) -> None:
    """Bit rot: one byte changed in the middle, the size unchanged."""
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0x01
    path.write_bytes(bytes(content))


def blob_view(client: StackClient, repository: str, digest: str) -> IndexView:
    return client.index.lookup(IndexQuery(QueryKind.BLOB, repository, digest))


def pull(client: StackClient, repository: str, layout: Path) -> str:
    return client.pull(repository, "v1", layout)


def corrupt_and_pull(client: StackClient, tmp_path: Path, repository: str) -> tuple[OciImage, str, int]:
    """An image replicated, one byte of its own layer flipped, and a first pull that gets the bad
    copy and fails: (image, layer, access-log offset before that pull)."""
    built = publish(client, tmp_path, repository)
    layer = built.layers[1].digest
    flip_one_byte(blob_data(client, layer))
    since = client.access_log_offset()
    with pytest.raises(SkopeoError, match=r"(?i)digest"):
        pull(client, repository, tmp_path / "first")
    return built, layer, since


def blob_requests(client: StackClient, since: int, repository: str, digest: str) -> list[AccessLogEntry]:
    return [e for e in client.access_log(since) if e.uri == f"/v2/{repository}/blobs/{digest}" and e.method == "GET"]


def verify(client: StackClient) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VERIFY_COMMAND, client.info.site_file], capture_output=True, text=True, timeout=120, check=False
    )


def test_reconcile_verify_quarantines_a_corrupted_blob_and_lifts_it_once_repaired(
    site: StackClient, tmp_path: Path
) -> None:
    repository = "scrub/by-hand"
    built = publish(site, tmp_path, repository)
    layer = built.layers[1].digest
    data = blob_data(site, layer)
    original = data.read_bytes()
    flip_one_byte(data)
    with pytest.raises(SkopeoError, match=r"(?i)digest"):
        pull(site, repository, tmp_path / "corrupted")  # what every pull got before: a digest mismatch

    result = verify(site)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "mismatched 1 (quarantined)" in result.stdout, result.stdout
    assert f"{repository}@{layer}" in result.stdout
    assert blob_view(site, repository, layer) == IndexView(present=False, quarantined=True)

    since = site.access_log_offset()
    assert pull(site, repository, tmp_path / "after") == built.digest
    site.wait_for_quiet_log()
    [served] = blob_requests(site, since, repository, layer)
    assert (served.route, served.reason, served.status) == ("primary", "blob-quarantined", 200)

    data.write_bytes(original)  # repaired (e.g. the file deleted and the blob replicated again)
    result = verify(site)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "quarantined now 0" in result.stdout
    assert blob_view(site, repository, layer).present


def test_a_client_pulling_again_after_a_mismatch_gets_the_primarys_copy_once_the_site_learnt(
    site: StackClient, tmp_path: Path
) -> None:
    """refetch_route "local" (the default): the refetch is still served here (every replicated
    byte stays local), and asks the updater to read the copy: quarantined within seconds, so the
    client's next retry gets the primary's copy (docker retries after 5 s, kubelet after 10 s)."""
    repository = "scrub/refetch"
    built, layer, since = corrupt_and_pull(site, tmp_path, repository)
    asked = time.monotonic()
    with pytest.raises(SkopeoError, match=r"(?i)digest"):
        pull(site, repository, tmp_path / "again")  # served here again: the verifier has not read it yet
    wait_until(lambda: blob_view(site, repository, layer).quarantined, 20, f"{layer[:19]} quarantined")
    learnt = time.monotonic() - asked
    assert pull(site, repository, tmp_path / "retry") == built.digest
    site.wait_for_quiet_log()
    first, again, retry = blob_requests(site, since, repository, layer)
    assert (first.route, first.reason) == ("local", "blob-local")
    assert (again.route, again.reason) == ("local", "blob-verifying")
    assert (retry.route, retry.reason, retry.status) == ("primary", "blob-quarantined", 200)
    assert learnt < 20


def test_with_refetches_to_the_primary_the_first_retry_gets_the_primarys_copy(tmp_path: Path) -> None:
    """refetch_route "primary": a retrying client never gets the same bad copy twice."""
    overrides = {"updater": {"verify_interval": 3600}, "routing": {"refetch_route": "primary"}}
    with started_stack(tmp_path / "stack", site_overrides=overrides) as client:
        repository = "scrub/refetch-primary"
        built, layer, since = corrupt_and_pull(client, tmp_path, repository)
        assert pull(client, repository, tmp_path / "again") == built.digest, "the retry must not get the same bytes"
        client.wait_for_quiet_log()
        first, again = blob_requests(client, since, repository, layer)
        assert (first.route, first.status) == ("local", 200)
        assert (again.route, again.reason, again.status) == ("primary", "blob-verifying", 200)
        # The refetch asked the updater to read the local copy: quarantined for everyone within seconds.
        wait_until(lambda: blob_view(client, repository, layer).quarantined, 20, f"{layer[:19]} quarantined")


def test_a_refetch_of_intact_content_is_served_here_once_verified(site: StackClient, tmp_path: Path) -> None:
    """The false positive (machines behind one NAT address pulling the same image): every pull is
    served here; the refetch only has the updater read the copy once, after which refetches need
    no verification for routing.refetch_recheck."""
    repository = "scrub/intact"
    built = publish(site, tmp_path, repository)
    layer = built.layers[1].digest
    since = site.access_log_offset()
    assert pull(site, repository, tmp_path / "one") == built.digest
    assert pull(site, repository, tmp_path / "two") == built.digest
    wait_until(lambda: not site.index.lookup(refetch_query(repository, layer)).verifying, 20, "the refetch verified")
    assert pull(site, repository, tmp_path / "three") == built.digest
    site.wait_for_quiet_log()
    routes = [(e.route, e.reason) for e in blob_requests(site, since, repository, layer)]
    assert routes == [("local", "blob-local"), ("local", "blob-verifying"), ("local", "blob-local")]
    assert not blob_view(site, repository, layer).quarantined


def refetch_query(repository: str, digest: str) -> IndexQuery:
    return IndexQuery(QueryKind.BLOB, repository, digest, refetch=True)


def test_the_updater_finds_a_corrupted_blob_by_itself(tmp_path: Path) -> None:
    overrides = {"updater": {"verify_interval": 1}}
    with started_stack(tmp_path / "stack", site_overrides=overrides) as client:
        repository = "scrub/periodic"
        built = publish(client, tmp_path, repository)
        layer = built.layers[1].digest
        flip_one_byte(blob_data(client, layer))
        wait_until(lambda: blob_view(client, repository, layer).quarantined, 30, f"{layer[:19]} quarantined")
        assert pull(client, repository, tmp_path / "pulled") == built.digest
        metrics = parse_prometheus_text(fetch(f"{client.info.updater_url}/metrics").body.decode())
        assert metrics.get('geo_route_verifications_total{cause="pass",result="mismatch"}', 0) >= 1, metrics


class KillingTheRegistry(RateLimiter):
    """No rate limit; kills the local registry (SIGKILL, as a crash or an OOM kill would) when the
    first chunk of a read arrives, so that the read goes on with what was already sent, then EOF."""

    def __init__(self, client: StackClient) -> None:
        super().__init__(0)
        self.client = client
        self.killed = False

    def take(self, count: int) -> None:
        if not self.killed:
            assert self.client.stack is not None
            self.client.stack.kill_part(LOCAL_PART)
            self.killed = True


def test_a_read_cut_short_by_the_local_registry_dying_quarantines_nothing(site: StackClient, tmp_path: Path) -> None:
    """The local registry dies while the updater reads a blob back (a refetch's verification or the
    pass): the body ends before its Content-Length. That is a failed read (counted, read again
    later), never a mismatch: intact content must not be quarantined and sent to the primary."""
    repository = "scrub/cut"
    built = build_oci_image(tmp_path / "image", "v1", variant="cut", layer_count=1, layer_bytes=48 * 1024 * 1024)
    site.push(built, repository, "v1")
    site.replicate(repository, ["v1"])
    layer = built.layers[0].digest
    wait_until(lambda: blob_view(site, repository, layer).present, 30, f"{layer[:19]} local")
    assert site.stack is not None
    settings = load_settings(site.info.site_file)
    registries = Registries.from_settings(settings)
    limiter = KillingTheRegistry(site)
    try:
        verifier = Verifier(site.index, registries.local, limiter, trust=600)
        check = verifier.verify(repository, layer, False, suspect=True)
    finally:
        registries.close()
        if limiter.killed:
            site.stack.restart_part(LOCAL_PART)
    assert limiter.killed
    assert 0 < check.size < built.layers[0].size, check
    assert check.result is Result.ERROR and "IncompleteRead" in check.problem, check
    assert blob_view(site, repository, layer) == IndexView(present=True)
