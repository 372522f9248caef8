"""``ImpersonatedIdentity``: a node agent (ztunnel) asks for the certificate of a pod on its node.

Allowed only for callers listed in ``istio_ca.trusted_node_accounts``; the target must be a Kubernetes
identity of our own trust domain (istiod does not check that); and where the caller's cluster API is
reachable, a pod of the target identity must be bound to the node of the caller's own pod (the pod
its token is bound to).  A node agent can therefore never mint an identity that has no pod on its node.

A node agent asks for every pod of its node at once when it starts (ztunnel: one CSR per pod), so the
two API reads per CSR are shared:

- **The caller's node** is kept per pod UID for ``review_cache_ttl``.  A pod's ``spec.nodeName`` never
  changes once set and a UID names one pod for its whole life, so the node itself cannot go stale.  What
  the cache can miss for up to that TTL is the caller's pod going away: deleted (the window the TokenReview
  cache already gives its token), or ended but not deleted (its token still passes fresh reviews; only this
  TTL bounds it).  Either way the target's pods are still listed live.  A pod of the same name that
  replaced the caller's has another UID: it is looked up afresh, and the old token's UID no longer matches
  the pod found, which refuses it.
- **Which service accounts have a pod on that node**, per namespace, is listed once for all the CSRs that
  ask while the listing runs, and never kept after it: a pod that just went away stops being minted for
  at once, and a refusal is never cached (a pod that was just scheduled is found on the agent's retry).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Collection, Mapping
from typing import Any, Protocol

from ca_service.clock import Clock
from ca_service.errors import InvalidRequestError, PolicyViolationError
from ca_service.pki.identity import SpiffeId, TrustDomain
from ca_service.rpc.authn import Caller
from ca_service.rpc.token_review import KubernetesCaller, ask_cluster
from ca_service.services.expiring_cache import ExpiringCache
from ca_service.services.single_flight import SingleFlight
from ca_service.telemetry import Telemetry

log = logging.getLogger(__name__)

IMPERSONATION_KEY = "ImpersonatedIdentity"
# Pods in these phases are gone: their identity must not be minted any more.
_TERMINATED_PHASES = frozenset({"Succeeded", "Failed"})
# Callers' nodes kept (one per node agent pod): far more than the node agents of any cluster.
MAX_CACHED_NODES = 10_000


class PodDirectory(Protocol):
    """What the impersonation check asks a cluster's API (blocking; called from a thread).  Both methods raise
    NotReadyError when the API cannot be asked (down, timed out, RBAC)."""

    def node_of_pod(self, namespace: str, name: str, uid: str | None) -> str | None:
        """The node of a live pod, None if it is gone, ended, not scheduled, or (``uid``) another pod."""

    def accounts_on_node(self, namespace: str, node: str) -> frozenset[str]:
        """The service accounts of the live pods of ``namespace`` on ``node``."""


class KubernetesPodDirectory:
    """:class:`PodDirectory` over the official client (RBAC: pods get/list, cluster-wide)."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        from ca_service.kube.client import REQUEST_TIMEOUT, unavailable_on_failure

        self._api = client.CoreV1Api(api_client)
        self._missing = ApiException
        self._timeout = REQUEST_TIMEOUT
        self._unavailable = unavailable_on_failure

    def node_of_pod(self, namespace: str, name: str, uid: str | None) -> str | None:
        with self._unavailable("reading the caller's pod"):
            try:
                pod = self._api.read_namespaced_pod(name, namespace, _request_timeout=self._timeout)
            except self._missing as exc:
                if exc.status == 404:
                    return None
                raise
        if uid is not None and pod.metadata.uid != uid:
            return None  # the token's pod was deleted and another took its name
        if pod.status is not None and pod.status.phase in _TERMINATED_PHASES:
            return None
        return pod.spec.node_name or None

    def accounts_on_node(self, namespace: str, node: str) -> frozenset[str]:
        with self._unavailable("listing the pods on the caller's node"):
            pods = self._api.list_namespaced_pod(namespace, field_selector=f"spec.nodeName={node}",
                                                 _request_timeout=self._timeout).items
        return frozenset(p.spec.service_account_name for p in pods if p.spec.service_account_name
                         and (p.status is None or p.status.phase not in _TERMINATED_PHASES))


class ImpersonationPolicy:
    def __init__(self, trusted_node_accounts: Collection[str], trust_domain: TrustDomain,
                 pods: Mapping[str, PodDirectory], *, clock: Clock, node_ttl: dt.timedelta, telemetry: Telemetry,
                 max_cached_nodes: int = MAX_CACHED_NODES) -> None:
        self._trusted = frozenset(trusted_node_accounts)
        self._trust_domain = trust_domain
        self._pods = dict(pods)  # by cluster ID; empty when no cluster API is configured
        self._clock = clock
        self._node_ttl = node_ttl
        self._telemetry = telemetry
        # (cluster, pod UID) -> node; only pod-bound tokens with a UID are kept (see the module's docstring).
        self._nodes: ExpiringCache[tuple[str, str], str] = ExpiringCache(max_cached_nodes)
        self._node_lookups: SingleFlight[tuple[str, str, str, str | None], str | None] = SingleFlight()
        self._account_lookups: SingleFlight[tuple[str, str, str], frozenset[str]] = SingleFlight()

    async def entitled(self, caller: Caller, metadata: Mapping[str, Any]) -> SpiffeId:
        """The identity ``caller`` may be issued for: its own, or the one it impersonates.

        Raises:
            PolicyViolationError: the caller is not a trusted node agent, the target is outside our trust
                domain or not a Kubernetes identity, or no pod of the target is bound to the caller's node.
            NotReadyError: the cluster's API could not be asked (retry later).
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
        node = await self._node_of(caller.cluster_id, pods, caller.namespace, caller.pod_name, caller.pod_uid)
        if node is None:
            raise PolicyViolationError(f"{caller.spiffe_id}: pod {caller.pod_name!r} is gone or not on a node")
        if service_account not in await self._accounts_on(caller.cluster_id, pods, namespace, node):
            raise PolicyViolationError(f"no pod of {namespace}/{service_account} on node {node!r}")

    async def _node_of(self, cluster: str, pods: PodDirectory, namespace: str, name: str, uid: str | None,
                       ) -> str | None:
        if uid is not None:
            node = self._nodes.get((cluster, uid), self._clock.now())
            if node is not None:
                self._looked_up("node", "cache")
                return node
        key = (cluster, namespace, name, uid)
        self._looked_up("node", "shared" if self._node_lookups.running(key) else "api")
        node = await self._node_lookups.run(
            key, lambda: ask_cluster(cluster, "pod lookup", pods.node_of_pod, namespace, name, uid))
        if node is not None and uid is not None:
            now = self._clock.now()
            self._nodes.put((cluster, uid), node, now + self._node_ttl, now)
        return node

    async def _accounts_on(self, cluster: str, pods: PodDirectory, namespace: str, node: str) -> frozenset[str]:
        key = (cluster, namespace, node)
        self._looked_up("pods", "shared" if self._account_lookups.running(key) else "api")
        return await self._account_lookups.run(
            key, lambda: ask_cluster(cluster, "pod listing", pods.accounts_on_node, namespace, node))

    def _looked_up(self, what: str, source: str) -> None:
        self._telemetry.impersonation_lookups.labels(what, source).inc()

