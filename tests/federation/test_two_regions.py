"""Two regions (us, eu) federating through their bundle endpoints on loopback, in one process."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ca_service.federation.policy import UNREACHABLE
from ca_service.pki.certs import cert_to_pem, fingerprint
from tests.clock import FakeClock
from tests.conftest import START
from tests.federation.regions import Region, start_region
from tests.waiting import wait_for


@pytest.fixture
async def regions(tmp_path: Path) -> AsyncIterator[tuple[Region, Region]]:
    clock = FakeClock(START, real_sleeps=True)
    us = await start_region("us", tmp_path, clock)
    eu = await start_region("eu", tmp_path, clock)
    await us.federate([eu.peer_settings()])
    await eu.federate([us.peer_settings()])
    yield us, eu
    await us.stop()
    await eu.stop()


def roots_of(region: Region, peer: Region) -> frozenset[bytes]:
    bundle = region.trust.bundle(peer.td)
    return bundle.fingerprints() if bundle else frozenset()


async def test_each_region_fetches_the_other_regions_bundle_through_its_endpoint(regions: tuple[Region, Region]):
    us, eu = regions
    await wait_for(lambda: us.federation is not None and us.federation.poller(eu.td).last_refresh is not None)
    await wait_for(lambda: eu.federation is not None and eu.federation.poller(us.td).last_refresh is not None)
    assert roots_of(us, eu) == eu.authority.bundle().fingerprints()
    assert roots_of(eu, us) == us.authority.bundle().fingerprints()
    assert set(us.trust.bundles()) == {us.td, eu.td}


async def test_a_root_rotation_in_eu_is_trusted_by_us_within_one_refresh_hint(regions: tuple[Region, Region]):
    us, eu = regions
    assert us.federation is not None
    poller = us.federation.poller(eu.td)
    await wait_for(lambda: poller.last_refresh is not None)
    new_root = eu.rotate_root_publish()
    # The endpoint serves the live bundle, so the new root is public before eu signs anything with it.
    await wait_for(lambda: fingerprint(new_root) in roots_of(us, eu), timeout=1.0)
    assert poller.current is not None and poller.current.sequence == eu.authority.state.bundle_sequence
    # eu now signs under the new root only (its endpoint SVID too); us authenticates it with the
    # bundle it fetched last, not the bootstrap file, which knows only the old root.
    eu.rotate_root_sign_with_new()
    assert eu.endpoint.svid is not None and eu.endpoint.svid.roots == (new_root,)
    await wait_for(lambda: roots_of(us, eu) == frozenset({fingerprint(new_root)}), timeout=1.0)
    failures_before = poller.failures
    assert await poller.refresh_once()
    assert failures_before == 0


async def test_with_eu_down_us_keeps_the_last_good_bundle_and_staleness_grows(regions: tuple[Region, Region],
                                                                              tmp_path: Path):
    us, eu = regions
    assert us.federation is not None
    poller = us.federation.poller(eu.td)
    await wait_for(lambda: poller.last_refresh is not None)
    good = roots_of(us, eu)
    await eu.endpoint.stop()
    fetched = poller.last_refresh
    us.clock.advance(dt.timedelta(minutes=10))
    before = us.failures(eu.td, UNREACHABLE)
    assert not await poller.refresh_once()
    assert us.failures(eu.td, UNREACHABLE) >= before + 1
    assert roots_of(us, eu) == good
    assert poller.staleness(us.clock.now()) == dt.timedelta(minutes=10)
    gauge = us.telemetry.registry.get_sample_value("ca_trust_bundle_last_refresh_timestamp_seconds",
                                                   {"trust_domain": eu.td.name})
    assert fetched is not None and gauge == fetched.timestamp()

    # Restart us (new objects, same data dir) while eu is still down: eu is still trusted from disk.
    await us.stop()
    us2 = await start_region("us", tmp_path, us.clock, reuse=us.data_dir)
    try:
        federation = await us2.federate([eu.peer_settings()])
        assert roots_of(us2, eu) == good
        poller2 = federation.poller(eu.td)
        assert poller2.last_refresh == fetched  # staleness continues across the restart
        us2.clock.advance(dt.timedelta(minutes=5))
        assert poller2.staleness(us2.clock.now()) == dt.timedelta(minutes=15)
        await wait_for(lambda: us2.failures(eu.td, UNREACHABLE) >= 1)
        assert roots_of(us2, eu) == good
    finally:
        await us2.stop()
    us.federation = None  # already stopped


async def test_bundle_files_hold_each_domain_and_the_concatenation(regions: tuple[Region, Region]):
    us, eu = regions
    await wait_for(lambda: eu.td in us.trust.peers())
    bundles = us.data_dir / "bundles"
    await wait_for(lambda: (bundles / "eu.cluster.local.pem").exists())
    assert (bundles / "us.cluster.local.pem").read_bytes() == us.authority.bundle().to_pem()
    assert (bundles / "eu.cluster.local.pem").read_bytes() == eu.authority.bundle().to_pem()
    assert (bundles / "combined-ca.pem").read_bytes() == (
        us.authority.bundle().to_pem() + eu.authority.bundle().to_pem())
    # Our own rotation is written too.
    new_root = us.rotate_root_publish()
    assert cert_to_pem(new_root) in (bundles / "us.cluster.local.pem").read_bytes()
    assert cert_to_pem(new_root) in (bundles / "combined-ca.pem").read_bytes()


async def test_a_peer_removed_from_the_configuration_is_forgotten_everywhere(regions: tuple[Region, Region],
                                                                             tmp_path: Path):
    us, eu = regions
    await wait_for(lambda: eu.td in us.trust.peers())
    await us.stop()
    us2 = await start_region("us", tmp_path, us.clock, reuse=us.data_dir)
    try:
        federation = await us2.federate([])
        assert eu.td not in us2.trust.peers()
        assert federation.pollers == {}
        assert not (us2.data_dir / "bundles" / "eu.cluster.local.pem").exists()
        assert not list((us2.data_dir / "federation").glob("peer-bundle-*"))
    finally:
        await us2.stop()
    us.federation = None
