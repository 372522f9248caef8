"""Lease leader election with three real electors in one process, against the real API server."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from kubernetes import client

from ca_service.kube.client import build_api_client
from ca_service.kube.leader import LeaderElector, LeaseTimings, micro_time
from tests.kube import Cluster
from tests.waiting import wait_for

# Short timings so the test runs in seconds; same ratios as the defaults (15s/10s/2s).
TIMINGS = LeaseTimings(lease_duration=dt.timedelta(seconds=3), renew_deadline=dt.timedelta(seconds=2),
                       retry_period=dt.timedelta(milliseconds=400))


def _electors(k8s: Cluster, ns: str, n: int = 3) -> list[LeaderElector]:
    return [LeaderElector(build_api_client(k8s.kubeconfig), ns, "leader", f"replica-{i}", TIMINGS)
            for i in range(n)]


def _leaders(electors: list[LeaderElector]) -> list[str]:
    return [e.identity for e in electors if e.is_leader]


async def test_exactly_one_of_three_replicas_leads_and_all_agree_who(k8s: Cluster) -> None:
    electors = _electors(k8s, k8s.fresh_namespace())
    for e in electors:
        await e.start()
    try:
        await wait_for(lambda: len(_leaders(electors)) == 1, "a leader")
        leader = _leaders(electors)[0]
        # Several retry periods later nobody else has taken it, and every replica knows who leads.
        await asyncio.sleep(TIMINGS.retry_period.total_seconds() * 4)
        assert _leaders(electors) == [leader]
        await wait_for(lambda: all(e.holder == leader for e in electors), "everyone to see the leader")
    finally:
        for e in electors:
            await e.stop()


async def test_when_the_leader_stops_another_replica_takes_over_within_the_lease_duration(k8s: Cluster) -> None:
    ns = k8s.fresh_namespace()
    electors = _electors(k8s, ns)
    for e in electors:
        await e.start()
    try:
        await wait_for(lambda: len(_leaders(electors)) == 1, "a leader")
        old = next(e for e in electors if e.is_leader)
        await old.stop()
        assert not old.is_leader and old.lost_leadership.is_set()
        rest = [e for e in electors if e is not old]
        await wait_for(lambda: len(_leaders(rest)) == 1, "a new leader",
                       timeout=TIMINGS.lease_duration.total_seconds())
        new = next(e for e in rest if e.is_leader)
        assert new.became_leader.is_set()
        with k8s.api_client() as api:
            lease = client.CoordinationV1Api(api).read_namespaced_lease("leader", ns)
        assert lease.spec.holder_identity == new.identity and lease.spec.lease_transitions >= 1
    finally:
        for e in electors:
            await e.stop()


async def test_a_crashed_leader_is_replaced_once_its_lease_expires(k8s: Cluster) -> None:
    electors = _electors(k8s, k8s.fresh_namespace())
    for e in electors:
        await e.start()
    try:
        await wait_for(lambda: len(_leaders(electors)) == 1, "a leader")
        old = next(e for e in electors if e.is_leader)
        assert old._task is not None
        old._task.cancel()  # as if killed: no release, the lease just stops being renewed
        rest = [e for e in electors if e is not old]
        await wait_for(lambda: len(_leaders(rest)) == 1, "a new leader",
                       timeout=2 * TIMINGS.lease_duration.total_seconds())
        assert not old.is_leader  # its own fencing: no renewal for renew_deadline
    finally:
        for e in electors:
            old_task = e._task
            if old_task is not None and old_task.cancelled():
                e._task = None
            await e.stop()


async def test_a_leader_whose_lease_was_taken_by_another_holder_steps_down(k8s: Cluster) -> None:
    ns = k8s.fresh_namespace()
    [elector] = _electors(k8s, ns, 1)
    stopped: list[str] = []
    elector._on_stopped = lambda: stopped.append("stopped")
    await elector.start()
    try:
        await wait_for(lambda: elector.is_leader, "leadership")
        with k8s.api_client() as api:
            leases = client.CoordinationV1Api(api)
            lease = leases.read_namespaced_lease("leader", ns)
            lease.spec.holder_identity = "forger"
            lease.spec.renew_time = micro_time(dt.datetime.now(dt.UTC))
            leases.replace_namespaced_lease("leader", ns, lease)
        await wait_for(lambda: not elector.is_leader, "stepping down")
        assert elector.lost_leadership.is_set() and stopped == ["stopped"]
        assert elector.holder == "forger"
    finally:
        await elector.stop()
    with k8s.api_client() as api:  # stepping down does not release someone else's lease
        assert client.CoordinationV1Api(api).read_namespaced_lease("leader", ns).spec.holder_identity == "forger"


def test_lease_timings_must_let_a_leader_give_up_before_others_take_over() -> None:
    with pytest.raises(ValueError, match="retry_period < renew_deadline < lease_duration"):
        LeaseTimings(dt.timedelta(seconds=10), dt.timedelta(seconds=15), dt.timedelta(seconds=2))


async def test_a_leader_that_cannot_reach_the_api_server_steps_down_and_leads_again_after(
        private_k8s: Cluster) -> None:
    [elector] = _electors(private_k8s, private_k8s.fresh_namespace(), 1)
    await elector.start()
    try:
        await wait_for(lambda: elector.is_leader, "leadership")
        argv = await asyncio.to_thread(private_k8s.stop_apiserver)
        # Renewals fail; past renew_deadline the leader must stop mutating, before its lease could expire.
        await wait_for(lambda: elector.lost_leadership.is_set(), "stepping down", timeout=30)
        assert not elector.is_leader
        await asyncio.to_thread(private_k8s.start_apiserver, argv)
        await wait_for(lambda: elector.is_leader, "leadership again", timeout=30)
    finally:
        await elector.stop()
