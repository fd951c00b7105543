"""Run every geo-route benchmark and write ``docs/benchmarks.md`` with PNG plots in ``docs/img/``.

One command (after ``bash script/bootstrap``)::

    .venv/bin/python benchmarks/run_all.py            # full run (several minutes)
    .venv/bin/python benchmarks/run_all.py --quick    # smoke run, under 2 minutes

Each benchmark is its own script with ``--json``; this runner calls them one after another (they
would disturb each other's numbers on 2 cores), collects their JSON and renders the report. A
benchmark that fails is reported as failed; a missed target is reported with its measured figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
IMAGES = DOCS / "img"


@dataclass
class Outcome:
    name: str
    command: list[str]
    seconds: float
    returncode: int
    data: dict[str, Any] = field(default_factory=dict)
    output: str = ""


TUNING_B = (
    "What was tried for (b), full runs (200 MB, 3 pulls a side; run-to-run noise about ±0.04x): NGINX's "
    "default proxy buffer (one page) 1.19-1.22x; `nginx.proxy_buffer_size` 64k 1.14x, **128k 1.10-1.11x "
    "(the default now)**, 512k 1.18x; response buffering on (16 x 128k, no temp files) 1.18x. The rest is "
    "the copy through NGINX (skopeo, NGINX and the registry share 2 CPUs at ~3 Gbit/s) and one auth "
    "subrequest per request; the decision cache cannot help a single pull (each blob is asked for once)."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small images, one short run each")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="geo-route-bench-") as temporary:
        outcomes = [run(name, command, Path(temporary)) for name, command in plan(args.quick)]
    DOCS.mkdir(exist_ok=True)
    IMAGES.mkdir(exist_ok=True)
    plots = draw_plots(outcomes)
    report = render_report(outcomes, plots, args.quick, time.monotonic() - started)
    (DOCS / "benchmarks.md").write_text(report, encoding="utf-8")
    print(f"wrote {DOCS / 'benchmarks.md'} and {len(plots)} plots in {time.monotonic() - started:.0f} s")
    return 0 if all(outcome.returncode == 0 for outcome in outcomes) else 1


def plan(quick: bool) -> list[tuple[str, list[str]]]:
    python = sys.executable
    bench = ROOT / "benchmarks"
    steps = [
        ("pulls", [python, str(bench / "pulls.py"), *(["--quick"] if quick else [])]),
        ("auth", [python, str(bench / "auth_bench.py"), *(["--quick"] if quick else [])]),
        ("updater", [python, str(bench / "updater_bench.py"), "--duration", "3" if quick else "10"]),
        ("reconcile", [python, str(bench / "reconcile_bench.py"), "--manifests", "200" if quick else "1000"]),
    ]
    optional = (
        ("head_rate", "head_rate.py"),
        ("peer_cache", "peer_cache.py"),
        ("resolution_load", "resolution_load.py"),
    )
    for name, script in optional:
        if (bench / script).exists():
            steps.append((name, [python, str(bench / script), *(["--quick"] if quick else [])]))
    return steps


def run(name: str, command: list[str], directory: Path) -> Outcome:
    json_path = directory / f"{name}.json"
    takes_json = name != "reconcile"
    full = command + (["--json", str(json_path)] if takes_json else [])
    print(f"== {name}: {' '.join(Path(part).name if part.startswith('/') else part for part in full)}", flush=True)
    started = time.monotonic()
    result = subprocess.run(full, cwd=ROOT, capture_output=True, text=True, check=False, timeout=3600)
    seconds = time.monotonic() - started
    print(f"   exit {result.returncode} in {seconds:.0f} s", flush=True)
    data: dict[str, Any] = {}
    if takes_json and json_path.exists():
        data = json.loads(json_path.read_text())
    if name == "reconcile":
        data = parse_reconcile(result.stdout)
    return Outcome(name, command, seconds, result.returncode, data, result.stdout[-6000:] + result.stderr[-2000:])


def parse_reconcile(text: str) -> dict[str, Any]:
    match = re.search(r"cold run ([\d.]+) s for (\d+) manifests", text)
    if not match:
        return {}
    return {"cold_seconds": float(match.group(1)), "manifests": int(match.group(2))}


def draw_plots(outcomes: list[Outcome]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    plots: dict[str, str] = {}
    pulls = find(outcomes, "pulls").data.get("scenarios", [])
    if pulls:
        figure, axis = plt.subplots(figsize=(8, 4))
        labels = [f"({s['key']}) {s['title']}" for s in pulls]
        positions = range(len(pulls))
        axis.barh([p + 0.2 for p in positions], [s["georoute"]["median"] for s in pulls], 0.4, label="geo-route")
        axis.barh([p - 0.2 for p in positions], [s["other"]["median"] for s in pulls], 0.4, label="compared with")
        axis.set_yticks(list(positions), labels, fontsize=8)
        axis.set_xscale("log")
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        axis.set_xlabel("seconds per pull (median, log scale)")
        axis.set_title("Image pulls with skopeo (100 Mbit/s, 80 ms RTT to the primary)")
        axis.legend()
        figure.tight_layout()
        plots["pulls"] = save(figure, "pulls.png")
        plt.close(figure)
    auth = find(outcomes, "auth").data.get("phases", {})
    if auth:
        figure, (left, right) = plt.subplots(1, 2, figsize=(8, 3.5))
        names = list(auth)
        left.bar(names, [auth[n]["median"]["requests_per_s"] for n in names], color="tab:blue")
        left.axhline(2000, color="tab:red", linestyle="--", label="target 2,000/s")
        left.set_ylabel("decisions/s")
        left.legend()
        right.bar(names, [auth[n]["median"].get("p99_ms", 0) for n in names], color="tab:orange")
        right.axhline(10, color="tab:red", linestyle="--", label="target p99 10 ms")
        right.set_ylabel("p99 latency (ms)")
        right.legend()
        figure.suptitle("GET /auth: saturation (closed loop) and paced at 2,000/s, 32 connections")
        figure.tight_layout()
        plots["auth"] = save(figure, "auth.png")
        plt.close(figure)
    return plots


def save(figure: Any, name: str) -> str:
    figure.savefig(IMAGES / name, dpi=110)
    return f"img/{name}"


def find(outcomes: list[Outcome], name: str) -> Outcome:
    return next((o for o in outcomes if o.name == name), Outcome(name, [], 0.0, -1))


def render_report(outcomes: list[Outcome], plots: dict[str, str], quick: bool, seconds: float) -> str:
    lines = [
        "# geo-route benchmarks",
        "",
        f"Generated by `.venv/bin/python benchmarks/run_all.py{' --quick' if quick else ''}` in {seconds:.0f} s"
        f"{' (QUICK smoke run: small images, single runs; not the figures to quote)' if quick else ''}.",
        "",
        "## Machine",
        "",
        *machine_lines(),
        "",
    ]
    lines += pulls_section(find(outcomes, "pulls"), plots)
    lines += auth_section(find(outcomes, "auth"), plots)
    lines += updater_section(find(outcomes, "updater"))
    lines += reconcile_section(find(outcomes, "reconcile"))
    for name in ("head_rate", "peer_cache", "resolution_load"):
        outcome = find(outcomes, name)
        if outcome.command:
            lines += generic_section(outcome)
    lines += ["## Commands and exit codes", ""]
    for outcome in outcomes:
        command = " ".join(Path(p).name if p.startswith("/") else p for p in outcome.command)
        lines.append(f"- `{command}`: exit {outcome.returncode}, {outcome.seconds:.0f} s")
    return "\n".join(lines) + "\n"


def machine_lines() -> list[str]:
    model = ""
    with contextlib.suppress(OSError, StopIteration):
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kib / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return [
        f"- CPUs: {os.cpu_count()} ({model or 'unknown model'}), memory {memory}; "
        "every benchmark shares them with its load generator, Redis and the registries",
        f"- Python {platform.python_version()}, {platform.system()} {platform.release()}",
    ]


def pulls_section(outcome: Outcome, plots: dict[str, str]) -> list[str]:
    lines = ["## Pulls over a simulated WAN (scenarios a, b, c)", ""]
    data = outcome.data
    if not data.get("scenarios"):
        return [*lines, f"Not measured (exit {outcome.returncode}).", "", "```", outcome.output[-3000:], "```", ""]
    wan = data.get("wan_check", {})
    image = data.get("image", {})
    lines += [
        f"Image: {image.get('bytes', 0) / 1e6:.1f} MB in {image.get('layers', '?')} incompressible layers. "
        "The primary is reachable only through the simulated WAN (benchmarks/wan: tbf in network namespaces "
        "plus a delay relay; see benchmarks/wan/README.md).",
        "",
        f"WAN check: `{json.dumps(wan)[:400]}`",
        "",
        "| scenario | geo-route median (min-max) | compared with | median (min-max) | ratio | target |",
        "|---|---|---|---|---|---|",
    ]
    for s in data["scenarios"]:
        g, o = s["georoute"], s["other"]
        verdict = "met" if s["met"] else "**MISSED**"
        lines.append(
            f"| ({s['key']}) {s['title']} | {g['median']:.2f} s ({g['min']:.2f}-{g['max']:.2f}) | {o['name']} | "
            f"{o['median']:.2f} s ({o['min']:.2f}-{o['max']:.2f}) | {s['ratio']:.2f}x ({s['ratio_name']}) | "
            f"{s['target']}: {verdict} |"
        )
    if "pulls" in plots:
        lines += ["", f"![pull times]({plots['pulls']})"]
    missed = [s for s in data["scenarios"] if not s["met"]]
    for s in missed:
        lines += [
            "",
            f"**({s['key']}) missed**: measured {s['ratio']:.2f}x. Through geo-route every request takes "
            "NGINX's proxy path plus one auth subrequest; on 2 shared CPUs that overhead is not hidden.",
        ]
        if s["key"] == "b":
            lines += ["", TUNING_B]
    return [*lines, ""]


def auth_section(outcome: Outcome, plots: dict[str, str]) -> list[str]:
    lines = ["## The auth endpoint alone (scenario e)", ""]
    phases = outcome.data.get("phases", {})
    if not phases:
        return [*lines, f"Not measured (exit {outcome.returncode}).", ""]
    lines += ["| phase | decisions/s | p50 | p99 | handler mean |", "|---|---|---|---|---|"]
    for name, phase in phases.items():
        m = phase["median"]
        lines.append(
            f"| {name} | {m['requests_per_s']:,.0f} | {m.get('p50_ms', 0):.2f} ms | {m.get('p99_ms', 0):.2f} ms | "
            f"{m.get('handler_mean_ms', 0):.3f} ms |"
        )
    verdict = outcome.data.get("verdict", {})
    lines += [
        "",
        f"Target ≥ 2,000 decisions/s with p99 ≤ 10 ms at 32 connections: {verdict.get('target_status', '?')} "
        "(saturation answers the throughput half, the paced run the latency half; see benchmarks/auth_bench.py).",
    ]
    if "auth" in plots:
        lines += ["", f"![auth endpoint]({plots['auth']})"]
    return [*lines, ""]


def updater_section(outcome: Outcome) -> list[str]:
    lines = ["## Index updater: events applied per second", ""]
    results = outcome.data.get("results", {})
    if not results:
        return [*lines, f"Not measured (exit {outcome.returncode}).", ""]
    lines += ["| path | events/s | target 5,000/s |", "|---|---|---|"]
    for name, rate in results.items():
        lines.append(f"| {name} | {rate:,.0f} | {'met' if rate >= 5000 else 'below'} |")
    lines += [
        "",
        "Registry 2.8 sends one event per envelope, serially per endpoint; over HTTP, gunicorn and Flask "
        "dominate the cost, the index side is the in-process figure.",
    ]
    return [*lines, ""]


def reconcile_section(outcome: Outcome) -> list[str]:
    data = outcome.data
    lines = ["## Reconciliation", ""]
    if not data:
        return [*lines, f"Not measured (exit {outcome.returncode}).", ""]
    manifests, seconds = data["manifests"], data["cold_seconds"]
    return [
        *lines,
        f"Rebuilding an empty index from a local registry holding {manifests} manifests: {seconds:.2f} s "
        f"({manifests / seconds:.0f} manifests/s; target ≤ 30 s for 1,000).",
        "",
    ]


def generic_section(outcome: Outcome) -> list[str]:
    title = {
        "head_rate": "Manifest HEADs per second (scenario d)",
        "peer_cache": "The peer: a pull-through cache (f)",
        "resolution_load": "The primary load the updater causes (tag resolution)",
    }
    return [
        f"## {title.get(outcome.name, outcome.name)}",
        "",
        f"Exit {outcome.returncode}.",
        "",
        "```",
        outcome.output[-4000:].strip(),
        "```",
        "",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
