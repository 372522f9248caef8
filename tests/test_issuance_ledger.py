"""The issuance ledger keeps live certificates only, within its capacity."""

from __future__ import annotations

import datetime as dt

import pytest

from ca_service.services.issuance_ledger import IssuanceLedger, IssuanceRecord
from ca_service.web.certificates import certificates_report
from ca_service.web.requests import BadFieldError

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def _record(serial: str, sa: str = "a", *, hours: int = 1, issuer: str = "k1") -> IssuanceRecord:
    return IssuanceRecord(serial=serial, spiffe_id=f"spiffe://cluster.local/ns/ns/sa/{sa}", caller="c",
                          method="kubernetes-jwt", path="istio-ca", not_after=T0 + dt.timedelta(hours=hours),
                          issuer=issuer, issued_at=T0)


def test_an_expired_certificate_drops_out_of_the_ledger() -> None:
    ledger = IssuanceLedger(10)
    ledger.record(_record("1", hours=1))
    ledger.record(_record("2", hours=2))
    assert [r.serial for r in ledger.live(T0 + dt.timedelta(minutes=59))] == ["1", "2"]
    assert [r.serial for r in ledger.live(T0 + dt.timedelta(hours=1))] == ["2"]
    assert len(ledger) == 1


def test_beyond_capacity_the_oldest_entries_go_and_are_counted() -> None:
    ledger = IssuanceLedger(3)
    for i in range(5):
        ledger.record(_record(str(i), hours=10))
    assert [r.serial for r in ledger.live(T0)] == ["2", "3", "4"]
    assert ledger.dropped == 2


def test_filters_combine_and_unknown_parameters_are_refused() -> None:
    ledger = IssuanceLedger(10)
    ledger.record(_record("1", "a", issuer="k1"))
    ledger.record(_record("2", "b", issuer="k2"))
    doc = certificates_report(ledger, T0, {"namespace": "ns", "issuer": "k2"})
    assert [c["serial"] for c in doc["certificates"]] == ["2"]
    assert certificates_report(ledger, T0, {"limit": "1"})["truncated"] is True
    for query in ({"serial": "1"}, {"limit": "0"}, {"spiffe_id": "x" * 5000}):
        with pytest.raises(BadFieldError):
            certificates_report(ledger, T0, query)
