"""The expiry index answers every read as a plain list of the live entries would, whatever the order of
installs, forgets (of held and unknown entries) and reads."""

from __future__ import annotations

import datetime as dt
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

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


@settings(max_examples=300, deadline=None)
@given(ops=_OPS)
def test_every_read_matches_a_plain_list_of_the_live_entries(ops: list[tuple]) -> None:
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
