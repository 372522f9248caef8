"""Root rotation A -> A+B -> sign with B -> B, its ACK gate, restarts in every phase, istiod cacerts."""

from __future__ import annotations

import datetime as dt
import itertools
from pathlib import Path

import pytest
from rotation_kit import Env, FakeAckTracker, make_env, metric, with_rotation

from ca_service.adapters.cacerts_publisher import CacertsPublisher
from ca_service.app import register_reactions
from ca_service.config import Settings
from ca_service.errors import NotReadyError
from ca_service.pki.cacerts import ROOT_CERT, check_cacerts
from ca_service.pki.certs import fingerprint, load_certs
from ca_service.pki.identity import SpiffeId
from ca_service.pki.templates import CAKind
from ca_service.rotation.planner import GateStatus, activation_time
from ca_service.rotation.state import RootRotationPhase, SlotState
from ca_service.services.ports import RotationRequest, RotationScope
from ca_service.services.rotator import RotationService
from ca_service.storage.projected import read_projected
from tests.clock import FakeClock

WORKLOADS = [SpiffeId.parse(f"spiffe://cluster.local/ns/default/sa/w{i}") for i in range(5)]


def phase(env: Env) -> RootRotationPhase | None:
    rotation = env.authority.state.root_rotation
    return rotation.phase if rotation else None


def root_fps(env: Env) -> set[bytes]:
    return {fingerprint(c) for c in env.authority.state.roots}


@pytest.fixture
def gated(settings: Settings, clock: FakeClock) -> Env:
    return make_env(settings, clock, FakeAckTracker(streams=3))


async def start_rotation(env: Env) -> None:
    env.clock.set(activation_time(env.authority.state.active(CAKind.ROOT), env.reconciler.policy))
    await env.reconciler.reconcile()


async def test_the_root_rotation_starts_at_half_the_roots_lifetime_and_publishes_a_plus_b(gated: Env) -> None:
    root_a = gated.authority.state.active(CAKind.ROOT)
    sequence = gated.authority.state.bundle_sequence
    gated.clock.set(activation_time(root_a, gated.reconciler.policy) - dt.timedelta(seconds=1))
    await gated.reconciler.reconcile()
    assert phase(gated) is None
    gated.clock.advance(dt.timedelta(seconds=1))
    await gated.reconciler.reconcile()
    state = gated.authority.state
    assert phase(gated) is RootRotationPhase.PUBLISHED
    assert len(state.roots) == 2 and state.bundle_sequence == sequence + 1
    assert state.active(CAKind.ROOT).key_id == root_a.key_id  # A still signs
    assert state.active(CAKind.INTERMEDIATE).parent == root_a.key_id


async def test_the_gate_waits_for_every_ack_and_for_the_minimum_propagation_time(gated: Env) -> None:
    await start_rotation(gated)
    sequence = gated.authority.state.bundle_sequence
    gated.acks.ack_all(sequence)  # every stream ACKs at once...
    assert (await gated.reconciler.reconcile()).gate is GateStatus.WAITING_PROPAGATION  # ...but the minimum time holds
    gated.clock.advance(gated.reconciler.policy.min_propagation)
    gated.acks.ack_all(sequence - 1)  # one stream behind again (e.g. a reconnect on an old bundle)
    assert (await gated.reconciler.reconcile()).gate is GateStatus.WAITING_ACKS
    assert phase(gated) is RootRotationPhase.PUBLISHED
    gated.acks.ack_all(sequence)
    await gated.reconciler.reconcile()
    assert phase(gated) is RootRotationPhase.SIGNING


async def test_an_ack_timeout_alerts_once_and_never_proceeds_until_an_operator_overrides(gated: Env) -> None:
    await start_rotation(gated)
    gated.clock.advance(gated.reconciler.policy.ack_timeout)
    for _ in range(3):
        assert (await gated.reconciler.reconcile()).gate is GateStatus.TIMED_OUT
        gated.clock.advance(dt.timedelta(hours=1))
    assert phase(gated) is RootRotationPhase.PUBLISHED
    assert metric(gated.telemetry, "ca_root_rotation_ack_gate_timeouts_total") == 1
    result = await RotationService.of(gated.reconciler).rotate(
        RotationRequest(RotationScope.ROOT, reason="sidecar x is dead, INC-42"))
    assert phase(gated) is RootRotationPhase.SIGNING, result


async def test_signing_switches_to_b_and_reissues_every_live_svid_within_the_window(gated: Env) -> None:
    await start_rotation(gated)
    for i, identity in enumerate(WORKLOADS):
        gated.registry.get_or_issue(f"node-{i}", identity)
    root_a = gated.authority.state.active(CAKind.ROOT)
    gated.acks.ack_all(gated.authority.state.bundle_sequence)
    gated.clock.advance(gated.reconciler.policy.min_propagation)
    report = await gated.reconciler.reconcile()
    state = gated.authority.state
    root_b = state.active(CAKind.ROOT)
    assert root_b.key_id != root_a.key_id and phase(gated) is RootRotationPhase.SIGNING
    assert {e.parent for e in state.of_kind(CAKind.INTERMEDIATE, SlotState.ACTIVE)} == {root_b.key_id}
    assert {e.parent for e in state.of_kind(CAKind.ISTIOD_INTERMEDIATE, SlotState.ACTIVE)} == {root_b.key_id}
    assert report.rescheduled == len(WORKLOADS)
    window_end = state.root_rotation.phase_since + gated.reconciler.policy.reissue_window  # type: ignore[union-attr]
    signer = state.active(CAKind.INTERMEDIATE).key_id
    assert all(c.svid.issuer_key_id == signer or c.renew_at < window_end for c in gated.registry)
    assert (await gated.reconciler.reconcile()).rescheduled == 0  # idempotent
    gated.clock.set(window_end)
    await gated.reconciler.reconcile()
    assert all(c.svid.issuer_key_id == signer for c in gated.registry)
    # A scheduled root rotation's re-issues are scheduled renewals (a forced one's are forced: see
    # test_forced_workloads.py).
    assert metric(gated.telemetry, "ca_rotations_total", kind="workload", reason="scheduled") == len(WORKLOADS)
    assert metric(gated.telemetry, "ca_rotations_total", kind="workload", reason="forced") == 0
    assert phase(gated) is RootRotationPhase.RETIRING
    assert len(gated.authority.state.roots) == 2  # A stays until nothing valid chains to it


async def run_to_end(env: Env, step: dt.timedelta = dt.timedelta(hours=6)) -> list[set[bytes]]:
    """Walk the clock until the rotation is over; returns the root set seen at each step."""
    seen = [root_fps(env)]
    while phase(env) is not None:
        env.acks.ack_all(env.authority.state.bundle_sequence)
        env.clock.advance(step)
        await env.reconciler.reconcile()
        if root_fps(env) != seen[-1]:
            seen.append(root_fps(env))
    return seen


async def test_a_is_dropped_only_after_istiods_longest_leaf_under_it_expired(gated: Env) -> None:
    root_a = gated.authority.state.active(CAKind.ROOT)
    await start_rotation(gated)
    seen = await run_to_end(gated)
    state = gated.authority.state
    assert [len(s) for s in seen] == [2, 1]
    assert fingerprint(root_a.cert) not in root_fps(gated)
    assert all(e.parent != root_a.key_id for e in state.entries)
    published = state.bundle_sequence
    assert published >= 3
    signing_started = gated.clock.now() - gated.reconciler.policy.istiod_max_leaf_ttl
    assert signing_started > root_a.not_before  # a 90-day tail, not a date re-derived from notAfter


@pytest.mark.parametrize("kill_in", list(RootRotationPhase))
async def test_a_restart_in_any_phase_resumes_and_finishes(gated: Env, kill_in: RootRotationPhase) -> None:
    root_a = gated.authority.state.active(CAKind.ROOT)
    await start_rotation(gated)
    env = gated
    while phase(env) is not kill_in:
        env.acks.ack_all(env.authority.state.bundle_sequence)
        env.clock.advance(dt.timedelta(minutes=1))
        await env.reconciler.reconcile()
    root_b = env.authority.state.of_kind(CAKind.ROOT, SlotState.PREPARED, SlotState.ACTIVE)[-1]
    restarted = env.restart()
    assert phase(restarted) is kill_in
    await run_to_end(restarted)
    assert root_fps(restarted) == {fingerprint(root_b.cert)}
    assert restarted.authority.state.active(CAKind.ROOT).key_id != root_a.key_id


async def test_istiod_cacerts_pass_istios_checks_at_every_step_and_consecutive_root_files_contain_each_other(
    gated: Env, tmp_path: Path,
) -> None:
    publisher = CacertsPublisher(gated.authority, tmp_path / "cacerts", gated.telemetry)
    register_reactions(gated.authority.reactions, cacerts=publisher)
    await publisher.start()
    sets: list[set[bytes]] = []

    def snapshot() -> None:
        files = read_projected(tmp_path / "cacerts")
        check_cacerts(files, now=gated.clock.now())
        roots = {fingerprint(c) for c in load_certs(files[ROOT_CERT])}
        if not sets or sets[-1] != roots:
            sets.append(roots)

    snapshot()
    istiod_switch = activation_time(gated.authority.state.active(CAKind.ISTIOD_INTERMEDIATE), gated.reconciler.policy)
    while gated.clock.now() < istiod_switch + dt.timedelta(days=1):
        gated.clock.advance(dt.timedelta(days=1))
        await gated.reconciler.reconcile()
        snapshot()
    assert publisher.writes >= 2  # the istiod intermediate rotated under the same root
    await start_rotation(gated)
    while phase(gated) is not None:
        gated.acks.ack_all(gated.authority.state.bundle_sequence)
        gated.clock.advance(dt.timedelta(hours=6))
        await gated.reconciler.reconcile()
        snapshot()
    assert [len(s) for s in sets] == [1, 2, 1]  # A -> A+B -> B
    for before, after in itertools.pairwise(sets):
        assert before <= after or after <= before
    await publisher.stop()


async def test_in_intermediate_only_mode_rotation_is_reported_impossible_and_nothing_crashes(env: Env) -> None:
    state = env.authority.state
    offline = state.replace(entries=[e if e.kind is not CAKind.ROOT else type(e)(e.kind, e.cert, None, e.state)
                                     for e in state.entries])
    env.authority.commit(offline)
    env.clock.advance(dt.timedelta(days=20))
    report = await env.reconciler.reconcile()
    assert "intermediate" in report.blocked and "offline" in report.blocked["intermediate"]
    assert metric(env.telemetry, "ca_rotation_failures_total", kind="intermediate") == 1
    await env.reconciler.reconcile()
    assert metric(env.telemetry, "ca_rotation_failures_total", kind="intermediate") == 1  # reported once
    with pytest.raises(NotReadyError):
        await RotationService.of(env.reconciler).rotate(RotationRequest(RotationScope.ROOT, reason="x"))


async def test_a_cas_conflict_reloads_and_converges_on_the_next_tick(settings: Settings, clock: FakeClock) -> None:
    first, second = make_env(settings, clock), make_env(settings, clock)
    clock.set(activation_time(first.authority.state.active(CAKind.ROOT), first.reconciler.policy))
    await first.reconciler.reconcile()
    assert (await second.reconciler.reconcile()).conflict
    assert (await second.reconciler.reconcile()).steps == [] and phase(second) is RootRotationPhase.PUBLISHED


async def test_min_propagation_elapsed_without_an_sds_server_is_enough(settings: Settings, clock: FakeClock) -> None:
    env = make_env(with_rotation(settings), clock)
    await start_rotation(env)
    env.clock.advance(env.reconciler.policy.min_propagation)
    await env.reconciler.reconcile()
    assert phase(env) is RootRotationPhase.SIGNING
