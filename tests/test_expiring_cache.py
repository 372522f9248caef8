"""ExpiringCache on its own: an entry is never returned at or after its ``until``, and it stays bounded.
(Its eviction order under a herd is tested through the TokenReview cache, tests/rpc/test_token_review_cache.py.)"""

from __future__ import annotations

import datetime as dt

import pytest

from ca_service.services.expiring_cache import ExpiringCache

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
S = dt.timedelta(seconds=1)


def test_an_entry_is_good_until_just_before_its_until() -> None:
    cache: ExpiringCache[str, int] = ExpiringCache(10)
    cache.put("a", 1, T0 + 10 * S, T0)
    assert cache.get("a", T0 + 9 * S) == 1
    assert cache.get("a", T0 + 10 * S) is None
    assert len(cache) == 0  # dropped when found expired
    assert cache.get("a", T0) is None  # and not back for an earlier instant


def test_nothing_is_kept_that_is_already_over() -> None:
    cache: ExpiringCache[str, int] = ExpiringCache(10)
    cache.put("over", 1, T0, T0)
    cache.put("past", 1, T0 - S, T0)
    assert len(cache) == 0


def test_a_full_cache_replaces_without_evicting_and_evicts_the_oldest_put() -> None:
    cache: ExpiringCache[int, int] = ExpiringCache(10)
    for n in range(10):
        cache.put(n, n, T0 + 60 * S, T0)
    cache.put(0, 50, T0 + 60 * S, T0)  # a key already there: replaced, nothing evicted, now the newest
    assert len(cache) == 10 and cache.get(0, T0) == 50
    cache.put(10, 10, T0 + 60 * S, T0)  # a new key on a full cache: a tenth goes, the oldest put first
    assert cache.get(1, T0) is None and cache.get(0, T0) == 50 and cache.get(10, T0) == 10 and len(cache) == 10


def test_a_capacity_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="capacity"):
        ExpiringCache(0)
