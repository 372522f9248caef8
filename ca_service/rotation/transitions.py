"""Applying a rotation step to a state: new state values, never I/O.  Pure apart from key generation.

Ordering rule for any CA (DESIGN.md): publish the new trust, then sign with the new key, then retire
the old one once nothing valid depends on it.  Each function here is one of those moves.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

from ca_service.errors import NotReadyError
from ca_service.pki.templates import CAKind
from ca_service.rotation.forced import plan_intermediate, plan_root
from ca_service.rotation.minting import mint_intermediate, mint_root
from ca_service.rotation.planner import INTERMEDIATE_KINDS, Action, RotationPolicy, Step
from ca_service.rotation.state import (
    GATE_OVERRIDE_KEY,
    AuthorityState,
    CAEntry,
    RootRotation,
    RootRotationPhase,
    SlotState,
    extra_with_retired,
    extra_without,
)


def apply_step(state: AuthorityState, step: Step, now: dt.datetime, policy: RotationPolicy) -> AuthorityState:
    """The state after ``step``.

    Raises:
        NotReadyError: if the step needs the root key and it is held offline.
    """
    if step.action is Action.PREPARE:
        return prepare(state, step.kind, now, policy)
    if step.action is Action.ACTIVATE:
        return activate(state, step.kind, now)
    if step.action is Action.PRUNE:
        return prune(state, step.target)
    if step.action is Action.ROOT_PUBLISH:
        return publish_root(state, now, policy, reason=step.reason)
    if step.action is Action.ROOT_SIGN:
        return sign_with_new_root(state, now, policy)
    if step.action is Action.ROOT_RETIRE:
        return _enter_phase(state, RootRotationPhase.RETIRING, now)
    return finish_root(state)


def prepare(state: AuthorityState, kind: CAKind, now: dt.datetime, policy: RotationPolicy) -> AuthorityState:
    new = mint_intermediate(state.active(CAKind.ROOT), state.trust_domain, kind=kind, algorithm=policy.algorithm,
                            ttl=policy.ttl(kind), now=now, state=SlotState.PREPARED, backdate=policy.skew)
    return state.replace(entries=(*state.entries, new))


def activate(state: AuthorityState, kind: CAKind, now: dt.datetime) -> AuthorityState:
    """PREPARED -> ACTIVE and ACTIVE -> OLD in one state, so exactly one entry of ``kind`` ever signs."""
    prepared = state.of_kind(kind, SlotState.PREPARED)
    if not prepared:
        raise NotReadyError(f"no prepared {kind} to activate")
    retiring = state.of_kind(kind, SlotState.ACTIVE)
    entries = tuple(
        e.with_state(SlotState.OLD) if e in retiring else e.with_state(SlotState.ACTIVE) if e is prepared[0] else e
        for e in state.entries
    )
    return state.replace(entries=entries, extra=extra_with_retired(state.extra, retiring, now))


def prune(state: AuthorityState, key_id: str) -> AuthorityState:
    gone = tuple(e for e in state.entries if e.key_id == key_id)
    return state.replace(entries=tuple(e for e in state.entries if e not in gone),
                         extra=extra_without(state.extra, gone))


def publish_root(state: AuthorityState, now: dt.datetime, policy: RotationPolicy, *, reason: str) -> AuthorityState:
    """(a) Root B enters the bundle as PREPARED; ``replace`` moves the bundle sequence forward."""
    if not state.holds_root_key:
        raise NotReadyError("rotating the root needs the root key, which is held offline (intermediate-only mode)")
    new_root = mint_root(state.trust_domain, algorithm=policy.algorithm, ttl=policy.root_ttl, now=now,
                         state=SlotState.PREPARED, backdate=policy.skew)
    rotation = RootRotation(RootRotationPhase.PUBLISHED, started_at=now, phase_since=now, reason=reason)
    return state.replace(entries=(*state.entries, new_root), root_rotation=rotation)


def sign_with_new_root(state: AuthorityState, now: dt.datetime, policy: RotationPolicy) -> AuthorityState:
    """(c) B and fresh intermediates under B become ACTIVE; A and its intermediates OLD.

    A PREPARED intermediate under A never signed anything, so it is dropped rather than kept OLD.
    """
    old_root = state.active(CAKind.ROOT)
    new_root = state.of_kind(CAKind.ROOT, SlotState.PREPARED)[0]
    under_old = state.children_of(old_root)
    retiring = (old_root, *(e for e in under_old if e.state is SlotState.ACTIVE))
    entries: list[CAEntry] = []
    for entry in state.entries:
        if entry in under_old and entry.state is SlotState.PREPARED:
            continue
        if entry in retiring:
            entries.append(entry.with_state(SlotState.OLD))
        else:
            entries.append(entry.with_state(SlotState.ACTIVE) if entry is new_root else entry)
    active_root = new_root.with_state(SlotState.ACTIVE)
    for kind in INTERMEDIATE_KINDS:
        if state.of_kind(kind, SlotState.ACTIVE):
            entries.append(mint_intermediate(active_root, state.trust_domain, kind=kind, algorithm=policy.algorithm,
                                             ttl=policy.ttl(kind), now=now, backdate=policy.skew))
    extra = extra_with_retired(state.extra, retiring, now)
    extra.pop(GATE_OVERRIDE_KEY, None)
    moved = _enter_phase(state, RootRotationPhase.SIGNING, now)
    return moved.replace(entries=entries, extra=extra)


def finish_root(state: AuthorityState) -> AuthorityState:
    """(d) Drop every OLD root nothing chains to; the bundle becomes B alone (sequence moves forward)."""
    gone = tuple(r for r in state.of_kind(CAKind.ROOT, SlotState.OLD) if not state.children_of(r))
    return state.replace(entries=tuple(e for e in state.entries if e not in gone), root_rotation=None,
                         extra=extra_without(state.extra, gone))


def _enter_phase(state: AuthorityState, phase: RootRotationPhase, now: dt.datetime) -> AuthorityState:
    if state.root_rotation is None:
        raise NotReadyError("no root rotation in progress")
    return state.replace(root_rotation=dataclasses.replace(state.root_rotation, phase=phase, phase_since=now))


# ---------------------------------------------------------------- forced


def force_intermediate(state: AuthorityState, kind: CAKind, now: dt.datetime, policy: RotationPolicy,
                       ) -> AuthorityState:
    """Rotate ``kind`` now: activate the prepared one, minting it first if there is none.

    Raises:
        InvalidRequestError: if there is no such intermediate.
        NotReadyError: if minting needs the offline root key.
    """
    plan_intermediate(state, kind)  # the same checks as the dry run
    if not state.of_kind(kind, SlotState.PREPARED):
        state = prepare(state, kind, now, policy)
    return activate(state, kind, now)


def force_root(state: AuthorityState, now: dt.datetime, policy: RotationPolicy, *, reason: str) -> AuthorityState:
    """Start a root rotation now or, if one waits at its ACK gate, let it past the gate.

    The override is persisted (a restart keeps it) and still honours root_min_propagation: an
    operator who knows a stuck sidecar will never ACK can unblock the rotation, but the rotation
    itself never proceeds unacknowledged on its own (see planner.root_gate).

    Raises:
        NotReadyError: without the root key, or while a rotation is past its gate (SIGNING/RETIRING).
    """
    plan = plan_root(state)  # the same checks as the dry run
    if not plan.overrides_gate:
        return publish_root(state, now, policy, reason=reason)
    return state.replace(extra={**state.extra, GATE_OVERRIDE_KEY: reason or "forced"})
