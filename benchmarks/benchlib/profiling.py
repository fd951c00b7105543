"""Optional: sample one worker with py-spy and summarise the collapsed stacks."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import geo_route
from benchlib.common import BenchError

PROJECT_DIR = str(Path(geo_route.__file__).resolve().parents[1]) + "/"
STDLIB_DIR = re.compile(r"/lib/python3\.\d+/")
STARTUP_FILES = (
    "gunicorn/arbiter.py",
    "gunicorn/app/base.py",
    "geo_route/cli.py",
    "geo_route/server.py",
    "bin/geo-route",
)


def start_profiler(pid: int, seconds: int, output: Path) -> subprocess.Popen[bytes]:
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        raise BenchError("--profile needs py-spy (pip install py-spy into this environment)")
    command = [
        py_spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "200",
        "--format", "raw", "--function", "--full-filenames", "--output", str(output),
    ]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def print_profile(profiler: subprocess.Popen[bytes], raw_path: Path, pid: int) -> None:
    try:
        _, stderr = profiler.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        print("\npy-spy did not finish; no profile", file=sys.stderr)
        return
    print(f"\npy-spy profile of worker {pid} during the profile run (sampling slows that worker down):")
    if profiler.returncode != 0 or not raw_path.exists():
        print(f"  py-spy failed ({profiler.returncode}): {stderr.decode(errors='replace').strip()}")
        return
    for line in summarize_profile(raw_path):
        print(line)
    print(f"  collapsed stacks kept in {raw_path} (flamegraph.pl or speedscope read them)")


def summarize_profile(raw_path: Path, top: int = 15) -> Iterator[str]:
    """Self and inclusive shares from py-spy's collapsed stacks (``frame;frame;... count``)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    for stack, count in read_stacks(raw_path):
        own[format_frame(*stack[-1])] += count
        by_package[package_of(stack[-1][1])] += count
        for function, path in set(stack):
            if not package_of(path).startswith("stdlib") and not path.endswith(STARTUP_FILES):
                inclusive[format_frame(function, path)] += count
    total = sum(by_package.values())
    if not total:
        yield "  (py-spy recorded no samples)"
        return
    yield f"  {total} samples of the worker's running or runnable threads (blocked waits excluded)"
    yield "  self time by package:"
    yield from (f"    {100 * n / total:5.1f}%  {name}" for name, n in by_package.most_common(10))
    yield "  self time by function:"
    yield from (f"    {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top))
    yield "  inclusive time by function (stdlib and start-up frames left out):"
    yield from (f"    {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top + 10))


def read_stacks(raw_path: Path) -> Iterator[tuple[list[tuple[str, str]], int]]:
    """Each collapsed stack as (function, path) frames, outermost first, with its sample count."""
    for line in raw_path.read_text(encoding="utf-8").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if stack and count_text.isdigit():
            yield [split_frame(frame) for frame in stack.split(";")], int(count_text)


def split_frame(frame: str) -> tuple[str, str]:
    """``handle (/x/gunicorn/workers/gthread.py:123)`` -> (``handle``, ``/x/gunicorn/workers/gthread.py``)."""
    match = re.fullmatch(r"(.*) \((.*?)(?::\d+)?\)", frame)
    return (match.group(1), match.group(2)) if match else (frame, "")


def format_frame(function: str, path: str) -> str:
    return f"{function} ({relative_path(path)})"


def relative_path(path: str) -> str:
    """The path below site-packages, the stdlib directory or the project."""
    for marker in ("site-packages/", PROJECT_DIR):
        if marker in path:
            return path.split(marker, 1)[1]
    parts = STDLIB_DIR.split(path, maxsplit=1)
    return parts[1] if len(parts) == 2 else path


def package_of(path: str) -> str:
    if "site-packages/" in path:
        return relative_path(path).split("/", 1)[0].removesuffix(".py")
    if "/geo_route/" in path:
        return "geo_route"
    if STDLIB_DIR.search(path):
        return "stdlib " + relative_path(path).split("/", 1)[0].removesuffix(".py")
    return path or "?"
