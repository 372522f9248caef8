"""The shared API server prepared for the manifests under deploy/kubernetes."""

from __future__ import annotations

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.deploy.manifests import Doc, kubectl
from tests.kube import Cluster

# Minimal CRDs with the Prometheus Operator's real group/version/kind, so the server dry-runs our
# ServiceMonitor and PrometheusRule (their schemas are the operator's business: preserve everything).
MONITORING_CRDS = (("servicemonitors", "ServiceMonitor", "servicemonitor"),
                   ("prometheusrules", "PrometheusRule", "prometheusrule"))


def _crd(plural: str, kind: str, singular: str) -> Doc:
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com"},
        "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
                 "names": {"plural": plural, "kind": kind, "singular": singular, "listKind": f"{kind}List"},
                 "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                     "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]},
    }


@pytest.fixture(scope="module")
def cluster(k8s: Cluster) -> Cluster:
    """The shared API server with what the manifests presuppose: the monitoring CRDs, and the
    namespaces they put objects in (Istio's istio-system exists wherever Istio is installed)."""
    crds = "\n---\n".join(yaml.safe_dump(_crd(*names)) for names in MONITORING_CRDS)
    kubectl("apply", "-f", "-", kubeconfig=k8s.kubeconfig, stdin=crds)
    for plural, _, _ in MONITORING_CRDS:
        kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{plural}.monitoring.coreos.com",
                kubeconfig=k8s.kubeconfig)
    with k8s.api_client() as api:
        core = client.CoreV1Api(api)
        for name in ("ca-service", "istio-system"):
            try:
                core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
            except ApiException as exc:
                if exc.status != 409:  # already there: another test of this session made it
                    raise
    return k8s
