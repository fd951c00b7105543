"""The digest index in Redis: the only module of geo-route that imports redis.

Key schema (``P`` is ``redis.key_prefix``, default ``geo-route:``; ``R`` a repository name, which by
the OCI grammar never contains spaces or colons):

    P repos                  SET   every repository the index has seen
    P local:blobs:R          SET   blob digests present in the local registry
    P local:manifests:R      SET   manifest digests present in the local registry
    P local:tags:R           HASH  tag -> digest in the local registry
    P primary:tags:R         HASH  tag -> "<digest> <confirmed_at unix seconds>" as last published
                                   by the primary (by a notification or reconciliation)
    P lock:NAME              STRING a lease (one reconciliation at a time); value = its owner

A decision costs exactly one round trip on a per-thread connection: ``SISMEMBER`` for a blob or a
manifest, one Lua script (``HGET`` the pinned digest, then ``SISMEMBER`` it in the local manifests)
for a tag. Writes go in
one ``MULTI``/``EXEC`` per call, sent as one write. After a failure the store answers "unavailable" at once for
``unavailable_cooldown`` seconds instead of waiting on a dead Redis for every request.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from geo_route.config import RedisSettings
from geo_route.errors import GeoRouteError, IndexUnavailable
from geo_route.index.model import (
    BlobPresence,
    IndexQuery,
    IndexUpdate,
    IndexView,
    LocalTag,
    ManifestPresence,
    PrimaryTag,
    QueryKind,
)

T = TypeVar("T")
# A primary tag pin changes only for news at least as recent as what it holds: notifications arrive
# unordered, so an old push (or delete) replayed after a newer one must not win.
SET_PIN_IF_NEWER_SCRIPT = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  local confirmed = tonumber(string.match(current, ' (%S+)$') or '0') or 0
  if tonumber(ARGV[3]) < confirmed then return 0 end
end
if ARGV[2] == '' then redis.call('HDEL', KEYS[1], ARGV[1]) else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[3]) end
return 1
"""
PINNED_TAG_SCRIPT = """
local pinned = redis.call('HGET', KEYS[1], ARGV[1])
if not pinned then return false end
local digest = string.match(pinned, '^(%S+)')
return {pinned, redis.call('SISMEMBER', KEYS[2], digest)}
"""


RELEASE_OWN_LEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class KeySchema:
    """Builds every key; the one place that knows the layout described above."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.repos = f"{prefix}repos"

    def local_blobs(self, repository: str) -> str:
        return f"{self.prefix}local:blobs:{repository}"

    def local_manifests(self, repository: str) -> str:
        return f"{self.prefix}local:manifests:{repository}"

    def local_tags(self, repository: str) -> str:
        return f"{self.prefix}local:tags:{repository}"

    def primary_tags(self, repository: str) -> str:
        return f"{self.prefix}primary:tags:{repository}"

    def lock(self, name: str) -> str:
        return f"{self.prefix}lock:{name}"


def encode_pin(digest: str, confirmed_at: float) -> str:
    return f"{digest} {confirmed_at:.3f}"


def decode_pin(value: str) -> tuple[str, float]:
    digest, _, confirmed = value.partition(" ")
    try:
        return digest, float(confirmed)
    except ValueError:
        return digest, 0.0


class LookupConnections:
    """One long-lived connection per thread for the decision path.

    A decision is a single command, so it skips the client's pool checkout, retry and
    instrumentation layers (about a third of the lookup's CPU): send, read, and on any transport
    error drop the connection so the next lookup starts clean.
    """

    def __init__(self, pool: redis.ConnectionPool) -> None:
        self._pool = pool
        self._local = threading.local()
        self._script_shas: dict[str, str] = {}
        self._opened: list[Any] = []
        self._lock = threading.Lock()

    def connection(self) -> Any:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self._pool.make_connection()
            with self._lock:
                self._opened.append(connection)
        return connection

    def run_transaction(self, commands: list[tuple[str, ...]]) -> list[Any]:
        """``MULTI``, the commands, ``EXEC`` in one write and one round trip; all or nothing."""
        connection = self.connection()
        try:
            connection.send_packed_command(
                connection.pack_commands([("MULTI",), *commands, ("EXEC",)]), check_health=False
            )
            queued_errors = []
            for _ in range(len(commands) + 1):  # +OK for MULTI, +QUEUED per command (or an error)
                try:
                    connection.read_response()
                except redis.ResponseError as exc:
                    queued_errors.append(exc)
            results = connection.read_response()  # EXEC: the replies, or EXECABORT after a queueing error
        except redis.ResponseError:
            raise
        except BaseException:
            connection.disconnect()
            raise
        if queued_errors:
            raise queued_errors[0]
        failed = [reply for reply in results if isinstance(reply, Exception)]
        if failed:
            raise failed[0]
        return list(results)

    def run(self, *args: str) -> Any:
        connection = self.connection()
        try:
            connection.send_command(*args, check_health=False)
            return connection.read_response()
        except redis.ResponseError:
            raise
        except BaseException:
            connection.disconnect()
            raise

    def run_script(self, script: str, keys: tuple[str, ...], args: tuple[str, ...]) -> Any:
        sha = self._script_shas.get(script) or self._script_shas.setdefault(
            script, hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()
        )
        try:
            return self.run("EVALSHA", sha, str(len(keys)), *keys, *args)
        except redis.exceptions.NoScriptError:
            return self.run("EVAL", script, str(len(keys)), *keys, *args)

    def close(self) -> None:
        with self._lock:
            for connection in self._opened:
                connection.disconnect()


class RedisIndexStore:
    """``IndexStore`` on a Redis server, with short timeouts and no client-side retries."""

    def __init__(
        self,
        settings: RedisSettings,
        *,
        client: redis.Redis | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client or redis.Redis.from_url(
            settings.url,
            socket_timeout=settings.socket_timeout,
            socket_connect_timeout=settings.connect_timeout,
            max_connections=settings.max_connections,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )
        self.keys = KeySchema(settings.key_prefix)
        self._lookups = LookupConnections(self._client.connection_pool)
        self._clock = clock
        self._cooldown = settings.unavailable_cooldown
        self._down_until = 0.0
        self._leases: dict[str, str] = {}

    def lookup(self, query: IndexQuery) -> IndexView:
        if self._clock() < self._down_until:
            raise IndexUnavailable("index marked unavailable after a recent failure")
        try:
            return self._lookup(query)
        except redis.RedisError as exc:
            self._down_until = self._clock() + self._cooldown
            raise IndexUnavailable(f"redis lookup failed: {type(exc).__name__}") from None

    def _lookup(self, query: IndexQuery) -> IndexView:
        repository, reference = query.repository, query.reference
        if query.kind is QueryKind.BLOB:
            return IndexView(present=bool(self._lookups.run("SISMEMBER", self.keys.local_blobs(repository), reference)))
        if query.kind is QueryKind.MANIFEST:
            present = self._lookups.run("SISMEMBER", self.keys.local_manifests(repository), reference)
            return IndexView(present=bool(present))
        keys = (self.keys.primary_tags(repository), self.keys.local_manifests(repository))
        found = self._lookups.run_script(PINNED_TAG_SCRIPT, keys, (reference,))
        if not found:
            return IndexView()
        digest, confirmed_at = decode_pin(found[0])
        return IndexView(present=bool(found[1]), pinned_digest=digest, confirmed_at=confirmed_at)

    def apply(self, updates: Iterable[IndexUpdate]) -> None:
        commands = [command for update in updates for command in self.commands_for(update)]
        if not commands:
            return
        try:
            self._lookups.run_transaction(commands)
        except redis.ResponseError as exc:  # a bug in a command, not an outage: nothing was applied
            raise GeoRouteError(f"redis refused an index update: {exc}") from None
        except redis.RedisError as exc:
            raise IndexUnavailable(f"redis write failed: {type(exc).__name__}") from None

    def commands_for(self, update: IndexUpdate) -> list[tuple[str, ...]]:
        repository = update.repository
        if isinstance(update, BlobPresence | ManifestPresence):
            key = (self.keys.local_blobs if isinstance(update, BlobPresence) else self.keys.local_manifests)(repository)
            if update.present:
                return [("SADD", self.keys.repos, repository), ("SADD", key, update.digest)]
            return [("SREM", key, update.digest)]
        if isinstance(update, PrimaryTag):
            confirmed = f"{update.confirmed_at:.3f}"
            pin = (
                "EVAL",
                SET_PIN_IF_NEWER_SCRIPT,
                "1",
                self.keys.primary_tags(repository),
                update.tag,
                update.digest,
                confirmed,
            )
            return [("SADD", self.keys.repos, repository), pin] if update.digest else [pin]
        if isinstance(update, LocalTag):
            key = self.keys.local_tags(repository)
            if not update.digest:
                return [("HDEL", key, update.tag)]
            return [("SADD", self.keys.repos, repository), ("HSET", key, update.tag, update.digest)]
        raise TypeError(f"not an index update: {update!r}")

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
        value = self._read(lambda: self._client.hget(self.keys.primary_tags(repository), tag))
        return decode_pin(str(value)) if value else None

    def local_snapshot(self, repository: str) -> tuple[set[str], set[str]]:
        """(blob digests, manifest digests) the index holds as present locally for ``repository``."""
        with self._client.pipeline(transaction=False) as pipe:
            pipe.smembers(self.keys.local_blobs(repository))
            pipe.smembers(self.keys.local_manifests(repository))
            blobs, manifests = self._read(pipe.execute)
        return {str(d) for d in blobs}, {str(d) for d in manifests}

    def primary_tags(self, repository: str) -> dict[str, tuple[str, float]]:
        found = self._read(lambda: self._client.hgetall(self.keys.primary_tags(repository)))
        return {str(tag): decode_pin(str(value)) for tag, value in found.items()}

    def try_lock(self, name: str, seconds: int) -> bool:
        """A lease held by whoever set it first, for ``seconds`` (one reconciliation at a time).

        The lease holds a value of this store's own, so ``unlock`` never releases somebody else's
        lease (one that was taken after ours expired)."""
        owner = secrets.token_hex(16)
        taken = bool(self._read(lambda: self._client.set(self.keys.lock(name), owner, nx=True, ex=seconds)))
        if taken:
            self._leases[name] = owner
        return taken

    def unlock(self, name: str) -> None:
        owner = self._leases.pop(name, None)
        if owner is not None:
            self._read(lambda: self._client.eval(RELEASE_OWN_LEASE_SCRIPT, 1, self.keys.lock(name), owner))

    def repositories(self) -> set[str]:
        return {str(name) for name in self._read(lambda: self._client.smembers(self.keys.repos))}

    def _read(self, command: Callable[[], T]) -> T:
        try:
            return command()
        except redis.RedisError as exc:
            raise IndexUnavailable(f"redis read failed: {type(exc).__name__}") from None

    def close(self) -> None:
        self._lookups.close()
        self._client.close()
