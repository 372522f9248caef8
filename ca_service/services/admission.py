"""Herd protection for the Istio CA API: a token bucket per identity and a cap on requests in flight.

A mass restart (a node drain, a rollout of a DaemonSet) makes thousands of pods ask at once.  Without
a cap the event loop would queue every one of them, and SDS streams and health probes would wait
behind them; with it, the excess is told to come back (RESOURCE_EXHAUSTED + a retry hint), which
istio-agent does with backoff.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from ca_service.errors import OverloadedError

# Identities remembered by the rate limiter; the least recently seen are forgotten first (a forgotten
# identity starts again with a full bucket, which only errs towards admitting).
MAX_TRACKED_IDENTITIES = 100_000
# What an in-flight refusal suggests: the cap drains in well under a second at the signing rate.
IN_FLIGHT_RETRY_AFTER = 1.0


@dataclass
class TokenBucket:
    """``rate`` tokens a second up to ``burst``, refilled at each :meth:`take` from its ``now`` (monotonic
    seconds); never waits.  Shared by SDS stream admission and the Istio CA API's per-identity limit."""

    rate: float
    burst: float
    tokens: float
    at: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        return cls(rate, float(burst), float(burst), now)

    def take(self, now: float) -> float:
        """Take one token: 0.0 if there was one, else the seconds until the next (and nothing is taken)."""
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class RateLimiter:
    """Token bucket per key: ``rate`` per second sustained, ``burst`` at once.  Takes ``now`` (monotonic seconds)."""

    def __init__(self, rate: float, burst: int, *, max_keys: int = MAX_TRACKED_IDENTITIES) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self._rate, self._burst, self._max_keys = rate, float(burst), max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def acquire(self, key: str, now: float) -> None:
        """Take one token for ``key``.

        Raises:
            OverloadedError: the bucket is empty; ``retry_after`` is when the next token arrives.
        """
        bucket = self._buckets.pop(key, None) or TokenBucket.full(self._rate, self._burst, now)
        self._buckets[key] = bucket  # most recently used last
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        wait = bucket.take(now)
        if wait:
            raise OverloadedError(f"rate limit of {self._rate:g}/s for {key[:300]!r} exceeded",
                                  retry_after=math.ceil(wait))


class InFlightLimit:
    """At most ``limit`` requests between :meth:`enter` and :meth:`leave` (single event loop, no lock needed)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.current = 0
        self.peak = 0  # the most ever in flight at once (for tests and the bench)

    def enter(self) -> None:
        """Raises: OverloadedError: ``limit`` requests are already in flight."""
        if self.current >= self.limit:
            raise OverloadedError(f"{self.current} requests in flight (limit {self.limit})",
                                  retry_after=IN_FLIGHT_RETRY_AFTER)
        self.current += 1
        self.peak = max(self.peak, self.current)

    def leave(self) -> None:
        self.current -= 1
