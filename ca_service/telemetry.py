"""Every Prometheus metric of ca-service, on one registry per daemon.

The names are a contract with the alert rules and dashboard in ``deploy/`` (and the README): change
them only together.  A :class:`Telemetry` instance is created by the assembly and handed to every
service that counts something, so two daemons in one test process never share counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ca_service.logs import SuppressedLogsCollector

# Signing a P-256 leaf takes ~0.1 ms; RSA-3072 keygen can take a second.  Buckets cover both.
_SIGN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Push-to-ACK: Envoy ACKs within milliseconds on loopback; minutes means a stuck sidecar.
_ACK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# A full collection: milliseconds for a small daemon, ~0.7 s at 10k SDS streams (~1M tracked objects).
_GC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# CreateCertificate: ~1 ms signed in process, up to seconds with a cold TokenReview or a queue in a herd.
_CSR_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Telemetry:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        # Certificates the CA holds (one series per certificate: A and B during a rotation).
        self.ca_expiry = Gauge("ca_certificate_expiry_timestamp_seconds", "notAfter of a CA certificate",
                               ["kind", "trust_domain", "serial"], registry=r)
        self.ca_not_before = Gauge("ca_certificate_not_before_timestamp_seconds", "notBefore of a CA certificate",
                                   ["kind", "trust_domain", "serial"], registry=r)
        # Workload expiry (ca_workload_svids_expiring, ca_workload_namespace_earliest_expiry_timestamp_seconds,
        # ca_workload_certificate_{expiry,issued}_timestamp_seconds) is collected straight from the
        # registry's expiry index at scrape time by web.metrics.WorkloadExpiryCollector.
        self.next_rotation = Gauge("ca_next_rotation_timestamp_seconds", "When the next rotation of a kind is due",
                                   ["kind"], registry=r)
        self.rotations = Counter("ca_rotations", "Rotations performed", ["kind", "reason"], registry=r)
        self.rotation_failures = Counter("ca_rotation_failures", "Rotations that failed", ["kind"], registry=r)
        self.ack_gate_timeouts = Counter("ca_root_rotation_ack_gate_timeouts",
                                         "Root rotations that waited for SDS ACKs past the timeout", registry=r)
        self.issued = Counter("ca_certificates_issued", "Certificates signed", ["kind", "trust_domain"], registry=r)
        self.signing_seconds = Histogram("ca_signing_duration_seconds", "Key generation + signing time",
                                         buckets=_SIGN_BUCKETS, registry=r)
        # SDS.
        self.sds_streams = Gauge("ca_sds_active_streams", "Open SDS streams", ["api"], registry=r)
        self.sds_pushes = Counter("ca_sds_pushes", "SDS responses sent", ["api"], registry=r)
        self.sds_nacks = Counter("ca_sds_nacks", "SDS NACKs received", ["api"], registry=r)
        self.sds_ack_latency = Histogram("ca_sds_push_ack_latency_seconds", "Time from an SDS push to its ACK",
                                         buckets=_ACK_BUCKETS, registry=r)
        # Set only by web.metrics.StateMetrics.refresh_workloads (at scrape time), nowhere else.
        self.sds_live_svids = Gauge("ca_sds_live_svids", "Workload SVIDs held for connected nodes", registry=r)
        self.sds_denied = Counter("ca_sds_requests_denied", "SDS requests refused", ["reason"], registry=r)
        self.sds_shed = Counter("ca_sds_streams_shed", "New SDS streams refused by admission control (rate)",
                                registry=r)
        self.nodes_forgotten = Counter("ca_sds_nodes_forgotten", "Nodes forgotten after node_grace without a stream",
                                       registry=r)
        self.connections_refused = Counter("ca_connections_refused", "Connections closed at accept: listener full "
                                           "or out of file descriptors", ["listener", "reason"], registry=r)
        # Istio CA API (CreateCertificate).
        self.istio_ca_requests = Counter("ca_istio_ca_requests", "CreateCertificate calls by outcome (gRPC code)",
                                         ["code"], registry=r)
        self.istio_ca_rejections = Counter("ca_istio_ca_rejections", "CreateCertificate calls refused, by reason",
                                           ["reason"], registry=r)
        self.issuance_journal_errors = Counter(
            "ca_issuance_journal_errors", "Issuance journal files that could not be written, read or deleted "
            "(the in-memory ledger still has the record)", registry=r)
        self.istio_ca_latency = Histogram("ca_istio_ca_request_duration_seconds", "CreateCertificate latency",
                                          buckets=_CSR_BUCKETS, registry=r)
        self.token_reviews = Counter("ca_token_reviews", "Kubernetes TokenReview calls by result", ["result"],
                                     registry=r)
        self.token_review_cache_hits = Counter("ca_token_review_cache_hits",
                                               "Bearer tokens accepted from the review cache", registry=r)
        self.impersonation_lookups = Counter(
            "ca_impersonation_lookups", "ImpersonatedIdentity checks' reads of the cluster's pods, by what was read "
            "(node: the caller's pod; pods: a namespace's pods on that node) and where the answer came from "
            "(api, shared: joined a read already running, cache)", ["lookup", "source"], registry=r)
        # Trust bundles.
        self.bundle_roots = Gauge("ca_trust_bundle_roots", "Roots in a trust domain's bundle", ["trust_domain"],
                                  registry=r)
        self.bundle_sequence = Gauge("ca_trust_bundle_sequence", "spiffe_sequence of a trust domain's bundle",
                                     ["trust_domain"], registry=r)
        self.bundle_last_refresh = Gauge("ca_trust_bundle_last_refresh_timestamp_seconds",
                                         "Last successful refresh of a trust domain's bundle", ["trust_domain"],
                                         registry=r)
        self.bundle_refresh_failures = Counter("ca_trust_bundle_refresh_failures",
                                               "Failed or rejected bundle refreshes", ["trust_domain", "reason"],
                                               registry=r)
        # The one state-change path (services.state_changes): reactions that raised.
        self.state_reaction_failures = Counter("ca_state_reaction_failures",
                                               "Reactions to a CA state change that raised", ["reaction"],
                                               registry=r)
        # Full garbage collections, run on a schedule (adapters.collector): how long each stopped the loop.
        self.gc_full_pass_seconds = Histogram("ca_gc_full_pass_duration_seconds",
                                              "Scheduled full garbage collections: time the event loop stopped",
                                              buckets=_GC_BUCKETS, registry=r)
        # Scheduler.
        self.job_errors = Counter("ca_scheduler_job_errors", "Scheduler job runs that raised", ["job"], registry=r)
        self.job_misses = Counter("ca_scheduler_job_misses", "Scheduler job runs missed", ["job"], registry=r)
        # Logging: ca_log_suppressed_total (the repeat limit of ca_service.logs is process-wide).
        r.register(SuppressedLogsCollector())
