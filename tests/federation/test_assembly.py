"""The example region configs load, and build_app wires the federation components."""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca_service.app import build_app
from ca_service.config import BundleEndpointSettings, BundleProfile, load_settings
from ca_service.federation.endpoint import BundleEndpoint
from ca_service.federation.files import BundleFilePublisher
from ca_service.federation.lastgood import LastGoodStore
from ca_service.federation.peers import Federation, PeerPoller
from ca_service.federation.sources import EndpointSource
from ca_service.rpc.sds_listeners import SdsComponent
from tests.clock import FakeClock
from tests.conftest import START
from tests.federation.regions import start_region

REPO = Path(__file__).resolve().parents[2]


def test_the_example_region_configs_federate_us_and_eu_on_distinct_loopback_ports(tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch):
    shutil.copytree(REPO / "config", tmp_path / "config")
    (tmp_path / "var").mkdir()
    for name in ("us", "eu"):
        (tmp_path / "var" / f"{name}-bundle.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    us = load_settings(Path("config/regions/us.yaml"), environ={})
    eu = load_settings(Path("config/regions/eu.yaml"), environ={})
    assert (us.trust_domain, eu.trust_domain) == ("us.cluster.local", "eu.cluster.local")
    assert us.federation.peers[0].trust_domain == eu.trust_domain
    assert eu.federation.peers[0].trust_domain == us.trust_domain
    assert us.federation.peers[0].endpoint_url.endswith(eu.bundle_endpoint.address.split(":")[1] + "/")
    addresses = [s.grpc[0].address for s in (us, eu)] + [s.http.address for s in (us, eu)] + [
        s.bundle_endpoint.address for s in (us, eu)]
    assert len(set(addresses)) == 6
    assert us.data_dir.resolve() != eu.data_dir.resolve()


async def test_build_app_wires_bundle_files_federation_and_the_endpoint(tmp_path: Path):
    settings = load_settings(environ={}, overrides={
        "data_dir": str(tmp_path / "d"), "trust_domain": "us.cluster.local",
        "bundle_endpoint": {"address": "127.0.0.1:0"}, "http": {"address": "127.0.0.1:0"},
        "grpc": [{"address": "127.0.0.1:0", "trust_node_metadata": True}]})
    app = build_app(settings, clock=FakeClock(START, real_sleeps=True))
    kinds = [type(c) for c in app.components]
    # Peers are restored (and bundle files written) before SDS hands out a validation context.
    federation = [k for k in kinds if k in (BundleFilePublisher, Federation, BundleEndpoint, SdsComponent)]
    assert federation == [BundleFilePublisher, Federation, BundleEndpoint, SdsComponent]
    await app.start()
    try:
        assert (settings.bundle_dir / "us.cluster.local.pem").exists()
    finally:
        await app.stop()


def _web_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed serving certificate for 127.0.0.1, standing in for a WebPKI certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bundle.example")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "web.pem", tmp_path / "web-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


async def test_an_https_web_endpoint_is_fetched_with_ordinary_tls_and_a_ca_file(tmp_path: Path):
    clock = FakeClock(START, real_sleeps=True)
    eu = await start_region("eu", tmp_path, clock)
    us = await start_region("us", tmp_path, clock)
    cert_file, key_file = _web_cert(tmp_path)
    web = BundleEndpoint(BundleEndpointSettings(address="127.0.0.1:0", profile=BundleProfile.HTTPS_WEB,
                                                cert_file=cert_file, key_file=key_file), eu.trust, eu.authority, clock)
    await web.start()
    try:
        source = EndpointSource(eu.td, web.url, clock, profile=BundleProfile.HTTPS_WEB, ca_file=cert_file)
        poller = PeerPoller(eu.td, source, us.trust, LastGoodStore(tmp_path / "lg"), us.telemetry, clock)
        assert await poller.refresh_once(), poller.last_error
        assert us.trust.bundle(eu.td).fingerprints() == eu.authority.bundle().fingerprints()  # type: ignore[union-attr]
        # Without the CA file the system store does not know the certificate: a TLS failure.
        poller.source = EndpointSource(eu.td, web.url, clock, profile=BundleProfile.HTTPS_WEB)
        assert not await poller.refresh_once()
        assert us.failures(eu.td, "tls") == 1, poller.last_error
    finally:
        await web.stop()
        await us.stop()
        await eu.stop()
