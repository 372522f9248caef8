"""The serving certificate of a TLS gRPC listener: our own SVID profile plus the DNS names clients dial.

istio-agent verifies the CA's certificate, hostname included, against the mesh root it mounts, so the
certificate of a listener it dials as ``ca-service.istio-system.svc`` must carry that name.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509

from ca_service.pki.templates import IssuerProfile


def with_dns_names(leaf: x509.Certificate, dns_names: Sequence[str], issuer: IssuerProfile) -> x509.Certificate:
    """``leaf`` re-signed by ``issuer`` with ``dns_names`` added to its SAN (same key, validity and profile).

    Raises:
        ValueError: if a DNS name is empty or not ASCII (an IDN must come A-label encoded).
    """
    for name in dns_names:
        if not name or not name.isascii() or " " in name:
            raise ValueError(f"{name!r} is not a DNS name")
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    names = [*san.value, *[x509.DNSName(n) for n in dns_names]]
    builder = (x509.CertificateBuilder().subject_name(leaf.subject).issuer_name(issuer.name)
               .serial_number(x509.random_serial_number()).public_key(leaf.public_key())
               .not_valid_before(leaf.not_valid_before_utc).not_valid_after(leaf.not_valid_after_utc))
    for ext in leaf.extensions:
        value = x509.SubjectAlternativeName(names) if ext.oid == san.oid else ext.value
        builder = builder.add_extension(value, critical=ext.critical)
    return builder.sign(issuer.key, issuer.digest)
