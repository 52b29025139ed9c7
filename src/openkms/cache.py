"""A small time-bounded cache: what a node may believe about shared state without asking the store.

Entries expire after `ttl` seconds, so a change made by another node sharing the store is seen
within that time even if its notification is lost; a node drops the entry at once when it makes a
change itself or hears of one (storage/notify.py). A value loaded while some entry was dropped is
returned but not kept: its load may have read the store before the change committed.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Hashable
from typing import ClassVar, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TTLCache(Generic[K, V]):
    # Every named cache of the process, for the metrics (hits and misses by name).
    named: ClassVar[weakref.WeakSet[TTLCache[Hashable, object]]] = weakref.WeakSet()

    def __init__(self, ttl: float, max_entries: int = 100_000, name: str = "") -> None:
        self._ttl = ttl
        self._max = max_entries
        self._entries: dict[K, tuple[float, V]] = {}
        self.name = name
        self.hits = 0
        self.misses = 0
        self._drops = 0  # how many pops and clears so far
        if name:
            TTLCache.named.add(self)  # type: ignore[arg-type]

    def get(self, key: K, load: Callable[[], V]) -> V:
        """The cached value, or `load()`'s (cached for the next `ttl` seconds)."""
        now = time.monotonic()
        hit = self._entries.get(key)
        if hit is not None and hit[0] > now:
            self.hits += 1
            return hit[1]
        self.misses += 1
        drops = self._drops
        value = load()
        if self._drops == drops:
            self.put(key, value, now)
        return value

    def put(self, key: K, value: V, now: float | None = None) -> None:
        if len(self._entries) >= self._max:
            self._entries.clear()  # crude, but bounded; entries are cheap to reload
        self._entries[key] = ((time.monotonic() if now is None else now) + self._ttl, value)

    def pop(self, key: K) -> None:
        self._drops += 1
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._drops += 1
        self._entries.clear()
