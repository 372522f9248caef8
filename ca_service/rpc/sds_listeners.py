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

from ca_service.config import GrpcListener, TLSSettings
from ca_service.pki.certs import certs_to_pem
from ca_service.pki.identity import SpiffeId
from ca_service.rpc.admission import StreamAdmission
from ca_service.rpc.authn import (
    Authenticator,
    AuthenticatorChain,
    NodeMetadataAuthenticator,
    PeerCertificateAuthenticator,
)
from ca_service.rpc.sds_hub import WatchHub
from ca_service.rpc.sds_resources import SecretCatalog
from ca_service.rpc.sds_server import SdsServicer, add_sds_servicer
from ca_service.services.serving import ServingCertificate, ServingPair
from ca_service.services.state_changes import StateChange
from ca_service.services.trust import TrustStore
from ca_service.services.workloads import BatchSigner, WorkloadRegistry
from ca_service.settings import SdsLimits
from ca_service.telemetry import Telemetry

log = logging.getLogger(__name__)

# More services on every listener's server (the Istio CA API): called with the server and its listener.
ServiceRegistration = Callable[[grpc.aio.Server, GrpcListener], None]

UNIX_SCHEME = "unix://"
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
                 services: Sequence[ServiceRegistration] = (), first_issue: BatchSigner | None = None) -> None:
        self._listeners = tuple(listeners)
        self._limits = limits or SdsLimits()
        self.services = list(services)
        self._registry = registry
        self._trust = trust
        self._telemetry = telemetry
        self._grace = grace
        self.catalog = SecretCatalog(registry, trust, signer=first_issue)
        self.hub = WatchHub(nodes=registry)
        # One admission bucket for the daemon: a storm spread over listeners is still one storm.
        self.admission = StreamAdmission(self._limits, shed=telemetry.sds_shed)
        self.bound_addresses: list[str] = []  # "host:port" or "unix:///path", in listener order
        self._servers: list[grpc.aio.Server] = []
        self._unsubscribe: list[Callable[[], None]] = []
        self._sockets: list[Path] = []
        # One serving certificate per TLS listener without configured files (each may name its own hosts).
        self.serving: list[ServingCertificate] = []

    @property
    def serving_id(self) -> SpiffeId:
        return SpiffeId(self._trust.own, SERVING_PATH)

    async def start(self) -> None:
        self._unsubscribe = [self._registry.subscribe(self.hub.on_workload), self._trust.subscribe(self.hub.on_trust)]
        for listener in self._listeners:
            server = grpc.aio.server(options=server_options(self._limits))
            add_sds_servicer(self._servicer(listener), server)
            for register in self.services:  # the Istio CA API beside SDS on every listener
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
        for serving in self.serving:
            await serving.stop()
        self.serving.clear()
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        for path in self._sockets:
            path.unlink(missing_ok=True)
        # Idempotent: the daemon and a test may both stop it.
        self._servers.clear()
        self._unsubscribe.clear()
        self._sockets.clear()

    def on_state_change(self, change: StateChange) -> None:
        """State reaction (registered by the assembly): serving certificates follow the signing intermediate."""
        for serving in self.serving:
            serving.on_state_change(change)

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
        fetcher = _ServingCertFetcher(self, tls)
        # The client CA follows our trust bundle (a new root is trusted for client certificates at once).
        self._unsubscribe.append(self._trust.subscribe(lambda _: fetcher.refresh()))
        # dns_names: the host names clients dial and verify (istio-agent checks the CA's name).
        serving = ServingCertificate(self._registry.issuer, self.serving_id, self._registry.clock, fetcher.install,
                                     dns_names=tls.dns_names, name="SDS serving certificate")
        serving.start_renewal()  # issues now: the credentials need a first pair
        self.serving.append(serving)
        # grpc-stubs type the fetcher without its documented None ("unchanged") return.
        return grpc.dynamic_ssl_server_credentials(fetcher.config, fetcher, tls.require_client_cert)  # type: ignore[arg-type]

    def _client_ca(self, tls: TLSSettings) -> bytes:
        return tls.client_ca_file.read_bytes() if tls.client_ca_file else self._trust.own_bundle().to_pem()


class _ServingCertFetcher:
    """gRPC calls this (from its own thread) before each handshake; it hands out a new config only after
    the serving certificate or the client CA changed, which are recorded here from the event loop."""

    def __init__(self, component: SdsComponent, tls: TLSSettings) -> None:
        self._component, self._tls = component, tls
        self._served: object = None
        self._pair: ServingPair | None = None
        self._latest: grpc.ServerCertificateConfiguration | None = None

    @property
    def config(self) -> grpc.ServerCertificateConfiguration:
        assert self._latest is not None, "no serving certificate installed yet"
        return self._latest

    def install(self, pair: ServingPair) -> None:
        self._pair = pair
        self.refresh()

    def refresh(self) -> None:
        if self._pair is not None:
            client_ca = self._component._client_ca(self._tls) if self._tls.require_client_cert else None
            key_and_chain = (self._pair.key_pem(), certs_to_pem(self._pair.svid.chain))
            self._latest = grpc.ssl_server_certificate_configuration([key_and_chain], root_certificates=client_ca)

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
