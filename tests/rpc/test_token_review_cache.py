"""The TokenReview cache at its size bound: it stays bounded, keeps the newest reviews, and frees a tenth
at a time.  The reviewer here is a counting stand-in (the review itself is tested on the real API server
in test_istio_ca_identity.py); only the cache is under test."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from ca_service.pki.identity import TrustDomain
from ca_service.rpc.authn import CallCredentials
from ca_service.rpc.token_review import SA_GROUP, SA_PREFIX, KubernetesTokenAuthenticator, ReviewStatus
from ca_service.telemetry import Telemetry
from tests.clock import FakeClock


class CountingReviewer:
    """Accepts every token as service account ``ns/<token>`` and counts the reviews asked of it."""

    def __init__(self) -> None:
        self.reviews: list[str] = []

    def review(self, token: str, audiences: Sequence[str]) -> ReviewStatus:
        self.reviews.append(token)
        return ReviewStatus(authenticated=True, username=f"{SA_PREFIX}ns:{token}", groups=(SA_GROUP,),
                            audiences=tuple(audiences))


def _call(token: str) -> CallCredentials:
    return CallCredentials(node_id="peer", invocation_metadata={"authorization": f"Bearer {token}"}, peer="peer")


def _authenticator(*, max_cached: int) -> tuple[CountingReviewer, FakeClock, KubernetesTokenAuthenticator]:
    reviewer, clock = CountingReviewer(), FakeClock()
    authn = KubernetesTokenAuthenticator({"Kubernetes": reviewer}, audiences=["istio-ca"],
                                         trust_domain=TrustDomain("cluster.local"),
                                         cache_ttl=dt.timedelta(minutes=1), clock=clock, telemetry=Telemetry(),
                                         max_cached=max_cached)
    return reviewer, clock, authn


async def test_a_full_cache_stays_bounded_keeps_the_newest_and_frees_a_tenth_at_once() -> None:
    reviewer, _, authn = _authenticator(max_cached=100)
    for n in range(250):
        caller = await authn.authenticate(_call(f"t{n}"))
        assert caller is not None and str(caller.spiffe_id) == f"spiffe://cluster.local/ns/ns/sa/t{n}"
        assert len(authn._cache) <= 100
    assert len(reviewer.reviews) == 250
    # Evicting frees ten at once, so the size saw-tooths between 90 and 100 instead of sitting at the cap.
    assert 90 <= len(authn._cache) <= 100
    await authn.authenticate(_call("t249"))  # the newest is still cached
    assert len(reviewer.reviews) == 250
    await authn.authenticate(_call("t0"))  # the oldest was evicted: asked again
    assert reviewer.reviews[-1] == "t0" and len(reviewer.reviews) == 251


async def test_expired_reviews_go_first_when_the_cache_is_full() -> None:
    reviewer, clock, authn = _authenticator(max_cached=10)
    for n in range(9):
        await authn.authenticate(_call(f"old{n}"))
    clock.advance(dt.timedelta(minutes=2))
    await authn.authenticate(_call("fresh"))
    await authn.authenticate(_call("fresher"))  # full: the nine expired go, nothing live is dropped
    assert len(authn._cache) == 2
    await authn.authenticate(_call("fresh"))
    assert reviewer.reviews.count("fresh") == 1


class BrokenReviewer:
    """A reviewer with a bug (not an API failure): what the authenticator must not mistake for an outage."""

    def review(self, token: str, audiences: Sequence[str]) -> ReviewStatus:
        raise KeyError("a bug")


async def test_a_bug_in_the_reviewer_is_an_internal_error_not_an_outage_or_a_rejection() -> None:
    import pytest

    from ca_service.errors import AuthenticationError, CAServiceError, NotReadyError

    telemetry = Telemetry()
    authn = KubernetesTokenAuthenticator({"Kubernetes": BrokenReviewer()}, audiences=["istio-ca"],
                                         trust_domain=TrustDomain("cluster.local"), cache_ttl=dt.timedelta(minutes=1),
                                         clock=FakeClock(), telemetry=telemetry)
    with pytest.raises(CAServiceError) as caught:
        await authn.authenticate(_call("t"))
    assert not isinstance(caught.value, NotReadyError | AuthenticationError)  # INTERNAL, with its traceback
    assert isinstance(caught.value.__cause__, KeyError)
    assert telemetry.registry.get_sample_value("ca_token_reviews_total", {"result": "error"}) == 1
