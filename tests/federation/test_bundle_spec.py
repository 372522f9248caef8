"""Our bundle endpoint's document, checked against rules written from the SPIFFE Trust Domain and Bundle
spec (section 4, "SPIFFE Bundle Format"; section 4.2.1, X.509 SVID parameters), independently of
ca_service.pki.bundle; plus the endpoint's SVID lifecycle and the static-file peer."""

from __future__ import annotations

import base64
import datetime as dt
import json
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509

from ca_service.config import BundleProfile, PeerSettings
from ca_service.federation import policy
from ca_service.federation.peers import backoff_delay
from ca_service.pki.certs import cert_to_pem, certs_to_pem, fingerprint
from tests.clock import FakeClock
from tests.conftest import START
from tests.federation.regions import Region, start_region
from tests.waiting import wait_for


def check_spiffe_bundle(doc: Any) -> list[x509.Certificate]:
    """Every rule of the spec that a document can break, as plain assertions."""
    assert isinstance(doc, dict)
    assert isinstance(doc.get("keys"), list) and doc["keys"], "keys: a non-empty array of JWKs"
    assert isinstance(doc.get("spiffe_sequence"), int) and doc["spiffe_sequence"] >= 0
    assert isinstance(doc.get("spiffe_refresh_hint"), int) and doc["spiffe_refresh_hint"] > 0
    roots = []
    for key in doc["keys"]:
        assert key["use"] == "x509-svid"
        assert "kid" not in key, "x509-svid JWKs carry no kid"
        assert key["kty"] in ("EC", "RSA")
        assert isinstance(key["x5c"], list) and len(key["x5c"]) == 1, "x5c holds exactly one certificate"
        cert = x509.load_der_x509_certificate(base64.b64decode(key["x5c"][0], validate=True))
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        roots.append(cert)
    return roots


async def fetch_raw(url: str) -> tuple[str, Any]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    async with aiohttp.ClientSession() as session, session.get(url, ssl=context) as resp:
        assert resp.status == 200
        return resp.headers["Content-Type"], json.loads(await resp.read())


@pytest.fixture
async def us(tmp_path: Path) -> Region:
    region = await start_region("us", tmp_path, FakeClock(START, real_sleeps=True))
    yield region  # type: ignore[misc]
    await region.stop()


async def test_the_endpoint_serves_a_spec_conformant_bundle_whose_sequence_grows_on_every_change(us: Region):
    content_type, doc = await fetch_raw(us.endpoint.url)
    assert content_type.startswith("application/json")
    roots = check_spiffe_bundle(doc)
    assert [fingerprint(c) for c in roots] == [fingerprint(c) for c in us.authority.state.roots]
    assert doc["spiffe_refresh_hint"] == 1  # from bundle_endpoint.refresh_hint
    sequences = [doc["spiffe_sequence"]]
    us.rotate_root_publish()
    _, doc = await fetch_raw(us.endpoint.url)
    assert len(check_spiffe_bundle(doc)) == 2
    sequences.append(doc["spiffe_sequence"])
    us.rotate_root_sign_with_new()
    _, doc = await fetch_raw(us.endpoint.url)
    assert len(check_spiffe_bundle(doc)) == 1
    sequences.append(doc["spiffe_sequence"])
    assert sequences == sorted(set(sequences)), f"spiffe_sequence must increase on every change: {sequences}"


async def test_the_endpoint_svid_is_reissued_when_the_signing_intermediate_changes(us: Region):
    first = us.endpoint.svid
    assert first is not None and str(first.spiffe_id) == "spiffe://us.cluster.local/ca-service/bundle-endpoint"
    us.rotate_root_publish()
    assert us.endpoint.svid is first  # same signer: nothing to do
    us.rotate_root_sign_with_new()
    assert us.endpoint.svid is not first and us.endpoint.svid is not None
    assert us.endpoint.svid.issuer_key_id == us.authority.signer().key_id


async def test_a_static_file_peer_is_reread_as_soon_as_the_file_changes(us: Region, tmp_path: Path):
    eu = await start_region("eu", tmp_path, us.clock)
    try:
        path = tmp_path / "eu.pem"
        path.write_bytes(eu.authority.bundle().to_pem())
        peer = PeerSettings(trust_domain="eu.cluster.local", profile=BundleProfile.STATIC, bundle_file=path,
                            refresh_hint=dt.timedelta(minutes=5))
        federation = await us.federate([peer])
        await wait_for(lambda: us.trust.bundle(eu.td) is not None)
        # The refresh hint is 5 minutes; the change must be seen by the (1 s) stat watch.
        new_root = eu.rotate_root_publish()
        path.write_bytes(eu.authority.bundle().to_pem())
        await wait_for(lambda: fingerprint(new_root) in us.trust.bundle(eu.td).fingerprints(), timeout=3)  # type: ignore[union-attr]
        assert us.trust.bundle(eu.td).sequence == 1  # type: ignore[union-attr]
        # A broken rewrite is rejected and the last good bundle kept.
        good = us.trust.bundle(eu.td)
        path.write_bytes(b"garbage")
        await wait_for(lambda: us.failures(eu.td, policy.UNPARSABLE) >= 1, timeout=3)
        assert us.trust.bundle(eu.td) == good
        # So is a leaf in place of a CA.
        leaf = eu.endpoint.svid.leaf  # type: ignore[union-attr]
        path.write_bytes(cert_to_pem(leaf))
        await wait_for(lambda: us.failures(eu.td, policy.NOT_CA) >= 1, timeout=3)
        assert us.trust.bundle(eu.td) == good
        # And SPIFFE JSON works as well as PEM.
        path.write_bytes(eu.authority.bundle().to_json())
        await wait_for(lambda: federation.poller(eu.td).failures == 0, timeout=3)
        assert us.trust.bundle(eu.td).fingerprints() == eu.authority.bundle().fingerprints()  # type: ignore[union-attr]
        assert certs_to_pem(eu.authority.state.roots) in (us.data_dir / "bundles" / "combined-ca.pem").read_bytes()
    finally:
        await eu.stop()


def test_backoff_doubles_from_one_second_up_to_the_refresh_interval_with_jitter():
    cap = dt.timedelta(seconds=30)
    delays = [backoff_delay(n, cap) for n in range(1, 10)]
    assert dt.timedelta(seconds=0.5) <= delays[0] <= dt.timedelta(seconds=1)
    assert dt.timedelta(seconds=4) <= delays[3] <= dt.timedelta(seconds=8)
    assert all(d <= cap for d in delays)
    assert delays[-1] >= cap / 2
