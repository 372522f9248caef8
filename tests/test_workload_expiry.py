"""The expiry index answers every read as a plain list of the live entries would, whether its sorted lists
caught up one change at a time or were rebuilt after a storm (changes are sorted in when read)."""

from __future__ import annotations

import datetime as dt
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ca_service.services import workload_expiry
from ca_service.services.workload_expiry import ExpiryEntry, ExpiryIndex

_ENTRIES = st.builds(ExpiryEntry, not_after=st.integers(0, 20).map(float), not_before=st.just(0.0),
                     identity=st.tuples(st.sampled_from(["td", "eu"]), st.sampled_from(["a", "b", "c"]),
                                        st.sampled_from(["x", "y"])))
# ("add", entry), ("remove", entry) or ("read", instant, limit)
_OPS = st.lists(st.one_of(st.tuples(st.just("add"), _ENTRIES), st.tuples(st.just("remove"), _ENTRIES),
                          st.tuples(st.just("read"), st.integers(0, 21), st.integers(0, 4))), max_size=80)


def _reference_reads(live: list[ExpiryEntry], instant: int, limit: int) -> tuple[object, ...]:
    ordered = sorted(live)
    earliest: dict[tuple[str, str], float] = {}
    for entry in ordered:
        earliest.setdefault(entry.identity[:2], entry.not_after)
    soonest: list[ExpiryEntry] = []
    for entry in ordered:
        if len(soonest) < limit and entry.identity not in {e.identity for e in soonest}:
            soonest.append(entry)
    return (len(live), len({e.identity for e in live}), sum(e.not_after < instant for e in live), earliest, soonest)


def _reads(index: ExpiryIndex, instant: int, limit: int) -> tuple[object, ...]:
    at = dt.datetime.fromtimestamp(instant, dt.UTC)
    return (len(index), index.identities, index.expiring_before(at), index.earliest_per_namespace(),
            index.soonest_identities(limit))


@pytest.mark.parametrize("one_by_one", [10_000, 2], ids=["one by one", "rebuilt"])
@settings(max_examples=300, deadline=None)
@given(ops=_OPS)
def test_every_read_matches_a_plain_list_of_the_live_entries(one_by_one: int, ops: list[tuple]) -> None:
    old = workload_expiry.SETTLE_ONE_BY_ONE
    workload_expiry.SETTLE_ONE_BY_ONE = one_by_one
    try:
        index, live = ExpiryIndex(), Counter[ExpiryEntry]()
        for op in ops:
            if op[0] == "add":
                index.add(op[1])
                live[op[1]] += 1
            elif op[0] == "remove":
                index.remove(op[1])  # an entry not held is ignored
                if live[op[1]]:
                    live[op[1]] -= 1
            else:
                assert _reads(index, op[1], op[2]) == _reference_reads(list(live.elements()), op[1], op[2])
        assert _reads(index, 10, 3) == _reference_reads(list(live.elements()), 10, 3)
    finally:
        workload_expiry.SETTLE_ONE_BY_ONE = old


def test_a_storm_between_two_reads_is_not_queued_change_by_change() -> None:
    """The queue stops growing past a quarter of the live entries (memory stays bounded without scrapes)."""
    index = ExpiryIndex()
    entries = [ExpiryEntry(float(i), 0.0, ("td", f"ns{i % 7}", f"sa{i}")) for i in range(4000)]
    for entry in entries:
        index.add(entry)
    assert index._queued is None  # what the property test cannot see: the queue's size
    for entry in entries[:3000]:
        index.remove(entry)
        index.add(entry._replace(not_after=entry.not_after + 10_000))
    assert len(index) == 4000 and index.expiring_before(dt.datetime.fromtimestamp(3500, dt.UTC)) == 500
    assert index._queued == []
