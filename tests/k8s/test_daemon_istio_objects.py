"""The real daemon on the Kubernetes backend writes the Istio objects, read back from the API server
(issue 12, "Done when"): ``cacerts``, ``istio-ca-root-cert`` in three namespaces (one created after
start, one whose ConfigMap is deleted by hand) and ``trust-bundle`` hold the right content through an
intermediate and a root rotation (``root-cert.pem`` A -> A+B -> B)."""

from __future__ import annotations

import base64
from pathlib import Path

from kubernetes import client

from ca_service.kube.cacerts_secret import cacerts_files
from ca_service.rotation.state import AuthorityState
from tests.k8s.replicas import Replica, read_state, replica_config, stop_all, wait_for
from tests.kube import Cluster

ROOT_CM = "istio-ca-root-cert"


def _roots_pem(state: AuthorityState) -> str:
    return state.bundle().to_pem().decode()


class Objects:
    """What the API server holds, compared with what the state in the Secret says it should hold."""

    def __init__(self, api: client.ApiClient, state_ns: str, istio_ns: str, namespaces: list[str]) -> None:
        self.core = client.CoreV1Api(api)
        self.api, self.state_ns, self.istio_ns, self.namespaces = api, state_ns, istio_ns, namespaces

    def matching(self) -> AuthorityState | None:
        """The state, if every object matches it now; else None."""
        state = read_state(self.api, self.state_ns)
        expected_cacerts = cacerts_files(state)
        assert expected_cacerts is not None
        secret = self.core.read_namespaced_secret("cacerts", self.istio_ns)
        cacerts = {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}
        if cacerts != expected_cacerts:
            return None
        roots = _roots_pem(state)
        bundle = self.core.read_namespaced_config_map("trust-bundle", self.istio_ns).data or {}
        if bundle != {"cluster.local.pem": roots, "combined-ca.pem": roots}:
            return None
        for namespace in self.namespaces:
            try:
                data = self.core.read_namespaced_config_map(ROOT_CM, namespace).data or {}
            except client.ApiException as exc:
                if exc.status == 404:
                    return None
                raise
            if data != {"root-cert.pem": roots}:
                return None
        return state


def test_the_leader_keeps_cacerts_root_cert_and_trust_bundle_right_through_intermediate_and_root_rotations(
        k8s: Cluster, tmp_path: Path) -> None:
    state_ns, istio_ns = k8s.fresh_namespace("st"), k8s.fresh_namespace("istio")
    before, deleted = k8s.fresh_namespace("app"), k8s.fresh_namespace("app")
    istio = {"cacerts_secret": {"enabled": True, "namespace": istio_ns},
             "root_cert_configmap": {"enabled": True},
             "trust_bundle_configmap": {"enabled": True, "namespace": istio_ns}}
    # PUBLISHED lasts 3 s here (no SDS stream to wait for): long enough to read A+B back.
    config = replica_config(tmp_path / "c.yaml", k8s.kubeconfig, state_ns, "solo", istio=istio,
                            rotation={"root_min_propagation": "3s"})
    replica = Replica(tmp_path, "solo", config)
    with k8s.api_client() as api:
        try:
            replica.wait_ready()
            objects = Objects(api, state_ns, istio_ns, [before, deleted])
            start = wait_for("objects written", objects.matching, timeout=60)
            assert len(start.roots) == 1

            after = k8s.fresh_namespace("app")
            objects.namespaces.append(after)
            wait_for("the new namespace's root cert", objects.matching, timeout=30)
            client.CoreV1Api(api).delete_namespaced_config_map(ROOT_CM, deleted)
            wait_for("the deleted root cert repaired", objects.matching, timeout=30)

            status, body = replica.rotate("istiod-intermediate")
            assert status == 200, body
            rotated = wait_for("cacerts with the new istiod intermediate", lambda: (
                s := objects.matching()) and s.revision > start.revision and s, timeout=60)
            assert cacerts_files(rotated) != cacerts_files(start)

            status, body = replica.rotate("root")
            assert status == 200, body
            both = wait_for("A+B everywhere", lambda: (s := objects.matching()) and len(s.roots) == 2 and s,
                            timeout=60)
            assert start.roots[0] in both.roots
            new_root = next(r for r in both.roots if r != start.roots[0])
            final = wait_for("B only everywhere", lambda: (s := objects.matching()) and s.root_rotation is None
                             and s.roots == (new_root,) and s, timeout=90)
            assert final.roots == (new_root,)
        finally:
            stop_all([replica])

