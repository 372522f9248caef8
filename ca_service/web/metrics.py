"""``/metrics``: the Telemetry registry, with the state-derived gauges kept exact.

Counters and histograms are incremented where things happen (signing, SDS, rotation).  Gauges that
*describe state* (which CA certificates exist, when each identity's SVID expires, bundle sizes) are
recomputed from the services by :class:`StateMetrics`:

- on every authority commit and trust-store change (listeners), so they are right the moment a
  rotation lands, also for anything that reads the registry without scraping;
- and again at scrape time, because two facts have no event: a workload SVID dropped by
  ``WorkloadRegistry.forget`` and a peer bundle refresh that changed nothing.  The workload part is
  recomputed *only* at scrape time: it is O(live SVIDs), and doing it per issued SVID would make a
  start with N sidecars O(N²).

Each recompute clears the gauge and sets it again, so the series of a pruned CA certificate or a
departed identity disappear instead of lingering with a stale value.  Nothing awaits between clear
and set, so a scrape never sees a half-filled gauge.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from importlib import metadata

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, generate_latest
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from ca_service.rotation.state import AuthorityState
from ca_service.services.authority import Authority
from ca_service.services.state_changes import StateChange
from ca_service.services.trust import TrustStore
from ca_service.services.workloads import WorkloadRegistry
from ca_service.telemetry import Telemetry


def _version() -> str:
    try:
        return metadata.version("ca-service")
    except metadata.PackageNotFoundError:
        return "unknown"


def identity_labels(spiffe_id_path: str, kubernetes: tuple[str, str] | None) -> tuple[str, str]:
    """(namespace, service_account); a non-Kubernetes ID keeps its path as service_account so it stays distinct."""
    return kubernetes if kubernetes is not None else ("", spiffe_id_path)


class StateMetrics:
    """Fills the state-derived gauges of :class:`Telemetry` and owns the side-port's own metrics."""

    def __init__(self, telemetry: Telemetry, authority: Authority, *, registry: WorkloadRegistry | None = None,
                 trust: TrustStore | None = None) -> None:
        self.telemetry = telemetry
        self._authority = authority
        self._registry = registry
        self._trust = trust
        self._unsubscribe: list[Callable[[], None]] = []
        self._attached = False
        r = telemetry.registry
        self.info = Gauge("ca_info", "Always 1; the trust domain and CA mode as labels", ["trust_domain", "mode"],
                          registry=r)
        self.build_info = Gauge("ca_build_info", "Always 1; the ca-service and Python versions",
                                ["version", "python"], registry=r)
        self.build_info.labels(_version(), platform.python_version()).set(1)
        self.state_revision = Gauge("ca_state_revision", "Committed CA state changes (revision of the state)",
                                    registry=r)
        self.root_rotation = Gauge("ca_root_rotation_in_progress",
                                   "1 while a root rotation is in progress, labelled by phase", ["phase"], registry=r)
        self.workload_identities = Gauge("ca_workload_identities", "Distinct identities with a live SVID",
                                         registry=r)
        self.workload_next_renewal = Gauge("ca_workload_next_renewal_timestamp_seconds",
                                           "When the next workload SVID renewal is due (0 when none is held)",
                                           registry=r)
        self.bundle_earliest_expiry = Gauge("ca_trust_bundle_earliest_expiry_timestamp_seconds",
                                            "notAfter of the first root to expire in a trust domain's bundle",
                                            ["trust_domain"], registry=r)
        self.admin_requests = Counter("ca_admin_requests", "Admin API calls by action and result",
                                      ["action", "result"], registry=r)
        self.ready = Gauge("ca_ready", "1 when /readyz answers ready", registry=r)

    def attach(self) -> None:
        """Subscribe to the trust store and fill every gauge once (state changes come through
        :meth:`on_state_change`, which the assembly registers)."""
        self._attached = True
        if self._trust is not None:
            self._unsubscribe.append(self._trust.subscribe(lambda _changed: self.refresh_trust()))
        self.refresh()

    def on_state_change(self, change: StateChange) -> None:
        """State reaction: count the CA certificates a change minted, refresh the CA gauges."""
        if self._attached:
            self.count_minted(change.old, change.new)
            self.refresh_authority(change.new)

    def count_minted(self, old: AuthorityState, new: AuthorityState) -> None:
        """``ca_certificates_issued_total`` for every CA certificate a commit added (a rotation minted it)."""
        before = {e.key_id for e in old.entries}
        for entry in new.entries:
            if entry.key_id not in before:
                self.telemetry.issued.labels(kind=entry.kind.value, trust_domain=new.trust_domain.name).inc()

    def detach(self) -> None:
        self._attached = False
        while self._unsubscribe:
            self._unsubscribe.pop()()

    def refresh(self) -> None:
        if self._authority.loaded:
            self.refresh_authority(self._authority.state)
            self.refresh_trust()
        self.refresh_workloads()

    def refresh_authority(self, state: AuthorityState) -> None:
        t = self.telemetry
        td = state.trust_domain.name
        t.ca_expiry.clear()
        t.ca_not_before.clear()
        for entry in state.entries:
            t.ca_expiry.labels(entry.kind.value, td, entry.serial).set(entry.not_after.timestamp())
            t.ca_not_before.labels(entry.kind.value, td, entry.serial).set(entry.not_before.timestamp())
        self.info.clear()
        self.info.labels(td, state.mode.value).set(1)
        self.state_revision.set(state.revision)
        self.root_rotation.clear()
        if state.root_rotation is not None:
            self.root_rotation.labels(state.root_rotation.phase.value).set(1)
        if self._trust is None:
            # Without a trust store (unit wiring) our own bundle is still worth reporting.
            self._set_bundle(td, len(state.roots), state.bundle_sequence,
                             min((c.not_valid_after_utc.timestamp() for c in state.roots), default=None))

    def refresh_trust(self) -> None:
        if self._trust is None:
            return
        for gauge in (self.telemetry.bundle_roots, self.telemetry.bundle_sequence, self.bundle_earliest_expiry):
            gauge.clear()
        for td, bundle in self._trust.bundles().items():
            earliest = min((c.not_valid_after_utc.timestamp() for c in bundle.roots), default=None)
            self._set_bundle(td.name, len(bundle.roots), bundle.sequence, earliest)

    def _set_bundle(self, td: str, roots: int, sequence: int, earliest: float | None) -> None:
        self.telemetry.bundle_roots.labels(td).set(roots)
        self.telemetry.bundle_sequence.labels(td).set(sequence)
        if earliest is not None:
            self.bundle_earliest_expiry.labels(td).set(earliest)

    def refresh_workloads(self) -> None:
        if self._registry is None:
            return
        earliest: dict[tuple[str, str, str], tuple[float, float]] = {}
        count = 0
        for cert in self._registry:
            count += 1
            sid = cert.spiffe_id
            ns, sa = identity_labels(sid.path, sid.kubernetes)
            key = (sid.trust_domain.name, ns, sa)
            value = (cert.svid.not_after.timestamp(), cert.svid.not_before.timestamp())
            # Earliest expiry per identity: the pod closest to losing its certificate is the one to alert on.
            if key not in earliest or value[0] < earliest[key][0]:
                earliest[key] = value
        t = self.telemetry
        t.workload_expiry.clear()
        t.workload_issued.clear()
        for key, (not_after, not_before) in earliest.items():
            t.workload_expiry.labels(*key).set(not_after)
            t.workload_issued.labels(*key).set(not_before)
        t.sds_live_svids.set(count)
        self.workload_identities.set(len(earliest))
        nxt = self._registry.next_renewal()
        self.workload_next_renewal.set(nxt.timestamp() if nxt is not None else 0)

    async def handle(self, request: web.Request) -> web.Response:
        """GET /metrics — OpenMetrics when the Accept header asks for it (Prometheus does when scraping exemplars)."""
        self.refresh()
        if "application/openmetrics-text" in request.headers.get("Accept", ""):
            body = generate_openmetrics(self.telemetry.registry)  # type: ignore[no-untyped-call]
            content_type = OPENMETRICS_CONTENT_TYPE
        else:
            body, content_type = generate_latest(self.telemetry.registry), CONTENT_TYPE_LATEST
        return web.Response(body=body, headers={"Content-Type": content_type})
