"""When each CA rotation step is due: pure functions of the persisted state and ``now`` (SPIRE's
``ShouldPrepareNext(now)`` / ``ShouldActivateNext(now)``).  No I/O, no clock, no logging.

The reconciler asks :func:`next_step` repeatedly and applies each answer (``transitions.apply_step``)
until it returns None, so one pass after any downtime walks every overdue step in order and a pass
with nothing due changes nothing (level-triggered, idempotent).
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass
from typing import Protocol

from ca_service.pki.keys import KeyAlgorithm
from ca_service.pki.templates import CAKind
from ca_service.rotation.state import AuthorityState, CAEntry, RootRotationPhase, SlotState

INTERMEDIATE_KINDS = (CAKind.INTERMEDIATE, CAKind.ISTIOD_INTERMEDIATE)


class _CAValues(Protocol):
    @property
    def root_ttl(self) -> dt.timedelta: ...
    @property
    def intermediate_ttl(self) -> dt.timedelta: ...
    @property
    def istiod_intermediate_ttl(self) -> dt.timedelta: ...
    @property
    def key_algorithm(self) -> KeyAlgorithm: ...
    @property
    def max_workload_ttl(self) -> dt.timedelta: ...
    @property
    def backdate(self) -> dt.timedelta: ...


class _RotationValues(Protocol):
    @property
    def root_min_propagation(self) -> dt.timedelta: ...
    @property
    def root_ack_timeout(self) -> dt.timedelta: ...
    @property
    def reissue_window(self) -> dt.timedelta: ...


class _IstiodValues(Protocol):
    @property
    def max_workload_ttl(self) -> dt.timedelta: ...


class PolicySource(Protocol):
    """The shape of ``config.Settings`` that :meth:`RotationPolicy.from_settings` reads (structural, so
    the pure core never imports the configuration layer)."""

    @property
    def ca(self) -> _CAValues: ...
    @property
    def rotation(self) -> _RotationValues: ...
    @property
    def istiod(self) -> _IstiodValues: ...


@dataclass(frozen=True)
class RotationPolicy:
    """Every duration and fraction a rotation decision depends on (built from the settings)."""

    root_ttl: dt.timedelta
    intermediate_ttl: dt.timedelta
    istiod_ttl: dt.timedelta
    algorithm: KeyAlgorithm
    max_leaf_ttl: dt.timedelta  # the longest SVID our signing intermediate issues
    istiod_max_leaf_ttl: dt.timedelta  # the longest leaf istiod issues with its intermediate
    skew: dt.timedelta  # clock skew allowance of relying parties (= leaf backdate)
    min_propagation: dt.timedelta
    ack_timeout: dt.timedelta
    reissue_window: dt.timedelta
    # Activate the next CA at 50% of the current one's lifetime: the other half is slack for an
    # outage of the CA itself, and it guarantees the active intermediate always has more lifetime
    # left than any leaf it signs (a 30-day intermediate vs 24 h SVIDs), so clamping never bites.
    activate_fraction: float = 0.5
    # Prepare 10% of the lifetime earlier: the next CA is persisted and visible in `status` before
    # it signs, and a failure to mint it (root key gone) is reported with days of slack left.
    prepare_lead_fraction: float = 0.1

    @classmethod
    def from_settings(cls, settings: PolicySource) -> RotationPolicy:
        ca, rot = settings.ca, settings.rotation
        return cls(
            root_ttl=ca.root_ttl, intermediate_ttl=ca.intermediate_ttl, istiod_ttl=ca.istiod_intermediate_ttl,
            algorithm=ca.key_algorithm, max_leaf_ttl=ca.max_workload_ttl,
            istiod_max_leaf_ttl=settings.istiod.max_workload_ttl, skew=ca.backdate,
            min_propagation=rot.root_min_propagation, ack_timeout=rot.root_ack_timeout,
            reissue_window=rot.reissue_window,
        )

    def ttl(self, kind: CAKind) -> dt.timedelta:
        return {CAKind.ROOT: self.root_ttl, CAKind.INTERMEDIATE: self.intermediate_ttl,
                CAKind.ISTIOD_INTERMEDIATE: self.istiod_ttl}[kind]

    def leaf_ttl(self, kind: CAKind) -> dt.timedelta:
        return self.istiod_max_leaf_ttl if kind is CAKind.ISTIOD_INTERMEDIATE else self.max_leaf_ttl


class Action(enum.StrEnum):
    PREPARE = "prepare"  # mint the next intermediate (PREPARED) under the active root
    ACTIVATE = "activate"  # ACTIVE -> OLD, PREPARED -> ACTIVE
    PRUNE = "prune"  # drop an OLD intermediate nothing valid chains to any more
    ROOT_PUBLISH = "root-publish"  # (a) mint root B as PREPARED; bundle A+B
    ROOT_SIGN = "root-sign"  # (c) intermediates under B sign; A and its intermediates OLD
    ROOT_RETIRE = "root-retire"  # SIGNING -> RETIRING once every live SVID was re-issued under B
    ROOT_FINISH = "root-finish"  # (d) drop A: the bundle is B alone


@dataclass(frozen=True)
class Step:
    action: Action
    kind: CAKind
    target: str = ""  # key id of the entry a PRUNE removes
    reason: str = "scheduled"


class GateStatus(enum.StrEnum):
    """Where a PUBLISHED root rotation stands at its ACK gate (b)."""

    WAITING_PROPAGATION = "waiting-propagation"  # not yet root_min_propagation since B was published
    WAITING_ACKS = "waiting-acks"  # some SDS stream has not ACKed a bundle with B
    TIMED_OUT = "timed-out"  # still waiting past root_ack_timeout: alert, never proceed on our own
    OVERRIDDEN = "overridden"  # an operator forced it on despite missing ACKs
    OPEN = "open"


def activation_time(entry: CAEntry, policy: RotationPolicy) -> dt.datetime:
    return entry.not_before + (entry.not_after - entry.not_before) * policy.activate_fraction


def prepare_time(entry: CAEntry, policy: RotationPolicy) -> dt.datetime:
    fraction = max(0.0, policy.activate_fraction - policy.prepare_lead_fraction)
    return entry.not_before + (entry.not_after - entry.not_before) * fraction


def prune_time(state: AuthorityState, entry: CAEntry, policy: RotationPolicy) -> dt.datetime:
    """When an OLD intermediate can go: no leaf it could have signed is still valid anywhere.

    It stopped signing at ``retired_at``, so every leaf it signed was signed no later than that and,
    being clamped to its issuer, expires by ``min(retired_at + longest leaf TTL, entry.not_after)``.
    ``skew`` is added because a relying party whose clock lags still accepts a leaf that long past its
    notAfter.  Without a persisted retirement time (should not happen) only notAfter is safe.
    """
    retired = state.retired_at(entry)
    horizon = entry.not_after if retired is None else min(entry.not_after, retired + policy.leaf_ttl(entry.kind))
    return horizon + policy.skew


def root_gate(state: AuthorityState, now: dt.datetime, policy: RotationPolicy, behind: int) -> GateStatus | None:
    """The ACK gate between publishing B (a) and signing with it (c); None outside PUBLISHED.

    The minimum propagation time applies first and even to an override: bundle files, the bundle
    endpoint and federated peers polling it have no ACK, only time.  A timeout never opens the gate:
    signing with B before a stream trusts B breaks that stream's next handshake.
    """
    rotation = state.root_rotation
    if rotation is None or rotation.phase is not RootRotationPhase.PUBLISHED:
        return None
    elapsed = now - rotation.phase_since
    if elapsed < policy.min_propagation:
        return GateStatus.WAITING_PROPAGATION
    if behind == 0:
        return GateStatus.OPEN
    if state.root_gate_override:
        return GateStatus.OVERRIDDEN
    return GateStatus.TIMED_OUT if elapsed >= policy.ack_timeout else GateStatus.WAITING_ACKS


def should_rotate_root(state: AuthorityState, now: dt.datetime, policy: RotationPolicy) -> bool:
    """At 50% of the active root's lifetime, when no rotation runs and we hold the root key."""
    if state.root_rotation is not None or not state.holds_root_key:
        return False
    return now >= activation_time(state.active(CAKind.ROOT), policy)


def _root_step(state: AuthorityState, now: dt.datetime, policy: RotationPolicy, behind: int) -> Step | None:
    rotation = state.root_rotation
    if rotation is None:
        return Step(Action.ROOT_PUBLISH, CAKind.ROOT) if should_rotate_root(state, now, policy) else None
    reason = rotation.reason
    if rotation.phase is RootRotationPhase.PUBLISHED:
        gate = root_gate(state, now, policy, behind)
        return Step(Action.ROOT_SIGN, CAKind.ROOT, reason=reason) if gate in (
            GateStatus.OPEN, GateStatus.OVERRIDDEN) else None
    if rotation.phase is RootRotationPhase.SIGNING:
        # Every live SVID under A was rescheduled into [phase_since, phase_since + window].
        due = now >= rotation.phase_since + policy.reissue_window
        return Step(Action.ROOT_RETIRE, CAKind.ROOT, reason=reason) if due else None
    # RETIRING: A goes once no intermediate under it is left (each is pruned at its own horizon).
    old_roots = state.of_kind(CAKind.ROOT, SlotState.OLD)
    if all(not state.children_of(root) for root in old_roots):
        return Step(Action.ROOT_FINISH, CAKind.ROOT, reason=reason)
    return None


def _intermediate_step(state: AuthorityState, kind: CAKind, now: dt.datetime, policy: RotationPolicy) -> Step | None:
    if not state.of_kind(kind, SlotState.ACTIVE):
        return None  # intermediate-only mode has no istiod intermediate
    active = state.active(kind)
    prepared = state.of_kind(kind, SlotState.PREPARED)
    # Activation first: a PREPARED one must take over before the next can be prepared.
    if prepared and now >= activation_time(active, policy):
        return Step(Action.ACTIVATE, kind)
    if not prepared and state.holds_root_key and now >= prepare_time(active, policy):
        return Step(Action.PREPARE, kind)
    for old in state.of_kind(kind, SlotState.OLD):
        if now >= prune_time(state, old, policy):
            return Step(Action.PRUNE, kind, target=old.key_id)
    return None


def next_step(state: AuthorityState, now: dt.datetime, policy: RotationPolicy, *, behind: int = 0) -> Step | None:
    """The next due change, or None.  ``behind`` = SDS streams that have not ACKed the current bundle.

    Root steps come first: they change which root is active, and intermediate decisions must be
    taken against the root that will sign them.
    """
    step = _root_step(state, now, policy, behind)
    if step is not None:
        return step
    for kind in INTERMEDIATE_KINDS:
        step = _intermediate_step(state, kind, now, policy)
        if step is not None:
            return step
    return None


def blocked_rotations(state: AuthorityState, now: dt.datetime, policy: RotationPolicy) -> dict[str, str]:
    """Rotations that are due but impossible here (root key offline), by kind, with an explanation."""
    if state.holds_root_key:
        return {}
    out: dict[str, str] = {}
    for kind in (CAKind.ROOT, *INTERMEDIATE_KINDS):
        for entry in state.of_kind(kind, SlotState.ACTIVE):
            if now >= prepare_time(entry, policy):
                out[str(kind)] = (
                    f"{kind} {entry.serial} is due for rotation (expires {entry.not_after.isoformat()}) but the root "
                    "key is held offline (intermediate-only mode): have the offline root sign a new intermediate "
                    "and import it"
                )
    return out


def next_due(state: AuthorityState, policy: RotationPolicy) -> dict[str, dt.datetime]:
    """When each kind next rotates (for the ``ca_next_rotation_timestamp_seconds`` gauge)."""
    out: dict[str, dt.datetime] = {}
    for kind in (CAKind.ROOT, *INTERMEDIATE_KINDS):
        active = state.of_kind(kind, SlotState.ACTIVE)
        if active:
            out[str(kind)] = activation_time(active[0], policy)
    return out


def spread_times(count: int, start: dt.datetime, window: dt.timedelta) -> list[dt.datetime]:
    """``count`` instants evenly over ``[start, start + window)``: re-issues that do not stampede."""
    return [start + window * (i / count) for i in range(count)] if count else []
