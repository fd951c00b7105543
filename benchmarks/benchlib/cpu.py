"""CPU each process used during a run, from the devstack's /proc reading (``cpu_seconds``)."""

from __future__ import annotations

import resource
from collections.abc import Mapping
from dataclasses import dataclass

from geo_route.devstack.processes import cpu_seconds


@dataclass
class CpuUse:
    """Per cent of one CPU each process used during a run (wall-clock based)."""

    shares: dict[str, float]
    uneven_workers: bool


def sample_cpu_seconds(pids: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds so far of each named process, plus ``wrk``: the reaped children's total (wrk is the only one)."""
    seconds = {label: cpu_seconds(pid, with_descendants=False) for label, pid in pids.items()}
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds["wrk"] = children.ru_utime + children.ru_stime
    return seconds


def compare_cpu(before: Mapping[str, float], after: Mapping[str, float], elapsed: float) -> CpuUse:
    shares = {label: 100.0 * (after[label] - before[label]) / elapsed for label in after}
    workers = [share for label, share in shares.items() if label.startswith("worker")]
    uneven = len(workers) > 1 and max(workers) > 20.0 and min(workers) < 0.5 * max(workers)
    return CpuUse(shares, uneven)
