"""The SDS hub's ACK frontier: what a replica publishes for the cluster-wide root rotation gate."""

from __future__ import annotations

from ca_service.kube.frontier import LocalFrontier
from ca_service.rpc.sds_hub import WatchHub


async def test_the_frontier_is_the_lowest_ack_among_streams_that_receive_our_bundle() -> None:
    hub = WatchHub()
    assert hub.lowest_acked_bundle_sequence() is None  # no streams: holds nobody's gate
    a, b, other = hub.open(), hub.open(), hub.open()
    a.receives_own_bundle = b.receives_own_bundle = True
    a.acked_bundle_sequence, b.acked_bundle_sequence, other.acked_bundle_sequence = 7, 5, 1
    assert hub.lowest_acked_bundle_sequence() == 5
    assert LocalFrontier(hub.lowest_acked_bundle_sequence(), hub.connected_streams()) == LocalFrontier(5, 2)
    hub.close_watch(b)
    assert hub.lowest_acked_bundle_sequence() == 7
