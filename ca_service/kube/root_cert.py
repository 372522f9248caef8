"""``istio-ca-root-cert`` in every namespace: created as namespaces appear, repaired when edited or deleted.

What istiod's and istio-csr's root-cert controllers do, level-triggered and without their update loops:
a watch on namespaces and one on the ConfigMaps of that name (all namespaces) only *queue* a namespace;
a worker makes it hold exactly ``root-cert.pem`` = the current roots and writes only when the content
differs, so our own writes come back as events that change nothing.  Objects without our label are
left alone (objects.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from kubernetes import client

from ca_service.errors import StorageError
from ca_service.kube.objects import CONFIGMAPS, KubeMetrics, ensure_object
from ca_service.kube.watch import ResourceWatch

log = logging.getLogger(__name__)

ROOT_CERT = "root-cert.pem"
# istiod's injector ignores these namespaces (inject.IgnoredNamespaces) and publishes no root there:
# no mesh workload runs in them.
SKIPPED_NAMESPACES = frozenset({"kube-system", "kube-public", "kube-node-lease", "local-path-storage"})
# A failed write (API outage, a namespace being created) is retried after this delay: soon enough that
# a new namespace gets its root before its first pods start, rare enough not to load a recovering API.
RETRY_DELAY = 2.0


class RootCertPublisher:
    """Lifecycle component; :meth:`set_root_cert` hands it the roots (concatenated PEM)."""

    name = "istio-ca-root-cert"

    def __init__(self, api: client.ApiClient, configmap_name: str, metrics: KubeMetrics, *,
                 skipped: frozenset[str] = SKIPPED_NAMESPACES) -> None:
        self._api = api
        self.configmap_name = configmap_name
        self._metrics = metrics
        self._skipped = skipped
        self._pem: str | None = None
        self._namespaces: set[str] = set()  # Active namespaces, as last listed/watched
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._worker: asyncio.Task[None] | None = None
        core = client.CoreV1Api(api)
        self._ns_watch = ResourceWatch("namespaces", core.list_namespace, {},
                                       on_list=self._on_namespace_list, on_event=self._on_namespace)
        self._cm_watch = ResourceWatch(
            f"configmaps/{configmap_name}", core.list_config_map_for_all_namespaces,
            {"field_selector": f"metadata.name={configmap_name}"},
            on_list=lambda items: None, on_event=self._on_configmap)

    async def start(self) -> None:
        self._worker = asyncio.create_task(self._work(), name="istio-ca-root-cert")
        await self._ns_watch.start()
        await self._cm_watch.start()

    async def stop(self) -> None:
        await self._cm_watch.stop()
        await self._ns_watch.stop()
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None

    def set_root_cert(self, pem: str) -> None:
        """The roots every namespace must hold; queues every namespace when they changed."""
        if pem == self._pem:
            return
        self._pem = pem
        for namespace in sorted(self._namespaces):
            self._enqueue(namespace)

    @property
    def namespaces(self) -> frozenset[str]:
        return frozenset(self._namespaces)

    # ------------------------------------------------------------ events (in the loop)

    def _on_namespace_list(self, items: list[dict[str, Any]]) -> None:
        self._namespaces = {n["metadata"]["name"] for n in items if self._wanted(n)}
        for namespace in sorted(self._namespaces):
            self._enqueue(namespace)

    def _on_namespace(self, kind: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if kind != "DELETED" and self._wanted(obj):
            self._namespaces.add(name)
            self._enqueue(name)
        else:
            self._namespaces.discard(name)

    def _on_configmap(self, kind: str, obj: dict[str, Any]) -> None:
        namespace = obj["metadata"].get("namespace", "")
        if namespace in self._namespaces:
            self._enqueue(namespace)

    def _wanted(self, namespace: dict[str, Any]) -> bool:
        # A Terminating namespace refuses new objects (403), and its workloads are going away.
        phase = (namespace.get("status") or {}).get("phase", "Active")
        return phase == "Active" and namespace["metadata"]["name"] not in self._skipped

    def _enqueue(self, namespace: str) -> None:
        if namespace not in self._queued:
            self._queued.add(namespace)
            self._queue.put_nowait(namespace)

    # ------------------------------------------------------------ worker

    async def _work(self) -> None:
        while True:
            namespace = await self._queue.get()
            self._queued.discard(namespace)
            pem = self._pem
            if pem is None or namespace not in self._namespaces:
                continue
            try:
                await asyncio.to_thread(ensure_object, self._api, CONFIGMAPS, namespace, self.configmap_name,
                                        {ROOT_CERT: pem}, self._metrics)
            except StorageError as exc:
                log.warning("istio-ca-root-cert not written; retrying", extra={"namespace": namespace,
                                                                               "cause": str(exc)})
                asyncio.get_running_loop().call_later(RETRY_DELAY, self._enqueue, namespace)
