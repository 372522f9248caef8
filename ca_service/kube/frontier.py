"""Per-replica ACK frontiers on Leases, for the cluster-wide root rotation gate.

Each replica keeps its own Lease ``ca-service-replica-<replica_id>`` (holder = itself, renewTime = when
it last wrote) whose annotations carry its frontier: the lowest bundle sequence ACKed by all its SDS
streams, its stream count and the time of the record.  A Lease because it is the object Kubernetes
makes for "I am alive" records (RBAC on leases is needed for leader election anyway) and because its
``leaseDurationSeconds`` states the record's own lifetime.  The leader reads them all
(:class:`FrontierReader`) and gates with :func:`ca_service.rotation.ack_gate.may_sign_under`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubernetes import client

from ca_service.clock import Clock, SystemClock
from ca_service.errors import StorageError
from ca_service.kube.client import LABELS, REQUEST_TIMEOUT, api_call, status_of
from ca_service.kube.leader import micro_time
from ca_service.rotation.ack_gate import ReplicaFrontier, replicas_behind
from ca_service.services.ports import AckTracker

log = logging.getLogger(__name__)

RESOURCE = "leases"
LEASE_PREFIX = "ca-service-replica-"
ACKED = "ca-service.io/acked-bundle-sequence"
STREAMS = "ca-service.io/streams"
UPDATED = "ca-service.io/updated-at"
ROLE_LABEL = "ca-service.io/role"
ROLE = "replica-frontier"


@dataclass(frozen=True)
class LocalFrontier:
    acked_sequence: int | None
    streams: int


def lease_name(replica_id: str) -> str:
    return f"{LEASE_PREFIX}{replica_id}"


def parse_frontier(lease: Any) -> ReplicaFrontier:
    """A record from a Lease model.  A record we cannot read holds the gate (one stream, nothing ACKed):
    proceeding past a replica we cannot understand could break its streams."""
    notes = lease.metadata.annotations or {}
    replica = lease.spec.holder_identity or lease.metadata.name.removeprefix(LEASE_PREFIX)
    ttl = dt.timedelta(seconds=lease.spec.lease_duration_seconds or 0)
    try:
        acked = notes.get(ACKED) or ""
        return ReplicaFrontier(replica, int(acked) if acked else None, int(notes[STREAMS]),
                               dt.datetime.fromisoformat(notes[UPDATED]), ttl)
    except (KeyError, ValueError, TypeError):
        log.warning("unreadable ACK frontier record", extra={"lease": lease.metadata.name})
        updated = lease.spec.renew_time or dt.datetime.now(dt.UTC)
        return ReplicaFrontier(replica, None, 1, updated, ttl)


def read_frontiers(api: client.ApiClient, namespace: str) -> list[ReplicaFrontier]:
    """Every replica's record, live or not (blocking; run it in a thread)."""
    selector = f"{ROLE_LABEL}={ROLE}"
    with api_call("list", RESOURCE, None, namespace):
        leases = client.CoordinationV1Api(api).list_namespaced_lease(namespace, label_selector=selector,
                                                                     _request_timeout=REQUEST_TIMEOUT)
    return [parse_frontier(lease) for lease in leases.items]


class FrontierPublisher:
    """Keeps this replica's record current: written when the frontier changes (checked every ``check``)
    and at least every ``ttl / 3`` (the record survives two missed refreshes before it counts as gone)."""

    name = "ack-frontier-publisher"

    def __init__(self, api: client.ApiClient, namespace: str, replica_id: str, source: Callable[[], LocalFrontier],
                 *, ttl: dt.timedelta, check: dt.timedelta, clock: Clock | None = None) -> None:
        self._leases = client.CoordinationV1Api(api)
        self.namespace = namespace
        self.replica_id = replica_id
        self.lease_name = lease_name(replica_id)
        self._source = source
        self.ttl = ttl
        self._check = check.total_seconds()
        self._clock = clock or SystemClock()
        self._published: tuple[LocalFrontier, dt.datetime] | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.publish(self._source())  # the leader sees this replica before its first stream ACKs
        self._task = asyncio.create_task(self._run(), name="ack-frontier-publisher")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        # Our streams are closing and will ACK on other replicas: hold nobody's gate from now on.
        await self.publish(LocalFrontier(None, 0))

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), self._check)
            except TimeoutError:
                await self.publish(self._source())

    async def publish(self, frontier: LocalFrontier) -> bool:
        """Write the record if it changed or is due for a refresh; never raises (the next check retries)."""
        now = self._clock.now()
        last = self._published
        if last is not None and last[0] == frontier and now - last[1] < self.ttl / 3:
            return False
        try:
            await asyncio.to_thread(self._write, frontier, now)
        except StorageError as exc:
            log.warning("ACK frontier not published", extra={"lease": self.lease_name, "cause": str(exc)})
            return False
        self._published = (frontier, now)
        return True

    def _write(self, frontier: LocalFrontier, now: dt.datetime) -> None:
        body = self._body(frontier, now)
        try:
            with api_call("get", RESOURCE, self.lease_name, self.namespace):
                current = self._leases.read_namespaced_lease(self.lease_name, self.namespace,
                                                             _request_timeout=REQUEST_TIMEOUT)
        except StorageError as exc:
            if status_of(exc) != 404 or "does not exist" in str(exc):
                raise
            with api_call("create", RESOURCE, self.lease_name, self.namespace):
                self._leases.create_namespaced_lease(self.namespace, body, _request_timeout=REQUEST_TIMEOUT)
            return
        body["metadata"]["resourceVersion"] = current.metadata.resource_version
        with api_call("update", RESOURCE, self.lease_name, self.namespace):
            self._leases.replace_namespaced_lease(self.lease_name, self.namespace, body,
                                                  _request_timeout=REQUEST_TIMEOUT)

    def _body(self, frontier: LocalFrontier, now: dt.datetime) -> dict[str, Any]:
        acked = "" if frontier.acked_sequence is None else str(frontier.acked_sequence)
        return {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": self.lease_name, "namespace": self.namespace,
                         "labels": {**LABELS, ROLE_LABEL: ROLE},
                         "annotations": {ACKED: acked, STREAMS: str(frontier.streams), UPDATED: now.isoformat()}},
            "spec": {"holderIdentity": self.replica_id, "renewTime": micro_time(now),
                     "leaseDurationSeconds": max(1, int(self.ttl.total_seconds()))},
        }


class FrontierReader:
    """The leader's cached view of every replica's record, refreshed every ``period``."""

    name = "ack-frontier-reader"

    def __init__(self, api: client.ApiClient, namespace: str, *, period: dt.timedelta,
                 clock: Clock | None = None) -> None:
        self._api = api
        self.namespace = namespace
        self._period = period.total_seconds()
        self._clock = clock or SystemClock()
        self.records: list[ReplicaFrontier] = []
        self.read_at: dt.datetime | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._run(), name="ack-frontier-reader")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), self._period)
            except TimeoutError:
                await self.refresh()

    async def refresh(self) -> bool:
        try:
            self.records = await asyncio.to_thread(read_frontiers, self._api, self.namespace)
        except StorageError as exc:
            log.warning("ACK frontiers not read", extra={"cause": str(exc)})
            return False
        self.read_at = self._clock.now()
        return True

    def live(self) -> list[ReplicaFrontier]:
        now = self._clock.now()
        return [f for f in self.records if f.is_live(now)]


class ClusterAckTracker:
    """:class:`AckTracker` for the whole cluster: this replica's own streams (exact, from ``local``) plus
    the streams of every other live replica, from their records.

    A replica's record says only its frontier, so all its streams count as behind when it is behind.
    A view older than ``max_age`` keeps the gate closed (one stream behind): no news is not consent.
    """

    def __init__(self, local: AckTracker, reader: FrontierReader, replica_id: str, *, max_age: dt.timedelta,
                 clock: Clock | None = None) -> None:
        self._local = local
        self._reader = reader
        self.replica_id = replica_id
        self._max_age = max_age
        self._clock = clock or SystemClock()

    def _others(self) -> list[ReplicaFrontier]:
        return [f for f in self._reader.live() if f.replica != self.replica_id]

    def _stale(self) -> bool:
        read_at = self._reader.read_at
        return read_at is None or self._clock.now() - read_at > self._max_age

    def connected_streams(self) -> int:
        return self._local.connected_streams() + sum(f.streams for f in self._others())

    def streams_behind(self, bundle_sequence: int) -> int:
        remote = sum(f.streams for f in replicas_behind(self._others(), bundle_sequence, self._clock.now()))
        return self._local.streams_behind(bundle_sequence) + remote + (1 if self._stale() else 0)
