"""Configuration values for an Istio-like sidecar whose certificates all come from our SDS server.

:class:`EnvoyConfig` (a :class:`NodeIdentity`, an :class:`SdsServer`, an optional :class:`ServerListener`
and any number of :class:`ClientListener`) renders the bootstrap; the dict shapes are in :mod:`.bootstrap`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from .bootstrap import (
    _HTTP_OPTIONS,
    SDS_CLUSTER,
    SERVER_LISTENER,
    _client_listener,
    _duration,
    _peer_cluster,
    _PlainDumper,
    _sds_tls_socket,
    _server_listener,
    _single_endpoint,
    _socket_address,
)


class SdsApi(enum.StrEnum):
    """SDS protocol variant: state of the world or incremental."""

    GRPC = "GRPC"
    DELTA_GRPC = "DELTA_GRPC"


@dataclass(frozen=True)
class NodeIdentity:
    """The sidecar's node: Istio-style id, cluster and metadata (NAMESPACE, SERVICE_ACCOUNT)."""

    service_account: str = "default"
    namespace: str = "default"
    trust_domain: str = "cluster.local"
    ip: str = "127.0.0.1"
    pod: str | None = None
    cluster: str | None = None
    extra_metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        pod = self.pod or f"{self.service_account}-pod"
        return f"sidecar~{self.ip}~{pod}.{self.namespace}~{self.namespace}.svc.cluster.local"

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def render(self) -> dict[str, Any]:
        metadata = {"NAMESPACE": self.namespace, "SERVICE_ACCOUNT": self.service_account}
        metadata.update(self.extra_metadata)
        return {
            "id": self.id,
            "cluster": self.cluster or f"{self.service_account}.{self.namespace}",
            "metadata": metadata,
        }


@dataclass(frozen=True)
class SdsTls:
    """TLS from Envoy to the SDS server: the CA that signs the server, and an optional client cert."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    sni: str | None = None
    server_uri_san: str | None = None  # pin the SDS server's URI SAN when set


@dataclass(frozen=True)
class SdsServer:
    """Where Envoy's SDS cluster connects: exactly one of ``port`` (TCP on ``host``) or ``uds_path``."""

    port: int | None = None
    uds_path: Path | None = None
    host: str = "127.0.0.1"
    api_type: SdsApi = SdsApi.GRPC
    tls: SdsTls | None = None
    # Envoy's default; after it Envoy goes LIVE without the secret, so tests wait on stats instead.
    initial_fetch_timeout: timedelta = timedelta(seconds=15)

    def __post_init__(self) -> None:
        if (self.port is None) == (self.uds_path is None):
            raise ValueError("SdsServer needs exactly one of port or uds_path")

    @classmethod
    def tcp(cls, port: int, **options: Any) -> SdsServer:
        return cls(port=port, **options)

    @classmethod
    def uds(cls, path: Path | str, **options: Any) -> SdsServer:
        return cls(uds_path=Path(path), **options)

    def config_source(self) -> dict[str, Any]:
        """The ``sds_config`` every secret reference uses (as Istio's sidecar bootstrap does)."""
        return {
            "resource_api_version": "V3",
            "initial_fetch_timeout": _duration(self.initial_fetch_timeout),
            "api_config_source": {
                "api_type": str(self.api_type),
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [{"envoy_grpc": {"cluster_name": SDS_CLUSTER}}],
            },
        }

    def cluster(self) -> dict[str, Any]:
        if self.uds_path is not None:
            address: dict[str, Any] = {"pipe": {"path": str(self.uds_path)}}
        else:
            address = {"socket_address": {"address": self.host, "port_value": self.port}}
        cluster: dict[str, Any] = {
            "name": SDS_CLUSTER,
            "type": "STATIC",
            "connect_timeout": "1s",
            # Without HTTP/2 the gRPC stream never connects and nothing is logged at warning level.
            "typed_extension_protocol_options": {
                _HTTP_OPTIONS: {
                    "@type": f"type.googleapis.com/{_HTTP_OPTIONS}",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            },
            "load_assignment": _single_endpoint(SDS_CLUSTER, address),
        }
        if self.tls is not None:
            cluster["transport_socket"] = _sds_tls_socket(self.tls)
        return cluster


@dataclass(frozen=True)
class ServerListener:
    """The inbound mTLS listener: certificate and trust from SDS, answers 200 (or proxies locally).

    ``allowed_peer_spiffe_ids`` empty means any client the validation context trusts.  The response body
    is ``body`` or ``"<node id>\\n"``; headers ``x-peer-*`` describe the client certificate.
    """

    port: int = 0
    certificate_secret: str = "default"
    validation_secret: str = "ROOTCA"
    allowed_peer_spiffe_ids: Sequence[str] = ()
    require_client_certificate: bool = True
    session_resumption: bool = False
    upstream_port: int | None = None  # proxy to plain HTTP on 127.0.0.1:<port> instead of direct_response
    body: str | None = None


@dataclass(frozen=True)
class ClientListener:
    """A plain-HTTP local listener ``name`` that proxies to a peer's mTLS port (cluster ``name``).

    ``peer_spiffe_ids`` pins the server certificate's URI SAN (empty: any trusted peer).  With
    ``new_handshake_per_request`` each request opens a new connection without TLS session resumption,
    because Envoy keeps pooled connections and resumed sessions (with the old certificates) across an
    SDS update.
    """

    name: str
    peer_port: int
    peer_spiffe_ids: Sequence[str] = ()
    port: int = 0
    peer_host: str = "127.0.0.1"
    certificate_secret: str = "default"
    validation_secret: str = "ROOTCA"
    sni: str | None = None
    new_handshake_per_request: bool = True


@dataclass(frozen=True)
class EnvoyConfig:
    """A sidecar bootstrap; :meth:`render_yaml` gives the file Envoy is started with."""

    node: NodeIdentity
    sds: SdsServer
    server_listener: ServerListener | None = None
    client_listeners: Sequence[ClientListener] = ()
    log_level: str = "info"
    component_log_level: str = "config:debug"  # SDS subscription and (N)ACK lines, for failure tails

    def __post_init__(self) -> None:
        names = [c.name for c in self.client_listeners]
        if len(set(names)) != len(names) or SERVER_LISTENER in names or SDS_CLUSTER in names:
            raise ValueError(f"client listener names must be unique and not reserved: {names}")

    def render(self) -> dict[str, Any]:
        listeners = [_client_listener(c) for c in self.client_listeners]
        clusters = [self.sds.cluster()] + [_peer_cluster(c, self.sds) for c in self.client_listeners]
        if (server := self.server_listener) is not None:
            listeners.insert(0, _server_listener(server, self.node, self.sds))
            if server.upstream_port is not None:
                address = {"socket_address": {"address": "127.0.0.1", "port_value": server.upstream_port}}
                clusters.append(
                    {
                        "name": "local_app",
                        "type": "STATIC",
                        "connect_timeout": "1s",
                        "load_assignment": _single_endpoint("local_app", address),
                    }
                )
        return {
            "node": self.node.render(),
            "admin": {"address": _socket_address(0)},
            "static_resources": {"listeners": listeners, "clusters": clusters},
        }

    def render_yaml(self) -> str:
        return yaml.dump(self.render(), Dumper=_PlainDumper, sort_keys=False)
