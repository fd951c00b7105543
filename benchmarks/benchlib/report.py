"""What the benchmark prints and writes: one line per run, each phase's medians, the verdict, the JSON."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchlib.common import PACED_RATE_TOLERANCE, TARGET_CONNECTIONS, TARGET_P99_MS, TARGET_RPS
from benchlib.cpu import CpuUse
from benchlib.measure import Phase, RunResult, median_of
from benchlib.wrk import Load

TARGET = f">= {TARGET_RPS:,.0f} decisions/s with p99 <= {TARGET_P99_MS:.0f} ms at {TARGET_CONNECTIONS} connections"
LITTLE_RPS = 1000.0 * TARGET_CONNECTIONS / TARGET_P99_MS  # closed loop: mean = connections / throughput


@dataclass
class Check:
    """One half of the target; ``passed`` is None when this invocation did not measure it as the target states."""

    name: str
    passed: bool | None
    text: str


@dataclass
class Verdict:
    checks: list[Check]
    info: list[str]

    @property
    def status(self) -> str:
        if any(check.passed is False for check in self.checks):
            return "missed"
        return "met" if all(check.passed for check in self.checks) else "not judged"


# ---------------------------------------------------------------------------------------------
# per phase


def row(label: str, text: str) -> str:
    """One report line: an indented label column, then the text (an empty label continues the line above)."""
    return f"  {label:<11} {text}"


def count_runs(runs: int) -> str:
    return f"{runs} run" if runs == 1 else f"{runs} runs"


def format_phase_header(phase: Phase, repeat: int, duration: int) -> Iterator[str]:
    yield f"\nphase {phase.name}: {phase.load.describe()}, {count_runs(repeat)} x {duration} s"
    if phase.load.rate is None:
        yield row("answers", "how many decisions/s the service delivers at most (the throughput half of the target);")
        yield row("", "its latency is mostly queueing (Little's law, see the note), shown for information")
    elif phase.load.rate == TARGET_RPS:
        yield row("answers", f"the latency at the target load of {TARGET_RPS:,.0f} req/s (the p99 half of the target)")
    else:
        yield row("answers", f"the latency at {phase.load.rate:,.0f} req/s (not the target's {TARGET_RPS:,.0f}/s)")


def format_run_line(run: RunResult) -> str:
    status = "ok" if not run.errors else "ERRORS: " + "; ".join(run.errors)
    return row(f"run {run.label}", f"{format_numbers(median_numbers([run]), run.load)} | {status}")


def format_numbers(numbers: Mapping[str, float], load: Load) -> str:
    """Throughput (and, when paced, the share of the requested rate) and wrk's latencies."""
    throughput = f"{numbers['requests_per_s']:8,.1f} decisions/s"
    if load.rate is not None:
        short = " SHORT" if numbers["achieved_share"] < 1.0 - PACED_RATE_TOLERANCE else ""
        throughput += f" ({numbers['achieved_share']:6.1%} of {load.rate:,.0f}{short})"
    return (
        f"{throughput} | p50 {numbers['p50_ms']:6.2f} | p99 {numbers['p99_ms']:6.2f} | "
        f"mean {numbers['mean_ms']:6.2f} | max {numbers['max_ms']:7.2f} ms"
    )


def format_phase_summary(phase: Phase) -> Iterator[str]:
    numbers = median_numbers(phase.runs)
    yield row("median", f"{format_numbers(numbers, phase.load)} (of {count_runs(len(phase.runs))})")
    pooled = phase.pooled_server_side()
    yield row(
        "in handler",
        f"mean {pooled.handler_mean_ms:.3f} ms | p50 <= {pooled.handler_p50_le_ms:g} ms | "
        f"p99 <= {pooled.handler_p99_le_ms:g} ms over all runs (service histogram buckets, no queueing)",
    )
    expected = "/".join(phase.expected[:2])
    unexpected = f"unexpected: {pooled.unexpected_decisions}" if pooled.unexpected_decisions else f"all {expected}"
    yield row("decisions", f"{pooled.decisions:,} counted by the service over all runs, {unexpected}")
    yield from format_cpu(phase.median_cpu(), [run.cpu for run in phase.runs])
    yield from format_load_note(phase, numbers)


def format_cpu(shares: Mapping[str, float], runs: list[CpuUse]) -> Iterator[str]:
    text = " | ".join(f"{label} {share:.0f}%" for label, share in shares.items())
    yield row("cpu", f"{text} (median of runs; 100% = one CPU)")
    if any(cpu.uneven_workers for cpu in runs):
        yield row("warning", "workers unevenly loaded in some run: connections stay with the worker that accepted")
        yield row("", "them, so that run measured fewer workers than configured")


def format_load_note(phase: Phase, numbers: Mapping[str, float]) -> Iterator[str]:
    rps, connections = numbers["requests_per_s"], phase.load.connections
    if phase.load.rate is None:
        little = 1000.0 * connections / rps if rps else float("inf")
        yield row("note", "closed loop: each connection waits for its answer, so mean latency = connections /")
        yield row(
            "",
            f"throughput = {connections} / {rps:,.0f}/s = {little:.2f} ms (measured mean {numbers['mean_ms']:.2f} ms); "
            f"mean <= {TARGET_P99_MS:.0f} ms needs > {1000.0 * connections / TARGET_P99_MS:,.0f}/s",
        )
        return
    tolerance = f"{PACED_RATE_TOLERANCE:.0%}"
    if numbers["achieved_share"] >= 1.0 - PACED_RATE_TOLERANCE:
        yield row("note", f"the median achieved rate is within {tolerance} of the requested rate;")
    else:
        yield row("note", f"the median achieved rate FELL SHORT of the requested rate by more than {tolerance};")
    yield row("", "wrk times a request from when it is sent (coordinated omission), so the tail is")
    yield row("", "understated compared with an open-loop generator such as wrk2")


def median_numbers(runs: list[RunResult]) -> dict[str, float]:
    """The median over ``runs`` of each reported number (latencies in ms)."""
    numbers = {
        "requests_per_s": median_of(runs, lambda run: run.wrk.requests_per_s),
        "mean_ms": median_of(runs, lambda run: run.wrk.latency_mean_ms),
        "max_ms": median_of(runs, lambda run: run.wrk.latency_max_ms),
        "handler_mean_ms": median_of(runs, lambda run: run.server.handler_mean_ms),
    }
    for name in runs[0].wrk.percentiles_ms:
        numbers[f"{name}_ms"] = median_of(runs, percentile_of(name))
    if runs[0].load.rate is not None:
        numbers["achieved_share"] = median_of(runs, lambda run: run.achieved_share or 0.0)
    return numbers


def percentile_of(name: str) -> Callable[[RunResult], float]:
    return lambda run: run.wrk.percentiles_ms[name]


# ---------------------------------------------------------------------------------------------
# the target


def judge_target(phases: Mapping[str, Phase], connections: int) -> Verdict:
    checks = [judge_throughput(phases.get("saturation")), judge_latency(phases.get("paced"))]
    info = [f"the target is stated for a 2-core machine; this host has {os.cpu_count()} CPUs (shared with wrk, Redis)"]
    if connections != TARGET_CONNECTIONS:
        checks = [Check(c.name, None, f"{c.text}; measured at {connections} connections") for c in checks]
    if "saturation" in phases:
        p99 = median_numbers(phases["saturation"].runs)["p99_ms"]
        info.append(
            f"closed-loop saturation p99 was {p99:.2f} ms; both halves in one closed-loop run need "
            f"> {LITTLE_RPS:,.0f}/s (Little's law; not judged)"
        )
    return Verdict(checks, info)


def judge_throughput(phase: Phase | None) -> Check:
    if phase is None or not phase.runs:
        return Check("throughput", None, "no saturation phase in this run")
    rps = median_numbers(phase.runs)["requests_per_s"]
    passed = rps >= TARGET_RPS
    text = (
        f"median saturation throughput {rps:,.0f}/s {'>=' if passed else '<'} {TARGET_RPS:,.0f}/s "
        "(answers: the most decisions/s it delivers, closed loop)"
    )
    return Check("throughput", passed, text)


def judge_latency(phase: Phase | None) -> Check:
    if phase is None or not phase.runs or phase.load.rate is None:
        return Check("latency", None, "no paced phase in this run")
    numbers = median_numbers(phase.runs)
    p99, share, rate = numbers["p99_ms"], numbers["achieved_share"], phase.load.rate
    at = f"at {numbers['requests_per_s']:,.1f}/s = {share:.1%} of {rate:,.0f}/s"
    if rate != TARGET_RPS:
        return Check("latency", None, f"median paced p99 {p99:.2f} ms {at}; the target load is {TARGET_RPS:,.0f}/s")
    if share < 1.0 - PACED_RATE_TOLERANCE:
        return Check("latency", False, f"the paced runs fell short of {TARGET_RPS:,.0f}/s by more than 2% ({at})")
    passed = p99 <= TARGET_P99_MS
    text = (
        f"median paced p99 {p99:.2f} ms {'<=' if passed else '>'} {TARGET_P99_MS:.0f} ms {at}, within 2% "
        "(answers: the latency at the target load)"
    )
    return Check("latency", passed, text)


def format_verdict(verdict: Verdict, errors: list[str]) -> Iterator[str]:
    yield f"\ntarget      {TARGET} (the issue's target)"
    for check in verdict.checks:
        outcome = {True: "met", False: "MISSED", None: "not judged"}[check.passed]
        yield row(check.name, f"{outcome}: {check.text}")
    yield from (row("info", line) for line in verdict.info)
    yield (
        f"VERDICT     target {verdict.status.upper()}: median saturation throughput >= {TARGET_RPS:,.0f}/s AND "
        f"median paced p99 <= {TARGET_P99_MS:.0f} ms at {TARGET_RPS:,.0f} req/s"
    )
    if errors:
        yield f"run errors  {'; '.join(errors)}"
    yield f"RESULT      {describe_result(verdict, errors)}"


def describe_result(verdict: Verdict, errors: list[str]) -> str:
    if errors:
        return "FAIL (the load saw errors; the numbers are not valid)"
    return {"met": "PASS", "missed": "FAIL (target missed)", "not judged": "INCOMPLETE (target not judged)"}[
        verdict.status
    ]


# ---------------------------------------------------------------------------------------------
# JSON


def write_json(path: Path, config: Mapping[str, Any], phases: Mapping[str, Phase], extra: Mapping[str, Any]) -> None:
    document = {
        "config": {key: str(value) if isinstance(value, Path) else value for key, value in config.items()},
        "cpus": os.cpu_count(),
        "target": {"rps": TARGET_RPS, "p99_ms": TARGET_P99_MS, "connections": TARGET_CONNECTIONS},
        "phases": {name: describe_phase(phase) for name, phase in phases.items()},
        **extra,
    }
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def describe_phase(phase: Phase) -> dict[str, Any]:
    return {
        "load": asdict(phase.load),
        "runs": [describe_run(run) for run in phase.runs],
        "median": median_numbers(phase.runs) | {"cpu_percent": phase.median_cpu()},
        "server_over_all_runs": asdict(phase.pooled_server_side()),
    }


def describe_run(run: RunResult) -> dict[str, Any]:
    return {
        "label": run.label,
        "wrk": asdict(run.wrk),
        "server": asdict(run.server),
        "cpu_percent": run.cpu.shares,
        "uneven_workers": run.cpu.uneven_workers,
        "achieved_share": run.achieved_share,
        "fell_short": run.fell_short,
        "errors": run.errors,
        "wrk_output": run.wrk_output,
    }


def describe_verdict(verdict: Verdict, errors: list[str]) -> dict[str, Any]:
    return {
        "target_status": verdict.status,
        "checks": [asdict(check) for check in verdict.checks],
        "info": verdict.info,
        "errors": errors,
        "result": describe_result(verdict, errors).split(" ", 1)[0],
    }
