"""SDS request handling (request bounds + the SotW and Delta protocol sessions) against random request
sequences: nothing raises but the errors of the one tree, and no response ever carries a secret the
caller did not ask for (or, for a wildcard request, may not see), or an SVID of any identity but the
caller's own."""

from __future__ import annotations

import datetime as dt
import tempfile
from pathlib import Path

import pytest
from cryptography import x509
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from hypothesis import given
from hypothesis import strategies as st

from ca_service.errors import CAServiceError
from ca_service.pki.certs import spiffe_id_of
from ca_service.pki.identity import SpiffeId
from ca_service.rpc.admission import check_request
from ca_service.rpc.authn import Caller
from ca_service.rpc.sds_resources import SECRET_TYPE_URL, SecretCatalog
from ca_service.rpc.sds_sessions import DeltaSession, SotwSession
from ca_service.services.authority import Authority
from ca_service.services.trust import TrustStore
from ca_service.services.workloads import WorkloadRegistry
from ca_service.settings import CASettings, RotationSettings, SdsLimits
from ca_service.storage.directory import DirectoryStore
from tests.clock import FakeClock
from tests.properties.profiles import DEFAULT, SLOW, SLOW_TIMEOUT
from tests.rpc.sessions import on_request

CALLER = Caller(SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web"), node_id="node-1", method="test")
_DIR = tempfile.TemporaryDirectory(prefix="ca-sds-props-")  # one CA for the module; removed at exit
_CLOCK = FakeClock(dt.datetime(2030, 1, 1, tzinfo=dt.UTC))
_AUTHORITY = Authority(DirectoryStore(Path(_DIR.name) / "state"), CALLER.spiffe_id.trust_domain, CASettings(), _CLOCK)
_AUTHORITY.load_or_bootstrap()
_REGISTRY = WorkloadRegistry(_AUTHORITY, RotationSettings(), _CLOCK)
CATALOG = SecretCatalog(_REGISTRY, TrustStore(_AUTHORITY))

RESOURCE_NAMES = st.one_of(
    st.sampled_from(["default", "ROOTCA", "ALL", "spiffe://cluster.local", "spiffe://other.td",
                     str(CALLER.spiffe_id), "spiffe://cluster.local/ns/kube-system/sa/admin",
                     "spiffe://cluster.local/ns/shop/sa/web/x", "spiffe://", "", "default\n", "ROOTCA "]),
    st.text(max_size=40))
SHORT = st.text(max_size=12)
SOTW = st.builds(lambda names, version, nonce, error, node_id: _sotw(names, version, nonce, error, node_id),
                 st.lists(RESOURCE_NAMES, max_size=5), SHORT, SHORT, st.one_of(st.none(), st.text(max_size=30)),
                 st.text(max_size=20))
DELTA = st.builds(lambda sub, unsub, nonce, error: _delta(sub, unsub, nonce, error),
                  st.lists(RESOURCE_NAMES, max_size=5), st.lists(RESOURCE_NAMES, max_size=3), SHORT,
                  st.one_of(st.none(), st.text(max_size=30)))


def _sotw(names: list[str], version: str, nonce: str, error: str | None, node_id: str
          ) -> discovery_pb2.DiscoveryRequest:
    request = discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id=node_id), resource_names=names,
                                             type_url=SECRET_TYPE_URL, version_info=version, response_nonce=nonce)
    if error is not None:
        request.error_detail.message = error
    return request


def _delta(subscribe: list[str], unsubscribe: list[str], nonce: str, error: str | None
           ) -> discovery_pb2.DeltaDiscoveryRequest:
    request = discovery_pb2.DeltaDiscoveryRequest(
        resource_names_subscribe=subscribe, resource_names_unsubscribe=unsubscribe, type_url=SECRET_TYPE_URL,
        response_nonce=nonce)
    if error is not None:
        request.error_detail.message = error
    return request


def _check_response(response: object, asked: set[str]) -> None:
    for packed in response.resources:  # type: ignore[attr-defined]
        secret = secret_pb2.Secret()
        assert getattr(packed, "resource", packed).Unpack(secret)
        assert secret.name in asked, f"sent {secret.name!r}, which the caller neither asked for nor may see"
        if secret.HasField("tls_certificate"):
            leaf = x509.load_pem_x509_certificates(secret.tls_certificate.certificate_chain.inline_bytes)[0]
            assert spiffe_id_of(leaf) == CALLER.spiffe_id, f"sent an SVID of {spiffe_id_of(leaf)}"


def run(session_type: type[SotwSession] | type[DeltaSession], requests: list[object]) -> None:
    session = session_type(CATALOG, CALLER)
    # A wildcard request (no names) means every name the caller may see (README "Secret names").
    asked: set[str] = set(CATALOG.visible_names(CALLER))
    for request in requests:
        try:
            check_request(request, SdsLimits())
            asked |= set(getattr(request, "resource_names", ())) | set(
                getattr(request, "resource_names_subscribe", ()))
            step = on_request(CATALOG, session, request)
        except CAServiceError:
            return  # the servicer ends the stream with the mapped status
        for response in step.responses:
            _check_response(response, asked)


@DEFAULT
@given(st.lists(SOTW, min_size=1, max_size=6))
def test_sotw_request_sequences_never_crash_nor_leak_a_secret(requests: list[object]) -> None:
    run(SotwSession, requests)


@DEFAULT
@given(st.lists(DELTA, min_size=1, max_size=6))
def test_delta_request_sequences_never_crash_nor_leak_a_secret(requests: list[object]) -> None:
    run(DeltaSession, requests)


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT)
@SLOW
@given(st.lists(st.one_of(SOTW.map(lambda r: ("sotw", r)), DELTA.map(lambda r: ("delta", r))), min_size=1,
                max_size=6))
def test_ten_thousand_request_sequences_are_handled_within_the_error_tree(requests: list[tuple[str, object]]) -> None:
    run(SotwSession, [r for kind, r in requests if kind == "sotw"])
    run(DeltaSession, [r for kind, r in requests if kind == "delta"])
