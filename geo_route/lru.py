"""A bounded map, least recently used out first: the token cache, the updater's dedupe window, its
pull tokens and a verification pass's recent digests all keep at most so many entries this way."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Lru(Generic[K, V]):
    """At most ``size`` entries (``size`` <= 0: none). Reading an entry with ``get`` or ``touch``
    makes it the most recent; ``in`` does not. Not thread-safe: its owner locks."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[K, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: K) -> V | None:
        """The value (then the most recent entry), or None."""
        if key not in self._entries:
            return None
        self._entries.move_to_end(key)
        return self._entries[key]

    def touch(self, key: K) -> bool:
        """Whether ``key`` is held (then it is the most recent entry)."""
        if key not in self._entries:
            return False
        self._entries.move_to_end(key)
        return True

    def put(self, key: K, value: V) -> None:
        """Hold ``key`` as the most recent entry; the least recent ones beyond ``size`` go."""
        if self.size <= 0:
            return
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def discard(self, key: K) -> None:
        self._entries.pop(key, None)
