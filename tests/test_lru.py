"""The bounded map the token cache, the dedupe window, the pull tokens and a verification pass share."""

from __future__ import annotations

from geo_route.lru import Lru


def test_the_least_recently_used_entry_goes_first() -> None:
    lru: Lru[str, int] = Lru(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1  # a is now the most recent
    lru.put("c", 3)
    assert "b" not in lru and lru.get("a") == 1 and lru.get("c") == 3
    assert len(lru) == 2


def test_in_does_not_count_as_a_use() -> None:
    lru: Lru[str, None] = Lru(2)
    lru.put("a", None)
    lru.put("b", None)
    assert "a" in lru
    lru.put("c", None)
    assert "a" not in lru and lru.touch("b") and not lru.touch("a")


def test_a_size_of_zero_holds_nothing_and_discard_forgets() -> None:
    empty: Lru[str, int] = Lru(0)
    empty.put("a", 1)
    assert len(empty) == 0 and empty.get("a") is None
    lru: Lru[str, int] = Lru(3)
    lru.put("a", 1)
    lru.discard("a")
    lru.discard("never there")
    assert lru.get("a") is None and len(lru) == 0
