"""Per-replica ACK frontier records on Leases, read back by the leader from the real API server."""

from __future__ import annotations

import datetime as dt

from kubernetes import client

from ca_service.kube.client import MANAGED_BY, build_api_client
from ca_service.kube.frontier import (
    ClusterAckTracker,
    FrontierPublisher,
    FrontierReader,
    LocalFrontier,
    read_frontiers,
)
from tests.kube import Cluster
from tests.waiting import wait_for


class FakeAcks:
    """This replica's own SDS streams (the real ones are the SDS hub's, tested in tests/rpc)."""

    def __init__(self, acked: int | None, streams: int) -> None:
        self.acked, self.streams = acked, streams

    def connected_streams(self) -> int:
        return self.streams

    def streams_behind(self, bundle_sequence: int) -> int:
        return self.streams if self.acked is not None and self.acked < bundle_sequence else 0

    def frontier(self) -> LocalFrontier:
        return LocalFrontier(self.acked, self.streams)


def _publisher(k8s: Cluster, ns: str, replica: str, acks: FakeAcks, ttl: float = 30) -> FrontierPublisher:
    return FrontierPublisher(build_api_client(k8s.kubeconfig), ns, replica, acks.frontier,
                             ttl=dt.timedelta(seconds=ttl), check=dt.timedelta(milliseconds=100))


async def test_each_replica_publishes_its_frontier_on_its_own_lease(k8s: Cluster) -> None:
    ns = k8s.fresh_namespace()
    a, b = FakeAcks(7, 3), FakeAcks(None, 0)
    publishers = [_publisher(k8s, ns, "a", a), _publisher(k8s, ns, "b", b)]
    for p in publishers:
        await p.start()
    try:
        api = build_api_client(k8s.kubeconfig)
        records = {f.replica: f for f in read_frontiers(api, ns)}
        assert (records["a"].acked_sequence, records["a"].streams) == (7, 3)
        assert (records["b"].acked_sequence, records["b"].streams) == (None, 0)
        assert records["a"].ttl == dt.timedelta(seconds=30)
        lease = client.CoordinationV1Api(api).read_namespaced_lease("ca-service-replica-a", ns)
        assert lease.metadata.labels[MANAGED_BY] == "ca-service" and lease.spec.holder_identity == "a"
        a.acked = 8  # an ACK arrives: the record follows within a check period
        await wait_for(lambda: {f.replica: f.acked_sequence for f in read_frontiers(api, ns)}["a"] == 8,
                       "the new frontier")
    finally:
        for p in publishers:
            await p.stop()
    # A stopped replica's streams reconnect elsewhere: its record no longer holds anyone's gate.
    stopped = {f.replica: f for f in read_frontiers(api, ns)}
    assert stopped["a"].streams == 0


async def test_the_leader_gates_on_every_live_replica_and_forgets_expired_ones(k8s: Cluster) -> None:
    ns = k8s.fresh_namespace()
    behind, slow = FakeAcks(4, 2), FakeAcks(5, 1)
    fast = _publisher(k8s, ns, "behind", behind, ttl=1)  # expires a second after its last write
    await fast.start()
    other = _publisher(k8s, ns, "slow", slow)
    await other.start()
    reader = FrontierReader(build_api_client(k8s.kubeconfig), ns, period=dt.timedelta(milliseconds=100))
    await reader.start()
    local = FakeAcks(5, 10)
    gate = ClusterAckTracker(local, reader, "leader", max_age=dt.timedelta(seconds=30))
    try:
        assert gate.connected_streams() == 13
        assert gate.streams_behind(5) == 2  # "behind" has 2 streams at 4; "slow" and the leader are at 5
        assert gate.streams_behind(6) == 13
        # The replica that stops refreshing (killed) drops out once its record is older than its ttl.
        fast._stop.set()
        assert fast._task is not None
        await fast._task
        fast._task = None
        await wait_for(lambda: gate.streams_behind(5) == 0, "the dead replica to expire", timeout=10)
        assert [f.replica for f in reader.live()] == ["slow"]
    finally:
        await reader.stop()
        await other.stop()


async def test_a_leader_that_cannot_read_the_records_keeps_the_gate_closed(k8s: Cluster) -> None:
    ns = k8s.fresh_namespace()
    reader = FrontierReader(build_api_client(k8s.kubeconfig), ns, period=dt.timedelta(seconds=60))
    gate = ClusterAckTracker(FakeAcks(5, 0), reader, "leader", max_age=dt.timedelta(seconds=30))
    assert gate.streams_behind(5) == 1  # never read: no news is not consent
    await reader.refresh()
    assert gate.streams_behind(5) == 0
