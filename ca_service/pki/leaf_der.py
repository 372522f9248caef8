"""Templated DER encoding of workload X509-SVIDs: the same bytes as ``cryptography``'s builder, faster.

``CertificateBuilder`` validates and encodes every field of every leaf, although a signer's leaves
differ only in serial, validity, public key, SKI and SAN.  :class:`LeafTemplate` encodes the rest once
per signer (the issuer Name, the signature AlgorithmIdentifier, the constant extensions, the AKI) and
per leaf only splices the variable fields between those pre-encoded bytes, signs the TBS with the
intermediate key and wraps it into a Certificate.

The output is byte-for-byte what :func:`ca_service.pki.templates.build_svid_for` gets from the builder
for the same inputs (``tests/pki/test_leaf_der.py`` checks it differentially), so the builder stays the
reference and the config switch ``ca.leaf_encoder: builder`` goes back to it.  Pure: no I/O, no clock.

Layout (RFC 5280 4.1), in the order the builder writes it::

    Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue BIT STRING }
    TBSCertificate ::= SEQUENCE { [0] EXPLICIT v3, serialNumber, signature, issuer, validity,
                                  subject (empty), subjectPublicKeyInfo, [3] EXPLICIT extensions }
    extensions: basicConstraints (critical) | keyUsage (critical) | extKeyUsage | SKI | AKI | SAN (critical)
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
from dataclasses import dataclass
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from ca_service.pki.keys import PrivateKey, PublicKey, key_family

# DER tags used below (X.690 8.x).
_INTEGER, _BIT_STRING, _OCTET_STRING, _SEQUENCE = 0x02, 0x03, 0x04, 0x30
_UTC_TIME, _GENERALIZED_TIME = 0x17, 0x18
_URI = 0x86  # GeneralName uniformResourceIdentifier: [6] IMPLICIT IA5String

_VERSION_V3 = bytes.fromhex("a003020102")  # [0] EXPLICIT INTEGER 2
_EMPTY_SUBJECT = bytes.fromhex("3000")
_BOOLEAN_TRUE = bytes.fromhex("0101ff")

# AlgorithmIdentifier DER per (signing key kind, digest), as cryptography writes them: ECDSA without
# parameters (RFC 5758 3.2), RSA PKCS#1 v1.5 with an explicit NULL (RFC 4055 5).
_SIGNATURE_ALGORITHMS = {
    ("ec", "sha256"): bytes.fromhex("300a06082a8648ce3d040302"),
    ("ec", "sha384"): bytes.fromhex("300a06082a8648ce3d040303"),
    ("rsa", "sha256"): bytes.fromhex("300d06092a864886f70d01010b0500"),
    ("rsa", "sha384"): bytes.fromhex("300d06092a864886f70d01010c0500"),
}

# Extension OIDs as DER (tag 06 + length + content): id-ce 35 (AKI) and 17 (SAN).
_OID_AKI = bytes.fromhex("0603551d23")
_OID_SAN = bytes.fromhex("0603551d11")
# The SKI extension (id-ce 14) up to its 20-octet key identifier, all lengths fixed by SHA-1's size:
# SEQUENCE(29) { OID, OCTET STRING(22) { OCTET STRING(20) } }.
_SKI_PREFIX = bytes.fromhex("301d0603551d0e0416" "0414")

# UTCTime covers 1950-2049; from 2050 on RFC 5280 4.1.2.5 requires GeneralizedTime, and the builder
# refuses anything before 1950.
_UTC_TIME_YEARS = range(1950, 2050)
# RFC 5280 4.1.2.2: at most 20 octets, positive; the builder enforces the same bounds.
_MAX_SERIAL_BITS = 159


_SHORT_LENGTHS = [bytes((n,)) for n in range(0x80)]
# Signature schemes are immutable; one per digest saves building one per leaf.
_ECDSA = {"sha256": ec.ECDSA(hashes.SHA256()), "sha384": ec.ECDSA(hashes.SHA384())}


def _length(n: int) -> bytes:
    """DER definite length: short form below 128, else 0x80|count followed by big-endian octets."""
    if n < 0x80:
        return _SHORT_LENGTHS[n]
    octets = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(octets),)) + octets


def tlv(tag: int, content: bytes) -> bytes:
    """One DER element: ``tag``, the definite length of ``content``, ``content``."""
    return bytes((tag,)) + _length(len(content)) + content


def _extension(oid: bytes, critical: bool, value: bytes) -> bytes:
    return tlv(_SEQUENCE, oid + (_BOOLEAN_TRUE if critical else b"") + tlv(_OCTET_STRING, value))


def encode_serial(serial: int) -> bytes:
    """A positive INTEGER: minimal big-endian octets, a leading 0x00 when the top bit is set."""
    return tlv(_INTEGER, serial.to_bytes(serial.bit_length() // 8 + 1, "big"))


def encode_time(when: dt.datetime) -> bytes:
    """UTCTime before 2050, GeneralizedTime from 2050 on; seconds precision, as the builder truncates.

    ``when`` is naive UTC (see :func:`_naive_utc`).
    """
    if when.year in _UTC_TIME_YEARS:
        return tlv(_UTC_TIME, when.strftime("%y%m%d%H%M%SZ").encode("ascii"))
    return tlv(_GENERALIZED_TIME, f"{when.year:04d}{when.strftime('%m%d%H%M%SZ')}".encode("ascii"))


class TemplateNotApplicable(ValueError):
    """The inputs lie outside what the template encodes; the caller builds this leaf with the builder."""


@dataclass(frozen=True)
class LeafTemplate:
    """Everything of a leaf that one signer repeats, pre-encoded; see the module docstring."""

    signature_algorithm: bytes
    issuer_name: bytes
    # Extensions before the SKI, one block per leaf key kind (keyUsage differs for RSA), and the AKI.
    head_extensions: dict[bool, bytes]
    aki_extension: bytes
    key: PrivateKey
    digest: hashes.SHA256 | hashes.SHA384
    # The ECDSA scheme for an EC signing key, None for RSA (PKCS#1 v1.5): decided once, as an isinstance
    # against cryptography's key ABC costs ~0.7 us a leaf.
    ecdsa: ec.ECDSA | None

    @classmethod
    def for_signer(
        cls, name: x509.Name, aki: x509.AuthorityKeyIdentifier, key: PrivateKey, digest: hashes.HashAlgorithm,
        leaf_extensions: dict[bool, tuple[tuple[x509.ExtensionType, bool], ...]],
    ) -> LeafTemplate:
        """Pre-encode a signer's part of every leaf.

        ``leaf_extensions`` maps "leaf key is RSA" to the (extension, critical) pairs that precede the
        SKI, in builder order; each value is encoded by ``cryptography`` itself.

        Raises:
            TemplateNotApplicable: for a signing key or digest the template has no encoding for.
        """
        kind = "ec" if isinstance(key, ec.EllipticCurvePrivateKey) else "rsa" if isinstance(
            key, rsa.RSAPrivateKey) else None
        algorithm = _SIGNATURE_ALGORITHMS.get((kind or "", digest.name))
        if algorithm is None or not isinstance(digest, hashes.SHA256 | hashes.SHA384):
            raise TemplateNotApplicable(f"no template for a {type(key).__name__} signing with {digest.name}")
        heads = {is_rsa: b"".join(_extension(_oid_der(ext.oid), critical, ext.public_bytes()) for ext, critical in exts)
                 for is_rsa, exts in leaf_extensions.items()}
        return cls(algorithm, name.public_bytes(), heads, _extension(_OID_AKI, False, aki.public_bytes()),
                   key, digest, _ECDSA[digest.name] if kind == "ec" else None)

    def tbs(self, public_key: PublicKey, uri: str, *, serial: int, not_before: dt.datetime,
            not_after: dt.datetime, spki: bytes | None = None) -> bytes:
        """The TBSCertificate DER of one leaf.

        ``spki``: ``public_key``'s SubjectPublicKeyInfo DER exactly as OpenSSL writes it, when the caller
        already holds it (a CSR's, see :func:`ca_service.pki.csr.canonical_spki`); encoding an EC key
        afresh converts its point to affine coordinates, a field inversion (~8 us, 4% of a CSR issuance).
        It is used as given (the leaf certifies these bytes): the caller vouches that it encodes ``public_key``.

        Raises:
            TemplateNotApplicable: for a serial outside 1..2**159-1, a time before 1950, notAfter
                before notBefore, a key that is neither EC nor RSA, or a URI that is not ASCII (the
                builder then decides; it refuses all but the last two).
        """
        if not 0 < serial < 1 << _MAX_SERIAL_BITS:
            raise TemplateNotApplicable("serial out of range")
        validity = encode_validity(not_before, not_after)
        family = key_family(public_key)
        if family is None or not uri.isascii():
            raise TemplateNotApplicable("key type or URI not covered by the template")
        if spki is None:
            spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        # keys.key_id hashes the same bits, but asks OpenSSL to encode the key a second time (for EC a
        # field inversion, a fifth of this function); the SPKI we already hold contains them.
        ski = hashlib.sha1(subject_public_key_bits(spki), usedforsecurity=False).digest()
        extensions = (self.head_extensions[family == "rsa"]
                      + _SKI_PREFIX + ski
                      + self.aki_extension + _san_extension(uri))
        return tlv(_SEQUENCE, b"".join((
            _VERSION_V3, encode_serial(serial), self.signature_algorithm, self.issuer_name,
            validity, _EMPTY_SUBJECT, spki,
            tlv(0xA3, tlv(_SEQUENCE, extensions)),
        )))

    def sign(self, tbs: bytes) -> bytes:
        """The Certificate DER of ``tbs`` signed with the signer's key (PKCS#1 v1.5 for RSA)."""
        if self.ecdsa is not None:
            return self.assemble(tbs, cast(ec.EllipticCurvePrivateKey, self.key).sign(tbs, self.ecdsa))
        return self.assemble(tbs, cast(rsa.RSAPrivateKey, self.key).sign(tbs, padding.PKCS1v15(), self.digest))

    def assemble(self, tbs: bytes, signature: bytes) -> bytes:
        """The Certificate DER: ``tbs``, the algorithm, and ``signature`` as a BIT STRING (no unused bits)."""
        return tlv(_SEQUENCE, tbs + self.signature_algorithm + tlv(_BIT_STRING, b"\x00" + signature))

    def build(self, public_key: PublicKey, uri: str, *, serial: int, not_before: dt.datetime,
              not_after: dt.datetime, spki: bytes | None = None) -> bytes:
        """Encode and sign one leaf: its Certificate DER (arguments and exceptions as :meth:`tbs`)."""
        return self.sign(self.tbs(public_key, uri, serial=serial, not_before=not_before, not_after=not_after,
                                  spki=spki))


# A workload's renewals, and a CSR client's, repeat its SAN; a storm of distinct identities misses at the
# cost of one dict lookup.
@functools.lru_cache(maxsize=4096)
def _san_extension(uri: str) -> bytes:
    """The critical subjectAltName extension holding the one URI (ASCII, checked by the caller)."""
    return uri_san_extension(uri, critical=True)


def uri_san_extension(uri: str, *, critical: bool) -> bytes:
    """The subjectAltName Extension DER holding exactly the one URI ``uri`` (ASCII, checked by the caller)."""
    return _extension(_OID_SAN, critical, tlv(_SEQUENCE, tlv(_URI, uri.encode("ascii"))))


# A storm signs every leaf with the same ``now`` and so the same validity; a few entries cover the
# current and previous instants of several callers.
@functools.lru_cache(maxsize=16)
def encode_validity(not_before: dt.datetime, not_after: dt.datetime) -> bytes:
    """The Validity SEQUENCE.

    Raises:
        TemplateNotApplicable: for a notBefore before 1950 or a notAfter before notBefore.
    """
    start, end = _naive_utc(not_before), _naive_utc(not_after)
    if start.year < _UTC_TIME_YEARS.start or start > end:
        raise TemplateNotApplicable("validity before 1950 or inverted")
    return tlv(_SEQUENCE, encode_time(start) + encode_time(end))


def subject_public_key_bits(spki: bytes) -> bytes:
    """The subjectPublicKey BIT STRING content of a DER SubjectPublicKeyInfo, without the unused-bits octet.

    That is the EC point (X9.62 uncompressed) or the PKCS#1 RSAPublicKey DER: what RFC 5280 4.2.1.2
    method 1 hashes into the SKI.  ``spki`` comes from OpenSSL, so it is well-formed DER.
    """
    offset = _header_length(spki, 0)  # into the outer SEQUENCE
    offset += _header_length(spki, offset) + _content_length(spki, offset)  # past the AlgorithmIdentifier
    start = offset + _header_length(spki, offset)
    return spki[start + 1:start + _content_length(spki, offset)]


def element_at(der: bytes, offset: int) -> tuple[int, int]:
    """Where the DER element at ``offset`` has its content, and where it ends: ``(content, end)``.

    ``der`` must be well-formed (parsed by ``cryptography`` or written by OpenSSL); this only walks it.
    """
    content = offset + _header_length(der, offset)
    return content, content + _content_length(der, offset)


def _header_length(der: bytes, offset: int) -> int:
    first = der[offset + 1]
    return 2 + (first & 0x7F if first & 0x80 else 0)


def _content_length(der: bytes, offset: int) -> int:
    first = der[offset + 1]
    if not first & 0x80:
        return first
    return int.from_bytes(der[offset + 2:offset + 2 + (first & 0x7F)], "big")


def _naive_utc(when: dt.datetime) -> dt.datetime:
    """UTC without tzinfo, as the builder keeps it: an aware time is converted, a naive one taken as UTC."""
    return when.astimezone(dt.UTC).replace(tzinfo=None) if when.tzinfo is not None else when


def _oid_der(oid: x509.ObjectIdentifier) -> bytes:
    """OBJECT IDENTIFIER DER (X.690 8.19): first two arcs in one octet, then base-128 with continuation bits."""
    arcs = [int(a) for a in oid.dotted_string.split(".")]
    content = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        content += bytes(reversed(chunk))
    return tlv(0x06, bytes(content))
