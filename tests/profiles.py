"""trustme-style profile assertions: one helper per SPIFFE X509-SVID / RFC 5280 MUST, and one per profile.

Each ``check_*`` raises ``AssertionError`` naming the rule it enforces, so the profile tests can both
assert every rule on what we issue and prove (with hand-built wrong certificates) that each helper bites.
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from ca_service.pki.keys import key_id


def _ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.Extension[x509.ExtensionType]:
    try:
        return cert.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        raise AssertionError(f"missing extension {kind.__name__}") from None


def _has(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> bool:
    try:
        cert.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return False
    return True


# ---------------------------------------------------------------- single rules


def check_exactly_one_uri_san(cert: x509.Certificate) -> str:
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert isinstance(san, x509.SubjectAlternativeName)
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    assert len(uris) == 1, f"an X509-SVID has exactly one URI SAN, found {uris}"
    return uris[0]


def check_no_other_sans(cert: x509.Certificate) -> None:
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert isinstance(san, x509.SubjectAlternativeName)
    others = [n for n in san if not isinstance(n, x509.UniformResourceIdentifier)]
    assert not others, f"unexpected non-URI SANs {others}"


def check_ca_false(cert: x509.Certificate) -> None:
    ext = _ext(cert, x509.BasicConstraints)
    assert isinstance(ext.value, x509.BasicConstraints)
    assert ext.value.ca is False, "a leaf must be CA:FALSE"


def check_ca_true(cert: x509.Certificate) -> None:
    ext = _ext(cert, x509.BasicConstraints)
    assert isinstance(ext.value, x509.BasicConstraints)
    assert ext.value.ca is True, "a CA certificate must be CA:TRUE"
    assert ext.critical, "basicConstraints of a CA must be critical (RFC 5280 4.2.1.9)"


def check_path_length(cert: x509.Certificate, expected: int | None) -> None:
    value = _ext(cert, x509.BasicConstraints).value
    assert isinstance(value, x509.BasicConstraints)
    assert value.path_length == expected, f"pathlen {value.path_length}, expected {expected}"


def check_leaf_key_usage(cert: x509.Certificate) -> None:
    ext = _ext(cert, x509.KeyUsage)
    assert ext.critical, "leaf keyUsage must be critical"
    usage = ext.value
    assert isinstance(usage, x509.KeyUsage)
    assert usage.digital_signature, "leaf keyUsage must include digitalSignature"
    assert not usage.key_cert_sign, "leaf keyUsage must not include keyCertSign"
    assert not usage.crl_sign, "leaf keyUsage must not include cRLSign"


def check_ca_key_usage(cert: x509.Certificate) -> None:
    ext = _ext(cert, x509.KeyUsage)
    assert ext.critical, "CA keyUsage must be critical"
    usage = ext.value
    assert isinstance(usage, x509.KeyUsage)
    assert usage.key_cert_sign, "CA keyUsage must include keyCertSign"
    assert usage.crl_sign, "CA keyUsage must include cRLSign"


def check_server_and_client_auth(cert: x509.Certificate) -> None:
    eku = _ext(cert, x509.ExtendedKeyUsage).value
    assert isinstance(eku, x509.ExtendedKeyUsage)
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku, "EKU must include serverAuth"
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku, "EKU must include clientAuth"


def check_no_eku(cert: x509.Certificate) -> None:
    assert not _has(cert, x509.ExtendedKeyUsage), "a CA certificate must not carry an EKU"


def check_san_critical_if_subject_empty(cert: x509.Certificate) -> None:
    if len(cert.subject) == 0:
        assert _ext(cert, x509.SubjectAlternativeName).critical, "SAN must be critical when the subject is empty"


def check_ski_matches_key(cert: x509.Certificate) -> None:
    ski = _ext(cert, x509.SubjectKeyIdentifier).value
    assert isinstance(ski, x509.SubjectKeyIdentifier)
    assert ski.digest == key_id(cert.public_key()), "SKI does not identify the certificate's key"  # type: ignore[arg-type]


def check_aki_names_issuer(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    aki = _ext(cert, x509.AuthorityKeyIdentifier).value
    ski = _ext(issuer, x509.SubjectKeyIdentifier).value
    assert isinstance(aki, x509.AuthorityKeyIdentifier) and isinstance(ski, x509.SubjectKeyIdentifier)
    assert aki.key_identifier == ski.digest, "AKI does not match the issuer's SKI"


def check_serial(cert: x509.Certificate) -> None:
    serial = cert.serial_number
    assert serial > 0, f"serial {serial} must be positive"
    # 20 octets as DER INTEGER content: a positive value needs its top bit clear, so < 2**159.
    assert (serial.bit_length() + 8) // 8 <= 20, f"serial {serial:x} is longer than 20 octets"


def check_within_issuer(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    assert cert.not_valid_after_utc <= issuer.not_valid_after_utc, "notAfter is past the issuer's notAfter"
    assert cert.not_valid_before_utc >= issuer.not_valid_before_utc, "notBefore is before the issuer's notBefore"


def check_backdated(cert: x509.Certificate, now: dt.datetime) -> None:
    assert cert.not_valid_before_utc < now, "notBefore must be backdated for clock skew"
    assert now - cert.not_valid_before_utc <= dt.timedelta(hours=1), "notBefore is backdated by more than an hour"


def check_signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    assert cert.issuer == issuer.subject, "issuer name does not match the issuer's subject"
    cert.verify_directly_issued_by(issuer)


# ---------------------------------------------------------------- profiles


def assert_is_svid(cert: x509.Certificate, issuer: x509.Certificate, spiffe_id: str | None = None) -> None:
    """Every MUST of a workload X509-SVID (SPIFFE X509-SVID spec + RFC 5280)."""
    uri = check_exactly_one_uri_san(cert)
    if spiffe_id is not None:
        assert uri == spiffe_id, f"URI SAN {uri}, expected {spiffe_id}"
    check_no_other_sans(cert)
    check_ca_false(cert)
    check_leaf_key_usage(cert)
    check_server_and_client_auth(cert)
    check_san_critical_if_subject_empty(cert)
    check_ski_matches_key(cert)
    check_aki_names_issuer(cert, issuer)
    check_serial(cert)
    check_within_issuer(cert, issuer)
    check_signed_by(cert, issuer)


def assert_is_ca(cert: x509.Certificate, issuer: x509.Certificate | None = None,
                 path_length: int | None = None) -> None:
    """Every MUST of a CA certificate; ``issuer`` None means self-signed root."""
    check_ca_true(cert)
    check_ca_key_usage(cert)
    check_no_eku(cert)
    check_ski_matches_key(cert)
    check_serial(cert)
    check_path_length(cert, path_length)
    parent = issuer or cert
    check_aki_names_issuer(cert, parent)
    check_signed_by(cert, parent)
    if issuer is not None:
        check_within_issuer(cert, issuer)
