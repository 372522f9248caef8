"""What an SDS client may cost: forgotten nodes (fake clock), request size bounds, stream admission."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import grpc
import pytest
from cryptography import x509
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from ca_service.config import GrpcListener, RotationSettings
from ca_service.rpc.admission import StreamAdmission
from ca_service.rpc.sds_listeners import SdsComponent
from ca_service.rpc.sds_resources import SECRET_TYPE_URL
from ca_service.services.admission import TokenBucket
from ca_service.services.authority import Authority
from ca_service.services.trust import TrustStore
from ca_service.services.workloads import WorkloadRegistry
from ca_service.settings import SdsLimits
from ca_service.telemetry import Telemetry
from tests.clock import FakeClock
from tests.rpc.sds_fixtures import SdsStack, node, read, request, secrets_of
from tests.waiting import wait_for

GRACE = dt.timedelta(minutes=5)


async def _serial_of_a_new_stream(stub: sds_pb2_grpc.SecretDiscoveryServiceStub, sds: SdsStack, node_id: str) -> int:
    call = stub.StreamSecrets()
    await call.write(request(["default"], n=node("a", node_id=node_id)))
    response = await read(call)
    chain = secrets_of(response)["default"].tls_certificate.certificate_chain.inline_bytes
    call.cancel()
    await wait_for(lambda: sds.component.hub.open_streams(node_id) == 0, "the stream to close")
    return x509.load_pem_x509_certificates(chain)[0].serial_number


async def test_a_node_back_within_the_grace_period_keeps_its_svid_and_one_gone_longer_is_forgotten(
        sds: SdsStack, stub: sds_pb2_grpc.SecretDiscoveryServiceStub, clock: FakeClock) -> None:
    first = await _serial_of_a_new_stream(stub, sds, "node-1")
    clock.advance(GRACE - dt.timedelta(seconds=1))
    sds.registry.due(clock.now())
    assert len(sds.registry) == 1
    assert await _serial_of_a_new_stream(stub, sds, "node-1") == first  # reconnected in time: same SVID

    clock.advance(GRACE)
    assert sds.registry.due(clock.now()) == []  # forgotten, so not renewed
    assert len(sds.registry) == 0 and len(sds.registry.expiry) == 0
    assert await _serial_of_a_new_stream(stub, sds, "node-1") != first


async def test_a_node_with_an_open_stream_is_never_forgotten(
        sds: SdsStack, stub: sds_pb2_grpc.SecretDiscoveryServiceStub, clock: FakeClock) -> None:
    call = stub.StreamSecrets()
    await call.write(request(["default"], n=node("a", node_id="node-open")))
    await read(call)
    await _serial_of_a_new_stream(stub, sds, "node-gone")
    clock.advance(GRACE * 10)
    sds.registry.due(clock.now())
    assert [c.node_id for c in sds.registry] == ["node-open"]
    call.cancel()


async def test_a_node_that_only_fetched_is_forgotten_after_the_grace_period(
        sds: SdsStack, stub: sds_pb2_grpc.SecretDiscoveryServiceStub, clock: FakeClock) -> None:
    await stub.FetchSecrets(request(["default"], n=node("a", node_id="fetcher")))
    assert len(sds.registry) == 1
    clock.advance(GRACE)
    sds.registry.due(clock.now())
    assert len(sds.registry) == 0


OVERSIZE = [
    ("node.id is 2000 bytes; the limit is 1024", request(["default"], n=node("a", node_id="x" * 2000))),
    ("resource_names has 300 names; the limit is 256", request([f"n{i}" for i in range(300)], n=node("a"))),
    ("a name in resource_names is 2000 bytes; the limit is 1024", request(["x" * 2000], n=node("a"))),
]


@pytest.mark.parametrize(("message", "req"), OVERSIZE, ids=["node_id", "name_count", "name_size"])
async def test_an_oversize_request_gets_invalid_argument_naming_the_bound_and_no_svid(
        sds: SdsStack, stub: sds_pb2_grpc.SecretDiscoveryServiceStub, message: str, req: Any) -> None:
    call = stub.StreamSecrets()
    await call.write(req)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await read(call)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == message
    with pytest.raises(grpc.aio.AioRpcError) as fetched:
        await stub.FetchSecrets(req)
    assert fetched.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert len(sds.registry) == 0


async def test_oversize_node_metadata_and_delta_names_are_refused(
        sds: SdsStack, stub: sds_pb2_grpc.SecretDiscoveryServiceStub) -> None:
    big = node("a")
    big.metadata.update({"PAD": "x" * 100_000})
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.FetchSecrets(request(["default"], n=big))
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith("node.metadata is ")
    call = stub.DeltaSecrets()
    await call.write(discovery_pb2.DeltaDiscoveryRequest(
        node=node("a"), type_url=SECRET_TYPE_URL, resource_names_subscribe=["y" * 5000]))
    with pytest.raises(grpc.aio.AioRpcError) as delta:
        await read(call)
    assert delta.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert len(sds.registry) == 0


def test_the_token_bucket_admits_the_burst_then_the_rate() -> None:
    bucket = TokenBucket.full(rate=10, burst=5, now=0.0)
    assert [bucket.take(0.0) == 0.0 for _ in range(7)] == [True] * 5 + [False] * 2
    assert bucket.take(0.0) == pytest.approx(0.1)  # an empty bucket says when the next token comes
    assert [bucket.take(0.25) == 0.0 for _ in range(3)] == [True, True, False]  # 2.5 tokens
    with pytest.raises(ValueError):
        TokenBucket.full(rate=0, burst=5, now=0.0)


async def _envoy_like_client(address: str, index: int) -> int:
    """Open a stream and read its SVID, retrying RESOURCE_EXHAUSTED with Envoy's jittered backoff."""
    attempts, delay = 0, 0.05
    async with grpc.aio.insecure_channel(address) as channel:
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        while True:
            attempts += 1
            call = stub.StreamSecrets()
            try:
                await call.write(request(["default"], n=node(f"sa{index}", node_id=f"storm-{index}")))
            except grpc.aio.AioRpcError:
                # grpc.aio's client reports a write racing the server's refusal as INTERNAL ("Internal
                # error from Core") instead of the status; Envoy reads the trailers. Retried all the same.
                pass
            else:
                try:
                    await read(call)
                    call.cancel()
                    return attempts
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                    assert exc.details() == StreamAdmission.MESSAGE
            await asyncio.sleep(delay * (0.5 + (index * 7919 % 100) / 100))
            delay = min(delay * 2, 1.0)


async def test_a_connect_storm_is_shed_with_resource_exhausted_and_every_client_is_served_after_retries(
        authority: Authority, clock: FakeClock) -> None:
    registry = WorkloadRegistry(authority, RotationSettings(), clock)
    telemetry = Telemetry()
    limits = SdsLimits(admission_rate=100, admission_burst=20)
    component = SdsComponent([GrpcListener(address="127.0.0.1:0", trust_node_metadata=True)], registry=registry,
                             trust=TrustStore(authority), telemetry=telemetry, limits=limits,
                             grace=dt.timedelta(seconds=1))
    await component.start()
    try:
        attempts = await asyncio.gather(*(_envoy_like_client(component.bound_addresses[0], i) for i in range(300)))
    finally:
        await component.stop()
    assert len(attempts) == 300 and len(registry) == 300
    shed = telemetry.registry.get_sample_value("ca_sds_streams_shed_total") or 0
    assert shed > 0 and sum(attempts) - 300 == shed
