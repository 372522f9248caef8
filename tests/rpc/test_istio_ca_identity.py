"""TokenReview caching against the token's exp (fake clock) and ImpersonatedIdentity, on the real API server."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest

from ca_service.errors import PolicyViolationError
from ca_service.pki.certs import spiffe_id_of
from ca_service.pki.identity import SpiffeId, TrustDomain
from ca_service.rpc.authn import CallCredentials
from ca_service.rpc.impersonation import ImpersonationPolicy, KubernetesPodDirectory
from ca_service.rpc.token_review import (
    KubernetesCaller,
    KubernetesTokenAuthenticator,
    KubernetesTokenReviewer,
    token_expiry,
)
from ca_service.telemetry import Telemetry
from tests.clock import FakeClock
from tests.rpc.istio_fixtures import Kube, create, csr_pem, new_key, pem_certs

TD = TrustDomain("cluster.local")


def _call(token: str) -> CallCredentials:
    return CallCredentials(node_id="peer", invocation_metadata={"authorization": f"Bearer {token}"}, peer="peer")


async def test_a_cached_review_never_outlives_the_token(kube: Kube) -> None:
    ns = kube.cluster.fresh_namespace("cache")
    workload = kube.workload(ns, seconds=600)  # the API server's shortest token
    exp = token_expiry(workload.token)
    assert exp is not None
    clock = FakeClock(exp - dt.timedelta(seconds=600))
    telemetry = Telemetry()
    api = kube.cluster.api_client()
    authn = KubernetesTokenAuthenticator({"Kubernetes": KubernetesTokenReviewer(api)}, audiences=["istio-ca"],
                                         trust_domain=TD, cache_ttl=dt.timedelta(hours=1), clock=clock,
                                         telemetry=telemetry)

    def reviews() -> float:
        return telemetry.registry.get_sample_value("ca_token_reviews_total", {"result": "accepted"}) or 0.0

    await authn.authenticate(_call(workload.token))
    clock.set(exp - dt.timedelta(seconds=1))
    await authn.authenticate(_call(workload.token))
    assert reviews() == 1  # within both the cache TTL and the token's life: cached
    clock.set(exp)
    caller = await authn.authenticate(_call(workload.token))
    assert reviews() == 2  # the cache TTL (1 h) is not over, but the token's exp is: reviewed again
    assert isinstance(caller, KubernetesCaller)
    assert str(caller.spiffe_id) == f"spiffe://cluster.local{workload.path}"
    api.close()


def test_the_expiry_of_a_token_that_is_not_a_jwt_is_unknown() -> None:
    assert token_expiry("not-a-jwt") is None
    assert token_expiry("a.!!!.c") is None
    assert token_expiry("a.eyJleHAiOiJzb29uIn0.c") is None  # {"exp":"soon"}


async def _node_agent(kube: Kube, node: str) -> tuple[str, str]:
    """A ztunnel-like caller in its own namespace: (namespace, pod-bound token)."""
    ns = kube.cluster.fresh_namespace("istio")
    kube.service_account(ns, "ztunnel")
    pod = kube.pod(ns, "ztunnel", node)
    return ns, kube.token(ns, "ztunnel", pod=pod)


async def test_a_trusted_node_agent_gets_the_certificate_of_a_pod_on_its_node(tmp_path: object, kube: Kube) -> None:
    from tests.rpc.istio_fixtures import istio_settings, start_stack

    agent_ns, agent_token = await _node_agent(kube, "node-a")
    stack = await start_stack(istio_settings(tmp_path, kube.cluster.kubeconfig,  # type: ignore[arg-type]
                                             trusted_node_accounts=[f"{agent_ns}/ztunnel"]))
    try:
        ns = kube.cluster.fresh_namespace("app")
        on_node = kube.service_account(ns)
        kube.pod(ns, on_node, "node-a")
        elsewhere = kube.service_account(ns)
        kube.pod(ns, elsewhere, "node-b")
        async with stack.channel() as channel:
            target = f"spiffe://cluster.local/ns/{ns}/sa/{on_node}"
            chain = await create(channel, csr_pem(new_key()), token=agent_token,
                                 struct={"ImpersonatedIdentity": target})
            assert str(spiffe_id_of(pem_certs(chain[0])[0])) == target
            for denied in (f"spiffe://cluster.local/ns/{ns}/sa/{elsewhere}",  # its pod runs on another node
                           f"spiffe://other.domain/ns/{ns}/sa/{on_node}",  # not our trust domain
                           "spiffe://cluster.local/not-a-workload"):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await create(channel, csr_pem(new_key()), token=agent_token,
                                 struct={"ImpersonatedIdentity": denied})
                assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED, denied
        records = list(stack.istio.ledger.live(dt.datetime.now(dt.UTC), spiffe_id=target))
        assert [(r.caller, r.method) for r in records] == [(f"spiffe://cluster.local/ns/{agent_ns}/sa/ztunnel",
                                                           "kubernetes-jwt")]
    finally:
        await stack.component.stop()


async def test_a_node_agent_without_a_pod_bound_token_may_not_impersonate(kube: Kube) -> None:
    ns = kube.cluster.fresh_namespace("istio")
    api = kube.cluster.api_client()
    policy = ImpersonationPolicy([f"{ns}/ztunnel"], TD, {"Kubernetes": KubernetesPodDirectory(api)},
                                 clock=FakeClock(), node_ttl=dt.timedelta(minutes=1), telemetry=Telemetry())
    caller = KubernetesCaller(SpiffeId.for_service_account(TD, ns, "ztunnel"), "peer", "kubernetes-jwt", ns,
                              "ztunnel", cluster_id="Kubernetes", pod_name=None)
    with pytest.raises(PolicyViolationError, match="not bound to a pod"):
        await policy.entitled(caller, {"ImpersonatedIdentity": "spiffe://cluster.local/ns/a/sa/b"})
    api.close()


async def test_impersonation_with_the_pods_api_down_is_unavailable_and_the_server_stays_up(
        tmp_path: object, kube: Kube) -> None:
    from kubernetes import client

    from tests.rpc.istio_fixtures import istio_settings, start_stack

    agent_ns, agent_token = await _node_agent(kube, "node-a")
    down = client.Configuration()
    down.host, down.retries = "https://127.0.0.1:1", False  # nobody listens there
    api = client.ApiClient(down)
    stack = await start_stack(istio_settings(tmp_path, kube.cluster.kubeconfig,  # type: ignore[arg-type]
                                             trusted_node_accounts=[f"{agent_ns}/ztunnel"]),
                              pods={"Kubernetes": KubernetesPodDirectory(api)})
    try:
        async with stack.channel() as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await create(channel, csr_pem(new_key()), token=agent_token,
                             struct={"ImpersonatedIdentity": f"spiffe://cluster.local/ns/{agent_ns}/sa/app"})
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE  # retry later: nothing was signed
            chain = await create(channel, csr_pem(new_key()), token=agent_token)  # its own identity: no pods read
            assert str(spiffe_id_of(pem_certs(chain[0])[0])) == f"spiffe://cluster.local/ns/{agent_ns}/sa/ztunnel"
        assert [r.spiffe_id for r in stack.istio.ledger.live(dt.datetime.now(dt.UTC), namespace=agent_ns)] == [
            f"spiffe://cluster.local/ns/{agent_ns}/sa/ztunnel"]  # the impersonated one was never signed
    finally:
        await stack.component.stop()
        api.close()


async def test_a_tokenreview_that_cannot_be_made_is_unavailable_not_a_rejection(
        tmp_path: object, kube: Kube, caplog: pytest.LogCaptureFixture) -> None:
    """The API server down (a port nobody listens on) or refusing the review (a service account without RBAC
    on tokenreviews): the token was not judged, so the agent hears "retry later"; nothing is cached."""
    from kubernetes import client

    from tests.rpc.istio_fixtures import istio_settings, start_stack

    ns = kube.cluster.fresh_namespace("agent")
    workload = kube.workload(ns)
    admin = kube.cluster.api_client()
    down = client.Configuration()
    down.host, down.retries = "https://127.0.0.1:1", False
    reader = kube.service_account(ns)
    refused = client.Configuration()
    refused.host, refused.ssl_ca_cert = admin.configuration.host, admin.configuration.ssl_ca_cert
    refused.api_key = {"authorization": f"Bearer {kube.token(ns, reader, audiences=())}"}
    for configuration, why in ((down, "NewConnectionError"), (refused, "ForbiddenException (HTTP 403)")):
        caplog.clear()
        api = client.ApiClient(configuration)
        stack = await start_stack(istio_settings(tmp_path, kube.cluster.kubeconfig),  # type: ignore[arg-type]
                                  reviewers={"Kubernetes": KubernetesTokenReviewer(api)})
        try:
            # Its series exists before the first failure (the alert's increase() needs a sample before it).
            assert stack.telemetry.registry.get_sample_value("ca_token_reviews_total", {"result": "error"}) == 0
            async with stack.channel() as channel:
                for _ in range(2):  # the failure is not cached: asked again, failing again
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await create(channel, csr_pem(new_key()), token=workload.token)
                    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
            assert stack.telemetry.registry.get_sample_value("ca_token_reviews_total", {"result": "error"}) == 2
            # The log names the cluster and why (the HTTP status when the API answered), for the runbook.
            refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
            assert refusals == [f"CreateCertificate refused: cluster 'Kubernetes': TokenReview failed: {why}"] * 2
        finally:
            await stack.component.stop()
            api.close()
    admin.close()
