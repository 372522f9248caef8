"""CSR policy (pki/csr.py) against random CSRs: no input raises anything but the CSR errors of the one
tree, and a CSR is accepted only when it asks for exactly the caller's identity: one URI SAN equal to
the entitled SPIFFE ID (or no SAN), no other name of any kind, no CA flag, no other extension, an
allowed key and a valid signature."""

from __future__ import annotations

import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from ca_service.errors import CSRRejectedError, InvalidRequestError
from ca_service.pki.csr import check_csr
from ca_service.pki.identity import SpiffeId
from tests.properties.profiles import DEFAULT, SLOW, SLOW_TIMEOUT

ENTITLED = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web")
# One key per curve for the whole run: key generation is not what is under test, the policy is.
KEYS = {"p256": ec.generate_private_key(ec.SECP256R1()), "p384": ec.generate_private_key(ec.SECP384R1()),
        "p521": ec.generate_private_key(ec.SECP521R1())}

URIS = st.one_of(st.just(str(ENTITLED)), st.just("spiffe://cluster.local/ns/kube-system/sa/admin"),
                 st.just("spiffe://other.domain/ns/shop/sa/web"), st.just(str(ENTITLED) + "/x"),
                 st.just("https://example.com"), st.text(st.characters(codec="ascii", min_codepoint=33), max_size=20))
NAMES = st.one_of(
    URIS.map(x509.UniformResourceIdentifier),
    st.sampled_from(["web.shop.svc", "localhost", "*.example.com"]).map(x509.DNSName),
    st.sampled_from(["10.0.0.1", "::1"]).map(lambda a: x509.IPAddress(ipaddress.ip_address(a))),
    st.just(x509.RFC822Name("a@example.com")),
)
EXTRAS = st.sampled_from([None, "ca", "not-ca", "eku", "key-usage"])
SUBJECTS = st.sampled_from([[], [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local")],
                            [x509.NameAttribute(NameOID.COMMON_NAME, "admin")]])


def _build(key_name: str, names: list[x509.GeneralName] | None, extra: str | None,
           subject: list[x509.NameAttribute], tamper: bool) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(subject))
    if names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if extra in ("ca", "not-ca"):
        builder = builder.add_extension(x509.BasicConstraints(ca=extra == "ca", path_length=None), critical=True)
    elif extra == "eku":
        builder = builder.add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CODE_SIGNING]),
                                        critical=False)
    elif extra == "key-usage":
        builder = builder.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                                        critical=True)
    csr = builder.sign(KEYS[key_name], hashes.SHA256())
    if not tamper:
        return csr
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01
    return x509.load_der_x509_csr(bytes(der))


def check(key_name: str, names: list[x509.GeneralName] | None, extra: str | None,
          subject: list[x509.NameAttribute], tamper: bool) -> None:
    try:
        csr = _build(key_name, names, extra, subject, tamper)
    except ValueError:
        return  # cryptography itself refuses to build it (e.g. an empty SAN list): nothing reaches us
    try:
        check_csr(csr, ENTITLED)
    except (CSRRejectedError, InvalidRequestError):
        return
    # Accepted: it must have asked for nothing but the caller's own identity.
    assert not tamper, "a CSR whose signature was tampered with was accepted"
    assert key_name in ("p256", "p384"), f"a {key_name} key was accepted"
    assert extra in (None, "not-ca"), f"a CSR with extension {extra} was accepted"
    assert names is None or names == [x509.UniformResourceIdentifier(str(ENTITLED))], f"accepted names {names}"
    assert all(a.oid == NameOID.ORGANIZATION_NAME for a in subject), f"accepted subject {subject}"


CASES = (st.sampled_from(sorted(KEYS)), st.one_of(st.none(), st.lists(NAMES, min_size=0, max_size=3)), EXTRAS,
         SUBJECTS, st.booleans())


def test_the_property_is_not_vacuous_the_callers_own_csr_is_accepted() -> None:
    csr = _build("p256", [x509.UniformResourceIdentifier(str(ENTITLED))], None, [], False)
    assert check_csr(csr, ENTITLED) is not None


@DEFAULT
@given(*CASES)
def test_a_csr_is_accepted_only_when_it_asks_for_exactly_the_callers_identity(
        key_name: str, names: list[x509.GeneralName] | None, extra: str | None,
        subject: list[x509.NameAttribute], tamper: bool) -> None:
    check(key_name, names, extra, subject, tamper)


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT)
@SLOW
@given(*CASES)
def test_ten_thousand_csrs_are_judged_by_the_policy(
        key_name: str, names: list[x509.GeneralName] | None, extra: str | None,
        subject: list[x509.NameAttribute], tamper: bool) -> None:
    check(key_name, names, extra, subject, tamper)
