"""Index memory and decision latency at scale: a real redis-server filled with millions of entries.

Starts its own ``redis-server`` (``geo_route.devstack.redis_server``: a free loopback port, a temp
directory, stopped by its PID), then:

1. measures decisions on the empty index (``RedisIndexStore.lookup``: blob, manifest and tag, each
   ``--lookups`` times, p50/p99 wall and Redis's CPU per call from ``INFO commandstats``);
2. fills it with ``--entries`` (repository, digest) presence entries over ``--repositories``
   repositories (sizes drawn from a Pareto law: a few huge repositories, a long tail of small ones;
   ``--manifest-share`` of them manifests, the rest blobs), then ``--pins`` primary pins
   (``primary:tags``) on those manifests, with the four manifest media types, and (unless
   ``--no-local-tags``) the same tags in the local registry's ``local:tags``;
3. prints ``used_memory`` per million presence entries, per million pins and per million local
   tags, the encodings Redis chose, and the same decisions again at that size (hits on random
   entries).

Every write is the store's own encoding: updates go through ``RedisIndexStore.commands_for`` and
are sent pipelined, with consecutive ``SADD``s to one key joined into one variadic ``SADD`` and
``EVAL`` sent as ``EVALSHA`` (the same commands, fewer bytes on the wire).

``--config NAME=VALUE`` (repeatable) is applied with ``CONFIG SET`` before the fill, e.g.
``--config hash-max-listpack-value=128`` to measure a recommended setting (docs/capacity.md).

Usage:
    .venv/bin/python benchmarks/index_capacity.py [--entries N] [--pins N] [--repositories N]
        [--lookups N] [--no-local-tags] [--config NAME=VALUE ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from geo_route.config import RedisSettings
from geo_route.devstack.redis_server import RedisProcess
from geo_route.index.model import (
    BlobPresence,
    IndexQuery,
    IndexUpdate,
    LocalTag,
    ManifestPresence,
    PrimaryTag,
    QueryKind,
)
from geo_route.index.redis_store import RedisIndexStore

MEDIA_TYPES = (  # the media types a tag's pin carries, with the share each gets
    ("application/vnd.docker.distribution.manifest.v2+json", 0.55),
    ("application/vnd.oci.image.manifest.v1+json", 0.25),
    ("application/vnd.oci.image.index.v1+json", 0.12),
    ("application/vnd.docker.distribution.manifest.list.v2+json", 0.08),
)
BATCH = 50_000  # updates per pipeline


@dataclass(frozen=True)
class Shape:
    """Repositories, and where each one's entries and pins start in the global numbering."""

    names: list[str]
    entry_starts: list[int]  # repository i holds entries entry_starts[i] .. entry_starts[i+1]-1
    pin_starts: list[int]
    manifest_share: float

    def repository_of(self, entry: int) -> int:
        return bisect.bisect_right(self.entry_starts, entry) - 1

    def is_manifest(self, entry: int) -> bool:
        repository = self.repository_of(entry)
        start, end = self.entry_starts[repository], self.entry_starts[repository + 1]
        return entry < start + max(1, round((end - start) * self.manifest_share))

    def manifests_of(self, repository: int) -> range:
        start, end = self.entry_starts[repository], self.entry_starts[repository + 1]
        return range(start, start + max(1, round((end - start) * self.manifest_share)))


def build_shape(entries: int, pins: int, repositories: int, manifest_share: float, seed: int) -> Shape:
    """Pareto-distributed repository sizes (alpha 1.2): most repositories hold a few dozen entries,
    a few hold hundreds of thousands; every repository holds at least one manifest."""
    chooser = random.Random(seed)
    weights = [chooser.paretovariate(1.2) for _ in range(repositories)]
    total = sum(weights)
    sizes = [max(1, int(entries * weight / total)) for weight in weights]
    sizes[0] += entries - sum(sizes)  # the rounding's remainder (positive: the floors lose some)
    if sizes[0] < 1:
        raise SystemExit("--entries must be at least --repositories")
    names = [f"group-{index // 16}/project-{index}" for index in range(repositories)]
    return Shape(names, cumulative(sizes), cumulative(spread(pins, sizes)), manifest_share)


def spread(pins: int, sizes: list[int]) -> list[int]:
    total = sum(sizes)
    counts = [pins * size // total for size in sizes]
    for index in range(pins - sum(counts)):
        counts[index % len(counts)] += 1
    return counts


def cumulative(sizes: list[int]) -> list[int]:
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + size)
    return starts


def digest_of(entry: int) -> str:
    return "sha256:" + hashlib.sha256(entry.to_bytes(8, "big")).hexdigest()


def tag_of(pin: int) -> str:
    return "latest" if pin % 10 == 0 else f"v1.{pin % 1000}.{pin}"


def presence_updates(shape: Shape) -> Iterator[IndexUpdate]:
    for repository, name in enumerate(shape.names):
        manifests = shape.manifests_of(repository)
        for entry in range(shape.entry_starts[repository], shape.entry_starts[repository + 1]):
            if entry in manifests:
                yield ManifestPresence(name, digest_of(entry), True)
            else:
                yield BlobPresence(name, digest_of(entry), True)


def pin_updates(shape: Shape, confirmed_at: float, epoch: str, seed: int) -> Iterator[IndexUpdate]:
    chooser = random.Random(seed)
    types, shares = [t for t, _ in MEDIA_TYPES], [s for _, s in MEDIA_TYPES]
    for repository, name in enumerate(shape.names):
        manifests = shape.manifests_of(repository)
        for pin in range(shape.pin_starts[repository], shape.pin_starts[repository + 1]):
            media_type = chooser.choices(types, shares)[0]
            digest = digest_of(manifests[chooser.randrange(len(manifests))])
            yield PrimaryTag(name, tag_of(pin), digest, confirmed_at, media_type, epoch=epoch)


def local_tag_updates(shape: Shape, seed: int) -> Iterator[IndexUpdate]:
    """The same tags as the local registry holds them (``local:tags``: GitLab Geo replicates every tag)."""
    for pin in pin_updates(shape, 0.0, "", seed):
        assert isinstance(pin, PrimaryTag)
        yield LocalTag(pin.repository, pin.tag, pin.digest)


def fill(store: RedisIndexStore, client: redis.Redis, updates: Iterator[IndexUpdate]) -> int:
    """Send ``updates`` as the store encodes them, pipelined in batches; returns the commands sent."""
    shas: dict[str, str] = {}
    sent = 0
    batch: list[IndexUpdate] = []
    for update in updates:
        batch.append(update)
        if len(batch) == BATCH:
            sent += send(store, client, batch, shas)
            batch = []
    if batch:
        sent += send(store, client, batch, shas)
    return sent


def send(store: RedisIndexStore, client: redis.Redis, batch: list[IndexUpdate], shas: dict[str, str]) -> int:
    """One pipeline: ``SADD``s gathered per key (members of one set commute) until the next other
    command, which keeps its place; ``EVAL`` as ``EVALSHA``."""
    commands: list[list[str]] = []
    members: dict[str, dict[str, None]] = {}  # key -> members, in order, since the last other command
    for update in batch:
        for command in store.commands_for(update):
            if command[0] == "SADD":
                members.setdefault(command[1], {}).update(dict.fromkeys(command[2:]))
                continue
            commands += [["SADD", key, *found] for key, found in members.items()]
            members.clear()
            if command[0] == "EVAL":
                script = command[1]
                sha = shas.get(script) or shas.setdefault(script, str(client.script_load(script)))
                commands.append(["EVALSHA", sha, *command[2:]])
            else:
                commands.append(list(command))
    commands += [["SADD", key, *found] for key, found in members.items()]
    with client.pipeline(transaction=False) as pipe:
        for packed in commands:
            pipe.execute_command(*packed)
        pipe.execute()
    return len(commands)


def queries(shape: Shape, kind: QueryKind, count: int, seed: int) -> list[IndexQuery]:
    """``count`` random lookups of entries (blobs or manifests) or pins that the fill writes."""
    chooser = random.Random(seed)
    found: list[IndexQuery] = []
    entries, pins = shape.entry_starts[-1], shape.pin_starts[-1]
    while len(found) < count:
        if kind is QueryKind.TAG:
            pin = chooser.randrange(pins)
            repository = bisect.bisect_right(shape.pin_starts, pin) - 1
            found.append(IndexQuery(kind, shape.names[repository], tag_of(pin)))
            continue
        entry = chooser.randrange(entries)
        if shape.is_manifest(entry) == (kind is QueryKind.MANIFEST):
            found.append(IndexQuery(kind, shape.names[shape.repository_of(entry)], digest_of(entry)))
    return found


def measure_lookups(store: RedisIndexStore, client: redis.Redis, batch: list[IndexQuery]) -> dict[str, Any]:
    """Wall time per ``store.lookup`` (one round trip each) and Redis's CPU per script call."""
    for query in batch[:500]:  # warm the connection and the script cache
        store.lookup(query)
    client.config_resetstat()
    times, hits = [], 0
    for query in batch:
        started = time.perf_counter()
        view = store.lookup(query)
        times.append(time.perf_counter() - started)
        hits += view.present or bool(view.pinned_digest)
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    times.sort()
    return {
        "lookups": len(batch),
        "hits": hits,
        "p50_us": 1e6 * times[len(times) // 2],
        "p99_us": 1e6 * times[int(len(times) * 0.99)],
        "mean_us": 1e6 * statistics.fmean(times),
        "redis_us_per_call": float(stats.get("usec_per_call", 0.0)),
    }


def measure_all(store: RedisIndexStore, client: redis.Redis, shape: Shape, count: int, label: str) -> dict[str, Any]:
    results = {}
    for number, kind in enumerate((QueryKind.BLOB, QueryKind.MANIFEST, QueryKind.TAG)):
        results[kind.value] = found = measure_lookups(store, client, queries(shape, kind, count, seed=number))
        print(
            f"{label:<6} {kind.value:<9} p50 {found['p50_us']:6.1f} us  p99 {found['p99_us']:7.1f} us  "
            f"redis {found['redis_us_per_call']:5.2f} us/call  hits {found['hits']}/{found['lookups']}",
            flush=True,
        )
    return results


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def encodings(client: redis.Redis, store: RedisIndexStore, shape: Shape) -> dict[str, dict[str, int]]:
    """How many of the per-repository keys Redis holds in each encoding (a sample of 2,000 repositories)."""
    chooser = random.Random(7)
    sample = chooser.sample(range(len(shape.names)), min(2000, len(shape.names)))
    kinds = {"local:blobs": store.keys.local_blobs, "local:manifests": store.keys.local_manifests}
    kinds["primary:tags"] = store.keys.primary_tags
    counts: dict[str, dict[str, int]] = {}
    with client.pipeline(transaction=False) as pipe:
        for key_of in kinds.values():
            for index in sample:
                pipe.object("encoding", key_of(shape.names[index]))
        answers = pipe.execute()
    for number, kind in enumerate(kinds):
        for encoding in answers[number * len(sample) : (number + 1) * len(sample)]:
            name = str(encoding or "absent")
            counts.setdefault(kind, {})[name] = counts.setdefault(kind, {}).get(name, 0) + 1
    return counts


def run(args: argparse.Namespace) -> dict[str, Any]:
    shape = build_shape(args.entries, args.pins, args.repositories, args.manifest_share, args.seed)
    with tempfile.TemporaryDirectory(prefix="geo-route-capacity-") as directory:
        server = RedisProcess(Path(directory)).start()
        try:
            client = redis.Redis.from_url(server.url, decode_responses=True, socket_timeout=120)
            for setting in args.config or []:
                name, _, value = setting.partition("=")
                client.config_set(name, value)
            store = RedisIndexStore(RedisSettings(url=server.url, socket_timeout=5.0))
            try:
                return measure_site(store, client, shape, args)
            finally:
                store.close()
                client.close()
        finally:
            server.stop()


def measure_site(store: RedisIndexStore, client: redis.Redis, shape: Shape, args: argparse.Namespace) -> dict[str, Any]:
    sizes = sorted(b - a for a, b in zip(shape.entry_starts, shape.entry_starts[1:], strict=False))
    print(
        f"shape: {args.entries:,} entries over {args.repositories:,} repositories (median {sizes[len(sizes) // 2]}, "
        f"largest {sizes[-1]:,}), {args.manifest_share:.0%} manifests; {args.pins:,} pins; redis "
        f"{client.info('server')['redis_version']}; config {args.config or 'default'}",
        flush=True,
    )
    empty = measure_all(store, client, shape, args.lookups, "empty")
    baseline = used_memory(client)
    started = time.perf_counter()
    commands = fill(store, client, presence_updates(shape))
    presence_seconds = time.perf_counter() - started
    after_presence = used_memory(client)
    print(f"presence: {commands:,} commands in {presence_seconds:.0f} s", flush=True)
    now, epoch = store.stamp()
    started = time.perf_counter()
    commands = fill(store, client, pin_updates(shape, now, epoch, args.seed))
    pin_seconds = time.perf_counter() - started
    after_pins = used_memory(client)
    print(f"pins: {commands:,} commands in {pin_seconds:.0f} s", flush=True)
    if args.local_tags:
        fill(store, client, local_tag_updates(shape, args.seed))
    after_local_tags = used_memory(client)
    per_local_tag = (after_local_tags - after_pins) / max(1, args.pins) if args.local_tags else 0.0
    per_entry = (after_presence - baseline) / args.entries
    per_pin = (after_pins - after_presence) / max(1, args.pins)
    found_encodings = encodings(client, store, shape)
    print(
        f"memory: baseline {baseline / 2**20:.1f} MiB, presence {per_entry:.1f} B/entry "
        f"= {per_entry * 1e6 / 2**20:.1f} MiB per million, pins {per_pin:.1f} B/pin "
        f"= {per_pin * 1e6 / 2**20:.1f} MiB per million, local tags {per_local_tag:.1f} B/tag "
        f"= {per_local_tag * 1e6 / 2**20:.1f} MiB per million; total {after_local_tags / 2**30:.2f} GiB, "
        f"{client.dbsize():,} keys",
        flush=True,
    )
    print(f"encodings (sample of repositories): {found_encodings}", flush=True)
    full = measure_all(store, client, shape, args.lookups, "full")
    return {
        "entries": args.entries,
        "pins": args.pins,
        "repositories": args.repositories,
        "config": args.config or [],
        "used_memory": {
            "baseline": baseline,
            "after_presence": after_presence,
            "after_pins": after_pins,
            "after_local_tags": after_local_tags,
        },
        "bytes_per_entry": per_entry,
        "bytes_per_pin": per_pin,
        "bytes_per_local_tag": per_local_tag,
        "fill_seconds": {"presence": presence_seconds, "pins": pin_seconds},
        "encodings": found_encodings,
        "empty": empty,
        "full": full,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=10_000_000, help="presence entries (default 10,000,000)")
    parser.add_argument("--pins", type=int, default=1_000_000, help="primary pins (default 1,000,000)")
    parser.add_argument("--repositories", type=int, default=100_000, help="repositories (default 100,000)")
    parser.add_argument("--manifest-share", type=float, default=0.25, help="manifests among entries (0.25)")
    parser.add_argument("--lookups", type=int, default=20_000, help="lookups per kind and size (default 20,000)")
    parser.add_argument("--config", action="append", metavar="NAME=VALUE", help="CONFIG SET before the fill")
    parser.add_argument("--no-local-tags", dest="local_tags", action="store_false", help="skip local:tags")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results to FILE")
    args = parser.parse_args(argv)
    results = run(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
