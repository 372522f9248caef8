"""CSR checks.  The identity comes from the authenticated caller; the CSR only contributes a public key.

A CSR is accepted only if it could not make us sign anything beyond "this key is <entitled SPIFFE ID>":
cert-manager istio-csr and istiod apply the same rule.
"""

from __future__ import annotations

from collections.abc import Collection

from cryptography import x509
from cryptography.x509.oid import NameOID

from ca_service.errors import InvalidRequestError, PolicyViolationError
from ca_service.pki.identity import SpiffeId
from ca_service.pki.keys import KeyAlgorithm, PublicKey, algorithm_of

DEFAULT_ALLOWED_ALGORITHMS = frozenset(KeyAlgorithm)
# istio-agent may put an Organization in the subject (its --org option); nothing else is tolerated.
_TOLERATED_SUBJECT_OIDS = frozenset({NameOID.ORGANIZATION_NAME})


class CSRRejectedError(PolicyViolationError):
    """A CSR asks for something the caller is not entitled to."""


def parse_csr(pem: bytes | str) -> x509.CertificateSigningRequest:
    """Parse a PEM CSR.

    Raises:
        InvalidRequestError: if it is not a PEM certificate request.
    """
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        return x509.load_pem_x509_csr(data)
    except ValueError:
        raise InvalidRequestError("CSR is not a valid PEM certificate request") from None


def check_csr(
    csr: x509.CertificateSigningRequest, entitled: SpiffeId,
    allowed_algorithms: Collection[KeyAlgorithm] = DEFAULT_ALLOWED_ALGORITHMS,
) -> PublicKey:
    """Check ``csr`` against the identity the caller is entitled to, and return its public key.

    Raises:
        InvalidRequestError: if the signature does not verify (the requester does not hold the key).
        CSRRejectedError: if the key type or size is not allowed; it requests a CA (basicConstraints
            CA:TRUE); it carries any extension other than subjectAltName and basicConstraints CA:FALSE;
            its SAN holds anything but exactly the entitled SPIFFE ID; its subject holds anything but an
            Organization.
    """
    if not csr.is_signature_valid:
        raise InvalidRequestError("CSR signature does not verify")
    public_key = csr.public_key()
    try:
        algorithm = algorithm_of(public_key)  # type: ignore[arg-type]
    except PolicyViolationError as exc:
        raise CSRRejectedError(f"CSR key rejected: {exc}") from None
    if algorithm not in allowed_algorithms:
        raise CSRRejectedError(f"CSR key algorithm {algorithm} is not allowed here")
    for ext in csr.extensions:
        _check_extension(ext, entitled)
    extra = [attr for attr in csr.subject if attr.oid not in _TOLERATED_SUBJECT_OIDS]
    if extra:
        raise CSRRejectedError(
            f"CSR subject {csr.subject.rfc4514_string()!r} names something other than the caller; leave it empty"
        )
    return public_key  # type: ignore[return-value]


def _check_extension(ext: x509.Extension[x509.ExtensionType], entitled: SpiffeId) -> None:
    value = ext.value
    if isinstance(value, x509.BasicConstraints):
        if value.ca:
            raise CSRRejectedError("CSR requests a CA certificate (basicConstraints CA:TRUE)")
        return
    if isinstance(value, x509.SubjectAlternativeName):
        names = list(value)
        wanted = x509.UniformResourceIdentifier(str(entitled))
        if names != [wanted]:
            shown = ", ".join(getattr(n, "value", str(n)) for n in names) or "nothing"
            raise CSRRejectedError(f"CSR names {shown}; the caller is entitled only to {entitled}")
        return
    raise CSRRejectedError(f"CSR carries extension {ext.oid.dotted_string} ({ext.oid._name}), which is not allowed")
