"""Create-or-update of the objects this daemon owns, with compare-and-swap and the managed-by label.

An object without our label was made by someone else (an operator's hand-made ``cacerts``, istiod's own
root-cert controller): we never change it.  The refusal is logged and counted
(``ca_kube_foreign_object_refusals{resource}``) so the conflict is visible instead of a silent fight.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from prometheus_client import CollectorRegistry, Counter, Gauge

from ca_service.errors import ConflictError, StorageError
from ca_service.kube.client import LABELS, REQUEST_TIMEOUT, api_call, is_managed, status_of

log = logging.getLogger(__name__)

# Another writer between our read and our compare-and-swap: read again.  Three rounds absorb a human
# edit racing us; a writer that keeps winning is a fight we report instead of joining.
CAS_ATTEMPTS = 3


class Outcome(enum.StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"
    FOREIGN = "foreign"  # exists without our label: left alone


class KubeMetrics:
    """Counters of the object writers; one instance per daemon, on the daemon's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.foreign_refusals = Counter("ca_kube_foreign_object_refusals",
                                        "Writes refused because the object lacks our managed-by label",
                                        ["resource"], registry=registry)
        self.writes = Counter("ca_kube_object_writes", "Creates and updates of owned objects",
                              ["resource", "outcome"], registry=registry)
        # 1 on the replica holding the leader lease, 0 on the others: sum() over replicas is 1 when healthy.
        self.leader = Gauge("ca_leader", "Whether this replica holds the leader lease", ["replica"], registry=registry)


@dataclass(frozen=True)
class Kind:
    """How to read, create and replace one resource type; ``data`` values as the API carries them."""

    resource: str  # "secrets" or "configmaps"

    def read(self, core: client.CoreV1Api, name: str, namespace: str) -> Any:
        fn = core.read_namespaced_secret if self.resource == "secrets" else core.read_namespaced_config_map
        return fn(name, namespace, _request_timeout=REQUEST_TIMEOUT)

    def body(self, name: str, namespace: str, data: Mapping[str, str], version: str | None) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(LABELS)}
        if version:
            meta["resourceVersion"] = version
        doc: dict[str, Any] = {"apiVersion": "v1", "metadata": meta, "data": dict(data)}
        if self.resource == "secrets":
            doc.update(kind="Secret", type="Opaque")
        else:
            doc["kind"] = "ConfigMap"
        return doc

    def create(self, core: client.CoreV1Api, namespace: str, body: dict[str, Any]) -> Any:
        fn = core.create_namespaced_secret if self.resource == "secrets" else core.create_namespaced_config_map
        return fn(namespace, body, _request_timeout=REQUEST_TIMEOUT)

    def replace(self, core: client.CoreV1Api, name: str, namespace: str, body: dict[str, Any]) -> Any:
        fn = core.replace_namespaced_secret if self.resource == "secrets" else core.replace_namespaced_config_map
        return fn(name, namespace, body, _request_timeout=REQUEST_TIMEOUT)


SECRETS = Kind("secrets")
CONFIGMAPS = Kind("configmaps")


def ensure_object(api: client.ApiClient, kind: Kind, namespace: str, name: str, data: Mapping[str, str],
                  metrics: KubeMetrics) -> Outcome:
    """Make ``namespace/name`` hold exactly ``data`` (blocking).

    Raises:
        StorageError: the API refused or failed (RBAC, missing namespace, outage); ConflictError if
            another writer kept winning the compare-and-swap.
    """
    core = client.CoreV1Api(api)
    for _ in range(CAS_ATTEMPTS):
        try:
            with api_call("get", kind.resource, name, namespace):
                current = kind.read(core, name, namespace)
        except StorageError as exc:
            if status_of(exc) != 404 or "does not exist" in str(exc):
                raise
            current = None
        try:
            outcome = _apply(core, kind, namespace, name, data, current)
        except ConflictError:
            continue
        if outcome is Outcome.FOREIGN:
            metrics.foreign_refusals.labels(kind.resource).inc()
            log.error("refusing to overwrite an object ca-service did not create (no managed-by label)",
                      extra={"resource": kind.resource, "namespace": namespace, "object": name})
        elif outcome is not Outcome.UNCHANGED:
            metrics.writes.labels(kind.resource, str(outcome)).inc()
            log.info("%s %s/%s", outcome, kind.resource, name, extra={"namespace": namespace})
        return outcome
    raise ConflictError(f"{kind.resource}/{name} in namespace {namespace} kept changing under us; will retry")


def _apply(core: client.CoreV1Api, kind: Kind, namespace: str, name: str, data: Mapping[str, str],
           current: Any) -> Outcome:
    if current is None:
        with api_call("create", kind.resource, name, namespace):
            kind.create(core, namespace, kind.body(name, namespace, data, None))
        return Outcome.CREATED
    if not is_managed(current.metadata):
        return Outcome.FOREIGN
    if dict(current.data or {}) == dict(data):
        return Outcome.UNCHANGED
    with api_call("update", kind.resource, name, namespace):
        kind.replace(core, name, namespace, kind.body(name, namespace, data, current.metadata.resource_version))
    return Outcome.UPDATED
