"""``GET /admin/v1/certificates``: the live certificates of the issuance ledger, filtered.

Query parameters (all optional, combined with AND): ``namespace``, ``service_account``, ``spiffe_id``,
``issuer`` (key id of the signing intermediate, as ``admin status`` prints it), ``limit`` (default
1000, at most :data:`MAX_LIMIT`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from ca_service.services.issuance_ledger import IssuanceLedger
from ca_service.web.requests import BadFieldError

FILTERS = ("namespace", "service_account", "spiffe_id", "issuer")
DEFAULT_LIMIT = 1000
# A response of 10k records is ~3 MB of JSON: enough for an incident, small enough for the side-port.
MAX_LIMIT = 10_000
# Longer than any SPIFFE ID we issue (2048) with room; anything longer is not a filter but an attack.
MAX_FILTER_LENGTH = 4096


def certificates_report(ledger: IssuanceLedger, now: dt.datetime, query: Mapping[str, str]) -> dict[str, Any]:
    """The JSON document of the endpoint.

    Raises:
        BadFieldError: an unknown parameter, an over-long filter, or a bad ``limit``.
    """
    unknown = sorted(set(query) - {*FILTERS, "limit"})
    if unknown:
        raise BadFieldError(unknown[0][:100], f"unknown query parameter; use {', '.join(FILTERS)}, limit")
    filters: dict[str, str] = {}
    for name in FILTERS:
        value = query.get(name)
        if value is not None:
            if len(value) > MAX_FILTER_LENGTH:
                raise BadFieldError(name, f"longer than {MAX_FILTER_LENGTH} characters")
            filters[name] = value
    limit = _limit(query.get("limit"))
    records: list[dict[str, str]] = []
    matched = 0
    for record in ledger.live(now, **filters):
        matched += 1
        if len(records) < limit:
            records.append(record.to_json())
    return {"certificates": records, "matched": matched, "truncated": matched > len(records),
            "dropped_by_capacity": ledger.dropped, "filters": filters}


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise BadFieldError("limit", f"must be an integer between 1 and {MAX_LIMIT}")
    return int(raw)
