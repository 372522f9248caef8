"""Reading certificates: PEM in and out, SPIFFE IDs from SANs, the facts a status line shows.  Pure."""

from __future__ import annotations

import binascii
import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from ca_service.errors import InvalidRequestError
from ca_service.pki.identity import SpiffeId
from ca_service.pki.keys import key_id

_SHA256 = hashes.SHA256()


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def der_to_pem(der: bytes) -> bytes:
    """A certificate's DER as PEM, the bytes :func:`cert_to_pem` gives (64-character lines).

    For a leaf we just signed and so hold as DER: ``Certificate.public_bytes`` re-encodes the whole
    certificate first, which made up most of a chain's PEM (11 us of a ~75 us issuance).
    """
    # As ssl.DER_cert_to_PEM_cert writes it, without its detour through str (~1 us of ~5).
    text = binascii.b2a_base64(der, newline=False)
    return b"".join((b"-----BEGIN CERTIFICATE-----\n", b"\n".join([text[i:i + 64] for i in range(0, len(text), 64)]),
                     b"\n-----END CERTIFICATE-----\n"))


def certs_to_pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(cert_to_pem(c) for c in certs)


def load_certs(pem: bytes, *, what: str = "certificate") -> list[x509.Certificate]:
    """All certificates of a PEM blob, in order.

    Raises:
        InvalidRequestError: if there is none or one does not parse.
    """
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise InvalidRequestError(f"{what}: not a valid PEM certificate ({exc})") from None
    if not certs:
        raise InvalidRequestError(f"{what}: no PEM certificate found")
    return certs


def load_cert(pem: bytes, *, what: str = "certificate") -> x509.Certificate:
    certs = load_certs(pem, what=what)
    if len(certs) != 1:
        raise InvalidRequestError(f"{what}: expected one certificate, found {len(certs)}")
    return certs[0]


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID of an X509-SVID (its single URI SAN).

    Raises:
        InvalidRequestError: if there is not exactly one URI SAN or it is not a valid SPIFFE ID.
    """
    uris = uri_sans(cert)
    if len(uris) != 1:
        raise InvalidRequestError(f"an X509-SVID has exactly one URI SAN, this certificate has {len(uris)}")
    return SpiffeId.parse(uris[0])


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def subject_key_id(cert: x509.Certificate) -> bytes:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return key_id(cert.public_key())  # type: ignore[arg-type]


def fingerprint(cert: x509.Certificate) -> bytes:
    """SHA-256 of the DER: the identity of a certificate when comparing sets of roots."""
    return cert.fingerprint(_SHA256)


@dataclass(frozen=True)
class CertFacts:
    """What ``status`` shows for one certificate."""

    subject: str
    serial: str
    key_id: str
    not_before: dt.datetime
    not_after: dt.datetime

    @classmethod
    def of(cls, cert: x509.Certificate) -> CertFacts:
        return cls(
            subject=cert.subject.rfc4514_string() or ",".join(uri_sans(cert)),
            serial=format(cert.serial_number, "x"),
            key_id=subject_key_id(cert).hex(),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
        )

    def time_left(self, now: dt.datetime) -> dt.timedelta:
        return self.not_after - now
