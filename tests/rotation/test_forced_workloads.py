"""Forced workload rotations through the real RotationService: selection, dry run, the spread, and the
``reason="forced"`` label on every renewal an operator caused (and only on those)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging

import pytest
from rotation_kit import Env, metric

from ca_service.errors import InvalidRequestError
from ca_service.pki.identity import SpiffeId
from ca_service.pki.templates import CAKind
from ca_service.rotation.state import RootRotationPhase
from ca_service.services.ports import RotationRequest, RotationScope
from ca_service.services.rotator import RotationService
from ca_service.services.workloads import WorkloadCert

SHOP = [SpiffeId.parse(f"spiffe://cluster.local/ns/shop/sa/s{i}") for i in range(4)]
BANK = [SpiffeId.parse(f"spiffe://cluster.local/ns/bank/sa/b{i}") for i in range(3)]


def issue_all(env: Env) -> dict[SpiffeId, WorkloadCert]:
    return {identity: env.registry.get_or_issue(f"node-{identity.path}", identity) for identity in SHOP + BANK}


def generations(env: Env) -> dict[SpiffeId, int]:
    return {c.spiffe_id: c.generation for c in env.registry}


def workload_rotations(env: Env, reason: str) -> float:
    return metric(env.telemetry, "ca_rotations_total", kind="workload", reason=reason)


async def test_a_namespace_rotation_renews_only_that_namespace_spread_over_the_window_and_counts_as_forced(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    before = issue_all(env)
    rotator = RotationService.of(env.reconciler)
    request = RotationRequest(RotationScope.NAMESPACE, reason="drill", namespace="shop")

    dry = await rotator.rotate(RotationRequest(RotationScope.NAMESPACE, reason="drill", namespace="shop",
                                               dry_run=True))
    assert sorted(dry.affected_identities) == sorted(str(i) for i in SHOP)
    assert generations(env) == dict.fromkeys(SHOP + BANK, 1)

    result = await rotator.rotate(request)
    assert sorted(result.affected_serials) == sorted(format(before[i].svid.leaf.serial_number, "x") for i in SHOP)
    # The first of the spread is due at once; the rest follow over the window.
    assert sum(generations(env)[i] == 2 for i in SHOP) == 1
    env.clock.advance(env.reconciler.policy.reissue_window)
    await env.reconciler.reconcile()
    assert generations(env) == {**dict.fromkeys(SHOP, 2), **dict.fromkeys(BANK, 1)}
    assert workload_rotations(env, "forced") == len(SHOP)
    assert workload_rotations(env, "scheduled") == 0
    reasons = {getattr(r, "reason", None) for r in caplog.records if r.getMessage() == "workload certificate re-issued"}
    assert reasons == {"forced renewal"}

    # Their next renewal is an ordinary one again.
    env.clock.set(max(c.renew_at for c in env.registry))
    await env.reconciler.reconcile()
    assert workload_rotations(env, "forced") == len(SHOP)
    assert workload_rotations(env, "scheduled") == len(SHOP) + len(BANK)


async def test_all_workloads_renews_every_workload_as_forced(env: Env) -> None:
    issue_all(env)
    waves: list[int] = []  # the storm starts a wave before it reschedules anything (the collector freezes there)
    env.registry.on_wave = lambda: waves.append(sum(c.renew_at <= env.clock.now() for c in env.registry))
    await RotationService.of(env.reconciler).rotate(RotationRequest(RotationScope.ALL_WORKLOADS, reason="drill"))
    assert waves and waves[0] == 0
    env.clock.advance(env.reconciler.policy.reissue_window)
    await env.reconciler.reconcile()
    assert generations(env) == dict.fromkeys(SHOP + BANK, 2)
    assert workload_rotations(env, "forced") == len(SHOP) + len(BANK)
    assert workload_rotations(env, "scheduled") == 0


@pytest.mark.parametrize(("request_", "field"), [
    (RotationRequest(RotationScope.NAMESPACE, reason="x"), "namespace"),
    (RotationRequest(RotationScope.WORKLOAD, reason="x"), "spiffe_id"),
], ids=["namespace", "workload"])
async def test_a_scope_without_its_target_is_refused_and_changes_nothing(
        env: Env, request_: RotationRequest, field: str) -> None:
    issue_all(env)
    with pytest.raises(InvalidRequestError, match=field):
        await RotationService.of(env.reconciler).rotate(request_)
    env.clock.advance(env.reconciler.policy.reissue_window)
    await env.reconciler.reconcile()
    assert generations(env) == dict.fromkeys(SHOP + BANK, 1)


async def test_an_operators_root_rotation_reissues_every_workload_as_forced(env: Env) -> None:
    issue_all(env)
    rotator = RotationService.of(env.reconciler)
    await rotator.rotate(RotationRequest(RotationScope.ROOT, reason="suspected root key exposure"))
    env.clock.advance(env.reconciler.policy.min_propagation)  # no SDS streams: only the minimum time gates
    await env.reconciler.reconcile()
    rotation = env.authority.state.root_rotation
    assert rotation is not None and rotation.phase is RootRotationPhase.SIGNING
    env.clock.advance(env.reconciler.policy.reissue_window)
    await env.reconciler.reconcile()
    signer = env.authority.state.active(CAKind.INTERMEDIATE).key_id
    assert all(c.svid.issuer_key_id == signer for c in env.registry)
    assert workload_rotations(env, "forced") == len(SHOP) + len(BANK)
    assert workload_rotations(env, "scheduled") == 0


def test_moving_a_renewal_changes_only_its_time(env: Env) -> None:
    cert = env.registry.get_or_issue("node-a", SHOP[0])
    later = cert.renew_at + dt.timedelta(minutes=5)
    moved = cert.renewing_at(later)
    assert moved.renew_at == later and cert.renew_at != later  # a new object: the original is untouched
    others = [f.name for f in dataclasses.fields(WorkloadCert) if f.name != "renew_at"]
    assert [getattr(moved, name) for name in others] == [getattr(cert, name) for name in others]
    env.registry.reschedule(cert, later)
    assert env.registry.get("node-a", SHOP[0]) == moved
