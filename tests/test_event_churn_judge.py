"""``benchmarks/load.py``'s event-memory check (``benchlib/event_churn.judge_events``): RSS is judged
from the sample taken once the dedupe windows are full and a content verification pass has run over
the events' blobs (its bounded memory taken), and growth after that still fails the run."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from benchlib.event_churn import EventPhase, EventRound, judge_events

MIB = 1024


def phase_of(
    rss_mib: list[float], steady_from: int, steady_rss_mib: float, problem: str = "", final_mib: float = 0.0
) -> EventPhase:
    """Rounds of 10,000 events against windows of 10,000 (full after 20,000); ``final_mib``: the RSS
    after the verification pass over them all."""
    rounds = [EventRound((n + 1) * 10_000, int(rss * MIB), 7.6) for n, rss in enumerate(rss_mib)]
    phase = EventPhase(10_000, 1, baseline_rss_kib=int(100.8 * MIB), rounds=rounds)
    phase.steady_from, phase.steady_rss_kib, phase.verifier_problem = steady_from, int(steady_rss_mib * MIB), problem
    phase.final_rss_kib = int(final_mib * MIB)
    return phase


def test_what_the_first_verification_pass_over_the_events_takes_is_not_judged() -> None:
    # windows full at 20,000; a pass met the events' repository during the wait (+2 MiB, bounded)
    problems, figures = judge_events(phase_of([102.0, 103.2, 105.4, 105.6, 105.6, 105.7], 20_000, 105.3))
    assert problems == []
    assert figures["events_once_full"] == 40_000 and 0 < figures["growth_once_full_kib"] < MIB


def test_growth_after_the_warm_up_fails() -> None:
    # the old verification pass: every digest of the repository held, 14 MiB at 60,000 events
    problems, _ = judge_events(phase_of([102.0, 103.2, 103.6, 103.6, 103.6, 117.7], 20_000, 103.2))
    assert problems == ["the updater grew 14848 KiB after its dedupe windows were full"]


def test_a_pass_over_more_events_that_takes_more_memory_fails() -> None:
    # judged from after a pass over 20,000 blobs; no pass during the rounds; the pass over all 60,000
    # at the end holds three times as much (the pass that kept every digest of a repository)
    problems, _ = judge_events(phase_of([103.4, 103.4, 111.0, 111.0, 111.1, 111.1], 20_000, 110.6, final_mib=125.0))
    grown = int(125.0 * MIB) - int(110.6 * MIB)
    assert problems == [f"the updater grew {grown} KiB after its dedupe windows were full"]


def test_a_verifier_that_never_ran_is_a_problem_not_a_pass() -> None:
    never = "no pass over 20,000 blobs ended in 360 s"
    problems, _ = judge_events(phase_of([102.0, 103.2, 103.6], 20_000, 103.2, never))
    assert problems == [
        "steady state not reached, verification never ran over the events: no pass over 20,000 blobs ended in 360 s"
    ]


def test_windows_that_fill_in_the_last_round_are_not_judged() -> None:
    problems, _ = judge_events(phase_of([102.0, 103.2], 0, 0.0))
    assert problems == ["send more events: the windows are full only after ~20,000, and a round more"]
