"""Chain verification at a given instant, through ``cryptography.x509.verification`` (RFC 5280 path building).

Used before every reply that carries a chain (istio-csr's rule: never hand out a chain that does not
verify against the roots we publish; :class:`IssuedChainVerifier` does it per CSR at a third of the
cost) and by the independent checks of ``export-cacerts``.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import OrderedDict
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store, VerificationError

from ca_service.errors import PolicyViolationError
from ca_service.pki.certs import is_ca, spiffe_id_of
from ca_service.pki.identity import SpiffeId

# root -> intermediate -> leaf is depth 2; one more allows an offline root above our root-of-record
# (intermediate-only mode hands us a chain that may already hold a further intermediate).
MAX_CHAIN_DEPTH = 4


class ChainVerificationError(PolicyViolationError):
    """A chain does not verify against the given roots at the given time."""


def _builder(roots: Sequence[x509.Certificate], now: dt.datetime) -> PolicyBuilder:
    if not roots:
        raise ChainVerificationError("no trusted roots to verify against")
    return PolicyBuilder().store(Store(list(roots))).time(now).max_chain_depth(MAX_CHAIN_DEPTH)


def verify_svid(
    leaf: x509.Certificate, intermediates: Sequence[x509.Certificate], roots: Sequence[x509.Certificate],
    *, now: dt.datetime,
) -> SpiffeId:
    """Verify an X509-SVID chain for client and server use and return its SPIFFE ID.

    Raises:
        ChainVerificationError: if no path to ``roots`` exists at ``now`` or a certificate breaks RFC 5280.
        InvalidRequestError: if the leaf does not carry exactly one valid SPIFFE ID.
    """
    if is_ca(leaf):
        raise ChainVerificationError("an X509-SVID leaf must not be a CA certificate")
    spiffe_id = spiffe_id_of(leaf)
    verifier = _builder(roots, now).build_client_verifier()
    try:
        verifier.verify(leaf, list(intermediates))
    except VerificationError as exc:
        raise ChainVerificationError(f"chain of {spiffe_id} does not verify: {exc}") from None
    return spiffe_id


def verify_ca_chain(
    ca_cert: x509.Certificate, intermediates: Sequence[x509.Certificate], roots: Sequence[x509.Certificate],
    *, now: dt.datetime,
) -> None:
    """Verify that the CA certificate ``ca_cert`` chains to ``roots`` at ``now`` (istiod's ``cacerts`` rule).

    Raises:
        ChainVerificationError: if ``ca_cert`` is not a CA or has no valid path to ``roots``.
    """
    if not is_ca(ca_cert):
        raise ChainVerificationError("expected a CA certificate (basicConstraints CA:TRUE)")
    if any(ca_cert == r for r in roots):
        return
    # The verifier's end-entity profile would reject a CA as the target; the CA profile still applies
    # to every issuer above it, which is what we want to check.
    builder = _builder(roots, now).extension_policies(
        ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ExtensionPolicy.permit_all()
    )
    try:
        builder.build_client_verifier().verify(ca_cert, list(intermediates))
    except VerificationError as exc:
        raise ChainVerificationError(f"CA certificate does not chain to the roots: {exc}") from None


class IssuedChainVerifier:
    """:func:`verify_svid` for the leaves we have just signed, at a third of its cost per leaf.

    The path from a signer to the roots (the chain tail: intermediate(s)) and the leaf profile do not
    change from one leaf to the next: the full RFC 5280 verifier runs on the first leaf of each
    ``(tail, roots)`` pair and again at least every ``recheck`` (so an expiring intermediate or root is
    seen).  Every leaf still gets what can differ per leaf: its signature under the tail's first
    certificate and the issuer name (``verify_directly_issued_by``), its validity at ``now``, not a CA,
    one SPIFFE ID.  A tail or root set not seen before is a cache miss, never a pass.
    """

    def __init__(self, *, recheck: dt.timedelta = dt.timedelta(minutes=1), capacity: int = 8) -> None:
        self._recheck = recheck
        self._capacity = capacity
        self._lock = threading.Lock()
        # (tail, roots) -> when the full verifier last passed a leaf of that pair
        self._paths: OrderedDict[tuple[tuple[x509.Certificate, ...], tuple[x509.Certificate, ...]], dt.datetime] \
            = OrderedDict()

    def verify(self, leaf: x509.Certificate, tail: Sequence[x509.Certificate], roots: Sequence[x509.Certificate],
               *, now: dt.datetime) -> SpiffeId:
        """Raises as :func:`verify_svid`."""
        path = (tuple(tail), tuple(roots))
        checked = self._paths.get(path)
        if checked is None or not checked <= now < checked + self._recheck or not tail:
            spiffe_id = verify_svid(leaf, tail, roots, now=now)
            with self._lock:  # signers in several threads share one verifier
                self._paths[path] = now
                self._paths.move_to_end(path)
                while len(self._paths) > self._capacity:
                    self._paths.popitem(last=False)
            return spiffe_id
        if is_ca(leaf):
            raise ChainVerificationError("an X509-SVID leaf must not be a CA certificate")
        spiffe_id = spiffe_id_of(leaf)
        if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
            raise ChainVerificationError(f"chain of {spiffe_id} does not verify: the leaf is not valid at {now}")
        try:
            leaf.verify_directly_issued_by(tail[0])
        except (ValueError, TypeError, InvalidSignature):
            raise ChainVerificationError(f"chain of {spiffe_id} does not verify: the leaf is not signed by "
                                         "the chain's intermediate") from None
        return spiffe_id
