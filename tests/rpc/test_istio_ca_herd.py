"""A herd of CSRs: accepted ones are valid, the rest RESOURCE_EXHAUSTED with a retry hint, SDS still served."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from ca_service.pki.certs import spiffe_id_of
from ca_service.pki.verify import verify_svid
from ca_service.rpc.generated.istio.v1.auth import ca_pb2, ca_pb2_grpc
from tests.rpc.istio_fixtures import RPC_TIMEOUT, IstioStack, Kube, create, csr_pem, identity_pem, new_key, pem_certs
from tests.rpc.sds_fixtures import read, request

# Channels the herd is spread over (istio-agents each have their own; a few suffice to load the server).
CHANNELS = 8


async def _sds_served(stack: IstioStack, identity: tuple[bytes, bytes]) -> str:
    async with stack.channel(1, identity=identity) as channel:
        call = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).StreamSecrets()
        await call.write(request(["ROOTCA"], n=base_pb2.Node(id="sds-during-herd")))
        response = await read(call)
        call.cancel()
        return str(response.version_info)


async def _herd(stack: IstioStack, kube: Kube, requests: int, identities: int) -> Counter[str]:
    ns = kube.cluster.fresh_namespace("herd")
    with ThreadPoolExecutor(8) as threads:  # 200 TokenRequests take a while one by one
        workloads = list(threads.map(lambda _: kube.workload(ns), range(identities)))
    jobs = [(workloads[i % identities], csr_pem(new_key())) for i in range(requests)]
    sds_key = new_key()
    async with stack.channel() as channel:
        sds_identity = identity_pem(sds_key, await create(channel, csr_pem(sds_key), token=workloads[0].token))
    channels = [stack.channel() for _ in range(CHANNELS)]
    stubs = [ca_pb2_grpc.IstioCertificateServiceStub(c) for c in channels]

    async def one(i: int) -> tuple[str, object]:
        workload, csr = jobs[i]
        call = stubs[i % CHANNELS].CreateCertificate(
            ca_pb2.IstioCertificateRequest(csr=csr), timeout=RPC_TIMEOUT,
            metadata=[("authorization", f"Bearer {workload.token}"), ("clusterid", "Kubernetes")])
        try:
            return workload.path, list((await call).cert_chain)
        except grpc.aio.AioRpcError as exc:
            return workload.path, exc

    try:
        herd = asyncio.gather(*[one(i) for i in range(requests)])
        sds_version = await _sds_served(stack, sds_identity)  # opened while the herd is in flight
        results = await herd
    finally:
        for c in channels:
            await c.close()
    assert sds_version
    now = dt.datetime.now(dt.UTC)
    outcomes: Counter[str] = Counter()
    for path, result in results:
        if isinstance(result, grpc.aio.AioRpcError):
            outcomes[result.code().name] += 1
            assert result.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, result.details()
            assert dict(result.trailing_metadata() or ())["retry-after"].isdigit()
            continue
        outcomes["OK"] += 1
        certs = [pem_certs(p)[0] for p in result[:-1]]  # type: ignore[index]
        roots = pem_certs(result[-1])  # type: ignore[index]
        assert str(verify_svid(certs[0], certs[1:], roots, now=now)) == f"spiffe://cluster.local{path}"
        assert str(spiffe_id_of(certs[0])).endswith(path)
    assert outcomes["OK"] > 0
    print(f"herd of {requests} from {identities} identities: {dict(outcomes)}")
    return outcomes


async def test_a_herd_of_400_csrs_from_40_identities_is_served_or_told_to_retry(istio: IstioStack,
                                                                              kube: Kube) -> None:
    await _herd(istio, kube, 400, 40)


async def test_a_herd_past_the_in_flight_cap_is_told_to_retry_and_sds_is_still_served(tmp_path: object,
                                                                                     kube: Kube) -> None:
    from tests.rpc.istio_fixtures import istio_settings, start_stack

    settings = istio_settings(tmp_path, kube.cluster.kubeconfig, max_in_flight=2)  # type: ignore[arg-type]
    # The daemon's signer (a thread) makes handlers overlap (inline signing never does), and grpc.aio hands
    # calls over only a few at a time, so a cap of 2 is what a herd on this scale reliably reaches.
    stack = await start_stack(settings)
    try:
        outcomes = await _herd(stack, kube, 300, 30)
        assert outcomes["RESOURCE_EXHAUSTED"] > 0
        assert stack.metric("ca_istio_ca_rejections_total", reason="overloaded") == outcomes["RESOURCE_EXHAUSTED"]
    finally:
        await stack.component.stop()


@pytest.mark.slow
async def test_a_herd_of_2000_csrs_from_200_identities_is_served_or_told_to_retry(istio: IstioStack,
                                                                                kube: Kube) -> None:
    await _herd(istio, kube, 2000, 200)


async def test_an_identity_over_its_rate_gets_resource_exhausted_with_a_retry_hint(tmp_path: object,
                                                                                 kube: Kube) -> None:
    from tests.rpc.istio_fixtures import istio_settings, start_stack

    stack = await start_stack(istio_settings(tmp_path, kube.cluster.kubeconfig,  # type: ignore[arg-type]
                                             rate_limit_per_identity=0.01, rate_limit_burst=2))
    try:
        workload = kube.workload(kube.cluster.fresh_namespace("rate"))
        async with stack.channel() as channel:
            for _ in range(2):
                await create(channel, csr_pem(new_key()), token=workload.token)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await create(channel, csr_pem(new_key()), token=workload.token)
            other = kube.workload(workload.namespace)
            await create(channel, csr_pem(new_key()), token=other.token)  # another identity is unaffected
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert int(dict(caught.value.trailing_metadata() or ())["retry-after"]) >= 1
        assert stack.metric("ca_istio_ca_rejections_total", reason="overloaded") == 1
    finally:
        await stack.component.stop()
