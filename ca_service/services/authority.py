"""The authority: the loaded CA state of one trust domain, the only writer of it, and the signer of SVIDs.

Every state change goes through :meth:`Authority.commit`: a compare-and-swap write to the store
first, then the in-memory swap, then the listeners (SDS pushes, bundle files, metrics).  Persist
before publish, so nothing is ever handed out that a restart would forget.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca_service.clock import Clock
from ca_service.config import CASettings
from ca_service.errors import NotReadyError, StorageError
from ca_service.pki.bundle import TrustBundle
from ca_service.pki.identity import SpiffeId, TrustDomain
from ca_service.pki.keys import PublicKey
from ca_service.pki.templates import CAKind, IssuerProfile, build_svid_for
from ca_service.pki.verify import verify_svid
from ca_service.rotation.minting import bootstrap_state
from ca_service.rotation.state import AuthorityState, CAEntry
from ca_service.storage.base import AUTHORITY_RECORD, AuthorityStore
from ca_service.storage.codec import decode_state, encode_state

log = logging.getLogger(__name__)

StateListener = Callable[[AuthorityState, AuthorityState], None]


@dataclass(frozen=True)
class IssuedSvid:
    """A signed X509-SVID with the chain to present (leaf first, root excluded) and the roots it verifies against."""

    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]
    issuer_key_id: str
    # PEM of chain[1:], shared by every SVID of one signer so that encoding a chain costs one leaf.
    tail_pem: bytes | None = None

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def not_after(self) -> dt.datetime:
        return self.leaf.not_valid_after_utc

    @property
    def not_before(self) -> dt.datetime:
        return self.leaf.not_valid_before_utc

    def chain_pem(self) -> bytes:
        """The chain as concatenated PEM, leaf first (what SDS ``tls_certificate.certificate_chain`` carries)."""
        tail = self.tail_pem
        if tail is None:
            tail = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain[1:])
        return self.leaf.public_bytes(serialization.Encoding.PEM) + tail


@dataclass(frozen=True)
class SigningContext:
    """Everything signing with the active intermediate of one state repeats, computed once per state."""

    state: AuthorityState
    signer: CAEntry
    profile: IssuerProfile
    key_id: str
    tail: tuple[x509.Certificate, ...]  # chain after the leaf: the signer, then any non-root CAs above it
    tail_pem: bytes
    roots: tuple[x509.Certificate, ...]

    @classmethod
    def of(cls, state: AuthorityState) -> SigningContext:
        """Raises: NotReadyError: if no signing intermediate is active or its key is not available."""
        signer = state.active(CAKind.INTERMEDIATE)
        if signer.key is None:
            raise NotReadyError("the signing intermediate's key is not available")
        roots = state.roots
        tail = (signer.cert, *[c for c in state.chain_above(signer) if c not in roots])
        return cls(state, signer, IssuerProfile.of(signer.cert, signer.key), signer.key_id, tail,
                   b"".join(c.public_bytes(serialization.Encoding.PEM) for c in tail), roots)


class Authority:
    """Holds and changes the CA state of ``trust_domain``; signs workload certificates."""

    def __init__(self, store: AuthorityStore, trust_domain: TrustDomain, settings: CASettings, clock: Clock) -> None:
        self._store = store
        self.trust_domain = trust_domain
        self.settings = settings
        self.clock = clock
        self._state: AuthorityState | None = None
        self._version: str | None = None
        self._listeners: list[StateListener] = []
        # A signer's chain is verified once against the roots (not per leaf): the leaf profile is fixed
        # by our template, the chain is what can go wrong (a rotation that published nothing).
        self._verified_signers: set[tuple[str, int]] = set()
        self._context: SigningContext | None = None
        # The bundle of one state, built once: SDS resolves it for every stream a bundle change pushes to.
        self._bundle: tuple[AuthorityState, TrustBundle] | None = None

    # ---------------------------------------------------------- state

    @property
    def state(self) -> AuthorityState:
        if self._state is None:
            raise NotReadyError("CA state is not loaded")
        return self._state

    @property
    def store_description(self) -> str:
        return self._store.describe()

    @property
    def loaded(self) -> bool:
        return self._state is not None

    def load(self) -> AuthorityState | None:
        """Load the persisted state if there is one; never creates anything."""
        record = self._store.read(AUTHORITY_RECORD)
        if record is None:
            return None
        state = decode_state(dict(record.data))
        if state.trust_domain != self.trust_domain:
            raise StorageError(
                f"the stored CA belongs to trust domain {state.trust_domain}, but this daemon is configured "
                f"for {self.trust_domain}; point data_dir elsewhere or fix trust_domain"
            )
        old, self._state, self._version = self._state, state, record.version
        if old is not None and old.revision != state.revision:
            self._notify(old, state)
        return state

    def load_or_bootstrap(self, initial: AuthorityState | None = None) -> tuple[AuthorityState, bool]:
        """Load the state, or create and persist ``initial`` (default: a new self-signed hierarchy).

        Returns the state and whether it was created now.  A later start loads it unchanged.
        """
        existing = self.load()
        if existing is not None:
            return existing, False
        now = self.clock.now()
        state = initial or bootstrap_state(
            self.trust_domain, algorithm=self.settings.key_algorithm, root_ttl=self.settings.root_ttl,
            intermediate_ttl=self.settings.intermediate_ttl, istiod_ttl=self.settings.istiod_intermediate_ttl,
            now=now, backdate=self.settings.backdate,
        )
        record = self._store.write(AUTHORITY_RECORD, encode_state(state), expected_version=None)
        self._state, self._version = state, record.version
        for entry in state.entries:
            log.info("CA created", extra=_entry_fields(entry))
        return state, True

    def commit(self, new: AuthorityState) -> AuthorityState:
        """Persist ``new`` with compare-and-swap, then make it current and tell the listeners.

        Raises:
            ConflictError: another writer changed the state first; call :meth:`load` and decide again.
            StorageError: the write failed; the previous state stays current.
        """
        old = self.state
        new = dataclasses.replace(new, revision=old.revision + 1)
        record = self._store.write(AUTHORITY_RECORD, encode_state(new), expected_version=self._version)
        self._state, self._version = new, record.version
        self._notify(old, new)
        return new

    def subscribe(self, listener: StateListener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _notify(self, old: AuthorityState, new: AuthorityState) -> None:
        for listener in list(self._listeners):
            try:
                listener(old, new)
            except Exception:
                # One broken consumer (a metrics hook, a file writer) must not stop SDS pushes.
                log.exception("state listener %r failed", listener)

    # ---------------------------------------------------------- signing

    def bundle(self) -> TrustBundle:
        """The current state's trust bundle; the same object until the state changes."""
        state = self.state
        cached = self._bundle
        if cached is None or cached[0] is not state:
            cached = self._bundle = (state, state.bundle())
        return cached[1]

    def signer(self, kind: CAKind = CAKind.INTERMEDIATE) -> CAEntry:
        return self.state.active(kind)

    def signing_context(self) -> SigningContext:
        """The cached :class:`SigningContext` of the current state (rebuilt when the state changes).

        Raises:
            NotReadyError: if no signing intermediate is active or its key is not available.
        """
        state = self.state
        context = self._context
        if context is None or context.state is not state:
            context = self._context = SigningContext.of(state)
        return context

    def issue_svid(
        self, spiffe_id: SpiffeId, public_key: PublicKey, *, ttl: dt.timedelta | None = None,
        now: dt.datetime | None = None,
    ) -> IssuedSvid:
        """Sign an X509-SVID for ``spiffe_id`` over ``public_key`` with the active signing intermediate.

        The caller must already have established that the requester is entitled to ``spiffe_id``.

        Raises:
            NotReadyError: if no signing intermediate is active or the identity is of another trust domain.
        """
        self.check_member(spiffe_id)
        now = now or self.clock.now()
        context = self.signing_context()
        leaf = build_svid_for(public_key, spiffe_id, context.profile, now=now, ttl=self.leaf_ttl(ttl),
                              backdate=self.settings.backdate, encoder=self.settings.leaf_encoder)
        return self.assemble_svid(spiffe_id, leaf, context, now)

    def check_member(self, spiffe_id: SpiffeId) -> None:
        if not spiffe_id.is_member_of(self.trust_domain):
            raise NotReadyError(f"this CA signs only for {self.trust_domain}, not for {spiffe_id}")

    def leaf_ttl(self, requested: dt.timedelta | None = None) -> dt.timedelta:
        return min(requested or self.settings.workload_ttl, self.settings.max_workload_ttl)

    def assemble_svid(
        self, spiffe_id: SpiffeId, leaf: x509.Certificate, context: SigningContext, now: dt.datetime
    ) -> IssuedSvid:
        """Wrap a leaf signed under ``context`` (here or in a signing-pool worker) into an :class:`IssuedSvid`."""
        chain = (leaf, *context.tail)
        self._check_signer_chain(context, chain, now)
        return IssuedSvid(spiffe_id, chain, context.roots, context.key_id, context.tail_pem)

    def _check_signer_chain(self, context: SigningContext, chain: tuple[x509.Certificate, ...],
                            now: dt.datetime) -> None:
        marker = (context.key_id, context.state.bundle_sequence)
        if marker in self._verified_signers:
            return
        verify_svid(chain[0], chain[1:], context.roots, now=now)
        self._verified_signers.add(marker)


def _entry_fields(entry: CAEntry) -> dict[str, object]:
    return {"kind": str(entry.kind), "serial": entry.serial, "key_id": entry.key_id,
            "not_after": entry.not_after.isoformat(), "slot": str(entry.state)}
