"""TLS plumbing for the bundle endpoint (server) and the ``https_spiffe`` client.

The ``https_spiffe`` client turns OpenSSL verification off and authenticates the presented chain
itself, with ``cryptography`` against the peer's bundle at our clock's ``now``: the peer's trust
domain is not a web PKI, hostname checks make no sense for it, and the decision must follow our
clock (tests run on a fake one) and the SPIFFE ID rule, neither of which OpenSSL knows about.
"""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509

from ca_service.errors import InvalidRequestError, PolicyViolationError
from ca_service.pki.certs import spiffe_id_of
from ca_service.pki.identity import SpiffeId
from ca_service.pki.verify import verify_svid

# _ssl.Certificate.public_bytes format code for DER (ssl re-exports it only from 3.13 on).
_DER: int = getattr(ssl, "ENCODING_DER", 2)


class EndpointAuthenticationError(PolicyViolationError):
    """A peer bundle endpoint did not prove the identity configured for it.

    ``reason`` is the metric label: ``tls`` (no or unverifiable chain), ``wrong_domain`` (an SVID of
    another trust domain) or ``endpoint_id`` (right trust domain, wrong SPIFFE ID).
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def server_context() -> ssl.SSLContext:
    """A TLS 1.2+ server context without client authentication (bundles are public)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_NONE
    return context


def spiffe_client_context(check: Callable[[list[x509.Certificate]], None]) -> ssl.SSLContext:
    """Client context for ``https_spiffe``: OpenSSL accepts any chain, ``check`` decides.

    ``check`` runs inside the handshake (through ``SSLContext.sslobject_class``, which asyncio uses
    for every TLS connection), so an endpoint that fails it never receives a request and aiohttp
    reports a connection error.  ``check`` raises to refuse.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE

    class _AuthenticatingSSLObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            super().do_handshake()  # raises SSLWantReadError until the handshake is complete
            check(presented_chain(self))

    context.sslobject_class = _AuthenticatingSSLObject
    return context


def web_client_context(ca_file: Path | None) -> ssl.SSLContext:
    """Client context for ``https_web``: ordinary WebPKI verification, hostname included."""
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


def presented_chain(ssl_object: ssl.SSLObject | None) -> list[x509.Certificate]:
    """The certificates the server sent, leaf first.

    Python exposes the chain publicly only from 3.13; on 3.11/3.12 the same method exists on the
    underlying ``_ssl`` object, which is what 3.13's public method wraps.
    """
    if ssl_object is None:
        return []
    getter = getattr(ssl_object, "get_unverified_chain", None)
    if getter is None:
        getter = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    if getter is None:
        der = ssl_object.getpeercert(binary_form=True)
        return [x509.load_der_x509_certificate(der)] if der else []
    out = []
    for cert in getter() or []:
        der = cert if isinstance(cert, bytes) else cert.public_bytes(_DER)
        out.append(x509.load_der_x509_certificate(der))
    return out


def authenticate_endpoint(
    chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate], expected: SpiffeId, *, now: dt.datetime
) -> SpiffeId:
    """Check that ``chain`` is an X509-SVID of exactly ``expected`` that verifies against ``roots`` at ``now``.

    Raises:
        EndpointAuthenticationError: if no chain was presented, the leaf is not an SVID, the chain
            does not verify against ``roots``, or the SPIFFE ID differs (reason ``wrong_domain`` when
            the trust domain differs, ``endpoint_id`` otherwise).
    """
    if not chain:
        raise EndpointAuthenticationError("the bundle endpoint presented no certificate", "tls")
    try:
        presented = spiffe_id_of(chain[0])
    except InvalidRequestError as exc:
        raise EndpointAuthenticationError(f"the bundle endpoint's certificate is not an SVID: {exc}", "tls") from None
    # The ID is checked before the chain so that an SVID of another trust domain (which cannot verify
    # against this peer's roots anyway) is reported as what it is.
    if presented.trust_domain != expected.trust_domain:
        raise EndpointAuthenticationError(
            f"the bundle endpoint presented {presented}, of trust domain {presented.trust_domain}; "
            f"expected {expected}", "wrong_domain")
    if presented != expected:
        raise EndpointAuthenticationError(
            f"the bundle endpoint presented {presented}, expected {expected}", "endpoint_id")
    try:
        verify_svid(chain[0], list(chain[1:]), roots, now=now)
    except PolicyViolationError as exc:
        raise EndpointAuthenticationError(f"the bundle endpoint's SVID does not verify: {exc}", "tls") from None
    return presented
