"""The SDS gRPC listeners as one daemon component: TCP (plaintext or TLS) and Unix sockets.

Wiring (``app.build_app``)::

    SdsComponent(settings.grpc, registry=registry, trust=trust, telemetry=telemetry)

Each configured :class:`~ca_service.config.GrpcListener` gets its own ``grpc.aio`` server, because
what a caller's credentials are worth (node metadata, client certificate) is a property of the
listener.  All listeners share one catalog and one watch hub (the hub is also the ACK tracker that
root rotation waits on: ``component.hub``).
"""

from __future__ import annotations

import datetime as dt
import logging
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from envoy.service.secret.v3 import sds_pb2_grpc

from ca_service.config import GrpcListener, TLSSettings
from ca_service.pki.certs import certs_to_pem
from ca_service.pki.identity import SpiffeId
from ca_service.pki.keys import private_key_to_pem
from ca_service.rpc.admission import StreamAdmission
from ca_service.rpc.authn import (
    Authenticator,
    AuthenticatorChain,
    NodeMetadataAuthenticator,
    PeerCertificateAuthenticator,
)
from ca_service.rpc.sds_hub import WatchHub
from ca_service.rpc.sds_resources import SecretCatalog
from ca_service.rpc.sds_server import SdsServicer
from ca_service.services.trust import TrustStore
from ca_service.services.workloads import WorkloadCert, WorkloadRegistry
from ca_service.settings import SdsLimits
from ca_service.telemetry import Telemetry

log = logging.getLogger(__name__)

# More services on every listener's server (the Istio CA API): called with the server and its listener.
ServiceRegistration = Callable[[grpc.aio.Server, GrpcListener], None]
# The PEM chain to serve for a listener's serving SVID and the DNS names its tls.dns_names asks for.
ServingChain = Callable[[WorkloadCert, tuple[str, ...]], bytes]

UNIX_SCHEME = "unix://"
SERVING_NODE = "ca-service"  # registry node id under which the listeners' own serving SVID is cached
SERVING_PATH = "/ca-service/sds"
# grpc core cancels (status CANCELLED, no retry hint) calls that wait for the application beyond 1,000
# pending; a herd of istio-agents must reach our admission control instead, which answers
# RESOURCE_EXHAUSTED with retry-after.  A pending call costs a few hundred bytes.
PENDING_CALLS = 50_000
# Long enough for Envoy to read the end of stream and reconnect to another replica; short enough for a restart.
DEFAULT_GRACE = dt.timedelta(seconds=5)


def server_options(limits: SdsLimits) -> list[tuple[str, int]]:
    """gRPC core options that bound what one client can hold: connections, handshakes, idle sockets, message size."""
    def ms(delta: dt.timedelta) -> int:
        return int(delta.total_seconds() * 1000)
    return [
        ("grpc.max_receive_message_length", limits.max_request_bytes),
        ("grpc.max_allowed_incoming_connections", limits.max_connections),
        ("grpc.server_handshake_timeout_ms", ms(limits.handshake_timeout)),
        ("grpc.max_connection_idle_ms", ms(limits.idle_timeout)),
        ("grpc.server.max_pending_requests", PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", PENDING_CALLS),
    ]


class SdsComponent:
    """Serves SDS on every configured listener; push on change through :attr:`hub`."""

    name = "sds"

    def __init__(self, listeners: Sequence[GrpcListener], *, registry: WorkloadRegistry, trust: TrustStore,
                 telemetry: Telemetry, grace: dt.timedelta = DEFAULT_GRACE, limits: SdsLimits | None = None,
                 services: Sequence[ServiceRegistration] = (), serving_chain: ServingChain | None = None) -> None:
        self._listeners = tuple(listeners)
        self._limits = limits or SdsLimits()
        self.services = list(services)
        self._serving_chain = serving_chain
        self._registry = registry
        self._trust = trust
        self._telemetry = telemetry
        self._grace = grace
        self.catalog = SecretCatalog(registry, trust)
        self.hub = WatchHub(nodes=registry)
        # One admission bucket for the daemon: a storm spread over listeners is still one storm.
        self.admission = StreamAdmission(self._limits, shed=telemetry.sds_shed)
        self.bound_addresses: list[str] = []  # "host:port" or "unix:///path", in listener order
        self._servers: list[grpc.aio.Server] = []
        self._unsubscribe: list[Callable[[], None]] = []
        self._sockets: list[Path] = []

    @property
    def serving_id(self) -> SpiffeId:
        return SpiffeId(self._trust.own, SERVING_PATH)

    async def start(self) -> None:
        self._unsubscribe = [self._registry.subscribe(self.hub.on_workload), self._trust.subscribe(self.hub.on_trust)]
        for listener in self._listeners:
            server = grpc.aio.server(options=server_options(self._limits))
            sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(self._servicer(listener), server)
            for register in self.services:
                register(server, listener)
            address = self._bind(server, listener)
            await server.start()
            if listener.address.startswith(UNIX_SCHEME):
                _socket_path(listener.address).chmod(listener.socket_mode)
            self._servers.append(server)
            self.bound_addresses.append(address)
            log.info("SDS listening", extra={"address": address, "tls": listener.tls.enabled,
                                             "trust_node_metadata": listener.trust_node_metadata})

    async def stop(self) -> None:
        # Streams end with OK first (Envoy reconnects elsewhere), then the servers stop accepting.
        self.hub.shutdown()
        for server in self._servers:
            await server.stop(self._grace.total_seconds())
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        for path in self._sockets:
            path.unlink(missing_ok=True)
        # Idempotent: the daemon and a test may both stop it.
        self._servers.clear()
        self._unsubscribe.clear()
        self._sockets.clear()

    def _servicer(self, listener: GrpcListener) -> SdsServicer:
        verified = listener.tls.enabled and listener.tls.require_client_cert
        authenticators: list[Authenticator] = []
        if verified:
            authenticators.append(PeerCertificateAuthenticator())
        if listener.trust_node_metadata:
            authenticators.append(NodeMetadataAuthenticator(self._trust.own))
        return SdsServicer(self.catalog, self.hub, AuthenticatorChain(authenticators), policy=listener.policy,
                           telemetry=self._telemetry, peer_certificate_verified=verified, limits=self._limits,
                           admission=self.admission)

    def _bind(self, server: grpc.aio.Server, listener: GrpcListener) -> str:
        address = listener.address
        if address.startswith(UNIX_SCHEME):
            path = _socket_path(address)
            _prepare_socket_path(path)
            self._sockets.append(path)
            target = f"unix:{path}"
        else:
            target = address
        port = (server.add_secure_port(target, self._credentials(listener.tls)) if listener.tls.enabled
                else server.add_insecure_port(target))
        if address.startswith(UNIX_SCHEME):
            return address
        host = address.rsplit(":", 1)[0]
        return f"{host}:{port}"

    def _credentials(self, tls: TLSSettings) -> grpc.ServerCredentials:
        """Serving certificate from files, or an SVID of our own CA fetched afresh at each handshake."""
        client_ca = self._client_ca(tls) if tls.require_client_cert else None
        if tls.cert_file is not None and tls.key_file is not None:
            pair = (tls.key_file.read_bytes(), tls.cert_file.read_bytes())
            return grpc.ssl_server_credentials([pair], root_certificates=client_ca,
                                               require_client_auth=tls.require_client_cert)
        cert = self._registry.get_or_issue(SERVING_NODE, self.serving_id)
        fetcher = _ServingCertFetcher(self, tls, cert)
        # grpc-stubs type the fetcher without its documented None ("unchanged") return.
        return grpc.dynamic_ssl_server_credentials(fetcher.config, fetcher, tls.require_client_cert)  # type: ignore[arg-type]

    def _client_ca(self, tls: TLSSettings) -> bytes:
        return tls.client_ca_file.read_bytes() if tls.client_ca_file else self._trust.own_bundle().to_pem()


class _ServingCertFetcher:
    """gRPC calls this (from its own thread) before each handshake; it hands out a new config only after
    the serving SVID or the client CA changed, which the registry/trust listeners record in the loop."""

    def __init__(self, component: SdsComponent, tls: TLSSettings, cert: WorkloadCert) -> None:
        self._component, self._tls = component, tls
        self._served: object = None
        self.config = self._build(cert)
        self._latest = self.config
        component._unsubscribe += [component._registry.subscribe(self._on_cert),
                                   component._trust.subscribe(lambda _: self._refresh())]

    def _on_cert(self, cert: WorkloadCert) -> None:
        if cert.node_id == SERVING_NODE:
            self._latest = self._build(cert)

    def _refresh(self) -> None:
        cert = self._component._registry.get(SERVING_NODE, self._component.serving_id)
        if cert is not None:
            self._latest = self._build(cert)

    def _build(self, cert: WorkloadCert) -> grpc.ServerCertificateConfiguration:
        client_ca = self._component._client_ca(self._tls) if self._tls.require_client_cert else None
        serving_chain, dns_names = self._component._serving_chain, self._tls.dns_names
        chain = (serving_chain(cert, dns_names) if serving_chain is not None and dns_names
                 else certs_to_pem(cert.svid.chain))
        pair = (private_key_to_pem(cert.key), chain)
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=client_ca)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        latest = self._latest
        if latest is self._served:
            return None
        self._served = latest
        return latest


def _socket_path(address: str) -> Path:
    return Path(address[len(UNIX_SCHEME):])


def _prepare_socket_path(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
        path.unlink()  # a stale socket from a previous run
