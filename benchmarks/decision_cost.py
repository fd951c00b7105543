"""CPU per ``GET /auth`` decision, in process: the service's own WSGI app on a real Redis, no HTTP.

``auth_bench.py`` measures the service as NGINX sees it (gunicorn, wrk, 32 connections); on a
machine shared with other work its throughput and tail swing by tens of percent. This measures
what a decision costs instead, which sharing the CPUs disturbs far less: the app from
``create_app(settings)`` is called directly with the environ NGINX's subrequest produces (the same
token, URI and ``Accept`` as ``auth_bench.py --request``), ``--calls`` times on one thread, and the
thread's CPU time (``time.thread_time``: Python, the WSGI fast path, token cache, classification,
routing, metrics and the socket calls) and Redis's own CPU time (``INFO cpu``) are divided by the
number of decisions. Every answer is checked: the expected local answer, or the block fails.

Comparing commits: ``--tree DIR`` (repeatable) runs each block in a subprocess with
``PYTHONPATH=DIR``, so each tree's own ``geo_route`` answers (e.g. ``git worktree add /tmp/wt-old
<commit>``); ``.`` is the ``geo_route`` this interpreter imports. Blocks run interleaved (every
tree, every request kind, then again) ``--repeat`` times; medians and ranges are printed.

Usage:
    .venv/bin/python benchmarks/decision_cost.py [--tree DIR ...] [--request blob|manifest|tag ...]
        [--calls N] [--repeat N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib

import redis
from benchlib.common import REQUESTS, BenchError, BenchRequest, build_auth_headers
from benchlib.site import fill_index, mint_token, write_site_config

import geo_route
from geo_route.config import ServerSettings, load_settings
from geo_route.devstack.keys import generate_signing_key
from geo_route.devstack.redis_server import RedisProcess
from geo_route.web.app import create_app

WARM_UP_CALLS = 2000


def run_block(request: BenchRequest, calls: int) -> dict[str, Any]:
    """One block in this process: a private Redis and app, ``calls`` decisions measured."""
    directory = Path(tempfile.mkdtemp(prefix="geo-route-cost-"))
    redis_process = RedisProcess(directory / "redis").start()
    try:
        keys = generate_signing_key(directory / "keys")
        site_file = write_site_config(directory, ServerSettings(), redis_process.url, keys.certificate)
        settings = load_settings(site_file, environ={})
        fill_index(settings)
        app = create_app(settings)
        call = make_caller(app, build_auth_headers(mint_token(keys), request), request)
        for _ in range(WARM_UP_CALLS):
            call()
        server = redis.Redis(host="127.0.0.1", port=redis_process.port)
        redis_before, cpu_before, wall_before = redis_cpu(server), time.thread_time(), time.perf_counter()
        for _ in range(calls):
            call()
        cpu, wall = time.thread_time() - cpu_before, time.perf_counter() - wall_before
        redis_seconds = redis_cpu(server) - redis_before
        server.close()
    finally:
        redis_process.stop()
        shutil.rmtree(directory, ignore_errors=True)
    return {
        "request": request.name,
        "geo_route": str(Path(geo_route.__file__).parent),
        "calls": calls,
        "python_cpu_us": 1e6 * cpu / calls,
        "redis_cpu_us": 1e6 * redis_seconds / calls,
        "wall_us": 1e6 * wall / calls,
    }


def make_caller(app: Any, headers: dict[str, str], request: BenchRequest) -> Callable[[], None]:
    """One decision per call, checked against ``request``'s expected answer."""
    environ_base = {"REQUEST_METHOD": "GET", "PATH_INFO": "/auth", "SERVER_NAME": "bench", "SERVER_PORT": "80"}
    environ_base |= {"HTTP_" + name.upper().replace("-", "_"): value for name, value in headers.items()}
    answers: list[tuple[str, list[tuple[str, str]]]] = []

    def start_response(status: str, response_headers: list[tuple[str, str]], *_: Any) -> None:
        answers.append((status, response_headers))

    def call() -> None:
        for _ in app(dict(environ_base), start_response):
            pass
        status, response_headers = answers.pop()
        found = dict(response_headers)
        answer = (status.split(" ", 1)[0], found.get("X-Geo-Route"), found.get("X-Geo-Reason"))
        if answer != ("200", *request.decision[:2]):
            raise BenchError(f"GET /auth answered {answer}, expected 200 {request.answer}")

    return call


def redis_cpu(server: redis.Redis) -> float:
    info = server.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def run_in_tree(tree: str, request: str, calls: int) -> dict[str, Any]:
    environment = dict(os.environ)
    if tree != ".":
        environment["PYTHONPATH"] = str(Path(tree).resolve())
    command = [sys.executable, __file__, "--block", request, "--calls", str(calls)]
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, cwd="/", check=False)
    if completed.returncode != 0:
        raise BenchError(f"block {request} in {tree} failed:\n{completed.stdout}{completed.stderr}")
    return dict(json.loads(completed.stdout.strip().splitlines()[-1]))


def summarise(values: list[float]) -> str:
    return f"{statistics.median(values):7.1f} ({min(values):.1f}-{max(values):.1f})"


def print_table(results: list[dict[str, Any]], trees: list[str], requests: list[str]) -> None:
    print(
        f"\n{'request':<9} {'tree':<28} {'python CPU us':>22} {'redis CPU us':>22} {'total CPU us':>22} {'wall us':>22}"
    )
    for request in requests:
        for tree in trees:
            blocks = [r for r in results if r["tree"] == tree and r["request"] == request]
            total = [r["python_cpu_us"] + r["redis_cpu_us"] for r in blocks]
            print(
                f"{request:<9} {tree[-28:]:<28} {summarise([r['python_cpu_us'] for r in blocks]):>22} "
                f"{summarise([r['redis_cpu_us'] for r in blocks]):>22} {summarise(total):>22} "
                f"{summarise([r['wall_us'] for r in blocks]):>22}"
            )
    print("median (min-max) over the blocks, microseconds per decision; wall is single-threaded latency")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", help="a checkout whose geo_route to measure (repeatable)")
    parser.add_argument("--request", action="append", choices=tuple(REQUESTS), help="(repeatable; default all)")
    parser.add_argument("--calls", type=int, default=20_000, help="decisions per block (default 20,000)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of blocks (default 3)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every block to FILE")
    parser.add_argument("--block", choices=tuple(REQUESTS), help=argparse.SUPPRESS)  # one block, JSON on stdout
    args = parser.parse_args(argv)
    try:
        if args.block:
            print(json.dumps(run_block(REQUESTS[args.block], args.calls)))
            return 0
        trees, requests = args.tree or ["."], args.request or list(REQUESTS)
        results = []
        for round_number in range(1, args.repeat + 1):
            for request in requests:
                for tree in trees:
                    block = run_in_tree(tree, request, args.calls) | {"tree": tree, "round": round_number}
                    results.append(block)
                    print(
                        f"round {round_number} {request:<8} {block['geo_route']}: python {block['python_cpu_us']:.1f} "
                        f"redis {block['redis_cpu_us']:.1f} wall {block['wall_us']:.1f} us/decision",
                        flush=True,
                    )
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 2
    print_table(results, trees, requests)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
