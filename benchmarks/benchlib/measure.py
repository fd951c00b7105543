"""Measured runs: one wrk run with the service's metrics and CPU use around it, grouped into phases."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchlib.common import PACED_RATE_TOLERANCE
from benchlib.cpu import CpuUse, compare_cpu, sample_cpu_seconds
from benchlib.service_metrics import MetricsSnapshot, ServerSide, compare_metrics, read_metrics
from benchlib.site import Site, ensure_service_alive
from benchlib.wrk import Load, WrkResult, run_wrk


@dataclass
class RunResult:
    """One measured wrk run and what the service counted meanwhile."""

    label: str
    load: Load
    wrk: WrkResult
    server: ServerSide
    cpu: CpuUse
    errors: list[str]
    wrk_output: str
    before: MetricsSnapshot
    after: MetricsSnapshot

    @property
    def achieved_share(self) -> float | None:
        """The achieved rate as a share of the paced rate (None when closed-loop)."""
        return self.wrk.requests_per_s / self.load.rate if self.load.rate else None

    @property
    def fell_short(self) -> bool:
        """A paced run that delivered less than the requested rate, beyond the tolerance."""
        share = self.achieved_share
        return share is not None and share < 1.0 - PACED_RATE_TOLERANCE


@dataclass
class Phase:
    """The runs of one load against the same running service."""

    load: Load
    script: Path
    expected: tuple[str, str, str]  # the one decision the load may get (route, reason, operation)
    runs: list[RunResult] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.load.phase

    def median(self, value: Callable[[RunResult], float]) -> float:
        return median_of(self.runs, value)

    def median_cpu(self) -> dict[str, float]:
        labels = self.runs[0].cpu.shares if self.runs else {}
        return {label: self.median(cpu_share_of(label)) for label in labels}

    def pooled_server_side(self) -> ServerSide:
        """Decisions and the handler histogram over all of the phase's runs together."""
        return compare_metrics(self.runs[0].before, self.runs[-1].after, self.expected)

    def errors(self) -> list[str]:
        return [f"{self.name} run {run.label}: {error}" for run in self.runs for error in run.errors]


def median_of(runs: Sequence[RunResult], value: Callable[[RunResult], float]) -> float:
    return statistics.median(value(run) for run in runs)


def cpu_share_of(label: str) -> Callable[[RunResult], float]:
    return lambda run: run.cpu.shares.get(label, 0.0)


def warm_up(site: Site, phase: Phase, seconds: int) -> None:
    """Load the service once before measuring: every worker verifies and caches the token, opens Redis."""
    print(f"warming up for {seconds} s ({phase.load.describe()}) ...", flush=True)
    site.refresh_index()
    run_wrk(site.auth_url, phase.script, phase.load, seconds)
    ensure_service_alive(site.service)


def measure_run(site: Site, phase: Phase, duration: int, label: str) -> RunResult:
    """One wrk run of ``phase``'s load with /metrics and the CPU counters read before and after."""
    site.refresh_index()
    before = read_metrics(site.base_url)
    pids = site.process_ids()
    cpu_before, started = sample_cpu_seconds(pids), time.monotonic()
    result, output = run_wrk(site.auth_url, phase.script, phase.load, duration)
    cpu = compare_cpu(cpu_before, sample_cpu_seconds(pids), time.monotonic() - started)
    alive = site.is_alive()
    after = read_metrics(site.base_url) if alive else before
    server = compare_metrics(before, after, phase.expected) if alive else ServerSide()
    errors = judge_errors(result, server, alive, "/".join(phase.expected[:2]))
    return RunResult(label, phase.load, result, server, cpu, errors, output, before, after)


def judge_errors(
    result: WrkResult, server: ServerSide, service_alive: bool, answer: str = "local/blob-local"
) -> list[str]:
    """Everything that makes a run's numbers meaningless: failed requests or decisions other than ``answer``."""
    errors = []
    if result.non_2xx:
        errors.append(f"{result.non_2xx} non-2xx answers")
    if result.socket_error_total:
        errors.append("socket errors " + ", ".join(f"{k} {v}" for k, v in result.socket_errors.items() if v))
    if server.unexpected_decisions:
        errors.append(f"decisions other than {answer}: " + json.dumps(server.unexpected_decisions))
    if server.index_errors:
        errors.append(f"{server.index_errors} index errors (Redis lookups failed or timed out)")
    if not service_alive:
        errors.append("the service exited during the run")
    return errors
