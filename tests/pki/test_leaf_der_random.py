"""Randomized differential test of the templated leaf encoder: a few hundred cases in the default run,
ten thousand under ``-m slow`` (``pytest -m slow tests/pki/test_leaf_der_random.py``).

Inputs are drawn across every key type for signer and leaf, serials of every octet length (with and
without the high bit set), SPIFFE IDs up to the 2048-byte maximum, and validity instants from 1950 to
9998 in several time zones with microseconds, biased towards the 2050 UTCTime/GeneralizedTime switch.
"""

from __future__ import annotations

import datetime as dt
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.properties.profiles import SLOW_TIMEOUT

from .test_leaf_der import ALGORITHMS, assert_same_der, leaf_keys

MAX_SERIAL = (1 << 159) - 1
# The characters a SPIFFE ID path may hold (SPIFFE ID spec 2.2), and a trust domain's.
PATH_CHARS = string.ascii_letters + string.digits + ".-_"
TD_CHARS = string.ascii_lowercase + string.digits + ".-_"
ZONES = [dt.UTC, dt.timezone(dt.timedelta(hours=2)), dt.timezone(dt.timedelta(hours=-5, minutes=-30))]
SWITCH = dt.datetime(2050, 1, 1)


@st.composite
def spiffe_ids(draw: st.DrawFn) -> str:
    trust_domain = draw(st.text(TD_CHARS, min_size=1, max_size=40))
    prefix = f"spiffe://{trust_domain}/"
    length = draw(st.integers(1, 2048 - len(prefix)))
    # A short random seed repeated to the drawn length: cheap to draw, still varied in content.
    seed = draw(st.text(PATH_CHARS, min_size=1, max_size=16))
    return prefix + (seed * (length // len(seed) + 1))[:length]


serials = st.one_of(
    st.integers(1, MAX_SERIAL),
    st.integers(1, 19).map(lambda octets: 1 << (8 * octets - 1)),  # high bit set: a leading 0x00 octet
    st.integers(1, 20).flatmap(lambda octets: st.integers(1 << (8 * octets - 8), min(MAX_SERIAL,
                                                                                     (1 << 8 * octets) - 1))),
)
instants = st.one_of(
    st.datetimes(dt.datetime(1950, 1, 2), dt.datetime(9998, 12, 31), timezones=st.sampled_from(ZONES)),
    st.datetimes(SWITCH - dt.timedelta(days=2), SWITCH + dt.timedelta(days=2), timezones=st.sampled_from(ZONES)),
)
lifetimes = st.one_of(st.timedeltas(dt.timedelta(0), dt.timedelta(days=400)),
                      st.timedeltas(dt.timedelta(0), dt.timedelta(seconds=3)))


@st.composite
def cases(draw: st.DrawFn) -> dict[str, object]:
    leaf = draw(st.sampled_from(ALGORITHMS))
    not_before = draw(instants)
    return {"signer": draw(st.sampled_from(ALGORITHMS)), "key": draw(st.sampled_from(leaf_keys(leaf))),
            "uri": draw(spiffe_ids()), "serial": draw(serials), "not_before": not_before,
            "not_after": not_before + draw(lifetimes)}


def check(case: dict[str, object]) -> None:
    assert_same_der(**case)  # type: ignore[arg-type]


COMMON = {"deadline": None, "database": None, "suppress_health_check": [HealthCheck.too_slow]}


@settings(max_examples=300, **COMMON)  # type: ignore[arg-type]
@given(cases())
def test_a_few_hundred_random_leaves_give_the_builders_bytes(case: dict[str, object]) -> None:
    check(case)


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT)
@settings(max_examples=10_000, **COMMON)  # type: ignore[arg-type]
@given(cases())
def test_ten_thousand_random_leaves_give_the_builders_bytes(case: dict[str, object]) -> None:
    check(case)

