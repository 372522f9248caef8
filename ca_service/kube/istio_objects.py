"""The leader's writer of the Istio objects: ``cacerts`` Secret, ``istio-ca-root-cert`` ConfigMaps, ``trust-bundle``.

One serial task writes the *current* content whenever something changed (a state change, a peer
bundle, a leadership change) and only while this replica leads.  Serial and level-triggered: a burst
of changes during a root rotation collapses into one write of the latest content, two writes of the
same object never race each other, and a failed write (API outage) is retried with what is current
then, never with what was current when it failed.

The root-cert controller (watches on namespaces and ConfigMaps) runs only while leading: a new
:class:`RootCertPublisher` on every election (a stopped watch does not restart), stopped on losing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from ca_service.errors import CAServiceError
from ca_service.kube.cacerts_secret import CacertsSecretWriter, cacerts_files
from ca_service.kube.root_cert import RootCertPublisher
from ca_service.kube.trust_bundle import TrustBundleWriter
from ca_service.pki.identity import TrustDomain
from ca_service.services.authority import Authority
from ca_service.services.state_changes import StateChange
from ca_service.services.trust import TrustStore

log = logging.getLogger(__name__)

# A failed write is retried this much later: soon enough that istiod sees a rotation within seconds of
# the API server's return, rare enough (one round of three writes) not to load a recovering server.
RETRY_DELAY = 2.0


class IstioObjects:
    """Lifecycle component; reactions :meth:`on_state_change`, :meth:`on_trust` and :meth:`on_leadership`."""

    name = "istio-objects"

    def __init__(self, authority: Authority, trust: TrustStore, is_leader: Callable[[], bool], *,
                 cacerts: CacertsSecretWriter | None = None,
                 root_cert: Callable[[], RootCertPublisher] | None = None,
                 trust_bundle: TrustBundleWriter | None = None) -> None:
        self._authority = authority
        self._trust = trust
        self._is_leader = is_leader
        self._cacerts = cacerts
        self._new_root_cert = root_cert
        self._trust_bundle = trust_bundle
        self.root_cert: RootCertPublisher | None = None  # running only while leading
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self.rounds = 0  # triggers handled, whether or not this replica led (tests wait on these)
        self.writes = 0  # rounds that wrote every object

    async def start(self) -> None:
        self._unsubscribe = self._trust.subscribe(self.on_trust)
        self._task = asyncio.create_task(self._run(), name="istio-objects")
        self._dirty.set()

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._stop_root_cert()

    # ------------------------------------------------------------ triggers (in the loop)

    def on_state_change(self, change: StateChange) -> None:
        self._dirty.set()

    def on_trust(self, changed: frozenset[TrustDomain]) -> None:
        self._dirty.set()

    def on_leadership(self) -> None:
        self._dirty.set()

    # ------------------------------------------------------------ the one writer

    async def _run(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self._round()
            finally:
                self.rounds += 1

    async def _round(self) -> None:
        if not self._is_leader():
            await self._stop_root_cert()
            return
        try:
            await self._write_all()
        except (CAServiceError, ValueError) as exc:
            log.warning("Istio objects not written; retrying", extra={"cause": str(exc)[:300],
                                                                      "retry_in_s": RETRY_DELAY})
            asyncio.get_running_loop().call_later(RETRY_DELAY, self._dirty.set)
            return
        self.writes += 1

    async def _write_all(self) -> None:
        state = self._authority.state
        if self._cacerts is not None:
            files = cacerts_files(state)
            if files is None:
                log.warning("no istiod intermediate with a key; cacerts Secret not written")
            else:
                await self._cacerts.apply(files)
        if self._new_root_cert is not None:
            if self.root_cert is None:
                self.root_cert = self._new_root_cert()
                await self.root_cert.start()
            self.root_cert.set_root_cert(self._trust.own_bundle().to_pem().decode())
        if self._trust_bundle is not None:
            bundles = {td.name: bundle.to_pem().decode() for td, bundle in self._trust.bundles().items()}
            await self._trust_bundle.apply(bundles, self._trust.own.name)

    async def _stop_root_cert(self) -> None:
        publisher, self.root_cert = self.root_cert, None
        if publisher is not None:
            await publisher.stop()
