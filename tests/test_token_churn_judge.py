"""``benchmarks/load.py``'s token-memory check (``benchlib/token_churn.judge_tokens``): RSS is judged
once every worker's cache is full by its own gauge, however unevenly the tokens reached the workers,
and growth after that still fails the run."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from benchlib.token_churn import TokenPhase, TokenRound, judge_tokens

CACHE = 10_000
MIB = 1024


def phase_of(rss_mib: list[float], entries: list[tuple[int, int]]) -> TokenPhase:
    """Rounds of 5,000 tokens (the last entry is the re-send of the first round, all missed)."""
    rounds = [
        TokenRound((n + 1) * 5000, int(rss * MIB), 0, (n + 1) * 5000, 0, 1.0, {"101": a, "102": b})
        for n, (rss, (a, b)) in enumerate(zip(rss_mib, entries, strict=True))
    ]
    rounds.append(TokenRound(rounds[-1].tokens_sent, rounds[-1].auth_rss_kib, 0, 0, 0, 0.0))
    return TokenPhase(CACHE, 2, baseline_rss_kib=int(217.1 * MIB), rounds=rounds, resend_misses=5000, resend_count=5000)


# The run that read 1.7 MiB of growth "once full" (docs/reliability.md, 40,000 tokens after the mixed
# load): judged from 1.25 x workers x cache_size = 25,000 tokens on. Its RSS per round, with what each
# worker's cache held as its workers' RSS says (no gauge then): one worker took the first tokens
# (NGINX's kept-alive connections stay with the ASGI worker that accepted them) and was full after
# 15,000, the other grew until 35,000.
RUN_RSS = [217.5, 218.5, 220.3, 220.3, 221.2, 222.3, 222.8, 222.9]
RUN_ENTRIES = [(4000, 1000), (8000, 2000), (CACHE, 5000), (CACHE, 6500), (CACHE, 8000), (CACHE, 9500)]
RUN_ENTRIES += [(CACHE, CACHE)] * 2


def test_a_worker_still_filling_its_cache_is_not_judged_as_full() -> None:
    problems, figures = judge_tokens(phase_of(RUN_RSS, RUN_ENTRIES))
    assert problems == []
    assert figures["full_after_tokens"] == 35_000
    assert figures["growth_once_full_kib"] == int(222.9 * MIB) - int(222.8 * MIB)


UNEVEN = [(3333, 1667), (6667, 3333), (CACHE, 5000), (CACHE, 6667), (CACHE, 8333)] + [(CACHE, CACHE)] * 7


def test_growth_once_every_cache_is_full_still_fails() -> None:
    rss = [217.5, 218.5, 220.3, 220.8, 221.6, 222.4, 223.0, 223.6, 224.2, 224.8, 225.4, 226.0]
    problems, _ = judge_tokens(phase_of(rss, UNEVEN))
    assert any("RSS grew 3.6 MiB over 30,000 tokens" in problem for problem in problems), problems


def test_too_few_tokens_to_fill_every_cache_is_said() -> None:
    problems, figures = judge_tokens(phase_of([218.0] * 5, UNEVEN[:5]))
    assert figures["full_after_tokens"] is None
    assert any("every worker's cache must be full" in problem for problem in problems), problems
