"""When to renew a workload certificate.  Pure functions of the certificate's lifetime and a random draw."""

from __future__ import annotations

import datetime as dt


def renewal_time(
    not_before: dt.datetime, not_after: dt.datetime, *, fraction: float, jitter_fraction: float, draw: float
) -> dt.datetime:
    """The instant to renew a certificate valid from ``not_before`` to ``not_after``.

    Renew at ``fraction`` of the lifetime (Istio and SPIRE use 50%: half the lifetime stays as slack
    for a CA outage), moved by up to ``jitter_fraction`` of the lifetime either way.  ``draw`` is a
    uniform random number in [0, 1) supplied by the caller, so tests can pin it; the jitter spreads a
    fleet that was issued in the same second over a window instead of renewing it in one burst.
    """
    if not 0.0 <= draw < 1.0:
        raise ValueError(f"draw must be in [0, 1), got {draw}")
    lifetime = not_after - not_before
    offset = fraction + jitter_fraction * (2.0 * draw - 1.0)
    return not_before + lifetime * offset
