"""Workload renewal and intermediate rotation on a fake clock."""

from __future__ import annotations

import dataclasses
import datetime as dt

from rotation_kit import Env, make_env, metric

from ca_service.config import Settings
from ca_service.pki.identity import SpiffeId
from ca_service.pki.templates import CAKind
from ca_service.rotation.planner import activation_time, prune_time
from ca_service.rotation.state import SlotState
from ca_service.services.ports import RotationRequest, RotationScope
from ca_service.services.rotator import RotationService
from tests.clock import FakeClock

WORKLOAD = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/web")
DAY = dt.timedelta(days=1)


def slots(env: Env, kind: CAKind) -> dict[SlotState, list[str]]:
    out: dict[SlotState, list[str]] = {}
    for entry in env.authority.state.of_kind(kind):
        out.setdefault(entry.state, []).append(entry.key_id)
    return out


async def test_a_workload_is_renewed_exactly_at_the_jittered_half_of_its_lifetime(settings: Settings,
                                                                             clock: FakeClock) -> None:
    env = make_env(settings, clock, draw=0.75)  # jitter = 0.02 * (2*0.75 - 1) = +1% of the lifetime
    cert = env.registry.get_or_issue("node-1", WORKLOAD)
    lifetime = cert.svid.not_after - cert.svid.not_before
    expected = cert.svid.not_before + lifetime * 0.51
    assert cert.renew_at == expected
    clock.set(expected - dt.timedelta(microseconds=1))
    assert (await env.reconciler.reconcile()).renewed == 0
    clock.set(expected)
    assert (await env.reconciler.reconcile()).renewed == 1
    renewed = env.registry.get("node-1", WORKLOAD)
    assert renewed is not None and renewed.generation == 2
    assert renewed.svid.leaf.serial_number != cert.svid.leaf.serial_number
    assert renewed.svid.leaf.public_key() != cert.svid.leaf.public_key()  # a new key every time
    assert metric(env.telemetry, "ca_rotations_total", kind="workload", reason="scheduled") == 1


async def test_nothing_happens_on_a_tick_with_nothing_due(env: Env) -> None:
    before = env.authority.state.revision
    report = await env.reconciler.reconcile()
    assert report.steps == [] and env.authority.state.revision == before


async def test_the_intermediate_is_prepared_ahead_activated_at_half_life_and_pruned_after_its_leaves(env: Env) -> None:
    first = env.authority.state.active(CAKind.INTERMEDIATE)
    policy = env.reconciler.policy
    seen_active = [first.key_id]
    for generation in range(4):
        active = env.authority.state.active(CAKind.INTERMEDIATE)
        env.clock.set(activation_time(active, policy) - dt.timedelta(seconds=1))
        await env.reconciler.reconcile()
        assert len(slots(env, CAKind.INTERMEDIATE)[SlotState.PREPARED]) == 1, generation
        assert env.authority.state.active(CAKind.INTERMEDIATE).key_id == active.key_id
        env.clock.advance(dt.timedelta(seconds=1))
        await env.reconciler.reconcile()
        new_active = env.authority.state.active(CAKind.INTERMEDIATE)
        assert new_active.key_id != active.key_id
        assert active.key_id in slots(env, CAKind.INTERMEDIATE)[SlotState.OLD]
        seen_active.append(new_active.key_id)
        # The old one stays exactly until every leaf it could have signed has expired (+ skew).
        old = next(e for e in env.authority.state.entries if e.key_id == active.key_id)
        horizon = prune_time(env.authority.state, old, policy)
        assert horizon == env.clock.now() + policy.max_leaf_ttl + policy.skew
        env.clock.set(horizon - dt.timedelta(seconds=1))
        await env.reconciler.reconcile()
        assert active.key_id in slots(env, CAKind.INTERMEDIATE).get(SlotState.OLD, [])
        env.clock.set(horizon)
        await env.reconciler.reconcile()
        assert active.key_id not in [e.key_id for e in env.authority.state.entries]
    assert len(set(seen_active)) == 5
    assert metric(env.telemetry, "ca_rotations_total", kind="intermediate", reason="scheduled") == 4


async def test_a_leaf_signed_just_before_activation_still_verifies_until_the_old_intermediate_is_pruned(
        env: Env) -> None:
    active = env.authority.state.active(CAKind.INTERMEDIATE)
    env.clock.set(activation_time(active, env.reconciler.policy) - dt.timedelta(seconds=1))
    await env.reconciler.reconcile()
    leaf = env.registry.get_or_issue("n", WORKLOAD)
    assert leaf.svid.issuer_key_id == active.key_id
    env.clock.set(leaf.svid.not_after - dt.timedelta(seconds=1))
    await env.reconciler.reconcile()
    assert active.key_id in [e.key_id for e in env.authority.state.entries]


def test_a_leaf_never_outlives_its_issuer(env: Env) -> None:
    active = env.authority.state.active(CAKind.INTERMEDIATE)
    env.clock.set(active.not_after - dt.timedelta(hours=2))
    svid = env.authority.issue_svid(WORKLOAD, env.registry.get_or_issue("n", WORKLOAD).key.public_key())
    assert svid.not_after == active.not_after


async def test_the_istiod_intermediate_rotates_at_half_life_and_its_old_one_outlives_istiods_longest_leaf(
        env: Env) -> None:
    policy = env.reconciler.policy
    first = env.authority.state.active(CAKind.ISTIOD_INTERMEDIATE)
    # Its intermediate (30 d) rotates many times in between; walk day by day like a scheduler would.
    while env.clock.now() < activation_time(first, policy):
        env.clock.advance(DAY)
        await env.reconciler.reconcile()
    state = env.authority.state
    assert state.active(CAKind.ISTIOD_INTERMEDIATE).key_id != first.key_id
    old = next(e for e in state.entries if e.key_id == first.key_id)
    assert old.state is SlotState.OLD
    assert prune_time(state, old, policy) - state.retired_at(old) == policy.istiod_max_leaf_ttl + policy.skew  # type: ignore[operator]
    env.clock.set(prune_time(state, old, policy))
    await env.reconciler.reconcile()
    assert first.key_id not in [e.key_id for e in env.authority.state.entries]
    # Never more than prepared + active + old of each kind.
    assert len(env.authority.state.of_kind(CAKind.INTERMEDIATE)) <= 3


async def test_a_restart_between_prepare_and_activate_keeps_the_persisted_slots(env: Env) -> None:
    active = env.authority.state.active(CAKind.INTERMEDIATE)
    env.clock.set(activation_time(active, env.reconciler.policy) - dt.timedelta(hours=1))
    await env.reconciler.reconcile()
    prepared = slots(env, CAKind.INTERMEDIATE)[SlotState.PREPARED]
    restarted = env.restart()
    assert slots(restarted, CAKind.INTERMEDIATE)[SlotState.PREPARED] == prepared
    restarted.clock.advance(dt.timedelta(hours=2))
    await restarted.reconciler.reconcile()
    assert restarted.authority.state.active(CAKind.INTERMEDIATE).key_id == prepared[0]


async def test_a_long_downtime_converges_in_one_pass(env: Env) -> None:
    env.clock.advance(45 * DAY)  # one and a half intermediate lifetimes without a tick
    await env.reconciler.reconcile()
    state = env.authority.state
    active = state.active(CAKind.INTERMEDIATE)
    assert active.not_before <= env.clock.now() < active.not_after
    assert (await env.reconciler.reconcile()).steps == []  # idempotent


async def test_every_ca_starts_ca_backdate_early_so_leaves_keep_their_full_backdate(settings: Settings,
                                                                                  clock: FakeClock) -> None:
    backdate = dt.timedelta(hours=2)  # relying parties up to two hours behind (the default is 5 min)
    env = make_env(dataclasses.replace(settings, ca=dataclasses.replace(settings.ca, backdate=backdate)), clock)
    assert {e.not_before for e in env.authority.state.entries} == {clock.now() - backdate}
    clock.advance(DAY)
    await RotationService.of(env.reconciler).rotate(RotationRequest(RotationScope.INTERMEDIATE, reason="drill"))
    fresh = env.authority.state.active(CAKind.INTERMEDIATE)
    assert fresh.not_before == clock.now() - backdate
    leaf = env.registry.get_or_issue("node-1", WORKLOAD).svid
    assert leaf.issuer_key_id == fresh.key_id
    assert leaf.not_before == clock.now() - backdate  # not clamped to the new intermediate's start
