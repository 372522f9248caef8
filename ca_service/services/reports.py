"""Certificates as the status views show them (CLI ``status`` and ``GET /admin/v1/status``), one shape for both."""

from __future__ import annotations

import datetime as dt
from typing import Any

from cryptography import x509

from ca_service.pki.certs import CertFacts, fingerprint
from ca_service.rotation.state import CAEntry
from ca_service.settings import format_duration


def certificate_report(cert: x509.Certificate, now: dt.datetime) -> dict[str, Any]:
    """One certificate as every status view shows it (CLI ``status``, ``GET /admin/v1/status``)."""
    facts = CertFacts.of(cert)
    left = facts.time_left(now)
    return {
        "subject": facts.subject, "serial": facts.serial, "key_id": facts.key_id,
        "not_before": facts.not_before.isoformat(), "not_after": facts.not_after.isoformat(),
        "time_left": format_duration(left) if left.total_seconds() > 0 else "EXPIRED",
        "time_left_seconds": int(left.total_seconds()), "sha256": fingerprint(cert).hex(),
    }


def entry_report(entry: CAEntry, now: dt.datetime) -> dict[str, Any]:
    """A CA certificate with its slot: :func:`certificate_report` plus kind, state, key and parent."""
    return {"kind": entry.kind.value, "state": entry.state.value, **certificate_report(entry.cert, now),
            "key_held": entry.key is not None, "parent_key_id": entry.parent or None}
