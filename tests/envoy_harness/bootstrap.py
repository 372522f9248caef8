"""How the configuration values of :mod:`.config` become an Envoy v3 bootstrap: listeners, clusters, TLS.

Only dict-building functions live here (plus the names a test can match on in stats and response
headers); :class:`.config.EnvoyConfig` calls them and dumps the result as YAML.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from .config import ClientListener, NodeIdentity, SdsServer, SdsTls, ServerListener

SDS_CLUSTER = "sds-grpc"
SERVER_LISTENER = "mtls_server"
_TLS_SOCKET = "envoy.transport_sockets.tls"
_TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"

# Response headers the rendered listeners add, so a test can see which certificates a request used.
NODE_ID_HEADER = "x-envoy-node-id"  # server listener: the answering Envoy's node id
PEER_URI_SAN_HEADER = "x-peer-uri-san"  # server listener: the client certificate's URI SAN
PEER_SERIAL_HEADER = "x-peer-serial"  # server listener: the client certificate's serial (hex)
PEER_ISSUER_HEADER = "x-peer-issuer"  # server listener: the client certificate's issuer DN
UPSTREAM_PEER_URI_SAN_HEADER = "x-upstream-peer-uri-san"  # client listener: the server certificate's URI SAN
UPSTREAM_PEER_ISSUER_HEADER = "x-upstream-peer-issuer"  # client listener: the server certificate's issuer
UPSTREAM_PEER_CERT_HEADER = "x-upstream-peer-cert"  # client listener: URL-encoded PEM of the server leaf


class _PlainDumper(yaml.SafeDumper):
    """Writes a repeated sub-dict (the sds_config) out in full instead of as a YAML anchor/alias."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _duration(value: timedelta) -> str:
    return f"{value.total_seconds():.3f}s"  # protobuf JSON Duration: seconds with 0-9 fraction digits


def _socket_address(port: int, host: str = "127.0.0.1") -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _single_endpoint(cluster: str, address: dict[str, Any]) -> dict[str, Any]:
    return {"cluster_name": cluster, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}]}


def _uri_pins(spiffe_ids: Sequence[str]) -> dict[str, Any]:
    return {"match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": s}} for s in spiffe_ids]}


def _common_tls(cert_secret: str, validation_secret: str, pins: Sequence[str], sds: SdsServer) -> dict[str, Any]:
    source = sds.config_source()
    return {
        # Client-side Envoy stops at TLS 1.2 unless told otherwise.
        "tls_params": {"tls_maximum_protocol_version": "TLSv1_3"},
        "tls_certificate_sds_secret_configs": [{"name": cert_secret, "sds_config": source}],
        "combined_validation_context": {
            # Required even when empty; pins placed here are merged with the SDS-delivered context.
            "default_validation_context": _uri_pins(pins) if pins else {},
            "validation_context_sds_secret_config": {"name": validation_secret, "sds_config": source},
        },
    }


def _sds_tls_socket(tls: SdsTls) -> dict[str, Any]:
    validation: dict[str, Any] = {"trusted_ca": {"filename": str(tls.ca_file)}}
    if tls.server_uri_san:
        validation.update(_uri_pins([tls.server_uri_san]))
    common: dict[str, Any] = {"validation_context": validation, "alpn_protocols": ["h2"]}
    if tls.cert_file is not None:
        if tls.key_file is None:
            raise ValueError("SdsTls.cert_file needs key_file")
        common["tls_certificates"] = [
            {
                "certificate_chain": {"filename": str(tls.cert_file)},
                "private_key": {"filename": str(tls.key_file)},
            }
        ]
    context: dict[str, Any] = {"@type": _TLS_TYPE + "UpstreamTlsContext", "common_tls_context": common}
    if tls.sni:
        context["sni"] = tls.sni
    return {"name": _TLS_SOCKET, "typed_config": context}


def _header(key: str, value: str) -> dict[str, Any]:
    return {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}


def _http_manager(stat_prefix: str, route: dict[str, Any], headers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": _HCM_TYPE,
            "stat_prefix": stat_prefix,
            "codec_type": "AUTO",
            "route_config": {
                "name": stat_prefix,
                "virtual_hosts": [
                    {
                        "name": stat_prefix,
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, **route}],
                        "response_headers_to_add": headers,
                    }
                ],
            },
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER_TYPE}}],
        },
    }


def _server_listener(server: ServerListener, node: NodeIdentity, sds: SdsServer) -> dict[str, Any]:
    if server.upstream_port is not None:
        route: dict[str, Any] = {"route": {"cluster": "local_app"}}
    else:
        body = server.body if server.body is not None else node.id + "\n"
        route = {"direct_response": {"status": 200, "body": {"inline_string": body}}}
    headers = [
        _header(PEER_URI_SAN_HEADER, "%DOWNSTREAM_PEER_URI_SAN%"),
        _header(PEER_SERIAL_HEADER, "%DOWNSTREAM_PEER_SERIAL%"),
        _header(PEER_ISSUER_HEADER, "%DOWNSTREAM_PEER_ISSUER%"),
        _header(NODE_ID_HEADER, node.id),
    ]
    context: dict[str, Any] = {
        "@type": _TLS_TYPE + "DownstreamTlsContext",
        "require_client_certificate": server.require_client_certificate,
        "common_tls_context": _common_tls(
            server.certificate_secret, server.validation_secret, server.allowed_peer_spiffe_ids, sds
        ),
    }
    if not server.session_resumption:
        context["disable_stateless_session_resumption"] = True
        context["disable_stateful_session_resumption"] = True
    return {
        "name": SERVER_LISTENER,
        "stat_prefix": SERVER_LISTENER,
        "address": _socket_address(server.port),
        "filter_chains": [
            {
                "transport_socket": {"name": _TLS_SOCKET, "typed_config": context},
                "filters": [_http_manager(SERVER_LISTENER, route, headers)],
            }
        ],
    }


def _client_listener(client: ClientListener) -> dict[str, Any]:
    headers = [
        _header(UPSTREAM_PEER_URI_SAN_HEADER, "%UPSTREAM_PEER_URI_SAN%"),
        _header(UPSTREAM_PEER_ISSUER_HEADER, "%UPSTREAM_PEER_ISSUER%"),
        _header(UPSTREAM_PEER_CERT_HEADER, "%UPSTREAM_PEER_CERT%"),
    ]
    return {
        "name": client.name,
        "stat_prefix": client.name,
        "address": _socket_address(client.port),
        "filter_chains": [{"filters": [_http_manager(client.name, {"route": {"cluster": client.name}}, headers)]}],
    }


def _peer_cluster(client: ClientListener, sds: SdsServer) -> dict[str, Any]:
    protocol: dict[str, Any] = {
        "@type": f"type.googleapis.com/{_HTTP_OPTIONS}",
        "explicit_http_config": {"http_protocol_options": {}},
    }
    context: dict[str, Any] = {
        "@type": _TLS_TYPE + "UpstreamTlsContext",
        "common_tls_context": _common_tls(
            client.certificate_secret, client.validation_secret, client.peer_spiffe_ids, sds
        ),
    }
    if client.new_handshake_per_request:
        # One request per connection and no session cache: every request is a full handshake, so it
        # sees the certificates SDS delivered last.
        protocol["common_http_protocol_options"] = {"max_requests_per_connection": 1}
        context["max_session_keys"] = 0
    if client.sni:
        context["sni"] = client.sni
    return {
        "name": client.name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "typed_extension_protocol_options": {_HTTP_OPTIONS: protocol},
        "load_assignment": _single_endpoint(client.name, _socket_address(client.peer_port, client.peer_host)),
        "transport_socket": {"name": _TLS_SOCKET, "typed_config": context},
    }
