"""How long one verification pass (the scrub, ``updater/verify.py``) takes over 10 GB of local content.

Everything is real and private to the run: the development stack (``geo_route.devstack``) in a
temporary directory, its updater stopped so that only the measured pass reads the local registry.
Setup (timed and printed): ``--blobs`` blobs of ``--size-gb / --blobs`` each, incompressible, pushed
over HTTP straight into the local registry (filesystem storage), and registered as local in the index.

Then one pass reads every blob back through the local registry's API and checks its digest: once with
no rate limit (what the machine can do: registry, HTTP and SHA-256 on the same 2 vCPUs) and, with
``--default-rate``, once at ``updater.verify_bytes_per_second``'s default (32 MiB/s), which is what
bounds how long a corrupted blob can go unnoticed on a site that nobody refetches it from.

Prints seconds, MB/s and the verifier's CPU per pass. Exit status 0 when every pass read every byte
and found every blob intact, 1 otherwise, 2 when the setup failed.

Usage:
    .venv/bin/python benchmarks/verify_pass.py [--size-gb 10] [--blobs 40] [--default-rate]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # geo_route from the checkout

from reconcile_bench import token_source

from geo_route.config import UpdaterSettings, load_settings
from geo_route.devstack.stack import StackInfo, bring_up
from geo_route.index.model import BlobPresence
from geo_route.updater.reconcile import Registries, open_store
from geo_route.updater.verify import RateLimiter, Verifier, VerifyReport

CHUNK = 1 << 20
REPOSITORY = "bench/scrub"
DEFAULT_RATE = UpdaterSettings().verify_bytes_per_second


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=10.0, help="local content in GB (10^9 bytes)")
    parser.add_argument("--blobs", type=int, default=40, help="how many blobs it is split into")
    parser.add_argument("--default-rate", action="store_true", help="also a pass at the default rate limit")
    return parser.parse_args(argv)


def blob_chunks(index: int, size: int, pattern: bytes) -> Iterator[bytes]:
    """Blob ``index``: incompressible, distinct per blob (each chunk starts with its own numbers)."""
    sent = 0
    number = 0
    while sent < size:
        chunk = (f"{index:08d}{number:012d}".encode() + pattern)[: min(CHUNK, size - sent)]
        sent += len(chunk)
        number += 1
        yield chunk


def digest_of(index: int, size: int, pattern: bytes) -> str:
    hasher = hashlib.sha256()
    for chunk in blob_chunks(index, size, pattern):
        hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


def push_blob(info: StackInfo, token: str, index: int, size: int, pattern: bytes) -> str:
    digest = digest_of(index, size, pattern)
    parts = urlsplit(info.local_registry_url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=120)
    try:
        headers = {"Authorization": f"Bearer {token}", "Content-Length": "0"}
        connection.request("POST", f"/v2/{REPOSITORY}/blobs/uploads/", headers=headers)
        response = connection.getresponse()
        response.read()
        if response.status != 202:
            raise RuntimeError(f"upload start: HTTP {response.status}")
        location = urlsplit(response.getheader("Location") or "")
        target = f"{location.path}?{location.query}&digest={digest}"
        headers = {"Authorization": f"Bearer {token}", "Content-Length": str(size)}
        headers["Content-Type"] = "application/octet-stream"
        connection.request("PUT", target, body=blob_chunks(index, size, pattern), headers=headers)
        response = connection.getresponse()
        response.read()
        if response.status != 201:
            raise RuntimeError(f"blob upload: HTTP {response.status}")
        return digest
    finally:
        connection.close()


def timed_pass(verifier: Verifier) -> tuple[VerifyReport, float]:
    cpu = time.process_time()
    report = verifier.run_pass(threading.Event())
    return report, time.process_time() - cpu


def print_pass(label: str, report: VerifyReport, cpu: float, expected_bytes: int) -> bool:
    rate = report.bytes / report.seconds / 1e6 if report.seconds else 0.0
    print(
        f"{label}: {report.seconds:.1f} s for {report.bytes / 1e9:.2f} GB ({rate:.0f} MB/s), "
        f"verifier CPU {cpu:.1f} s; intact {report.results['intact']}, mismatched {report.results['mismatch']}, "
        f"errors {report.results['error']}"
    )
    print(f"  full pass over 10 GB at this speed: {10e9 / (report.bytes / report.seconds):.0f} s")
    return report.ok and report.bytes == expected_bytes


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    size = int(args.size_gb * 1e9 / args.blobs)
    total = size * args.blobs
    workdir = Path(tempfile.mkdtemp(prefix="geo-route-verify-bench-"))
    try:
        stack = bring_up(workdir / "stack")
    except Exception as exc:  # a setup failure is reported, not raised
        print(f"setup failed: {exc}")
        shutil.rmtree(workdir, ignore_errors=True)
        return 2
    try:
        stack.stop_part("updater")  # nothing else reads the local registry or writes the index
        info = stack.info
        settings = load_settings(info.site_file)
        token = token_source(info)(REPOSITORY)
        pattern = os.urandom(CHUNK)
        started = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            digests = list(pool.map(lambda i: push_blob(info, token, i, size, pattern), range(args.blobs)))
        print(f"setup: {args.blobs} blobs, {total / 1e9:.2f} GB pushed in {time.monotonic() - started:.1f} s")
        store = open_store(settings)
        store.apply([BlobPresence(REPOSITORY, digest, True) for digest in digests])
        registries = Registries.from_settings(settings, timeout=120)
        ok = True
        try:
            unlimited = Verifier(store, registries.local, RateLimiter(0), trust=60)
            ok &= print_pass("pass, no rate limit", *timed_pass(unlimited), total)
            if args.default_rate:
                limited = Verifier(store, registries.local, RateLimiter(DEFAULT_RATE), trust=60)
                label = f"pass at the default {DEFAULT_RATE / 2**20:.0f} MiB/s"
                ok &= print_pass(label, *timed_pass(limited), total)
        finally:
            registries.close()
            store.close()
        return 0 if ok else 1
    finally:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
