"""Live workload SVIDs, one per (node, SPIFFE ID), renewed when due.

Each Envoy node gets its own key pair, never shared with another node of the same identity.  A
node's ``default`` and ``ROOTCA`` streams and a reconnect within the certificate's lifetime reuse the
same SVID instead of minting a new one.  Keys stay in memory only.

Renewal times sit in one heap, so a tick with nothing due costs O(1) however many SVIDs are live
(no per-SVID timer or job).
"""

from __future__ import annotations

import datetime as dt
import functools
import heapq
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

from ca_service.clock import Clock
from ca_service.config import RotationSettings
from ca_service.pki.identity import SpiffeId
from ca_service.pki.keys import KeyAlgorithm, PrivateKey, generate_private_key, load_private_key, private_key_to_pem
from ca_service.rotation.renewal import renewal_time
from ca_service.services.authority import Authority
from ca_service.services.issuer import IssuedSvid, Issuer
from ca_service.services.single_flight import SingleFlight
from ca_service.services.workload_expiry import ExpiryIndex, entry_for
from ca_service.telemetry import Telemetry

if TYPE_CHECKING:
    from prometheus_client import Counter

log = logging.getLogger(__name__)

WorkloadKey = tuple[str, SpiffeId]  # (node id, SPIFFE ID)
# Mirrors settings.SdsLimits.node_grace: an Envoy restart or a reconnect to another replica and back.
DEFAULT_NODE_GRACE = dt.timedelta(minutes=5)
WorkloadListener = Callable[["WorkloadCert"], None]


class SignedSvid(NamedTuple):
    key_pem: bytes  # PKCS#8 PEM of the new private key
    svid: IssuedSvid
    seconds: float  # key generation + signing time, wherever it ran


# Gets a batch's chunks as they are signed: (index of the chunk's first identity in the batch, its SVIDs).
ChunkSink = Callable[[int, Sequence[SignedSvid]], None]


class BatchSigner(Protocol):
    """Signs many identities at once, e.g. on a process pool (``adapters.signing_pool.SigningPool``).

    ``on_chunk``, when given, is called on the event loop with each part of the batch as it is signed
    (every identity exactly once, before ``issue_many`` returns) and never after ``issue_many`` raised.
    """

    async def issue_many(self, spiffe_ids: Sequence[SpiffeId], *, now: dt.datetime,
                         on_chunk: ChunkSink | None = None) -> list[SignedSvid]:
        ...


@dataclass(frozen=True)
class WorkloadCert:
    node_id: str
    spiffe_id: SpiffeId
    # PKCS#8 PEM, the form SDS sends.  Held as PEM (not a key object) because a signing-pool worker
    # hands it over that way; parsing it in the event loop's process would cost a third of a storm.
    key_pem: bytes
    svid: IssuedSvid
    renew_at: dt.datetime
    generation: int  # increases on every re-issue for this (node, identity); used as the resource version

    @functools.cached_property
    def key(self) -> PrivateKey:
        """The private key object, parsed on first use."""
        return load_private_key(self.key_pem)

    def renewing_at(self, at: dt.datetime) -> WorkloadCert:
        """This certificate with another renewal time (a parsed key object is not carried over)."""
        # A forced rotation moves every workload once (5,000 calls for 5,000 nodes): dataclasses.replace
        # (10 us, __init__ field by field after looking the fields up) was a tenth of the event loop's share.
        return WorkloadCert(self.node_id, self.spiffe_id, self.key_pem, self.svid, at, self.generation)

    @property
    def serial(self) -> str:
        return self.svid.serial

    @property
    def workload_key(self) -> WorkloadKey:
        return (self.node_id, self.spiffe_id)

    def __repr__(self) -> str:  # never print the key
        return (f"WorkloadCert(node_id={self.node_id!r}, spiffe_id='{self.spiffe_id}', "
                f"serial={self.svid.serial}, generation={self.generation})")


class WorkloadRegistry:
    """Issues, caches and renews workload SVIDs; tells listeners about every new one."""

    def __init__(self, authority: Authority, rotation: RotationSettings, clock: Clock, *,
                 key_algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256, rng: random.Random | None = None,
                 telemetry: Telemetry | None = None, node_grace: dt.timedelta = DEFAULT_NODE_GRACE) -> None:
        self._authority = authority
        self._issuer = authority.issuer
        self._node_grace = node_grace
        # Nodes with SVIDs and no open stream, since when (the SDS hub reports it); forgotten after grace.
        self._idle_since: dict[str, dt.datetime] = {}
        self._by_node: dict[str, set[SpiffeId]] = {}
        self._telemetry = telemetry
        self._issued: Counter | None = None  # the labelled child of telemetry.issued, once looked up
        self._rotation = rotation
        self._clock = clock
        self._key_algorithm = key_algorithm
        # The renewal jitter spreads load; it guards no secret, so the default generator (seeded from
        # os.urandom) does, where SystemRandom made a system call per certificate installed.
        self._rng = rng or random.Random()  # noqa: S311  (load spreading, not a secret)
        self._certs: dict[WorkloadKey, WorkloadCert] = {}
        # Kept in step with _certs so /metrics reads aggregates without walking every SVID.
        self.expiry = ExpiryIndex()
        # (renew_at, token, key): a heap entry is live only while its token is the key's current one,
        # so re-issuing or rescheduling just pushes a new entry and the old one is skipped when popped.
        self._heap: list[tuple[dt.datetime, int, WorkloadKey]] = []
        self._tokens: dict[WorkloadKey, int] = {}
        self._next_token = 0
        self._listeners: list[WorkloadListener] = []
        self.on_wave: Callable[[], None] | None = None  # told by wave(); the daemon's collector schedule
        # Workloads whose pending renewal an operator forced (spread over a window): the renewal is
        # then counted and logged as forced, not scheduled.  Cleared by the next certificate.
        self._forced: set[WorkloadKey] = set()
        self._last_due: dt.datetime | None = None  # the ``now`` of the previous due() call
        # First issues signing off the event loop, one per workload: a node's streams that ask at once share it.
        self._obtaining: SingleFlight[WorkloadKey, WorkloadCert] = SingleFlight()

    @property
    def issuer(self) -> Issuer:
        return self._issuer

    @property
    def clock(self) -> Clock:
        return self._clock

    def __len__(self) -> int:
        return len(self._certs)

    def __iter__(self) -> Iterator[WorkloadCert]:
        return iter(list(self._certs.values()))

    def get(self, node_id: str, spiffe_id: SpiffeId) -> WorkloadCert | None:
        return self._certs.get((node_id, spiffe_id))

    def subscribe(self, listener: WorkloadListener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def wave(self) -> None:
        """A storm is under way: a forced re-issue is being spread, a chunk of :meth:`reissue_many` installed."""
        if self.on_wave is not None:
            try:
                self.on_wave()
            except Exception:  # the storm goes on: only the collector schedule listens
                log.exception("wave listener failed")

    def current(self, node_id: str, spiffe_id: SpiffeId) -> WorkloadCert | None:
        """The node's SVID for ``spiffe_id`` if it is valid now.

        Valid now, not merely unexpired: after the wall clock stepped back, an SVID issued before the
        step may not be valid yet, and a peer would refuse it.
        """
        now = self._clock.now()
        current = self._certs.get((node_id, spiffe_id))
        return current if current is not None and current.svid.not_before <= now < current.svid.not_after else None

    def get_or_issue(self, node_id: str, spiffe_id: SpiffeId) -> WorkloadCert:
        """The node's current SVID for ``spiffe_id``; issued now, in this thread, if it has none valid."""
        current = self.current(node_id, spiffe_id)
        if current is not None:
            return current
        return self._issue(node_id, spiffe_id, self._clock.now(), generation=self._next_generation(node_id, spiffe_id))

    async def obtain(self, node_id: str, spiffe_id: SpiffeId, *, signer: BatchSigner | None = None) -> WorkloadCert:
        """:meth:`get_or_issue` for the event loop: a missing SVID is signed by ``signer`` (the pool), so the
        loop keeps serving while the key is made and signed.  Without a signer, or when it fails (a cold or
        broken pool), it is signed here.  Concurrent calls for one workload share one signing.

        Raises:
            CAServiceError: as :meth:`get_or_issue` (the CA cannot sign, a foreign trust domain).
        """
        current = self.current(node_id, spiffe_id)
        if current is not None:
            return current
        if signer is None:
            return self.get_or_issue(node_id, spiffe_id)
        # A stream that goes away does not cancel the signing its node's other streams wait on.
        return await self._obtaining.run((node_id, spiffe_id), lambda: self._sign_first(node_id, spiffe_id, signer))

    async def _sign_first(self, node_id: str, spiffe_id: SpiffeId, signer: BatchSigner) -> WorkloadCert:
        now = self._clock.now()
        try:
            [(key_pem, svid, seconds)] = await signer.issue_many([spiffe_id], now=now)
        except Exception as exc:
            # The in-process path raises the CA's own error if there is one (not ready, foreign domain).
            log.debug("first issue falls back to in-process signing", extra={"error": type(exc).__name__})
            return self.get_or_issue(node_id, spiffe_id)
        self._count(seconds)
        installed = self.current(node_id, spiffe_id)
        if installed is not None:  # a renewal or an in-process issue landed while the pool signed
            return installed
        return self._install(node_id, spiffe_id, key_pem, svid, now,
                             generation=self._next_generation(node_id, spiffe_id))

    def _next_generation(self, node_id: str, spiffe_id: SpiffeId) -> int:
        previous = self._certs.get((node_id, spiffe_id))
        return previous.generation + 1 if previous is not None else 1

    def reissue(self, node_id: str, spiffe_id: SpiffeId, *, reason: str) -> WorkloadCert:
        """A new key and certificate for a known workload, pushed to listeners."""
        cert = self._issue(node_id, spiffe_id, self._clock.now(), generation=self._next_generation(node_id, spiffe_id))
        log.info("workload certificate re-issued",
                 extra={"spiffe_id": str(spiffe_id), "node": node_id, "reason": reason, "serial": cert.serial})
        return cert

    async def reissue_many(self, keys: Sequence[WorkloadKey], *, reason: str, signer: BatchSigner | None = None,
                           installed: list[WorkloadCert] | None = None) -> list[WorkloadCert]:
        """New keys and certificates for many workloads (a renewal tick, a forced rotation), pushed to listeners.

        With ``signer`` (a signing pool) the keys are made and signed on every core while the event loop
        stays free; without it they are signed here, one after the other.  A workload forgotten while the
        pool signed (its node disconnected) is not brought back: its new certificate is dropped.  Each chunk
        the pool signs is installed (and pushed) as soon as it is back, while the workers sign the rest.

        Returns the new certificates in the order of ``keys`` (forgotten workloads left out); ``installed``,
        if given, receives each as it is installed, so a caller still knows them when this raises.

        Raises:
            CAServiceError: the signer failed; the chunks signed before the failure are installed (their
                generation moved on), the others were not.
        """
        now = self._clock.now()
        if signer is None:
            self.wave()
            return [self.reissue(node_id, spiffe_id, reason=reason) for node_id, spiffe_id in keys]
        placed: list[WorkloadCert | None] = [None] * len(keys)

        def install(start: int, chunk: Sequence[SignedSvid]) -> None:
            self.wave()
            for index, (key_pem, svid, seconds) in enumerate(chunk, start):
                node_id, spiffe_id = keys[index]
                self._count(seconds)  # signed, whether or not it is installed
                current = self._certs.get((node_id, spiffe_id))
                if current is None:
                    continue
                cert = self._install(node_id, spiffe_id, key_pem, svid, now, generation=current.generation + 1)
                placed[index] = cert
                if installed is not None:
                    installed.append(cert)

        try:
            await signer.issue_many([spiffe_id for _, spiffe_id in keys], now=now, on_chunk=install)
        finally:
            done = [cert for cert in placed if cert is not None]
            log.info("workload certificates re-issued", extra={"count": len(done), "reason": reason})
        return done

    def _issue(self, node_id: str, spiffe_id: SpiffeId, now: dt.datetime, *, generation: int) -> WorkloadCert:
        started = time.perf_counter()
        key = generate_private_key(self._key_algorithm)
        svid = self._issuer.issue(spiffe_id, key.public_key(), now=now)
        self._count(time.perf_counter() - started)
        cert = self._install(node_id, spiffe_id, private_key_to_pem(key), svid, now, generation=generation)
        cert.__dict__["key"] = key  # seed the cached property: no need to parse the PEM just made
        return cert

    def _count(self, seconds: float) -> None:
        if self._telemetry is not None:
            if self._issued is None:  # looked up on first use (not at start: no zero series before any issue)
                self._issued = self._telemetry.issued.labels(kind="workload",
                                                             trust_domain=self._authority.trust_domain.name)
            self._issued.inc()
            self._telemetry.signing_seconds.observe(seconds)

    def _install(self, node_id: str, spiffe_id: SpiffeId, key_pem: bytes, svid: IssuedSvid, now: dt.datetime, *,
                 generation: int) -> WorkloadCert:
        renew_at = renewal_time(svid.not_before, svid.not_after, fraction=self._rotation.renew_fraction,
                                jitter_fraction=self._rotation.jitter_fraction, draw=self._rng.random())
        cert = WorkloadCert(node_id, spiffe_id, key_pem, svid, max(renew_at, now), generation)
        previous = self._certs.get((node_id, spiffe_id))
        if previous is not None:
            self.expiry.remove(entry_for(previous))
        self._certs[(node_id, spiffe_id)] = cert
        self._by_node.setdefault(node_id, set()).add(spiffe_id)
        self.expiry.add(entry_for(cert))
        self._forced.discard(cert.workload_key)
        self._schedule(cert.workload_key, cert.renew_at)
        for listener in list(self._listeners):
            try:
                listener(cert)
            except Exception:
                log.exception("workload listener %r failed", listener)
        return cert

    # ------------------------------------------------------------ node liveness (NodeTracker)

    def node_connected(self, node_id: str) -> None:
        self._idle_since.pop(node_id, None)

    def node_disconnected(self, node_id: str) -> None:
        if node_id in self._by_node:  # a node that holds nothing has nothing to forget
            self._idle_since[node_id] = self._clock.now()

    def forget_idle_nodes(self, now: dt.datetime) -> list[str]:
        """Drop every SVID of nodes without a stream for longer than the grace period; returns their ids."""
        gone = [n for n, since in self._idle_since.items() if now - since >= self._node_grace]
        for node_id in gone:
            for spiffe_id in list(self._by_node.get(node_id, ())):
                self.forget(node_id, spiffe_id)
            self._idle_since.pop(node_id, None)
        if gone:
            if self._telemetry is not None:
                self._telemetry.nodes_forgotten.inc(len(gone))
            log.info("forgot disconnected nodes", extra={"count": len(gone),
                                                         "grace_s": self._node_grace.total_seconds()})
        return gone

    def due(self, now: dt.datetime) -> list[WorkloadCert]:
        """Certificates whose renewal time has come (stale heap entries of re-issued ones are dropped).

        Nodes idle past their grace period are forgotten first, so they are never renewed again.
        If the clock went back since the last call (an NTP step, a VM restored from a snapshot), SVIDs
        issued before the step that are not valid yet are due now as well.
        """
        self.forget_idle_nodes(now)
        if self._last_due is not None and now < self._last_due:
            self._reschedule_not_yet_valid(now)
        self._last_due = now
        out = []
        while self._heap and self._heap[0][0] <= now:
            _, token, key = heapq.heappop(self._heap)
            if self._tokens.get(key) == token:
                del self._tokens[key]
                out.append(self._certs[key])
        return out

    def _reschedule_not_yet_valid(self, now: dt.datetime) -> None:
        # O(live SVIDs), but only on a backward clock step, which is rare.
        future = [c for c in self._certs.values() if c.svid.not_before > now]
        for cert in future:
            self.reschedule(cert, now)
        if future:
            log.warning("clock went back: SVIDs not valid yet are renewed now", extra={"count": len(future)})

    def next_renewal(self) -> dt.datetime | None:
        while self._heap:
            at, token, key = self._heap[0]
            if self._tokens.get(key) == token:
                return at
            heapq.heappop(self._heap)
        return None

    def _schedule(self, key: WorkloadKey, at: dt.datetime) -> None:
        self._next_token += 1
        self._tokens[key] = self._next_token
        heapq.heappush(self._heap, (at, self._next_token, key))

    def forget(self, node_id: str, spiffe_id: SpiffeId) -> None:
        """Drop a workload nobody streams any more (its heap entry goes stale and is skipped)."""
        gone = self._certs.pop((node_id, spiffe_id), None)
        if gone is not None:
            self.expiry.remove(entry_for(gone))
        ids = self._by_node.get(node_id)
        if ids is not None:
            ids.discard(spiffe_id)
            if not ids:
                del self._by_node[node_id]
                self._idle_since.pop(node_id, None)
        self._tokens.pop((node_id, spiffe_id), None)
        self._forced.discard((node_id, spiffe_id))

    def reschedule(self, cert: WorkloadCert, at: dt.datetime, *, forced: bool | None = None) -> None:
        """Move a certificate's renewal (forced rotations spread over a window use this).

        ``forced`` marks (True) or unmarks (False) the renewal as an operator's; None keeps the mark
        (a failed renewal retried later is still what it was).
        """
        self._certs[cert.workload_key] = cert.renewing_at(at)
        self._schedule(cert.workload_key, at)
        if forced is True:
            self._forced.add(cert.workload_key)
        elif forced is False:
            self._forced.discard(cert.workload_key)

    def is_forced(self, cert: WorkloadCert) -> bool:
        """Whether ``cert``'s pending renewal was forced by an operator (see :meth:`reschedule`)."""
        return cert.workload_key in self._forced
