"""Assembly: the one place where concrete parts are built and wired, and the daemon's lifecycle.

Start-up phases run in order (state → signing services → listeners → scheduler) and stop in reverse,
so nothing accepts a request before the CA it needs exists, and readiness turns false first on stop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Protocol

from ca_service.adapters.cacerts_publisher import CacertsPublisher
from ca_service.adapters.collector import CollectorSchedule
from ca_service.adapters.first_issue import FirstIssueSigner
from ca_service.adapters.scheduler import RotationScheduler
from ca_service.adapters.signing_pool import SigningPool, SigningPoolComponent
from ca_service.clock import Clock, SystemClock
from ca_service.config import Settings, StorageBackend, replica_id
from ca_service.errors import ConflictError
from ca_service.federation.endpoint import BundleEndpoint
from ca_service.federation.files import BundleFilePublisher
from ca_service.federation.lastgood import LastGoodStore
from ca_service.federation.peers import Federation
from ca_service.process_limits import install_accept_error_handler, raise_open_file_limit
from ca_service.rotation.planner import RotationPolicy
from ca_service.rotation.state import AuthorityState
from ca_service.rpc.istio_ca_wiring import IstioCA, build_istio_ca
from ca_service.rpc.sds_listeners import SdsComponent
from ca_service.services.authority import Authority
from ca_service.services.compromise import CompromiseService
from ca_service.services.ports import AckTracker
from ca_service.services.reconciler import Reconciler
from ca_service.services.rotator import RotationService, RotatorPorts
from ca_service.services.state_changes import StateChange, StateReactions
from ca_service.services.trust import TrustStore
from ca_service.services.workloads import WorkloadRegistry
from ca_service.storage.base import AuthorityStore
from ca_service.storage.directory import DirectoryStore
from ca_service.telemetry import Telemetry
from ca_service.web.server import HttpSideport

log = logging.getLogger(__name__)


class Component(Protocol):
    """A part of the daemon with a lifecycle (a listener, the scheduler, a poller)."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class IstioObjectsReaction(Protocol):
    def on_state_change(self, change: StateChange) -> None: ...


def build_store(settings: Settings) -> AuthorityStore:
    if settings.storage.backend is StorageBackend.KUBERNETES:
        from ca_service.kube.client import build_api_client
        from ca_service.kube.store import KubernetesStore

        k = settings.storage.kubernetes
        return KubernetesStore(build_api_client(k.kubeconfig), k.namespace, k.secret_name)
    return DirectoryStore(settings.data_dir / "state")


def build_authority(settings: Settings, clock: Clock | None = None, store: AuthorityStore | None = None,
                    reactions: StateReactions | None = None) -> Authority:
    return Authority(store or build_store(settings), settings.domain, settings.ca, clock or SystemClock(),
                     reactions=reactions)


def register_reactions(reactions: StateReactions, *, trust: TrustStore | None = None,
                       cacerts: CacertsPublisher | None = None, sideport: HttpSideport | None = None,
                       endpoint: BundleEndpoint | None = None, pool: SigningPoolComponent | None = None,
                       sds: SdsComponent | None = None, istio_objects: IstioObjectsReaction | None = None) -> None:
    """THE list of what a CA state change sets off (commit here, load, or a replica's write), in order.

    1. trust store: our bundle changed -> its listeners run: SDS pushes (the watch hub), the bundle
       files, the trust gauges.  First, because a root rotation waits on SDS ACKs of the new bundle;
    2. istiod cacerts: the files follow the active istiod intermediate and the root set; with
       Kubernetes replicas, the leader's Istio objects (cacerts Secret, istio-ca-root-cert,
       trust-bundle) are queued for their one serial writer here too;
    3. side-port TLS: new roots are trusted for admin client certificates;
    4. serving certificates (bundle endpoint, SDS TLS listeners) are re-issued under a new signing
       intermediate (the side-port's is re-issued by 3);
    5. signing pool: workers are warmed up for a new signing intermediate (background thread);
    6. state metrics last: CA gauges and counts of minted CA certificates (they read, never feed back).
    A reaction that raises is logged and counted; the ones after it still run.
    """
    if trust is not None:
        reactions.add("trust-store", trust.on_state_change)
    if cacerts is not None:
        reactions.add("istiod-cacerts", cacerts.on_state_change)
    if istio_objects is not None:
        reactions.add("istio-objects", istio_objects.on_state_change)
    if sideport is not None:
        reactions.add("sideport-tls", sideport.on_state_change)
    if endpoint is not None:
        reactions.add("bundle-endpoint", endpoint.on_state_change)
    if sds is not None:
        reactions.add("sds-serving", sds.on_state_change)
    if pool is not None:
        reactions.add("signing-pool", pool.on_state_change)
    if sideport is not None:
        reactions.add("state-metrics", sideport.metrics.on_state_change)


class App:
    """The daemon: an authority plus the components that serve it."""

    def __init__(self, settings: Settings, *, clock: Clock | None = None, store: AuthorityStore | None = None) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        # One instance of each shared service per daemon; build_app wires the rest around them.
        self.telemetry = Telemetry()
        self.reactions = StateReactions(self.telemetry.state_reaction_failures)
        self.authority = build_authority(settings, self.clock, store, self.reactions)
        self.components: list[Component] = []
        self._started: list[Component] = []
        self.stopping = asyncio.Event()
        # Every bundle we deliver (own + federated peers); SDS, bundle files and the endpoint read it.
        self.trust = TrustStore(self.authority)
        self.registry = WorkloadRegistry(self.authority, settings.rotation, self.clock,
                                         key_algorithm=settings.ca.workload_key_algorithm, telemetry=self.telemetry,
                                         node_grace=settings.sds.node_grace)
        # Set by build_app; tests that build an App by hand may leave them unset.
        self.reconciler: Reconciler | None = None
        self.rotator: RotationService | None = None
        self.sds: SdsComponent | None = None
        self.istio_ca: IstioCA | None = None
        # Run first thing in stop(), before any component stops: readiness turns false while every
        # listener still answers, so load balancers move away before connections are refused.
        self.shutdown_hooks: list[Callable[[], None]] = []

    async def start(self) -> None:
        raise_open_file_limit()
        install_accept_error_handler(self.telemetry.connections_refused)
        state, created = await self._load_or_bootstrap()
        log.info(
            "CA %s", "bootstrapped" if created else "loaded",
            extra={"trust_domain": str(state.trust_domain), "mode": str(state.mode),
                   "store": self.authority.store_description},
        )
        for component in self.components:
            await component.start()
            self._started.append(component)
            log.debug("started %s", component.name)
        log.info("ca-service ready", extra={"trust_domain": self.settings.trust_domain})

    async def _load_or_bootstrap(self) -> tuple[AuthorityState, bool]:
        """In a worker thread: a Kubernetes store call can take seconds, and replicas start together."""
        try:
            return await asyncio.to_thread(self.authority.load_or_bootstrap)
        except ConflictError:
            # Another replica created the CA between our read and our create-if-absent: take its CA.
            state = await asyncio.to_thread(self.authority.load)
            if state is None:
                raise
            return state, False

    async def stop(self) -> None:
        self.stopping.set()
        for hook in self.shutdown_hooks:
            hook()
        while self._started:
            component = self._started.pop()
            try:
                await component.stop()
            except Exception:
                log.exception("stopping %s failed", component.name)
        log.info("ca-service stopped")

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.start()
            await stop.wait()
            log.info("signal received, shutting down")
        finally:
            await self.stop()


def build_app(settings: Settings, *, clock: Clock | None = None, store: AuthorityStore | None = None,
              acks: AckTracker | None = None) -> App:
    """Wire the daemon for ``settings``: every concrete component is constructed here and nowhere else.

    ``acks`` overrides the SDS server's ACK tracker as the root rotation gate (tests use a fake).
    """
    cluster = None
    if store is None and settings.storage.backend is StorageBackend.KUBERNETES:
        from ca_service.kube.replication import Replication

        cluster = Replication(settings, replica_id(settings))
        store = cluster.store
    app = App(settings, clock=clock, store=store)
    # The Istio CA API rides on every SDS listener's server; its serving certificates carry tls.dns_names.
    app.istio_ca = istio = build_istio_ca(settings, app.authority, app.registry, app.telemetry, app.clock)
    app.shutdown_hooks.append(istio.journal.close)
    pool = build_signing_pool(settings, app)
    # A stream's first SVID is signed on the pool too, batched per loop turn (in process while it is cold).
    sds = SdsComponent(settings.grpc, registry=app.registry, trust=app.trust, telemetry=app.telemetry,
                       limits=settings.sds, services=[istio.service.register],
                       first_issue=FirstIssueSigner(pool.pool) if pool is not None else None)
    app.sds = sds
    if cluster is not None:
        cluster.build(app.authority, app.trust, sds.hub, app.telemetry.registry, app.clock)
        acks = acks or cluster.acks
    app.reconciler = Reconciler(app.authority, app.registry, RotationPolicy.from_settings(settings), app.telemetry,
                                acks=acks or sds.hub, clock=app.clock, signer=pool.pool if pool else None,
                                leader=cluster.is_leader if cluster is not None else None)
    app.rotator = RotationService.of(app.reconciler)
    # Taint and revoke use the same ports as forced rotations: one lock, one commit path.
    compromise = CompromiseService(RotatorPorts.of(app.reconciler))
    sideport = HttpSideport(settings, app.authority, app.telemetry, app.clock, registry=app.registry,
                            trust=app.trust, rotator=app.rotator, ledger=istio.ledger, compromise=compromise,
                            readiness_checks={"grpc_serving": lambda: len(sds.bound_addresses) == len(settings.grpc)})
    app.shutdown_hooks.append(sideport.begin_shutdown)
    # Start order: side-port first (it stops last, so /readyz says 503 while the others drain), then
    # istiod's cacerts (on disk before any rotation), federation (peers restored from their last good
    # bundles before SDS hands out a validation context), SDS, and the scheduler last (nothing
    # rotates before every consumer of a rotation is listening).
    app.components.append(sideport)
    cacerts = None
    if settings.istiod.cacerts_dir is not None:
        cacerts = CacertsPublisher(app.authority, settings.istiod.cacerts_dir, app.telemetry, app.clock)
        app.components.append(cacerts)
    federation = build_federation(settings, app)
    app.components.extend(federation)
    app.components.append(sds)
    if cluster is not None:
        # The state watch, this replica's ACK frontier and the frontier reader, the election, then the
        # leader's Istio object writer: all before the scheduler, which mutates only while leading.
        app.components.extend(cluster.components)
        cluster.describe(sideport.readiness)
    if pool is not None:
        app.components.append(pool)  # stops after the scheduler, so no renewal runs on a closed pool
    # Full garbage collections on a schedule, in a quiet moment, never in the middle of a push storm.
    collector = CollectorSchedule(app.clock, lambda: sds.hub.acks.pushes,
                                  observe=app.telemetry.gc_full_pass_seconds.observe)
    # Push waves: a re-issue storm (WorkloadRegistry.wave), each trust bundle change (to every ROOTCA stream).
    app.registry.on_wave = collector.wave_started
    app.trust.subscribe(lambda _changed: collector.wave_started())
    app.components.append(collector)
    app.components.append(RotationScheduler(app.reconciler, settings.rotation, app.telemetry))
    endpoint = next((c for c in federation if isinstance(c, BundleEndpoint)), None)
    register_reactions(app.reactions, trust=app.trust, cacerts=cacerts, sideport=sideport, endpoint=endpoint,
                       sds=sds, pool=pool, istio_objects=cluster.istio_objects if cluster else None)
    return app


def build_signing_pool(settings: Settings, app: App) -> SigningPoolComponent | None:
    """The process pool for renewal storms, unless ``ca.signing_workers`` is 0 (sign in process)."""
    if settings.ca.signing_workers == 0:
        return None
    return SigningPoolComponent(SigningPool(app.authority.issuer, workers=settings.ca.signing_workers))


def build_federation(settings: Settings, app: App) -> list[Component]:
    """Bundle files first (they must reflect what federation restores from disk), then the peer
    pollers (restore last-good bundles, then poll), then our bundle endpoint."""
    components: list[Component] = [
        BundleFilePublisher(app.trust, settings.bundle_dir),
        Federation(settings.federation.peers, app.trust, LastGoodStore(settings.data_dir / "federation"),
                   app.telemetry, app.clock),
    ]
    if settings.bundle_endpoint.enabled:
        components.append(BundleEndpoint(settings.bundle_endpoint, app.trust, app.authority, app.clock,
                                         refused=app.telemetry.connections_refused))
    return components
