"""The templated leaf encoder (pki/leaf_der.py) against cryptography's CertificateBuilder, byte for byte.

Each case encodes one leaf both ways with the same serial, times, key and SPIFFE ID and compares the
TBSCertificate DER exactly; the whole Certificate is compared too, with the builder's signature spliced
into the template's output (ECDSA signatures are randomized, so two signings never match; RSA PKCS#1
v1.5 is deterministic, so for RSA signers the two independently signed certificates must be equal).
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca_service.pki.certs import der_to_pem
from ca_service.pki.keys import KeyAlgorithm, PublicKey, generate_private_key
from ca_service.pki.leaf_der import TemplateNotApplicable, encode_serial, encode_time
from ca_service.pki.templates import IssuerProfile, build_leaf_with_builder

from .conftest import NOW, WORKLOAD, cached_hierarchy

DER = serialization.Encoding.DER
ALGORITHMS = list(KeyAlgorithm)
RSA_SIGNERS = {KeyAlgorithm.RSA_2048, KeyAlgorithm.RSA_3072}
SERIAL = 0x5EED_0000_0000_0000_0000_0000_0000_0000_0000_0001
NOT_BEFORE, NOT_AFTER = NOW - dt.timedelta(minutes=5), NOW + dt.timedelta(hours=24)
TD_PREFIX = "spiffe://cluster.local/"


@functools.cache
def profile(algorithm: KeyAlgorithm) -> IssuerProfile:
    h = cached_hierarchy(algorithm)
    return IssuerProfile.of(h.signing, h.signing_key)


@functools.cache
def leaf_keys(algorithm: KeyAlgorithm) -> tuple[PublicKey, ...]:
    # RSA-3072 generation takes up to a second; a few keys per type are reused across cases.
    return tuple(generate_private_key(algorithm).public_key() for _ in range(3))


def spiffe_id_of_length(n: int) -> str:
    return TD_PREFIX + "p" * (n - len(TD_PREFIX))


def assert_same_der(signer: KeyAlgorithm, key: PublicKey, uri: str, *, serial: int = SERIAL,
                    not_before: dt.datetime = NOT_BEFORE, not_after: dt.datetime = NOT_AFTER) -> x509.Certificate:
    """Both encoders on one input: identical TBS, identical certificate, a valid signature."""
    issuer = profile(signer)
    assert issuer.template is not None
    reference = build_leaf_with_builder(key, uri, issuer, serial=serial, not_before=not_before, not_after=not_after)
    tbs = issuer.template.tbs(key, uri, serial=serial, not_before=not_before, not_after=not_after)
    assert tbs == reference.tbs_certificate_bytes, f"TBS differs:\n{tbs.hex()}\n{reference.tbs_certificate_bytes.hex()}"
    assert issuer.template.assemble(tbs, reference.signature) == reference.public_bytes(DER)
    # The PEM the daemon sends is made from the DER it signed (der_to_pem): the same text as cryptography's.
    assert der_to_pem(reference.public_bytes(DER)) == reference.public_bytes(serialization.Encoding.PEM)
    templated = x509.load_der_x509_certificate(issuer.template.sign(tbs))
    templated.verify_directly_issued_by(cached_hierarchy(signer).signing)
    if signer in RSA_SIGNERS:
        assert templated.public_bytes(DER) == reference.public_bytes(DER)
    return templated


# ---------------------------------------------------------------- boundary cases


@pytest.mark.parametrize(("signer", "leaf"), list(itertools.product(ALGORITHMS, ALGORITHMS)),
                         ids=lambda a: a.value)
def test_every_signer_and_leaf_key_type_gives_the_builders_bytes(signer: KeyAlgorithm, leaf: KeyAlgorithm) -> None:
    for key in leaf_keys(leaf):
        assert_same_der(signer, key, str(WORKLOAD))


def test_spiffe_id_lengths_across_every_der_length_boundary_give_the_builders_bytes() -> None:
    # Every URI length from 100 to 700 bytes, consecutively: each nested element on the SAN's path
    # (IA5String, GeneralNames, extnValue, Extension, extensions, [3], TBS, Certificate) passes its
    # 127/128 and 255/256 boundaries where its size allows (the TBS is always past 256 bytes).
    lengths = range(100, 701)
    assert {127, 128, 255, 256} <= set(lengths)
    key = leaf_keys(KeyAlgorithm.EC_P256)[0]
    for n in lengths:
        assert_same_der(KeyAlgorithm.EC_P256, key, spiffe_id_of_length(n))


@pytest.mark.parametrize("n", [2048, 1024, 300, 256, 255, 129, 128, 127, 126])
@pytest.mark.parametrize("signer", ALGORITHMS, ids=lambda a: a.value)
def test_long_and_boundary_spiffe_ids_give_the_builders_bytes_for_every_signer(signer: KeyAlgorithm, n: int) -> None:
    # 2048 bytes is the SPIFFE maximum; with an RSA-3072 leaf it also takes the TBS past 2 KiB.
    for leaf in (KeyAlgorithm.EC_P384, KeyAlgorithm.RSA_3072):
        assert_same_der(signer, leaf_keys(leaf)[0], spiffe_id_of_length(n))


SERIALS = {
    "the smallest serial": 1,
    "0x7f needs no padding": 0x7F,
    "0x80 has the high bit set and gets a leading zero octet": 0x80,
    "0xff has the high bit set": 0xFF,
    "0x100 is two octets": 0x100,
    "a 19-octet serial with the high bit set becomes 20 octets": 1 << 151,
    "a 19-octet all-ones serial": (1 << 152) - 1,
    "the largest allowed serial (159 bits)": (1 << 159) - 1,
    "a 159-bit serial with only the top bit": 1 << 158,
}


@pytest.mark.parametrize("serial", list(SERIALS.values()), ids=list(SERIALS))
@pytest.mark.parametrize("signer", [KeyAlgorithm.EC_P256, KeyAlgorithm.RSA_2048], ids=lambda a: a.value)
def test_serials_with_and_without_the_high_bit_give_the_builders_bytes(signer: KeyAlgorithm, serial: int) -> None:
    cert = assert_same_der(signer, leaf_keys(KeyAlgorithm.EC_P256)[0], str(WORKLOAD), serial=serial)
    assert cert.serial_number == serial


def test_a_serial_with_the_high_bit_set_is_encoded_with_a_leading_zero_octet() -> None:
    assert encode_serial(0x80) == bytes.fromhex("02020080")
    assert encode_serial(0x7F) == bytes.fromhex("02017f")
    assert encode_serial(1 << 151) == bytes.fromhex("0214") + b"\x00\x80" + bytes(18)


UTC = dt.UTC
PLUS_2 = dt.timezone(dt.timedelta(hours=2))
TIMES = {
    "both in UTCTime": (dt.datetime(2030, 1, 1, tzinfo=UTC), dt.datetime(2030, 1, 2, tzinfo=UTC)),
    "the last UTCTime second and the first GeneralizedTime second":
        (dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC), dt.datetime(2050, 1, 1, tzinfo=UTC)),
    "both in GeneralizedTime": (dt.datetime(2050, 1, 1, tzinfo=UTC), dt.datetime(2099, 6, 30, 8, 7, 6, tzinfo=UTC)),
    "the first UTCTime year": (dt.datetime(1950, 1, 1, tzinfo=UTC), dt.datetime(1950, 1, 1, 0, 0, 1, tzinfo=UTC)),
    "the last representable year": (dt.datetime(9999, 1, 1, tzinfo=UTC), dt.datetime(9999, 12, 31, 23, 59, 59,
                                                                                     tzinfo=UTC)),
    "microseconds are truncated as the builder does":
        (dt.datetime(2030, 1, 1, 0, 0, 0, 999999, tzinfo=UTC), dt.datetime(2049, 12, 31, 23, 59, 59, 1, tzinfo=UTC)),
    "another time zone is converted to UTC, across 2050":
        (dt.datetime(2050, 1, 1, 1, 30, tzinfo=PLUS_2), dt.datetime(2050, 1, 1, 2, 0, 0, 5, tzinfo=PLUS_2)),
    "notBefore equal to notAfter": (dt.datetime(2040, 5, 5, tzinfo=UTC), dt.datetime(2040, 5, 5, tzinfo=UTC)),
}


@pytest.mark.parametrize(("not_before", "not_after"), list(TIMES.values()), ids=list(TIMES))
def test_validity_on_both_sides_of_2050_gives_the_builders_bytes(not_before: dt.datetime,
                                                                 not_after: dt.datetime) -> None:
    for signer in (KeyAlgorithm.EC_P256, KeyAlgorithm.RSA_2048):
        assert_same_der(signer, leaf_keys(KeyAlgorithm.EC_P256)[0], str(WORKLOAD), not_before=not_before,
                        not_after=not_after)


def test_times_use_utctime_before_2050_and_generalizedtime_from_2050() -> None:
    assert encode_time(dt.datetime(2049, 12, 31, 23, 59, 59)) == b"\x17\x0d491231235959Z"
    assert encode_time(dt.datetime(2050, 1, 1)) == b"\x18\x0f20500101000000Z"


REFUSED = {
    "a zero serial": {"serial": 0},
    "a negative serial": {"serial": -5},
    "a 160-bit serial": {"serial": 1 << 159},
    "a notBefore before 1950": {"not_before": dt.datetime(1949, 12, 31, 23, 59, 59, tzinfo=UTC)},
    "a notAfter before notBefore": {"not_after": NOT_BEFORE - dt.timedelta(seconds=1)},
}


@pytest.mark.parametrize("change", list(REFUSED.values()), ids=list(REFUSED))
def test_what_the_builder_refuses_the_template_hands_back_and_the_builder_refuses(change: dict[str, object]) -> None:
    issuer = profile(KeyAlgorithm.EC_P256)
    assert issuer.template is not None
    args: dict[str, object] = {"serial": SERIAL, "not_before": NOT_BEFORE, "not_after": NOT_AFTER, **change}
    key = leaf_keys(KeyAlgorithm.EC_P256)[0]
    with pytest.raises(TemplateNotApplicable):
        issuer.template.tbs(key, str(WORKLOAD), **args)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        build_leaf_with_builder(key, str(WORKLOAD), issuer, **args)  # type: ignore[arg-type]


def test_der_to_pem_breaks_lines_as_the_ssl_module_does_at_every_length() -> None:
    # 48 bytes make one full 64-character line: every remainder, and exact multiples, are covered.
    der = bytes(range(256)) * 2
    for size in range(1, 300):
        assert der_to_pem(der[:size]) == ssl.DER_cert_to_PEM_cert(der[:size]).encode("ascii"), size
