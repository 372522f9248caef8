"""Compromise response (what SPIRE calls taint and revoke): pure state changes, no I/O.

* **Taint** a CA whose key may have leaked: it never signs again, from this commit on.  A tainted
  signing intermediate is replaced at once (a PREPARED one takes over unless it is tainted too, else a
  new one is minted); a tainted root starts an emergency root rotation even while another one retires
  (the refusal of ``force_root`` in SIGNING/RETIRING is exactly what an operator with a leaked key
  cannot live with).  The services above re-issue every live SVID signed under the tainted CA.
* **Revoke** a CA: remove it, and every CA under it, from the state, so it leaves every bundle (SDS,
  bundle endpoint, files, cacerts).  Only a tainted CA that no longer signs can be revoked; whether
  anything live still depends on it is decided by the caller (it knows the live SVIDs), who passes
  ``force`` to revoke anyway.

Taint marks live in ``extra`` (``tainted/<key id>`` → ``<instant> <reason>``), so they survive restarts
and replicas like every other part of the state.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable

from ca_service.errors import InvalidRequestError, NotReadyError, PolicyViolationError
from ca_service.pki.templates import CAKind
from ca_service.rotation.minting import mint_intermediate, mint_root
from ca_service.rotation.planner import RotationPolicy
from ca_service.rotation.state import (
    AuthorityState,
    CAEntry,
    RootRotation,
    RootRotationPhase,
    SlotState,
    extra_with_retired,
    extra_without,
)

TAINT_PREFIX = "tainted/"


def tainted(state: AuthorityState) -> dict[str, str]:
    """Key id → ``"<instant> <reason>"`` of every tainted CA still in the state."""
    present = {e.key_id for e in state.entries}
    return {k[len(TAINT_PREFIX):]: v for k, v in state.extra.items()
            if k.startswith(TAINT_PREFIX) and k[len(TAINT_PREFIX):] in present}


def is_tainted(state: AuthorityState, entry: CAEntry) -> bool:
    return TAINT_PREFIX + entry.key_id in state.extra


def find_entry(state: AuthorityState, key_id: str) -> CAEntry:
    """The CA entry whose key id (hex SKI) or serial (hex) is ``key_id``.

    Raises:
        InvalidRequestError: if no CA of this state has it.
    """
    wanted = key_id.lower().replace(":", "")
    for entry in state.entries:
        if wanted in (entry.key_id, entry.serial):
            return entry
    raise InvalidRequestError(f"no CA with key id or serial {key_id!r} in this state")


def descendants(state: AuthorityState, entry: CAEntry) -> tuple[CAEntry, ...]:
    """Every CA entry issued (directly or not) by ``entry``."""
    out: list[CAEntry] = []
    frontier = [entry]
    while frontier:
        children = [c for parent in frontier for c in state.children_of(parent)]
        out.extend(children)
        frontier = children
    return tuple(out)


def taint(state: AuthorityState, key_id: str, now: dt.datetime, policy: RotationPolicy, *,
          reason: str) -> AuthorityState:
    """Mark a CA tainted and make sure it does not sign from this state on.

    Raises:
        InvalidRequestError: unknown key id, or already tainted.
        NotReadyError: a replacement needs the root key and it is held offline.
    """
    entry = find_entry(state, key_id)
    if is_tainted(state, entry):
        raise InvalidRequestError(f"{entry.kind} {entry.serial} is already tainted")
    marked = state.replace(extra={**state.extra, TAINT_PREFIX + entry.key_id: f"{now.isoformat()} {reason}"})
    if entry.kind is CAKind.ROOT:
        return _taint_root(marked, entry, now, policy, reason=reason)
    return _taint_intermediate(marked, entry, now, policy)


def _taint_intermediate(state: AuthorityState, entry: CAEntry, now: dt.datetime,
                        policy: RotationPolicy) -> AuthorityState:
    if entry.state is SlotState.PREPARED:
        return _drop(state, (entry,))  # it never signed: nothing depends on it
    if entry.state is SlotState.OLD:
        return state  # already stopped signing; revoke removes it
    replacement = next((e for e in state.of_kind(entry.kind, SlotState.PREPARED) if not is_tainted(state, e)), None)
    entries = [e for e in state.entries if not (e.kind is entry.kind and e.state is SlotState.PREPARED)]
    if replacement is None:
        root = _signing_root(state)
        replacement = mint_intermediate(root, state.trust_domain, kind=entry.kind, algorithm=policy.algorithm,
                                        ttl=policy.ttl(entry.kind), now=now, state=SlotState.PREPARED,
                                        backdate=policy.skew)
    entries = [e.with_state(SlotState.OLD) if e is entry else e for e in entries]
    entries.append(replacement.with_state(SlotState.ACTIVE))
    return state.replace(entries=entries, extra=extra_with_retired(state.extra, (entry,), now))


def _signing_root(state: AuthorityState) -> CAEntry:
    root = state.active(CAKind.ROOT)
    if root.key is None:
        raise NotReadyError("replacing the intermediate needs the root key, which is held offline")
    if is_tainted(state, root):
        raise PolicyViolationError(f"the active root {root.serial} is tainted: the new intermediates come from its "
                                   "emergency rotation once the new root signs")
    return root


def _taint_root(state: AuthorityState, entry: CAEntry, now: dt.datetime, policy: RotationPolicy, *,
                reason: str) -> AuthorityState:
    rotation = state.root_rotation
    if entry.state is SlotState.OLD:
        return state  # it signs nothing any more; revoke removes it
    if entry.state is SlotState.PREPARED:
        # A rotation to a leaked root must not go on: drop it and publish a fresh one instead.
        state = _drop(state, (entry, *descendants(state, entry)))
        state = state.replace(root_rotation=None)
    elif rotation is not None and rotation.phase is RootRotationPhase.PUBLISHED:
        prepared = state.of_kind(CAKind.ROOT, SlotState.PREPARED)
        if prepared and not is_tainted(state, prepared[0]):
            return state  # the rotation under way already replaces the tainted active root
    if not state.holds_root_key:
        raise NotReadyError("an emergency root rotation needs the root key, which is held offline")
    # An emergency rotation starts even while an earlier one is SIGNING or RETIRING: the earlier old
    # root stays OLD (pruned with its intermediates) and the new rotation's phases take over.
    new_root = mint_root(state.trust_domain, algorithm=policy.algorithm, ttl=policy.root_ttl, now=now,
                         state=SlotState.PREPARED, backdate=policy.skew)
    started = RootRotation(RootRotationPhase.PUBLISHED, started_at=now, phase_since=now,
                           reason=f"taint: {reason}")
    return state.replace(entries=(*state.entries, new_root), root_rotation=started)


def describe_taint(entry: CAEntry, before: AuthorityState, after: AuthorityState) -> str:
    """What :func:`taint` of ``entry`` did to ``before`` to give ``after``, in words (the dry run computes the
    real :func:`taint` and says this, so the two can never disagree)."""
    what = f"{entry.kind} {entry.serial} ({entry.state}) would never sign again"
    emergency = after.root_rotation is not None and after.root_rotation != before.root_rotation
    rotation = ("an emergency root rotation would start now (new root published, signing after the ACK gate, "
                "every live SVID re-issued under it)")
    if not any(e.key_id == entry.key_id for e in after.entries):
        return what + "; it never signed, so it would be dropped at once" + (f"; {rotation}" if emergency else "")
    if entry.state is SlotState.OLD:
        return what + "; it already stopped signing (revoke removes it)"
    if emergency:
        return what + "; " + rotation
    if entry.kind is CAKind.ROOT:
        return what + "; the root rotation under way already replaces it"
    return what + "; a fresh intermediate would sign from now on and every live SVID under it would be re-issued"


def subtree_key_ids(state: AuthorityState, entry: CAEntry) -> frozenset[str]:
    """Key ids of ``entry`` and every CA under it: an SVID whose issuer is among them depends on ``entry``."""
    return frozenset({entry.key_id, *(e.key_id for e in descendants(state, entry))})


def revocation_blockers(state: AuthorityState, entry: CAEntry) -> list[str]:
    """Why ``entry`` cannot be revoked now (empty: it can), independent of live SVIDs."""
    if not is_tainted(state, entry):
        return [f"{entry.kind} {entry.serial} is not tainted: taint it first (it must stop signing before it goes)"]
    if entry.state is not SlotState.OLD:
        return [f"{entry.kind} {entry.serial} is still {entry.state}: wait until its replacement signs"]
    active = [e for e in descendants(state, entry) if e.state is SlotState.ACTIVE]
    if active:
        return [f"{e.kind} {e.serial} under it still signs" for e in active]
    return []


def revoke(state: AuthorityState, key_id: str) -> AuthorityState:
    """Remove a tainted, retired CA and every CA under it; roots leave the bundle (sequence moves on).

    The caller has checked live dependents (or the operator forced it).

    Raises:
        InvalidRequestError: unknown key id.
        PolicyViolationError: the CA is not tainted, or it (or a CA under it) still signs.
    """
    entry = find_entry(state, key_id)
    blockers = revocation_blockers(state, entry)
    if blockers:
        raise PolicyViolationError("; ".join(blockers))
    if entry.kind is CAKind.ROOT and len(state.of_kind(CAKind.ROOT)) == 1:
        raise PolicyViolationError("refusing to revoke the only root: nothing would be trusted")
    return _drop(state, (entry, *descendants(state, entry)))


def _drop(state: AuthorityState, gone: Iterable[CAEntry]) -> AuthorityState:
    gone = tuple(gone)
    marks = {TAINT_PREFIX + e.key_id for e in gone}
    extra = {k: v for k, v in extra_without(state.extra, gone).items() if k not in marks}
    entries = tuple(e for e in state.entries if e not in gone)
    rotation = state.root_rotation
    if rotation is not None and not [e for e in entries if e.kind is CAKind.ROOT and e.state is SlotState.OLD] \
            and rotation.phase is RootRotationPhase.RETIRING:
        rotation = None  # the retiring root was what we removed: the rotation is over
    return dataclasses.replace(state.replace(entries=entries, extra=extra), root_rotation=rotation)
