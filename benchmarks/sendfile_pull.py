"""A replicated pull through the site with blobs sent from the registry's storage (issue 15, item 1,
target: <= 1.00x the same pull straight from the local registry).

Everything is real and private to the run, built on ``geo_route.devstack`` only: the stack with
``local_registry.storage_root`` set to the local registry's storage (refetch memory off: every
pull here comes from one address, and a refetch is served by the registry while the updater
verifies it; the verifier's background pass off, so it reads nothing during the pulls; Redis given
0.5 s instead of 50 ms, so the shared machine's load never sends a blob to the primary), an image of
``--image-mb`` MB in ``--layers`` incompressible layers pushed to the primary and replicated.

Three sides: the site with blobs from storage, the same site (same auth service, index and
registry) through a second NGINX without ``storage_root`` (blobs proxied to the registry, as before),
and the local registry straight. Two figures, each measured on every side once per round, the order
rotating every round, for ``--rounds`` rounds (the machine is shared: medians, and the median of the
per-round ratios to the direct side):

* pull: ``skopeo copy docker://... oci:DIR`` of the whole image into a fresh directory on /dev/shm
  (the client's own work, the same on both sides, is part of it);
* blobs: every blob of the image fetched by one ``curl`` with ``GET`` on one kept-alive connection
  into /dev/null (the serving alone).

Every pull through the site is checked in NGINX's access log: each blob GET answered from storage
(no registry asked), and every pulled digest the pushed one. Exit status 0 when every check passed
(the table says whether the target is met), 1 when a check failed.

Usage: .venv/bin/python benchmarks/sendfile_pull.py [--rounds N] [--image-mb M] [--layers L] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from geo_route.devstack.client import StackClient, started_stack
from geo_route.devstack.images import OciImage, build_oci_image
from geo_route.devstack.nodes import nginx_dir, start_nginx, write_node_site
from geo_route.devstack.processes import require_binary
from geo_route.devstack.skopeo import docker_reference

REPOSITORY = "bench/sendfile"
TAG = "v1"
TARGET = 1.00  # the pull through the site at most this times the direct one
PROXIED_NODE = 9  # the files of the NGINX that proxies blobs: nginx-9/, site-9.yaml


def prepare(client: StackClient, work: Path, image_mb: int, layers: int) -> OciImage:
    """Build the image, push it straight to the primary, replicate it and wait for the index."""
    layer_bytes = image_mb * 1_000_000 // layers
    image = build_oci_image(work / "image", TAG, layer_count=layers, layer_bytes=layer_bytes)
    destination = docker_reference(client.primary, REPOSITORY, TAG)
    client.skopeo.copy(image.reference, destination, dest_creds=client.credentials())
    client.replicate(REPOSITORY, [TAG])
    return image


def timed_pull(client: StackClient, address: str, scratch: Path) -> tuple[float, str]:
    """Seconds for one whole ``skopeo copy`` from ``address`` into a fresh OCI layout, and the digest."""
    layout = Path(tempfile.mkdtemp(prefix="pull-", dir=scratch))
    try:
        started = time.perf_counter()
        digest = client.skopeo.copy(
            docker_reference(address, REPOSITORY, TAG), f"oci:{layout}:{TAG}", src_creds=client.credentials()
        )
        return time.perf_counter() - started, digest
    finally:
        shutil.rmtree(layout, ignore_errors=True)


def timed_blobs(address: str, token: str, digests: tuple[str, ...]) -> float:
    """Seconds for one ``curl`` to GET every blob on one kept-alive connection, to /dev/null (a C
    client: Python's reads would be the bottleneck)."""
    argv = [require_binary("curl"), "--silent", "--show-error", "--fail", "--header", f"Authorization: Bearer {token}"]
    for digest in digests:
        argv += ["--output", "/dev/null", f"http://{address}/v2/{REPOSITORY}/blobs/{digest}"]
    started = time.perf_counter()
    subprocess.run(argv, check=True, timeout=120, stdin=subprocess.DEVNULL)
    return time.perf_counter() - started


SIDES = ("storage", "proxied", "direct")
LABELS = {"storage": "site, storage", "proxied": "site, proxied", "direct": "direct local"}


def alternate(rounds: int, runs: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Every side once per round, the order rotating each round; seconds per side."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for number in range(rounds):
        shift = number % len(names)
        for name in names[shift:] + names[:shift]:
            seconds[name].append(runs[name]())
    return seconds


def summarize(seconds: dict[str, list[float]]) -> dict[str, Any]:
    """Seconds and medians per side, and each side's ratio to the direct pull: of the medians, and
    the median of the per-round ratios."""
    direct = seconds["direct"]
    summary: dict[str, Any] = {"seconds": seconds, "median": {n: statistics.median(s) for n, s in seconds.items()}}
    summary["ratio_of_medians"] = {n: summary["median"][n] / statistics.median(direct) for n in seconds}
    summary["median_of_ratios"] = {
        n: statistics.median(a / b for a, b in zip(s, direct, strict=True)) for n, s in seconds.items()
    }
    return summary


def check_pulls_from_storage(client: StackClient, offset: int, pulls: int, blobs: int) -> list[str]:
    """Problems: every blob GET through the storage site since ``offset`` answered from storage."""
    entries = [e for e in client.access_log(offset) if "/blobs/" in e.uri and e.method == "GET"]
    problems = [f"{e.uri[-19:]}: {e.status} {e.route}/{e.reason} via {e.upstream!r}" for e in entries if e.upstream]
    if len(entries) < pulls * blobs:
        problems.append(f"{len(entries)} blob GETs through the site for {pulls} pulls of {blobs} blobs")
    return problems


@contextlib.contextmanager
def proxying_nginx(client: StackClient) -> Iterator[str]:
    """A second NGINX of the same site, auth service and index, with blobs proxied to the registry
    (no ``storage_root``): the site as it was. Yields its ``127.0.0.1:PORT``."""
    directory, site = Path(client.info.directory), Path(client.info.site_file)
    path = write_node_site(directory, site, PROXIED_NODE)
    values = yaml.safe_load(path.read_text(encoding="utf-8"))
    values["server"] = yaml.safe_load(site.read_text(encoding="utf-8"))["server"]  # node 1's auth service
    values["local_registry"].pop("storage_root")
    path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    process = start_nginx(nginx_dir(directory, PROXIED_NODE), path)
    try:
        yield values["nginx"]["listen"][0]
    finally:
        process.stop()


def run(rounds: int, image_mb: int, layers: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="geo-route-sendfile-") as work_dir:
        work = Path(work_dir)
        storage = work / "stack" / "secondary" / "storage"
        overrides = {
            "local_registry": {"storage_root": str(storage)},
            "routing": {"refetch_window": 0},
            "updater": {"verify_bytes_per_second": 0},
            # The machine is shared: a Redis answer later than the default 50 ms would send a blob
            # to the primary (index-unavailable) and spoil the comparison, not measure the path.
            "redis": {"socket_timeout": 0.5},
        }
        scratch = Path(tempfile.mkdtemp(prefix="geo-route-sendfile-", dir="/dev/shm"))
        try:
            with started_stack(work / "stack", site_overrides=overrides) as client, proxying_nginx(client) as proxied:
                image = prepare(client, work, image_mb, layers)
                return measure(client, image, scratch, rounds, proxied)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def measure(client: StackClient, image: OciImage, scratch: Path, rounds: int, proxied: str) -> dict[str, Any]:
    addresses = {"storage": client.secondary, "proxied": proxied, "direct": client.local_registry}
    digests: list[str] = []

    def pull(address: str) -> Callable[[], float]:
        def once() -> float:
            seconds, digest = timed_pull(client, address, scratch)
            digests.append(digest)
            return seconds

        return once

    def fetch_blobs(address: str) -> Callable[[], float]:
        return lambda: timed_blobs(address, token, image.blob_digests)

    offset = client.access_log_offset()
    pulls = summarize(alternate(rounds, {name: pull(addresses[name]) for name in SIDES}))
    problems = check_pulls_from_storage(client, offset, rounds, len(image.blob_digests))
    problems += [f"pulled {d[:19]}, pushed {image.digest[:19]}" for d in digests if d != image.digest]
    token = client.token(f"repository:{REPOSITORY}:pull")
    blobs = summarize(alternate(rounds, {name: fetch_blobs(addresses[name]) for name in SIDES}))
    size = image.config.size + sum(layer.size for layer in image.layers)
    met = pulls["ratio_of_medians"]["storage"] <= TARGET
    return {
        "bytes": size,
        "layers": len(image.layers),
        "rounds": rounds,
        "pull": pulls,
        "blobs": blobs,
        "target": TARGET,
        "met": met,
        "problems": problems,
    }


def report(result: dict[str, Any]) -> None:
    megabytes = result["bytes"] / 1e6
    print(
        f"replicated pull, {megabytes:.0f} MB in {result['layers']} layers, {result['rounds']} rounds, order rotating"
    )
    for name, label in (("pull", "skopeo copy (whole pull)"), ("blobs", "GET every blob, one connection")):
        figures = result[name]
        print(f"{label}: median s, ratio to direct (of medians / median per round), MB/s per round")
        for side in SIDES:
            rates = " ".join(f"{megabytes / s:.0f}" for s in figures["seconds"][side])
            print(
                f"  {LABELS[side]:<15}{figures['median'][side]:>8.3f} s"
                f"{figures['ratio_of_medians'][side]:>8.3f}x{figures['median_of_ratios'][side]:>8.3f}x   {rates}"
            )
    ratio = result["pull"]["ratio_of_medians"]["storage"]
    verdict = "met" if result["met"] else "MISSED"
    print(f"target: pull through the site (storage) <= {result['target']:.2f}x direct: {ratio:.3f}x, {verdict}")
    for problem in result["problems"]:
        print(f"CHECK FAILED: {problem}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--image-mb", type=int, default=200)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = run(args.rounds, args.image_mb, args.layers)
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(1 if main()["problems"] else 0)
