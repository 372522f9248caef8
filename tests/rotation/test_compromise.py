"""Taint and revoke (issue 15, item 12), the pure state changes: a tainted CA never signs again, an
emergency root rotation starts even while another retires, and only a tainted, retired CA is revoked."""

from __future__ import annotations

import datetime as dt

import pytest

from ca_service.config import Settings
from ca_service.errors import InvalidRequestError, NotReadyError, PolicyViolationError
from ca_service.pki.templates import CAKind
from ca_service.rotation import compromise, planner
from ca_service.rotation.minting import bootstrap_state
from ca_service.rotation.planner import RotationPolicy
from ca_service.rotation.state import AuthorityMode, AuthorityState, RootRotationPhase, SlotState
from ca_service.rotation.transitions import apply_step, force_root, prepare

NOW = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
def policy(settings: Settings) -> RotationPolicy:
    return RotationPolicy.from_settings(settings)


@pytest.fixture
def state(settings: Settings) -> AuthorityState:
    return bootstrap_state(settings.domain, algorithm=settings.ca.key_algorithm, root_ttl=settings.ca.root_ttl,
                           intermediate_ttl=settings.ca.intermediate_ttl,
                           istiod_ttl=settings.ca.istiod_intermediate_ttl, now=NOW)


def run_rotation(state: AuthorityState, policy: RotationPolicy, start: dt.datetime,
                 until: RootRotationPhase | None) -> tuple[AuthorityState, dt.datetime]:
    """Tick every 30 s from ``start`` (all streams ACKed), applying due steps as the reconciler would,
    until the root rotation reaches phase ``until`` (None: until it is over)."""
    now = start
    for _ in range(1000):
        step = planner.next_step(state, now, policy, behind=0)
        if step is not None:
            state = apply_step(state, step, now, policy)
        elif (state.root_rotation.phase if state.root_rotation else None) is until:
            return state, now
        else:
            now += dt.timedelta(seconds=30)
    raise AssertionError(f"the rotation did not reach {until}")


def test_tainting_the_signing_intermediate_replaces_it_now_and_it_never_signs_again(
        state: AuthorityState, policy: RotationPolicy) -> None:
    leaked = state.active(CAKind.INTERMEDIATE)
    after = compromise.taint(state, leaked.key_id, NOW, policy, reason="key on a laptop")
    assert after.active(CAKind.INTERMEDIATE).key_id != leaked.key_id
    assert compromise.find_entry(after, leaked.key_id).state is SlotState.OLD
    assert leaked.key_id in compromise.tainted(after)
    assert "key on a laptop" in compromise.tainted(after)[leaked.key_id]
    assert after.active(CAKind.INTERMEDIATE).parent == state.active(CAKind.ROOT).key_id


def test_a_prepared_replacement_takes_over_unless_it_is_tainted_too(
        state: AuthorityState, policy: RotationPolicy) -> None:
    with_prepared = prepare(state, CAKind.INTERMEDIATE, NOW, policy)
    prepared = with_prepared.of_kind(CAKind.INTERMEDIATE, SlotState.PREPARED)[0]
    after = compromise.taint(with_prepared, with_prepared.active(CAKind.INTERMEDIATE).key_id, NOW, policy, reason="x")
    assert after.active(CAKind.INTERMEDIATE).key_id == prepared.key_id
    dropped = compromise.taint(with_prepared, prepared.key_id, NOW, policy, reason="the prepared one leaked")
    assert prepared.key_id not in {e.key_id for e in dropped.entries}, "a prepared CA never signed: it just goes"
    assert dropped.active(CAKind.INTERMEDIATE).key_id == state.active(CAKind.INTERMEDIATE).key_id


def test_tainting_the_active_root_starts_an_emergency_rotation_even_while_another_retires(
        state: AuthorityState, policy: RotationPolicy) -> None:
    first = force_root(state, NOW, policy, reason="scheduled drill")
    retiring, now = run_rotation(first, policy, NOW, until=RootRotationPhase.RETIRING)
    with pytest.raises(NotReadyError):
        force_root(retiring, NOW, policy, reason="a second ordinary rotation is refused")
    leaked = retiring.active(CAKind.ROOT)
    emergency = compromise.taint(retiring, leaked.key_id, now, policy, reason="root key leaked")
    assert emergency.root_rotation is not None and emergency.root_rotation.phase is RootRotationPhase.PUBLISHED
    assert emergency.root_rotation.reason == "taint: root key leaked"
    assert len(emergency.roots) == 3, "old, leaked and new root are all trusted until the new one signs"
    assert emergency.bundle_sequence > retiring.bundle_sequence
    signing, _ = run_rotation(emergency, policy, now, until=RootRotationPhase.SIGNING)
    assert signing.active(CAKind.ROOT).key_id != leaked.key_id
    assert signing.active(CAKind.INTERMEDIATE).parent == signing.active(CAKind.ROOT).key_id


def test_a_tainted_prepared_root_is_replaced_by_a_fresh_one(state: AuthorityState, policy: RotationPolicy) -> None:
    published = force_root(state, NOW, policy, reason="drill")
    leaked = published.of_kind(CAKind.ROOT, SlotState.PREPARED)[0]
    after = compromise.taint(published, leaked.key_id, NOW, policy, reason="B leaked before it signed")
    prepared = after.of_kind(CAKind.ROOT, SlotState.PREPARED)
    assert len(prepared) == 1 and prepared[0].key_id != leaked.key_id
    assert leaked.cert not in after.roots


def test_revoke_removes_a_tainted_old_root_and_everything_under_it_from_the_bundle(
        state: AuthorityState, policy: RotationPolicy) -> None:
    leaked = state.active(CAKind.ROOT)
    emergency = compromise.taint(state, leaked.key_id, NOW, policy, reason="leak")
    rotated, now = run_rotation(emergency, policy, NOW, until=RootRotationPhase.RETIRING)
    assert leaked.cert in rotated.roots, "still trusted: leaves under it may be live"
    revoked = compromise.revoke(rotated, leaked.key_id)
    assert leaked.cert not in revoked.roots
    assert not [e for e in revoked.entries if e.parent == leaked.key_id]
    assert revoked.bundle_sequence > rotated.bundle_sequence
    assert revoked.root_rotation is None, "the retiring root was removed: the rotation is over"
    assert compromise.tainted(revoked) == {}
    assert planner.next_step(revoked, now, policy) is None


@pytest.mark.parametrize("case", ["not tainted", "still signing", "only root", "unknown"])
def test_revoke_refuses_what_would_break_trust(case: str, state: AuthorityState, policy: RotationPolicy) -> None:
    root = state.active(CAKind.ROOT)
    if case == "not tainted":
        with pytest.raises(PolicyViolationError, match="taint it first"):
            compromise.revoke(state, state.active(CAKind.INTERMEDIATE).key_id)
    elif case == "still signing":
        published = compromise.taint(state, root.key_id, NOW, policy, reason="leak")
        with pytest.raises(PolicyViolationError, match="still active"):
            compromise.revoke(published, root.key_id)
    elif case == "only root":
        marked = state.replace(extra={compromise.TAINT_PREFIX + root.key_id: "t"})
        old = marked.replace(entries=[e.with_state(SlotState.OLD) if e is root else e for e in marked.entries
                                      if e.kind is CAKind.ROOT])
        with pytest.raises(PolicyViolationError, match="only root"):
            compromise.revoke(old, root.key_id)
    else:
        with pytest.raises(InvalidRequestError):
            compromise.revoke(state, "00ff")


def test_tainting_twice_is_refused_and_a_root_taint_without_the_root_key_says_why(
        state: AuthorityState, policy: RotationPolicy) -> None:
    intermediate = state.active(CAKind.INTERMEDIATE)
    once = compromise.taint(state, intermediate.key_id, NOW, policy, reason="leak")
    with pytest.raises(InvalidRequestError, match="already tainted"):
        compromise.taint(once, intermediate.key_id, NOW, policy, reason="again")
    offline = state.replace(mode=AuthorityMode.INTERMEDIATE_ONLY,
                            entries=[e if e.kind is not CAKind.ROOT else
                                     e.__class__(e.kind, e.cert, None, e.state) for e in state.entries])
    with pytest.raises(NotReadyError, match="held offline"):
        compromise.taint(offline, offline.active(CAKind.ROOT).key_id, NOW, policy, reason="leak")


def test_the_dry_run_words_what_taint_really_does_for_roots_in_a_rotation(
        state: AuthorityState, policy: RotationPolicy) -> None:
    published = force_root(state, NOW, policy, reason="drill")
    # The active root while a rotation to an untainted B is published: B already replaces it, no key needed.
    offline = published.replace(mode=AuthorityMode.INTERMEDIATE_ONLY,
                                entries=[e if e.kind is not CAKind.ROOT else
                                         e.__class__(e.kind, e.cert, None, e.state) for e in published.entries])
    active = offline.active(CAKind.ROOT)
    after = compromise.taint(offline, active.key_id, NOW, policy, reason="A leaked")
    assert "rotation under way already replaces it" in compromise.describe_taint(active, offline, after)
    # The prepared root B: it is dropped *and* an emergency rotation to a fresh root starts.
    prepared = published.of_kind(CAKind.ROOT, SlotState.PREPARED)[0]
    after = compromise.taint(published, prepared.key_id, NOW, policy, reason="B leaked")
    said = compromise.describe_taint(prepared, published, after)
    assert "dropped at once" in said and "emergency root rotation would start" in said
    # The signing intermediate: replaced by a fresh one.
    intermediate = state.active(CAKind.INTERMEDIATE)
    after = compromise.taint(state, intermediate.key_id, NOW, policy, reason="leak")
    assert "fresh intermediate" in compromise.describe_taint(intermediate, state, after)
