"""The Kubernetes parts of one replica, built for ``storage.backend: kubernetes`` (``app.build_app`` wires them).

Every replica: the state Secret (store) and its watch (records other replicas committed arrive as
REPLICATED state changes), its own ACK-frontier Lease, and the frontier reader.  One replica at a time,
the holder of the leader Lease: the CA pass of the reconciler (bootstrap steps, rotations) and the
Istio object writers.  One ``ApiClient`` for all of them (one connection pool, one credential).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from ca_service.clock import Clock
from ca_service.config import Settings
from ca_service.kube.cacerts_secret import CacertsSecretWriter
from ca_service.kube.client import build_api_client
from ca_service.kube.frontier import ClusterAckTracker, FrontierPublisher, FrontierReader, LocalFrontier
from ca_service.kube.istio_objects import IstioObjects
from ca_service.kube.leader import LeaderElector, LeaseTimings
from ca_service.kube.objects import KubeMetrics
from ca_service.kube.root_cert import RootCertPublisher
from ca_service.kube.store import KubernetesStore
from ca_service.kube.trust_bundle import TrustBundleWriter
from ca_service.kube.watch import SecretWatch
from ca_service.services.authority import Authority
from ca_service.services.ports import AckTracker
from ca_service.services.trust import TrustStore
from ca_service.storage.base import Record
from ca_service.web.health import Readiness

log = logging.getLogger(__name__)

# How often this replica's frontier is compared with its last record (written only when it changed),
# and how often the frontiers are read: the cluster-wide gate opens about two seconds after the last
# ACK, against a root_min_propagation of minutes, for one small read per second per replica.
FRONTIER_CHECK = dt.timedelta(seconds=1)


class StreamFrontier(AckTracker, Protocol):
    """This replica's SDS streams (the SDS watch hub): what its frontier record says."""

    def lowest_acked_bundle_sequence(self) -> int | None: ...


class Replication:
    """Builds and holds this replica's Kubernetes components; :meth:`build` once the authority exists."""

    def __init__(self, settings: Settings, replica_id: str) -> None:
        self.settings = settings
        self.k = settings.storage.kubernetes
        self.replica_id = replica_id
        self.api = build_api_client(self.k.kubeconfig)
        self.store = KubernetesStore(self.api, self.k.namespace, self.k.secret_name)
        self.components: list[Any] = []
        self.istio_objects: IstioObjects | None = None
        self.elector: LeaderElector | None = None
        self.acks: ClusterAckTracker | None = None
        self.metrics: KubeMetrics | None = None

    def is_leader(self) -> bool:
        return self.elector is not None and self.elector.is_leader

    def build(self, authority: Authority, trust: TrustStore, hub: StreamFrontier, registry: CollectorRegistry,
              clock: Clock) -> None:
        k, rid = self.k, self.replica_id
        metrics = self.metrics = KubeMetrics(registry)
        metrics.leader.labels(rid).set(0)
        watch = _StateWatch(self.api, k.namespace, k.secret_name, authority)
        publisher = FrontierPublisher(
            self.api, k.namespace, rid,
            lambda: LocalFrontier(hub.lowest_acked_bundle_sequence(), hub.connected_streams()),
            ttl=k.lease_duration, check=FRONTIER_CHECK, clock=clock)
        reader = FrontierReader(self.api, k.namespace, period=FRONTIER_CHECK, clock=clock)
        # A view of the frontiers older than a lease is no view: the gate stays closed (ClusterAckTracker).
        self.acks = ClusterAckTracker(hub, reader, rid, max_age=k.lease_duration, clock=clock)
        self.istio_objects = self._istio_objects(authority, trust, metrics)
        self.elector = LeaderElector(
            self.api, k.namespace, k.lease_name, rid,
            LeaseTimings(k.lease_duration, k.renew_deadline, k.retry_period),
            on_started_leading=lambda: self._leadership(True), on_stopped_leading=lambda: self._leadership(False))
        self.components = [watch, publisher, reader, self.elector]
        if self.istio_objects is not None:
            self.components.append(self.istio_objects)

    def _istio_objects(self, authority: Authority, trust: TrustStore, metrics: KubeMetrics) -> IstioObjects | None:
        istiod, api = self.settings.istiod, self.api
        cacerts = trust_bundle = None
        root_cert: Callable[[], RootCertPublisher] | None = None
        if istiod.cacerts_secret.enabled:
            cacerts = CacertsSecretWriter(api, istiod.cacerts_secret.namespace, istiod.cacerts_secret.name,
                                          metrics, authority.clock)
        if istiod.trust_bundle_configmap.enabled:
            trust_bundle = TrustBundleWriter(api, istiod.trust_bundle_configmap.namespace,
                                             istiod.trust_bundle_configmap.name, metrics)
        if istiod.root_cert_configmap.enabled:
            name = istiod.root_cert_configmap.name
            root_cert = lambda: RootCertPublisher(api, name, metrics)  # noqa: E731
        if cacerts is None and trust_bundle is None and root_cert is None:
            return None
        return IstioObjects(authority, trust, self.is_leader, cacerts=cacerts, trust_bundle=trust_bundle,
                            root_cert=root_cert)

    def _leadership(self, leading: bool) -> None:
        if self.metrics is not None:
            self.metrics.leader.labels(self.replica_id).set(1 if leading else 0)
        if self.istio_objects is not None:
            self.istio_objects.on_leadership()

    def describe(self, readiness: Readiness) -> None:
        """``/readyz?verbose`` detail: who leads (as last observed) and who this replica is."""
        readiness.add_detail("replica", lambda: self.replica_id)
        readiness.add_detail("leader", lambda: (self.elector.holder or "") if self.elector else "")


class _StateWatch(SecretWatch):
    """The state Secret's watch, started once the state is loaded (from the version the authority holds);
    every newer record goes to :meth:`Authority.receive` (own commits come back too: receive ignores a
    revision it already has)."""

    def __init__(self, api: Any, namespace: str, secret_name: str, authority: Authority) -> None:
        super().__init__(api, namespace, secret_name, self._receive)
        self._authority = authority

    async def start(self) -> None:
        self.last_version = self._authority.version
        await super().start()

    def _receive(self, record: Record) -> None:
        if self._authority.receive(record):
            log.info("CA state received from another replica", extra={"version": record.version})
