"""Typed settings: frozen dataclasses, one per section of the YAML file, with their defaults.

Pure data.  :mod:`ca_service.config` reads the file and the environment into these, walking them by
their type hints, so a new option is one annotated field with a default here (and one line in
``config/ca-service.yaml``).
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from dataclasses import dataclass, field
from pathlib import Path

from ca_service.pki.csr import CsrKeyType
from ca_service.pki.identity import TrustDomain
from ca_service.pki.keys import KeyAlgorithm
from ca_service.pki.templates import LeafEncoder

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
# No setting is sensibly longer than a root's lifetime; 100 years also stays far inside timedelta's
# range, so "99999999999d" is a clear error instead of an OverflowError.
MAX_DURATION_SECONDS = 100 * 365 * 86400


def parse_duration(value: object) -> dt.timedelta:
    """``90s``, ``15m``, ``24h``, ``30d`` (also ``500ms``); a bare number is seconds.

    Raises:
        ValueError: for anything else, including infinite, NaN and durations beyond 100 years.
    """
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            seconds = float(match[1]) * _UNITS[match[2]]
    if seconds is None:
        raise ValueError(f"{value!r} is not a duration (use e.g. 90s, 15m, 24h, 30d)")
    if not abs(seconds) <= MAX_DURATION_SECONDS:  # also false for NaN
        raise ValueError(f"{value!r} is not a duration of at most 100 years")
    return dt.timedelta(seconds=seconds)


def format_duration(delta: dt.timedelta) -> str:
    """The largest two units, as people read a time left: ``29d 23h``, ``5h 59m``, ``42s``."""
    seconds = int(delta.total_seconds())
    sign, seconds = ("-", -seconds) if seconds < 0 else ("", seconds)
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return sign + " ".join(p for p in parts[:2] if not p.startswith("0") or len(parts) == 1)


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class CASettings:
    key_algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256
    workload_key_algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256
    root_ttl: dt.timedelta = dt.timedelta(days=3650)
    intermediate_ttl: dt.timedelta = dt.timedelta(days=30)
    istiod_intermediate_ttl: dt.timedelta = dt.timedelta(days=365)
    workload_ttl: dt.timedelta = dt.timedelta(hours=24)
    # The longest TTL a caller may ask for (Istio CA API validity_duration); istiod's own maximum
    # workload TTL must stay below istiod_intermediate_ttl.
    max_workload_ttl: dt.timedelta = dt.timedelta(hours=24)
    backdate: dt.timedelta = dt.timedelta(minutes=5)
    # Processes that generate keys and sign in a renewal storm; None: one per core, 0: sign in the
    # daemon's own process only (the signing intermediate's key then never reaches another process).
    signing_workers: int | None = None
    # How leaves are encoded: "template" (per-signer pre-encoded DER, the same bytes, about twice as
    # fast) or "builder" (cryptography's CertificateBuilder, the reference the template is tested against).
    leaf_encoder: LeafEncoder = LeafEncoder.TEMPLATE


@dataclass(frozen=True)
class RotationSettings:
    renew_fraction: float = 0.5
    # Jitter as a fraction of lifetime: a fleet issued in one second renews across ~1% of its lifetime.
    jitter_fraction: float = 0.02
    tick_interval: dt.timedelta = dt.timedelta(seconds=5)
    misfire_grace: dt.timedelta = dt.timedelta(seconds=30)
    # Two default bundle refresh hints (5 min): peers and file consumers have no ACK, only time, and a
    # root rotation happens once in years, so waiting costs nothing.
    root_min_propagation: dt.timedelta = dt.timedelta(minutes=10)
    root_ack_timeout: dt.timedelta = dt.timedelta(minutes=30)
    reissue_window: dt.timedelta = dt.timedelta(seconds=30)


@dataclass(frozen=True)
class ListenerPolicy:
    allowed_namespaces: tuple[str, ...] = ()
    allowed_spiffe_ids: tuple[str, ...] = ()  # exact IDs or glob patterns (fnmatch)


@dataclass(frozen=True)
class TLSSettings:
    enabled: bool = False
    # Empty cert/key: the listener gets a serving SVID from our own CA.
    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None
    require_client_cert: bool = False
    # DNS SANs of the self-issued serving certificate (gRPC listeners): istio-agent checks the name it
    # dials (e.g. ca-service.istio-system.svc) against it.
    dns_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class GrpcListener:
    address: str = "127.0.0.1:15012"  # host:port, or unix:///path/to/socket
    # Take the caller's identity from Envoy node metadata.  Safe only when the socket is private to
    # the workload (istio-agent's per-pod Unix socket) or loopback on a dev machine.
    trust_node_metadata: bool = False
    socket_mode: int = 0o660
    tls: TLSSettings = field(default_factory=TLSSettings)
    policy: ListenerPolicy = field(default_factory=ListenerPolicy)


@dataclass(frozen=True)
class AdminSettings:
    token_file: Path | None = None  # default: <data_dir>/admin-token, generated on first start
    allowed_spiffe_ids: tuple[str, ...] = ()
    audit_log: Path | None = None  # default: <data_dir>/audit.log


@dataclass(frozen=True)
class MetricsSettings:
    # Per-identity expiry series (the soonest-expiring identities only): each is two series, and at
    # 100k identities a full set made every scrape O(n).  Aggregates cover the rest.
    max_identity_series: int = 100


@dataclass(frozen=True)
class ConnectionLimits:
    """One HTTP listener's protection against idle and slow clients (file descriptors are finite)."""

    # Far above what Prometheus, kubelet probes and operators open; far below the fd limit, so one
    # flooded listener cannot take the descriptors another needs.
    max_connections: int = 256
    # A request's headers (and a TLS handshake) must arrive within this; an idle keep-alive
    # connection is closed after it.  A 1-byte-per-second client is cut here.
    header_timeout: dt.timedelta = dt.timedelta(seconds=10)


@dataclass(frozen=True)
class HttpSettings:
    address: str = "127.0.0.1:15014"
    admin: AdminSettings = field(default_factory=AdminSettings)
    tls: TLSSettings = field(default_factory=TLSSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)


@dataclass(frozen=True)
class SdsLimits:
    """Bounds on what SDS clients may cost the daemon (issue 15: storms, floods, oversize requests)."""

    # Per gRPC listener.  Each Envoy holds one connection; beyond this new connections are refused.
    max_connections: int = 20000
    # TLS/HTTP2 handshake and connection preface must complete within this.
    handshake_timeout: dt.timedelta = dt.timedelta(seconds=10)
    # A connection with no open stream (Envoy always keeps one) is closed after this.
    idle_timeout: dt.timedelta = dt.timedelta(minutes=5)
    # Largest request message; an Envoy DiscoveryRequest with Istio metadata is a few KiB.
    max_request_bytes: int = 256 * 1024
    max_node_id_bytes: int = 1024
    max_node_metadata_bytes: int = 64 * 1024
    max_resource_name_bytes: int = 1024
    max_resource_names: int = 256
    # A node with no open stream for this long is forgotten: SVIDs dropped, no more renewals.  Long
    # enough for an Envoy restart or a reconnect to another replica and back.
    node_grace: dt.timedelta = dt.timedelta(minutes=5)
    # New streams admitted per second (token bucket) and the burst above it.  A storm beyond this is
    # told RESOURCE_EXHAUSTED and retries with backoff instead of all failing at once.
    admission_rate: float = 500.0
    admission_burst: int = 1000


class BundleProfile(enum.StrEnum):
    HTTPS_SPIFFE = "https_spiffe"
    HTTPS_WEB = "https_web"
    STATIC = "static"


@dataclass(frozen=True)
class BundleEndpointSettings:
    enabled: bool = True
    address: str = "127.0.0.1:15443"
    profile: BundleProfile = BundleProfile.HTTPS_SPIFFE
    cert_file: Path | None = None  # https_web only
    key_file: Path | None = None
    refresh_hint: dt.timedelta = dt.timedelta(minutes=5)
    # Peers poll every few minutes: a small cap leaves the fds for SDS and the side-port.
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)


@dataclass(frozen=True)
class PeerSettings:
    trust_domain: str = ""
    profile: BundleProfile = BundleProfile.HTTPS_SPIFFE
    endpoint_url: str = ""
    endpoint_spiffe_id: str = ""  # https_spiffe: the SPIFFE ID the endpoint must present
    bootstrap_bundle: Path | None = None  # https_spiffe: PEM or JWKS to trust on first fetch
    ca_file: Path | None = None  # https_web
    bundle_file: Path | None = None  # static
    refresh_hint: dt.timedelta | None = None  # overrides the peer's own hint


@dataclass(frozen=True)
class FederationSettings:
    peers: tuple[PeerSettings, ...] = ()
    bundle_dir: Path | None = None  # where <td>.pem and combined-ca.pem go; default <data_dir>/bundles


@dataclass(frozen=True)
class CacertsSecretSettings:
    enabled: bool = False
    namespace: str = "istio-system"
    name: str = "cacerts"


@dataclass(frozen=True)
class RootCertConfigMapSettings:
    enabled: bool = False
    name: str = "istio-ca-root-cert"  # in every namespace


@dataclass(frozen=True)
class TrustBundleConfigMapSettings:
    enabled: bool = False
    namespace: str = "istio-system"
    name: str = "trust-bundle"


@dataclass(frozen=True)
class IstiodSettings:
    cacerts_dir: Path | None = None  # write the four cacerts files here (kubelet-style atomic swap)
    # istiod's MAX_WORKLOAD_CERT_TTL (Istio's default is 90 days): an old istiod intermediate, and a
    # root it chains to, stay trusted this long after istiod stopped signing with it.
    max_workload_ttl: dt.timedelta = dt.timedelta(days=90)
    # Kubernetes objects, written by the leader (storage.backend: kubernetes).
    cacerts_secret: CacertsSecretSettings = field(default_factory=CacertsSecretSettings)
    root_cert_configmap: RootCertConfigMapSettings = field(default_factory=RootCertConfigMapSettings)
    trust_bundle_configmap: TrustBundleConfigMapSettings = field(default_factory=TrustBundleConfigMapSettings)


@dataclass(frozen=True)
class IstioCluster:
    cluster_id: str = "Kubernetes"  # istio-agent's ClusterID (its default is "Kubernetes")
    kubeconfig: Path | None = None  # None: in-cluster service-account config


@dataclass(frozen=True)
class IstioCASettings:
    token_audiences: tuple[str, ...] = ("istio-ca",)
    # Empty: Kubernetes JWT authentication is off (only peer certificates on mTLS listeners).
    clusters: tuple[IstioCluster, ...] = ()
    # Positive TokenReview results are reused this long (never past the token's exp): a pod's renewal
    # burst then costs one review, while a deleted service account is refused within a minute.
    review_cache_ttl: dt.timedelta = dt.timedelta(seconds=60)
    trusted_node_accounts: tuple[str, ...] = ()  # "<namespace>/<service account>", e.g. istio-system/ztunnel
    allowed_key_types: tuple[CsrKeyType, ...] = tuple(CsrKeyType)
    # istio-agent renews once per ~12 h; 10/s with a burst of 20 per identity leaves room for every pod
    # of a 20-replica deployment restarting at once, and stops one identity from starving the rest.
    rate_limit_per_identity: float = 10.0
    rate_limit_burst: int = 20
    # Requests being authenticated or signed at once; beyond it RESOURCE_EXHAUSTED, so SDS and health
    # keep the event loop.  256 is ~0.2 s of signing on two cores.
    max_in_flight: int = 256
    # Live certificates remembered by the issuance ledger (oldest dropped first beyond it); ~300 bytes each.
    audit_capacity: int = 200_000


class StorageBackend(enum.StrEnum):
    DIRECTORY = "directory"
    KUBERNETES = "kubernetes"


@dataclass(frozen=True)
class KubernetesStorageSettings:
    namespace: str = "ca-service"
    secret_name: str = "ca-service-state"
    kubeconfig: Path | None = None  # None: in-cluster config (the pod's service account)
    replica_id: str | None = None  # None: $POD_NAME, else the hostname (config.replica_id)
    lease_name: str = "ca-service-leader"
    # client-go's defaults for its own controllers: a dead leader is replaced within 15 s, a leader
    # that cannot renew for 10 s stops mutating before anyone else may take over, retried every 2 s.
    lease_duration: dt.timedelta = dt.timedelta(seconds=15)
    renew_deadline: dt.timedelta = dt.timedelta(seconds=10)
    retry_period: dt.timedelta = dt.timedelta(seconds=2)


@dataclass(frozen=True)
class StorageSettings:
    backend: StorageBackend = StorageBackend.DIRECTORY
    kubernetes: KubernetesStorageSettings = field(default_factory=KubernetesStorageSettings)


class LogFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


@dataclass(frozen=True)
class LoggingSettings:
    level: str = "info"
    format: LogFormat = LogFormat.TEXT
    # Client-supplied text (NACK details, node ids, reasons) can be megabytes: every argument and
    # field of a log line is cut here; 256 keeps a SPIFFE ID or a PEM serial whole.
    max_field_chars: int = 256
    # Lines of one message template per logger per window before the rest are counted, not written:
    # enough for a real incident's first lines, not enough for a client to fill the disk.
    repeat_burst: int = 20
    repeat_window: dt.timedelta = dt.timedelta(seconds=10)


def _default_grpc() -> tuple[GrpcListener, ...]:
    # Embedded default: loopback only, so node metadata is as trustworthy as the machine (DESIGN.md).
    return (GrpcListener(trust_node_metadata=True),)


@dataclass(frozen=True)
class Settings:
    trust_domain: str = "cluster.local"
    data_dir: Path = Path("./var/ca-service")
    ca: CASettings = field(default_factory=CASettings)
    rotation: RotationSettings = field(default_factory=RotationSettings)
    grpc: tuple[GrpcListener, ...] = field(default_factory=_default_grpc)
    http: HttpSettings = field(default_factory=HttpSettings)
    sds: SdsLimits = field(default_factory=SdsLimits)
    bundle_endpoint: BundleEndpointSettings = field(default_factory=BundleEndpointSettings)
    federation: FederationSettings = field(default_factory=FederationSettings)
    istiod: IstiodSettings = field(default_factory=IstiodSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    istio_ca: IstioCASettings = field(default_factory=IstioCASettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)

    @property
    def domain(self) -> TrustDomain:
        return TrustDomain(self.trust_domain)

    @property
    def admin_token_file(self) -> Path:
        return self.http.admin.token_file or self.data_dir / "admin-token"

    @property
    def audit_log_file(self) -> Path:
        return self.http.admin.audit_log or self.data_dir / "audit.log"

    @property
    def bundle_dir(self) -> Path:
        return self.federation.bundle_dir or self.data_dir / "bundles"

    @property
    def issued_dir(self) -> Path:
        """The issuance ledger's journal (adapters/issuance_journal.py), shared with ``ca-service issue``."""
        return self.data_dir / "issued"
