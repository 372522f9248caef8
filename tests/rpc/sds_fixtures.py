"""A real SDS server on 127.0.0.1:0 (and a Unix socket) with a plain grpc.aio client, for protocol tests."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import struct_pb2

from ca_service.app import register_reactions
from ca_service.config import GrpcListener, RotationSettings
from ca_service.pki.bundle import TrustBundle
from ca_service.pki.identity import TrustDomain
from ca_service.pki.keys import KeyAlgorithm
from ca_service.rotation.minting import bootstrap_state
from ca_service.rpc.sds_listeners import SdsComponent
from ca_service.rpc.sds_resources import SECRET_TYPE_URL
from ca_service.services.authority import Authority
from ca_service.services.trust import TrustStore
from ca_service.services.workloads import WorkloadRegistry
from ca_service.telemetry import Telemetry
from tests.clock import FakeClock

# Bounded wait for a response the server must send; a test fails instead of hanging.
READ_TIMEOUT = 10.0


def node(sa: str = "a", ns: str = "default", *, node_id: str | None = None, metadata: bool = True) -> base_pb2.Node:
    meta = struct_pb2.Struct()
    if metadata:
        meta.update({"NAMESPACE": ns, "SERVICE_ACCOUNT": sa})
    istio_id = f"sidecar~10.0.0.1~{sa}-pod.{ns}~{ns}.svc.cluster.local"
    return base_pb2.Node(id=node_id if node_id is not None else istio_id, metadata=meta)


def secrets_of(response: Any) -> dict[str, secret_pb2.Secret]:
    resources = [getattr(r, "resource", r) for r in response.resources]
    out = {}
    for packed in resources:
        secret = secret_pb2.Secret()
        assert packed.Unpack(secret)
        out[secret.name] = secret
    return out


def peer_bundle(td: str, now: dt.datetime) -> TrustBundle:
    state = bootstrap_state(TrustDomain(td), algorithm=KeyAlgorithm.EC_P256, root_ttl=dt.timedelta(days=365),
                            intermediate_ttl=dt.timedelta(days=30), istiod_ttl=dt.timedelta(days=60), now=now)
    return state.bundle()


@dataclass
class SdsStack:
    authority: Authority
    registry: WorkloadRegistry
    trust: TrustStore
    telemetry: Telemetry
    component: SdsComponent

    def address(self, index: int = 0) -> str:
        return self.component.bound_addresses[index]

    def metric(self, name: str, **labels: str) -> float:
        return self.telemetry.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def sds(authority: Authority, clock: FakeClock, tmp_path: Path) -> AsyncIterator[SdsStack]:
    registry = WorkloadRegistry(authority, RotationSettings(), clock)
    trust = TrustStore(authority)
    register_reactions(authority.reactions, trust=trust)
    telemetry = Telemetry()
    listeners = [
        GrpcListener(address="127.0.0.1:0", trust_node_metadata=True),
        GrpcListener(address="127.0.0.1:0"),  # untrusted: node metadata must not count here
        GrpcListener(address=f"unix://{tmp_path}/run/sds/socket", trust_node_metadata=True, socket_mode=0o600),
    ]
    component = SdsComponent(listeners, registry=registry, trust=trust, telemetry=telemetry,
                             grace=dt.timedelta(seconds=1))
    await component.start()
    try:
        yield SdsStack(authority, registry, trust, telemetry, component)
    finally:
        await component.stop()


@pytest.fixture
async def stub(sds: SdsStack) -> AsyncIterator[sds_pb2_grpc.SecretDiscoveryServiceStub]:
    async with grpc.aio.insecure_channel(sds.address(0)) as channel:
        yield sds_pb2_grpc.SecretDiscoveryServiceStub(channel)


def request(names: list[str], *, n: base_pb2.Node | None = None, version: str = "", nonce: str = "",
            error: str | None = None) -> discovery_pb2.DiscoveryRequest:
    req = discovery_pb2.DiscoveryRequest(node=n or base_pb2.Node(), resource_names=names, type_url=SECRET_TYPE_URL,
                                         version_info=version, response_nonce=nonce)
    if error is not None:
        req.error_detail.message = error
    return req


async def read(call: Any) -> Any:
    response = await asyncio.wait_for(call.read(), READ_TIMEOUT)
    assert response is not grpc.aio.EOF, "stream ended"
    return response
