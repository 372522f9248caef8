"""The issuance ledger: every certificate issued (SDS, CSR, CLI, our listeners' own) while it is still valid.

After an incident the first question is "which certificates are out there for this identity, and who
asked for them?": no peer keeps that list.  The ledger is held in memory and bounded: expired certificates
drop out, and beyond ``capacity`` the oldest entries go first (counted in :attr:`dropped`, so a listing
can say it is incomplete).  A :class:`Journal` (``adapters/issuance_journal.py``) keeps it on disk across
restarts and brings in what another process (the ``ca-service issue`` command) issued.
"""

from __future__ import annotations

import datetime as dt
import functools
import heapq
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from ca_service.pki.identity import SpiffeId


@dataclass(frozen=True)
class IssuanceRecord:
    serial: str  # hex, as openssl prints it
    spiffe_id: str
    caller: str  # the authenticated caller (its SPIFFE ID, node id, or "ca-service")
    method: str  # how it authenticated: kubernetes-jwt, peer-certificate, node-metadata, internal
    path: str  # sds, istio-ca, cli, serving
    not_after: dt.datetime
    issuer: str  # key id of the signing intermediate
    issued_at: dt.datetime

    @property
    def namespace(self) -> str | None:
        return self._kubernetes[0] if self._kubernetes else None

    @property
    def service_account(self) -> str | None:
        return self._kubernetes[1] if self._kubernetes else None

    @functools.cached_property
    def _kubernetes(self) -> tuple[str, str] | None:
        # Parsed once per record, at its first filtered listing (not per issuance, not per listing).
        return SpiffeId.parse(self.spiffe_id).kubernetes

    def to_json(self) -> dict[str, str]:
        return {"serial": self.serial, "spiffe_id": self.spiffe_id, "caller": self.caller, "method": self.method,
                "path": self.path, "not_after": self.not_after.isoformat(), "issuer": self.issuer,
                "issued_at": self.issued_at.isoformat()}

    @classmethod
    def from_json(cls, doc: Mapping[str, object]) -> IssuanceRecord:
        """The inverse of :meth:`to_json`.

        Raises:
            ValueError: a field is missing, not a string, or a time is not an aware ISO 8601 instant.
        """
        fields = {name: doc.get(name) for name in _FIELDS}
        if not all(isinstance(v, str) for v in fields.values()):
            raise ValueError("an issuance record needs every field as a string")
        times = {name: dt.datetime.fromisoformat(fields[name]) for name in ("not_after", "issued_at")}  # type: ignore[arg-type]
        if any(t.tzinfo is None for t in times.values()):
            raise ValueError("an issuance record's times must carry a UTC offset")
        return cls(**{**fields, **times})  # type: ignore[arg-type]


_FIELDS = ("serial", "spiffe_id", "caller", "method", "path", "not_after", "issuer", "issued_at")


class Journal(Protocol):
    """Where the ledger keeps its records beyond memory (the port ``adapters/issuance_journal`` fills)."""

    def append(self, entry: IssuanceRecord) -> None:
        """Keep ``entry``; a failure is the journal's to report, never the issuer's."""

    def others(self, now: dt.datetime) -> Iterable[IssuanceRecord]:
        """Records written by other processes since the last call."""


class IssuanceLedger:
    """Live certificates by serial, in issue order."""

    def __init__(self, capacity: int, journal: Journal | None = None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.dropped = 0  # live entries pushed out by capacity since start
        self._journal = journal
        self._records: OrderedDict[str, IssuanceRecord] = OrderedDict()
        self._expiry: list[tuple[dt.datetime, str]] = []

    def __len__(self) -> int:
        return len(self._records)

    def record(self, entry: IssuanceRecord) -> None:
        """Remember a certificate just issued here (and journal it)."""
        self.restore(entry)
        if self._journal is not None:
            self._journal.append(entry)

    def restore(self, entry: IssuanceRecord) -> None:
        """Remember a certificate already journaled (a restart, another process); a known serial is kept."""
        self._prune(entry.issued_at)
        if entry.serial in self._records or entry.not_after <= entry.issued_at:
            return
        self._records[entry.serial] = entry
        heapq.heappush(self._expiry, (entry.not_after, entry.serial))
        while len(self._records) > self.capacity:
            self._records.popitem(last=False)
            self.dropped += 1

    def live(self, now: dt.datetime, *, namespace: str | None = None, service_account: str | None = None,
             spiffe_id: str | None = None, issuer: str | None = None) -> Iterator[IssuanceRecord]:
        """Records valid at ``now`` matching every given filter, oldest issue first."""
        if self._journal is not None:
            for entry in self._journal.others(now):
                self.restore(entry)
        self._prune(now)
        for entry in list(self._records.values()):
            if spiffe_id is not None and entry.spiffe_id != spiffe_id:
                continue
            if issuer is not None and entry.issuer != issuer:
                continue
            if namespace is not None and entry.namespace != namespace:
                continue
            if service_account is not None and entry.service_account != service_account:
                continue
            yield entry

    def _prune(self, now: dt.datetime) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            not_after, serial = heapq.heappop(self._expiry)
            current = self._records.get(serial)
            if current is not None and current.not_after == not_after:
                del self._records[serial]
        # Entries pushed out by capacity leave stale heap items; rebuild when they dominate.
        if len(self._expiry) > 2 * self.capacity:
            self._expiry = [(e.not_after, s) for s, e in self._records.items()]
            heapq.heapify(self._expiry)
