"""Which peer bundles we accept: the pure rules behind "never replace a good bundle with a bad one".

Every rejection carries a ``reason`` that becomes the ``reason`` label of
``ca_trust_bundle_refresh_failures``; the set of reasons is closed so dashboards can enumerate it.
"""

from __future__ import annotations

from ca_service.errors import InvalidRequestError
from ca_service.pki.bundle import TrustBundle, parse_jwks
from ca_service.pki.certs import load_certs, uri_sans
from ca_service.pki.identity import SpiffeId, TrustDomain

# Metric label values, one per way a refresh can fail.
UNREACHABLE = "unreachable"  # connection refused, timeout, file missing
HTTP_STATUS = "http_status"  # the endpoint answered, but not 200
TLS = "tls"  # no chain, or it does not verify against the peer's roots / CA file
ENDPOINT_ID = "endpoint_id"  # a valid SVID of the right trust domain, but not the configured endpoint ID
WRONG_DOMAIN = "wrong_domain"  # an endpoint SVID or a root that belongs to another trust domain
UNPARSABLE = "unparsable"  # not JSON / PEM, or the SPIFFE bundle format is broken
NOT_CA = "not_ca"  # a trust anchor that is not a CA certificate (a leaf)
SEQUENCE = "sequence"  # spiffe_sequence went backwards: a replay or a rolled-back peer
INTERNAL = "internal"  # a bug on our side while fetching; logged with its traceback

REASONS = (UNREACHABLE, HTTP_STATUS, TLS, ENDPOINT_ID, WRONG_DOMAIN, UNPARSABLE, NOT_CA, SEQUENCE, INTERNAL)


class BundleRejectedError(InvalidRequestError):
    """A fetched peer bundle is not acceptable; the current one stays.  ``reason`` is a metric label."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse_bundle_document(data: bytes, trust_domain: TrustDomain, *, current: TrustBundle | None) -> TrustBundle:
    """A peer bundle from SPIFFE JSON or concatenated PEM; the trust domain comes from configuration.

    PEM carries no sequence, so one is derived: the current sequence, plus one when the roots changed,
    which keeps the sequence monotonic for our own consumers.

    Raises:
        BundleRejectedError: ``unparsable`` or ``not_ca``.
    """
    try:
        if data.lstrip().startswith(b"{"):
            return parse_jwks(data, trust_domain)
        certs = load_certs(data, what=f"bundle for {trust_domain}")
        candidate = TrustBundle(trust_domain, tuple(certs), 0)
    except InvalidRequestError as exc:
        # parse_jwks and TrustBundle raise one error type for every rule; the CA rule is told apart by
        # its message because a leaf-as-anchor is an attack worth its own metric label.
        reason = NOT_CA if "not a CA" in str(exc) else UNPARSABLE
        raise BundleRejectedError(str(exc), reason) from None
    if current is None:
        return candidate
    changed = candidate.fingerprints() != current.fingerprints()
    return TrustBundle(trust_domain, candidate.roots, current.sequence + (1 if changed else 0),
                       current.refresh_hint)


def load_bootstrap(data: bytes, trust_domain: TrustDomain) -> TrustBundle:
    """The operator-supplied first bundle of a peer (``ca-service bundle --format spiffe`` of the peer, or PEM)."""
    bundle = parse_bundle_document(data, trust_domain, current=None)
    check_candidate(None, bundle)
    return bundle


def check_candidate(current: TrustBundle | None, candidate: TrustBundle) -> None:
    """Decide whether ``candidate`` may replace ``current``.

    Raises:
        BundleRejectedError: ``wrong_domain`` if a root names a SPIFFE trust domain other than the
            configured one (our roots and SPIRE's carry ``spiffe://<td>`` as URI SAN); ``sequence``
            if the sequence is lower than the current one.
    """
    expected = candidate.trust_domain
    for root in candidate.roots:
        for uri in uri_sans(root):
            if not uri.startswith("spiffe://"):
                continue
            try:
                named = SpiffeId.parse(uri).trust_domain
            except InvalidRequestError:
                raise BundleRejectedError(f"a root of the bundle for {expected} carries a broken SPIFFE ID {uri!r}",
                                          WRONG_DOMAIN) from None
            if named != expected:
                raise BundleRejectedError(
                    f"the bundle for {expected} holds a root of trust domain {named}", WRONG_DOMAIN)
    if current is not None and candidate.sequence < current.sequence:
        raise BundleRejectedError(
            f"the bundle for {expected} has spiffe_sequence {candidate.sequence}, lower than the current "
            f"{current.sequence} (a replayed or rolled-back bundle)", SEQUENCE)
