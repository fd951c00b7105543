"""Run every geo-route benchmark and write ``docs/benchmarks.md`` with PNG plots in ``docs/img/``.

One command (after ``bash script/bootstrap``)::

    .venv/bin/python benchmarks/run_all.py            # full run (about half an hour)
    .venv/bin/python benchmarks/run_all.py --quick    # smoke run, small sizes and single rounds
    .venv/bin/python benchmarks/run_all.py --only head_rate --only pull_storm   # some scenarios

Each benchmark is its own script built on ``geo_route.devstack`` with ``--json``; this runner calls
them one after another (they would disturb each other's numbers on 2 cores), collects their JSON and
renders the report: a table of every ratio with its target first, then each scenario's figures and
plots. A benchmark that fails is reported as failed; a missed target is reported with its measured
figure. Benchmarks whose ``main(argv)`` returns a dict instead (``MODULE_SCENARIOS``) are run the same
way, in a subprocess of their own, and reported from that dict.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import re
import statistics
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
    parser.add_argument("--only", action="append", help="run only this scenario (repeatable)")
    parser.add_argument("--module", help=argparse.SUPPRESS)  # one MODULE_SCENARIOS entry, in this subprocess
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.module:
        return run_module(args.module, args.rest, args.json)
    try:  # the plots need it: fail before the half hour of benchmarks, not after
        importlib.import_module("matplotlib")
    except ImportError:
        print("run_all needs matplotlib: .venv/bin/pip install -e '.[bench]'", file=sys.stderr)
        return 2
    started = time.monotonic()
    steps = [(name, command) for name, command in plan(args.quick) if not args.only or name in args.only]
    with tempfile.TemporaryDirectory(prefix="geo-route-bench-") as temporary:
        outcomes = [run(name, command, Path(temporary)) for name, command in steps]
    DOCS.mkdir(exist_ok=True)
    IMAGES.mkdir(exist_ok=True)
    plots = draw_plots(outcomes)
    report = render_report(outcomes, plots, args.quick, time.monotonic() - started)
    (DOCS / "benchmarks.md").write_text(report, encoding="utf-8")
    print(f"wrote {DOCS / 'benchmarks.md'} and {len(plots)} plots in {time.monotonic() - started:.0f} s")
    return 0 if all(outcome.returncode == 0 for outcome in outcomes) else 1


def plan(quick: bool) -> list[tuple[str, list[str]]]:
    """Every scenario, old and new, with its arguments (``--quick``: small sizes, one round)."""
    python = sys.executable
    bench = ROOT / "benchmarks"
    q = ["--quick"] if quick else []
    steps = [
        ("pulls", [python, str(bench / "pulls.py"), *q]),
        ("head_rate", [python, str(bench / "head_rate.py"), *q]),
        ("pull_storm", [python, str(bench / "pull_storm.py"), *q, "--before"]),
        ("auth", [python, str(bench / "auth_bench.py"), *q]),
        (
            "decision_cost",
            [python, str(bench / "decision_cost.py"), *(["--calls", "3000", "--repeat", "1"] if quick else [])],
        ),
        ("updater", [python, str(bench / "updater_bench.py"), "--duration", "3" if quick else "10"]),
        ("reconcile", [python, str(bench / "reconcile_bench.py"), "--manifests", "200" if quick else "1000"]),
        ("peer_cache", [python, str(bench / "peer_cache.py"), *q]),
        ("resolution_load", [python, str(bench / "resolution_load.py"), *q]),
        (
            "load",
            [python, str(bench / "load.py"), *(q or ["--duration", "30"])],  # its 40,000 tokens, 60,000 events
        ),
        ("flood", [python, str(bench / "flood.py"), *q]),
        ("index_capacity", [python, str(bench / "index_capacity.py"), *INDEX_CAPACITY_ARGS[quick]]),
        ("verify_pass", [python, str(bench / "verify_pass.py"), "--size-gb", "0.2" if quick else "1"]),
        (
            "pin_age_cost",
            [python, str(bench / "pin_age_cost.py"), *(["--calls", "20000", "--repeat", "1"] if quick else [])],
        ),
    ]
    for name, module, argv, quick_argv in MODULE_SCENARIOS:
        steps.append(
            (name, [python, str(bench / "run_all.py"), "--module", module, "--", *(quick_argv if quick else argv)])
        )
    return steps


# The index at scale (docs/capacity.md has the 10 M run; here a smaller fill keeps the whole run short).
INDEX_CAPACITY_ARGS = {
    False: ["--entries", "1000000", "--pins", "100000", "--repositories", "10000"],
    True: ["--entries", "100000", "--pins", "10000", "--repositories", "1000", "--lookups", "2000"],
}
# Benchmarks whose ``main(argv)`` returns a dict of figures: (scenario name, module in benchmarks/, its
# arguments, its arguments under --quick). run_all runs each in a subprocess of its own (``--module``)
# and reports the dict: a top-level "<prefix>ratio" key goes into the ratio table with its
# "<prefix>target" and "<prefix>met"; sendfile_pull's nested figures are read by ``module_ratio_rows``.
MODULE_SCENARIOS: list[tuple[str, str, list[str], list[str]]] = [
    # The replicated pull with blobs sent from the local registry's storage (issue 15, item 1).
    ("sendfile_pull", "sendfile_pull", ["--rounds", "5"], ["--rounds", "1", "--image-mb", "24", "--layers", "4"]),
]
NO_JSON = ("reconcile", "verify_pass", "pin_age_cost")  # their figures come from what they print


def run(name: str, command: list[str], directory: Path) -> Outcome:
    json_path = directory / f"{name}.json"
    takes_json = name not in NO_JSON
    full = command + (["--json", str(json_path)] if takes_json else [])
    if "--module" in command:  # the module's own arguments follow "--"
        at = command.index("--module") + 2
        full = [*command[:at], "--json", str(json_path), *command[at:]]
    print(f"== {name}: {' '.join(Path(part).name if part.startswith('/') else part for part in full)}", flush=True)
    started = time.monotonic()
    result = subprocess.run(full, cwd=ROOT, capture_output=True, text=True, check=False, timeout=3600)
    seconds = time.monotonic() - started
    print(f"   exit {result.returncode} in {seconds:.0f} s", flush=True)
    data: dict[str, Any] = {}
    if takes_json and json_path.exists():
        loaded = json.loads(json_path.read_text())
        data = loaded if isinstance(loaded, dict) else {"blocks": loaded}
    if name == "reconcile":
        data = parse_reconcile(result.stdout)
    if name == "verify_pass":
        data = parse_verify_pass(result.stdout)
    return Outcome(name, command, seconds, result.returncode, data, result.stdout[-6000:] + result.stderr[-2000:])


def parse_verify_pass(text: str) -> dict[str, Any]:
    rates = [float(value) for value in re.findall(r"([\d.]+) MB/s", text)]
    return {"mb_per_s": rates} if rates else {}


def run_module(module: str, argv: list[str], json_path: Path) -> int:
    """``--module``: import benchmarks/<module>.py, call its ``main(argv)`` and write the dict it returns."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    figures = importlib.import_module(module).main(argv)
    if not isinstance(figures, dict):
        print(f"{module}.main returned {type(figures).__name__}, not a dict", file=sys.stderr)
        return 2
    json_path.write_text(json.dumps(figures, indent=2, default=str) + "\n", encoding="utf-8")
    return 1 if figures.get("problems") else 0


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
    plots.update(draw_new_plots(outcomes, plt))
    return plots


def draw_new_plots(outcomes: list[Outcome], plt: Any) -> dict[str, str]:
    """The HEAD rate with CPU per request, the pull storm, and every ratio against its target."""
    plots: dict[str, str] = {}
    head = find(outcomes, "head_rate").data.get("fronts", {})
    if head:
        figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
        names = list(head)
        left.bar(
            names,
            [head[n]["requests_per_s"] for n in names],
            color=["tab:blue", "tab:purple", "tab:orange", "tab:gray", "tab:green"][: len(names)],
        )
        left.set_ylabel("manifest HEAD req/s (median)")
        for index, name in enumerate(names):
            left.annotate(
                f"{head[name]['ratio']:.2f}x", (index, head[name]["requests_per_s"]), ha="center", va="bottom"
            )
        bottom = [0.0] * len(names)
        for part, color in (
            ("nginx", "tab:blue"),
            ("auth", "tab:orange"),
            ("registry", "tab:gray"),
            ("redis", "tab:red"),
        ):
            values = [head[n]["cpu_us"].get(part, 0.0) for n in names]
            right.bar(names, values, bottom=bottom, label=part, color=color)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        right.set_ylabel("CPU µs per request")
        right.legend(fontsize=8)
        figure.suptitle("Manifest HEAD by digest: rate (ratio to plain NGINX) and CPU per request by component")
        figure.tight_layout()
        plots["head_rate"] = save(figure, "head_rate.png")
        plt.close(figure)
    storm = find(outcomes, "pull_storm").data
    if storm.get("site"):
        sides = [side for side in ("site", "site-storage", "site-before", "direct") if storm.get(side)]
        figure, axis = plt.subplots(figsize=(7, 3.6))
        positions = range(len(sides))
        axis.bar([p - 0.2 for p in positions], [storm[s]["p50"] for s in sides], 0.4, label="p50")
        axis.bar([p + 0.2 for p in positions], [storm[s]["p99"] for s in sides], 0.4, label="p99")
        axis.set_xticks(list(positions), sides)
        axis.set_ylabel("seconds per pull (median over rounds)")
        axis.set_title(f"Pull storm: {storm['config']['clients']} clients, own tokens, one image at once")
        axis.legend()
        figure.tight_layout()
        plots["pull_storm"] = save(figure, "pull_storm.png")
        plt.close(figure)
    rows = ratio_rows(outcomes)
    if rows:
        figure, axis = plt.subplots(figsize=(9, 0.8 + 0.45 * len(rows)))
        labels = [row[0][:70] for row in rows]
        colors = ["tab:gray" if row[3] is None else "tab:green" if row[3] else "tab:red" for row in rows]
        axis.barh(range(len(rows)), [row[1] for row in rows], color=colors, left=0)
        axis.set_yticks(list(range(len(rows))), labels, fontsize=7)
        for index, row in enumerate(rows):
            axis.annotate(f" {row[1]:.2f}x {row[2]}", (row[1], index), va="center", fontsize=7)
        axis.axvline(1.0, color="black", linewidth=0.8)
        axis.set_xscale("log")
        axis.set_xlim(0.2, max(row[1] for row in rows) * 3)
        axis.invert_yaxis()
        axis.set_xlabel("ratio (log scale; the line is 1.0x); green: target met, red: missed, gray: for comparison")
        figure.tight_layout()
        plots["ratios"] = save(figure, "ratios.png")
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
    lines += method_lines()
    lines += ratio_section(outcomes, plots)
    sections = {
        "pulls": lambda outcome: pulls_section(outcome, plots),
        "head_rate": lambda outcome: head_rate_section(outcome, plots),
        "pull_storm": lambda outcome: pull_storm_section(outcome, plots),
        "auth": lambda outcome: auth_section(outcome, plots),
        "decision_cost": decision_cost_section,
        "updater": updater_section,
        "reconcile": reconcile_section,
    }
    for outcome in outcomes:  # in the order they ran
        if outcome.name in sections:
            lines += sections[outcome.name](outcome)
        elif outcome.name in {name for name, *_ in MODULE_SCENARIOS}:
            lines += module_section(outcome)
        else:
            lines += generic_section(outcome)
    lines += ["## Commands and exit codes", ""]
    for outcome in outcomes:
        command = " ".join(Path(p).name if p.startswith("/") else p for p in outcome.command)
        lines.append(f"- `{command}`: exit {outcome.returncode}, {outcome.seconds:.0f} s")
    return "\n".join(lines) + "\n"


def method_lines() -> list[str]:
    return [
        "## How it is measured",
        "",
        "Every scenario runs on `geo_route.devstack`: real processes on loopback (redis-server, two Docker "
        "Distribution 2.8 registries, the token service, the auth service under gunicorn, NGINX from the rendered "
        "site configuration), started and stopped by PID. The machine is small and **shared**: the load "
        "generators, every component and, while these figures were taken, other work run on the same 2 CPUs, and "
        "that load drifts over minutes. So a ratio is never taken between two runs far apart: the two sides of a "
        "comparison run side by side in one stack, taking turns in alternating order over several rounds, and "
        "each side's figure is its median over the rounds. Absolute figures (req/s, seconds) move with the "
        "machine's load from run to run; the ratios and the CPU per request move much less.",
        "",
    ]


def ratio_rows(outcomes: list[Outcome]) -> list[tuple[str, float, str, bool | None]]:
    """(what, ratio, target, met) of every scenario that measures one."""
    rows: list[tuple[str, float, str, bool | None]] = []
    for s in find(outcomes, "pulls").data.get("scenarios", []):
        rows.append((f"pull ({s['key']}) {s['title']}: {s['ratio_name']}", s["ratio"], s["target"], s["met"]))
    head = find(outcomes, "head_rate").data
    if head.get("fronts"):
        target = f">= {head['target']}x"
        rows.append(("manifest HEAD rate, site / plain NGINX (decision cache off)", head["ratio"], target, head["met"]))
        if "storage_ratio" in head:
            what = "manifest HEAD rate, site with storage_root (answered from storage) / plain NGINX"
            rows.append((what, head["storage_ratio"], target, head["storage_met"]))
        before = head["fronts"].get("site-before")
        if before:
            rows.append(("manifest HEAD rate, site before issue 15 / plain NGINX", before["ratio"], "(before)", None))
    storm = find(outcomes, "pull_storm").data
    if storm.get("site"):
        rows.append(
            ("pull storm p99, site / direct local registry", storm["ratio_p99"], f"<= {storm['target']}x", storm["met"])
        )
        rows.append(("pull storm p50, site / direct local registry", storm["ratio_p50"], "", None))
        if "storage_ratio_p99" in storm:
            what = "pull storm p99, site with storage_root / direct local registry"
            rows.append((what, storm["storage_ratio_p99"], f"<= {storm['target']}x", storm["storage_met"]))
        before = storm.get("site-before")
        if before and storm["direct"]["p99"]:
            rows.append(
                (
                    "pull storm p99, site before issue 15 / direct",
                    before["p99"] / storm["direct"]["p99"],
                    "(before)",
                    None,
                )
            )
    rows += module_ratio_rows(outcomes)
    return rows


def module_ratio_rows(outcomes: list[Outcome]) -> list[tuple[str, float, str, bool | None]]:
    rows: list[tuple[str, float, str, bool | None]] = []
    pull = find(outcomes, "sendfile_pull").data.get("pull", {})
    for side, ratio in pull.get("ratio_of_medians", {}).items():
        if side != "direct":
            data = find(outcomes, "sendfile_pull").data
            is_target = side == "storage"
            target = f"<= {data.get('target', 1.0):.2f}x" if is_target else "(blobs proxied)"
            rows.append(
                (
                    f"replicated pull, site ({side}) / direct local registry",
                    ratio,
                    target,
                    data.get("met") if is_target else None,
                )
            )
    for name, *_ in MODULE_SCENARIOS:
        data = find(outcomes, name).data
        for key, value in data.items():
            if key.endswith("ratio") and isinstance(value, (int, float)):
                prefix = key[: -len("ratio")]
                met = data.get(prefix + "met")
                rows.append((f"{name}: {key}", float(value), str(data.get(prefix + "target", "")), met))
    return rows


def ratio_section(outcomes: list[Outcome], plots: dict[str, str]) -> list[str]:
    rows = ratio_rows(outcomes)
    lines = ["## Every ratio", ""]
    if not rows:
        return [*lines, "No scenario measured a ratio in this run.", ""]
    lines += ["| measured | ratio | target | |", "|---|---|---|---|"]
    for what, ratio, target, met in rows:
        verdict = "" if met is None else ("met" if met else "**MISSED**")
        lines.append(f"| {what} | {ratio:.2f}x | {target} | {verdict} |")
    if "ratios" in plots:
        lines += ["", f"![every ratio]({plots['ratios']})"]
    return [*lines, ""]


def head_rate_section(outcome: Outcome, plots: dict[str, str]) -> list[str]:
    lines = ["## Manifest HEADs per second: the cost of a decision (scenario d, issue 15 item 2)", ""]
    data = outcome.data
    if not data.get("fronts"):
        return [*lines, f"Not measured (exit {outcome.returncode}).", "", "```", outcome.output[-3000:], "```", ""]
    config = data["config"]
    lines += [
        f"`HEAD /v2/<repo>/manifests/<digest>` with a pull token, {config['connections']} keep-alive connections "
        f"(2 ab processes), {config['rounds']} rounds of {config['duration']} s per front, fronts alternating. "
        "`site`: the site as configured now (the auth service on its httptools worker, NGINX reaching each "
        "worker on its own Unix socket through kept-alive connections), every HEAD answered by the local "
        "registry; `site-storage`: another node, the same with `local_registry.storage_root`, so NGINX "
        "answers the replicated manifest from the registry's files (no registry asked); `site-asgi`: a node "
        "on gunicorn's ASGI protocol (the default before); `site-before`: a node with "
        "the transport of before (sync workers on TCP: a new connection per decision, closed gracefully); "
        "`plain`: NGINX in front of the same local registry without `auth_request`. Decision cache off (the "
        "same token every request; manifest decisions are never reused anyway). CPU per request is each "
        "component's CPU time (from /proc) over the run divided by the requests served.",
        "",
        "| front | req/s (median) | ratio to plain | NGINX CPU/req | auth CPU/req | registry CPU/req | Redis CPU/req |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, front in data["fronts"].items():
        cpu = front["cpu_us"]
        lines.append(
            f"| {name} | {front['requests_per_s']:,.0f} | {front['ratio']:.2f}x | {cpu.get('nginx', 0):.0f} µs | "
            f"{cpu.get('auth', 0):.0f} µs | {cpu.get('registry', 0):.0f} µs | {cpu.get('redis', 0):.0f} µs |"
        )
    verdict = "met" if data["met"] else "**MISSED**"
    lines += ["", f"Target: site ≥ {data['target']}x plain NGINX: {verdict} ({data['ratio']:.2f}x)."]
    if "storage_ratio" in data:
        verdict = "met" if data["storage_met"] else "**MISSED**"
        lines += [f"With `storage_root` (site-storage): {verdict} ({data['storage_ratio']:.2f}x)."]
    lines += problems_lines(outcome)
    if "head_rate" in plots:
        lines += ["", f"![manifest HEAD rate and CPU per request]({plots['head_rate']})"]
    lines += ["", HEAD_RATE_NOTES]
    return [*lines, ""]


HEAD_RATE_NOTES = (
    "What limits it: on 2 shared CPUs the rate is the CPU per request. The plain front spends NGINX's proxying "
    "and the registry's own work (token check, storage, ~1 ms of CPU per HEAD); the site adds the auth "
    "subrequest in NGINX and the auth service's whole request in Python. Profiled (py-spy, `--gil`) before "
    "issue 15 the service spent about a third of its time in the decision itself (classification, the token "
    "cache, one Redis round trip, the metrics) and two thirds in gunicorn's HTTP handling: a sync worker "
    "accepts, parses, builds a WSGI environ, answers, and closes each subrequest's connection gracefully (it "
    "waits for NGINX's FIN). The ASGI worker keeps NGINX's connections alive and needs no thread hand-off "
    "(`site-asgi`); the httptools worker (`site`) also drops gunicorn's ASGI protocol, answering `/auth` from "
    "the parser's callbacks. A Unix socket instead of loopback TCP measured the same "
    "within noise (the loopback stack is cheap next to Python). Reaching 0.9x would need the service's CPU "
    "per decision near zero, i.e. a decision not in Python at all; the decision itself costs ~60 µs of "
    "Python CPU in process (`decision_cost.py`)."
)


def pull_storm_section(outcome: Outcome, plots: dict[str, str]) -> list[str]:
    lines = ["## The pull storm (issue 15 item 3)", ""]
    data = outcome.data
    if not data.get("site"):
        return [*lines, f"Not measured (exit {outcome.returncode}).", "", "```", outcome.output[-3000:], "```", ""]
    config = data["config"]
    lines += [
        f"{config['clients']} clients, each with its own token from the token service and its own loopback "
        f"address, pull one image ({config['layers']} layers of {config['layer_bytes']:,} bytes) at the same "
        f"instant; {config['rounds']} rounds, the sides alternating. The client does the registry protocol "
        "itself (manifest by tag, then every blob, every digest checked, one kept-alive connection each), as "
        f"threads of {config['processes']} processes forked before the storm: 200 skopeo processes on 2 cores "
        "would measure skopeo's start-up and the scheduler, not the site. Pull time: from the common start "
        "instant to the client's last byte.",
        "",
        "| side | p50 | p99 | max | storm wall | auth CPU | auth CPU per pull | NGINX CPU | registry CPU"
        " | clients' CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for side in ("site", "site-storage", "site-before", "direct"):
        row = data.get(side)
        if not row:
            continue
        cpu, per_pull = row["cpu_seconds"], row["cpu_ms_per_pull"]
        lines.append(
            f"| {side} | {row['p50']:.2f} s | {row['p99']:.2f} s | {row['max']:.2f} s | {row['wall_seconds']:.2f} s | "
            f"{cpu.get('auth', 0):.2f} s | {per_pull.get('auth', 0):.1f} ms | {cpu.get('nginx', 0):.2f} s | "
            f"{cpu.get('registry', 0):.2f} s | {cpu.get('clients', 0):.2f} s |"
        )
    verdict = "met" if data["met"] else "**MISSED**"
    lines += [
        "",
        f"Target: p99 through the site ≤ {data['target']}x the direct storm's: {verdict} ({data['ratio_p99']:.2f}x).",
    ]
    if "storage_ratio_p99" in data:
        verdict = "met" if data["storage_met"] else "**MISSED**"
        lines += [f"With `storage_root` (site-storage): {verdict} ({data['storage_ratio_p99']:.2f}x)."]
    not_local = data["site"].get("not_local", [])
    if any(not_local):
        routes = data["site"].get("routes", [{}])
        lines += [
            "",
            f"Requests the site sent to the primary by its fail-safe, per storm: {not_local} "
            f"(of {data['site'].get('requests_per_storm', 0)}; e.g. {json.dumps(routes[0])[:300]}). "
            "`index-unavailable`: the Redis lookup did not answer within `redis.socket_timeout` (50 ms) while "
            "clients, NGINX, the registry, Redis and the service all fought for 2 CPUs; the pull still succeeds "
            "(the primary serves), but those bytes cross the WAN on a real site.",
        ]
    lines += problems_lines(outcome)
    if "pull_storm" in plots:
        lines += ["", f"![pull storm]({plots['pull_storm']})"]
    return [*lines, ""]


def decision_cost_section(outcome: Outcome) -> list[str]:
    lines = ["## CPU per decision, in process (decision_cost.py)", ""]
    blocks = outcome.data.get("blocks", [])
    if not blocks:
        return [*lines, *not_measured(outcome)]
    lines += ["| request | Python CPU µs | Redis CPU µs | wall µs |", "|---|---|---|---|"]
    for request in sorted({block["request"] for block in blocks}):
        mine = [block for block in blocks if block["request"] == request]
        python_us = statistics.median(block["python_cpu_us"] for block in mine)
        redis_us = statistics.median(block["redis_cpu_us"] for block in mine)
        wall_us = statistics.median(block["wall_us"] for block in mine)
        lines.append(f"| {request} | {python_us:.1f} | {redis_us:.1f} | {wall_us:.1f} |")
    lines += [
        "",
        "The decision alone (the WSGI fast path called directly, no HTTP): what a request costs beyond the"
        " HTTP server.",
    ]
    return [*lines, ""]


def not_measured(outcome: Outcome) -> list[str]:
    return [f"Not measured (exit {outcome.returncode}).", "", "```", outcome.output[-3000:].strip(), "```", ""]


def problems_lines(outcome: Outcome) -> list[str]:
    """A run's failed checks (its JSON's "problems"), or its output's end when it failed without them."""
    problems = outcome.data.get("problems", [])
    if problems:
        return ["", f"Checks that failed (exit {outcome.returncode}):", "", *(f"- {problem}" for problem in problems)]
    if outcome.returncode == 0:
        return []
    return ["", f"Exit {outcome.returncode}:", "", "```", outcome.output[-2000:].strip(), "```"]


def module_section(outcome: Outcome) -> list[str]:
    lines = [f"## {outcome.name}", "", f"Exit {outcome.returncode}.", ""]
    if outcome.data:
        lines += ["```json", json.dumps(outcome.data, indent=2, default=str)[:6000], "```"]
    else:
        lines += ["```", outcome.output[-3000:].strip(), "```"]
    return [*lines, ""]


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
        return [*lines, *not_measured(outcome)]
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
