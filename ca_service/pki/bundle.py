"""Trust bundles: the roots of one trust domain with a monotonically increasing sequence.

Encodings: concatenated PEM, and the SPIFFE bundle format (a JWKS, SPIFFE Trust Domain and Bundle
spec section 4): ``keys`` entries with ``use: "x509-svid"`` and exactly one base64 DER CA certificate
in ``x5c`` and no ``kid``; ``spiffe_sequence``; ``spiffe_refresh_hint`` in seconds.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ca_service.errors import InvalidRequestError
from ca_service.pki.certs import certs_to_pem, fingerprint, is_ca
from ca_service.pki.identity import TrustDomain

# SPIRE's default: frequent enough that a peer sees a root rotation well inside its propagation window.
DEFAULT_REFRESH_HINT = dt.timedelta(minutes=5)
X509_SVID_USE = "x509-svid"


class InvalidBundleError(InvalidRequestError):
    """A bundle document does not follow the SPIFFE bundle format, or its content is not acceptable."""


def _dedupe(roots: Iterable[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    seen: set[bytes] = set()
    out = []
    for cert in roots:
        fp = fingerprint(cert)
        if fp not in seen:
            seen.add(fp)
            out.append(cert)
    return tuple(out)


@dataclass(frozen=True)
class TrustBundle:
    """The X.509 roots of one trust domain.

    Raises:
        InvalidBundleError: if a root is not a CA certificate.
    """

    trust_domain: TrustDomain
    roots: tuple[x509.Certificate, ...]
    sequence: int = 0
    refresh_hint: dt.timedelta = field(default=DEFAULT_REFRESH_HINT)

    def __post_init__(self) -> None:
        object.__setattr__(self, "roots", _dedupe(self.roots))
        for cert in self.roots:
            if not is_ca(cert):
                raise InvalidBundleError(
                    f"bundle for {self.trust_domain}: {cert.subject.rfc4514_string() or 'a certificate'}"
                    " is not a CA certificate"
                )
        if self.sequence < 0:
            raise InvalidBundleError(f"bundle sequence must be >= 0, got {self.sequence}")

    def fingerprints(self) -> frozenset[bytes]:
        return frozenset(fingerprint(c) for c in self.roots)

    def with_roots(self, roots: Iterable[x509.Certificate]) -> TrustBundle:
        """The bundle with ``roots``; the sequence moves forward only if the set of roots changed."""
        candidate = _dedupe(roots)
        if frozenset(fingerprint(c) for c in candidate) == self.fingerprints():
            return self
        return TrustBundle(self.trust_domain, candidate, self.sequence + 1, self.refresh_hint)

    def to_pem(self) -> bytes:
        return self._pem

    @functools.cached_property
    def _pem(self) -> bytes:
        # Encoded once per bundle object: the authority hands out the same bundle until the roots change,
        # and every CreateCertificate reply and SDS validation context carries it.
        return certs_to_pem(self.roots)

    def to_jwks(self) -> dict[str, Any]:
        return {
            "keys": [_jwk(cert) for cert in self.roots],
            "spiffe_sequence": self.sequence,
            "spiffe_refresh_hint": int(self.refresh_hint.total_seconds()),
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_jwks(), indent=2).encode()


def _b64url_uint(value: int, length: int) -> str:
    return base64.urlsafe_b64encode(value.to_bytes(length, "big")).rstrip(b"=").decode()


def _jwk(cert: x509.Certificate) -> dict[str, Any]:
    """One JWK per root; the public key parameters are included as RFC 7517 asks for ``x5c`` entries."""
    key = cert.public_key()
    entry: dict[str, Any] = {"use": X509_SVID_USE}
    if isinstance(key, ec.EllipticCurvePublicKey):
        size = (key.curve.key_size + 7) // 8
        numbers = key.public_numbers()
        crv = {"secp256r1": "P-256", "secp384r1": "P-384"}[key.curve.name]
        entry.update(kty="EC", crv=crv, x=_b64url_uint(numbers.x, size), y=_b64url_uint(numbers.y, size))
    elif isinstance(key, rsa.RSAPublicKey):
        rsa_numbers = key.public_numbers()
        entry.update(
            kty="RSA",
            n=_b64url_uint(rsa_numbers.n, (rsa_numbers.n.bit_length() + 7) // 8),
            e=_b64url_uint(rsa_numbers.e, (rsa_numbers.e.bit_length() + 7) // 8),
        )
    entry["x5c"] = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
    return entry


def parse_jwks(data: bytes, trust_domain: TrustDomain) -> TrustBundle:
    """Parse a SPIFFE bundle document for ``trust_domain`` (which comes from configuration, never the document).

    Entries whose ``use`` is not ``x509-svid`` (e.g. ``jwt-svid``) are skipped, as the spec says.

    Raises:
        InvalidBundleError: if the JSON is malformed, an ``x509-svid`` entry has a ``kid`` or not exactly
            one ``x5c`` certificate, a certificate does not parse or is not a CA, the sequence is not a
            non-negative integer, or there are no X.509 roots at all.
    """
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidBundleError(f"bundle for {trust_domain} is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise InvalidBundleError(f"bundle for {trust_domain} has no 'keys' array")
    roots = []
    for index, key in enumerate(doc["keys"]):
        if not isinstance(key, dict):
            raise InvalidBundleError(f"bundle for {trust_domain}: keys[{index}] is not an object")
        if key.get("use") != X509_SVID_USE:
            continue
        roots.append(_parse_x509_entry(key, index, trust_domain))
    if not roots:
        raise InvalidBundleError(f"bundle for {trust_domain} holds no x509-svid roots")
    sequence = doc.get("spiffe_sequence", 0)
    hint = doc.get("spiffe_refresh_hint", int(DEFAULT_REFRESH_HINT.total_seconds()))
    if not isinstance(sequence, int) or isinstance(sequence, bool) or sequence < 0:
        raise InvalidBundleError(
            f"bundle for {trust_domain}: spiffe_sequence {sequence!r} is not a non-negative integer"
        )
    if not isinstance(hint, int) or isinstance(hint, bool) or hint <= 0:
        raise InvalidBundleError(f"bundle for {trust_domain}: spiffe_refresh_hint {hint!r} is not a positive integer")
    return TrustBundle(trust_domain, tuple(roots), sequence, dt.timedelta(seconds=hint))


def _parse_x509_entry(key: dict[str, Any], index: int, trust_domain: TrustDomain) -> x509.Certificate:
    where = f"bundle for {trust_domain}: keys[{index}]"
    if "kid" in key:
        raise InvalidBundleError(f"{where} has a 'kid', which x509-svid entries must not have")
    x5c = key.get("x5c")
    if not isinstance(x5c, list) or len(x5c) != 1 or not isinstance(x5c[0], str):
        raise InvalidBundleError(f"{where}: 'x5c' must hold exactly one certificate")
    try:
        cert = x509.load_der_x509_certificate(base64.b64decode(x5c[0], validate=True))
    except (ValueError, binascii.Error) as exc:
        raise InvalidBundleError(f"{where}: certificate does not parse ({exc})") from None
    if not is_ca(cert):
        raise InvalidBundleError(f"{where}: certificate is not a CA (a leaf cannot be a trust anchor)")
    return cert
