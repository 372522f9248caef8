"""ImpersonatedIdentity's reads of the cluster's pods, on the real API server: a node agent's herd of CSRs
shares them, the caller's node is kept per pod UID (and only that), and nothing that refuses is kept.

Callers come from real TokenReviews of pod-bound tokens (so the pod UID is the one the API server vouches
for); the pod directory is the real one, wrapped only to count the reads it makes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections import Counter
from typing import Any

import pytest

from ca_service.errors import PolicyViolationError
from ca_service.pki.identity import TrustDomain
from ca_service.rpc.authn import CallCredentials
from ca_service.rpc.impersonation import ImpersonationPolicy, KubernetesPodDirectory
from ca_service.rpc.token_review import KubernetesCaller, KubernetesTokenAuthenticator, KubernetesTokenReviewer
from ca_service.telemetry import Telemetry
from tests.clock import FakeClock
from tests.rpc.istio_fixtures import Kube

TD = TrustDomain("cluster.local")
TTL = dt.timedelta(minutes=1)
KEY = "ImpersonatedIdentity"


class CountedPods(KubernetesPodDirectory):
    """The real directory, counting the API reads it makes (from the policy's worker threads)."""

    def __init__(self, api: Any) -> None:
        super().__init__(api)
        self.reads: Counter[str] = Counter()
        self._lock = threading.Lock()

    def node_of_pod(self, namespace: str, name: str, uid: str | None) -> str | None:
        with self._lock:
            self.reads["node"] += 1
        return super().node_of_pod(namespace, name, uid)

    def accounts_on_node(self, namespace: str, node: str) -> frozenset[str]:
        with self._lock:
            self.reads["pods"] += 1
        return super().accounts_on_node(namespace, node)


class Setup:
    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self.agent_ns = kube.cluster.fresh_namespace("istio")
        kube.service_account(self.agent_ns, "ztunnel")
        self.api = kube.cluster.api_client()
        self.clock = FakeClock()
        self.telemetry = Telemetry()
        self.pods = CountedPods(self.api)
        self.policy = ImpersonationPolicy([f"{self.agent_ns}/ztunnel"], TD, {"Kubernetes": self.pods},
                                          clock=self.clock, node_ttl=TTL, telemetry=self.telemetry)
        self.authn = KubernetesTokenAuthenticator({"Kubernetes": KubernetesTokenReviewer(self.api)},
                                                  audiences=["istio-ca"], trust_domain=TD, cache_ttl=TTL,
                                                  clock=self.clock, telemetry=self.telemetry)

    async def agent(self, node: str, *, name: str | None = None) -> KubernetesCaller:
        """A ztunnel pod on ``node`` and the caller its pod-bound token authenticates as."""
        pod = self.kube.pod(self.agent_ns, "ztunnel", node, name=name)
        token = self.kube.token(self.agent_ns, "ztunnel", pod=pod)
        caller = await self.authn.authenticate(CallCredentials(
            node_id="ztunnel", invocation_metadata={"authorization": f"Bearer {token}"}, peer="peer"))
        assert isinstance(caller, KubernetesCaller) and caller.pod_uid, caller
        return caller

    def looked_up(self, lookup: str, source: str) -> float:
        return self.telemetry.registry.get_sample_value(
            "ca_impersonation_lookups_total", {"lookup": lookup, "source": source}) or 0.0

    def close(self) -> None:
        self.api.close()


@pytest.fixture
def setup(kube: Kube) -> Any:
    s = Setup(kube)
    yield s
    s.close()


def _target(ns: str, sa: str) -> dict[str, str]:
    return {KEY: f"spiffe://cluster.local/ns/{ns}/sa/{sa}"}


async def test_a_node_agents_herd_reads_its_node_and_each_namespace_once(setup: Setup) -> None:
    caller = await setup.agent("node-a")
    ns = setup.kube.cluster.fresh_namespace("app")
    here = [setup.kube.service_account(ns) for _ in range(4)]
    for sa in here:
        setup.kube.pod(ns, sa, "node-a")
    elsewhere = setup.kube.service_account(ns)
    setup.kube.pod(ns, elsewhere, "node-b")

    # What ztunnel does when it starts: a CSR for every pod of its node at once (and two that it may not have).
    asks = [_target(ns, sa) for sa in here for _ in range(10)] + [_target(ns, elsewhere)] * 2
    results = await asyncio.gather(*(setup.policy.entitled(caller, ask) for ask in asks), return_exceptions=True)
    granted = [str(r) for r in results if not isinstance(r, BaseException)]
    assert sorted(granted) == sorted(ask[KEY] for ask in asks[:40])
    assert all(isinstance(r, PolicyViolationError) for r in results[40:])
    assert setup.pods.reads == {"node": 1, "pods": 1}  # 42 CSRs, two API reads
    assert (setup.looked_up("node", "api"), setup.looked_up("node", "shared")) == (1, 41)
    assert (setup.looked_up("pods", "api"), setup.looked_up("pods", "shared")) == (1, 41)

    # Later CSRs, one at a time: the caller's node is kept, the namespace's pods are read again each time.
    for sa in here[:3]:
        assert str(await setup.policy.entitled(caller, _target(ns, sa))).endswith(f"/sa/{sa}")
    assert setup.pods.reads == {"node": 1, "pods": 4}
    assert setup.looked_up("node", "cache") == 3


async def test_the_callers_node_is_kept_per_pod_uid_and_never_past_its_ttl(setup: Setup) -> None:
    ns = setup.kube.cluster.fresh_namespace("app")
    on_a, on_b = setup.kube.service_account(ns), setup.kube.service_account(ns)
    setup.kube.pod(ns, on_a, "node-a")
    setup.kube.pod(ns, on_b, "node-b")
    first = await setup.agent("node-a", name="ztunnel-0")
    assert str(await setup.policy.entitled(first, _target(ns, on_a))) == _target(ns, on_a)[KEY]

    # The agent's pod is replaced by one of the same name on another node: another UID, looked up afresh.
    setup.kube.delete_pod(setup.agent_ns, "ztunnel-0")
    second = await setup.agent("node-b", name="ztunnel-0")
    assert second.pod_uid != first.pod_uid
    assert str(await setup.policy.entitled(second, _target(ns, on_b))) == _target(ns, on_b)[KEY]
    with pytest.raises(PolicyViolationError, match="no pod of"):
        await setup.policy.entitled(second, _target(ns, on_a))

    # The first pod's node is kept for its TTL (the window the TokenReview cache gives its token too) ...
    assert str(await setup.policy.entitled(first, _target(ns, on_a))) == _target(ns, on_a)[KEY]
    # ... and not a moment longer: then the pod found under that name is not the token's, and it is refused.
    setup.clock.advance(TTL)
    with pytest.raises(PolicyViolationError, match="is gone or not on a node"):
        await setup.policy.entitled(first, _target(ns, on_a))
    assert setup.pods.reads["node"] == 3


async def test_a_refusal_is_never_kept_and_a_deleted_pod_stops_being_minted_at_once(setup: Setup) -> None:
    caller = await setup.agent("node-a")
    ns = setup.kube.cluster.fresh_namespace("app")
    sa = setup.kube.service_account(ns)
    with pytest.raises(PolicyViolationError, match="no pod of"):
        await setup.policy.entitled(caller, _target(ns, sa))
    pod = setup.kube.pod(ns, sa, "node-a")  # just scheduled: the agent's retry gets it, with no clock moved
    assert str(await setup.policy.entitled(caller, _target(ns, sa))) == _target(ns, sa)[KEY]
    setup.kube.delete_pod(ns, pod)
    with pytest.raises(PolicyViolationError, match="no pod of"):
        await setup.policy.entitled(caller, _target(ns, sa))


async def test_a_pods_api_that_is_down_or_refuses_us_means_retry_later_and_nothing_signed(setup: Setup) -> None:
    from kubernetes import client

    from ca_service.errors import NotReadyError

    caller = await setup.agent("node-a")
    ns = setup.kube.cluster.fresh_namespace("app")
    sa = setup.kube.service_account(ns)
    setup.kube.pod(ns, sa, "node-a")
    # Down: the real client against a loopback port nobody listens on.
    down = client.Configuration()
    down.host, down.retries = "https://127.0.0.1:1", False
    cases = [(down, "reading the caller's pod failed: NewConnectionError")]
    # Refusing us: the real API server, asked by service accounts with no RBAC on pods, and with `get` on the
    # agent's pods but no `list` in the target's namespace (so the second read is the one refused).
    rbac = client.RbacAuthorizationV1Api(setup.api)
    rbac.create_namespaced_role(setup.agent_ns, client.V1Role(
        metadata=client.V1ObjectMeta(name="get-pods"),
        rules=[client.V1PolicyRule(api_groups=[""], resources=["pods"], verbs=["get"])]))
    for reader, refused_at in ((setup.kube.service_account(setup.agent_ns), "reading the caller's pod"),
                               (setup.kube.service_account(setup.agent_ns), "listing the pods on the caller's node")):
        if refused_at.startswith("listing"):
            rbac.create_namespaced_role_binding(setup.agent_ns, client.V1RoleBinding(
                metadata=client.V1ObjectMeta(name=reader),
                role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="get-pods"),
                subjects=[client.RbacV1Subject(kind="ServiceAccount", name=reader, namespace=setup.agent_ns)]))
        refused = client.Configuration()
        refused.host = setup.api.configuration.host
        refused.ssl_ca_cert = setup.api.configuration.ssl_ca_cert
        token = setup.kube.token(setup.agent_ns, reader, audiences=())  # the API server's own audiences
        refused.api_key = {"authorization": f"Bearer {token}"}
        cases.append((refused, f"{refused_at} failed: ForbiddenException (HTTP 403)"))
    for configuration, shown in cases:
        api = client.ApiClient(configuration)
        policy = ImpersonationPolicy([f"{setup.agent_ns}/ztunnel"], TD, {"Kubernetes": KubernetesPodDirectory(api)},
                                     clock=setup.clock, node_ttl=TTL, telemetry=setup.telemetry)
        with pytest.raises(NotReadyError) as caught:
            await policy.entitled(caller, _target(ns, sa))
        assert str(caught.value) == f"cluster 'Kubernetes': {shown}"
        api.close()
    # With a working API the same ask is granted.
    assert str(await setup.policy.entitled(caller, _target(ns, sa))) == _target(ns, sa)[KEY]
