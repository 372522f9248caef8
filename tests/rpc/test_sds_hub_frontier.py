"""The SDS hub's ACK frontier: what a replica publishes for the cluster-wide root rotation gate."""

from __future__ import annotations

from ca_service.kube.frontier import LocalFrontier
from ca_service.rpc.sds_hub import WatchHub


async def test_the_frontier_is_the_lowest_ack_among_streams_that_receive_our_bundle() -> None:
    hub = WatchHub()
    assert hub.lowest_acked_bundle_sequence() is None  # no streams: holds nobody's gate
    a, b, other = hub.open(), hub.open(), hub.open()
    for watch, sequence in ((a, 7), (b, 5)):  # what the servicer records: a push of our bundle, then its ACK
        hub.acks.pushed(watch, f"nonce-{sequence}", sequence)
        hub.acks.acked(watch)
    hub.acks.pushed(other, "n0", 0)  # a stream that never receives our bundle (a peer's only): it does not count
    assert hub.lowest_acked_bundle_sequence() == 5
    assert LocalFrontier(hub.lowest_acked_bundle_sequence(), hub.connected_streams()) == LocalFrontier(5, 2)
    hub.close_watch(b)
    assert hub.lowest_acked_bundle_sequence() == 7


async def test_a_stream_that_has_not_acked_its_first_bundle_holds_the_frontier_at_zero() -> None:
    hub = WatchHub()
    a, b = hub.open(), hub.open()
    hub.acks.pushed(a, "n1", 3)
    hub.acks.acked(a)
    hub.acks.pushed(b, "n2", 3)
    assert hub.lowest_acked_bundle_sequence() == 0
