"""CSR checks (the CSR contributes only a key) and chain verification at a given instant."""

from __future__ import annotations

import base64
import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from ca_service.errors import InvalidRequestError
from ca_service.pki import csr as csr_module
from ca_service.pki.csr import CSRRejectedError, check_csr, parse_csr
from ca_service.pki.keys import KeyAlgorithm, generate_private_key, same_public_key
from ca_service.pki.verify import ChainVerificationError, verify_ca_chain, verify_svid

from .conftest import NOW, WORKLOAD, Hierarchy, build_hierarchy

AnyKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _csr(key: AnyKey | None = None, *, sans: list[x509.GeneralName] | None = None,
         subject: list[x509.NameAttribute] | None = None, ca: bool | None = None,
         extra: x509.ExtensionType | None = None) -> x509.CertificateSigningRequest:
    key = key or generate_private_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(subject or []))
    builder = builder.add_extension(
        x509.SubjectAlternativeName(sans if sans is not None else [x509.UniformResourceIdentifier(str(WORKLOAD))]),
        critical=False,
    )
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    if extra is not None:
        builder = builder.add_extension(extra, critical=False)
    return builder.sign(key, hashes.SHA256())


def _tampered() -> x509.CertificateSigningRequest:
    # Flip a byte of the signature: the body is intact but the proof of possession no longer verifies.
    good = _csr()
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0xFF
    return x509.load_der_x509_csr(bytes(der))


REJECTED: dict[str, tuple[object, type[Exception], str]] = {
    "if the signature is bad, should reject as invalid": (_tampered, InvalidRequestError, "signature"),
    "if the key is P-521, should reject the key":
        (lambda: _csr(ec.generate_private_key(ec.SECP521R1())), CSRRejectedError, "secp521r1"),
    "if the key is RSA-1024, should reject the key":
        (lambda: _csr(rsa.generate_private_key(public_exponent=65537, key_size=1024)), CSRRejectedError, "1024"),
    "if it requests a CA, should reject it": (lambda: _csr(ca=True), CSRRejectedError, "CA"),
    "if it carries an extra extension, should reject it":
        (lambda: _csr(extra=x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CODE_SIGNING])),
         CSRRejectedError, "extension"),
    "if its SAN names another SPIFFE ID, should reject it":
        (lambda: _csr(sans=[x509.UniformResourceIdentifier("spiffe://cluster.local/ns/kube-system/sa/admin")]),
         CSRRejectedError, "entitled only to"),
    "if its SAN adds a DNS name, should reject it":
        (lambda: _csr(sans=[x509.UniformResourceIdentifier(str(WORKLOAD)), x509.DNSName("evil.example")]),
         CSRRejectedError, "evil.example"),
    "if its SAN names another trust domain, should reject it":
        (lambda: _csr(sans=[x509.UniformResourceIdentifier("spiffe://other.local/ns/default/sa/web")]),
         CSRRejectedError, "entitled only to"),
    "if its subject has a CN, should reject it":
        (lambda: _csr(subject=[x509.NameAttribute(NameOID.COMMON_NAME, "admin")]), CSRRejectedError, "subject"),
}


@pytest.mark.parametrize("case", list(REJECTED))
def test_csr_rejections(case: str) -> None:
    make, error, fragment = REJECTED[case]
    csr = make()  # type: ignore[operator]
    with pytest.raises(error, match=fragment):
        check_csr(csr, WORKLOAD)


def test_a_key_type_outside_the_allowed_set_is_rejected() -> None:
    csr = _csr(generate_private_key(KeyAlgorithm.EC_P384))
    with pytest.raises(CSRRejectedError, match="not allowed here"):
        check_csr(csr, WORKLOAD, allowed_algorithms={KeyAlgorithm.EC_P256})


ACCEPTED: dict[str, object] = {
    "if the SAN is exactly the entitled ID, should accept": lambda: _csr(),
    "if there is no SAN at all, should accept (the identity comes from the caller)":
        lambda: x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(
            generate_private_key(), hashes.SHA256()),
    "if it says CA:FALSE, should accept": lambda: _csr(ca=False),
    "if the subject only holds an Organization (istio-agent --org), should accept":
        lambda: _csr(subject=[x509.NameAttribute(NameOID.ORGANIZATION_NAME, "acme")]),
    "if the key is RSA-2048, should accept": lambda: _csr(generate_private_key(KeyAlgorithm.RSA_2048)),
    "if the key is P-384, should accept": lambda: _csr(generate_private_key(KeyAlgorithm.EC_P384)),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_csr_acceptances_return_the_requested_key(case: str) -> None:
    csr = ACCEPTED[case]()  # type: ignore[operator]
    key = check_csr(csr, WORKLOAD)
    assert same_public_key(key, csr.public_key())  # type: ignore[arg-type]


def test_parse_csr_round_trips_pem_and_rejects_garbage() -> None:
    csr = _csr()
    pem = csr.public_bytes(serialization.Encoding.PEM)
    assert parse_csr(pem.decode()) == csr
    with pytest.raises(InvalidRequestError, match="not a valid PEM"):
        parse_csr(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")


@pytest.mark.parametrize("plain", [True, False], ids=["plain-pem", "pem-parser"])
def test_a_csr_of_another_version_is_refused_as_a_bad_csr(plain: bool) -> None:
    # cryptography raises InvalidVersion, which is no ValueError, for a version other than v1 (0).
    der = bytearray(_csr().public_bytes(serialization.Encoding.DER))
    at = der.index(bytes.fromhex("020100"))  # the first INTEGER: CertificationRequestInfo.version
    der[at + 2] = 1
    body = base64.encodebytes(bytes(der)).replace(b"\n", b"")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    data = b"\n".join([b"-----BEGIN CERTIFICATE REQUEST-----", *lines, b"-----END CERTIFICATE REQUEST-----", b""])
    if not plain:
        data = data.replace(b"\n", b"\r\n")  # not the plain form: cryptography's PEM parser reads it
    assert (csr_module._plain_pem_der(data) is not None) is plain
    with pytest.raises(InvalidRequestError, match="not a valid PEM"):
        parse_csr(data)


# ---------------------------------------------------------------- chain verification


def test_a_fresh_svid_verifies_and_yields_its_spiffe_id(ec_hierarchy: Hierarchy) -> None:
    h = ec_hierarchy
    assert verify_svid(h.leaf, [h.signing], [h.root], now=NOW) == WORKLOAD


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm), ids=[a.value for a in KeyAlgorithm])
def test_every_key_type_verifies(algorithm: KeyAlgorithm) -> None:
    from .conftest import cached_hierarchy

    h = cached_hierarchy(algorithm)
    assert verify_svid(h.leaf, [h.signing], [h.root], now=NOW) == WORKLOAD


NEGATIVE_CHAINS: dict[str, object] = {
    "if the leaf has expired, should fail": lambda h: verify_svid(h.leaf, [h.signing], [h.root],
                                                                  now=NOW + dt.timedelta(days=2)),
    "if the leaf is not yet valid, should fail": lambda h: verify_svid(h.leaf, [h.signing], [h.root],
                                                                       now=NOW - dt.timedelta(hours=1)),
    "if the root is another CA's, should fail": lambda h: verify_svid(h.leaf, [h.signing],
                                                                      [build_hierarchy().root], now=NOW),
    "if the intermediate is missing, should fail": lambda h: verify_svid(h.leaf, [], [h.root], now=NOW),
    "if there are no roots, should fail": lambda h: verify_svid(h.leaf, [h.signing], [], now=NOW),
    "if the leaf is a CA, should fail": lambda h: verify_svid(h.signing, [], [h.root], now=NOW),
    "if a CA chain uses the wrong root, should fail": lambda h: verify_ca_chain(h.istiod, [], [build_hierarchy().root],
                                                                                now=NOW),
    "if a CA chain is checked after expiry, should fail": lambda h: verify_ca_chain(
        h.istiod, [], [h.root], now=NOW + dt.timedelta(days=400)),
    "if a CA chain target is a leaf, should fail": lambda h: verify_ca_chain(h.leaf, [h.signing], [h.root], now=NOW),
}


@pytest.mark.parametrize("case", list(NEGATIVE_CHAINS))
def test_chain_verification_failures(case: str, ec_hierarchy: Hierarchy) -> None:
    with pytest.raises(ChainVerificationError):
        NEGATIVE_CHAINS[case](ec_hierarchy)  # type: ignore[operator]


def test_a_ca_chain_verifies_through_the_root(ec_hierarchy: Hierarchy) -> None:
    verify_ca_chain(ec_hierarchy.istiod, [], [ec_hierarchy.root], now=NOW)
    verify_ca_chain(ec_hierarchy.root, [], [ec_hierarchy.root], now=NOW)


def _rsa_csr(*, pss: bool, tamper: bool) -> x509.CertificateSigningRequest:
    from cryptography.hazmat.primitives.asymmetric import padding

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).add_extension(
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(WORKLOAD))]), critical=False)
    rsa_padding = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32) if pss else padding.PKCS1v15()
    signed = builder.sign(key, hashes.SHA256(), rsa_padding=rsa_padding)
    der = bytearray(signed.public_bytes(serialization.Encoding.DER))
    if tamper:
        der[-5] ^= 0xFF
    return x509.load_der_x509_csr(bytes(der))


@pytest.mark.parametrize("pss", [False, True], ids=["pkcs1v15", "pss"])
def test_an_rsa_csr_signature_is_verified_with_its_padding_and_a_tampered_one_refused(pss: bool) -> None:
    # The signature is checked with the key check_csr already loaded (not is_signature_valid): both RSA
    # paddings must still verify, and a flipped signature byte must still be caught.
    good = _rsa_csr(pss=pss, tamper=False)
    assert same_public_key(check_csr(good, WORKLOAD), good.public_key())
    with pytest.raises(InvalidRequestError, match="signature"):
        check_csr(_rsa_csr(pss=pss, tamper=True), WORKLOAD)


@pytest.mark.parametrize("digest", [hashes.SHA256(), hashes.SHA384(), hashes.SHA512()], ids=lambda d: d.name)
def test_an_ec_csr_signature_is_verified_under_its_own_digest_and_a_tampered_one_refused(
    digest: hashes.HashAlgorithm,
) -> None:
    # The ECDSA scheme comes from a table keyed by the signature algorithm: each digest must still verify,
    # and one that does not match the signature (the body re-signed claims another digest) must not.
    key = ec.generate_private_key(ec.SECP384R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).add_extension(
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(WORKLOAD))]), critical=False)
    good = builder.sign(key, digest)
    assert same_public_key(check_csr(good, WORKLOAD), key.public_key())
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0xFF
    with pytest.raises(InvalidRequestError, match="signature"):
        check_csr(x509.load_der_x509_csr(bytes(der)), WORKLOAD)


def test_the_subject_is_judged_the_same_with_or_without_the_empty_subject_shortcut() -> None:
    # An empty subject is recognised from its bytes; anything else is read attribute by attribute.
    assert check_csr(_csr(subject=[]), WORKLOAD) is not None
    assert check_csr(_csr(subject=[x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mesh")]), WORKLOAD) is not None
    with pytest.raises(CSRRejectedError, match="subject"):
        check_csr(_csr(subject=[x509.NameAttribute(NameOID.COMMON_NAME, "admin")]), WORKLOAD)
