"""The fault matrix's machinery: concurrent skopeo pulls through the site while a fault is applied.

``PullLoad`` keeps ``workers`` threads pulling their targets through NGINX with a real skopeo, each
pull into a fresh OCI layout with a hard time limit (a hung pull is killed and counted). skopeo
verifies every blob against its digest, so a pull that returns is byte-correct for the manifest
digest it reports; the matrix checks that digest against what the primary published.

``Outcome`` is one row of the matrix (docs/reliability.md): pulls, failures, wrong content, the
slowest pull, the routes NGINX took while the fault was on, and how the index recovered.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from geo_route.devstack.client import StackClient, parse_access_log_line
from geo_route.devstack.skopeo import Skopeo, SkopeoError, docker_reference
from geo_route.errors import IndexUnavailable
from geo_route.index.model import IndexQuery, QueryKind

PULL_BOUND = 30.0  # seconds: a pull that takes longer counts as hung


@dataclass(frozen=True)
class Pull:
    target: str  # repository:tag
    started: float  # time.monotonic()
    seconds: float
    digest: str
    error: str

    @property
    def ended(self) -> float:
        return self.started + self.seconds


class PullLoad:
    """``with PullLoad(client, targets, workdir) as load: ...``; ``load.pulls`` afterwards."""

    def __init__(self, client: StackClient, targets: Sequence[str], workdir: Path, workers: int = 3) -> None:
        self.client = client
        self.targets = list(targets)
        self.workdir = workdir
        self.workers = workers
        self.pulls: list[Pull] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []

    def __enter__(self) -> PullLoad:
        for number in range(self.workers):
            thread = threading.Thread(target=self.pull_forever, args=(number,), daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(PULL_BOUND + 10)

    def pull_forever(self, number: int) -> None:
        skopeo = Skopeo(self.workdir / f"worker-{number}", timeout=PULL_BOUND)
        count = 0
        while not self.stopping.is_set():
            target = self.targets[(number + count) % len(self.targets)]
            count += 1
            self.record(self.pull_once(skopeo, target, self.workdir / f"worker-{number}" / f"pull-{count}"))

    def pull_once(self, skopeo: Skopeo, target: str, layout: Path) -> Pull:
        repository, tag = target.rsplit(":", 1)
        source = docker_reference(self.client.secondary, repository, tag)
        started = time.monotonic()
        digest, error = "", ""
        try:
            digest = skopeo.copy(source, f"oci:{layout}:{tag}", src_creds=self.client.credentials())
        except SkopeoError as exc:
            error = str(exc)
        finally:
            shutil.rmtree(layout, ignore_errors=True)
        return Pull(target, started, time.monotonic() - started, digest, error)

    def record(self, pull: Pull) -> None:
        with self.lock:
            self.pulls.append(pull)

    def snapshot(self) -> list[Pull]:
        with self.lock:
            return list(self.pulls)

    def wait_for_pulls(self, count: int, *, started_after: float = 0.0, timeout: float = 60.0) -> None:
        """Wait until ``count`` pulls that started after ``started_after`` (monotonic) have finished."""
        deadline = time.monotonic() + timeout
        while sum(1 for p in self.snapshot() if p.started > started_after) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} pulls finished within {timeout}s")
            time.sleep(0.05)


@dataclass
class Outcome:
    """One row of the fault matrix."""

    cell: str
    fault: str
    pulls: int = 0
    failed: int = 0
    allowed_failures: int = 0
    wrong_content: int = 0
    stale: int = 0
    slowest_pull_s: float = 0.0
    routes_during_fault: dict[str, int] = field(default_factory=dict)
    recovery: str = ""
    fault_ended: float = 0.0  # time.monotonic() when the fault was lifted (the recovery began)
    index_correct_after_s: float = -1.0  # seconds from fault_ended
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.failed == self.allowed_failures
            and self.wrong_content == 0
            and self.stale == 0
            and self.slowest_pull_s <= PULL_BOUND
            and self.index_correct_after_s >= 0
        )

    def as_json(self) -> dict[str, object]:
        return {**asdict(self), "ok": self.ok}


def judge_pulls(
    outcome: Outcome,
    pulls: Sequence[Pull],
    published: dict[str, set[str]],
    failure_allowed: Callable[[Pull], bool] = lambda pull: False,
) -> None:
    """Count failures (unless allowed), wrong content (a digest the primary never published for that
    tag) and the slowest pull."""
    outcome.pulls = len(pulls)
    outcome.slowest_pull_s = round(max((p.seconds for p in pulls), default=0.0), 2)
    for pull in pulls:
        if pull.error:
            outcome.failed += 1
            if failure_allowed(pull):
                outcome.allowed_failures += 1
            if len(outcome.failures) < 3:
                outcome.failures.append(f"{pull.target}: {pull.error[-300:]}")
        elif pull.digest not in published[pull.target]:
            outcome.wrong_content += 1


def routes_between(client: StackClient, since: int, until: int) -> dict[str, int]:
    """NGINX routes of the pull requests logged between two byte offsets of the access log."""
    with open(client.info.nginx_access_log, "rb") as log:
        log.seek(since)
        lines = log.read(max(0, until - since)).decode("utf-8", "replace").splitlines()
    counts: Counter[str] = Counter()
    for line in lines:
        if not line.endswith("}"):
            continue
        entry = parse_access_log_line(line)
        if "/manifests/" in entry.uri or "/blobs/" in entry.uri:
            counts[f"{entry.route or 'nginx'}/{entry.status}"] += 1
    return dict(sorted(counts.items()))


@dataclass
class Expected:
    """What the index must say once recovered: no pin to anything but the primary's digest, pins for
    replicated tags, and content present locally exactly when it is."""

    pins: dict[str, str] = field(default_factory=dict)  # repository:tag → the digest the primary names
    pin_required: set[str] = field(default_factory=set)  # replicated tags: must be pinned
    present: dict[tuple[str, str], bool] = field(default_factory=dict)  # (repository, digest) → here?


def index_problems(client: StackClient, expected: Expected) -> list[str]:
    try:
        return compare_index(client, expected)
    except IndexUnavailable as exc:  # the test's own connection sees the restart too
        return [str(exc)]


def compare_index(client: StackClient, expected: Expected) -> list[str]:
    problems = []
    for target, digest in expected.pins.items():
        repository, tag = target.rsplit(":", 1)
        view = client.index.lookup(IndexQuery(QueryKind.TAG, repository, tag))
        if not view.available:
            return ["index unavailable"]
        if not view.pinned_digest and target not in expected.pin_required:
            continue  # unpinned: routed to the primary, which is right
        if view.pinned_digest != digest:
            problems.append(f"{target} pinned to {view.pinned_digest or 'nothing'}, the primary says {digest[:19]}")
    for (repository, digest), present in expected.present.items():
        blob = client.index.lookup(IndexQuery(QueryKind.BLOB, repository, digest))
        manifest = client.index.lookup(IndexQuery(QueryKind.MANIFEST, repository, digest))
        if (blob.present or manifest.present) != present:
            problems.append(f"{repository}@{digest[:19]} present={not present}, expected {present}")
    return problems


def wait_for_index(
    client: StackClient, expected: Expected, since: float, timeout: float = 20.0
) -> tuple[float, list[str]]:
    """Seconds from ``since`` (monotonic) until the index matches ``expected``, checked every 50 ms
    (-1 and the problems if it does not within ``timeout``)."""
    deadline = time.monotonic() + timeout
    problems = index_problems(client, expected)
    while problems:
        if time.monotonic() > deadline:
            return -1.0, problems
        time.sleep(0.05)
        problems = index_problems(client, expected)
    return round(time.monotonic() - since, 2), []


def run_reconcile(site_file: str, log: Path) -> None:
    """What an operator runs after an outage: ``geo-route reconcile --once``."""
    with open(log, "ab") as output:
        subprocess.run(
            [sys.executable, "-m", "geo_route.cli", "reconcile", "-c", site_file, "--once"],
            stdout=output,
            stderr=subprocess.STDOUT,
            timeout=120,
            check=True,
        )


MATRIX_BEGIN = "<!-- fault-matrix:begin (written by tests/test_faults.py with FAULTS_REPORT=docs/reliability.md) -->"
MATRIX_END = "<!-- fault-matrix:end -->"


def render_matrix(outcomes: Sequence[Outcome], seconds: float) -> str:
    lines = [
        MATRIX_BEGIN,
        "",
        f"Measured by `FAULTS_REPORT=docs/reliability.md .venv/bin/python -m pytest -m faults` in {seconds:.0f} s "
        f"(3 concurrent skopeo pulls through NGINX during every fault; a pull longer than {PULL_BOUND:.0f} s "
        "counts as hung). *Index correct again* counts from the moment the fault was lifted; "
        "the recovery step named there is part of that time.",
        "",
        "| fault | pulls | failed | wrong content | stale | slowest pull | routes while faulty "
        "| index correct again | ok |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        routes = ", ".join(f"{k} {v}" for k, v in o.routes_during_fault.items()) or "-"
        failed = f"{o.failed}" + (f" (all expected: {o.allowed_failures})" if o.allowed_failures else "")
        index = f"{o.index_correct_after_s:.1f} s ({o.recovery})" if o.index_correct_after_s >= 0 else "NO"
        lines.append(
            f"| **{o.cell}**: {o.fault} | {o.pulls} | {failed} | {o.wrong_content} | {o.stale} | "
            f"{o.slowest_pull_s:.2f} s | {routes} | {index} | {'yes' if o.ok else '**NO**'} |"
        )
    notes = [f"- **{o.cell}**: {note}" for o in outcomes for note in o.notes]
    if notes:
        lines += ["", *notes]
    lines += ["", MATRIX_END]
    return "\n".join(lines)


def write_matrix(path: Path, outcomes: Sequence[Outcome], seconds: float) -> None:
    """Replace the matrix between the markers in ``path`` (or append it), and a JSON copy beside it."""
    table = render_matrix(outcomes, seconds)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if MATRIX_BEGIN in text and MATRIX_END in text:
        head, rest = text.split(MATRIX_BEGIN, 1)
        text = head + table + rest.split(MATRIX_END, 1)[1]
    else:
        text = text + ("\n" if text else "") + table + "\n"
    path.write_text(text, encoding="utf-8")
    json_path = path.with_suffix(".faults.json")
    json_path.write_text(json.dumps([o.as_json() for o in outcomes], indent=2) + "\n", encoding="utf-8")
