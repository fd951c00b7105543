"""What the decision path pays for ``geo_route_tag_pin_age_seconds``: one histogram observation per
tag read that found a pin (``web/auth.py``), in process and as gunicorn runs it (prometheus_client's
multiprocess mode: values in memory-mapped files, ``PROMETHEUS_MULTIPROC_DIR``). Thread CPU time per
observation, median of ``--repeat`` rounds; compare with ``decision_cost.py``'s CPU per decision.

Usage:
    .venv/bin/python benchmarks/pin_age_cost.py [--calls N] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROUND = """
import json, time
from geo_route.web.metrics import Metrics
metrics = Metrics()
ages = [float(i % 400) for i in range(1000)]
for age in ages:
    metrics.observe_pin_age(age)
calls = {calls}
started = time.thread_time()
for i in range(calls):
    metrics.observe_pin_age(ages[i % 1000])
print(json.dumps((time.thread_time() - started) / calls * 1e6))
"""


def measure(calls: int, multiprocess: bool) -> float:
    """Microseconds of CPU per observation, in a fresh interpreter (the mode is chosen at import)."""
    environ = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with tempfile.TemporaryDirectory(prefix="geo-route-pin-age-") as directory:
        if multiprocess:
            environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        done = subprocess.run(
            [sys.executable, "-c", ROUND.format(calls=calls)], env=environ, capture_output=True, text=True, check=True
        )
    return float(json.loads(done.stdout))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    started = time.monotonic()
    for mode, multiprocess in (("in process", False), ("multiprocess (gunicorn)", True)):
        samples = [measure(args.calls, multiprocess) for _ in range(args.repeat)]
        low, high = min(samples), max(samples)
        print(f"pin age observation, {mode:<24} {statistics.median(samples):6.2f} us CPU ({low:.2f}-{high:.2f})")
    print(f"({args.repeat} rounds of {args.calls} observations, {time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
