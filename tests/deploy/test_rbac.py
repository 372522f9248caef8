"""The base's RBAC, applied for real, with a token minted for its ServiceAccount: every Kubernetes
API call the daemon makes (keys.md, issue 12/13) is allowed, and reads beyond it are refused (403).

Authorization runs before the API server looks for the object, so an allowed call on a missing or
existing object answers 404/409, never 403: each call below is made for real and only 403 counts as
"refused". The integrator's follow-up runs the real daemon under this token once the backend lands.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from tests.deploy.manifests import kubectl, render
from tests.kube import Cluster

NS, STATE, LEASE = "ca-service", "ca-service-state", "ca-service-leader"
RBAC_KINDS = {"ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"


class Apis:
    def __init__(self, api: client.ApiClient) -> None:
        self.core = client.CoreV1Api(api)
        self.leases = client.CoordinationV1Api(api)
        self.authn = client.AuthenticationV1Api(api)


@pytest.fixture(scope="module")
def admin(cluster: Cluster) -> Iterator[Apis]:
    with cluster.api_client() as api:
        yield Apis(api)


def service_account_kubeconfig(cluster: Cluster, path: Path) -> Path:
    """Apply the base's ServiceAccount and RBAC for real and write a kubeconfig at ``path`` that holds
    only a freshly minted token of that ServiceAccount (TokenRequest): the credentials the daemon runs
    with in the cluster. The daemon test the integrator adds points ``storage.kubernetes.kubeconfig``
    (and ``istio_ca.clusters[].kubeconfig``) at it."""
    docs = [d for d in render("base") if d["kind"] in RBAC_KINDS]
    kubectl("apply", "-f", "-", kubeconfig=cluster.kubeconfig, stdin="---\n".join(yaml.safe_dump(d) for d in docs))
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[API_AUDIENCE], expiration_seconds=3600))
    with cluster.api_client() as api:
        token = client.CoreV1Api(api).create_namespaced_service_account_token("ca-service", NS, request).status.token
    admin_config = yaml.safe_load(cluster.kubeconfig.read_text())
    admin_config["users"] = [{"name": "ca-service", "user": {"token": token}}]
    for context in admin_config["contexts"]:
        context["context"]["user"] = "ca-service"
    path.write_text(yaml.safe_dump(admin_config))
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def as_daemon(cluster: Cluster, admin: Apis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Apis]:
    """An API client holding only the base ServiceAccount's token."""
    kubeconfig = service_account_kubeconfig(cluster, tmp_path_factory.mktemp("sa") / "kubeconfig")
    with config.new_client_from_config(config_file=str(kubeconfig)) as api:
        yield Apis(api)
    _remove_dummies(admin)


def _remove_dummies(admin: Apis) -> None:
    """The placeholder objects this module wrote go again: a later test of the session (the real
    daemon under this RBAC) must find no fake CA state, no fake cacerts."""
    deletions: list[Callable[[], Any]] = [
        lambda: admin.core.delete_namespaced_secret(STATE, NS),
        lambda: admin.core.delete_namespaced_secret("not-the-state", NS),
        lambda: admin.core.delete_namespaced_secret("cacerts", "istio-system"),
        lambda: admin.core.delete_namespaced_config_map("trust-bundle", "istio-system"),
        lambda: admin.core.delete_namespaced_secret("istio-ca-secret", "istio-system"),
        lambda: admin.core.delete_namespaced_config_map("istio", "istio-system"),
        lambda: admin.core.delete_namespaced_secret("kube-secret", "kube-system"),
        lambda: admin.core.delete_namespaced_config_map("app-config", "kube-system"),
        lambda: admin.leases.delete_collection_namespaced_lease(NS),
    ]
    for delete in deletions:
        _status(delete)  # 404: that test did not run


def _created(call: Callable[[], Any]) -> None:
    """Create, tolerating an object an earlier test of this session made (409 comes after authz)."""
    try:
        call()
    except ApiException as exc:
        if exc.status != 409:
            raise


def _status(call: Callable[[], Any]) -> int:
    try:
        result = call()
    except ApiException as exc:
        return int(exc.status)
    if hasattr(result, "release_conn"):  # a watch opened with _preload_content=False
        # Closed, not just released: an undrained watch stream handed back to the pool was read by the
        # next request on that connection ("BadStatusLine: 800", a chunk header), a flake seen in CI.
        result.close()
        result.release_conn()
    return 200


def _secret(name: str) -> client.V1Secret:
    return client.V1Secret(metadata=client.V1ObjectMeta(name=name), data={"k": "dg=="})


def _configmap(name: str) -> client.V1ConfigMap:
    return client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name), data={"root-cert.pem": "x"})


def _lease(name: str) -> client.V1Lease:
    return client.V1Lease(metadata=client.V1ObjectMeta(name=name), spec=client.V1LeaseSpec(holder_identity="a"))


def _by_name(name: str) -> dict[str, Any]:
    return {"field_selector": f"metadata.name={name}"}


def _watch(list_call: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[[], Any]:
    return lambda: list_call(*args, watch=True, timeout_seconds=1, _preload_content=False, **kwargs)


def _update_secret(d: Apis, name: str, ns: str) -> Callable[[], Any]:
    return lambda: d.core.replace_namespaced_secret(name, ns, d.core.read_namespaced_secret(name, ns))


def _update_configmap(d: Apis, name: str, ns: str) -> Callable[[], Any]:
    return lambda: d.core.replace_namespaced_config_map(name, ns, d.core.read_namespaced_config_map(name, ns))


def _first_writes(d: Apis, app_ns: str) -> None:
    """The creates, for real, as the daemon makes them on its first start."""
    replica = f"ca-service-replica-ca-service-{secrets.token_hex(3)}"
    _created(lambda: d.core.create_namespaced_secret(NS, _secret(STATE)))
    _created(lambda: d.leases.create_namespaced_lease(NS, _lease(LEASE)))
    _created(lambda: d.leases.create_namespaced_lease(NS, _lease(replica)))
    _created(lambda: d.core.create_namespaced_secret("istio-system", _secret("cacerts")))
    _created(lambda: d.core.create_namespaced_config_map("istio-system", _configmap("trust-bundle")))
    d.core.create_namespaced_config_map(app_ns, _configmap(ROOT_CERT))


ROOT_CERT = "istio-ca-root-cert"


def _daemon_calls(d: Apis, app_ns: str) -> dict[str, Callable[[], Any]]:
    review = client.V1TokenReview(spec=client.V1TokenReviewSpec(token="not-a-token", audiences=["istio-ca"]))
    return {
        "get the state Secret": lambda: d.core.read_namespaced_secret(STATE, NS),
        "update the state Secret": _update_secret(d, STATE, NS),
        "list the state Secret by name": lambda: d.core.list_namespaced_secret(NS, **_by_name(STATE)),
        "watch the state Secret by name": _watch(d.core.list_namespaced_secret, NS, **_by_name(STATE)),
        "get the leader Lease": lambda: d.leases.read_namespaced_lease(LEASE, NS),
        "update the leader Lease": lambda: d.leases.replace_namespaced_lease(
            LEASE, NS, d.leases.read_namespaced_lease(LEASE, NS)),
        "list Leases": lambda: d.leases.list_namespaced_lease(NS),
        "watch Leases": _watch(d.leases.list_namespaced_lease, NS),
        "get cacerts": lambda: d.core.read_namespaced_secret("cacerts", "istio-system"),
        "update cacerts": _update_secret(d, "cacerts", "istio-system"),
        "get trust-bundle": lambda: d.core.read_namespaced_config_map("trust-bundle", "istio-system"),
        "update trust-bundle": _update_configmap(d, "trust-bundle", "istio-system"),
        "get a namespace's istio-ca-root-cert": lambda: d.core.read_namespaced_config_map(ROOT_CERT, app_ns),
        "update a namespace's istio-ca-root-cert": _update_configmap(d, ROOT_CERT, app_ns),
        "list istio-ca-root-cert everywhere": lambda: d.core.list_config_map_for_all_namespaces(**_by_name(ROOT_CERT)),
        "watch istio-ca-root-cert everywhere": _watch(d.core.list_config_map_for_all_namespaces, **_by_name(ROOT_CERT)),
        "get a namespace": lambda: d.core.read_namespace(app_ns),
        "list namespaces": lambda: d.core.list_namespace(),
        "watch namespaces": _watch(d.core.list_namespace),
        "create a TokenReview": lambda: d.authn.create_token_review(review),
    }


def test_the_token_is_allowed_every_call_the_kubernetes_backend_makes(as_daemon: Apis, cluster: Cluster) -> None:
    app_ns = cluster.fresh_namespace("app")
    _first_writes(as_daemon, app_ns)
    calls = _daemon_calls(as_daemon, app_ns)
    refused = {what: status for what, call in calls.items() if (status := _status(call)) != 200}
    assert refused == {}


def _refusals(d: Apis, victim_ns: str) -> dict[str, Callable[[], Any]]:
    return {
        "reading another Secret in its own namespace": lambda: d.core.read_namespaced_secret("not-the-state", NS),
        "listing every Secret in its own namespace": lambda: d.core.list_namespaced_secret(NS),
        "deleting the state Secret": lambda: d.core.delete_namespaced_secret(STATE, NS),
        "reading a Secret in kube-system": lambda: d.core.read_namespaced_secret("kube-secret", "kube-system"),
        "reading istiod's own CA Secret": lambda: d.core.read_namespaced_secret("istio-ca-secret", "istio-system"),
        "updating another ConfigMap in istio-system": _update_configmap(d, "istio", "istio-system"),
        "reading another ConfigMap of an application": lambda: d.core.read_namespaced_config_map(
            "app-config", "kube-system"),
        "listing every ConfigMap in the cluster": lambda: d.core.list_config_map_for_all_namespaces(),
        "listing Secrets of the whole cluster": lambda: d.core.list_secret_for_all_namespaces(),
        "listing pods (only the ImpersonatedIdentity overlay may)": lambda: d.core.list_pod_for_all_namespaces(),
        "touching Leases outside its namespace": lambda: d.leases.list_namespaced_lease("kube-system"),
        "deleting a namespace": lambda: d.core.delete_namespace(victim_ns),
    }


@pytest.mark.parametrize("what", sorted(_refusals(None, None)))  # type: ignore[arg-type]
def test_the_token_is_refused_beyond_what_the_daemon_needs(as_daemon: Apis, admin: Apis, cluster: Cluster,
                                                          what: str) -> None:
    # The objects exist, so a 404 cannot pass for a refusal.
    _created(lambda: admin.core.create_namespaced_secret(NS, _secret("not-the-state")))
    _created(lambda: admin.core.create_namespaced_secret("kube-system", _secret("kube-secret")))
    _created(lambda: admin.core.create_namespaced_secret("istio-system", _secret("istio-ca-secret")))
    _created(lambda: admin.core.create_namespaced_config_map("istio-system", _configmap("istio")))
    _created(lambda: admin.core.create_namespaced_config_map("kube-system", _configmap("app-config")))
    # A throwaway namespace: if the RBAC were too broad, nothing shared gets deleted.
    assert _status(_refusals(as_daemon, cluster.fresh_namespace("victim"))[what]) == 403
