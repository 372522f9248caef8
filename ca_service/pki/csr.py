"""CSR checks.  The identity comes from the authenticated caller; the CSR only contributes a public key.

A CSR is accepted only if it could not make us sign anything beyond "this key is <entitled SPIFFE ID>":
cert-manager istio-csr and istiod apply the same rule.  Every rejection names its rule
(:attr:`CSRRejectedError.rule`), so the log says which one a client broke.
"""

from __future__ import annotations

import binascii
import datetime as dt
import enum
import functools
from collections.abc import Collection
from typing import NamedTuple, cast

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from ca_service.errors import CSRRejectedError, InvalidRequestError
from ca_service.pki.identity import SpiffeId
from ca_service.pki.keys import KeyAlgorithm, PublicKey, key_family, signature_verifies
from ca_service.pki.leaf_der import element_at, tlv, uri_san_extension

# istio-agent may put an Organization in the subject (its --org option); nothing else is tolerated.
_TOLERATED_SUBJECT_OIDS = frozenset({NameOID.ORGANIZATION_NAME})
# An RSA-4096 CSR is ~1.7 KB of PEM; anything 20x that is not a CSR we want to parse.
MAX_CSR_PEM_BYTES = 32 * 1024


class CsrKeyType(enum.StrEnum):
    """Key types a workload may bring in a CSR (``istio_ca.allowed_key_types``)."""

    EC_P256 = "EC_P256"
    EC_P384 = "EC_P384"
    RSA_2048 = "RSA_2048"
    RSA_3072 = "RSA_3072"
    RSA_4096 = "RSA_4096"


DEFAULT_ALLOWED_KEY_TYPES = frozenset(CsrKeyType)
_CURVES = {"secp256r1": CsrKeyType.EC_P256, "secp384r1": CsrKeyType.EC_P384}
_RSA_SIZES = {2048: CsrKeyType.RSA_2048, 3072: CsrKeyType.RSA_3072, 4096: CsrKeyType.RSA_4096}


class InvalidCSRError(InvalidRequestError):
    """A CSR is malformed; ``rule`` names what is wrong with it."""

    def __init__(self, rule: str, message: str) -> None:
        self.rule = rule
        super().__init__(f"{message} (rule: {rule})")


def parse_csr(pem: bytes | str) -> x509.CertificateSigningRequest:
    """Parse a PEM CSR.

    Raises:
        InvalidCSRError: if it is larger than :data:`MAX_CSR_PEM_BYTES` (rule ``csr-size``) or not a PEM
            certificate request (rule ``csr-syntax``).
    """
    data = pem.encode(errors="replace") if isinstance(pem, str) else pem
    if len(data) > MAX_CSR_PEM_BYTES:
        raise InvalidCSRError("csr-size", f"CSR of {len(data)} bytes exceeds {MAX_CSR_PEM_BYTES}")
    der = _plain_pem_der(data)
    try:
        return x509.load_pem_x509_csr(data) if der is None else x509.load_der_x509_csr(der)
    except (ValueError, x509.InvalidVersion):  # the latter is no ValueError: a version other than v1
        raise InvalidCSRError("csr-syntax", "CSR is not a valid PEM certificate request") from None


_PEM_BEGIN = b"-----BEGIN CERTIFICATE REQUEST-----\n"
_PEM_END = b"\n-----END CERTIFICATE REQUEST-----"


def _plain_pem_der(data: bytes) -> bytes | None:
    """The DER inside ``data`` if it is one CSR PEM block laid out as Go's ``pem.Encode`` (istio-agent),
    OpenSSL and ``cryptography`` write it: the BEGIN line, canonical base64 in non-empty ``\\n``-ended lines
    (of any width), the END line (an optional final newline), nothing before or after.  Else None, and
    ``cryptography``'s PEM parser decides.

    That parser scans the input for the block and was 40k of a CSR issuance's ~1.5M instructions
    (callgrind); ``binascii`` decodes a block that needs no scanning for a tenth of that.  Whatever this
    accepts, that parser reads as the same DER (tests/pki/test_csr_fast_paths.py).
    """
    if not data.startswith(_PEM_BEGIN):
        return None
    body = data[len(_PEM_BEGIN):-1] if data.endswith(b"\n") else data[len(_PEM_BEGIN):]
    if not body.endswith(_PEM_END):
        return None
    lines = body[:-len(_PEM_END)]
    # An empty line is the end of RFC 1421 headers to that parser, which refuses a block that starts with one.
    if not lines or lines.startswith(b"\n") or lines.endswith(b"\n") or b"\n\n" in lines:
        return None
    text = lines.replace(b"\n", b"")
    try:
        der = binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error:
        return None
    # strict_mode still takes nonzero bits after the last character's data, which the PEM parser refuses.
    # Only the last group of four characters can hold such bits: it must be what its bytes encode to.
    tail = der[-(len(der) % 3 or 3):]
    return der if binascii.b2a_base64(tail, newline=False) == text[-4:] else None


# How the CertificationRequestInfo of nearly every workload's CSR (istio-agent's included) begins: version
# 0, then an empty subject.  Matched as bytes at the start of its content, it saves walking and parsing them.
_V1_EMPTY_SUBJECT = bytes.fromhex("020100" "3000")

# PKCS#9 extensionRequest (1.2.840.113549.1.9.14) as DER, and the DER tags the attributes use.
_OID_EXTENSION_REQUEST = bytes.fromhex("06092a864886f70d01090e")
_SEQUENCE, _SET = 0x30, 0x31

# ECDSA schemes per signature algorithm: ``signature_algorithm_parameters`` builds a new one on every call
# (2 us of a CSR's ~185 us); they are immutable.
_ECDSA_BY_OID = {SignatureAlgorithmOID.ECDSA_WITH_SHA256: ec.ECDSA(hashes.SHA256()),
                 SignatureAlgorithmOID.ECDSA_WITH_SHA384: ec.ECDSA(hashes.SHA384()),
                 SignatureAlgorithmOID.ECDSA_WITH_SHA512: ec.ECDSA(hashes.SHA512())}

# The SubjectPublicKeyInfo OpenSSL writes for a named-curve key, up to and including the uncompressed
# point's 04 octet, per total length (P-256: 91 bytes, P-384: 120).
_EC_SPKI_PREFIXES = {
    91: bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d03010703420004"),
    120: bytes.fromhex("3076301006072a8648ce3d020106052b8104002203620004"),
}


def canonical_spki(csr: x509.CertificateSigningRequest) -> bytes | None:
    """The CSR's own SubjectPublicKeyInfo DER if it is byte for byte what OpenSSL writes for that key (a
    P-256 or P-384 key with an uncompressed point, which is what istio-agent sends), else None.

    The leaf then carries these bytes instead of the key encoded afresh (see
    :meth:`ca_service.pki.leaf_der.LeafTemplate.tbs`).  They are read from the CertificationRequestInfo
    (version, subject, subjectPKInfo) by position, never searched for: a subject could hold the same bytes.
    """
    info = csr.tbs_certrequest_bytes
    start, end, _ = _spki_bounds(info)
    return _canonical(info, start, end)


def _canonical(info: bytes, start: int, end: int) -> bytes | None:
    prefix = _EC_SPKI_PREFIXES.get(end - start)
    return info[start:end] if prefix is not None and info.startswith(prefix, start) else None


def _spki_bounds(info: bytes) -> tuple[int, int, bool]:
    """Where the SubjectPublicKeyInfo starts and ends in a CertificationRequestInfo (DER), and whether
    that begins with version 0 and an empty subject.  That layout (nearly every workload's CSR, istio-agent's
    included) is matched as bytes; any other is walked past the version and the subject."""
    content = element_at(info, 0)[0]
    empty_subject = info.startswith(_V1_EMPTY_SUBJECT, content)
    # Else past the version, then past the subject.
    start = content + len(_V1_EMPTY_SUBJECT) if empty_subject else element_at(info, element_at(info, content)[1])[1]
    return start, element_at(info, start)[1], empty_subject


def csr_key_type(key: object) -> CsrKeyType:
    """The :class:`CsrKeyType` of a CSR's public key.

    Raises:
        CSRRejectedError: rule ``key-type`` for any other curve, RSA size or algorithm.
    """
    family = key_family(key)  # cached per key class: isinstance against the ABCs costs ~0.8 us each
    if family == "ec":
        curve = cast(ec.EllipticCurvePublicKey, key).curve.name
        if curve in _CURVES:
            return _CURVES[curve]
        raise CSRRejectedError("key-type", f"elliptic curve {curve} is not allowed; use P-256 or P-384")
    if family == "rsa":
        key = cast(rsa.RSAPublicKey, key)
        if key.key_size in _RSA_SIZES:
            return _RSA_SIZES[key.key_size]
        raise CSRRejectedError("key-type", f"RSA key size {key.key_size} is not allowed; use 2048, 3072 or 4096")
    raise CSRRejectedError("key-type", f"key type {type(key).__name__} is not allowed; use ECDSA or RSA")


class AcceptedCsr(NamedTuple):
    """What a checked CSR contributes to its leaf."""

    public_key: PublicKey
    spki: bytes | None  # the CSR's own SubjectPublicKeyInfo if the leaf can carry it (see canonical_spki)


def check_csr(
    csr: x509.CertificateSigningRequest, entitled: SpiffeId,
    allowed_algorithms: Collection[KeyAlgorithm | CsrKeyType] = DEFAULT_ALLOWED_KEY_TYPES,
) -> PublicKey:
    """Check ``csr`` against the identity the caller is entitled to, and return its public key.

    Raises:
        InvalidCSRError: rule ``signature`` if the signature does not verify (the requester does not hold
            the key).
        CSRRejectedError: rule ``key-type`` if the key type or size is not allowed; ``ca-request`` if it
            requests a CA (basicConstraints CA:TRUE); ``critical-extension`` / ``extension`` for
            any extension other than subjectAltName and basicConstraints CA:FALSE; ``san-dns``,
            ``san-ip``, ``san-email``, ``san-uri``, ``san-other`` if its SAN holds anything but exactly
            the entitled SPIFFE ID; ``subject`` if its subject holds anything but an Organization.
    """
    return accept_csr(csr, entitled, allowed_algorithms).public_key


def accept_csr(
    csr: x509.CertificateSigningRequest, entitled: SpiffeId,
    allowed_algorithms: Collection[KeyAlgorithm | CsrKeyType] = DEFAULT_ALLOWED_KEY_TYPES,
) -> AcceptedCsr:
    """:func:`check_csr` and :func:`canonical_spki` in one pass (the CSR path's step): the request info is
    re-encoded by ``cryptography`` on every read (1-3 us), so it is read once.  Raises as :func:`check_csr`.
    """
    public_key = csr.public_key()
    key_type = csr_key_type(public_key)
    # The set is usually CsrKeyType already (a hash lookup); KeyAlgorithm members match by name.
    if key_type not in allowed_algorithms and key_type.name not in {a.name for a in allowed_algorithms}:
        raise CSRRejectedError("key-type", f"CSR key algorithm {key_type} is not allowed here")
    info = csr.tbs_certrequest_bytes
    if not _signature_verifies(csr, public_key, info):
        raise InvalidCSRError("signature", "CSR signature does not verify")
    start, end, empty_subject = _spki_bounds(info)
    if not _requests_only(info, end, str(entitled)):
        for ext in csr.extensions:
            _check_extension(ext, entitled)
    if not empty_subject:
        extra = [attr for attr in csr.subject if attr.oid not in _TOLERATED_SUBJECT_OIDS]
        if extra:
            raise CSRRejectedError(
                "subject",
                f"CSR subject {csr.subject.rfc4514_string()[:200]!r} names something other than the caller; "
                "leave it empty")
    return AcceptedCsr(public_key, _canonical(info, start, end))  # type: ignore[arg-type]


def _requests_only(info: bytes, attributes: int, uri: str) -> bool:
    """Whether the CertificationRequestInfo ``info``'s attributes (from offset ``attributes`` to its end)
    are exactly one extensionRequest of exactly one subjectAltName holding exactly ``uri``: what istio-agent
    sends, and nothing the extension checks would refuse.

    Compared as bytes with that request encoded here (DER has one encoding of it), which saves parsing
    the extensions into ``cryptography``'s objects (~10 us, 5% of a CSR issuance).  Anything else, even
    the same names encoded differently, takes the parse and the full checks.
    """
    if not uri.isascii():
        return False
    tail = len(info) - attributes
    return any(len(expected) == tail and info.endswith(expected) for expected in _only_san_request(uri))


@functools.lru_cache(maxsize=1024)
def _only_san_request(uri: str) -> tuple[bytes, bytes]:
    """The attributes ([0] IMPLICIT SET OF Attribute) of a CSR that requests one subjectAltName extension
    with the one URI ``uri``: marked critical (istio-agent's ``BuildSANExtension`` marks it so, its subject
    being empty), then not."""
    def attributes(critical: bool) -> bytes:
        extension = uri_san_extension(uri, critical=critical)
        return tlv(0xA0, tlv(_SEQUENCE, _OID_EXTENSION_REQUEST + tlv(_SET, tlv(_SEQUENCE, extension))))

    return attributes(True), attributes(False)


def _signature_verifies(csr: x509.CertificateSigningRequest, key: object, info: bytes) -> bool:
    """The CSR's self-signature over ``info`` (its ``tbs_certrequest_bytes``), checked with the key already
    loaded: ``is_signature_valid`` would parse the key a second time, a fifth of the cost of a CSR-path
    issuance (bench/issuance.py)."""
    try:
        ecdsa = _ECDSA_BY_OID.get(csr.signature_algorithm_oid)
        if ecdsa is not None:
            verdict = signature_verifies(key, csr.signature, info, ecdsa, None)
        else:
            verdict = signature_verifies(key, csr.signature, info, csr.signature_algorithm_parameters,
                                         csr.signature_hash_algorithm)
        return csr.is_signature_valid if verdict is None else verdict
    except (UnsupportedAlgorithm, ValueError):
        return False


def _check_extension(ext: x509.Extension[x509.ExtensionType], entitled: SpiffeId) -> None:
    value = ext.value
    # Exact types: the parser makes these very classes, and isinstance against cryptography's ABCs costs
    # ~0.5 us a check on every CSR.
    if type(value) is x509.BasicConstraints:
        if value.ca:
            raise CSRRejectedError("ca-request", "CSR requests a CA certificate (basicConstraints CA:TRUE)")
        return
    if type(value) is x509.SubjectAlternativeName:
        _check_names(list(value), entitled)
        return
    # Unknown to us: a critical one we could not honour, a non-critical one we would silently drop;
    # both are refused so a client never believes it got something it did not.
    rule = "critical-extension" if ext.critical else "extension"
    raise CSRRejectedError(rule, f"CSR carries extension {ext.oid.dotted_string} ({ext.oid._name}), which is "
                                 "not allowed")


_SAN_RULES: tuple[tuple[type[x509.GeneralName], str], ...] = (
    (x509.DNSName, "san-dns"), (x509.IPAddress, "san-ip"), (x509.RFC822Name, "san-email"),
    (x509.UniformResourceIdentifier, "san-uri"),
)


def _check_names(names: list[x509.GeneralName], entitled: SpiffeId) -> None:
    wanted = str(entitled)
    for name in names:
        if type(name) is x509.UniformResourceIdentifier and name.value == wanted:
            continue
        rule = next((r for cls, r in _SAN_RULES if isinstance(name, cls)), "san-other")
        shown = str(getattr(name, "value", name))[:200]
        raise CSRRejectedError(rule, f"CSR names {shown!r}; the caller is entitled only to {entitled}")
    if len(names) != 1:  # every name is the entitled ID by now: it must be there, once
        raise CSRRejectedError("san-uri", f"CSR must name {entitled} exactly once; the caller is entitled only "
                                          "to it")


def resolve_ttl(validity_seconds: int, *, default: dt.timedelta, maximum: dt.timedelta) -> dt.timedelta:
    """The lifetime to issue for a requested ``validity_duration`` (seconds), as istiod decides it.

    ``<= 0`` means "the default".  Above ``maximum`` is refused rather than capped: istiod answers
    INVALID_ARGUMENT so the client learns its setting is wrong (cert-manager istio-csr caps silently).

    Raises:
        InvalidCSRError: rule ``ttl`` if ``validity_seconds`` exceeds ``maximum``.
    """
    if validity_seconds <= 0:
        return default
    if validity_seconds > maximum.total_seconds():
        raise InvalidCSRError("ttl", f"requested validity {validity_seconds}s exceeds the maximum "
                                     f"{int(maximum.total_seconds())}s")
    return dt.timedelta(seconds=validity_seconds)
