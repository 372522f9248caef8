"""``ImpersonatedIdentity``: a node agent (ztunnel) asks for the certificate of a pod on its node.

Allowed only for callers listed in ``istio_ca.trusted_node_accounts``; the target must be a Kubernetes
identity of our own trust domain (istiod does not check that); and where the caller's cluster API is
reachable, a pod of the target identity must be bound to the node of the caller's own pod (the pod
its token is bound to).  A node agent can therefore never mint an identity that has no pod on its node.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Mapping
from typing import Any, Protocol

from ca_service.errors import InvalidRequestError, PolicyViolationError
from ca_service.pki.identity import SpiffeId, TrustDomain
from ca_service.rpc.authn import Caller
from ca_service.rpc.token_review import KubernetesCaller

log = logging.getLogger(__name__)

IMPERSONATION_KEY = "ImpersonatedIdentity"
# Pods in these phases are gone: their identity must not be minted any more.
_TERMINATED_PHASES = frozenset({"Succeeded", "Failed"})


class PodDirectory(Protocol):
    """What the impersonation check asks a cluster's API (blocking; called from a thread)."""

    def node_of_pod(self, namespace: str, name: str) -> str | None: ...

    def has_pod_on_node(self, namespace: str, service_account: str, node: str) -> bool: ...


class KubernetesPodDirectory:
    """:class:`PodDirectory` over the official client (RBAC: pods get/list, cluster-wide)."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        from ca_service.kube.client import REQUEST_TIMEOUT

        self._api = client.CoreV1Api(api_client)
        self._missing = ApiException
        self._timeout = REQUEST_TIMEOUT

    def node_of_pod(self, namespace: str, name: str) -> str | None:
        try:
            pod = self._api.read_namespaced_pod(name, namespace, _request_timeout=self._timeout)
        except self._missing as exc:
            if exc.status == 404:
                return None
            raise
        if pod.status is not None and pod.status.phase in _TERMINATED_PHASES:
            return None
        return pod.spec.node_name or None

    def has_pod_on_node(self, namespace: str, service_account: str, node: str) -> bool:
        pods = self._api.list_namespaced_pod(namespace, field_selector=f"spec.nodeName={node}",
                                        _request_timeout=self._timeout).items
        return any(p.spec.service_account_name == service_account
                   and (p.status is None or p.status.phase not in _TERMINATED_PHASES) for p in pods)


class ImpersonationPolicy:
    def __init__(self, trusted_node_accounts: Collection[str], trust_domain: TrustDomain,
                 pods: Mapping[str, PodDirectory]) -> None:
        self._trusted = frozenset(trusted_node_accounts)
        self._trust_domain = trust_domain
        self._pods = dict(pods)  # by cluster ID; empty when no cluster API is configured

    async def entitled(self, caller: Caller, metadata: Mapping[str, Any]) -> SpiffeId:
        """The identity ``caller`` may be issued for: its own, or the one it impersonates.

        Raises:
            PolicyViolationError: the caller is not a trusted node agent, the target is outside our trust
                domain or not a Kubernetes identity, or no pod of the target is bound to the caller's node.
        """
        raw = metadata.get(IMPERSONATION_KEY)
        if raw is None or raw == "":
            return caller.spiffe_id
        account = f"{caller.namespace}/{caller.service_account}"
        if caller.namespace is None or account not in self._trusted:
            raise PolicyViolationError(f"{caller.spiffe_id} may not use {IMPERSONATION_KEY}")
        if not isinstance(raw, str):
            raise PolicyViolationError(f"{IMPERSONATION_KEY} is not a string")
        try:
            target = SpiffeId.parse(raw[:2048])
        except InvalidRequestError as exc:
            raise PolicyViolationError(f"{IMPERSONATION_KEY}: {exc}") from None
        k8s = target.kubernetes
        if not target.is_member_of(self._trust_domain) or k8s is None:
            raise PolicyViolationError(f"{IMPERSONATION_KEY} {target} is not a workload of {self._trust_domain}")
        await self._check_pod_on_node(caller, *k8s)
        log.info("impersonation allowed", extra={"caller": str(caller.spiffe_id), "spiffe_id": str(target)})
        return target

    async def _check_pod_on_node(self, caller: Caller, namespace: str, service_account: str) -> None:
        cluster = caller.cluster_id if isinstance(caller, KubernetesCaller) else None
        pods = self._pods.get(cluster) if cluster else None
        if pods is None:
            if self._pods:
                # A cluster API exists, but this caller cannot be placed on a node (peer-certificate caller).
                raise PolicyViolationError(f"{caller.spiffe_id}: impersonation needs a pod-bound service-account token")
            return  # no cluster API configured: trust listing alone (documented)
        assert isinstance(caller, KubernetesCaller)
        if caller.pod_name is None or caller.namespace is None:
            raise PolicyViolationError(f"{caller.spiffe_id}: token is not bound to a pod; cannot find its node")
        node = await asyncio.to_thread(pods.node_of_pod, caller.namespace, caller.pod_name)
        if node is None:
            raise PolicyViolationError(f"{caller.spiffe_id}: pod {caller.pod_name!r} is gone or not on a node")
        if not await asyncio.to_thread(pods.has_pod_on_node, namespace, service_account, node):
            raise PolicyViolationError(f"no pod of {namespace}/{service_account} on node {node!r}")
