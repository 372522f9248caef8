"""Leader election on a ``coordination.k8s.io/v1`` Lease, with client-go's semantics.

Why our own loop and not ``kubernetes.leaderelection``: that module runs in a thread that sleeps in
``time.sleep`` and has no stop or release, so a graceful stop could neither hand over quickly nor end
the thread; it also has no fencing of ``is_leader`` by the renew deadline.  This is ~150 lines on the
Lease API, as client-go's ``leaderelection`` is:

- acquire when the Lease is absent, has no holder, or its record has not changed for ``lease_duration``
  *as observed locally* (client-go does not trust the other replica's clock: expiry is measured from
  the moment this replica saw the record change, not from the ``renewTime`` it carries);
- renew every ``retry_period``; every write is a compare-and-swap on resourceVersion;
- step down at once when another holder is seen, and when no renewal succeeded for ``renew_deadline``
  (< ``lease_duration``, so a deposed leader stops before anyone else may take over);
- on stop, release: holder cleared, so another replica takes over at its next retry instead of waiting
  out the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubernetes import client

from ca_service.clock import Clock, SystemClock
from ca_service.errors import StorageError
from ca_service.kube.client import LABELS, api_call, status_of

log = logging.getLogger(__name__)

RESOURCE = "leases"


def micro_time(instant: dt.datetime) -> str:
    """A Lease MicroTime: RFC 3339 with exactly six fractional digits (what the API server parses)."""
    return instant.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class LeaseTimings:
    lease_duration: dt.timedelta
    renew_deadline: dt.timedelta
    retry_period: dt.timedelta

    def __post_init__(self) -> None:
        # client-go's own rules: a leader must give up (renew_deadline) before others may take over
        # (lease_duration), and must try more than once before its deadline (retry_period).
        if not dt.timedelta(0) < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError("lease timings need 0 < retry_period < renew_deadline < lease_duration")


class LeaderElector:
    """Campaigns for ``lease_name`` in ``namespace`` as ``identity`` until stopped."""

    name = "leader-election"

    def __init__(self, api: client.ApiClient, namespace: str, lease_name: str, identity: str,
                 timings: LeaseTimings, *, clock: Clock | None = None,
                 on_started_leading: Callable[[], None] | None = None,
                 on_stopped_leading: Callable[[], None] | None = None) -> None:
        self._coordination = client.CoordinationV1Api(api)
        self.namespace = namespace
        self.lease_name = lease_name
        self.identity = identity
        self.timings = timings
        self._clock = clock or SystemClock()
        self._on_started = on_started_leading
        self._on_stopped = on_stopped_leading
        self.became_leader = asyncio.Event()
        self.lost_leadership = asyncio.Event()
        self._leading = False
        self._last_renew = 0.0  # monotonic time of our last successful acquire/renew
        self._observed: tuple[str, str] | None = None  # (holder, renewTime) of the record last seen
        self._observed_at = 0.0  # monotonic time that record was first seen
        self._version: str | None = None
        self._transitions = 0
        self.holder: str | None = None  # who leads, as last observed ("" or None: nobody)
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    @property
    def is_leader(self) -> bool:
        """True only while our last renewal is younger than renew_deadline, even if the loop is late."""
        return self._leading and time.monotonic() - self._last_renew < self.timings.renew_deadline.total_seconds()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"leader-election-{self.lease_name}")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self._leading:
            await self._release()
            self._step_down("stopped")

    # ------------------------------------------------------------ loop

    async def _run(self) -> None:
        period = self.timings.retry_period.total_seconds()
        while not self._stop.is_set():
            try:
                held = await asyncio.to_thread(self._try_acquire_or_renew)
            except StorageError as exc:
                held = False
                log.warning("lease %s: acquire/renew failed", self.lease_name, extra={"cause": str(exc)})
            if held:
                self._last_renew = time.monotonic()
                if not self._leading:
                    self._leading = True
                    log.info("became leader", extra={"lease": self.lease_name, "replica": self.identity})
                    self.lost_leadership.clear()
                    self.became_leader.set()
                    _call(self._on_started)
            elif self._leading and (self.holder not in (self.identity, None) or not self.is_leader):
                self._step_down(f"lease held by {self.holder}" if self.holder != self.identity
                                else "renewals failed past renew_deadline")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), period)

    def _step_down(self, why: str) -> None:
        self._leading = False
        log.warning("lost leadership", extra={"lease": self.lease_name, "replica": self.identity, "why": why})
        self.became_leader.clear()
        self.lost_leadership.set()
        _call(self._on_stopped)

    # ------------------------------------------------------------ one attempt (in a thread)

    def _timeout(self) -> float:
        # One attempt must end well inside the renew deadline, so a hung call cannot keep a stale leader.
        return self.timings.renew_deadline.total_seconds() / 2

    def _try_acquire_or_renew(self) -> bool:
        now = self._clock.now()
        try:
            with api_call("get", RESOURCE, self.lease_name, self.namespace):
                lease = self._coordination.read_namespaced_lease(self.lease_name, self.namespace,
                                                                 _request_timeout=self._timeout())
        except StorageError as exc:
            if status_of(exc) != 404 or "does not exist" in str(exc):
                raise
            return self._create(now)
        spec = lease.spec
        holder = spec.holder_identity or ""
        self._observe(holder, str(spec.renew_time))
        self._version = lease.metadata.resource_version
        expired = time.monotonic() - self._observed_at >= self.timings.lease_duration.total_seconds()
        if holder and holder != self.identity and not expired:
            return False
        transitions = (spec.lease_transitions or 0) + (0 if holder == self.identity else 1)
        acquire_time = (spec.acquire_time or now) if holder == self.identity else now
        body = self._body(now, acquire_time, transitions, lease.metadata.resource_version)
        with api_call("update", RESOURCE, self.lease_name, self.namespace):
            updated = self._coordination.replace_namespaced_lease(self.lease_name, self.namespace, body,
                                                                  _request_timeout=self._timeout())
        self._version = updated.metadata.resource_version
        self._observe(self.identity, body["spec"]["renewTime"])
        return True

    def _create(self, now: dt.datetime) -> bool:
        with api_call("create", RESOURCE, self.lease_name, self.namespace):
            created = self._coordination.create_namespaced_lease(self.namespace, self._body(now, now, 0, None),
                                                                 _request_timeout=self._timeout())
        self._version = created.metadata.resource_version
        self._observe(self.identity, micro_time(now))
        return True

    def _observe(self, holder: str, renew_time: str) -> None:
        self.holder = holder
        if self._observed != (holder, renew_time):
            self._observed, self._observed_at = (holder, renew_time), time.monotonic()

    def _body(self, now: dt.datetime, acquired: dt.datetime | Any, transitions: int,
              version: str | None) -> dict[str, Any]:
        self._transitions = transitions
        acquire = acquired if isinstance(acquired, str) else micro_time(acquired)
        return {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": self.lease_name, "namespace": self.namespace, "labels": dict(LABELS),
                         **({"resourceVersion": version} if version else {})},
            "spec": {"holderIdentity": self.identity,
                     "leaseDurationSeconds": max(1, int(self.timings.lease_duration.total_seconds())),
                     "acquireTime": acquire, "renewTime": micro_time(now), "leaseTransitions": transitions},
        }

    async def _release(self) -> None:
        """Clear the holder (CAS on the version we last wrote) so a successor need not wait out the lease."""
        def release() -> None:
            body = self._body(self._clock.now(), self._clock.now(), self._transitions, self._version)
            body["spec"] = {**body["spec"], "holderIdentity": "", "leaseDurationSeconds": 1}
            with api_call("update", RESOURCE, self.lease_name, self.namespace):
                self._coordination.replace_namespaced_lease(self.lease_name, self.namespace, body,
                                                            _request_timeout=self._timeout())
        try:
            await asyncio.to_thread(release)
        except StorageError as exc:  # someone else already holds it, or the API is down: it expires anyway
            log.warning("lease %s not released", self.lease_name, extra={"cause": str(exc)})


def _call(callback: Callable[[], None] | None) -> None:
    if callback is None:
        return
    try:
        callback()
    except Exception:
        log.exception("leader election callback failed")
