"""Chain verification at a given instant, through ``cryptography.x509.verification`` (RFC 5280 path building).

Used before every reply that carries a chain (istio-csr's rule: never hand out a chain that does not
verify against the roots we publish; :class:`IssuedChainVerifier` does it per CSR for a signature verify
plus ~50 us, against ~330 us for the full path check) and by the independent checks of ``export-cacerts``.
"""

from __future__ import annotations

import datetime as dt
import operator
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store, VerificationError

from ca_service.errors import PolicyViolationError
from ca_service.pki.certs import is_ca, spiffe_id_of, uri_sans
from ca_service.pki.identity import SpiffeId
from ca_service.pki.keys import signature_verifies
from ca_service.pki.leaf_der import element_at

# root -> intermediate -> leaf is depth 2; one more allows an offline root above our root-of-record
# (intermediate-only mode hands us a chain that may already hold a further intermediate).
MAX_CHAIN_DEPTH = 4
_VERSION_TAG = 0xA0  # TBSCertificate's [0] EXPLICIT version, absent only in v1 certificates


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


@dataclass(frozen=True)
class _Path:
    """A (tail, roots) pair the full verifier passed, and what a leaf check needs of it."""

    tail: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]
    checked: dt.datetime  # when the full verifier last passed a leaf of this pair
    issuer_name: bytes  # the tail's first certificate's subject, DER
    # The signature algorithm of that leaf, inside its TBS (DER) and outside: every leaf of the path must
    # carry the same two (verify_directly_issued_by refuses a leaf whose inner and outer ones differ).
    signature_algorithm: bytes
    outer_algorithm: x509.ObjectIdentifier

    def same(self, tail: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]) -> bool:
        # By identity: a signer's tail and a bundle's roots are the same objects from leaf to leaf, and
        # hashing certificates to look the pair up cost 7 us a leaf.
        return (len(tail) == len(self.tail) and len(roots) == len(self.roots)
                and all(map(operator.is_, tail, self.tail)) and all(map(operator.is_, roots, self.roots)))


class IssuedChainVerifier:
    """:func:`verify_svid` for the leaves we have just signed, at a fraction of its cost per leaf.

    The path from a signer to the roots (the chain tail: intermediate(s)) and the leaf profile do not
    change from one leaf to the next: the full RFC 5280 verifier runs on the first leaf of each
    ``(tail, roots)`` pair and again at least every ``recheck`` (so an expiring intermediate or root is
    seen).  Every leaf still gets what can differ per leaf: its signature under the tail's first
    certificate's key, that certificate's subject as its issuer, the path's signature algorithm inside
    and outside its TBS, its validity at ``now``, not a CA, one SPIFFE ID.  A tail or root set not seen
    before is a cache miss, never a pass.
    """

    def __init__(self, *, recheck: dt.timedelta = dt.timedelta(minutes=1), capacity: int = 8) -> None:
        self._recheck = recheck
        self._capacity = capacity
        self._lock = threading.Lock()
        self._paths: OrderedDict[tuple[tuple[x509.Certificate, ...], tuple[x509.Certificate, ...]], _Path] \
            = OrderedDict()
        self._last: _Path | None = None  # the pair of the last leaf: nearly always the next one's too

    def verify(self, leaf: x509.Certificate, tail: Sequence[x509.Certificate], roots: Sequence[x509.Certificate],
               *, now: dt.datetime, expected: SpiffeId | None = None) -> SpiffeId:
        """Raises as :func:`verify_svid`, and ChainVerificationError if ``expected`` is given and the leaf
        names another SPIFFE ID."""
        path = self._known(tail, roots)
        if path is None or not path.checked <= now < path.checked + self._recheck or not tail:
            spiffe_id = verify_svid(leaf, tail, roots, now=now)
            if tail:  # a leaf straight under a root has no intermediate to remember
                self._remember(_first_leaf(leaf, tuple(tail), tuple(roots), now))
        else:
            spiffe_id = _check_leaf(leaf, path, now, expected)
        if expected is not None and spiffe_id != expected:
            raise ChainVerificationError(f"the leaf names {spiffe_id}, not {expected}")
        return spiffe_id

    def _known(self, tail: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]) -> _Path | None:
        last = self._last
        if last is not None and last.same(tail, roots):
            return last
        path = self._paths.get((tuple(tail), tuple(roots)))
        if path is not None:
            self._last = path  # one assignment: atomic, and any remembered path is a valid answer
        return path

    def _remember(self, path: _Path) -> None:
        with self._lock:  # signers in several threads share one verifier
            self._paths[(path.tail, path.roots)] = path
            self._paths.move_to_end((path.tail, path.roots))
            while len(self._paths) > self._capacity:
                self._paths.popitem(last=False)
            self._last = path


def _first_leaf(leaf: x509.Certificate, tail: tuple[x509.Certificate, ...], roots: tuple[x509.Certificate, ...],
                now: dt.datetime) -> _Path:
    """The path a leaf that passed the full verifier opens, after ``verify_directly_issued_by`` on it (its
    inner and outer signature algorithms agree, its issuer is the intermediate's subject)."""
    try:
        leaf.verify_directly_issued_by(tail[0])
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
        raise ChainVerificationError(f"the leaf is not directly issued by the chain's intermediate: {exc}") from None
    algorithm, issuer = _tbs_fields(leaf.tbs_certificate_bytes)
    return _Path(tail, roots, now, issuer, algorithm, leaf.signature_algorithm_oid)


def _check_leaf(leaf: x509.Certificate, path: _Path, now: dt.datetime, expected: SpiffeId | None) -> SpiffeId:
    """The per-leaf checks on a known path; see :class:`IssuedChainVerifier`."""
    if is_ca(leaf):
        raise ChainVerificationError("an X509-SVID leaf must not be a CA certificate")
    # The one URI SAN byte for byte the ID we meant needs no parsing; anything else is parsed to be named.
    matches = expected is not None and uri_sans(leaf) == [str(expected)]
    spiffe_id = expected if expected is not None and matches else spiffe_id_of(leaf)
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise ChainVerificationError(f"chain of {spiffe_id} does not verify: the leaf is not valid at {now}")
    tbs = leaf.tbs_certificate_bytes  # encoded afresh on every read (7 us): read once
    if _tbs_fields(tbs) != (path.signature_algorithm, path.issuer_name) \
            or leaf.signature_algorithm_oid != path.outer_algorithm or not _signed_by(leaf, tbs, path.tail[0]):
        raise ChainVerificationError(f"chain of {spiffe_id} does not verify: the leaf is not signed by "
                                     "the chain's intermediate")
    return spiffe_id


def _tbs_fields(tbs: bytes) -> tuple[bytes, bytes]:
    """The signature AlgorithmIdentifier and issuer Name DER of a TBSCertificate (RFC 5280 4.1: [0] version,
    serialNumber, signature, issuer), read by position from DER that ``cryptography`` parsed; comparing
    bytes is what ``verify_directly_issued_by`` does after parsing both names into objects (16 us)."""
    cursor, _ = element_at(tbs, 0)
    if tbs[cursor] == _VERSION_TAG:
        cursor = element_at(tbs, cursor)[1]
    cursor = element_at(tbs, cursor)[1]  # past serialNumber
    algorithm_end = element_at(tbs, cursor)[1]
    return tbs[cursor:algorithm_end], tbs[algorithm_end:element_at(tbs, algorithm_end)[1]]


def _signed_by(leaf: x509.Certificate, tbs: bytes, issuer: x509.Certificate) -> bool:
    """The leaf's signature over its ``tbs`` under ``issuer``'s key (already loaded on the certificate object)."""
    try:
        verdict = signature_verifies(issuer.public_key(), leaf.signature, tbs, leaf.signature_algorithm_parameters,
                                     leaf.signature_hash_algorithm)
        if verdict is None:
            leaf.verify_directly_issued_by(issuer)
            return True
        return verdict
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError):
        return False
