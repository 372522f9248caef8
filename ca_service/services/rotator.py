"""Forced rotation (the :class:`~ca_service.services.ports.Rotator` port): what operators ask for by hand.

Scopes: one SPIFFE ID, one namespace, all workloads, the signing intermediate, the istiod
intermediate, the root.  ``dry_run`` computes the same plan (``rotation/forced.py``) and changes
nothing.  The reason is logged here; the audit log is written by the admin API that calls us.

The rotator sees the rotation engine through narrow ports: :class:`CAChanges` (the current state,
``apply(change)`` under the engine's one lock, a reconcile pass) and :class:`Workloads` (the live
SVIDs).  Every CA-state change goes through ``apply``, so a forced rotation waits for a running tick.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ca_service.clock import Clock
from ca_service.errors import InvalidRequestError
from ca_service.pki.identity import SpiffeId
from ca_service.pki.templates import CAKind
from ca_service.rotation import planner
from ca_service.rotation.forced import plan_intermediate, plan_root
from ca_service.rotation.state import AuthorityState, SlotState
from ca_service.rotation.transitions import force_intermediate, force_root
from ca_service.services.ports import RotationRequest, RotationResult, RotationScope
from ca_service.services.workloads import WorkloadCert

if TYPE_CHECKING:
    from prometheus_client import Counter

    from ca_service.rotation.planner import RotationPolicy
    from ca_service.services.reconciler import Reconciler

log = logging.getLogger(__name__)

T = TypeVar("T")

_CA_SCOPES = {RotationScope.INTERMEDIATE: CAKind.INTERMEDIATE,
              RotationScope.ISTIOD_INTERMEDIATE: CAKind.ISTIOD_INTERMEDIATE}


class CAChanges(Protocol):
    """The rotation engine as the rotator sees it (implemented by the reconciler)."""

    @property
    def state(self) -> AuthorityState: ...

    async def apply(self, change: Callable[[AuthorityState], AuthorityState]) -> AuthorityState: ...

    async def exclusive(self, work: Callable[[], T]) -> T: ...

    async def reconcile(self, now: dt.datetime | None = None) -> Any: ...


class Workloads(Protocol):
    """The live workload SVIDs (implemented by the workload registry)."""

    def __iter__(self) -> Iterator[WorkloadCert]: ...

    def reissue(self, node_id: str, spiffe_id: SpiffeId, *, reason: str) -> WorkloadCert: ...

    def reschedule(self, cert: WorkloadCert, at: dt.datetime, *, forced: bool | None = None) -> None: ...

    def wave(self) -> None: ...  # a storm of re-issues and pushes begins


@dataclass(frozen=True)
class RotatorPorts:
    changes: CAChanges
    workloads: Workloads
    clock: Clock
    reissue_window: dt.timedelta  # forced re-issues of many workloads are spread over it
    policy: RotationPolicy
    rotations: Counter  # ca_rotations_total{kind, reason}

    @classmethod
    def of(cls, reconciler: Reconciler) -> RotatorPorts:
        """The ports of the daemon's rotation engine: the reconciler for CA changes, its registry for workloads."""
        return cls(reconciler, reconciler.registry, reconciler.clock, reconciler.policy.reissue_window,
                   reconciler.policy, reconciler.telemetry.rotations)


class RotationService:
    """Implements ``Rotator`` over its ports (:meth:`of` wires them from a reconciler)."""

    def __init__(self, ports: RotatorPorts) -> None:
        self._ports = ports

    @classmethod
    def of(cls, reconciler: Reconciler) -> RotationService:
        return cls(RotatorPorts.of(reconciler))

    async def rotate(self, request: RotationRequest) -> RotationResult:
        log.info("forced rotation requested", extra={"scope": str(request.scope), "reason": request.reason,
                                                      "caller": request.caller, "dry_run": request.dry_run,
                                                      "spiffe_id": request.spiffe_id, "namespace": request.namespace})
        if request.scope in _CA_SCOPES:
            return await self._intermediate(request, _CA_SCOPES[request.scope])
        if request.scope is RotationScope.ROOT:
            return await self._root(request)
        return await self._workloads(request)

    # ---------------------------------------------------------- workloads

    def _select(self, request: RotationRequest) -> list[WorkloadCert]:
        certs = list(self._ports.workloads)
        if request.scope is RotationScope.WORKLOAD:
            if not request.spiffe_id:
                raise InvalidRequestError("scope workload needs spiffe_id")
            target = SpiffeId.parse(request.spiffe_id)
            return [c for c in certs if c.spiffe_id == target]
        if request.scope is RotationScope.NAMESPACE:
            if not request.namespace:
                raise InvalidRequestError("scope namespace needs namespace")
            return [c for c in certs if (c.spiffe_id.kubernetes or ("", ""))[0] == request.namespace]
        return certs

    async def _workloads(self, request: RotationRequest) -> RotationResult:
        selected = self._select(request)
        affected = tuple(c.serial for c in selected)
        identities = tuple(sorted({str(c.spiffe_id) for c in selected}))
        if request.dry_run or not selected:
            return RotationResult(request.scope, request.dry_run, affected, (), identities,
                                  detail=f"{len(selected)} workload certificate(s) would be re-issued")
        ports, now = self._ports, self._ports.clock.now()
        if request.scope is RotationScope.WORKLOAD:
            # One identity is a handful of nodes: re-issue now, nothing to stampede.
            new = await ports.changes.exclusive(lambda: tuple(
                ports.workloads.reissue(c.node_id, c.spiffe_id, reason=f"forced: {request.reason}").serial
                for c in selected))
            ports.rotations.labels(kind="workload", reason="forced").inc(len(new))
            return RotationResult(request.scope, False, affected, new, identities,
                                  detail=f"{len(new)} workload certificate(s) re-issued")
        window = ports.reissue_window

        def spread() -> None:
            # The storm starts here: rescheduling thousands allocates enough to run a young collection
            # over what every idle stream holds, unless the collector schedule froze it first.
            ports.workloads.wave()
            for cert, at in zip(selected, planner.spread_times(len(selected), now, window), strict=True):
                ports.workloads.reschedule(cert, at, forced=True)

        await ports.changes.exclusive(spread)
        await ports.changes.reconcile(now)  # the first of the spread is due now
        return RotationResult(request.scope, False, affected, (), identities,
                              detail=f"{len(selected)} workload certificate(s) re-issued over {window}")

    # ---------------------------------------------------------- CAs

    async def _intermediate(self, request: RotationRequest, kind: CAKind) -> RotationResult:
        plan = plan_intermediate(self._ports.changes.state, kind)
        if request.dry_run:
            return RotationResult(request.scope, True, plan.affected, plan.prepared, detail=plan.detail)
        policy, now = self._ports.policy, self._ports.clock.now()
        new_state = await self._ports.changes.apply(lambda s: force_intermediate(s, kind, now, policy))
        new = tuple(e.serial for e in new_state.of_kind(kind, SlotState.ACTIVE))
        self._ports.rotations.labels(kind=str(kind), reason="forced").inc()
        log.info("forced CA rotation done", extra={"kind": str(kind), "serial": new[0], "reason": request.reason})
        return RotationResult(request.scope, False, plan.affected, new, detail=f"{kind} rotated")

    async def _root(self, request: RotationRequest) -> RotationResult:
        state = self._ports.changes.state
        # The root, every CA under it, and every live SVID: all are replaced by a root rotation.
        plan = plan_root(state)
        affected = (*plan.affected, *(c.serial for c in self._ports.workloads))
        if request.dry_run:
            return RotationResult(request.scope, True, affected, (), detail=plan.detail)
        policy, now = self._ports.policy, self._ports.clock.now()
        new_state = await self._ports.changes.apply(lambda s: force_root(s, now, policy, reason=request.reason))
        await self._ports.changes.reconcile(now)  # e.g. a gate override with ACKs complete proceeds at once
        new = tuple(e.serial for e in new_state.of_kind(CAKind.ROOT, SlotState.PREPARED))
        current = self._ports.changes.state.root_rotation
        return RotationResult(request.scope, False, affected, new, detail=plan.detail,
                              extra={"phase": str(current.phase) if current else "done"})
