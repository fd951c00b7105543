"""Memory of a process tree from /proc: VmRSS of a process and every process below it (gunicorn workers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from geo_route.devstack.processes import descendants


@dataclass(frozen=True)
class TreeMemory:
    """VmRSS in KiB of one process tree at one moment, per PID (the root first)."""

    root: int
    rss_kib: dict[int, int] = field(default_factory=dict)

    @property
    def total_kib(self) -> int:
        """The sum over the tree. Pages shared since fork are counted in every process that maps them."""
        return sum(self.rss_kib.values())

    @property
    def total_mib(self) -> float:
        return self.total_kib / 1024

    def describe(self) -> str:
        parts = " + ".join(f"{kib / 1024:.1f}" for kib in self.rss_kib.values())
        return f"{self.total_mib:6.1f} MiB ({parts})"

    def as_dict(self) -> dict[str, object]:
        return {"total_kib": self.total_kib, "per_pid_kib": {str(pid): kib for pid, kib in self.rss_kib.items()}}


def read_rss_kib(pid: int) -> int:
    """``VmRSS`` of ``/proc/PID/status`` in KiB; 0 when the process is gone or a kernel thread."""
    try:
        status = Path(f"/proc/{pid}/status").read_text(encoding="ascii", errors="replace")
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def tree_memory(root: int) -> TreeMemory:
    """VmRSS of ``root`` and its descendants (found through ``/proc/PID/task/*/children``)."""
    return TreeMemory(root, {pid: read_rss_kib(pid) for pid in [root, *descendants(root)]})
