"""What the issuer keeps next to a leaf (serial, validity) is what the leaf itself says, on every path
(template and builder, EC and RSA keys, clamped to the signer, across 2050, sub-second and non-UTC
clocks, in process and on the pool), and a storm's parent process does not parse the leaves it gets back."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from ca_service.adapters.csr_pool import PoolCsrSigner
from ca_service.adapters.signing_pool import SigningPool
from ca_service.config import Settings
from ca_service.pki.csr import DEFAULT_ALLOWED_KEY_TYPES
from ca_service.pki.identity import SpiffeId
from ca_service.pki.keys import KeyAlgorithm, generate_private_key
from ca_service.pki.templates import CAKind, LeafEncoder, leaf_validity
from ca_service.pki.verify import ChainVerificationError
from ca_service.services import issuer as issuer_module
from ca_service.services.authority import Authority
from ca_service.services.csr_signing import CsrOrder
from ca_service.services.issuer import IssuedSvid, Issuer
from ca_service.storage.directory import DirectoryStore
from tests.clock import FakeClock

WORKLOAD = SpiffeId.parse("spiffe://cluster.local/ns/facts/sa/web")
INSTANTS = {
    "sub-second": dt.datetime(2030, 1, 1, 12, 0, 0, 987654, tzinfo=dt.UTC),
    # notBefore is a UTCTime (2049), notAfter a GeneralizedTime (2050).
    "across 2050": dt.datetime(2049, 12, 31, 23, 30, 0, 500000, tzinfo=dt.UTC),
    "non-UTC clock": dt.datetime(2030, 6, 1, 3, 15, 42, 250000, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
}


def _authority(settings: Settings, tmp_path: Path, now: dt.datetime, encoder: LeafEncoder) -> Authority:
    authority = Authority(DirectoryStore(tmp_path / f"state-{encoder.value}"), settings.domain,
                          dataclasses.replace(settings.ca, leaf_encoder=encoder), FakeClock(now))
    authority.load_or_bootstrap()
    return authority


def _assert_facts_match_the_leaf(svid: IssuedSvid) -> None:
    parsed = x509.load_der_x509_certificate(svid.leaf_der)
    assert (svid.serial_number, svid.not_before, svid.not_after) == (
        parsed.serial_number, parsed.not_valid_before_utc, parsed.not_valid_after_utc)
    assert svid.serial == format(parsed.serial_number, "x")
    # Equal aware datetimes may differ in zone; the ledger and logs print these, so they are UTC.
    assert svid.not_before.tzinfo is dt.UTC and svid.not_after.tzinfo is dt.UTC


@pytest.mark.parametrize("encoder", list(LeafEncoder), ids=lambda e: e.value)
@pytest.mark.parametrize("key_algorithm", [KeyAlgorithm.EC_P256, KeyAlgorithm.RSA_2048], ids=lambda a: a.value)
@pytest.mark.parametrize("instant", list(INSTANTS.values()), ids=list(INSTANTS))
def test_an_issued_svid_carries_the_serial_and_validity_its_leaf_was_signed_with(
    settings: Settings, tmp_path: Path, encoder: LeafEncoder, key_algorithm: KeyAlgorithm, instant: dt.datetime,
) -> None:
    authority = _authority(settings, tmp_path, instant, encoder)
    svid = authority.issue_svid(WORKLOAD, generate_private_key(key_algorithm).public_key(), now=instant)
    _assert_facts_match_the_leaf(svid)
    assert svid.not_before.microsecond == svid.not_after.microsecond == 0


@pytest.mark.parametrize("encoder", list(LeafEncoder), ids=lambda e: e.value)
def test_the_kept_validity_is_the_clamped_one_at_both_ends_of_the_signer(
    settings: Settings, tmp_path: Path, encoder: LeafEncoder,
) -> None:
    start = INSTANTS["sub-second"]
    authority = _authority(settings, tmp_path, start, encoder)
    signer = authority.signer(CAKind.INTERMEDIATE).cert
    key = generate_private_key().public_key()
    # Signed just after the signer starts: the 5-minute backdate would reach before it.
    early = authority.issuer.issue(WORKLOAD, key,
                                   now=signer.not_valid_before_utc + dt.timedelta(seconds=1, microseconds=3))
    _assert_facts_match_the_leaf(early)
    assert early.not_before == signer.not_valid_before_utc
    # Signed an hour before the signer ends: a 24-hour leaf would outlive it.
    late = authority.issuer.issue(WORKLOAD, key, now=signer.not_valid_after_utc - dt.timedelta(hours=1, microseconds=7))
    _assert_facts_match_the_leaf(late)
    assert late.not_after == signer.not_valid_after_utc


def test_a_serving_certificate_with_dns_names_carries_its_facts_too(settings: Settings, tmp_path: Path) -> None:
    instant = INSTANTS["sub-second"]
    authority = _authority(settings, tmp_path, instant, LeafEncoder.TEMPLATE)  # DNS SANs take the builder
    svid = authority.issuer.issue_serving(WORKLOAD, generate_private_key().public_key(), dns_names=["ca.local"],
                                          now=instant)
    _assert_facts_match_the_leaf(svid)


@pytest.fixture
def pool(authority: Authority) -> Iterator[SigningPool]:
    signing_pool = SigningPool(authority.issuer, workers=2, chunk=2)
    yield signing_pool
    signing_pool.close()


async def test_a_storm_parent_parses_one_leaf_per_signer_and_its_svids_carry_their_facts(
    authority: Authority, pool: SigningPool, clock: FakeClock, monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool.warm_up()  # workers spawned and holding the signer: nothing below but the storms
    ids = [SpiffeId.parse(f"spiffe://cluster.local/ns/facts/sa/sa-{i}") for i in range(7)]
    issuer_module._parsed_leaf.cache_clear()
    parsed: list[bytes] = []
    original = x509.load_der_x509_certificate

    def counting(data: bytes, *args: object) -> x509.Certificate:
        parsed.append(data)
        return original(data, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(x509, "load_der_x509_certificate", counting)
    first = await pool.issue_many(ids, now=clock.now())
    # The signer's chain is verified once, on the first leaf it signs; no other leaf is parsed.
    assert len(parsed) == 1 and parsed[0] in {s.svid.leaf_der for s in first}
    second = await pool.issue_many(ids, now=clock.now())
    assert len(parsed) == 1
    monkeypatch.undo()
    for signed in (*first, *second):
        _assert_facts_match_the_leaf(signed.svid)
    assert len({s.svid.serial_number for s in (*first, *second)}) == 2 * len(ids)


async def test_a_csr_batch_on_the_pool_keeps_each_leafs_own_facts_whatever_its_ttl(
    authority: Authority, pool: SigningPool, clock: FakeClock,
) -> None:
    signer = PoolCsrSigner(authority, pool)
    ttls = [dt.timedelta(hours=1), dt.timedelta(minutes=10), dt.timedelta(hours=1), dt.timedelta(minutes=10)]
    orders = []
    for i, ttl in enumerate(ttls):
        spiffe_id = SpiffeId.parse(f"spiffe://cluster.local/ns/facts/sa/csr-{i}")
        csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
               .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
                              critical=False)
               .sign(generate_private_key(), hashes.SHA256()).public_bytes(serialization.Encoding.PEM))  # type: ignore[arg-type]
        orders.append(CsrOrder(csr, spiffe_id, DEFAULT_ALLOWED_KEY_TYPES, ttl, clock.now()))
    results = await asyncio.gather(*[signer.sign(order) for order in orders])  # one event-loop turn: one batch
    for ttl, result in zip(ttls, results, strict=True):
        _assert_facts_match_the_leaf(result.svid)
        assert result.svid.not_after - result.svid.not_before == ttl + authority.settings.backdate


@pytest.mark.parametrize("wrong", ["serial", "not_after"])
def test_the_first_leaf_of_a_signer_must_carry_the_facts_given_for_it(
    authority: Authority, clock: FakeClock, wrong: str,
) -> None:
    signed = authority.issue_svid(WORKLOAD, generate_private_key().public_key())  # a leaf to re-wrap
    fresh = Issuer(authority, authority.issuer.policy)  # has checked no signer yet
    facts = {"serial": signed.serial_number, "not_before": signed.not_before, "not_after": signed.not_after}
    facts[wrong] = facts[wrong] + (1 if wrong == "serial" else dt.timedelta(seconds=1))  # type: ignore[operator]
    with pytest.raises(ChainVerificationError, match="serial and validity"):
        fresh.assemble(WORKLOAD, signed.leaf_der, facts["serial"], authority.issuer.signing_context(),  # type: ignore[arg-type]
                       not_before=facts["not_before"], not_after=facts["not_after"], now=clock.now())  # type: ignore[arg-type]
    # The same leaf with the facts it carries is accepted.
    assert fresh.assemble(WORKLOAD, signed.leaf_der, signed.serial_number, authority.issuer.signing_context(),
                          not_before=signed.not_before, not_after=signed.not_after, now=clock.now()) == signed


def test_the_leaf_is_parsed_on_demand_and_shared_with_the_chain(authority: Authority) -> None:
    svid = authority.issue_svid(WORKLOAD, generate_private_key().public_key())
    assert svid.leaf is svid.leaf is svid.chain[0]
    assert svid.chain[1:] == authority.issuer.signing_context().chain.tail
    assert svid.roots == authority.issuer.signing_context().chain.roots


# ---------------------------------------------------------------- leaf_validity against its definition

_ZONES = [dt.UTC, dt.timezone(dt.timedelta(hours=5, minutes=30)), dt.timezone(dt.timedelta(hours=-8))]


@settings(max_examples=400, deadline=None)
@given(now=st.datetimes(min_value=dt.datetime(1990, 1, 1), max_value=dt.datetime(2200, 1, 1)),
       zone=st.sampled_from(_ZONES), bound_zone=st.sampled_from(_ZONES),
       ttl=st.timedeltas(min_value=dt.timedelta(seconds=1), max_value=dt.timedelta(days=400)),
       backdate=st.timedeltas(min_value=dt.timedelta(0), max_value=dt.timedelta(hours=2)),
       whole=st.booleans(), start=st.timedeltas(min_value=dt.timedelta(0), max_value=dt.timedelta(days=30)),
       end=st.timedeltas(min_value=dt.timedelta(0), max_value=dt.timedelta(days=30)))
def test_leaf_validity_is_the_clamped_window_in_whole_utc_seconds(
        now: dt.datetime, zone: dt.tzinfo, bound_zone: dt.tzinfo, ttl: dt.timedelta, backdate: dt.timedelta,
        whole: bool, start: dt.timedelta, end: dt.timedelta) -> None:
    # Whole-second durations take a shortcut (drop the fraction from now first); both must agree with
    # the definition, for any zone of the clock and of the issuer's bounds, and bounds off whole seconds.
    if whole:
        ttl, backdate = dt.timedelta(seconds=int(ttl.total_seconds()) or 1), \
            dt.timedelta(seconds=int(backdate.total_seconds()))
    aware = now.replace(tzinfo=zone)
    issuer = types.SimpleNamespace(not_before=(aware - start).astimezone(bound_zone),
                                   not_after=(aware + end).astimezone(bound_zone))
    got = leaf_validity(issuer, now=aware, ttl=ttl, backdate=backdate)  # type: ignore[arg-type]
    want = tuple(t.astimezone(dt.UTC).replace(microsecond=0) for t in (
        max(aware - backdate, issuer.not_before), min(aware + ttl, issuer.not_after)))
    assert got == want
    assert all(t.tzinfo is dt.UTC and t.microsecond == 0 for t in got)
