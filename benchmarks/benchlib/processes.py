"""Child processes by PID: /proc reading, stopping, and the CPU each one used."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

STOP_TIMEOUT = 15.0
ProcessId = tuple[int, str]  # (pid, /proc start time): the start time guards against PID reuse


@dataclass
class CpuUse:
    """Per cent of one CPU each process used during a run (wall-clock based)."""

    shares: dict[str, float]
    uneven_workers: bool


def read_proc_stat(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: [0] state, [1] ppid, [11] utime, [12] stime, [19] start time."""
    text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    return text.rpartition(")")[2].split()


def list_children(parent: int) -> list[ProcessId]:
    """(pid, start time) of ``parent``'s children, from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = read_proc_stat(int(entry.name))
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent:
            children.append((int(entry.name), fields[19]))
    return sorted(children)


def stop_process(process: subprocess.Popen[bytes], name: str, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, wait, then SIGKILL: only this process, by its PID."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        warn(f"{name} (pid {process.pid}) ignored SIGTERM for {timeout:.0f} s; sending SIGKILL")
        process.kill()
        process.wait(5)


def kill_survivors(processes: Iterable[ProcessId], name: str) -> None:
    """SIGKILL each listed process that still runs (same PID and start time, not a zombie)."""
    for pid, started in processes:
        try:
            fields = read_proc_stat(pid)
        except (OSError, IndexError):
            continue
        if fields[19] == started and fields[0] != "Z":
            warn(f"{name} {pid} outlived its parent; sending SIGKILL")
            os.kill(pid, signal.SIGKILL)


def read_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"({path.name} unreadable)"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else f"({path.name} is empty)"


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def sample_cpu_seconds(pids: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds so far of each named process, plus ``wrk``: the reaped children's total (wrk is the only one)."""
    ticks = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for label, pid in pids.items():
        try:
            fields = read_proc_stat(pid)
            seconds[label] = (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, IndexError):
            seconds[label] = 0.0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds["wrk"] = children.ru_utime + children.ru_stime
    return seconds


def compare_cpu(before: Mapping[str, float], after: Mapping[str, float], elapsed: float) -> CpuUse:
    shares = {label: 100.0 * (after[label] - before[label]) / elapsed for label in after}
    workers = [share for label, share in shares.items() if label.startswith("worker")]
    uneven = len(workers) > 1 and max(workers) > 20.0 and min(workers) < 0.5 * max(workers)
    return CpuUse(shares, uneven)
