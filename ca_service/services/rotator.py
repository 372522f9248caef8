"""Forced rotation (the :class:`~ca_service.services.ports.Rotator` port): what operators ask for by hand.

Scopes: one SPIFFE ID, one namespace, all workloads, the signing intermediate, the istiod
intermediate, the root.  ``dry_run`` computes the same selection and changes nothing.  The reason is
logged here; the audit log is written by the admin API that calls us.
"""

from __future__ import annotations

import logging

from ca_service.errors import InvalidRequestError
from ca_service.pki.identity import SpiffeId
from ca_service.pki.templates import CAKind
from ca_service.rotation import planner
from ca_service.rotation.state import AuthorityState, RootRotationPhase, SlotState
from ca_service.rotation.transitions import force_intermediate, force_root
from ca_service.services.ports import RotationRequest, RotationResult, RotationScope
from ca_service.services.reconciler import Reconciler
from ca_service.services.workloads import WorkloadCert

log = logging.getLogger(__name__)

_CA_SCOPES = {RotationScope.INTERMEDIATE: CAKind.INTERMEDIATE,
              RotationScope.ISTIOD_INTERMEDIATE: CAKind.ISTIOD_INTERMEDIATE}


def _serial(cert: WorkloadCert) -> str:
    return format(cert.svid.leaf.serial_number, "x")


class RotationService:
    """Implements ``Rotator`` on top of the reconciler (which owns the CAS commit and the registry)."""

    def __init__(self, reconciler: Reconciler) -> None:
        self._reconciler = reconciler

    async def rotate(self, request: RotationRequest) -> RotationResult:
        log.info("forced rotation requested", extra={"scope": str(request.scope), "reason": request.reason,
                                                      "caller": request.caller, "dry_run": request.dry_run,
                                                      "spiffe_id": request.spiffe_id, "namespace": request.namespace})
        if request.scope in _CA_SCOPES:
            return self._intermediate(request, _CA_SCOPES[request.scope])
        if request.scope is RotationScope.ROOT:
            return await self._root(request)
        return await self._workloads(request)

    # ---------------------------------------------------------- workloads

    def _select(self, request: RotationRequest) -> list[WorkloadCert]:
        certs = list(self._reconciler.registry)
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
        affected = tuple(_serial(c) for c in selected)
        identities = tuple(sorted({str(c.spiffe_id) for c in selected}))
        if request.dry_run or not selected:
            return RotationResult(request.scope, request.dry_run, affected, (), identities,
                                  detail=f"{len(selected)} workload certificate(s) would be re-issued")
        registry, now = self._reconciler.registry, self._reconciler.clock.now()
        if request.scope is RotationScope.WORKLOAD:
            # One identity is a handful of nodes: re-issue now, nothing to stampede.
            new = tuple(_serial(registry.reissue(c.node_id, c.spiffe_id, reason=f"forced: {request.reason}"))
                        for c in selected)
            self._reconciler.telemetry.rotations.labels(kind="workload", reason="forced").inc(len(new))
            return RotationResult(request.scope, False, affected, new, identities,
                                  detail=f"{len(new)} workload certificate(s) re-issued")
        window = self._reconciler.policy.reissue_window
        for cert, at in zip(selected, planner.spread_times(len(selected), now, window), strict=True):
            registry.reschedule(cert, at, forced=True)
        await self._reconciler.reconcile(now)  # the first of the spread is due now
        return RotationResult(request.scope, False, affected, (), identities,
                              detail=f"{len(selected)} workload certificate(s) re-issued over {window}")

    # ---------------------------------------------------------- CAs

    def _intermediate(self, request: RotationRequest, kind: CAKind) -> RotationResult:
        state = self._reconciler.authority.state
        affected = tuple(e.serial for e in state.of_kind(kind, SlotState.ACTIVE))
        prepared = tuple(e.serial for e in state.of_kind(kind, SlotState.PREPARED))
        if request.dry_run:
            # Validate exactly as the real run would (mode, root key) without minting anything.
            if not affected:
                raise InvalidRequestError(f"there is no active {kind} in {state.mode} mode")
            if not prepared and not state.holds_root_key:
                force_intermediate(state, kind, self._reconciler.clock.now(), self._reconciler.policy)
            return RotationResult(request.scope, True, affected, prepared, detail=(
                f"{kind} {', '.join(affected)} would become old (kept until its leaves expire); "
                + (f"prepared {prepared[0]} would become active" if prepared else "a new one would be minted")))
        policy, now = self._reconciler.policy, self._reconciler.clock.now()
        new_state = self._reconciler.commit_change(lambda s: force_intermediate(s, kind, now, policy))
        new = tuple(e.serial for e in new_state.of_kind(kind, SlotState.ACTIVE))
        self._reconciler.telemetry.rotations.labels(kind=str(kind), reason="forced").inc()
        log.info("forced CA rotation done", extra={"kind": str(kind), "serial": new[0], "reason": request.reason})
        return RotationResult(request.scope, False, affected, new, detail=f"{kind} rotated")

    async def _root(self, request: RotationRequest) -> RotationResult:
        state = self._reconciler.authority.state
        affected = _root_affected(state, self._reconciler)
        rotation = state.root_rotation
        what = ("the ACK gate of the running root rotation would be overridden"
                if rotation is not None and rotation.phase is RootRotationPhase.PUBLISHED
                else "root rotation would start: new root published now, signing after the ACK gate, every "
                     "live workload certificate re-issued")
        policy, now = self._reconciler.policy, self._reconciler.clock.now()
        if request.dry_run:
            if not state.holds_root_key or (rotation is not None and rotation.phase is not RootRotationPhase.PUBLISHED):
                force_root(state, now, policy, reason=request.reason)  # raises the same error the real run would
            return RotationResult(request.scope, True, affected, (), detail=what)
        new_state = self._reconciler.commit_change(lambda s: force_root(s, now, policy, reason=request.reason))
        await self._reconciler.reconcile(now)  # e.g. a gate override with ACKs complete proceeds at once
        new = tuple(e.serial for e in new_state.of_kind(CAKind.ROOT, SlotState.PREPARED))
        current = self._reconciler.authority.state.root_rotation
        return RotationResult(request.scope, False, affected, new, detail=what,
                              extra={"phase": str(current.phase) if current else "done"})


def _root_affected(state: AuthorityState, reconciler: Reconciler) -> tuple[str, ...]:
    """The root, every CA under it, and every live SVID: all are replaced by a root rotation."""
    root = state.active(CAKind.ROOT)
    cas = (root.serial, *(e.serial for e in state.children_of(root)))
    return (*cas, *(_serial(c) for c in reconciler.registry))
