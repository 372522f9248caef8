"""The test cluster itself: a real API server that enforces RBAC and answers TokenReview."""

from __future__ import annotations

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.kube import Cluster


def test_the_shared_cluster_stores_a_secret_and_refuses_a_stale_resource_version(k8s: Cluster) -> None:
    ns = k8s.fresh_namespace()
    with k8s.api_client() as api:
        core = client.CoreV1Api(api)
        created = core.create_namespaced_secret(ns, client.V1Secret(
            metadata=client.V1ObjectMeta(name="s"), string_data={"a": "1"}))
        core.replace_namespaced_secret("s", ns, client.V1Secret(
            metadata=client.V1ObjectMeta(name="s", resource_version=created.metadata.resource_version),
            string_data={"a": "2"}))
        with pytest.raises(ApiException) as stale:
            core.replace_namespaced_secret("s", ns, client.V1Secret(
                metadata=client.V1ObjectMeta(name="s", resource_version=created.metadata.resource_version),
                string_data={"a": "3"}))
    assert stale.value.status == 409
