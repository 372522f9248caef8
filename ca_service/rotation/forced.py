"""What an operator's forced CA rotation would do: a pure plan of the state, used by both the dry run
and the real run (which then applies ``transitions.force_intermediate`` / ``force_root``).

The plan raises exactly what the real run would raise, without minting anything, so a dry run is
a faithful rehearsal and costs no key generation.
"""

from __future__ import annotations

from dataclasses import dataclass

from ca_service.errors import InvalidRequestError, NotReadyError
from ca_service.pki.templates import CAKind
from ca_service.rotation.state import AuthorityState, RootRotationPhase, SlotState


@dataclass(frozen=True)
class ForcedCAPlan:
    kind: CAKind
    affected: tuple[str, ...]  # serials of the CAs that are replaced
    prepared: tuple[str, ...]  # serials of prepared CAs that become active (empty: one is minted)
    detail: str


def plan_intermediate(state: AuthorityState, kind: CAKind) -> ForcedCAPlan:
    """Rotating ``kind`` now: the active one becomes old; the prepared one (or a new one) becomes active.

    Raises:
        InvalidRequestError: if there is no active ``kind`` (e.g. no istiod intermediate in intermediate-only mode).
        NotReadyError: if a new one must be minted and the root key is held offline.
    """
    affected = tuple(e.serial for e in state.of_kind(kind, SlotState.ACTIVE))
    prepared = tuple(e.serial for e in state.of_kind(kind, SlotState.PREPARED))
    if not affected:
        raise InvalidRequestError(f"there is no active {kind} in {state.mode} mode")
    if not prepared and not state.holds_root_key:
        raise NotReadyError(f"creating a {kind} needs the root key, which is held offline (intermediate-only mode)")
    detail = (f"{kind} {', '.join(affected)} would become old (kept until its leaves expire); "
              + (f"prepared {prepared[0]} would become active" if prepared else "a new one would be minted"))
    return ForcedCAPlan(kind, affected, prepared, detail)


@dataclass(frozen=True)
class ForcedRootPlan:
    overrides_gate: bool  # True: a rotation waits at its ACK gate and is let past it; False: a new one starts
    affected: tuple[str, ...]  # the root and every CA under it
    detail: str


def plan_root(state: AuthorityState) -> ForcedRootPlan:
    """Starting a root rotation now, or letting the running one past its ACK gate.

    Raises:
        NotReadyError: without the root key, or while a rotation is past its gate (SIGNING/RETIRING).
        InvalidRequestError: if the running rotation's gate is already overridden.
    """
    if not state.holds_root_key:
        raise NotReadyError("rotating the root needs the root key, which is held offline (intermediate-only mode)")
    root = state.active(CAKind.ROOT)
    affected = (root.serial, *(e.serial for e in state.children_of(root)))
    rotation = state.root_rotation
    if rotation is None:
        return ForcedRootPlan(False, affected, "root rotation would start: new root published now, signing after "
                                               "the ACK gate, every live workload certificate re-issued")
    if rotation.phase is not RootRotationPhase.PUBLISHED:
        raise NotReadyError(
            f"a root rotation is already in phase {rotation.phase} (since {rotation.phase_since.isoformat()}); "
            "the next one can start once the old root has been retired")
    if state.root_gate_override:
        raise InvalidRequestError("the root rotation's ACK gate is already overridden")
    return ForcedRootPlan(True, affected, "the ACK gate of the running root rotation would be overridden")
