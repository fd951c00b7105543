"""The digest index in Redis: the only module of geo-route that imports redis.

Key schema (``P`` is ``redis.key_prefix``, default ``geo-route:``; ``R`` a repository name, which by
the OCI grammar never contains spaces or colons; ``M`` a queue member ``"R TAG"``):

    P repos                  SET   every repository the index has seen
    P local:blobs:R          SET   blob digests present in the local registry
    P local:manifests:R      SET   manifest digests present in the local registry
    P local:tags:R           HASH  tag -> digest in the local registry
    P primary:tags:R         HASH  tag -> "<digest|-> <stamp> <media type|-> <epoch|->": the primary's
                                   answer for the tag, asked at <stamp> (the index's clock); "-" as
                                   the digest is a tombstone (deleted, invalidated, or 404); the four
                                   manifest media types are stored as a code (``MEDIA_TYPE_CODES``),
                                   any other whole (a type always has a "/", a code never)
    P primary:deleted:R      HASH  digest -> stamp: deleted at the primary, not served by digest here
    P primary:invalidated:R  STRING stamp of the repository's last rename (or unreadable event): no
                                   pin asked before it lands
    P quarantined            HASH  digest -> "<stamp> <repository>": content whose local copy failed
                                   verification; never local, in any repository (content is stored
                                   once per digest) until a later verification matches
    P verify:suspects        ZSET  "R DIGEST blob|manifest" -> due time: content to verify before anything else (a
                                   client fetched it again: it may have rejected the bytes)
    P verify:trusted:DIGEST  STRING (expires) stamp of the last verification since a refetch asked for
                                   one: refetches are served here meanwhile
    P verify:cursor          STRING the repository the verification pass finished last
    P reconcile:cursor       STRING where the spread reconciliation's cycle is (``reconcile_cycle.Cursor``)
    P resolve                ZSET  M -> due time: tags to ask the primary about; a claimed one stays,
                                   due at its claim's end (``claim_resolutions``)
    P resolve:hints          HASH  M -> "<digest> <attempts>": what an event said the tag now is
    P epoch                  STRING the index's epoch; pins of another epoch are unconfirmed
    P server                 STRING the Redis run_id the epoch belongs to
    P lock:NAME              STRING a lease (one reconciliation at a time); value = its owner
    P status                 HASH  name -> "<stamp> <JSON>": what the updater last recorded (``reconcile``,
                                   ``verify``, ``events:local``, ``events:primary``) for ``geo-route status``

On a Redis Cluster (``redis.cluster_nodes``) every key but ``verify:cursor`` and the leases also
carries its bucket's hash tag after ``P`` (``KeySchema``): the repository's keys and its bucket's
``repos``, ``epoch``, ``server``, ``resolve``, ``resolve:hints``, ``quarantined`` (a copy per
bucket), ``verify:suspects`` and ``verify:trusted:DIGEST``.

Clock: every stamp is the Redis server's ``TIME`` (one clock for every worker and node of a site),
read inside the script that uses it; ``clock=`` replaces it (tests with a controlled clock).

Epoch: every new connection compares the server's ``run_id`` with ``P server``. A restart (from a
snapshot or not), a failover to a replica or a restore gives another run_id: the first connection
that sees it starts a new epoch, so every pin written before is unconfirmed (routed to the primary
and re-resolved), never served stale (docs/consistency.md).

A decision costs exactly one round trip on a per-thread connection: one Lua script for a blob
(present and not quarantined; for a refetch, verified lately or queued for verification), for a
manifest by digest (the same, and not deleted at the primary) and for a tag (the
pin, its epoch, the pinned manifest's presence, the clock, and queueing a resolution when the pin
is missing, unconfirmed or due for refresh). Writes go in one ``MULTI``/``EXEC`` per call, sent as
one write. After a failure the store answers "unavailable" at once for ``unavailable_cooldown``
seconds instead of waiting on a dead Redis for every request.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import secrets
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import redis
import redis.cluster
import redis.sentinel
from hiredis import pack_command  # redis[hiredis]
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from geo_route.config import RedisSettings
from geo_route.errors import GeoRouteError, IndexUnavailable
from geo_route.index.model import (
    BlobPresence,
    ContentVerified,
    DigestDeleted,
    DigestRestored,
    IndexFigures,
    IndexQuery,
    IndexUpdate,
    IndexView,
    LocalRepositoryDropped,
    LocalTag,
    ManifestPresence,
    PinEntry,
    PrimaryTag,
    QueryKind,
    RedisTopology,
    RepositoryInvalidated,
    StatusRecord,
    TagInvalidated,
    TagResolution,
)

T = TypeVar("T")
CONTENT_KEYS_CACHE_SIZE = 4096  # (repository, digest, kind) -> a content lookup's keys
log = logging.getLogger("geo_route.index")
CLAIM_SECONDS = 60.0  # a claim neither pinned nor requeued by then is due again (updater.resolve_claim_seconds)
RESOLVE_QUEUE_MAX = 100_000  # reads stop queueing resolutions beyond this (events still do)
SUSPECTS_MAX = 100_000  # refetches stop queueing verifications beyond this (they go to the primary)
TOMBSTONE = "-"
# A pin names its manifest's media type by a code: 45 bytes less per pin, which brings a pin under
# 128 bytes (docs/capacity.md: with ``hash-max-listpack-value 128`` a repository's pins stay a
# listpack). Codes never contain "/": a pin written before the codes (the whole type) reads as before.
MEDIA_TYPE_CODES = {
    "application/vnd.oci.image.manifest.v1+json": "om",
    "application/vnd.oci.image.index.v1+json": "oi",
    "application/vnd.docker.distribution.manifest.v2+json": "d2",
    "application/vnd.docker.distribution.manifest.list.v2+json": "dl",
}
MEDIA_TYPES_BY_CODE = {code: media_type for media_type, code in MEDIA_TYPE_CODES.items()}

# Shared Lua: the clock (ARGV "" = the server's TIME), a pin's fields, and invalidating one tag.
LUA_COMMON = """
local function clock(arg)
  if arg ~= nil and arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function fields(value)
  local digest, stamp, media, epoch = string.match(value, '^(%S+) (%S+) (%S+) (%S+)$')
  if not digest then return '-', 0, '-', '-' end
  return digest, tonumber(stamp) or 0, media, epoch
end
local function stamp_of(value)
  if not value then return nil end
  local _, stamp = fields(value)
  return stamp
end
local function epoch_now(key)
  return redis.call('GET', key) or '-'
end
local function repositories_under(prefix, repository, subtree, itself)
  local names = {}
  if itself then table.insert(names, repository) end
  if subtree then
    for _, name in ipairs(redis.call('SMEMBERS', prefix .. 'repos')) do
      if string.sub(name, 1, #repository + 1) == repository .. '/' then table.insert(names, name) end
    end
  end
  return names
end
local function release_claim(queue_key, member, claimed)
  if claimed == nil or claimed == '' then return false end
  local score = redis.call('ZSCORE', queue_key, member)
  if score and tonumber(score) == tonumber(claimed) then
    redis.call('ZREM', queue_key, member)
    return true
  end
  return false
end
local function invalidate(tags_key, queue_key, hints_key, epoch, tag, member, stamp, hint)
  local held = stamp_of(redis.call('HGET', tags_key, tag))
  if held and held > stamp then stamp = held end
  redis.call('HSET', tags_key, tag, '- ' .. string.format('%.6f', stamp) .. ' - ' .. epoch)
  redis.call('ZADD', queue_key, stamp, member)
  if hint ~= '' then redis.call('HSET', hints_key, member, hint .. ' 0') end
  return stamp
end
"""
# KEYS: tags, epoch, deleted, hints, queue, invalidated
# ARGV: tag, digest ('' = 404), stamp, media type, member, hint, epoch asked in ('' = any), now,
#       the claim it answers ('' = none)
# An answer lands only if it is newer than the tag's entry, than its repository's last
# invalidation and than its digest's deletion mark, and was asked in the current epoch. One that
# loses to anything but a pin at least as new is queued again (for when a fence's time has come),
# so the tag is re-resolved rather than left unpinned until a read notices it.
SET_PIN_IF_NEWER_SCRIPT = (
    LUA_COMMON
    + """
local stamp = tonumber(ARGV[3])
release_claim(KEYS[5], ARGV[5], ARGV[9])
local epoch = epoch_now(KEYS[2])
local held_value = redis.call('HGET', KEYS[1], ARGV[1])
local held = stamp_of(held_value)
local floor = tonumber(redis.call('GET', KEYS[6]) or '')
local marked = ARGV[2] ~= '' and tonumber(redis.call('HGET', KEYS[3], ARGV[2]) or '') or nil
local stale = (held and (stamp < held or (ARGV[2] ~= '' and stamp == held)))
  or (floor and stamp <= floor) or (marked and stamp < marked) or (ARGV[7] ~= '' and ARGV[7] ~= epoch)
if stale then
  local newer_pin = held and stamp <= held and fields(held_value) ~= '-'
  if not newer_pin then
    local due = clock(ARGV[8])
    if held and held > due then due = held end
    redis.call('ZADD', KEYS[5], 'NX', due, ARGV[5])
  end
  return 0
end
local media = ARGV[4] ~= '' and ARGV[4] or '-'
local digest = ARGV[2] ~= '' and ARGV[2] or '-'
redis.call('HSET', KEYS[1], ARGV[1], digest .. ' ' .. string.format('%.6f', stamp) .. ' ' .. media .. ' ' .. epoch)
if marked and marked < stamp then redis.call('HDEL', KEYS[3], ARGV[2]) end
if ARGV[6] ~= '' and redis.call('HGET', KEYS[4], ARGV[5]) == ARGV[6] then redis.call('HDEL', KEYS[4], ARGV[5]) end
return 1
"""
)
# KEYS: tags, queue, hints, epoch   ARGV: tag, member, now, fence, hint
INVALIDATE_TAG_SCRIPT = (
    LUA_COMMON
    + """
invalidate(KEYS[1], KEYS[2], KEYS[3], epoch_now(KEYS[4]), ARGV[1], ARGV[2], clock(ARGV[3]) + tonumber(ARGV[4]), ARGV[5])
return 1
"""
)
# Every tag of each repository (one, or a subtree) that is pinned, or pinned to one digest.
# KEYS: queue, hints, epoch, deleted (any key of the bucket when digest is '')
# ARGV: prefix, repository, subtree 0/1, digest-or-'', now, fence, the repository itself 1/0 (0: a
# bucket of a cluster that holds only repositories under it)
INVALIDATE_TAGS_SCRIPT = (
    LUA_COMMON
    + """
local prefix, repository, digest = ARGV[1], ARGV[2], ARGV[4]
local stamp = clock(ARGV[5]) + tonumber(ARGV[6])
local epoch = epoch_now(KEYS[3])
if digest ~= '' then
  local marked = tonumber(redis.call('HGET', KEYS[4], digest) or '')
  if not marked or marked < stamp then redis.call('HSET', KEYS[4], digest, string.format('%.6f', stamp)) end
end
local names = repositories_under(prefix, repository, ARGV[3] == '1', ARGV[7] ~= '0')
local count = 0
for _, name in ipairs(names) do
  if digest == '' then
    local floor_key = prefix .. 'primary:invalidated:' .. name
    local floor = tonumber(redis.call('GET', floor_key) or '')
    if not floor or floor < stamp then redis.call('SET', floor_key, string.format('%.6f', stamp)) end
  end
  local tags_key = prefix .. 'primary:tags:' .. name
  local entries = redis.call('HGETALL', tags_key)
  for i = 1, #entries, 2 do
    local pinned = fields(entries[i + 1])
    if pinned ~= '-' and (digest == '' or pinned == digest) then
      invalidate(tags_key, KEYS[1], KEYS[2], epoch, entries[i], name .. ' ' .. entries[i], stamp, '')
      count = count + 1
    end
  end
end
return count
"""
)
# Forget what the local registry held in a repository (and, with subtree, every repository under it).
# KEYS: the bucket's repos   ARGV: prefix, repository, subtree 0/1, the repository itself 1/0
DROP_LOCAL_SCRIPT = (
    LUA_COMMON
    + """
local prefix, repository = ARGV[1], ARGV[2]
local names = repositories_under(prefix, repository, ARGV[3] == '1', ARGV[4] ~= '0')
for _, name in ipairs(names) do
  local here = prefix .. 'local:'
  redis.call('DEL', here .. 'blobs:' .. name, here .. 'manifests:' .. name, here .. 'tags:' .. name)
end
return #names
"""
)
# A tag already queued keeps its due time (a claim in flight is not asked again), except when its
# entry is of another epoch: a claim made before a restart or failover (in the snapshot, or on the
# promoted replica) may have nobody left to answer it, so the read makes the tag due now.
# KEYS: tags, manifests, epoch, queue, quarantined   ARGV: tag, member, now, refresh_after, queue max
PINNED_TAG_SCRIPT = (
    LUA_COMMON
    + """
local now = clock(ARGV[3])
local pinned = redis.call('HGET', KEYS[1], ARGV[1])
local epoch = epoch_now(KEYS[3])
local present = 0
local due = now
local fresh = false
local queued = 'NX'
if pinned then
  local digest, stamp, _, pin_epoch = fields(pinned)
  if stamp > now then due = stamp end
  fresh = pin_epoch == epoch and now - stamp <= tonumber(ARGV[4])
  if pin_epoch ~= epoch then queued = 'LT' end
  if digest ~= '-' and redis.call('HEXISTS', KEYS[5], digest) == 0 then
    present = redis.call('SISMEMBER', KEYS[2], digest)
  end
end
if not fresh and redis.call('ZCARD', KEYS[4]) < tonumber(ARGV[5]) then
  redis.call('ZADD', KEYS[4], queued, due, ARGV[2])
end
return {pinned or '', present, epoch, string.format('%.6f', now)}
"""
)
# A blob or manifest by digest: 0 not here, 1 here, 2 quarantined, 3 a refetch queued for verification.
# A refetch of content verified (on suspicion) within its trust is here, and queued for verification
# again once that verification is older than the recheck.
# KEYS: present, quarantined, trusted, suspects, deleted (a manifest's; any key of the bucket for a blob)
# ARGV: digest, refetch 1/0, suspect member, now, suspects max, recheck seconds, manifest 1/0
CONTENT_SCRIPT = (
    LUA_COMMON
    + """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 2 end
if ARGV[7] == '1' and redis.call('HEXISTS', KEYS[5], ARGV[1]) == 1 then return 0 end
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return 0 end
if ARGV[2] == '1' then
  local now = clock(ARGV[4])
  local verified = tonumber(redis.call('GET', KEYS[3]) or '')
  if not verified or now - verified > tonumber(ARGV[6]) then
    if redis.call('ZCARD', KEYS[4]) < tonumber(ARGV[5]) then redis.call('ZADD', KEYS[4], 'NX', now, ARGV[3]) end
  end
  if not verified then return 3 end
end
return 1
"""
)
# KEYS: quarantined, trusted, suspects   ARGV: digest, intact 1/0, repository, trust seconds, member, now
VERIFIED_SCRIPT = (
    LUA_COMMON
    + """
redis.call('ZREM', KEYS[3], ARGV[5])
if ARGV[2] == '1' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  local trust = math.floor(tonumber(ARGV[4]) * 1000)
  local stamp = string.format('%.6f', clock(ARGV[6]))
  if trust > 0 then
    redis.call('SET', KEYS[2], stamp, 'PX', trust)
  elseif redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('SET', KEYS[2], stamp, 'KEEPTTL')
  end
else
  redis.call('HSET', KEYS[1], ARGV[1], string.format('%.6f', clock(ARGV[6])) .. ' ' .. ARGV[3])
  redis.call('DEL', KEYS[2])
end
return 1
"""
)
# KEYS: suspects   ARGV: now, limit  ->  {member, ...} due now, taken off the queue
CLAIM_SUSPECTS_SCRIPT = (
    LUA_COMMON
    + """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', clock(ARGV[1]), 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do redis.call('ZREM', KEYS[1], member) end
return due
"""
)
# A claim leaves the tag in the queue, due again at the claim's end: until then no other claim takes
# it; its pin or requeue releases it (only while the claim is still the tag's score: an invalidation
# or a read that queued it meanwhile keeps its own due time), and if neither ever comes (the updater
# died, Redis failed the write) the tag is claimed again at the claim's end.
# KEYS: queue, hints, epoch   ARGV: now, limit, claim seconds
#   ->  {now, epoch, claimed until, member, hint, member, hint, ...}
CLAIM_SCRIPT = (
    LUA_COMMON
    + """
local now = clock(ARGV[1])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local claimed = string.format('%.6f', now + tonumber(ARGV[3]))
local out = {string.format('%.6f', now), epoch_now(KEYS[3]), claimed}
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], 'XX', claimed, member)
  table.insert(out, member)
  table.insert(out, redis.call('HGET', KEYS[2], member) or '')
end
return out
"""
)
# KEYS: queue, hints   ARGV: member, due, hint as claimed, hint to store ('' = leave it), claim ('' = none)
REQUEUE_SCRIPT = (
    LUA_COMMON
    + """
if release_claim(KEYS[1], ARGV[1], ARGV[5]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
else
  redis.call('ZADD', KEYS[1], 'LT', ARGV[2], ARGV[1])
end
if ARGV[4] ~= '' and redis.call('HGET', KEYS[2], ARGV[1]) == ARGV[3] then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
end
return 1
"""
)
# KEYS: deleted   ARGV: digest, stamp ('' = unconditionally): clear a deletion mark older than stamp
RESTORE_DIGEST_SCRIPT = """
local marked = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '')
if marked and (ARGV[2] == '' or marked < tonumber(ARGV[2])) then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
"""
# KEYS: epoch, server   ARGV: run_id, new epoch  -> 1 when a new epoch began
ENSURE_EPOCH_SCRIPT = """
if redis.call('GET', KEYS[2]) == ARGV[1] and redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[1])
return 1
"""
# KEYS: epoch   ARGV: now  ->  {now, epoch}
STAMP_SCRIPT = LUA_COMMON + "return {string.format('%.6f', clock(ARGV[1])), epoch_now(KEYS[1])}"
# KEYS: status   ARGV: name, JSON, now
RECORD_STATUS_SCRIPT = (
    LUA_COMMON + "return redis.call('HSET', KEYS[1], ARGV[1], string.format('%.6f', clock(ARGV[3])) .. ' ' .. ARGV[2])"
)
# KEYS: resolve, suspects, quarantined, repos   ARGV: now
# -> {now, resolutions, due, oldest due score, suspects, oldest suspect score, quarantined, repositories}
FIGURES_SCRIPT = (
    LUA_COMMON
    + """
local now = clock(ARGV[1])
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local suspect = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
return {string.format('%.6f', now), redis.call('ZCARD', KEYS[1]), redis.call('ZCOUNT', KEYS[1], '-inf', now),
  first[2] or '', redis.call('ZCARD', KEYS[2]), suspect[2] or '', redis.call('HLEN', KEYS[3]),
  redis.call('SCARD', KEYS[4])}
"""
)
RELEASE_OWN_LEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
RENEW_OWN_LEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class KeySchema:
    """Builds every key; the one place that knows the layout described above.

    On one Redis (or under Sentinel) every key is ``P`` + name, as the module docstring shows. On a
    Redis Cluster each repository belongs to one of ``buckets`` buckets (CRC-32 of its name), and
    every key of the repository and of its bucket (its repos set, epoch, resolution queue,
    quarantine copy, suspects) carries the bucket's hash tag: ``P{gN}local:blobs:R``. A decision
    and an applied batch therefore stay in one hash slot; work across buckets is split per bucket.
    Only ``verify:cursor``, ``reconcile:cursor`` and the leases stay untagged (single-key commands).
    """

    def __init__(self, prefix: str, buckets: int = 0) -> None:
        self.prefix = prefix
        self.clustered = buckets > 0
        self.buckets: tuple[str, ...] = tuple(f"{{g{n}}}" for n in range(buckets)) if buckets else ("",)
        self.verify_cursor = f"{prefix}verify:cursor"
        self.reconcile_cursor = f"{prefix}reconcile:cursor"
        self.status = f"{prefix}status"

    def bucket(self, repository: str) -> str:
        """The hash tag of the repository's bucket ("" on one Redis)."""
        if not self.clustered:
            return ""
        return self.buckets[zlib.crc32(repository.encode()) % len(self.buckets)]

    def space(self, bucket: str) -> str:
        """What every key of a bucket starts with (the prefix the scripts build key names from)."""
        return f"{self.prefix}{bucket}"

    def repos(self, bucket: str = "") -> str:
        return f"{self.space(bucket)}repos"

    def resolve(self, bucket: str = "") -> str:
        return f"{self.space(bucket)}resolve"

    def hints(self, bucket: str = "") -> str:
        return f"{self.space(bucket)}resolve:hints"

    def epoch(self, bucket: str = "") -> str:
        return f"{self.space(bucket)}epoch"

    def server(self, bucket: str = "") -> str:
        return f"{self.space(bucket)}server"

    def quarantined(self, bucket: str = "") -> str:
        return f"{self.space(bucket)}quarantined"

    def suspects(self, bucket: str = "") -> str:
        return f"{self.space(bucket)}verify:suspects"

    def trusted(self, digest: str, bucket: str = "") -> str:
        return f"{self.space(bucket)}verify:trusted:{digest}"

    def local_blobs(self, repository: str) -> str:
        return f"{self.space(self.bucket(repository))}local:blobs:{repository}"

    def local_manifests(self, repository: str) -> str:
        return f"{self.space(self.bucket(repository))}local:manifests:{repository}"

    def local_tags(self, repository: str) -> str:
        return f"{self.space(self.bucket(repository))}local:tags:{repository}"

    def primary_tags(self, repository: str) -> str:
        return f"{self.space(self.bucket(repository))}primary:tags:{repository}"

    def primary_deleted(self, repository: str) -> str:
        return f"{self.space(self.bucket(repository))}primary:deleted:{repository}"

    def primary_invalidated(self, repository: str) -> str:
        return f"{self.space(self.bucket(repository))}primary:invalidated:{repository}"

    def lock(self, name: str) -> str:
        return f"{self.prefix}lock:{name}"


def queue_member(repository: str, tag: str) -> str:
    return f"{repository} {tag}"


def suspect_member(repository: str, digest: str, manifest: bool) -> str:
    return f"{repository} {digest} {'manifest' if manifest else 'blob'}"


def parse_suspect(member: str) -> tuple[str, str, bool]:
    """(repository, digest, manifest?) of a ``verify:suspects`` member."""
    repository, digest, kind = [*member.split(" "), "", ""][:3]
    return repository, digest, kind == "manifest"


def parse_member(member: str) -> tuple[str, str]:
    repository, _, tag = member.rpartition(" ")
    return repository, tag


def decode_pin(value: str) -> tuple[str, float, str, str]:
    """(digest, stamp, media type, epoch) of a stored pin; digest ``""`` for a tombstone."""
    parts = value.split(" ")
    if len(parts) != 4:
        return "", 0.0, "", ""
    digest, stamp, media_type, epoch = parts
    try:
        confirmed = float(stamp)
    except ValueError:
        confirmed = 0.0
    return ("" if digest == TOMBSTONE else digest), confirmed, decode_media_type(media_type), epoch


def encode_media_type(media_type: str) -> str:
    """A pin's media type field: the type's code, or the type itself (parameters dropped)."""
    media_type = media_type.split(";")[0].strip()
    return MEDIA_TYPE_CODES.get(media_type, media_type)


def decode_media_type(field: str) -> str:
    """The media type of a pin's field: a code, a whole type (pins written before the codes, or a
    type without one), "-" for none; an unknown code (a newer version's) reads as none, so the tag
    goes to the primary rather than being served with a type this version cannot name."""
    if field == TOMBSTONE:
        return ""
    return field if "/" in field else MEDIA_TYPES_BY_CODE.get(field, "")


def eval_command(script: str, keys: tuple[str, ...], *args: tuple[str, ...]) -> tuple[str, ...]:
    """``EVAL`` of ``script`` as one command of a transaction."""
    return ("EVAL", script, str(len(keys)), *keys, *(arg for group in args for arg in group))


def sentinel_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` (redis.sentinels) as redis-py's pair."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def cluster_node(address: str) -> redis.cluster.ClusterNode:
    host, port = sentinel_address(address)
    return redis.cluster.ClusterNode(host, port)  # type: ignore[no-untyped-call]


def format_stamp(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


ROUTING_ERRORS = (
    redis.exceptions.AskError,  # MovedError too
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
)


class LookupConnections:
    """One long-lived connection per thread (and per Redis node) for the decision path.

    A decision is a single command, so it skips the client's pool checkout, retry and
    instrumentation layers (about a third of the lookup's CPU): send, read, and on any transport
    error drop the connection so the next lookup starts clean (and, under Sentinel, asks the
    sentinels where the primary is now; on a cluster, asks the cluster for its slots again).

    ``pool_for(key)`` names the pool of the node that holds ``key``: one pool on one Redis or under
    Sentinel (whose connections run the epoch check when they connect), the slot's primary on a
    cluster. On a cluster a connection learns its node's ``run_id`` when it connects and runs the
    epoch check of each bucket (``ensure_epoch``) in the same write as the first command that
    bucket sends on it: a node restarted, or a replica promoted, is a new connection.
    """

    def __init__(
        self,
        pool_for: Callable[[str], redis.ConnectionPool],
        *,
        ensure_epoch: Callable[[str, str], tuple[str, ...]] | None = None,
        refresh: Callable[[], None] | None = None,
    ) -> None:
        self._pool_for = pool_for
        self._ensure_epoch = ensure_epoch
        self._refresh = refresh
        self._refresh_due = False
        self._local = threading.local()
        self._script_shas: dict[str, str] = {}
        self._opened: list[Any] = []
        self._lock = threading.Lock()
        self._failures = 0  # transport failures so far, on any thread's connection
        self.epochs_started = 0  # buckets whose epoch check began a new epoch (cluster)

    def connection(self, key: str = "") -> Any:
        if self._refresh_due and self._refresh is not None:
            self._refresh_slots()
        pool = self._pool_for(key)
        connections = getattr(self._local, "connections", None)
        if connections is None:
            connections = self._local.connections = {}
        connection: Any = connections.get(id(pool))
        if connection is None:
            connection = connections[id(pool)] = pool.make_connection()
            with self._lock:
                self._opened.append(connection)
        elif self._local.failures != self._failures:
            # Another thread's connection failed since this one was last used: start afresh too rather
            # than wait out the socket timeout on a primary that may be gone (a failover, a restart).
            connection.disconnect()
        self._local.failures = self._failures
        if not connection.is_connected:
            # connect() itself, not the reconnect inside send_command: under Sentinel, connect() is
            # where a connection asks the sentinels for the primary's address (after a failover, anew).
            try:
                connection.connect()
                if self._ensure_epoch is not None:
                    connection.geo_route_run_id = read_run_id(connection)
                    connection.geo_route_buckets = set()
            except BaseException:
                connection.disconnect()
                self.failed()  # on a cluster: the node may be gone, ask for the slots again
                raise
        return connection

    def _refresh_slots(self) -> None:
        with self._lock:
            if not self._refresh_due or self._refresh is None:
                return
            try:
                self._refresh()
            except Exception as exc:  # redis-py raises RedisClusterException, not a RedisError, here
                raise redis.ConnectionError(f"cluster slots: {type(exc).__name__}") from None
            self._refresh_due = False

    def failed(self) -> None:
        """A connection to the same Redis failed: every thread's connection starts afresh (and a
        cluster's slots are asked for again before the next command)."""
        self._failures += 1
        self._refresh_due = True

    def _with_epoch(self, connection: Any, bucket: str, commands: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
        if self._ensure_epoch is None or bucket in connection.geo_route_buckets:
            return commands
        return [self._ensure_epoch(bucket, connection.geo_route_run_id), *commands]

    def _epoch_checked(self, connection: Any, bucket: str, sent: int, replies: list[Any]) -> list[Any]:
        """The replies of the commands asked for, without the epoch check's (if one was sent)."""
        if len(replies) == sent:
            return replies
        check, *rest = replies
        if isinstance(check, Exception):
            raise check
        connection.geo_route_buckets.add(bucket)
        if check == 1:
            self.epochs_started += 1
            log.warning("index epoch started for bucket %s: pins written before are unconfirmed", bucket)
        return rest

    def run_transaction(self, commands: list[tuple[str, ...]], key: str = "", bucket: str = "") -> list[Any]:
        """``MULTI``, the commands, ``EXEC`` in one write and one round trip; all or nothing."""
        connection = self.connection(key)
        wrapped = [("MULTI",), *commands, ("EXEC",)]
        sent = self._with_epoch(connection, bucket, wrapped)
        try:
            connection.send_packed_command(connection.pack_commands(sent), check_health=False)
            checks = [self._read(connection) for _ in range(len(sent) - len(wrapped))]
            queued_errors = []
            for _ in range(len(commands) + 1):  # +OK for MULTI, +QUEUED per command (or an error)
                try:
                    connection.read_response()
                except redis.ResponseError as exc:
                    queued_errors.append(exc)
            results = self._read(connection)  # EXEC: the replies, or EXECABORT after a queueing error
        except BaseException:
            connection.disconnect()
            self.failed()
            raise
        self._epoch_checked(connection, bucket, 0, checks)
        if queued_errors:
            self._routing_failed(queued_errors[0])
            raise queued_errors[0]
        if isinstance(results, Exception):
            raise results
        failed = [reply for reply in results if isinstance(reply, Exception)]
        if failed:
            raise failed[0]
        return list(results)

    @staticmethod
    def _read(connection: Any) -> Any:
        """A reply, an error reply returned rather than raised (the caller decides)."""
        try:
            return connection.read_response()
        except redis.ResponseError as exc:
            return exc

    def _routing_failed(self, exc: Exception) -> None:
        if isinstance(exc, ROUTING_ERRORS):  # the slot moved, or the cluster is failing over
            self.failed()

    def run(self, *args: str, key: str = "", bucket: str = "") -> Any:
        connection = self.connection(key)
        sent = self._with_epoch(connection, bucket, [args])
        try:
            if len(sent) == 1:  # hiredis packs in C what redis-py's send_command encodes argument by argument
                connection.send_packed_command([pack_command(args)], check_health=False)  # type: ignore[arg-type]
                return connection.read_response()
            connection.send_packed_command(connection.pack_commands(sent), check_health=False)
            replies = [self._read(connection) for _ in sent]
        except redis.ResponseError as exc:
            self._routing_failed(exc)
            raise
        except BaseException:
            connection.disconnect()
            self.failed()
            raise
        (reply,) = self._epoch_checked(connection, bucket, 1, replies)
        if isinstance(reply, Exception):
            self._routing_failed(reply)
            raise reply
        return reply

    def run_script(self, script: str, keys: tuple[str, ...], args: tuple[str, ...], bucket: str = "") -> Any:
        sha = self._script_shas.get(script) or self._script_shas.setdefault(
            script, hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()
        )
        try:
            return self.run("EVALSHA", sha, str(len(keys)), *keys, *args, key=keys[0], bucket=bucket)
        except redis.exceptions.NoScriptError:
            return self.run("EVAL", script, str(len(keys)), *keys, *args, key=keys[0], bucket=bucket)

    def close(self) -> None:
        with self._lock:
            for connection in self._opened:
                connection.disconnect()


def read_run_id(connection: Any) -> str:
    """The ``run_id`` of the Redis a connection is connected to (another one after every restart)."""
    connection.send_command("INFO", "server", check_health=False)
    info = connection.read_response()
    text = info.decode() if isinstance(info, bytes) else str(info)
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("run_id:")), "")


class RedisIndexStore:
    """``IndexStore`` on a Redis server, with short timeouts and no client-side retries."""

    def __init__(
        self,
        settings: RedisSettings,
        *,
        client: redis.Redis | None = None,
        clock: Callable[[], float] = time.monotonic,
        index_clock: Callable[[], float] | None = None,
    ) -> None:
        self.keys = KeySchema(settings.key_prefix, settings.cluster_buckets if settings.cluster_nodes else 0)
        self._content_keys = functools.lru_cache(maxsize=CONTENT_KEYS_CACHE_SIZE)(self._content_keys_of)
        self._sentinel: redis.sentinel.Sentinel | None = None
        self._master_name = settings.master_name
        self._cluster: redis.cluster.RedisCluster | None = None
        self._client: Any = client or self._connect(settings)
        if self._cluster is not None:
            self._lookups: LookupConnections = LookupConnections(
                self._cluster_pool, ensure_epoch=self._ensure_epoch_command, refresh=self._refresh_slots
            )
        else:
            pool = self._client.connection_pool
            self._lookups = LookupConnections(lambda _key: pool)
        self._clock = clock
        self._index_clock = index_clock  # None: the Redis server's TIME
        self._cooldown = settings.unavailable_cooldown
        self._down_until: dict[str, float] = {}  # per node on a cluster ("" on one Redis)
        self._leases: dict[str, str] = {}
        self._epochs_started = 0

    @property
    def epochs_started(self) -> int:
        """How many epoch checks began a new epoch (per bucket on a cluster)."""
        return self._epochs_started + self._lookups.epochs_started

    def _connect(self, settings: RedisSettings) -> Any:
        """The client: short timeouts, no retries, the epoch check on every new connection; on one
        URL, on whichever node Redis Sentinel names the primary when the connection is made, or on
        a Redis Cluster (whose epoch checks run per bucket on the decision path's connections)."""
        options: dict[str, Any] = {
            "socket_timeout": settings.socket_timeout,
            "socket_connect_timeout": settings.connect_timeout,
            "max_connections": settings.max_connections,
            "retry": Retry(NoBackoff(), 0),
            "decode_responses": True,
            "redis_connect_func": self._on_connect,
            **({"username": settings.username} if settings.username else {}),
            **({"password": settings.password} if settings.password else {}),
        }
        tls: dict[str, Any] = {"ssl_ca_certs": settings.tls_ca_file} if settings.tls_ca_file else {}
        if settings.cluster_nodes:
            del options["redis_connect_func"]
            self._cluster = redis.cluster.RedisCluster(
                startup_nodes=[cluster_node(address) for address in settings.cluster_nodes],
                require_full_coverage=False,  # a slot without a primary fails alone, its buckets go to the primary
                **options,
                **({"ssl": True, **tls} if settings.tls else {}),
            )
            return self._cluster
        if not settings.sentinels:
            return redis.Redis.from_url(settings.url, **options, **(tls if settings.url.startswith("rediss:") else {}))
        self._sentinel = redis.sentinel.Sentinel(
            [sentinel_address(address) for address in settings.sentinels],
            sentinel_kwargs={
                "socket_timeout": settings.socket_timeout,
                "socket_connect_timeout": settings.connect_timeout,
                "decode_responses": True,
                **({"username": settings.sentinel_username} if settings.sentinel_username else {}),
                **({"password": settings.sentinel_password} if settings.sentinel_password else {}),
                **({"ssl": True, **tls} if settings.sentinel_tls else {}),
            },
        )
        # Its connections ask the sentinels for the primary's address whenever they connect; one that
        # meets a demoted primary (READONLY) drops itself, and the next one asks again.
        client: redis.Redis = self._sentinel.master_for(
            settings.master_name, db=settings.db, **options, **({"ssl": True, **tls} if settings.tls else {})
        )
        return client

    def _now_arg(self) -> str:
        return format_stamp(self._index_clock()) if self._index_clock is not None else ""

    def _on_connect(self, connection: Any) -> None:
        """Every new connection: the usual handshake, then the epoch check (module docstring)."""
        connection.on_connect()
        run_id = read_run_id(connection)
        connection.send_command(*self._ensure_epoch_command("", run_id), check_health=False)
        if connection.read_response() == 1:
            self._epochs_started += 1
            log.warning("index epoch started (Redis run_id %s): pins written before are unconfirmed", run_id[:12])

    def _ensure_epoch_command(self, bucket: str, run_id: str) -> tuple[str, ...]:
        keys = (self.keys.epoch(bucket), self.keys.server(bucket))
        return eval_command(ENSURE_EPOCH_SCRIPT, keys, (run_id, secrets.token_hex(8)))

    def _cluster_pool(self, key: str) -> redis.ConnectionPool:
        """The pool of the primary that serves ``key``'s slot now (as the client last heard)."""
        assert self._cluster is not None
        node = self._cluster.nodes_manager.get_node_from_slot(key_slot(key.encode()))
        pool: redis.ConnectionPool = self._cluster.get_redis_connection(node).connection_pool
        return pool

    def _refresh_slots(self) -> None:
        assert self._cluster is not None
        self._cluster.nodes_manager.initialize()

    def lookup(self, query: IndexQuery) -> IndexView:
        node = self._node_of(query.repository)
        if self._clock() < self._down_until.get(node, 0.0):
            raise IndexUnavailable("index marked unavailable after a recent failure")
        try:
            return self._lookup(query)
        except (redis.RedisError, RedisClusterException) as exc:
            self._down_until[node] = self._clock() + self._cooldown
            raise IndexUnavailable(f"redis lookup failed: {type(exc).__name__}") from None

    def _node_of(self, repository: str) -> str:
        """Which Redis a repository's decisions wait on after a failure: on a cluster, the node that
        serves its bucket now (the other nodes' buckets keep deciding; a failover names another)."""
        if self._cluster is None:
            return ""
        slot = key_slot(self.keys.epoch(self.keys.bucket(repository)).encode())
        try:
            return str(self._cluster.nodes_manager.get_node_from_slot(slot).name)
        except RedisClusterException:
            return ""

    def _lookup(self, query: IndexQuery) -> IndexView:
        repository, reference = query.repository, query.reference
        if query.kind is not QueryKind.TAG:
            return self._lookup_content(query)
        bucket = self.keys.bucket(repository)
        keys = (
            self.keys.primary_tags(repository),
            self.keys.local_manifests(repository),
            self.keys.epoch(bucket),
            self.keys.resolve(bucket),
            self.keys.quarantined(bucket),
        )
        member = queue_member(repository, reference)
        refresh = f"{query.refresh_after:.6f}" if query.refresh_after > 0 else "1e18"
        args = (reference, member, self._now_arg(), refresh, str(RESOLVE_QUEUE_MAX))
        pinned, present, epoch, now = self._lookups.run_script(PINNED_TAG_SCRIPT, keys, args, bucket)
        if not pinned:
            return IndexView(now=float(now))
        digest, confirmed_at, media_type, pin_epoch = decode_pin(str(pinned))
        return IndexView(
            present=bool(present),
            pinned_digest=digest,
            confirmed_at=confirmed_at,
            media_type=media_type,
            current=pin_epoch == str(epoch),
            now=float(now),
        )

    def _content_keys_of(self, repository: str, digest: str, blob: bool) -> tuple[tuple[str, ...], str, str]:
        """The content script's keys, its suspect member and the bucket (cached: pulls repeat them)."""
        keys = self.keys
        present = keys.local_blobs(repository) if blob else keys.local_manifests(repository)
        deleted = present if blob else keys.primary_deleted(repository)
        bucket = keys.bucket(repository)
        script_keys = (present, keys.quarantined(bucket), keys.trusted(digest, bucket), keys.suspects(bucket), deleted)
        return script_keys, suspect_member(repository, digest, manifest=not blob), bucket

    def _lookup_content(self, query: IndexQuery) -> IndexView:
        digest, blob = query.reference, query.kind is QueryKind.BLOB
        script_keys, member, bucket = self._content_keys(query.repository, digest, blob)
        recheck = f"{query.recheck_after:.6f}" if query.recheck_after > 0 else "1e18"
        refetch = "1" if query.refetch else "0"
        args = (digest, refetch, member, self._now_arg(), str(SUSPECTS_MAX), recheck, "0" if blob else "1")
        answer = int(self._lookups.run_script(CONTENT_SCRIPT, script_keys, args, bucket))
        return IndexView(present=answer == 1, quarantined=answer == 2, verifying=answer == 3)

    def apply(self, updates: Iterable[IndexUpdate]) -> None:
        """One ``MULTI``/``EXEC`` of every command (per bucket on a cluster: each bucket's share is
        all or nothing; a failed one raises, and applying the same updates again is harmless)."""
        batches: dict[str, list[tuple[str, ...]]] = {}
        for update in updates:
            for bucket, command in self.bucketed_commands(update):
                batches.setdefault(bucket, []).append(command)
        for bucket, commands in batches.items():
            self._apply_batch(bucket, commands)

    def _apply_batch(self, bucket: str, commands: list[tuple[str, ...]]) -> None:
        try:
            self._lookups.run_transaction(commands, key=self.keys.epoch(bucket), bucket=bucket)
        except ROUTING_ERRORS as exc:  # the slot moved or the cluster is failing over: nothing applied
            raise IndexUnavailable(f"redis write failed: {type(exc).__name__}") from None
        except redis.ResponseError as exc:  # a bug in a command, not an outage: nothing was applied
            raise GeoRouteError(f"redis refused an index update: {exc}") from None
        except (redis.RedisError, RedisClusterException) as exc:
            raise IndexUnavailable(f"redis write failed: {type(exc).__name__}") from None

    def commands_for(self, update: IndexUpdate) -> list[tuple[str, ...]]:
        """The commands that apply ``update`` (on a cluster, of every bucket it touches)."""
        return [command for _, command in self.bucketed_commands(update)]

    def bucketed_commands(self, update: IndexUpdate) -> list[tuple[str, tuple[str, ...]]]:
        """(bucket, command) for each command that applies ``update``."""
        keys, repository = self.keys, update.repository
        bucket = keys.bucket(repository)
        if isinstance(update, DigestDeleted | RepositoryInvalidated):
            digest = update.digest if isinstance(update, DigestDeleted) else ""
            subtree = isinstance(update, RepositoryInvalidated) and update.subtree
            commands = []
            for each in keys.buckets if subtree else (bucket,):
                deleted = keys.primary_deleted(repository) if each == bucket else keys.epoch(each)
                keys_used = (keys.resolve(each), keys.hints(each), keys.epoch(each), deleted)
                args = (keys.space(each), repository, "1" if subtree else "0", digest, self._now_arg())
                more = (f"{update.fence:.6f}", "1" if each == bucket else "0")
                commands.append((each, eval_command(INVALIDATE_TAGS_SCRIPT, keys_used, args, more)))
            return commands
        if isinstance(update, LocalRepositoryDropped):
            drops = []
            for each in keys.buckets if update.subtree else (bucket,):
                drop = (keys.space(each), repository, "1" if update.subtree else "0", "1" if each == bucket else "0")
                drops.append((each, eval_command(DROP_LOCAL_SCRIPT, (keys.repos(each),), drop)))
            return drops
        if isinstance(update, ContentVerified):
            # Content is stored once per digest: its verdict holds in every bucket's copy.
            verdict = (update.digest, "1" if update.intact else "0", repository, f"{update.trust:.3f}")
            more = (suspect_member(repository, update.digest, update.manifest), self._now_arg())
            return [
                (each, eval_command(VERIFIED_SCRIPT, self._verdict_keys(update.digest, each), verdict, more))
                for each in keys.buckets
            ]
        return [(bucket, command) for command in self._repository_commands(update, bucket)]

    def _verdict_keys(self, digest: str, bucket: str) -> tuple[str, str, str]:
        return (self.keys.quarantined(bucket), self.keys.trusted(digest, bucket), self.keys.suspects(bucket))

    def _repository_commands(self, update: IndexUpdate, bucket: str) -> list[tuple[str, ...]]:
        keys, repository = self.keys, update.repository
        if isinstance(update, BlobPresence | ManifestPresence):
            key = (keys.local_blobs if isinstance(update, BlobPresence) else keys.local_manifests)(repository)
            if update.present:
                return [("SADD", keys.repos(bucket), repository), ("SADD", key, update.digest)]
            return [("SREM", key, update.digest)]
        if isinstance(update, PrimaryTag):
            pin = eval_command(
                SET_PIN_IF_NEWER_SCRIPT,
                (
                    keys.primary_tags(repository),
                    keys.epoch(bucket),
                    keys.primary_deleted(repository),
                    keys.hints(bucket),
                    keys.resolve(bucket),
                    keys.primary_invalidated(repository),
                ),
                (update.tag, update.digest, format_stamp(update.confirmed_at), encode_media_type(update.media_type)),
                (queue_member(repository, update.tag), update.hint, update.epoch, self._now_arg()),
                (format_stamp(update.claimed_until or None),),
            )
            return [("SADD", keys.repos(bucket), repository), pin]
        if isinstance(update, TagInvalidated):
            invalidate = eval_command(
                INVALIDATE_TAG_SCRIPT,
                (keys.primary_tags(repository), keys.resolve(bucket), keys.hints(bucket), keys.epoch(bucket)),
                (update.tag, queue_member(repository, update.tag), self._now_arg(), f"{update.fence:.6f}", update.hint),
            )
            return [("SADD", keys.repos(bucket), repository), invalidate]
        if isinstance(update, DigestRestored):
            restore = (update.digest, format_stamp(update.asked_at))
            return [eval_command(RESTORE_DIGEST_SCRIPT, (keys.primary_deleted(repository),), restore)]
        if isinstance(update, LocalTag):
            key = keys.local_tags(repository)
            if not update.digest:
                return [("HDEL", key, update.tag)]
            return [("SADD", keys.repos(bucket), repository), ("HSET", key, update.tag, update.digest)]
        raise TypeError(f"not an index update: {update!r}")

    def claim_resolutions(self, limit: int, seconds: float = CLAIM_SECONDS) -> list[TagResolution]:
        """Claim up to ``limit`` due resolutions for ``seconds`` (atomically: several updaters never
        claim the same one), stamped with the index's clock at the claim (of the bucket's node). A
        claim neither pinned nor requeued within ``seconds`` (its updater died, or Redis failed the
        write) is due again then."""
        claimed: list[TagResolution] = []
        for bucket in self._queued_buckets(self.keys.resolve):
            keys = (self.keys.resolve(bucket), self.keys.hints(bucket), self.keys.epoch(bucket))
            found = self._eval(CLAIM_SCRIPT, keys, self._now_arg(), str(limit - len(claimed)), f"{seconds:.6f}")
            asked_at, epoch, until = float(found[0]), str(found[1]), float(found[2])
            for member, hint in zip(found[3::2], found[4::2], strict=True):
                repository, tag = parse_member(str(member))
                digest, _, attempts = str(hint).partition(" ")
                claimed.append(TagResolution(repository, tag, asked_at, digest, int(attempts or 0), epoch, until))
            if len(claimed) >= limit:
                break
        return claimed

    def _queued_buckets(self, queue: Callable[[str], str]) -> list[str]:
        """The buckets whose queue holds something, from a random one on (every claimer its own
        start, so no bucket waits behind the others); on one Redis, its one bucket."""
        if not self.keys.clustered:
            return [""]
        buckets = self.keys.buckets
        with self._client.pipeline(transaction=False) as pipe:
            for bucket in buckets:
                pipe.zcard(queue(bucket))
            sizes = self._read(pipe.execute)
        start = secrets.randbelow(len(buckets))
        order = [*range(start, len(buckets)), *range(start)]
        return [buckets[n] for n in order if sizes[n]]

    def _eval(self, script: str, keys: tuple[str, ...], *args: str) -> Any:
        return self._write(lambda: self._client.eval(script, len(keys), *keys, *args))

    def requeue(self, resolution: TagResolution, delay: float, attempts: int | None = None) -> None:
        """Ask again in ``delay`` seconds (unless it is queued sooner); ``attempts`` updates its hint
        (unless an event replaced the hint meanwhile)."""
        member = queue_member(resolution.repository, resolution.tag)
        claimed = f"{resolution.hint} {resolution.attempts}" if resolution.hint else ""
        hint = f"{resolution.hint} {attempts}" if resolution.hint and attempts is not None else ""
        bucket = self.keys.bucket(resolution.repository)
        due = format_stamp(resolution.asked_at + delay)
        claim = format_stamp(resolution.claimed_until or None)
        keys = (self.keys.resolve(bucket), self.keys.hints(bucket))
        self._eval(REQUEUE_SCRIPT, keys, member, due, claimed, hint, claim)

    def claim_suspects(self, limit: int) -> list[tuple[str, str, bool]]:
        """Take up to ``limit`` due verifications a refetch asked for off their queue:
        (repository, digest, manifest?)."""
        claimed: list[tuple[str, str, bool]] = []
        for bucket in self._queued_buckets(self.keys.suspects):
            more = str(limit - len(claimed))
            found = self._eval(CLAIM_SUSPECTS_SCRIPT, (self.keys.suspects(bucket),), self._now_arg(), more)
            claimed.extend(parse_suspect(str(member)) for member in found)
            if len(claimed) >= limit:
                break
        return claimed

    def quarantined(self) -> dict[str, tuple[float, str]]:
        """Every quarantined digest: digest → (stamp, the repository it was read from)."""
        result: dict[str, tuple[float, str]] = {}
        for found in self._each_bucket(lambda pipe, bucket: pipe.hgetall(self.keys.quarantined(bucket))):
            for digest, value in found.items():
                stamp, _, repository = str(value).partition(" ")
                if float(stamp or 0) >= result.get(str(digest), (-1.0, ""))[0]:
                    result[str(digest)] = (float(stamp or 0), repository)
        return result

    def _each_bucket(self, command: Callable[[Any, str], Any]) -> list[Any]:
        """``command`` for every bucket, in one pipeline (per node on a cluster)."""
        with self._client.pipeline(transaction=False) as pipe:
            for bucket in self.keys.buckets:
                command(pipe, bucket)
            return list(self._read(pipe.execute))

    def verify_cursor(self) -> str:
        """The repository the verification pass finished last ("" at the start of a pass)."""
        return str(self._read(lambda: self._client.get(self.keys.verify_cursor)) or "")

    def set_verify_cursor(self, repository: str) -> None:
        self._write(lambda: self._client.set(self.keys.verify_cursor, repository))

    def reconcile_cursor(self) -> str:
        """Where the spread reconciliation's cycle is ("" before the first)."""
        return str(self._read(lambda: self._client.get(self.keys.reconcile_cursor)) or "")

    def set_reconcile_cursor(self, value: str) -> None:
        self._write(lambda: self._client.set(self.keys.reconcile_cursor, value))

    def queued_resolutions(self) -> int:
        return sum(self._each_bucket(lambda pipe, bucket: pipe.zcard(self.keys.resolve(bucket))))

    def ping(self) -> bool:
        try:
            return bool(self._client.ping())
        except redis.RedisError:
            return False

    def local_tags(self, repository: str) -> dict[str, str]:
        """The local registry's tag → digest for one repository (for reconciliation and tests)."""
        found = self._read(lambda: self._client.hgetall(self.keys.local_tags(repository)))
        return {str(tag): str(digest) for tag, digest in found.items()}

    def primary_tag(self, repository: str, tag: str) -> tuple[str, float] | None:
        """The pinned (digest, stamp) of a tag; ``None`` when there is no pin (none, or a tombstone)."""
        value = self._read(lambda: self._client.hget(self.keys.primary_tags(repository), tag))
        if not value:
            return None
        digest, stamp, _, _ = decode_pin(str(value))
        return (digest, stamp) if digest else None

    def local_snapshot(self, repository: str) -> tuple[set[str], set[str]]:
        """(blob digests, manifest digests) the index holds as present locally for ``repository``."""
        with self._client.pipeline(transaction=False) as pipe:
            pipe.smembers(self.keys.local_blobs(repository))
            pipe.smembers(self.keys.local_manifests(repository))
            blobs, manifests = self._read(pipe.execute)
        return {str(d) for d in blobs}, {str(d) for d in manifests}

    def local_digest_pages(self, repository: str, count: int) -> Iterator[list[tuple[str, bool]]]:
        """What ``local_snapshot`` holds, page by page (``SSCAN``, about ``count`` digests a page,
        each page sorted): (digest, manifest?), every manifest first, then every blob that is not a
        manifest. A reader keeps one page in memory, however large the repository. As ``SSCAN``
        goes: a digest present from start to end comes at least once (rarely twice), one added or
        removed meanwhile may or may not."""
        manifests_key = self.keys.local_manifests(repository)
        for digests in self._scan_set(manifests_key, count):
            yield [(digest, True) for digest in sorted(digests)]
        for digests in self._scan_set(self.keys.local_blobs(repository), count):
            flags = self._read(functools.partial(self._client.smismember, manifests_key, digests))
            blobs = sorted(digest for digest, manifest in zip(digests, flags, strict=True) if not manifest)
            if blobs:
                yield [(digest, False) for digest in blobs]

    def _scan_set(self, key: str, count: int) -> Iterator[list[str]]:
        """The members of a set, one ``SSCAN`` reply at a time (empty replies skipped)."""
        cursor = 0
        while True:
            cursor, members = self._read(functools.partial(self._client.sscan, key, cursor, count=count))
            if members:
                yield [str(member) for member in members]
            if not cursor:
                return

    def is_local_manifest(self, repository: str, digest: str) -> bool:
        """Whether the index holds ``digest`` as a manifest present locally in ``repository``."""
        return bool(self._read(lambda: self._client.sismember(self.keys.local_manifests(repository), digest)))

    def primary_tags(self, repository: str) -> dict[str, tuple[str, float]]:
        """Every pinned tag of a repository: tag → (digest, stamp); tombstones are left out."""
        found = self._read(lambda: self._client.hgetall(self.keys.primary_tags(repository)))
        pins = {str(tag): decode_pin(str(value))[:2] for tag, value in found.items()}
        return {tag: (digest, stamp) for tag, (digest, stamp) in pins.items() if digest}

    def deleted_digests(self, repository: str) -> set[str]:
        return {str(d) for d in self._read(lambda: self._client.hkeys(self.keys.primary_deleted(repository)))}

    def now(self) -> float:
        """The index's clock."""
        return self.stamp()[0]

    def stamp(self, repository: str = "") -> tuple[float, str]:
        """The index's clock and epoch, read together: what an answer about ``repository`` asked now
        is stamped with (on a cluster, its bucket's node's clock and the bucket's epoch)."""
        now, epoch = self._eval(STAMP_SCRIPT, (self.keys.epoch(self.keys.bucket(repository)),), self._now_arg())
        return float(now), str(epoch)

    def stamps(self, repositories: Iterable[str]) -> dict[str, tuple[float, str]]:
        """``stamp`` of each repository, read once per bucket."""
        names = list(repositories)
        by_bucket: dict[str, tuple[float, str]] = {}
        for name in names:
            bucket = self.keys.bucket(name)
            if bucket not in by_bucket:
                by_bucket[bucket] = self.stamp(name)
        return {name: by_bucket[self.keys.bucket(name)] for name in names}

    def try_lock(self, name: str, seconds: int) -> bool:
        """A lease held by whoever set it first, for ``seconds`` (one reconciliation at a time).

        The lease holds a value of this store's own, so ``unlock`` never releases somebody else's
        lease (one that was taken after ours expired)."""
        owner = secrets.token_hex(16)
        taken = bool(self._read(lambda: self._client.set(self.keys.lock(name), owner, nx=True, ex=seconds)))
        if taken:
            self._leases[name] = owner
        return taken

    def renew_lock(self, name: str, seconds: int) -> bool:
        """Extend our own lease to ``seconds`` from now; False when it is no longer ours."""
        owner = self._leases.get(name)
        if owner is None:
            return False
        return bool(
            self._read(lambda: self._client.eval(RENEW_OWN_LEASE_SCRIPT, 1, self.keys.lock(name), owner, seconds))
        )

    def unlock(self, name: str) -> None:
        owner = self._leases.pop(name, None)
        if owner is not None:
            self._read(lambda: self._client.eval(RELEASE_OWN_LEASE_SCRIPT, 1, self.keys.lock(name), owner))

    def repositories(self) -> set[str]:
        found = self._each_bucket(lambda pipe, bucket: pipe.smembers(self.keys.repos(bucket)))
        return {str(name) for names in found for name in names}

    # --- what `geo-route status` and the updater's /metrics read (never on the decision path) ---

    def record_status(self, name: str, fields: dict[str, float | int | str | bool]) -> None:
        """Keep ``fields`` under ``name`` (a fixed set of names: the hash stays small), stamped now."""
        value = json.dumps(fields, separators=(",", ":"))
        args = (name, value, self._now_arg())
        if self.keys.clustered:  # an untagged key: wherever its slot is
            self._write(lambda: self._client.eval(RECORD_STATUS_SCRIPT, 1, self.keys.status, *args))
            return
        # on the connection ``apply`` uses (the updater records right after applying an envelope)
        self._write(lambda: self._lookups.run_script(RECORD_STATUS_SCRIPT, (self.keys.status,), args))

    def status_records(self) -> dict[str, StatusRecord]:
        found = self._read(lambda: self._client.hgetall(self.keys.status))
        records = {}
        for name, value in found.items():
            stamp, _, text = str(value).partition(" ")
            try:
                records[str(name)] = StatusRecord(float(stamp), dict(json.loads(text)))
            except ValueError:
                continue  # not ours: skipped
        return records

    def figures(self) -> IndexFigures:
        """The queues summed over the buckets (one round trip each; one on one Redis); the oldest
        wait is the longest of any bucket; every bucket holds a copy of the quarantine."""
        rows = []
        for bucket in self.keys.buckets:
            keys = (
                self.keys.resolve(bucket),
                self.keys.suspects(bucket),
                self.keys.quarantined(bucket),
                self.keys.repos(bucket),
            )
            rows.append(self._eval(FIGURES_SCRIPT, keys, self._now_arg()))

        def waited(row: list[Any], score: Any) -> float:
            return max(0.0, float(row[0]) - float(score)) if score not in ("", None) else 0.0

        return IndexFigures(
            now=max(float(row[0]) for row in rows),
            resolutions=sum(int(row[1]) for row in rows),
            resolutions_due=sum(int(row[2]) for row in rows),
            resolutions_oldest_due=max(waited(row, row[3]) for row in rows),
            suspects=sum(int(row[4]) for row in rows),
            suspects_oldest_due=max(waited(row, row[5]) for row in rows),
            quarantined=max(int(row[6]) for row in rows),
            repositories=sum(int(row[7]) for row in rows),
        )

    def pin_entries(self, max_repositories: int) -> tuple[list[PinEntry], int]:
        """Every tag entry of at most ``max_repositories`` repositories (the first by name), and how
        many repositories the index has: ``status`` reads a bounded share of a large index."""
        names = sorted(self.repositories())
        chosen = names[:max_repositories]
        buckets = self.keys.buckets
        with self._client.pipeline(transaction=False) as pipe:
            for bucket in buckets:
                pipe.get(self.keys.epoch(bucket))
            for name in chosen:
                pipe.hgetall(self.keys.primary_tags(name))
            found = self._read(pipe.execute)
        epochs = dict(zip(buckets, found[: len(buckets)], strict=True))
        entries = []
        for name, table in zip(chosen, found[len(buckets) :], strict=True):
            epoch = str(epochs[self.keys.bucket(name)])
            for tag, value in sorted(table.items()):
                digest, stamp, _, pin_epoch = decode_pin(str(value))
                entries.append(PinEntry(name, str(tag), digest, stamp, pin_epoch == epoch))
        return entries, len(names)

    def topology(self) -> RedisTopology:
        """Where the index is: the node this store talks to (a cluster's primaries), its role and
        replicas, and with Sentinel the primary each sentinel names. Addresses only: no password is
        read or returned."""
        if self._cluster is not None:
            return self._cluster_topology(self._cluster)
        info = self._read(lambda: self._client.info())
        replicas = tuple(
            f"{value.get('ip')}:{value.get('port')} {value.get('state', '')} lag {value.get('lag', '?')}"
            for key, value in sorted(info.items())
            if key.startswith("slave") and isinstance(value, dict)
        )
        role, version = str(info.get("role", "")), str(info.get("redis_version", ""))
        memory = str(info.get("used_memory_human", ""))
        if self._sentinel is None:
            return RedisTopology("single", self._node_address(), role, version, memory, replicas)
        sentinels = tuple(
            (self._node_address(sentinel), self._named_primary(sentinel)) for sentinel in self._sentinel.sentinels
        )
        named = next((answer for _, answer in sentinels if answer != "unreachable"), "unknown")
        return RedisTopology("sentinel", named, role, version, memory, replicas, self._master_name, sentinels)

    def _cluster_topology(self, cluster: redis.cluster.RedisCluster) -> RedisTopology:
        primaries = sorted(cluster.get_primaries(), key=lambda node: (node.host, node.port))  # type: ignore[no-untyped-call]
        replicas = tuple(sorted(f"{n.host}:{n.port} replica" for n in cluster.get_replicas()))  # type: ignore[no-untyped-call]
        found: Any = self._read(lambda: cluster.info(target_nodes=primaries[0]))
        info = next(iter(found.values())) if found and isinstance(next(iter(found.values())), dict) else found
        addresses = ", ".join(f"{node.host}:{node.port}" for node in primaries)
        version, memory = str(info.get("redis_version", "")), str(info.get("used_memory_human", ""))
        return RedisTopology("cluster", addresses, str(info.get("role", "")), version, memory, replicas)

    def _node_address(self, client: redis.Redis | None = None) -> str:
        options = (client or self._client).connection_pool.connection_kwargs
        if options.get("path"):
            return str(options["path"])
        return f"{options.get('host', '?')}:{options.get('port', '?')}"

    def _named_primary(self, sentinel: redis.Redis) -> str:
        try:
            found: Any = sentinel.sentinel_get_master_addr_by_name(self._master_name)
        except redis.RedisError:
            return "unreachable"
        return f"{found[0]}:{found[1]}" if isinstance(found, list | tuple) and len(found) == 2 else "unknown"

    def _read(self, command: Callable[[], T]) -> T:
        try:
            return command()
        except RedisClusterException as exc:
            raise IndexUnavailable(f"redis read failed: {type(exc).__name__}") from None
        except redis.RedisError as exc:
            if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
                # Idle connections may face the same dead or hung primary: every one starts afresh
                # (under Sentinel, asking where the primary is now; a cluster client refreshes its
                # slots itself) rather than time out in turn.
                if self._cluster is None:
                    self._client.connection_pool.disconnect(inuse_connections=False)
                self._lookups.failed()
            raise IndexUnavailable(f"redis read failed: {type(exc).__name__}") from None

    _write = _read

    def close(self) -> None:
        self._lookups.close()
        self._client.close()
        if self._sentinel is not None:
            self._sentinel.close()
