"""The leader's Istio object writer (kube/istio_objects.py) on the real API server: it writes only while
this replica leads, writes the current content after every trigger, and runs the root-cert controller
only while leading."""

from __future__ import annotations

import base64

from kubernetes import client
from prometheus_client import CollectorRegistry

from ca_service.kube.cacerts_secret import CacertsSecretWriter, cacerts_files
from ca_service.kube.client import build_api_client
from ca_service.kube.istio_objects import IstioObjects
from ca_service.kube.objects import KubeMetrics
from ca_service.kube.root_cert import RootCertPublisher
from ca_service.kube.trust_bundle import TrustBundleWriter
from ca_service.services.authority import Authority
from ca_service.services.state_changes import ChangeCause, StateChange
from ca_service.services.trust import TrustStore
from tests.clock import FakeClock
from tests.kube import Cluster
from tests.waiting import wait_for


def _cacerts(api: client.ApiClient, ns: str) -> dict[str, bytes] | None:
    try:
        secret = client.CoreV1Api(api).read_namespaced_secret("cacerts", ns)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return {k: base64.b64decode(v) for k, v in secret.data.items()}


async def test_a_follower_writes_nothing_and_the_leader_writes_the_current_content(
        k8s: Cluster, authority: Authority, clock: FakeClock) -> None:
    ns = k8s.fresh_namespace()
    api = build_api_client(k8s.kubeconfig)
    metrics = KubeMetrics(CollectorRegistry())
    leading = [False]
    objects = IstioObjects(authority, TrustStore(authority), lambda: leading[0],
                           cacerts=CacertsSecretWriter(api, ns, "cacerts", metrics, clock),
                           root_cert=lambda: RootCertPublisher(api, "istio-ca-root-cert", metrics),
                           trust_bundle=TrustBundleWriter(api, ns, "trust-bundle", metrics))
    change = StateChange(authority.state, authority.state, ChangeCause.REPLICATED)
    await objects.start()
    try:
        await wait_for(lambda: objects.rounds >= 1, "the first round")
        assert objects.writes == 0 and _cacerts(api, ns) is None and objects.root_cert is None

        leading[0] = True
        objects.on_leadership()
        await wait_for(lambda: objects.writes >= 1, "the leader's first write", timeout=30)
        assert _cacerts(api, ns) == cacerts_files(authority.state)
        assert objects.root_cert is not None  # the root-cert controller runs while leading
        bundle = client.CoreV1Api(api).read_namespaced_config_map("trust-bundle", ns).data
        assert bundle["combined-ca.pem"] == authority.bundle().to_pem().decode()

        leading[0] = False
        objects.on_leadership()
        await wait_for(lambda: objects.root_cert is None, "the root-cert controller stopped")
        client.CoreV1Api(api).delete_namespaced_secret("cacerts", ns)
        rounds = objects.rounds
        objects.on_state_change(change)
        await wait_for(lambda: objects.rounds > rounds, "a follower's round")
        assert _cacerts(api, ns) is None, "a follower wrote cacerts"

        leading[0] = True
        objects.on_state_change(change)
        await wait_for(lambda: _cacerts(api, ns) is not None, "cacerts repaired by the leader", timeout=30)
        assert _cacerts(api, ns) == cacerts_files(authority.state)
    finally:
        await objects.stop()
