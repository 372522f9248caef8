"""Caller authentication and listener policy, and what a stream sees on graceful shutdown."""

from __future__ import annotations

import grpc
import pytest
from envoy.service.secret.v3 import sds_pb2_grpc

from ca_service.config import ListenerPolicy
from ca_service.errors import AuthenticationError, PolicyViolationError
from ca_service.pki.identity import SpiffeId, TrustDomain
from ca_service.rpc.authn import (
    AuthenticatorChain,
    CallCredentials,
    Caller,
    NodeMetadataAuthenticator,
    PeerCertificateAuthenticator,
    authenticate,
    check_policy,
)
from tests.rpc.sds_fixtures import SdsStack, read, request
from tests.rpc.sds_fixtures import node as make_node

TD = TrustDomain("cluster.local")
ISTIO_ID = "sidecar~10.0.0.1~web-1.shop~shop.svc.cluster.local"


async def test_namespace_falls_back_to_the_istio_node_id():
    caller = await NodeMetadataAuthenticator(TD).authenticate(
        CallCredentials(ISTIO_ID, {"SERVICE_ACCOUNT": "web"}))
    assert caller is not None and caller.spiffe_id == SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web")


@pytest.mark.parametrize("metadata", [{}, {"NAMESPACE": "shop"}, {"SERVICE_ACCOUNT": "a/b", "NAMESPACE": "shop"}],
                         ids=["nothing", "no service account", "service account that breaks the SPIFFE ID"])
async def test_node_metadata_without_a_usable_identity_is_refused(metadata):  # type: ignore[no-untyped-def]
    with pytest.raises(AuthenticationError):
        await NodeMetadataAuthenticator(TD).authenticate(CallCredentials("not-istio", metadata))


async def test_a_listener_without_authenticators_refuses_every_caller():
    with pytest.raises(AuthenticationError):
        await authenticate(AuthenticatorChain([]), CallCredentials(ISTIO_ID, {"NAMESPACE": "shop",
                                                                              "SERVICE_ACCOUNT": "web"}))


async def test_peer_certificate_authenticator_ignores_calls_without_a_verified_certificate():
    assert await PeerCertificateAuthenticator().authenticate(CallCredentials(ISTIO_ID)) is None


@pytest.mark.parametrize(("policy", "allowed"), [
    (ListenerPolicy(), True),
    (ListenerPolicy(allowed_namespaces=("shop",)), True),
    (ListenerPolicy(allowed_namespaces=("bank",)), False),
    (ListenerPolicy(allowed_spiffe_ids=("spiffe://cluster.local/ns/shop/*",)), True),
    (ListenerPolicy(allowed_spiffe_ids=("spiffe://cluster.local/ns/bank/*",)), False),
])
def test_listener_policy(policy: ListenerPolicy, allowed: bool):
    caller = Caller(SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web"), ISTIO_ID, "test", "shop", "web")
    if allowed:
        check_policy(policy, caller)
    else:
        with pytest.raises(PolicyViolationError):
            check_policy(policy, caller)


async def test_graceful_shutdown_ends_open_streams_with_ok(sds: SdsStack):
    async with grpc.aio.insecure_channel(sds.address(0)) as channel:
        call = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).StreamSecrets()
        await call.write(request(["default"], n=make_node("a")))
        await read(call)
        await sds.component.stop()
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
