"""Serving certificates renew at half-life on the injected clock, for each of the three TLS servers."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509

from ca_service.config import BundleEndpointSettings, GrpcListener, RotationSettings, Settings, TLSSettings
from ca_service.errors import PolicyViolationError
from ca_service.federation.endpoint import BundleEndpoint
from ca_service.pki.identity import SpiffeId
from ca_service.pki.templates import CAKind
from ca_service.pki.verify import verify_svid
from ca_service.rotation.planner import RotationPolicy
from ca_service.rotation.transitions import force_intermediate
from ca_service.rpc.sds_listeners import SdsComponent
from ca_service.services.authority import Authority
from ca_service.services.serving import ServingCertificate, ServingPair
from ca_service.services.state_changes import ChangeCause, StateChange
from ca_service.services.trust import TrustStore
from ca_service.services.workloads import WorkloadRegistry
from ca_service.telemetry import Telemetry
from ca_service.web.tls import SideportTls
from tests.clock import FakeClock

ID = SpiffeId.parse("spiffe://cluster.local/ca-service/test")


def serving_of(authority: Authority, clock: FakeClock, installed: list[ServingPair]) -> ServingCertificate:
    return ServingCertificate(authority.issuer, ID, clock, installed.append, dns_names=["ca.example.svc"])


async def test_the_certificate_is_renewed_at_half_its_lifetime_and_not_before(authority: Authority,
                                                                              clock: FakeClock):
    installed: list[ServingPair] = []
    serving = serving_of(authority, clock, installed)
    serving.start_renewal()
    try:
        await clock.settle(1)
        assert len(installed) == 1
        half = serving.renew_at() - clock.now()
        clock.advance(half - dt.timedelta(seconds=1))
        await clock.settle(1)
        assert len(installed) == 1
        clock.advance(dt.timedelta(seconds=1))
        await clock.settle(1)
        assert len(installed) == 2
        assert installed[1].svid.leaf.serial_number != installed[0].svid.leaf.serial_number
    finally:
        await serving.stop()


async def test_a_failed_renewal_keeps_the_current_pair_and_retries_a_minute_later(authority: Authority,
                                                                                 clock: FakeClock):
    installed: list[ServingPair] = []
    failing = [True]

    def install(pair: ServingPair) -> None:
        if len(installed) >= 1 and failing[0]:
            raise OSError("cannot load the pair")
        installed.append(pair)

    serving = ServingCertificate(authority.issuer, ID, clock, install)
    serving.start_renewal()
    try:
        first = serving.current
        clock.set(serving.renew_at())
        await clock.settle(1)
        assert serving.current is first and len(installed) == 1
        failing[0] = False
        clock.advance(dt.timedelta(minutes=1))
        await clock.settle(1)
        assert len(installed) == 2 and serving.current is installed[1]
    finally:
        await serving.stop()


def test_a_new_signing_intermediate_reissues_the_certificate_and_the_same_one_does_not(
        authority: Authority, clock: FakeClock, settings: Settings):
    installed: list[ServingPair] = []
    serving = serving_of(authority, clock, installed)
    serving.issue()
    same = StateChange(authority.state, authority.state, ChangeCause.COMMITTED)
    serving.on_state_change(same)
    assert len(installed) == 1
    old = authority.state
    policy = RotationPolicy.from_settings(settings)
    new = authority.commit(force_intermediate(old, CAKind.INTERMEDIATE, clock.now(), policy))
    serving.on_state_change(StateChange(old, new, ChangeCause.REPLICATED))
    assert len(installed) == 2
    assert installed[1].svid.issuer_key_id == new.active(CAKind.INTERMEDIATE).key_id


def test_a_serving_certificate_names_its_dns_names_next_to_its_spiffe_id_and_verifies(authority: Authority,
                                                                                     clock: FakeClock):
    pair = serving_of(authority, clock, []).issue()
    san = pair.svid.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["ca.example.svc"]
    assert verify_svid(pair.svid.leaf, pair.svid.chain[1:], pair.svid.roots, now=clock.now()) == ID


def test_the_issuer_refuses_an_identity_of_another_trust_domain_as_a_policy_violation(authority: Authority,
                                                                                     clock: FakeClock):
    key = authority.issuer.new_key()
    with pytest.raises(PolicyViolationError, match="signs only for"):
        authority.issuer.issue(SpiffeId.parse("spiffe://evil.example/x"), key.public_key(), now=clock.now())


async def test_the_bundle_endpoint_renews_its_svid_on_the_fake_clock(authority: Authority, clock: FakeClock):
    endpoint = BundleEndpoint(BundleEndpointSettings(address="127.0.0.1:0"), TrustStore(authority), authority, clock)
    await endpoint.start()
    try:
        first = endpoint.svid
        await clock.settle(1)
        clock.set(endpoint.renew_at())
        await clock.settle(1)
        assert endpoint.svid is not first and endpoint.svid is not None
    finally:
        await endpoint.stop()


async def test_the_sideport_renews_its_serving_certificate_on_the_fake_clock(authority: Authority,
                                                                             clock: FakeClock):
    tls = SideportTls(TLSSettings(enabled=True), authority)
    tls.context()
    tls.start_renewal()
    try:
        assert tls.serving is not None
        first = tls.serving.current
        await clock.settle(1)
        clock.set(tls.serving.renew_at())
        await clock.settle(1)
        assert tls.serving.current is not first
    finally:
        await tls.stop()


async def test_the_sds_tls_listener_renews_its_serving_certificate_on_the_fake_clock(authority: Authority,
                                                                                     clock: FakeClock,
                                                                                     tmp_path: Path):
    registry = WorkloadRegistry(authority, RotationSettings(), clock)
    component = SdsComponent([GrpcListener(address="127.0.0.1:0", tls=TLSSettings(enabled=True))],
                             registry=registry, trust=TrustStore(authority), telemetry=Telemetry(),
                             grace=dt.timedelta(seconds=0))
    await component.start()
    try:
        [serving] = component.serving
        first = serving.current
        await clock.settle(1)
        clock.set(serving.renew_at())
        await clock.settle(1)
        assert serving.current is not first
    finally:
        await component.stop()
