"""The Istio objects (cacerts Secret, istio-ca-root-cert, trust-bundle) written to the real API server."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from kubernetes import client
from prometheus_client import CollectorRegistry

from ca_service.config import Settings
from ca_service.kube.cacerts_secret import CacertsSecretWriter, cacerts_files
from ca_service.kube.client import MANAGED_BY, build_api_client
from ca_service.kube.objects import KubeMetrics, Outcome
from ca_service.kube.root_cert import RootCertPublisher
from ca_service.kube.trust_bundle import TrustBundleWriter, trust_bundle_data
from ca_service.pki.cacerts import CA_KEY, CacertsError, check_cacerts
from ca_service.services.authority import Authority
from ca_service.storage.directory import DirectoryStore
from tests.clock import FakeClock
from tests.kube import Cluster
from tests.waiting import wait_for


def _metrics() -> KubeMetrics:
    return KubeMetrics(CollectorRegistry())


def _refusals(metrics: KubeMetrics, resource: str) -> float:
    return metrics.foreign_refusals.labels(resource)._value.get()


def _secret_files(api: Any, ns: str, name: str) -> dict[str, bytes]:
    secret = client.CoreV1Api(api).read_namespaced_secret(name, ns)
    return {k: base64.b64decode(v) for k, v in secret.data.items()}


def test_the_cacerts_secret_holds_istiods_four_files_checked_and_labelled(
        k8s: Cluster, authority: Authority, clock: FakeClock, settings: Settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ns = k8s.fresh_namespace()
    api = build_api_client(k8s.kubeconfig)
    writer = CacertsSecretWriter(api, ns, "cacerts", _metrics(), clock)
    files = cacerts_files(authority.state)
    assert files is not None
    assert writer.write(files) is Outcome.CREATED
    stored = _secret_files(api, ns, "cacerts")
    assert stored == files
    check_cacerts(stored, now=clock.now())  # what istiod will check, on what it will read
    assert client.CoreV1Api(api).read_namespaced_secret("cacerts", ns).metadata.labels[MANAGED_BY] == "ca-service"
    assert writer.write(files) is Outcome.UNCHANGED
    other = Authority(DirectoryStore(tmp_path / "other"), settings.domain, settings.ca, clock)
    other.load_or_bootstrap()
    new_files = cacerts_files(other.state)
    assert new_files is not None
    assert writer.write(new_files) is Outcome.UPDATED
    assert _secret_files(api, ns, "cacerts") == new_files


def test_a_cacerts_set_istiod_would_refuse_is_never_written(k8s: Cluster, authority: Authority,
                                                            clock: FakeClock) -> None:
    ns = k8s.fresh_namespace()
    api = build_api_client(k8s.kubeconfig)
    files = cacerts_files(authority.state)
    assert files is not None
    broken = {**files, CA_KEY: b""}
    with pytest.raises(CacertsError, match=r"missing ca-key\.pem"):
        CacertsSecretWriter(api, ns, "cacerts", _metrics(), clock).write(broken)
    assert client.CoreV1Api(api).list_namespaced_secret(ns, field_selector="metadata.name=cacerts").items == []


def test_a_cacerts_secret_we_did_not_create_is_left_alone_and_counted(k8s: Cluster, authority: Authority,
                                                                      clock: FakeClock) -> None:
    ns = k8s.fresh_namespace()
    api = build_api_client(k8s.kubeconfig)
    client.CoreV1Api(api).create_namespaced_secret(ns, {"metadata": {"name": "cacerts"},
                                                        "stringData": {"ca-cert.pem": "operator's own"}})
    metrics = _metrics()
    files = cacerts_files(authority.state)
    assert files is not None
    assert CacertsSecretWriter(api, ns, "cacerts", metrics, clock).write(files) is Outcome.FOREIGN
    assert _secret_files(api, ns, "cacerts") == {"ca-cert.pem": b"operator's own"}
    assert _refusals(metrics, "secrets") == 1


def test_the_trust_bundle_configmap_has_one_file_per_trust_domain_and_combined_own_first(k8s: Cluster) -> None:
    ns = k8s.fresh_namespace()
    api = build_api_client(k8s.kubeconfig)
    bundles = {"us.cluster.local": "US\n", "eu.cluster.local": "EU\n", "ap.cluster.local": "AP\n"}
    writer = TrustBundleWriter(api, ns, "trust-bundle", _metrics())
    assert writer.write(bundles, own="us.cluster.local") is Outcome.CREATED
    cm = client.CoreV1Api(api).read_namespaced_config_map("trust-bundle", ns)
    assert cm.data == {"us.cluster.local.pem": "US\n", "eu.cluster.local.pem": "EU\n", "ap.cluster.local.pem": "AP\n",
                       "combined-ca.pem": "US\nAP\nEU\n"}
    assert cm.metadata.labels[MANAGED_BY] == "ca-service"
    assert writer.write({**bundles, "eu.cluster.local": "EU2\n"}, own="us.cluster.local") is Outcome.UPDATED
    assert client.CoreV1Api(api).read_namespaced_config_map("trust-bundle", ns).data["combined-ca.pem"] == \
        "US\nAP\nEU2\n"


def test_a_trust_bundle_without_our_own_domain_is_refused() -> None:
    with pytest.raises(ValueError, match="own trust domain"):
        trust_bundle_data({"eu.cluster.local": "EU\n"}, own="us.cluster.local")


def _root_cert(api: Any, ns: str) -> client.V1ConfigMap | None:
    items = client.CoreV1Api(api).list_namespaced_config_map(
        ns, field_selector="metadata.name=istio-ca-root-cert").items
    return items[0] if items else None


def _holds(api: Any, ns: str, pem: str) -> bool:
    cm = _root_cert(api, ns)
    return cm is not None and cm.data == {"root-cert.pem": pem}


async def test_every_namespace_gets_the_root_cert_and_keeps_it_through_edits_and_deletes(
        private_k8s: Cluster) -> None:
    api = build_api_client(private_k8s.kubeconfig)
    core = client.CoreV1Api(api)
    early = [private_k8s.fresh_namespace("early") for _ in range(2)]
    foreign_ns = private_k8s.fresh_namespace("foreign")
    core.create_namespaced_config_map(foreign_ns, {"metadata": {"name": "istio-ca-root-cert"},
                                                   "data": {"root-cert.pem": "istiod's"}})
    metrics = _metrics()
    publisher = RootCertPublisher(api, "istio-ca-root-cert", metrics)
    await publisher.start()
    try:
        publisher.set_root_cert("ROOT-A\n")
        await wait_for(lambda: all(_holds(api, ns, "ROOT-A\n") for ns in early), "the existing namespaces",
                       timeout=15)
        late = private_k8s.fresh_namespace("late")
        await wait_for(lambda: _holds(api, late, "ROOT-A\n"), "the namespace created after start", timeout=15)
        core.delete_namespaced_config_map("istio-ca-root-cert", early[0])
        edited = _root_cert(api, early[1])
        assert edited is not None
        edited.data = {"root-cert.pem": "tampered"}
        core.replace_namespaced_config_map("istio-ca-root-cert", early[1], edited)
        await wait_for(lambda: _holds(api, early[0], "ROOT-A\n"), "the deleted ConfigMap to come back", timeout=15)
        await wait_for(lambda: _holds(api, early[1], "ROOT-A\n"), "the edited ConfigMap repaired", timeout=15)
        publisher.set_root_cert("ROOT-A\nROOT-B\n")  # a root rotation publishes A+B everywhere
        await wait_for(lambda: all(_holds(api, ns, "ROOT-A\nROOT-B\n") for ns in [*early, late]), "A+B",
                       timeout=15)
        assert _holds(api, foreign_ns, "istiod's")  # never ours: left alone, refused loudly
        assert _refusals(metrics, "configmaps") >= 1
        assert _root_cert(api, "kube-system") is None
        assert {"default", *early, late} <= publisher.namespaces
    finally:
        await publisher.stop()
