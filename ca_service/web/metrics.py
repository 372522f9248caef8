"""``/metrics``: the Telemetry registry, with the state-derived gauges kept exact.

Counters and histograms are incremented where things happen (signing, SDS, rotation).  Gauges that
*describe state* (which CA certificates exist, when each identity's SVID expires, bundle sizes) are
recomputed from the services by :class:`StateMetrics`:

- on every authority commit and trust-store change (listeners), so they are right the moment a
  rotation lands, also for anything that reads the registry without scraping;
- and again at scrape time, because two facts have no event: a workload SVID dropped by
  ``WorkloadRegistry.forget`` and a peer bundle refresh that changed nothing.  The workload part is
  read at scrape time from the registry's :class:`~ca_service.services.workload_expiry.ExpiryIndex`,
  which the registry keeps sorted as SVIDs come and go, so a scrape costs O(log n + namespaces +
  ``max_identity_series``) at any fleet size and never walks the live SVIDs on the event loop.

Each recompute clears the gauge and sets it again, so the series of a pruned CA certificate or a
departed identity disappear instead of lingering with a stale value.  Nothing awaits between clear
and set, so a scrape never sees a half-filled gauge.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import platform
import threading
from collections.abc import Awaitable, Callable
from importlib import metadata

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Metric, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import Collector

from ca_service.clock import Clock, SystemClock
from ca_service.rotation.state import AuthorityState
from ca_service.services.authority import Authority
from ca_service.services.single_flight import SingleFlight
from ca_service.services.state_changes import StateChange
from ca_service.services.trust import TrustStore
from ca_service.services.workloads import WorkloadRegistry
from ca_service.telemetry import Telemetry


def _version() -> str:
    try:
        return metadata.version("ca-service")
    except metadata.PackageNotFoundError:
        return "unknown"


# The windows of ca_workload_svids_expiring: 6 h is the critical alert's horizon (a renewal at half a 24 h
# lifetime has failed for 6 h by then), 1 h the "act now" one.
EXPIRY_WINDOWS = ((dt.timedelta(hours=1), "1h"), (dt.timedelta(hours=6), "6h"))


_IDENTITY = ["trust_domain", "namespace", "service_account"]


class WorkloadExpiryCollector(Collector):
    """Workload expiry families built at scrape time from the registry's expiry index.

    A custom collector rather than labelled Gauges: clearing and re-creating a few hundred labelled
    children per scrape cost more than reading the index itself.
    """

    def __init__(self, registry: WorkloadRegistry, clock: Clock, max_identity_series: int) -> None:
        self._registry, self._clock, self._max = registry, clock, max_identity_series
        self._snapshot: list[Metric] = list(self._families())
        self._owner = threading.get_ident()  # the event loop's thread, where the index changes

    def describe(self) -> list[Metric]:
        return list(self._families())

    def snapshot(self) -> None:
        """Read the index now, on the event loop: a render in another thread returns this copy, since the
        index may change under it there."""
        self._owner = threading.get_ident()
        self._snapshot = self._read()

    def collect(self) -> list[Metric]:
        return self._read() if threading.get_ident() == self._owner else self._snapshot

    def _read(self) -> list[Metric]:
        index = self._registry.expiry
        expiring, by_ns, expiry, issued = self._families()
        now = self._clock.now()
        for window, label in EXPIRY_WINDOWS:
            expiring.add_metric([label], index.expiring_before(now + window))
        for (td, ns), not_after in index.earliest_per_namespace().items():
            by_ns.add_metric([td, ns], not_after)
        for entry in index.soonest_identities(self._max):
            expiry.add_metric(list(entry.identity), entry.not_after)
            issued.add_metric(list(entry.identity), entry.not_before)
        return [expiring, by_ns, expiry, issued]

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("ca_workload_svids_expiring",
                              "Live workload SVIDs whose notAfter is within the window from now", labels=["within"]),
            GaugeMetricFamily("ca_workload_namespace_earliest_expiry_timestamp_seconds",
                              "Earliest notAfter among live SVIDs of a namespace",
                              labels=["trust_domain", "namespace"]),
            GaugeMetricFamily("ca_workload_certificate_expiry_timestamp_seconds",
                              "Earliest notAfter among live SVIDs of an identity (soonest-expiring identities only, "
                              "up to http.metrics.max_identity_series)", labels=_IDENTITY),
            GaugeMetricFamily("ca_workload_certificate_issued_timestamp_seconds",
                              "notBefore of the earliest-expiring live SVID of an identity (same identities)",
                              labels=_IDENTITY),
        )


class StateMetrics:
    """Fills the state-derived gauges of :class:`Telemetry` and owns the side-port's own metrics."""

    def __init__(self, telemetry: Telemetry, authority: Authority, *, registry: WorkloadRegistry | None = None,
                 trust: TrustStore | None = None, clock: Clock | None = None, max_identity_series: int = 100) -> None:
        self.telemetry = telemetry
        self._clock = clock or SystemClock()
        self._max_identity_series = max_identity_series
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
        self._workloads: WorkloadExpiryCollector | None = None
        if registry is not None:
            self._workloads = WorkloadExpiryCollector(registry, self._clock, max_identity_series)
            r.register(self._workloads)
        self._renders: SingleFlight[bool, bytes] = SingleFlight()

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
        """The unlabelled workload gauges (the labelled ones are collected by :class:`WorkloadExpiryCollector`)."""
        if self._registry is None:
            return
        self.telemetry.sds_live_svids.set(len(self._registry.expiry))
        self.workload_identities.set(self._registry.expiry.identities)
        nxt = self._registry.next_renewal()
        self.workload_next_renewal.set(nxt.timestamp() if nxt is not None else 0)

    async def handle(self, request: web.Request) -> web.Response:
        """GET /metrics — OpenMetrics when the Accept header asks for it (Prometheus does when scraping exemplars).

        State is read on the loop (cheap, and nothing mutates it meanwhile); the text is rendered in a
        thread, and scrapes that arrive while a render runs share it, so a burst of scrapes costs one
        render and never holds the loop for the whole burst.
        """
        openmetrics = "application/openmetrics-text" in request.headers.get("Accept", "")
        body = await self._renders.run(openmetrics, lambda: self._start_render(openmetrics))
        content_type = OPENMETRICS_CONTENT_TYPE if openmetrics else CONTENT_TYPE_LATEST
        return web.Response(body=body, headers={"Content-Type": content_type})

    def _start_render(self, openmetrics: bool) -> Awaitable[bytes]:
        self.refresh()
        if self._workloads is not None:
            self._workloads.snapshot()
        return asyncio.to_thread(self._render, openmetrics)

    def _render(self, openmetrics: bool) -> bytes:
        if openmetrics:
            return bytes(generate_openmetrics(self.telemetry.registry))  # type: ignore[no-untyped-call]
        return generate_latest(self.telemetry.registry)
