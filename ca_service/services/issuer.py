"""The one Issuer: template -> sign -> verify the chain against the current roots.

Every certificate this daemon signs for a caller goes through :class:`Issuer`: SDS (in process),
the signing pool (its workers run only :func:`sign_leaf`, the template + signature; the parent plans
the batch and assembles/verifies the results here), the CLI ``issue``, the serving certificates of
our own listeners (with DNS SANs), and the coming CSR path (``issue(spiffe_id, public_key, ttl=...)``).

The issuer does not decide *who* may have an identity: callers establish that first.  It decides
*what* is signed (TTL clamp, backdate, trust domain) and checks the result chains to the roots.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from cryptography import x509

from ca_service.errors import NotReadyError, PolicyViolationError
from ca_service.pki.certs import cert_to_pem, der_to_pem
from ca_service.pki.identity import SpiffeId, TrustDomain
from ca_service.pki.keys import KeyAlgorithm, PrivateKey, PublicKey, generate_private_key
from ca_service.pki.templates import CAKind, IssuerProfile, LeafEncoder, build_svid_der_for, leaf_validity
from ca_service.pki.verify import ChainVerificationError, verify_svid
from ca_service.rotation.state import AuthorityState, CAEntry
from ca_service.settings import CASettings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SignerChain:
    """What every SVID of one signer shares: the chain after the leaf, its PEM, the roots it verifies against."""

    key_id: str  # the signing intermediate's
    tail: tuple[x509.Certificate, ...]  # the signer, then any non-root CAs above it
    # PEM of each of ``tail``, so that encoding an SVID's chain costs one leaf.
    tail_pems: tuple[bytes, ...]
    roots: tuple[x509.Certificate, ...]


class IssuedSvid(NamedTuple):
    """A signed X509-SVID with the chain to present (leaf first, root excluded) and the roots it verifies against.

    The issuer keeps what it decided for the leaf (serial, validity) next to the DER it signed, so the
    leaf is parsed only when something asks for the certificate object (:attr:`leaf`, :attr:`chain`:
    serving certificates, a CSR's leaf checked before it is returned): a storm's parent process and a
    workload's install read only these fields.  A tuple, not a frozen dataclass:
    one is made per leaf, and a frozen dataclass's ``__init__`` (``object.__setattr__`` per field) took
    1.9 us of a storm parent's ~9 us per leaf, against 0.6 us.
    """

    spiffe_id: SpiffeId
    leaf_der: bytes
    serial_number: int
    not_before: dt.datetime
    not_after: dt.datetime
    signer: SignerChain

    @property
    def leaf(self) -> x509.Certificate:
        return _parsed_leaf(self.leaf_der)

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        return (_parsed_leaf(self.leaf_der), *self.signer.tail)

    @property
    def roots(self) -> tuple[x509.Certificate, ...]:
        return self.signer.roots

    @property
    def issuer_key_id(self) -> str:
        return self.signer.key_id

    @property
    def tail_pems(self) -> tuple[bytes, ...]:
        return self.signer.tail_pems

    @property
    def serial(self) -> str:
        """The leaf's serial in hex, as openssl prints it (logs, the issuance ledger, admin results)."""
        return format(self.serial_number, "x")

    def chain_pem(self) -> bytes:
        """The chain as concatenated PEM, leaf first (what SDS ``tls_certificate.certificate_chain`` carries)."""
        return b"".join((der_to_pem(self.leaf_der), *self.signer.tail_pems))


# The few SVIDs whose certificate object is asked for (serving certificates on every TLS context they
# build, a CSR's leaf verified before it is returned) parse once; the many that only travel as PEM never do.
@functools.lru_cache(maxsize=256)
def _parsed_leaf(der: bytes) -> x509.Certificate:
    return x509.load_der_x509_certificate(der)


@dataclass(frozen=True)
class SigningContext:
    """Everything signing with the active intermediate of one state repeats, computed once per state."""

    state: AuthorityState
    signer: CAEntry
    profile: IssuerProfile
    chain: SignerChain

    @property
    def key_id(self) -> str:
        return self.chain.key_id

    @classmethod
    def of(cls, state: AuthorityState) -> SigningContext:
        """Raises: NotReadyError: if no signing intermediate is active or its key is not available."""
        signer = state.active(CAKind.INTERMEDIATE)
        if signer.key is None:
            raise NotReadyError("the signing intermediate's key is not available")
        roots = state.roots
        tail = (signer.cert, *[c for c in state.chain_above(signer) if c not in roots])
        return cls(state, signer, IssuerProfile.of(signer.cert, signer.key),
                   SignerChain(signer.key_id, tail, tuple(cert_to_pem(c) for c in tail), roots))


@dataclass(frozen=True)
class IssuancePolicy:
    """What every leaf gets: default and maximum TTL, backdate, the key algorithm of keys we generate."""

    workload_ttl: dt.timedelta = dt.timedelta(hours=24)
    max_workload_ttl: dt.timedelta = dt.timedelta(hours=24)
    backdate: dt.timedelta = dt.timedelta(minutes=5)
    key_algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256
    encoder: LeafEncoder = LeafEncoder.TEMPLATE  # ca.leaf_encoder: the DER template or the reference builder

    @classmethod
    def of(cls, ca: CASettings) -> IssuancePolicy:
        return cls(ca.workload_ttl, ca.max_workload_ttl, ca.backdate, ca.workload_key_algorithm, ca.leaf_encoder)


class SigningSource(Protocol):
    """Where the issuer gets the current signer from (the authority)."""

    @property
    def trust_domain(self) -> TrustDomain: ...

    def signing_context(self) -> SigningContext: ...


@dataclass(frozen=True)
class BatchPlan:
    """What a batch of leaves is signed under (the signing pool ships it to its workers): one validity for all."""

    context: SigningContext
    now: dt.datetime
    not_before: dt.datetime
    not_after: dt.datetime
    key_algorithm: KeyAlgorithm
    encoder: LeafEncoder = LeafEncoder.TEMPLATE


def sign_leaf(profile: IssuerProfile, public_key: PublicKey, spiffe_id: SpiffeId, *, serial: int,
              not_before: dt.datetime, not_after: dt.datetime, dns_names: Sequence[str] = (),
              encoder: LeafEncoder = LeafEncoder.TEMPLATE, spki: bytes | None = None) -> bytes:
    """Template + signature of one leaf, as DER: the part a signing-pool worker runs, with no state of its own."""
    return build_svid_der_for(public_key, spiffe_id, profile, serial=serial, not_before=not_before,
                              not_after=not_after, dns_names=dns_names, encoder=encoder, spki=spki)


class Issuer:
    """Signs X509-SVIDs with the active signing intermediate and checks them against the current roots."""

    def __init__(self, source: SigningSource, policy: IssuancePolicy) -> None:
        self._source = source
        self.policy = policy
        # A signer's chain is verified once against the roots (not per leaf): the leaf profile is fixed
        # by our template, the chain is what can go wrong (a rotation that published nothing).
        self._verified_signers: set[tuple[str, int]] = set()
        # Told of every serving certificate (the issuance ledger): those have no caller to record them.
        self._serving_observers: list[Callable[[IssuedSvid], None]] = []

    def observe_serving(self, observer: Callable[[IssuedSvid], None]) -> None:
        """Call ``observer`` with every serving certificate issued from now on (after it is signed)."""
        self._serving_observers.append(observer)

    @property
    def trust_domain(self) -> TrustDomain:
        return self._source.trust_domain

    def signing_context(self) -> SigningContext:
        """The current signer (raises NotReadyError if there is none with a key)."""
        return self._source.signing_context()

    def new_key(self) -> PrivateKey:
        return generate_private_key(self.policy.key_algorithm)

    def check_member(self, spiffe_id: SpiffeId) -> None:
        """Raises: PolicyViolationError: if ``spiffe_id`` is not of our trust domain (no retry will help)."""
        self.check_members((spiffe_id,))

    def check_members(self, spiffe_ids: Sequence[SpiffeId]) -> None:
        """:meth:`check_member` of each, with the trust domain looked up once (a storm checks thousands).

        Raises:
            PolicyViolationError: for the first of ``spiffe_ids`` that is not of our trust domain.
        """
        domain = self.trust_domain
        for spiffe_id in spiffe_ids:
            if not spiffe_id.is_member_of(domain):
                raise PolicyViolationError(f"this CA signs only for {domain}, not for {spiffe_id}")

    def leaf_ttl(self, requested: dt.timedelta | None = None) -> dt.timedelta:
        """The requested TTL (default: the workload TTL), clamped to the maximum."""
        return min(requested or self.policy.workload_ttl, self.policy.max_workload_ttl)

    def issue(self, spiffe_id: SpiffeId, public_key: PublicKey, *, ttl: dt.timedelta | None = None,
              now: dt.datetime, spki: bytes | None = None) -> IssuedSvid:
        """Sign an X509-SVID for ``spiffe_id`` over ``public_key``; the caller is already known to be entitled.

        ``spki``: ``public_key``'s SubjectPublicKeyInfo as OpenSSL writes it, when the caller holds it
        (a CSR's own, :func:`ca_service.pki.csr.canonical_spki`); it saves encoding the key again.  It
        goes into the leaf as given: it must encode ``public_key`` (nothing here compares the two), so
        pass only what ``canonical_spki`` or ``public_key_der`` returned for that very key.

        Raises:
            PolicyViolationError: if ``spiffe_id`` is of another trust domain.
            NotReadyError: if no signing intermediate is active or its key is not available.
            ChainVerificationError: if the signer does not chain to the current roots.
        """
        return self._issue(spiffe_id, public_key, ttl=ttl, now=now, dns_names=(), spki=spki)

    def issue_serving(self, spiffe_id: SpiffeId, public_key: PublicKey, *, dns_names: Sequence[str] = (),
                      ttl: dt.timedelta | None = None, now: dt.datetime) -> IssuedSvid:
        """A serving certificate of one of our listeners: an SVID that also names ``dns_names`` (the
        host names clients dial and check).  Raises as :meth:`issue`."""
        svid = self._issue(spiffe_id, public_key, ttl=ttl, now=now, dns_names=tuple(dns_names))
        for observe in self._serving_observers:
            try:
                observe(svid)
            except Exception:
                # A listener must still get its certificate: the audit's failure is logged, not passed on.
                log.exception("recording a serving certificate failed", extra={"serial": svid.serial})
        return svid

    def _issue(self, spiffe_id: SpiffeId, public_key: PublicKey, *, ttl: dt.timedelta | None, now: dt.datetime,
               dns_names: tuple[str, ...], spki: bytes | None = None) -> IssuedSvid:
        self.check_member(spiffe_id)
        context = self._source.signing_context()
        not_before, not_after = leaf_validity(context.profile, now=now, ttl=self.leaf_ttl(ttl),
                                              backdate=self.policy.backdate)
        serial = x509.random_serial_number()
        leaf = sign_leaf(context.profile, public_key, spiffe_id, serial=serial, not_before=not_before,
                         not_after=not_after, dns_names=dns_names, encoder=self.policy.encoder, spki=spki)
        return self.assemble(spiffe_id, leaf, serial, context, not_before=not_before, not_after=not_after, now=now)

    def plan_batch(self, spiffe_ids: Sequence[SpiffeId], *, now: dt.datetime,
                   ttl: dt.timedelta | None = None) -> BatchPlan:
        """Check every identity and fix what a batch is signed under (the signing pool's first step).

        Raises:
            PolicyViolationError: if an identity is of another trust domain.
            NotReadyError: if no signing intermediate is active or its key is not available.
        """
        self.check_members(spiffe_ids)
        context = self._source.signing_context()
        not_before, not_after = leaf_validity(context.profile, now=now, ttl=self.leaf_ttl(ttl),
                                              backdate=self.policy.backdate)
        return BatchPlan(context, now, not_before, not_after, self.policy.key_algorithm, self.policy.encoder)

    def assemble(self, spiffe_id: SpiffeId, leaf_der: bytes, serial: int, context: SigningContext, *,
                 not_before: dt.datetime, not_after: dt.datetime, now: dt.datetime) -> IssuedSvid:
        """Wrap a leaf (DER) signed under ``context`` (here or in a signing-pool worker) with the serial and
        validity it was signed with, checking the signer's chain the first time it signs.

        That first leaf is parsed, and what it says is compared with what the caller kept for it: a
        caller that kept other values than it signed fails there, not in every later ledger line.

        Raises:
            ChainVerificationError: if the signer does not chain to the current roots, or the first leaf
                does not carry the serial and validity given.
        """
        marker = (context.key_id, context.state.bundle_sequence)
        if marker not in self._verified_signers:
            leaf = _parsed_leaf(leaf_der)
            verify_svid(leaf, context.chain.tail, context.chain.roots, now=now)
            if (leaf.serial_number, leaf.not_valid_before_utc, leaf.not_valid_after_utc) != (
                    serial, not_before, not_after):
                raise ChainVerificationError("a leaf does not carry the serial and validity it was signed with")
            self._verified_signers.add(marker)
        return IssuedSvid(spiffe_id, leaf_der, serial, not_before, not_after, context.chain)
