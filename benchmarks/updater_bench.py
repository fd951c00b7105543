"""Events applied per second by the index updater into a real Redis.

Two measurements, each against its own ``redis-server`` on a free loopback port:

* **http**: ``geo-route updater`` under gunicorn (the site's default: 1 sync worker, then 2), driven
  by ``wrk`` with one event per envelope, as Distribution 2.8 sends them (every request carries a
  fresh event id and digest, so nothing is skipped as a duplicate). This is what a registry sees.
* **apply**: the same parse → interpret → one-transaction apply path in-process, without HTTP, for
  envelopes of 1 and of 100 events: the ceiling of the index side.

Target (issue 4): at least 5,000 events/s on 2 cores. Usage:
    .venv/bin/python benchmarks/updater_bench.py [--duration 10] [--connections 16]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from geo_route.config import load_settings
from geo_route.devstack.processes import free_port, http_get, require_binary, start_until_ready
from geo_route.devstack.redis_server import RedisProcess
from geo_route.index.redis_store import RedisIndexStore
from geo_route.updater.notifications import Source, interpret_events, parse_envelope

TARGET = 5_000
SECRET = "Bearer benchmark-secret-0123456789"
LUA = """
local counter = 0
local thread_tag = tostring(math.random(1, 1e9))
request = function()
  counter = counter + 1
  local digest = string.format("sha256:%s%048x", string.format("%08x%08x", thread_tag % 0xffffffff, counter), 0)
  local body = '{"events":[{"id":"' .. thread_tag .. '-' .. counter .. '","timestamp":"2026-11-23T19:19:22.3Z",'
    .. '"action":"push","target":{"mediaType":"application/octet-stream","size":1024,"digest":"' .. digest
    .. '","repository":"bench/app"}}]}'
  return wrk.format("POST", "/events/local", {["Authorization"] = "{SECRET}",
    ["Content-Type"] = "application/vnd.docker.distribution.events.v1+json"}, body)
end
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per HTTP run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    require_binary("wrk")
    directory = Path(tempfile.mkdtemp(prefix="geo-route-updater-bench-"))
    redis = RedisProcess(directory / "redis").start()
    try:
        site = write_site(directory, redis.url)
        results = [measure_apply(site, batch) for batch in (1, 100)]
        results += [measure_http(directory, site, workers, args) for workers in (1, 2)]
    finally:
        redis.stop()
        shutil.rmtree(directory, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"target": TARGET, "results": dict(results)}, indent=2) + "\n")
    print("\ngeo-route updater benchmark (2 CPUs shared by the load, the updater and Redis)")
    for name, rate in results:
        verdict = "meets" if rate >= TARGET else "below"
        print(f"  {name:<46} {rate:>10,.0f} events/s  ({verdict} the {TARGET:,}/s target)")
    return 0


def write_site(directory: Path, redis_url: str) -> Path:
    bundle = directory / "bundle.pem"
    from geo_route.devstack.keys import generate_signing_key

    keys = generate_signing_key(directory / "keys")
    shutil.copy(keys.certificate, bundle)
    site = {
        "local_registry": {"url": "http://127.0.0.1:5000"},
        "primary": {"url": "http://127.0.0.1:5001"},
        "token": {"realm": "http://127.0.0.1:1/jwt/auth", "service": "s", "issuer": "i", "rootcertbundle": str(bundle)},
        "redis": {"url": redis_url},
        "updater": {
            "bind": [f"127.0.0.1:{free_port()}"],
            "local_secret": SECRET,
            "primary_secret": SECRET,
            "log_level": "warning",
        },
    }
    path = directory / "site.yaml"
    path.write_text(yaml.safe_dump(site))
    return path


def envelope(batch: int, start: int) -> bytes:
    events = [
        {
            "id": f"apply-{start + n}",
            "timestamp": "2026-11-23T19:19:22.3Z",
            "action": "push",
            "target": {
                "mediaType": "application/octet-stream",
                "digest": f"sha256:{start + n:064x}",
                "repository": "bench/apply",
            },
        }
        for n in range(batch)
    ]
    return json.dumps({"events": events}, indent=3).encode()


def measure_apply(site: Path, batch: int, events: int = 20_000) -> tuple[str, float]:
    store = RedisIndexStore(load_settings(site, environ={}).redis)
    bodies = [envelope(batch, n) for n in range(0, events, batch)]
    started = time.perf_counter()
    for body in bodies:
        outcomes = interpret_events(parse_envelope(body), Source.LOCAL, time.time())
        store.apply([update for outcome in outcomes for update in outcome.updates])
    rate = events / (time.perf_counter() - started)
    store.close()
    return f"in-process apply, {batch} event(s) per envelope", rate


def measure_http(directory: Path, site: Path, workers: int, args: argparse.Namespace) -> tuple[str, float]:
    env_site = directory / f"site-{workers}.yaml"
    data = yaml.safe_load(site.read_text())
    data["updater"]["workers"] = workers
    data["updater"]["bind"] = [f"127.0.0.1:{free_port()}"]
    env_site.write_text(yaml.safe_dump(data))
    url = f"http://{data['updater']['bind'][0]}"
    argv = [sys.executable, "-m", "geo_route.cli", "updater", "-c", str(env_site)]
    updater = start_until_ready(argv, directory, f"updater-{workers}", lambda: http_get(url + "/healthz")[0] == 200)
    try:
        script = directory / "events.lua"
        script.write_text(LUA.replace("{SECRET}", SECRET))
        command = ["wrk", "-t2", f"-c{args.connections}", f"-d{args.duration}s", "-s", str(script), url]
        output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=args.duration + 60).stdout
        if "Non-2xx" in output:
            raise SystemExit(f"the updater refused events:\n{output}")
        rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    finally:
        updater.stop()
    return f"HTTP, 1 event per envelope, {workers} worker(s)", rate


if __name__ == "__main__":
    raise SystemExit(main())
