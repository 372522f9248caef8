"""The real daemon under the base RBAC only (issue 12 phase 2): Kubernetes backend, leader election and
every Istio writer on, holding nothing but the base ServiceAccount's token.  It bootstraps, rotates an
intermediate and a root, and writes every Istio object, and the API server refuses it nothing."""

from __future__ import annotations

import contextlib
from pathlib import Path

from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.deploy.test_rbac import LEASE, NS, STATE, service_account_kubeconfig
from tests.k8s.replicas import ISTIO_ON, Replica, replica_config, stop_all, wait_for
from tests.k8s.test_daemon_istio_objects import Objects
from tests.kube import Cluster


def _clean(api: client.ApiClient) -> None:
    """No CA state or Istio object of an earlier test in the session (the names are fixed by the base)."""
    core, leases = client.CoreV1Api(api), client.CoordinationV1Api(api)
    for delete in (lambda: core.delete_namespaced_secret(STATE, NS),
                   lambda: core.delete_namespaced_secret("cacerts", "istio-system"),
                   lambda: core.delete_namespaced_config_map("trust-bundle", "istio-system"),
                   lambda: leases.delete_collection_namespaced_lease(NS)):
        with contextlib.suppress(ApiException):
            delete()


def test_the_daemon_runs_every_kubernetes_feature_with_only_the_base_service_account_token(
        cluster: Cluster, tmp_path: Path) -> None:
    kubeconfig = service_account_kubeconfig(cluster, tmp_path / "sa-kubeconfig")
    app_ns = cluster.fresh_namespace("app")
    config = replica_config(tmp_path / "c.yaml", kubeconfig, NS, "rbac-0", istio=ISTIO_ON)
    doc = config.read_text()
    assert f'"secret_name": "{STATE}"' in doc and f'"lease_name": "{LEASE}"' in doc  # the base's names
    with cluster.api_client() as api:
        _clean(api)
        replica = Replica(tmp_path, "rbac-0", config)
        try:
            replica.wait_ready()
            objects = Objects(api, NS, "istio-system", [app_ns])
            start = wait_for("Istio objects written", objects.matching, timeout=60)
            for scope in ("intermediate", "istiod-intermediate", "root"):
                status, body = replica.rotate(scope)
                assert status == 200, (scope, body)
            final = wait_for("the root rotation finished and written", lambda: (s := objects.matching())
                             and s.root_rotation is None and s.roots != start.roots and s, timeout=90)
            assert len(final.roots) == 1
            assert b"forbidden" not in replica.output.lower(), replica.output.decode()[-3000:]
        finally:
            stop_all([replica])
            _clean(api)
