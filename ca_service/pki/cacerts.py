"""istiod's plug-in CA contract (``cacerts``): the four files, built and checked.  Pure.

istiod reads ``ca-cert.pem`` (its signing CA), ``ca-key.pem``, ``root-cert.pem`` (the roots it
distributes) and ``cert-chain.pem`` (ca-cert followed by the chain up to the root).  It refuses a set
where any file is missing, the key's first PEM block is not the key, or the CA does not verify against
the roots through the chain; we check the same before writing anything.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence

from cryptography import x509

from ca_service.errors import InvalidRequestError, PolicyViolationError
from ca_service.pki.certs import certs_to_pem, is_ca, load_cert, load_certs
from ca_service.pki.keys import PrivateKey, load_private_key, private_key_to_pem, same_public_key
from ca_service.pki.verify import ChainVerificationError, verify_ca_chain

CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN = "ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem"
CACERTS_FILES = (CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN)
# istiod's own self-signed key name: writing it would make istiod believe it runs its built-in CA.
FORBIDDEN_FILES = ("ca-cert.pem.istio-generated", "istio-generated")
_FIRST_PEM = re.compile(rb"-----BEGIN ([A-Z ]+)-----")
_KEY_HEADERS = (b"PRIVATE KEY", b"EC PRIVATE KEY", b"RSA PRIVATE KEY")


class CacertsError(PolicyViolationError):
    """A ``cacerts`` set would be refused by istiod; ``problems`` lists why."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("cacerts set rejected: " + "; ".join(problems))


def build_cacerts(
    ca_cert: x509.Certificate, ca_key: PrivateKey, chain_above: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
) -> dict[str, bytes]:
    """The four files for an istiod intermediate.

    ``chain_above`` is the path from ``ca_cert``'s issuer up to and including its root; ``roots`` is
    every root istiod should trust (both during a root rotation).
    """
    return {
        CA_CERT: certs_to_pem([ca_cert]),
        CA_KEY: private_key_to_pem(ca_key),
        ROOT_CERT: certs_to_pem(roots),
        CERT_CHAIN: certs_to_pem([ca_cert, *chain_above]),
    }


def check_cacerts(files: Mapping[str, bytes], *, now: dt.datetime) -> None:
    """Apply istiod's plug-in checks to a file set.

    Raises:
        CacertsError: listing every problem: a missing file, a key file whose first PEM block is not a
            private key, a key that does not match ``ca-cert.pem``, a CA certificate that is not CA:TRUE
            or carries an EKU, a ``cert-chain.pem`` that does not start with ``ca-cert.pem``, or a
            ``ca-cert.pem`` that does not verify against ``root-cert.pem`` through ``cert-chain.pem``.
    """
    missing = [name for name in CACERTS_FILES if not files.get(name)]
    if missing:
        raise CacertsError([f"missing {name}" for name in missing])
    problems: list[str] = []
    try:
        ca_cert = load_cert(files[CA_CERT], what=CA_CERT)
        chain = load_certs(files[CERT_CHAIN], what=CERT_CHAIN)
        roots = load_certs(files[ROOT_CERT], what=ROOT_CERT)
    except InvalidRequestError as exc:
        raise CacertsError([str(exc)]) from None
    problems += _check_key(files[CA_KEY], ca_cert)
    if not is_ca(ca_cert):
        problems.append(f"{CA_CERT} is not a CA certificate (CA:TRUE)")
    for name, certs in ((CA_CERT, [ca_cert]), (CERT_CHAIN, chain), (ROOT_CERT, roots)):
        for cert in certs:
            if _has_eku(cert):
                problems.append(f"{name}: CA certificates must not carry an extended key usage")
    if chain[0] != ca_cert:
        problems.append(f"{CERT_CHAIN} must start with {CA_CERT}")
    try:
        verify_ca_chain(ca_cert, chain[1:], roots, now=now)
    except ChainVerificationError as exc:
        problems.append(f"{CA_CERT} does not verify against {ROOT_CERT} through {CERT_CHAIN}: {exc}")
    if problems:
        raise CacertsError(problems)


def _check_key(key_pem: bytes, ca_cert: x509.Certificate) -> list[str]:
    first = _FIRST_PEM.search(key_pem)
    if first is None or first.group(1) not in _KEY_HEADERS:
        return [f"the first PEM block of {CA_KEY} must be a private key"]
    try:
        key = load_private_key(key_pem)
    except (InvalidRequestError, PolicyViolationError) as exc:
        return [f"{CA_KEY}: {exc}"]
    if not same_public_key(key.public_key(), ca_cert.public_key()):  # type: ignore[arg-type]
        return [f"{CA_KEY} does not match the public key of {CA_CERT}"]
    return []


def _has_eku(cert: x509.Certificate) -> bool:
    try:
        cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    except x509.ExtensionNotFound:
        return False
    return True
