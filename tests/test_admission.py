"""Herd protection: a token bucket per identity and an in-flight cap, each refusing with a retry hint."""

from __future__ import annotations

import pytest

from ca_service.errors import OverloadedError
from ca_service.services.admission import InFlightLimit, RateLimiter


def test_an_identity_gets_its_burst_then_one_request_per_token_and_others_are_unaffected() -> None:
    limiter = RateLimiter(rate=2, burst=3)
    for _ in range(3):
        limiter.acquire("a", now=0.0)
    with pytest.raises(OverloadedError) as caught:
        limiter.acquire("a", now=0.0)
    assert caught.value.retry_after == 1  # half a second to the next token, rounded up to whole seconds
    limiter.acquire("b", now=0.0)
    limiter.acquire("a", now=0.5)
    with pytest.raises(OverloadedError):
        limiter.acquire("a", now=0.5)


def test_the_least_recently_seen_identities_are_forgotten_beyond_the_bound() -> None:
    limiter = RateLimiter(rate=1, burst=1, max_keys=2)
    limiter.acquire("a", now=0.0)
    limiter.acquire("b", now=0.0)
    limiter.acquire("c", now=0.0)  # forgets "a"
    limiter.acquire("a", now=0.0)  # a full bucket again
    with pytest.raises(OverloadedError):
        limiter.acquire("c", now=0.0)


def test_the_in_flight_cap_refuses_the_one_past_it_and_admits_again_after_a_leave() -> None:
    cap = InFlightLimit(2)
    cap.enter()
    cap.enter()
    with pytest.raises(OverloadedError):
        cap.enter()
    cap.leave()
    cap.enter()
    assert cap.peak == 2
