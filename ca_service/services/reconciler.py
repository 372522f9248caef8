"""One idempotent reconcile pass: compare ``now`` with the persisted state and do whatever is due.

Level-triggered: the pass reads the persisted slot states and the clock, never remembers what it did
last time, so a missed tick, a restart or a forced rotation all converge to the same state.  CA
changes go through :meth:`Authority.commit` (compare-and-swap); on a conflict the pass reloads and
leaves the rest to the next tick, deciding again against the state that won.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from ca_service.clock import Clock
from ca_service.errors import CAServiceError, ConflictError, NotReadyError, StorageError
from ca_service.pki.templates import CAKind
from ca_service.rotation import planner
from ca_service.rotation.planner import Action, GateStatus, RotationPolicy, Step
from ca_service.rotation.state import AuthorityState, RootRotationPhase, SlotState
from ca_service.rotation.transitions import apply_step
from ca_service.services.authority import Authority
from ca_service.services.ports import AckTracker, RotationReason
from ca_service.services.workloads import BatchSigner, WorkloadCert, WorkloadRegistry
from ca_service.telemetry import Telemetry

log = logging.getLogger(__name__)

T = TypeVar("T")

# Bound on CA steps per pass.  After any downtime a pass needs at most: per intermediate kind
# prepare + activate + 2 prunes, plus the four root phases; 16 leaves room and still stops a bug
# from spinning forever inside one tick.
MAX_STEPS_PER_PASS = 16
# A failed workload renewal is retried this much later (the next tick would be too eager if the
# CA is down; a leaf has half its lifetime of slack at its renewal point).
RENEWAL_RETRY = dt.timedelta(seconds=30)
# Renewals due in one pass go to the signing pool from this many on.  Below it the pool's round trip
# (~1 ms) costs more than signing in process (~0.4 ms a leaf), and a steady fleet renews a few per tick.
POOL_MIN_BATCH = 16


@dataclass
class ReconcileReport:
    steps: list[Step] = field(default_factory=list)
    renewed: int = 0
    rescheduled: int = 0
    gate: GateStatus | None = None
    blocked: dict[str, str] = field(default_factory=dict)
    conflict: bool = False
    error: str = ""


class Reconciler:
    """Drives CA rotations and workload renewals; the scheduler calls :meth:`reconcile` every tick."""

    def __init__(self, authority: Authority, registry: WorkloadRegistry, policy: RotationPolicy,
                 telemetry: Telemetry, *, acks: AckTracker | None = None, clock: Clock | None = None,
                 signer: BatchSigner | None = None, leader: Callable[[], bool] | None = None) -> None:
        self.authority = authority
        self.registry = registry
        self.policy = policy
        self.telemetry = telemetry
        # Without an SDS server there is no stream to wait for; the minimum propagation time still holds.
        self.acks = acks
        self.clock = clock or authority.clock
        self.blocked: dict[str, str] = {}
        self.last_gate: GateStatus | None = None
        self._alerted_rotation: dt.datetime | None = None
        # Renewal storms (a forced re-issue, a root switch) sign here on every core; None signs in process.
        self.signer = signer
        # One pass at a time: a pass awaits the signing pool, and the scheduler's tick and a forced
        # rotation must not interleave their CAS commits or pop the same due renewals.
        self._lock = asyncio.Lock()
        # With replicas, only the lease holder mutates the CA (None: this process is the only writer).
        # Asked before every commit, so losing the lease stops mutation at the next step, not the next tick.
        self._leader = leader

    def may_mutate(self) -> bool:
        return self._leader is None or self._leader()

    def behind(self, state: AuthorityState) -> int:
        return self.acks.streams_behind(state.bundle_sequence) if self.acks is not None else 0

    async def reconcile(self, now: dt.datetime | None = None) -> ReconcileReport:
        async with self._lock:
            now = now or self.clock.now()
            report = ReconcileReport()
            try:
                if self.may_mutate():
                    await self._ca_pass(now, report)
            except ConflictError as exc:
                # Another writer (a replica, the CLI) won the CAS: take its state, decide again next tick.
                log.warning("CA state changed underneath; reloading", extra={"cause": str(exc)})
                report.conflict = True
                await self._reload()
            except StorageError as exc:
                # The store is unreachable (an API outage): serve and renew from memory, retry next tick.
                log.warning("CA state not written; retrying next tick", extra={"cause": str(exc)})
                report.error = str(exc)
            self._reissue_after_root_switch(now, report)
            await self._renew_due(now, report)
            self._update_gauges()
            return report

    @property
    def state(self) -> AuthorityState:
        return self.authority.state

    async def apply(self, change: Callable[[AuthorityState], AuthorityState]) -> AuthorityState:
        """Apply a CA-state change (a forced rotation) under the one lock, so it never interleaves with a
        reconcile pass; reloads and retries on a CAS conflict.  Raises what ``change`` raises."""
        async with self._lock:
            return await self.commit_change(change)

    async def exclusive(self, work: Callable[[], T]) -> T:
        """Run ``work`` (a change of the renewal schedule) under the same lock as :meth:`apply`."""
        async with self._lock:
            return work()

    async def commit_change(self, change: Callable[[AuthorityState], AuthorityState], *, attempts: int = 3,
                            ) -> AuthorityState:
        """Apply ``change`` to the current state and commit it, reloading and retrying on a CAS conflict.

        The caller holds the lock (:meth:`apply` does).

        Raises:
            NotReadyError: another replica holds the leader lease (only the leader changes the CA).
        """
        for attempt in range(attempts):
            if not self.may_mutate():
                raise NotReadyError("this replica is not the leader; send CA changes to the leader")
            try:
                return await self.authority.commit_async(change(self.authority.state))
            except ConflictError:
                if attempt == attempts - 1:
                    raise
                await self._reload()
        raise AssertionError("unreachable")

    async def _reload(self) -> None:
        try:
            await self.authority.load_async()
        except StorageError as exc:
            log.warning("CA state not reloaded; serving the last known state", extra={"cause": str(exc)})

    async def _ca_pass(self, now: dt.datetime, report: ReconcileReport) -> None:
        for _ in range(MAX_STEPS_PER_PASS):
            if not self.may_mutate():
                break  # the lease was lost mid-pass: stop at once, the new leader decides from here
            state = self.authority.state
            behind = self.behind(state)
            report.gate = planner.root_gate(state, now, self.policy, behind)
            self._observe_gate(state, report.gate, behind)
            step = planner.next_step(state, now, self.policy, behind=behind)
            if step is None:
                break
            try:
                new = apply_step(state, step, now, self.policy)
            except CAServiceError as exc:
                self.telemetry.rotation_failures.labels(kind=str(step.kind)).inc()
                log.error("rotation step failed", extra={"action": str(step.action), "kind": str(step.kind),
                                                          "cause": str(exc)})
                report.error = str(exc)
                break
            await self.authority.commit_async(new)
            report.steps.append(step)
            self._count_step(step, new)
        self._observe_blocked(self.authority.state, now, report)

    def _count_step(self, step: Step, new: AuthorityState) -> None:
        if step.action in (Action.ACTIVATE, Action.ROOT_SIGN):
            # A rotation counts when the new CA starts signing.
            reason = "scheduled" if step.reason == "scheduled" else "forced"
            self.telemetry.rotations.labels(kind=str(step.kind), reason=reason).inc()
        fields: dict[str, object] = {"action": str(step.action), "kind": str(step.kind),
                                     "bundle_sequence": new.bundle_sequence, "reason": step.reason}
        if step.action is not Action.PRUNE and step.action is not Action.ROOT_FINISH:
            entry = new.of_kind(step.kind, SlotState.PREPARED) or new.of_kind(step.kind, SlotState.ACTIVE)
            if entry:
                fields.update(serial=entry[-1].serial, key_id=entry[-1].key_id,
                              not_after=entry[-1].not_after.isoformat())
        else:
            fields["key_id"] = step.target
        log.info("CA rotation step", extra=fields)

    def _observe_gate(self, state: AuthorityState, gate: GateStatus | None, behind: int) -> None:
        rotation = state.root_rotation
        if gate is GateStatus.TIMED_OUT and rotation is not None and self._alerted_rotation != rotation.started_at:
            # Alert once per rotation (per process); the rotation keeps waiting rather than proceed.
            self._alerted_rotation = rotation.started_at
            self.telemetry.ack_gate_timeouts.inc()
            log.error(
                "ALERT: root rotation is stuck at the ACK gate; not signing with the new root until every SDS "
                "stream has ACKed it (or an operator forces a root rotation to override)",
                extra={"streams_behind": behind, "bundle_sequence": state.bundle_sequence,
                       "published_at": rotation.phase_since.isoformat()},
            )
        if gate is not self.last_gate and gate is not None:
            log.info("root rotation ACK gate", extra={"gate": str(gate), "streams_behind": behind})
        self.last_gate = gate

    def _observe_blocked(self, state: AuthorityState, now: dt.datetime, report: ReconcileReport) -> None:
        blocked = planner.blocked_rotations(state, now, self.policy)
        for kind, message in blocked.items():
            if kind not in self.blocked:
                # Reported once when it becomes blocked (not every tick); status shows it all along.
                self.telemetry.rotation_failures.labels(kind=kind).inc()
                log.error("rotation impossible", extra={"kind": kind, "cause": message})
        self.blocked = blocked
        report.blocked = dict(blocked)

    def _reissue_after_root_switch(self, now: dt.datetime, report: ReconcileReport) -> None:
        """In SIGNING, every live SVID still under A is renewed within the re-issue window.

        Idempotent: an SVID already scheduled inside the window is left alone, so each pass only
        picks up what a new connection issued under A before the switch.
        """
        state = self.authority.state
        rotation = state.root_rotation
        if rotation is None or rotation.phase is not RootRotationPhase.SIGNING:
            return
        deadline = rotation.phase_since + self.policy.reissue_window
        signer = state.active(CAKind.INTERMEDIATE).key_id
        stale = [c for c in self.registry if c.svid.issuer_key_id != signer and c.renew_at > deadline]
        start = max(now, rotation.phase_since)
        # An operator's root rotation makes these renewals forced ones; a scheduled one, scheduled.
        forced = rotation.reason != RotationReason.SCHEDULED
        for cert, at in zip(stale, planner.spread_times(len(stale), start, deadline - start), strict=True):
            self.registry.reschedule(cert, at, forced=forced)
        report.rescheduled += len(stale)

    async def _renew_due(self, now: dt.datetime, report: ReconcileReport) -> None:
        due = self.registry.due(now)
        forced = [c for c in due if self.registry.is_forced(c)]
        scheduled = [c for c in due if not self.registry.is_forced(c)]
        for reason, group in ((RotationReason.SCHEDULED, scheduled), (RotationReason.FORCED, forced)):
            if group:
                renewed = await self._renew(group, now, reason)
                report.renewed += renewed
                if renewed:
                    self.telemetry.rotations.labels(kind="workload", reason=str(reason)).inc(renewed)

    async def _renew(self, due: list[WorkloadCert], now: dt.datetime, reason: RotationReason) -> int:
        """Renew ``due``: on the signing pool when it is a storm, else (and on any pool failure) in process."""
        log_reason = "renewal" if reason is RotationReason.SCHEDULED else "forced renewal"
        if self.signer is not None and len(due) >= POOL_MIN_BATCH:
            installed: list[WorkloadCert] = []
            try:
                return len(await self.registry.reissue_many([c.workload_key for c in due], reason=log_reason,
                                                            signer=self.signer, installed=installed))
            except CAServiceError as exc:
                # A dead worker or a closed pool must not stall renewals: sign the rest in process.
                # (A CA that cannot sign at all fails again there, per certificate, with its retry.)
                # What the pool installed before it failed is not signed again, and a workload that
                # changed meanwhile (forgotten, or given a first SVID anew) is left as it is.
                pending = [c for c in due if self._unchanged(c)]
                log.error("signing pool failed; renewing in process",
                          extra={"count": len(pending), "cause": str(exc)})
                return len(installed) + self._renew_in_process(pending, now, log_reason)
        return self._renew_in_process(due, now, log_reason)

    def _unchanged(self, cert: WorkloadCert) -> bool:
        current = self.registry.get(cert.node_id, cert.spiffe_id)
        return current is not None and current.generation == cert.generation

    def _renew_in_process(self, due: list[WorkloadCert], now: dt.datetime, log_reason: str) -> int:
        if len(due) >= POOL_MIN_BATCH:
            self.registry.wave()  # a storm signed here (no pool, or it failed): its pushes follow at once
        renewed = 0
        for cert in due:
            try:
                self.registry.reissue(cert.node_id, cert.spiffe_id, reason=log_reason)
            except CAServiceError as exc:
                self.telemetry.rotation_failures.labels(kind="workload").inc()
                log.error("workload renewal failed", extra={"spiffe_id": str(cert.spiffe_id), "cause": str(exc)})
                self.registry.reschedule(cert, now + RENEWAL_RETRY)  # keeps its forced mark
                continue
            renewed += 1
        return renewed

    def _update_gauges(self) -> None:
        state = self.authority.state
        for kind, at in planner.next_due(state, self.policy).items():
            self.telemetry.next_rotation.labels(kind=kind).set(at.timestamp())
        next_renewal = self.registry.next_renewal()
        if next_renewal is not None:
            self.telemetry.next_rotation.labels(kind="workload").set(next_renewal.timestamp())
        # CA certificate expiry gauges belong to web.metrics.StateMetrics (set on every commit).
