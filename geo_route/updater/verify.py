"""Verified local content (scrub): read the local registry's content back and check its digests.

A registry stores content under its digest and never checks it again: one flipped byte on disk is
served as it is, only the client notices (a digest mismatch), and NGINX cannot fall back after a
200. The verifier closes that window from two sides (docs/reliability.md, "Corrupted local content"):

- **The pass**: every manifest and blob the index holds as local (manifests first in each
  repository, and every quarantined digest) is read through the local registry's API and hashed,
  at most ``updater.verify_bytes_per_second`` (token bucket shared by every reader of one
  process). A pass starts every ``updater.verify_interval`` seconds (at once after a longer one);
  the repository last finished is kept in the index (``verify:cursor``), so a restarted updater
  carries on where it stopped.
- **Memory bounded whatever the site's size**: a repository's digests come from the index a page
  at a time (``PAGE_DIGESTS``, ``SSCAN``), and content several repositories link is read once
  while its digest is among the ``SEEN_DIGESTS`` the pass read last (least recently met first out:
  a layer many repositories share keeps being met, so it stays; one met again after that many
  others is read again, which costs a read, never a verdict). Only a read that concluded (intact
  or mismatch) is remembered: a 404 or a failed read in one repository says nothing of another's
  link. A pass that held every digest it met, and each repository whole, grew the updater with
  the site: +17 MiB while one repository of 70,000 blobs was read (``benchmarks/load.py``'s
  events), gigabytes at docs/capacity.md's 500 million entries.
- **Suspects first**: a client that fetches the same content from the same address again within
  ``routing.refetch_window`` (NGINX remembers complete local answers) is sent to the primary and
  the content is queued (``verify:suspects``); the verifier reads queued content before the next
  item of the pass.

A mismatch quarantines the digest (``ContentVerified(intact=False)``: never local from any
repository until a later read matches), is logged and counted. A read that matches lifts a
quarantine. A 404 is left to reconciliation and NGINX's fallback (the index may simply be behind);
a transport error is counted and the content read again next pass. One verifier runs per site at a
time (the ``verify`` lease, renewed while it lives).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from geo_route.errors import GeoRouteError, IndexUnavailable
from geo_route.index.model import ContentVerified, IndexUpdate, record_status_of
from geo_route.lru import Lru
from geo_route.updater.reconcile import LeaseKeeper
from geo_route.updater.registry_client import RegistryError

LOCK_NAME = "verify"
PAGE_DIGESTS = 500  # a repository's digests read from the index at a time (SSCAN COUNT)
SEEN_DIGESTS = 4096  # digests read that a pass remembers, to read content several repositories link once
SUSPECT_BATCH = 16
SUSPECTS_POLL = 0.1  # seconds between looks at an empty suspects queue: a retry comes seconds later
MAX_SAMPLES = 10
HASHES = {"sha256": hashlib.sha256, "sha512": hashlib.sha512}
log = logging.getLogger("geo_route.verify")


class Result(Enum):
    INTACT = "intact"
    MISMATCH = "mismatch"
    MISSING = "missing"  # the local registry answered 404: reconciliation's business
    ERROR = "error"
    SKIPPED = "skipped"  # a digest algorithm this verifier cannot compute


# What a read concludes about the content itself, whichever repository links it: the content is
# read once per pass. A 404 or a failed read concludes nothing about another repository's link.
CONCLUSIVE = frozenset({Result.INTACT, Result.MISMATCH})


class ContentReader(Protocol):
    """The local registry, as the verifier reads it (``RegistryClient`` is one)."""

    def stream_content(self, repository: str, digest: str, *, manifest: bool, sink: Callable[[bytes], None]) -> bool:
        """Feed the content's bytes to ``sink``; False on 404."""


class VerifyStore(Protocol):
    def apply(self, updates: Iterable[IndexUpdate]) -> None: ...
    def repositories(self) -> set[str]: ...
    def local_digest_pages(self, repository: str, count: int) -> Iterable[list[tuple[str, bool]]]: ...
    def is_local_manifest(self, repository: str, digest: str) -> bool: ...
    def quarantined(self) -> dict[str, tuple[float, str]]: ...
    def claim_suspects(self, limit: int) -> list[tuple[str, str, bool]]: ...
    def verify_cursor(self) -> str: ...
    def set_verify_cursor(self, repository: str) -> None: ...


class RateLimiter:
    """A token bucket over bytes, shared by threads: ``take(n)`` sleeps until ``n`` bytes fit the
    rate (a burst of one second is allowed). ``bytes_per_second`` 0: no limit."""

    def __init__(
        self,
        bytes_per_second: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        self.rate = bytes_per_second
        self._clock = clock
        self._sleep = sleep
        self._allowance = bytes_per_second
        self._last = clock()
        self._lock = threading.Lock()

    def take(self, count: int) -> None:
        if self.rate <= 0:
            return
        with self._lock:
            now = self._clock()
            self._allowance = min(self.rate, self._allowance + (now - self._last) * self.rate) - count
            self._last = now
            wait = -self._allowance / self.rate if self._allowance < 0 else 0.0
        if wait > 0:
            self._sleep(wait)


@dataclass(frozen=True, slots=True)
class Check:
    result: Result
    size: int = 0
    actual: str = ""  # the digest of what was read (MISMATCH)
    problem: str = ""  # ERROR, SKIPPED


class Cancelled(GeoRouteError):
    """The verifier was asked to stop in the middle of a read."""


def check_content(
    reader: ContentReader,
    repository: str,
    digest: str,
    *,
    manifest: bool,
    limiter: RateLimiter,
    stop: threading.Event | None = None,
) -> Check:
    """Read one blob or manifest back and compare its digest (pure but for the reader and the
    limiter). ``stop`` set: the read ends at the next chunk, as an error (nothing is concluded)."""
    algorithm, _, expected = digest.partition(":")
    new_hash = HASHES.get(algorithm)
    if new_hash is None or not expected:
        return Check(Result.SKIPPED, problem=f"cannot verify a {algorithm or 'malformed'} digest")
    hasher = new_hash()
    size = 0

    def sink(chunk: bytes) -> None:
        nonlocal size
        if stop is not None and stop.is_set():
            raise Cancelled("stopped")
        limiter.take(len(chunk))
        hasher.update(chunk)
        size += len(chunk)

    try:
        found = reader.stream_content(repository, digest, manifest=manifest, sink=sink)
    except (RegistryError, Cancelled) as exc:
        return Check(Result.ERROR, size, problem=str(exc))
    if not found:
        return Check(Result.MISSING)
    actual = f"{algorithm}:{hasher.hexdigest()}"
    return Check(Result.INTACT, size) if actual == digest else Check(Result.MISMATCH, size, actual)


@dataclass
class VerifyReport:
    """What one pass (or ``reconcile --verify``) read and found."""

    manifests: int = 0
    blobs: int = 0
    bytes: int = 0
    results: Counter[str] = field(default_factory=Counter)
    mismatches: list[str] = field(default_factory=list)  # "repository@digest (read as actual, N bytes)"
    error_samples: list[str] = field(default_factory=list)
    suspects: int = 0
    quarantined: int = 0  # digests quarantined when the pass ended
    seconds: float = 0.0
    cancelled: bool = False
    locked: bool = False  # another verifier holds the lease: nothing done

    @property
    def ok(self) -> bool:
        return not (self.locked or self.cancelled) and self.results["mismatch"] == 0 and self.results["error"] == 0

    def record(self, repository: str, digest: str, manifest: bool, check: Check) -> None:
        self.results[check.result.value] += 1
        self.bytes += check.size
        if manifest:
            self.manifests += 1
        else:
            self.blobs += 1
        if check.result is Result.MISMATCH and len(self.mismatches) < MAX_SAMPLES:
            self.mismatches.append(f"{repository}@{digest} (read as {check.actual}, {check.size} bytes)")
        if check.result in (Result.ERROR, Result.SKIPPED) and len(self.error_samples) < MAX_SAMPLES:
            self.error_samples.append(f"{repository}@{digest}: {check.problem}")

    def status_fields(self) -> dict[str, float | int | str | bool]:
        """What ``geo-route status`` shows of the last pass (kept in the index)."""
        r = self.results
        return {
            "ok": self.ok,
            "cancelled": self.cancelled,
            "seconds": round(self.seconds, 3),
            "manifests": self.manifests,
            "blobs": self.blobs,
            "bytes": self.bytes,
            "mismatch": r["mismatch"],
            "missing": r["missing"],
            "errors": r["error"],
            "quarantined": self.quarantined,
        }

    def format(self) -> str:
        if self.locked:
            return "verify: another verifier is running (lease held); nothing done"
        status = "cancelled" if self.cancelled else ("ok" if self.ok else "found problems")
        rate = self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0
        r = self.results
        lines = [
            f"verify: {status} in {self.seconds:.2f} s, {self.manifests} manifests and {self.blobs} blobs, "
            f"{self.bytes} bytes ({rate:.1f} MB/s)",
            f"  intact {r['intact']}, mismatched {r['mismatch']} (quarantined), missing {r['missing']}, "
            f"errors {r['error']}, skipped {r['skipped']}; suspects verified {self.suspects}",
            f"  quarantined now {self.quarantined}",
        ]
        lines += [f"    mismatch {sample}" for sample in self.mismatches]
        lines += [f"    error {sample}" for sample in self.error_samples]
        return "\n".join(lines)


Observer = Callable[[Result, int, bool], None]  # (result, bytes, a suspect?) for metrics


class Verifier:
    """Reads content back and applies what it finds to the index."""

    def __init__(
        self,
        store: VerifyStore,
        reader: ContentReader,
        limiter: RateLimiter,
        *,
        trust: float,
        observe: Observer | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.store = store
        self.reader = reader
        self.limiter = limiter
        self.trust = trust
        self.observe = observe
        self.stop = stop  # set: a read in progress ends at its next chunk

    def verify(
        self, repository: str, digest: str, manifest: bool, *, suspect: bool = False, quarantined: bool = False
    ) -> Check:
        """Read one digest back and apply the verdict; ``quarantined``: it already was (logged quietly)."""
        check = check_content(self.reader, repository, digest, manifest=manifest, limiter=self.limiter, stop=self.stop)
        if check.result in (Result.INTACT, Result.MISMATCH):
            intact = check.result is Result.INTACT
            trust = self.trust if suspect else 0.0
            self.store.apply([ContentVerified(repository, digest, intact, trust, manifest)])
        if check.result is Result.MISMATCH and quarantined:
            log.info("verify: %s@%s is still corrupt (quarantined)", repository, digest)
        elif check.result is Result.MISMATCH:
            what = "manifest" if manifest else "blob"
            log.error(
                "verify: local %s %s@%s is corrupt (%d bytes read, digest %s): quarantined, served by the primary",
                what,
                repository,
                digest,
                check.size,
                check.actual,
            )
        elif check.result is Result.ERROR:
            log.warning("verify: cannot read %s@%s from the local registry: %s", repository, digest, check.problem)
        if self.observe is not None:
            self.observe(check.result, check.size, suspect)
        return check

    def verify_suspects(self, report: VerifyReport | None = None) -> int:
        """Verify what refetches queued, until the queue is empty; how many were verified."""
        done = 0
        while claimed := self.store.claim_suspects(SUSPECT_BATCH):
            for repository, digest, manifest in claimed:
                check = self.verify(repository, digest, manifest, suspect=True)
                if report is not None:
                    report.suspects += 1
                    report.record(repository, digest, manifest, check)
                done += 1
        return done

    def run_pass(self, stop: threading.Event, *, resume: bool = False, suspects: bool = True) -> VerifyReport:
        """One pass over every local manifest and blob the index knows (content several
        repositories link once, while it is among the ``SEEN_DIGESTS`` read last) and every
        quarantined digest. ``resume``: start after the repository the last pass finished and keep
        that cursor in the index (the background loop); otherwise from the start (the CLI).
        ``suspects``: serve the suspects queue between items (when no other thread does)."""
        started = time.monotonic()
        report = VerifyReport()
        seen: Lru[str, None] = Lru(SEEN_DIGESTS)  # what need not be read again from another repository
        start_after = self.store.verify_cursor() if resume else ""
        quarantined = self.store.quarantined()
        for digest, (_, repository) in sorted(quarantined.items()):
            if stop.is_set():
                break
            if suspects:
                self.verify_suspects(report)
            manifest = self.store.is_local_manifest(repository, digest)
            check = self.verify(repository, digest, manifest, quarantined=True)
            report.record(repository, digest, manifest, check)
            if check.result in CONCLUSIVE:
                seen.put(digest, None)
        for repository in sorted(name for name in self.store.repositories() if name > start_after):
            if stop.is_set():
                break
            for page in self.store.local_digest_pages(repository, PAGE_DIGESTS):
                for digest, manifest in page:
                    if stop.is_set():
                        break
                    if seen.touch(digest):
                        continue
                    if suspects:
                        self.verify_suspects(report)
                    check = self.verify(repository, digest, manifest)
                    report.record(repository, digest, manifest, check)
                    if check.result in CONCLUSIVE:
                        seen.put(digest, None)
                if stop.is_set():
                    break
            if resume and not stop.is_set():
                self.store.set_verify_cursor(repository)
        report.cancelled = stop.is_set()
        if resume and not report.cancelled:
            self.store.set_verify_cursor("")
        report.quarantined = len(self.store.quarantined())
        report.seconds = time.monotonic() - started
        record_status_of(self.store, "verify", report.status_fields())
        return report


class VerifyLoop:
    """The updater's background verification. Whoever holds the ``verify`` lease (renewed while it
    lives, so one verifier per site) runs passes back to back in one thread and serves the suspects
    queue in another, with a rate limit of its own: a suspect never waits for the pass's current
    item, however large. The others wait for the lease."""

    def __init__(
        self, store: LeaseStore, pass_verifier: Verifier, suspect_verifier: Verifier, *, lease: int, interval: float
    ) -> None:
        self.store = store
        self.interval = interval
        self.pass_verifier = pass_verifier
        self.suspect_verifier = suspect_verifier
        self.lease = lease
        self.last_report: VerifyReport | None = None
        self._stop = threading.Event()
        pass_verifier.stop = suspect_verifier.stop = self._stop  # stopping ends a long read at once
        self._thread = threading.Thread(target=self.run_until_stopped, name="geo-route-verify", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def run_until_stopped(self) -> None:
        while not self._stop.is_set():
            try:
                if self.store.try_lock(LOCK_NAME, self.lease):
                    try:
                        with LeaseKeeper(self.store, self.lease, LOCK_NAME):
                            self.run_while_holding()
                    finally:
                        self.store.unlock(LOCK_NAME)
            except GeoRouteError as exc:
                log.warning("verify: %s", exc)
            except Exception:  # the loop must outlive a bug in one pass
                log.exception("verify: unexpected error")
            self._stop.wait(self.lease / 2)

    def run_while_holding(self) -> None:
        suspects = threading.Thread(target=self.serve_suspects, name="geo-route-verify-suspects", daemon=True)
        suspects.start()
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                report = self.pass_verifier.run_pass(self._stop, resume=True, suspects=False)
                self.last_report = report
                level = logging.INFO if report.ok or report.cancelled else logging.WARNING
                log.log(level, "%s", report.format())
                self._stop.wait(max(0.0, started + self.interval - time.monotonic()))
        finally:
            suspects.join(timeout=10.0)

    def serve_suspects(self) -> None:
        while not self._stop.is_set():
            try:
                if self.suspect_verifier.verify_suspects():
                    continue
            except IndexUnavailable as exc:
                log.warning("verify: suspects: %s", exc)
            except Exception:  # keep serving suspects after a bug in one
                log.exception("verify: suspects: unexpected error")
            self._stop.wait(SUSPECTS_POLL)


class LeaseStore(Protocol):
    def try_lock(self, name: str, seconds: int) -> bool: ...
    def renew_lock(self, name: str, seconds: int) -> bool: ...
    def unlock(self, name: str) -> None: ...
