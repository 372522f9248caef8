"""A bounded map whose entries each carry the instant they stop being good (TokenReviews, pods' nodes).

What the Istio CA API caches from the cluster's API is a positive answer that may be trusted for a
while: a reviewed token, the node of a token's pod.  An entry is never returned at or after its
``until``.  When full, the cache frees a tenth at once (expired entries first, then the oldest), so a
herd of new keys makes it scan itself once per tenth of its size, not at each insertion.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Hashable
from typing import Generic, NamedTuple, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Entry(NamedTuple, Generic[V]):
    value: V
    until: dt.datetime


class ExpiringCache(Generic[K, V]):
    """Values by key, each good until its own instant, at most ``capacity`` of them."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("an expiring cache needs a capacity of at least 1")
        self._capacity = capacity
        self._entries: dict[K, _Entry[V]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K, now: dt.datetime) -> V | None:
        """The value kept for ``key`` if it is still good at ``now`` (an expired one is dropped)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry.until:
            del self._entries[key]
            return None
        return entry.value

    def put(self, key: K, value: V, until: dt.datetime, now: dt.datetime) -> None:
        """Keep ``value`` for ``key`` until ``until`` (nothing is kept if that is not after ``now``)."""
        if until <= now:
            return
        if key not in self._entries and len(self._entries) >= self._capacity:
            self._evict(now)
        self._entries.pop(key, None)  # a replaced entry moves to the back: eviction goes oldest put first
        self._entries[key] = _Entry(value, until)

    def _evict(self, now: dt.datetime) -> None:
        for key in [k for k, e in self._entries.items() if e.until <= now]:
            del self._entries[key]
        keep = self._capacity - max(1, self._capacity // 10)
        while len(self._entries) > keep:
            # The oldest put first: with one TTL, the nearest to expiry too (a token's exp may cut one shorter).
            del self._entries[next(iter(self._entries))]
