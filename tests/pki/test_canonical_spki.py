"""A CSR's own SubjectPublicKeyInfo reused in the leaf (``canonical_spki``): only when it is byte for byte
what OpenSSL writes for the key, and always read by position, never found by searching the request."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from ca_service.pki.csr import canonical_spki
from ca_service.pki.keys import KeyAlgorithm, PrivateKey, generate_private_key, public_key_der
from ca_service.pki.leaf_der import tlv

from .conftest import WORKLOAD
from .test_leaf_der import NOT_AFTER, NOT_BEFORE, SERIAL, profile

SPKI = serialization.PublicFormat.SubjectPublicKeyInfo


def _csr(key: PrivateKey, subject: list[x509.NameAttribute] | None = None) -> x509.CertificateSigningRequest:
    return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name(subject or []))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(WORKLOAD))]),
                           critical=True)
            .sign(key, hashes.SHA256()))  # type: ignore[arg-type]


@pytest.mark.parametrize("algorithm", [KeyAlgorithm.EC_P256, KeyAlgorithm.EC_P384], ids=lambda a: a.value)
def test_an_ec_csr_gives_the_spki_openssl_writes_and_the_same_leaf(algorithm: KeyAlgorithm) -> None:
    for subject in ([], [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "o" * 300)]):  # long form lengths too
        csr = _csr(generate_private_key(algorithm), subject)
        spki = canonical_spki(csr)
        key = csr.public_key()
        assert spki == public_key_der(key)  # type: ignore[arg-type]
        template = profile(KeyAlgorithm.EC_P256).template
        assert template is not None
        args = {"serial": SERIAL, "not_before": NOT_BEFORE, "not_after": NOT_AFTER}
        assert template.tbs(key, str(WORKLOAD), spki=spki, **args) == template.tbs(key, str(WORKLOAD), **args)  # type: ignore[arg-type]


def test_an_rsa_csr_is_left_to_openssl() -> None:
    assert canonical_spki(_csr(generate_private_key(KeyAlgorithm.RSA_2048))) is None


def _csr_with_point(key: ec.EllipticCurvePrivateKey, point: bytes) -> x509.CertificateSigningRequest:
    """A CSR whose SubjectPublicKeyInfo carries ``point`` as given, signed by ``key``."""
    algorithm = bytes.fromhex("301306072a8648ce3d020106082a8648ce3d030107")
    spki = tlv(0x30, algorithm + tlv(0x03, b"\x00" + point))
    info = tlv(0x30, bytes.fromhex("020100") + bytes.fromhex("3000") + spki + bytes.fromhex("a000"))
    signature = key.sign(info, ec.ECDSA(hashes.SHA256()))
    return x509.load_der_x509_csr(
        tlv(0x30, info + bytes.fromhex("300a06082a8648ce3d040302") + tlv(0x03, b"\x00" + signature)))


def test_a_hybrid_point_of_the_canonical_length_is_not_reused() -> None:
    # X9.62 hybrid form (06/07 || X || Y) has the uncompressed form's length, so only the 04 octet tells
    # them apart; the builder would write 04, so the CSR's bytes must not be taken.
    key = ec.generate_private_key(ec.SECP256R1())
    uncompressed = key.public_key().public_bytes(serialization.Encoding.X962,
                                                 serialization.PublicFormat.UncompressedPoint)
    hybrid = bytes((0x06 | (uncompressed[-1] & 1),)) + uncompressed[1:]
    csr = _csr_with_point(key, hybrid)
    assert csr.is_signature_valid and public_key_der(csr.public_key()) == public_key_der(key.public_key())  # type: ignore[arg-type]
    assert canonical_spki(csr) is None
    assert canonical_spki(_csr_with_point(key, uncompressed)) == public_key_der(key.public_key())


def test_a_compressed_point_is_not_reused() -> None:
    # Valid too, but the leaf must carry the uncompressed form the builder writes.
    key = ec.generate_private_key(ec.SECP256R1())
    csr = _csr_with_point(key, key.public_key().public_bytes(serialization.Encoding.X962,
                                                             serialization.PublicFormat.CompressedPoint))
    assert csr.is_signature_valid  # a well-formed request, so the refusal is about the encoding alone
    assert canonical_spki(csr) is None


def test_another_keys_spki_inside_the_subject_is_not_taken() -> None:
    # The subject precedes the key: a request that plants another key's SPKI bytes there still yields
    # its own key's, because the walk goes by position.
    own, planted = generate_private_key(), generate_private_key()
    planted_spki = public_key_der(planted.public_key())
    csr = _csr(own, [x509.NameAttribute(NameOID.X500_UNIQUE_IDENTIFIER, planted_spki,  # type: ignore[arg-type]
                                        _type=_ASN1Type.BitString)])
    assert planted_spki in csr.tbs_certrequest_bytes
    assert canonical_spki(csr) == public_key_der(own.public_key())
