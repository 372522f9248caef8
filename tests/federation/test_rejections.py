"""A malicious or broken peer never replaces a good bundle: each case is rejected, counted and logged."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ca_service.config import BundleProfile, CASettings
from ca_service.federation import policy
from ca_service.federation.lastgood import LastGoodStore
from ca_service.federation.peers import PeerPoller
from ca_service.federation.sources import EndpointSource
from ca_service.pki.bundle import TrustBundle
from ca_service.pki.certs import cert_to_pem
from ca_service.pki.identity import SpiffeId, TrustDomain
from ca_service.pki.keys import PrivateKey
from ca_service.services.authority import Authority
from ca_service.storage.directory import DirectoryStore
from tests.clock import FakeClock
from tests.conftest import START
from tests.federation.regions import Region, RogueEndpoint, replace_sequence, start_region, svid_of


@dataclass
class Setup:
    us: Region
    eu: Region
    rogue: RogueEndpoint
    poller: PeerPoller
    good: TrustBundle


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    clock = FakeClock(START, real_sleeps=True)
    us = await start_region("us", tmp_path, clock)
    eu = await start_region("eu", tmp_path, clock)
    # The rogue server holds a genuine eu endpoint SVID: only its answers are bad.
    chain, key = svid_of(eu.authority, "/ca-service/bundle-endpoint")
    rogue = RogueEndpoint(chain, key, eu.authority.bundle().to_json())
    await rogue.start()
    poller = PeerPoller(eu.td, _Unset(), us.trust, LastGoodStore(tmp_path / "us-fed"), us.telemetry, clock,
                        bootstrap=eu.authority.bundle())
    poller.source = EndpointSource(eu.td, rogue.url, clock, profile=BundleProfile.HTTPS_SPIFFE,
                                   endpoint_id=SpiffeId.parse("spiffe://eu.cluster.local/ca-service/bundle-endpoint"),
                                   roots=poller.authenticating_bundle)
    poller.restore()
    assert await poller.refresh_once(), poller.last_error
    # A second, newer good bundle so that "lower sequence" has something to go below.
    eu.rotate_root_publish()
    rogue.body = eu.authority.bundle().to_json()
    assert await poller.refresh_once(), poller.last_error
    good = us.trust.bundle(eu.td)
    assert good is not None and good.sequence == 2
    yield Setup(us, eu, rogue, poller, good)
    await rogue.stop()
    await us.stop()
    await eu.stop()


class _Unset:
    description = "unset"

    async def fetch(self, current: TrustBundle | None) -> TrustBundle:
        raise AssertionError("replaced in the fixture")

    def has_changed(self) -> bool:
        return False


async def assert_rejected(s: Setup, reason: str) -> None:
    before = s.us.failures(s.eu.td, reason)
    assert not await s.poller.refresh_once()
    assert s.us.failures(s.eu.td, reason) == before + 1, s.poller.last_error
    assert s.us.trust.bundle(s.eu.td) == s.good
    saved = LastGoodStore(s.poller._last_good.directory).load(s.eu.td)
    assert saved is not None and saved.bundle.fingerprints() == s.good.fingerprints()


async def assert_rejected_from(s: Setup, chain: tuple[x509.Certificate, ...], key: PrivateKey, served: Authority,
                               reason: str) -> None:
    """One refresh from another (hostile) endpoint presenting ``chain``/``key`` and serving ``served``'s
    bundle with a higher sequence, so only the endpoint's identity can make the poller refuse it."""
    endpoint = RogueEndpoint(chain, key, replace_sequence(served.bundle().to_json(), 50))
    await endpoint.start()
    try:
        s.poller.source.url = endpoint.url  # type: ignore[attr-defined]
        await assert_rejected(s, reason)
    finally:
        await endpoint.stop()


async def test_if_the_body_is_not_json_it_is_rejected_and_the_old_bundle_kept(setup: Setup):
    setup.rogue.body = b"{not json"
    await assert_rejected(setup, policy.UNPARSABLE)


async def test_if_the_body_is_pem_instead_of_spiffe_json_it_is_rejected(setup: Setup):
    setup.rogue.body = setup.eu.authority.bundle().to_pem()
    await assert_rejected(setup, policy.UNPARSABLE)


async def test_if_a_key_holds_a_leaf_instead_of_a_ca_it_is_rejected(setup: Setup):
    leaf = setup.rogue.chain[0]
    doc = json.loads(setup.eu.authority.bundle().to_json())
    doc["spiffe_sequence"] = 99
    doc["keys"][0]["x5c"] = [base64.b64encode(leaf.public_bytes(Encoding.DER)).decode()]
    setup.rogue.body = json.dumps(doc).encode()
    await assert_rejected(setup, policy.NOT_CA)


async def test_if_the_sequence_goes_backwards_it_is_rejected(setup: Setup):
    setup.rogue.body = replace_sequence(setup.eu.authority.bundle().to_json(), 1)
    await assert_rejected(setup, policy.SEQUENCE)


async def test_if_the_bundle_holds_another_trust_domains_root_it_is_rejected(setup: Setup):
    other = Authority(DirectoryStore(setup.us.data_dir.parent / "evil" / "state"), TrustDomain("evil.example"),
                      CASettings(), setup.us.clock)
    other.load_or_bootstrap()
    setup.rogue.body = replace_sequence(other.bundle().to_json(), 50)
    await assert_rejected(setup, policy.WRONG_DOMAIN)


async def test_if_the_endpoint_presents_an_svid_of_another_trust_domain_it_is_rejected(setup: Setup):
    other = Authority(DirectoryStore(setup.us.data_dir.parent / "evil" / "state"), TrustDomain("evil.example"),
                      CASettings(), setup.us.clock)
    other.load_or_bootstrap()
    chain, key = svid_of(other, "/ca-service/bundle-endpoint")
    await assert_rejected_from(setup, chain, key, other, policy.WRONG_DOMAIN)


async def test_if_the_endpoint_presents_another_spiffe_id_of_the_peer_it_is_rejected(setup: Setup):
    chain, key = svid_of(setup.eu.authority, "/ns/default/sa/impostor")
    await assert_rejected_from(setup, chain, key, setup.eu.authority, policy.ENDPOINT_ID)


async def test_if_the_endpoint_svid_is_signed_by_an_unknown_ca_with_the_right_id_it_is_rejected(setup: Setup,
                                                                                                 tmp_path: Path):
    # A forged eu: same trust domain name, its own CA, the right endpoint ID.
    forged = Authority(DirectoryStore(tmp_path / "forged" / "state"), setup.eu.td, CASettings(), setup.us.clock)
    forged.load_or_bootstrap()
    chain, key = svid_of(forged, "/ca-service/bundle-endpoint")
    await assert_rejected_from(setup, chain, key, forged, policy.TLS)


async def test_if_the_endpoint_answers_an_http_error_it_is_rejected(setup: Setup):
    setup.rogue.status = 500
    await assert_rejected(setup, policy.HTTP_STATUS)


def test_a_pem_bootstrap_bundle_is_accepted(tmp_path: Path, authority: Authority):
    bundle = policy.load_bootstrap(cert_to_pem(authority.state.roots[0]), authority.trust_domain)
    assert bundle.roots == authority.state.roots
