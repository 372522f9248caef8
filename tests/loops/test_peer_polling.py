"""The peer poller's loop runs on the injected clock: each refresh interval is one advance, no real sleeping."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from pathlib import Path

from ca_service.federation.lastgood import LastGoodStore
from ca_service.federation.peers import PeerPoller
from ca_service.federation.policy import UNREACHABLE, BundleRejectedError
from ca_service.pki.bundle import TrustBundle
from ca_service.pki.identity import TrustDomain
from ca_service.services.authority import Authority
from ca_service.services.trust import TrustStore
from ca_service.telemetry import Telemetry
from tests.clock import FakeClock
from tests.rpc.sds_fixtures import peer_bundle

REFRESH = dt.timedelta(minutes=5)


class FakeBundleSource:
    """Serves a fixed bundle, or fails while ``down``; counts fetches."""

    description = "fake"

    def __init__(self, bundle: TrustBundle) -> None:
        self.bundle = bundle
        self.down = False
        self.fetches = 0

    async def fetch(self, current: TrustBundle | None) -> TrustBundle:
        self.fetches += 1
        if self.down:
            raise BundleRejectedError("peer down", UNREACHABLE)
        return self.bundle

    def has_changed(self) -> bool:
        return False


async def test_the_poller_fetches_again_only_when_the_fake_clock_reaches_the_refresh_interval(
        authority: Authority, clock: FakeClock, tmp_path: Path):
    source = FakeBundleSource(peer_bundle("eu.cluster.local", clock.now()))
    poller = PeerPoller(TrustDomain("eu.cluster.local"), source, TrustStore(authority),
                        LastGoodStore(tmp_path / "lastgood"), Telemetry(), clock, refresh_override=REFRESH)
    task = asyncio.create_task(poller.run())
    try:
        await clock.settle(1)
        assert source.fetches == 1
        clock.advance(REFRESH - dt.timedelta(seconds=1))
        await clock.settle(1)
        assert source.fetches == 1
        clock.advance(dt.timedelta(seconds=1))
        await clock.settle(1)
        assert source.fetches == 2
        assert poller.last_refresh == clock.now()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_failing_peer_is_retried_after_the_backoff_on_the_fake_clock(
        authority: Authority, clock: FakeClock, tmp_path: Path):
    source = FakeBundleSource(peer_bundle("eu.cluster.local", clock.now()))
    source.down = True
    poller = PeerPoller(TrustDomain("eu.cluster.local"), source, TrustStore(authority),
                        LastGoodStore(tmp_path / "lastgood"), Telemetry(), clock, refresh_override=REFRESH)
    task = asyncio.create_task(poller.run())
    try:
        await clock.settle(1)
        assert poller.failures == 1
        # The first retry comes after 0.5-1 s (MIN_BACKOFF with jitter), far before the refresh interval.
        clock.advance(dt.timedelta(seconds=1))
        await clock.settle(1)
        assert source.fetches == 2
        source.down = False
        clock.advance(dt.timedelta(seconds=2))
        await clock.settle(1)
        assert source.fetches == 3 and poller.failures == 0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
