"""The authority: the loaded CA state of one trust domain, the only writer of it, and the signer of SVIDs.

The state changes in three ways, and each ends in the same :class:`StateChange` event published to
:attr:`Authority.reactions` (SDS pushes, bundle files, cacerts, metrics... wired in ``app.py``):

* :meth:`Authority.commit`: a compare-and-swap write to the store first, then the in-memory swap
  (cause COMMITTED).  Persist before publish, so nothing is handed out that a restart would forget;
* :meth:`Authority.load`: re-read from the store (cause LOADED);
* :meth:`Authority.receive`: a newer record another replica wrote, delivered by a watch (cause
  REPLICATED by default).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
from collections.abc import Callable

from ca_service.clock import Clock
from ca_service.config import CASettings
from ca_service.errors import NotReadyError, StorageError
from ca_service.pki.bundle import TrustBundle
from ca_service.pki.identity import SpiffeId, TrustDomain
from ca_service.pki.keys import PublicKey
from ca_service.pki.templates import CAKind
from ca_service.rotation.minting import bootstrap_state
from ca_service.rotation.state import AuthorityState, CAEntry
from ca_service.services.issuer import IssuancePolicy, Issuer

# Re-exported: IssuedSvid and SigningContext lived here before the Issuer existed.
from ca_service.services.issuer import IssuedSvid as IssuedSvid
from ca_service.services.issuer import SigningContext as SigningContext
from ca_service.services.state_changes import ChangeCause, StateChange, StateReactions
from ca_service.storage.base import AUTHORITY_RECORD, AuthorityStore, Record
from ca_service.storage.codec import decode_state, encode_state

log = logging.getLogger(__name__)

StateListener = Callable[[AuthorityState, AuthorityState], None]


class Authority:
    """Holds and changes the CA state of ``trust_domain``; signs workload certificates."""

    def __init__(self, store: AuthorityStore, trust_domain: TrustDomain, settings: CASettings, clock: Clock, *,
                 reactions: StateReactions | None = None) -> None:
        self._store = store
        self.trust_domain = trust_domain
        self.settings = settings
        self.clock = clock
        self._state: AuthorityState | None = None
        self._version: str | None = None
        # Where every StateChange goes; app.register_reactions fills it, in order.
        self.reactions = reactions or StateReactions()
        # The one issuer of leaves signed with this state's active intermediate.
        self.issuer = Issuer(self, IssuancePolicy.of(settings))
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
    def version(self) -> str | None:
        """The store's version of the current state (a Secret's resourceVersion), None before loading."""
        return self._version

    @property
    def loaded(self) -> bool:
        return self._state is not None

    def load(self) -> AuthorityState | None:
        """Load the persisted state if there is one; never creates anything.

        Raises:
            StorageError: if the stored CA belongs to another trust domain.
        """
        return self._take_loaded(self._store.read(AUTHORITY_RECORD))

    async def load_async(self) -> AuthorityState | None:
        """:meth:`load` with the store read in a worker thread (a Kubernetes store call can take seconds in an
        API outage; the event loop keeps serving SDS meanwhile)."""
        return self._take_loaded(await asyncio.to_thread(self._store.read, AUTHORITY_RECORD))

    def _take_loaded(self, record: Record | None) -> AuthorityState | None:
        if record is None:
            return None
        state = self._decode(record)
        old, self._state, self._version = self._state, state, record.version
        if old is not None and old.revision != state.revision:
            self._publish(old, state, ChangeCause.LOADED)
        return state

    def receive(self, record: Record, *, cause: ChangeCause = ChangeCause.REPLICATED) -> bool:
        """Take a record of the state that someone else wrote (a watch event from another replica).

        Decodes it, checks the trust domain, ignores it unless its revision is newer than ours, then
        swaps it in and publishes the change.  Returns whether it was taken.

        Raises:
            StorageError: if the record does not decode or belongs to another trust domain.
        """
        state = self._decode(record)
        old = self._state
        if old is not None and state.revision <= old.revision:
            return False
        self._state, self._version = state, record.version
        if old is not None:
            self._publish(old, state, cause)
        return True

    def _decode(self, record: Record) -> AuthorityState:
        state = decode_state(dict(record.data))
        if state.trust_domain != self.trust_domain:
            raise StorageError(
                f"the stored CA belongs to trust domain {state.trust_domain}, but this daemon is configured "
                f"for {self.trust_domain}; point data_dir elsewhere or fix trust_domain"
            )
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
        self._publish(old, new, ChangeCause.COMMITTED)
        return new

    async def commit_async(self, new: AuthorityState) -> AuthorityState:
        """:meth:`commit` with the store write in a worker thread; the swap and the reactions run in the loop.

        While the write is in flight the watch may already have delivered it (:meth:`receive`, same
        revision): then the received copy stays current and nothing is published twice.

        Raises:
            ConflictError, StorageError: as :meth:`commit`.
        """
        old = self.state
        new = dataclasses.replace(new, revision=old.revision + 1)
        record = await asyncio.to_thread(self._store.write, AUTHORITY_RECORD, encode_state(new),
                                         expected_version=self._version)
        current = self.state
        if current.revision >= new.revision:
            return current
        self._state, self._version = new, record.version
        self._publish(current, new, ChangeCause.COMMITTED)
        return new

    def subscribe(self, listener: StateListener) -> Callable[[], None]:
        """Add an (old, new) listener at the end of :attr:`reactions` (for tests and tools; the daemon
        registers its reactions in ``app.register_reactions``)."""
        return self.reactions.add(getattr(listener, "__qualname__", repr(listener)),
                                  lambda change: listener(change.old, change.new))

    def _publish(self, old: AuthorityState, new: AuthorityState, cause: ChangeCause) -> None:
        self.reactions.publish(StateChange(old, new, cause))

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
        """:meth:`Issuer.issue` of :attr:`issuer` at the authority clock's ``now`` (a shortcut for tools and tests)."""
        return self.issuer.issue(spiffe_id, public_key, ttl=ttl, now=now or self.clock.now())


def _entry_fields(entry: CAEntry) -> dict[str, object]:
    return {"kind": str(entry.kind), "serial": entry.serial, "key_id": entry.key_id,
            "not_after": entry.not_after.isoformat(), "slot": str(entry.state)}
