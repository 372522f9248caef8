"""SPIFFE ID and trust domain parsing against an independent reading of the SPIFFE ID spec: no input
raises anything but InvalidSpiffeIdError, nothing the spec forbids is accepted, and what it allows is."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ca_service.pki.identity import (
    MAX_SPIFFE_ID_BYTES,
    MAX_TRUST_DOMAIN_BYTES,
    InvalidSpiffeIdError,
    SpiffeId,
    TrustDomain,
)
from tests.properties.profiles import DEFAULT, SLOW, SLOW_TIMEOUT

# SPIFFE ID spec section 2: lowercase scheme, trust domain of [a-z0-9.-_], path segments of
# [a-zA-Z0-9.-_] that are neither empty, "." nor "..", no trailing slash, no query or fragment.
_TD = r"[a-z0-9._-]+"
_SEGMENT = r"[a-zA-Z0-9._-]+"
SPEC_ID = re.compile(rf"spiffe://({_TD})((?:/{_SEGMENT})*)")


def spec_accepts(value: str) -> bool:
    match = SPEC_ID.fullmatch(value)
    if match is None or len(value.encode("utf-8", "surrogatepass")) > MAX_SPIFFE_ID_BYTES:
        return False
    if len(match[1]) > MAX_TRUST_DOMAIN_BYTES:
        return False
    return all(segment not in (".", "..") for segment in match[2].split("/")[1:])


def spec_accepts_domain(name: str) -> bool:
    return re.fullmatch(_TD, name) is not None and len(name) <= MAX_TRUST_DOMAIN_BYTES


# Mostly near-valid IDs (where mistakes hide), plus any text at all, surrogates and controls included.
_ANY_CHAR = st.characters(exclude_categories=())
_NEAR = st.lists(st.sampled_from(["spiffe://", "SPIFFE://", "spiffe:/", "example.org", "td", "EX", "a-b_c.d",
                                  "/", "//", "/ns", "/.", "/..", "/x", ":8080", "@", "?q", "#f", "%2F", "\n",
                                  "\u0430", "\ud800", " ", "*", "/ns/default/sa/web"]), max_size=8).map("".join)
IDS = st.one_of(_NEAR, st.text(_ANY_CHAR, max_size=64), st.from_regex(SPEC_ID, fullmatch=True),
                st.builds(lambda td, n: f"spiffe://{td}" + "/a" * n, st.from_regex(_TD, fullmatch=True),
                          st.integers(0, 1100)))
DOMAINS = st.one_of(st.text(_ANY_CHAR, max_size=40), st.from_regex(_TD, fullmatch=True),
                    st.integers(250, 260).map(lambda n: "a" * n))


def check_spiffe_id(value: str) -> None:
    try:
        parsed = SpiffeId.parse(value)
    except InvalidSpiffeIdError:
        assert not spec_accepts(value), f"the spec allows {value!r} but it was refused"
        return
    assert spec_accepts(value), f"accepted {value!r}, which the SPIFFE ID spec forbids"
    assert str(parsed) == value
    assert SpiffeId.parse(str(parsed)) == parsed


def check_trust_domain(name: str) -> None:
    try:
        td = TrustDomain(name)
    except InvalidSpiffeIdError:
        assert not spec_accepts_domain(name), f"the spec allows trust domain {name!r} but it was refused"
        return
    assert spec_accepts_domain(name), f"accepted trust domain {name!r}, which the spec forbids"
    assert str(td) == name


@DEFAULT
@given(IDS)
def test_a_spiffe_id_is_accepted_exactly_when_the_spec_allows_it(value: str) -> None:
    check_spiffe_id(value)


@DEFAULT
@given(DOMAINS)
def test_a_trust_domain_is_accepted_exactly_when_the_spec_allows_it(name: str) -> None:
    check_trust_domain(name)


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT)
@SLOW
@given(IDS)
def test_ten_thousand_spiffe_ids_are_judged_as_the_spec_does(value: str) -> None:
    check_spiffe_id(value)


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT)
@SLOW
@given(DOMAINS)
def test_ten_thousand_trust_domains_are_judged_as_the_spec_does(name: str) -> None:
    check_trust_domain(name)
