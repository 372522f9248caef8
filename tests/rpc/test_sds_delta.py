"""DeltaSecrets against the real server with a plain gRPC client."""

from __future__ import annotations

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from ca_service.pki.identity import SpiffeId
from ca_service.rpc.sds_resources import SECRET_TYPE_URL
from tests.clock import FakeClock
from tests.rpc.sds_fixtures import SdsStack, node, peer_bundle, read

EU = "spiffe://eu.cluster.local"
A_ID = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/a")


def delta(subscribe: list[str] = (), unsubscribe: list[str] = (), *, first: bool = False, nonce: str = "",  # type: ignore[assignment]
          initial: dict[str, str] | None = None, error: str | None = None) -> discovery_pb2.DeltaDiscoveryRequest:
    req = discovery_pb2.DeltaDiscoveryRequest(
        node=node("a") if first else None, type_url=SECRET_TYPE_URL, resource_names_subscribe=subscribe,
        resource_names_unsubscribe=unsubscribe, response_nonce=nonce, initial_resource_versions=initial or {})
    if error is not None:
        req.error_detail.message = error
    return req


def names(response: discovery_pb2.DeltaDiscoveryResponse) -> set[str]:
    return {r.name for r in response.resources}


async def test_subscribe_sends_each_resource_with_its_own_version(stub: sds_pb2_grpc.SecretDiscoveryServiceStub):
    call = stub.DeltaSecrets()
    await call.write(delta(["default", "ROOTCA"], first=True))
    response = await read(call)
    assert names(response) == {"default", "ROOTCA"}
    assert all(r.version for r in response.resources) and response.nonce
    call.cancel()


async def test_removed_trust_domain_is_sent_as_removed_resource(
        sds: SdsStack, stub: sds_pb2_grpc.SecretDiscoveryServiceStub, clock: FakeClock):
    sds.trust.set_peer(peer_bundle("eu.cluster.local", clock.now()))
    call = stub.DeltaSecrets()
    await call.write(delta([EU], first=True))
    first = await read(call)
    assert names(first) == {EU}
    await call.write(delta(nonce=first.nonce))  # ACK
    sds.trust.remove_peer(SpiffeId.parse(EU).trust_domain)
    removal = await read(call)
    assert list(removal.removed_resources) == [EU] and not removal.resources
    call.cancel()


async def test_unsubscribed_names_get_no_more_pushes(sds: SdsStack, stub: sds_pb2_grpc.SecretDiscoveryServiceStub,
                                                    clock: FakeClock):
    call = stub.DeltaSecrets()
    await call.write(delta(["default", "ROOTCA"], first=True))
    first = await read(call)
    await call.write(delta(unsubscribe=["default"], nonce=first.nonce))
    # Requests are handled in order: once this answer is here, the unsubscribe was processed.
    await call.write(delta(["spiffe://cluster.local"]))
    assert names(await read(call)) == {"spiffe://cluster.local"}
    sds.registry.reissue(node("a").id, A_ID, reason="test")
    sds.trust.set_peer(peer_bundle("eu.cluster.local", clock.now()))
    assert names(await read(call)) == {"ROOTCA"}  # the SVID push did not come: default was unsubscribed
    call.cancel()


async def test_initial_resource_versions_suppress_unchanged_resources(
        sds: SdsStack, stub: sds_pb2_grpc.SecretDiscoveryServiceStub):
    call = stub.DeltaSecrets()
    await call.write(delta(["default", "ROOTCA"], first=True))
    versions = {r.name: r.version for r in (await read(call)).resources}
    call.cancel()
    reconnect = stub.DeltaSecrets()
    await reconnect.write(delta(["default", "ROOTCA"], first=True, initial=versions))
    sds.registry.reissue(node("a").id, A_ID, reason="test")
    response = await read(reconnect)  # only the renewal: nothing was resent for the reconnect
    assert names(response) == {"default"} and response.resources[0].version != versions["default"]
    reconnect.cancel()


async def test_delta_nack_is_counted(sds: SdsStack, stub: sds_pb2_grpc.SecretDiscoveryServiceStub):
    call = stub.DeltaSecrets()
    await call.write(delta(["default"], first=True))
    first = await read(call)
    await call.write(delta(nonce=first.nonce, error="rejected"))
    await call.write(delta(["spiffe://cluster.local"]))
    assert names(await read(call)) == {"spiffe://cluster.local"}  # handled in order: no resend of default before
    assert sds.metric("ca_sds_nacks_total", api="delta") == 1
    call.cancel()


async def test_delta_refuses_another_identitys_svid(stub: sds_pb2_grpc.SecretDiscoveryServiceStub):
    call = stub.DeltaSecrets()
    await call.write(delta(["spiffe://cluster.local/ns/default/sa/other"], first=True))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await read(call)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
