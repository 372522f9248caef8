"""Live workload SVIDs indexed by expiry, kept up to date as they are installed and dropped.

``/metrics`` must not walk every live SVID on the event loop (O(n) per scrape was 308 ms at 5,000
SVIDs).  The registry tells this index of every install and forget, so a scrape answers "how many
expire within 6 h", "the soonest expiry per namespace" and "the k soonest-expiring identities" in
O(log n + namespaces + k).

A change is only counted when it happens (a multiset of entries) and queued; the sorted lists take
it in when they are next read.  An install is on the critical path of a push storm and a scrape is
not: updating the sorted lists at once was ~10 us an install, 7% of the event loop's share of a
forced re-issue of 5,000 nodes.  A read applies what is queued one by one while it is a few; past a
quarter of the live entries (a storm between two scrapes) the lists are rebuilt from the multiset in
one sort instead, and nothing more is queued until then, so the queue never outgrows the index.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from typing import TYPE_CHECKING, NamedTuple

from sortedcontainers import SortedList  # type: ignore[import-untyped]  # no stubs published

from ca_service.pki.identity import SpiffeId

if TYPE_CHECKING:
    from ca_service.services.workloads import WorkloadCert

Identity = tuple[str, str, str]  # (trust_domain, namespace, service_account)
Namespace = tuple[str, str]  # (trust_domain, namespace)


class ExpiryEntry(NamedTuple):
    not_after: float
    not_before: float
    identity: Identity


def identity_labels(spiffe_id: SpiffeId) -> Identity:
    """(trust_domain, namespace, service_account); a non-Kubernetes ID keeps its path as service_account."""
    ns, sa = spiffe_id.kubernetes if spiffe_id.kubernetes is not None else ("", spiffe_id.path)
    return (spiffe_id.trust_domain.name, ns, sa)


def entry_for(cert: WorkloadCert) -> ExpiryEntry:
    return ExpiryEntry(cert.svid.not_after.timestamp(), cert.svid.not_before.timestamp(),
                       identity_labels(cert.spiffe_id))


# Queued changes a read applies one by one; beyond this and a quarter of the live entries, it rebuilds.
SETTLE_ONE_BY_ONE = 256


class ExpiryIndex:
    """A multiset of live SVIDs sorted by notAfter, plus one sorted list per namespace (see the module
    docstring for when the sorted lists catch up)."""

    def __init__(self) -> None:
        self._counts: Counter[ExpiryEntry] = Counter()  # the live entries, always current
        self._size = 0  # their total count
        self._queued: list[tuple[ExpiryEntry, bool]] | None = []  # (entry, added) not yet sorted; None: rebuild
        self._all = SortedList()
        self._by_namespace: dict[Namespace, SortedList] = {}
        self._identities: Counter[Identity] = Counter()

    def __len__(self) -> int:
        return self._size

    @property
    def identities(self) -> int:
        """Distinct identities with at least one live SVID."""
        self._settle()
        return len(self._identities)

    def add(self, entry: ExpiryEntry) -> None:
        self._counts[entry] += 1
        self._size += 1
        self._queue(entry, True)

    def remove(self, entry: ExpiryEntry) -> None:
        """Drop one occurrence of ``entry``; a missing one is ignored (forget of an unknown workload)."""
        held = self._counts.get(entry, 0)
        if not held:
            return
        if held == 1:
            del self._counts[entry]
        else:
            self._counts[entry] = held - 1
        self._size -= 1
        self._queue(entry, False)

    def _queue(self, entry: ExpiryEntry, added: bool) -> None:
        queued = self._queued
        if queued is not None:
            queued.append((entry, added))
            if len(queued) > SETTLE_ONE_BY_ONE and len(queued) > len(self._counts) // 4:
                self._queued = None  # a storm: the next read rebuilds

    def _settle(self) -> None:
        queued = self._queued
        if queued is None:
            self._rebuild()
        elif queued:
            for entry, added in queued:
                if added:
                    self._sort_in(entry)
                else:
                    self._sort_out(entry)
            queued.clear()

    def _rebuild(self) -> None:
        entries = sorted(self._counts.elements())
        by_namespace: dict[Namespace, list[float]] = {}
        for entry in entries:
            by_namespace.setdefault(entry.identity[:2], []).append(entry.not_after)
        self._all = SortedList(entries)
        self._by_namespace = {ns: SortedList(times) for ns, times in by_namespace.items()}
        self._identities = Counter(entry.identity for entry in entries)
        self._queued = []

    def _sort_in(self, entry: ExpiryEntry) -> None:
        self._all.add(entry)
        self._by_namespace.setdefault(entry.identity[:2], SortedList()).add(entry.not_after)
        self._identities[entry.identity] += 1

    def _sort_out(self, entry: ExpiryEntry) -> None:  # queued only for an entry the lists hold by then
        self._all.remove(entry)
        ns = entry.identity[:2]
        times = self._by_namespace[ns]
        times.remove(entry.not_after)
        if not times:
            del self._by_namespace[ns]
        self._identities[entry.identity] -= 1
        if self._identities[entry.identity] <= 0:
            del self._identities[entry.identity]

    def expiring_before(self, instant: dt.datetime) -> int:
        """How many live SVIDs have notAfter before ``instant``."""
        self._settle()
        return int(self._all.bisect_left((instant.timestamp(),)))

    def earliest_per_namespace(self) -> dict[Namespace, float]:
        self._settle()
        return {ns: float(times[0]) for ns, times in self._by_namespace.items()}

    def soonest_identities(self, limit: int) -> list[ExpiryEntry]:
        """The earliest-expiring SVID of each of the ``limit`` identities whose SVID expires first.

        Walks the sorted list from the front and stops after ``limit`` distinct identities, so the cost
        grows with ``limit`` (and duplicates of those identities), not with the number of live SVIDs.
        """
        self._settle()
        out: list[ExpiryEntry] = []
        seen: set[Identity] = set()
        if limit <= 0:
            return out
        for entry in self._all:
            if entry.identity not in seen:
                seen.add(entry.identity)
                out.append(entry)
                if len(out) >= limit:
                    break
        return out
