"""Phase 2 of ``benchmarks/load.py``: many distinct valid tokens, and the auth service's memory meanwhile.

Tokens are minted with the stack's signing key (``updater.signing_key``) as ``geo_route.updater.pull_tokens``
mints them, each with its own ``jti``, and each is sent once through NGINX. The auth service caches
verified tokens in a bounded LRU per worker (``token.cache_size``); /metrics shows its hits and misses
and each worker's entries (``geo_route_token_cache_entries{pid}``), so the bound is shown by memory
that stops growing once every worker's cache is full and by early tokens that miss again.

"Full" is what the workers' gauges say, not a number of tokens sent: under the ASGI worker each of
NGINX's kept-alive connections stays with the worker that accepted it, so the workers see unequal
shares of the tokens. In one run (2 workers, ``token.cache_size`` 10,000) one worker's cache was full
after about 20,000 tokens and the other's only after about 33,000; judged from 1.25 x workers x
cache_size (25,000) on, that second cache still filling added 2.9 of the 3.3 MiB the service grew by
up to 40,000 tokens, and the service then grew 1.0 MiB over 35,000 more tokens (25,000 more: 0.4
MiB): a cache filling to its bound, not a leak. So the phase goes on past ``count`` tokens until
every worker's cache has been full for ``JUDGED_ROUNDS`` rounds, and only those rounds are judged.
"""

from __future__ import annotations

import concurrent.futures
import functools
import http.client
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from benchlib.common import BenchError
from benchlib.memory import tree_memory
from geo_route.config import Settings, load_settings
from geo_route.devstack.client import StackClient
from geo_route.devstack.processes import fetch
from geo_route.updater.pull_tokens import PullTokens, load_signing_key

TOKEN_CONNECTIONS = 32
TOKEN_LIFETIME = 1800
FLAT_SHARE, FLAT_SLACK_KIB = 0.2, 1024
JUDGED_ROUNDS = 3  # rounds judged after the first one with every worker's cache full
FILL_LIMIT = 10  # tokens at most, x workers x cache_size, sent waiting for that


@dataclass
class TokenRound:
    tokens_sent: int  # cumulative, distinct
    auth_rss_kib: int
    cache_hits: int
    cache_misses: int
    failed: int
    seconds: float
    cache_entries: dict[str, int] = field(default_factory=dict)  # worker pid -> tokens it caches


@dataclass
class TokenPhase:
    cache_size: int
    workers: int
    mint_seconds: float = 0.0
    baseline_rss_kib: int = 0
    rounds: list[TokenRound] = field(default_factory=list)
    resend_misses: int = 0
    resend_count: int = 0


def mint_batch(key_path: str, issuer: str, service: str, repository: str, count: int) -> list[str]:
    """``count`` distinct pull tokens for ``repository`` (each has its own jti); runs in a worker process."""
    tokens = PullTokens(load_signing_key(key_path), issuer=issuer, service=service, lifetime=TOKEN_LIFETIME)
    now = time.time()
    return [tokens.mint(repository, now) for _ in range(count)]


def mint_tokens(settings: Settings, repository: str, count: int) -> list[str]:
    batch = 500
    sizes = [min(batch, count - start) for start in range(0, count, batch)]
    mint = functools.partial(
        mint_batch, settings.updater.signing_key, settings.token.issuer, settings.token.service, repository
    )
    with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        tokens = [token for minted in pool.map(mint, sizes) for token in minted]
    if len(set(tokens)) != count:
        raise BenchError(f"minted {len(set(tokens))} distinct tokens, wanted {count}")
    return tokens


def send_with_tokens(address: str, uri: str, tokens: list[str], connections: int) -> int:
    """GET ``uri`` once with each token over ``connections`` keep-alive connections; the number not 200."""
    failed = [0] * connections

    def work(slot: int) -> None:
        host, port = address.rsplit(":", 1)
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            for token in tokens[slot::connections]:
                try:
                    connection.request("GET", uri, headers={"Authorization": f"Bearer {token}"})
                    response = connection.getresponse()
                    response.read()
                    failed[slot] += response.status != 200
                except (OSError, http.client.HTTPException):
                    failed[slot] += 1
                    connection.close()
        finally:
            connection.close()

    threads = [threading.Thread(target=work, args=(slot,), daemon=True) for slot in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(failed)


def token_cache_counts(settings: Settings) -> tuple[int, int]:
    """(hits, misses) of ``geo_route_token_cache_total`` from the auth service's /metrics (all workers)."""
    text = fetch(f"http://{settings.server.bind[0]}/metrics").body.decode()
    found = dict(re.findall(r'^geo_route_token_cache_total\{result="(\w+)"\} ([\d.e+]+)$', text, re.MULTILINE))
    return int(float(found.get("hit", 0))), int(float(found.get("miss", 0)))


def token_cache_entries(settings: Settings) -> dict[str, int]:
    """Each live worker's ``geo_route_token_cache_entries`` (pid -> tokens cached), from /metrics."""
    text = fetch(f"http://{settings.server.bind[0]}/metrics").body.decode()
    found = re.findall(r'^geo_route_token_cache_entries\{pid="(\d+)"\} ([\d.e+]+)$', text, re.MULTILINE)
    return {pid: int(float(value)) for pid, value in found}


def caches_full(entries: dict[str, int], workers: int, cache_size: int) -> bool:
    return len(entries) >= workers and min(entries.values()) >= cache_size


def full_rounds(phase: TokenPhase) -> int:
    return sum(caches_full(r.cache_entries, phase.workers, phase.cache_size) for r in phase.rounds)


def run_token_phase(
    client: StackClient, auth_pid: int, repository: str, uri: str, count: int, round_size: int
) -> TokenPhase:
    """GET ``uri`` once with each of ``count`` distinct pull tokens for ``repository``, ``round_size`` at a
    time, sampling the auth service's memory and token-cache counters after each round; then more
    rounds, if needed, until every worker's cache has been full for ``JUDGED_ROUNDS`` rounds (at most
    ``FILL_LIMIT`` x workers x cache_size tokens in all: a worker that gets almost none of NGINX's
    connections fills late)."""
    settings = load_settings(client.info.site_file, environ={})
    phase = TokenPhase(settings.token.cache_size, settings.server.workers)
    started = time.monotonic()
    tokens = mint_tokens(settings, repository, count)
    phase.mint_seconds = time.monotonic() - started
    print(f"[tokens] minted {len(tokens):,} distinct tokens in {phase.mint_seconds:.1f} s", flush=True)
    phase.baseline_rss_kib = tree_memory(auth_pid).total_kib
    limit = FILL_LIMIT * phase.workers * phase.cache_size
    start = 0
    while start < len(tokens) or (full_rounds(phase) <= JUDGED_ROUNDS and len(tokens) < limit):
        if start >= len(tokens):
            tokens += mint_tokens(settings, repository, round_size)
        began = time.monotonic()
        failed = send_with_tokens(client.secondary, uri, tokens[start : start + round_size], TOKEN_CONNECTIONS)
        hits, misses = token_cache_counts(settings)
        sent = min(start + round_size, len(tokens))
        entries = token_cache_entries(settings)
        memory = tree_memory(auth_pid)
        seconds = time.monotonic() - began
        phase.rounds.append(TokenRound(sent, memory.total_kib, hits, misses, failed, seconds, entries))
        print(
            f"[tokens] {sent:7,} distinct tokens sent: auth service RSS {memory.describe()}, cache hits {hits:,}"
            f" misses {misses:,}, entries per worker {sorted(entries.values())}, failed {failed}",
            flush=True,
        )
        start += round_size
    first = tokens[:round_size]
    _, misses_before = token_cache_counts(settings)
    failed = send_with_tokens(client.secondary, uri, first, TOKEN_CONNECTIONS)
    phase.resend_misses, phase.resend_count = token_cache_counts(settings)[1] - misses_before, len(first)
    phase.rounds.append(
        TokenRound(len(tokens), tree_memory(auth_pid).total_kib, *token_cache_counts(settings), failed, 0)
    )
    return phase


def judge_tokens(phase: TokenPhase) -> tuple[list[str], dict[str, Any]]:
    """Whether RSS stayed flat once every worker's cache was full (its own gauge says so), and the
    figures that say so. Growth before that is the caches filling, wherever the tokens went."""
    problems = [f"{r.failed} requests not 200 after {r.tokens_sent:,} tokens" for r in phase.rounds if r.failed]
    rounds = phase.rounds[:-1]  # the last entry is the re-send
    full = [r for r in rounds if caches_full(r.cache_entries, phase.workers, phase.cache_size)]
    figures: dict[str, Any] = {"full_after_tokens": full[0].tokens_sent if full else None}
    if len(full) < 2:
        last = rounds[-1].cache_entries if rounds else {}
        problems.append(
            f"too few tokens to judge: every worker's cache must be full ({phase.cache_size:,}) for two rounds;"
            f" after all tokens the workers cache {sorted(last.values())}; send more (--tokens)"
        )
        return problems, figures
    filling_tokens = full[0].tokens_sent
    fill_kib = full[0].auth_rss_kib - phase.baseline_rss_kib
    after_tokens = full[-1].tokens_sent - full[0].tokens_sent
    after_kib = full[-1].auth_rss_kib - full[0].auth_rss_kib
    allowed = max(FLAT_SLACK_KIB, FLAT_SHARE * fill_kib * after_tokens / filling_tokens)
    figures.update(
        {
            "growth_while_filling_kib": fill_kib,
            "tokens_while_filling": filling_tokens,
            "growth_once_full_kib": after_kib,
            "tokens_once_full": after_tokens,
            "allowed_growth_once_full_kib": allowed,
            "resend_miss_share": phase.resend_misses / phase.resend_count if phase.resend_count else 0.0,
        }
    )
    if after_kib > allowed:
        problems.append(
            f"auth service RSS grew {after_kib / 1024:.1f} MiB over {after_tokens:,} tokens once the"
            f" caches were full (allowed {allowed / 1024:.1f} MiB): the token cache is not bounded"
        )
    if phase.resend_misses < 0.95 * phase.resend_count:
        problems.append(f"re-sent first-round tokens: only {phase.resend_misses:,} of {phase.resend_count:,} missed")
    return problems, figures


def print_tokens(phase: TokenPhase, figures: dict[str, Any]) -> None:
    print(
        f"\nmany tokens: token.cache_size {phase.cache_size:,} per worker, {phase.workers} workers;"
        f" auth service RSS before {phase.baseline_rss_kib / 1024:.1f} MiB"
    )
    for r in phase.rounds[:-1]:
        print(
            f"  {r.tokens_sent:>7,} tokens  RSS {r.auth_rss_kib / 1024:7.1f} MiB  misses {r.cache_misses:>7,}"
            f"  hits {r.cache_hits:>7,}  {r.seconds:5.1f} s"
        )
    print(
        f"  first round re-sent: {phase.resend_misses:,} of {phase.resend_count:,} missed the cache (evicted);"
        f" RSS {phase.rounds[-1].auth_rss_kib / 1024:.1f} MiB"
    )
    if figures.get("full_after_tokens"):
        print(f"  every worker's cache full after {figures['full_after_tokens']:,} tokens")
    if "growth_once_full_kib" in figures:
        print(
            f"  RSS growth while filling: {figures['growth_while_filling_kib'] / 1024:.1f} MiB over"
            f" {figures['tokens_while_filling']:,} tokens; once full: {figures['growth_once_full_kib'] / 1024:.1f}"
            f" MiB over {figures['tokens_once_full']:,} tokens"
            f" (allowed {figures['allowed_growth_once_full_kib'] / 1024:.1f} MiB)"
        )
