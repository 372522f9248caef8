"""With replicas, only the lease holder changes the CA: a follower's reconcile pass renews workloads but
never commits a CA step, and a forced CA change on a follower is refused (issue 12, leader gating)."""

from __future__ import annotations

import datetime as dt

import pytest

from ca_service.errors import NotReadyError
from ca_service.pki.identity import SpiffeId
from ca_service.rotation.planner import RotationPolicy
from ca_service.services.reconciler import Reconciler
from tests.rotation.rotation_kit import Env


def _gated(env: Env, leading: list[bool]) -> Reconciler:
    return Reconciler(env.authority, env.registry, RotationPolicy.from_settings(env.settings), env.telemetry,
                      acks=env.acks, clock=env.clock, leader=lambda: leading[0])


async def test_a_follower_renews_workloads_but_leaves_a_due_intermediate_rotation_to_the_leader(env: Env):
    cert = env.registry.get_or_issue("node-1", SpiffeId.parse("spiffe://cluster.local/ns/a/sa/s"))
    leading = [False]
    reconciler = _gated(env, leading)
    revision = env.authority.state.revision
    env.clock.advance(dt.timedelta(days=29))  # the 30-day intermediate is due, and the 24 h SVID long since
    report = await reconciler.reconcile()
    assert report.steps == [] and env.authority.state.revision == revision
    renewed = env.registry.get("node-1", cert.spiffe_id)
    assert report.renewed == 1 and renewed is not None and renewed.svid.leaf != cert.svid.leaf
    leading[0] = True
    report = await reconciler.reconcile()
    assert report.steps and env.authority.state.revision > revision


async def test_a_forced_ca_change_on_a_follower_is_refused_and_commits_nothing(env: Env):
    reconciler = _gated(env, [False])
    revision = env.authority.state.revision
    with pytest.raises(NotReadyError, match="not the leader"):
        await reconciler.apply(lambda state: state)
    assert env.authority.state.revision == revision
