"""End to end, two regions: daemons ``us`` and ``eu`` (``build_app``) federate through their bundle
endpoints on loopback, and a real Envoy in each region gets its SVID and validation context over SDS.

* ``eu``'s Envoy calls ``us``'s Envoy (mTLS, a fresh handshake per request) with its eu SVID;
* Python TLS clients stand in for an unknown trust domain, an impostor ``eu`` CA and a client without a
  certificate (and, as the control that makes those rejections mean something, a genuine eu SVID);
* ``eu`` rotates its root while ``eu`` -> ``us`` requests run every 50 ms.

The daemons run on the system clock (Envoy checks validity against real time).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from ca_service.app import App, build_app, build_authority
from ca_service.clock import SystemClock
from ca_service.config import CASettings, Settings, load_settings
from ca_service.federation.endpoint import BundleEndpoint
from ca_service.pki.certs import certs_to_pem, fingerprint
from ca_service.pki.identity import SpiffeId, TrustDomain
from ca_service.pki.keys import generate_private_key, private_key_to_pem
from ca_service.pki.templates import CAKind
from ca_service.rotation.state import AuthorityState, SlotState
from ca_service.services.authority import Authority
from ca_service.services.ports import RotationRequest, RotationScope
from ca_service.storage.directory import DirectoryStore
from tests.envoy_harness import (
    PEER_SERIAL_HEADER,
    PEER_URI_SAN_HEADER,
    SERVER_LISTENER,
    ClientListener,
    EnvoyConfig,
    EnvoyProcess,
    HttpResult,
    NodeIdentity,
    SdsServer,
    ServerListener,
    free_port,
    http_get,
)
from tests.waiting import wait_for

pytestmark = pytest.mark.envoy

US = TrustDomain("us.cluster.local")
EU = TrustDomain("eu.cluster.local")
US_NODE = NodeIdentity(service_account="frontend", trust_domain=US.name)
EU_NODE = NodeIdentity(service_account="checkout", trust_domain=EU.name)
SPIFFE_VALIDATOR = "envoy.tls.cert_validator.spiffe"
REQUEST_INTERVAL = 0.05  # the issue's "cross-region requests sent every 50 ms"

# How fast us re-polls eu's bundle endpoint (overrides eu's own hint).
US_REFRESH_OF_EU = "500ms"
# eu's root rotation: B is published, and eu signs with B only after its ACK gate opens.  That gate sees
# only eu's own SDS streams: there is NO cross-region ACK gate (eu cannot know whether us has fetched B).
# What keeps us safe is time: the minimum propagation (3 s) is several of us's refresh intervals
# (0.5 s) plus an SDS push, so us has fetched B and pushed it to its Envoy before eu signs with B.  In
# production the same rule applies: rotation.root_min_propagation must exceed every peer's refresh hint.
EU_ROTATION = {"root_min_propagation": "3s", "tick_interval": "200ms", "root_ack_timeout": "30s"}


def region_settings(td: TrustDomain, tmp_path: Path, *, bundle_port: int = 0, peer: dict[str, Any] | None = None,
                    rotation: dict[str, Any] | None = None) -> Settings:
    name = td.name.split(".")[0]
    overrides: dict[str, Any] = {
        "data_dir": str(tmp_path / name), "trust_domain": td.name,
        "grpc": [{"address": "127.0.0.1:0", "trust_node_metadata": True}],
        "http": {"address": "127.0.0.1:0"},
        "bundle_endpoint": {"address": f"127.0.0.1:{bundle_port}"},
        "federation": {"peers": [peer] if peer else []},
    }
    if rotation:
        overrides["rotation"] = rotation
    return load_settings(environ={}, overrides=overrides)


def bootstrap_file(settings: Settings, tmp_path: Path) -> Path:
    """Create the region's CA (``ca-service init``) and export its bundle (``ca-service bundle --format
    spiffe``): the file carried to the other region out of band."""
    authority = build_authority(settings)
    authority.load_or_bootstrap()
    path = tmp_path / f"{settings.trust_domain}-bundle.json"
    path.write_bytes(authority.bundle().to_json())
    return path


def peer(td: TrustDomain, url: str, bootstrap: Path, refresh: str) -> dict[str, Any]:
    return {"trust_domain": td.name, "profile": "https_spiffe", "endpoint_url": url,
            "endpoint_spiffe_id": f"spiffe://{td.name}/ca-service/bundle-endpoint",
            "bootstrap_bundle": str(bootstrap), "refresh_hint": refresh}


def endpoint_of(app: App) -> BundleEndpoint:
    return next(c for c in app.components if isinstance(c, BundleEndpoint))


def sds_of(app: App) -> SdsServer:
    assert app.sds is not None
    return SdsServer.tcp(int(app.sds.bound_addresses[0].rsplit(":", 1)[1]))


# Real processes: a longer bound than the suite's default.
wait_until = functools.partial(wait_for, timeout=20.0)


async def wait_until_async(probe: Callable[[], Awaitable[Any]], check: Callable[[Any], bool], what: str,
                           timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check(value := await probe()):
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s, last {value!r}")
        await asyncio.sleep(0.1)


@dataclass
class Regions:
    us: App
    eu: App
    envoy_us: EnvoyProcess  # serves mTLS (validation secret ROOTCA)
    envoy_eu: EnvoyProcess  # calls envoy_us through client listener "to-us"
    tmp_path: Path

    def eu_serial(self) -> int:
        cert = self.eu.registry.get(EU_NODE.id, SpiffeId.parse(EU_NODE.spiffe_id))
        assert cert is not None, "eu issued no SVID to its Envoy"
        return int(cert.svid.leaf.serial_number)


async def validator_roots(envoy: EnvoyProcess, secret: str = "ROOTCA") -> dict[str, frozenset[bytes]]:
    """The SPIFFE validator of ``secret`` as Envoy holds it: trust domain -> root fingerprints."""
    active = await envoy.active_secrets()
    if secret not in active:
        return {}
    context = active[secret]["secret"]["validation_context"]
    if "custom_validator_config" not in context:
        return {"<trusted_ca only>": frozenset()}
    validator = context["custom_validator_config"]
    assert validator["name"] == SPIFFE_VALIDATOR
    result: dict[str, frozenset[bytes]] = {}
    for entry in validator["typed_config"]["trust_domains"]:
        assert entry["name"] not in result, f"trust domain {entry['name']} listed twice"
        pem = base64.b64decode(entry["trust_bundle"]["inline_bytes"])
        result[entry["name"]] = frozenset(fingerprint(c) for c in x509.load_pem_x509_certificates(pem))
    return result


async def served_leaf_serial(envoy: EnvoyProcess) -> int | None:
    for chain in await envoy.certificate_chains():
        for cert in chain:
            if cert.is_inline and cert.uri_sans:
                return cert.serial
    return None


@pytest.fixture
async def regions(tmp_path: Path) -> AsyncIterator[Regions]:
    # Port 0 everywhere except us's bundle endpoint: eu must be configured with it before us starts
    # (and us with eu's, known only once eu has started).  eu retries until us is up.
    us_endpoint_port = free_port()
    us_bootstrap = bootstrap_file(region_settings(US, tmp_path), tmp_path)
    eu_bootstrap = bootstrap_file(region_settings(EU, tmp_path), tmp_path)

    eu = build_app(region_settings(
        EU, tmp_path, rotation=EU_ROTATION,
        peer=peer(US, f"https://127.0.0.1:{us_endpoint_port}/", us_bootstrap, "500ms")))
    await eu.start()
    stops: list[Any] = [eu.stop]
    try:
        us = build_app(region_settings(
            US, tmp_path, bundle_port=us_endpoint_port,
            peer=peer(EU, endpoint_of(eu).url, eu_bootstrap, US_REFRESH_OF_EU)))
        await us.start()
        stops.append(us.stop)
        await wait_until(lambda: EU in us.trust.peers(), what="us fetched eu's bundle")
        await wait_until(lambda: US in eu.trust.peers(), what="eu fetched us's bundle")

        envoy_us = EnvoyProcess(EnvoyConfig(US_NODE, sds_of(us), server_listener=ServerListener()),
                                tmp_path / "envoy-us")
        await envoy_us.start()
        stops.append(envoy_us.stop)
        await envoy_us.wait_for_certificate(uri_san=US_NODE.spiffe_id)
        to_us = ClientListener("to-us", await envoy_us.server_port(), peer_spiffe_ids=(US_NODE.spiffe_id,))
        envoy_eu = EnvoyProcess(EnvoyConfig(EU_NODE, sds_of(eu), client_listeners=(to_us,)), tmp_path / "envoy-eu")
        await envoy_eu.start()
        stops.append(envoy_eu.stop)
        await envoy_eu.wait_for_certificate(uri_san=EU_NODE.spiffe_id)
        yield Regions(us, eu, envoy_us, envoy_eu, tmp_path)
    finally:
        for stop in reversed(stops):
            await stop()


# ---------------------------------------------------------------- Python TLS clients


def write_identity(tmp_path: Path, name: str, chain: tuple[x509.Certificate, ...], key: Any) -> tuple[Path, Path]:
    cert_file, key_file = tmp_path / f"{name}-cert.pem", tmp_path / f"{name}-key.pem"
    cert_file.write_bytes(certs_to_pem(chain))
    key_file.write_bytes(private_key_to_pem(key))
    return cert_file, key_file


def svid_from(authority: Authority, path: str) -> tuple[tuple[x509.Certificate, ...], Any]:
    key = generate_private_key()
    svid = authority.issue_svid(SpiffeId(authority.trust_domain, path), key.public_key())
    return svid.chain, key


async def tls_get(port: int, server_roots: Path, identity: tuple[Path, Path] | None) -> str:
    """One HTTPS GET to Envoy's mTLS listener; returns the status line or why it failed.

    With TLS 1.3 the server checks the client certificate after the client's handshake is done, so a
    rejection shows up on the first read (an alert or a reset), not in ``open_connection``.
    """
    context = ssl.create_default_context(cafile=str(server_roots))
    context.check_hostname = False  # an SVID has a URI SAN only; the chain is still verified
    if identity is not None:
        context.load_cert_chain(str(identity[0]), str(identity[1]))
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
            try:
                writer.write(b"GET / HTTP/1.1\r\nHost: us\r\nConnection: close\r\n\r\n")
                await writer.drain()
                data = await reader.read()
            finally:
                writer.close()
    except (OSError, ssl.SSLError, EOFError, TimeoutError) as exc:
        return f"failed: {exc!r}"
    return data.split(b"\r\n", 1)[0].decode(errors="replace") or "failed: empty response"


async def expect_rejection(envoy: EnvoyProcess, request: Awaitable[str], reason: str) -> None:
    """The request fails, and Envoy's server listener counts it under ``ssl.<reason>`` (the client may
    see the TLS alert or only a broken pipe, depending on when the server closes)."""
    stat = f"listener.{SERVER_LISTENER}.ssl.{reason}"
    before = await envoy.stat(stat) or 0
    outcome = await request
    assert outcome.startswith("failed"), outcome
    await envoy.wait_for_stat(stat, lambda v: v == before + 1, timeout=5)


# ---------------------------------------------------------------- (a) federation through the real Envoy


async def test_us_envoy_accepts_eu_workloads_and_nothing_else_with_one_validator_entry_per_domain(
        regions: Regions) -> None:
    us, eu, envoy_us = regions.us, regions.eu, regions.envoy_us
    tmp = regions.tmp_path

    # The us Envoy's validation context: the SPIFFE validator, us and eu as separate entries, each holding
    # exactly that domain's roots (the ones eu serves at its bundle endpoint, not a merged PEM).
    expected = {US.name: us.authority.bundle().fingerprints(), EU.name: eu.authority.bundle().fingerprints()}
    await wait_until_async(lambda: validator_roots(envoy_us), lambda v: v == expected, "us Envoy validator")
    assert await validator_roots(envoy_us) == expected

    # An eu workload's Envoy, with its eu SVID, through us's Envoy.
    response = await http_get(await regions.envoy_eu.client_url("to-us"))
    assert response.status == 200, await regions.envoy_eu.diagnostics()
    assert response.headers[PEER_URI_SAN_HEADER] == EU_NODE.spiffe_id
    assert int(response.headers[PEER_SERIAL_HEADER], 16) == regions.eu_serial()

    port = await envoy_us.server_port()
    us_roots = tmp / "us-roots.pem"
    us_roots.write_bytes(us.authority.bundle().to_pem())
    # Control for the Python client: a genuine eu SVID (from eu's own Authority) is accepted ...
    eu_identity = write_identity(tmp, "eu-batch", *svid_from(eu.authority, "/ns/batch/sa/report"))
    assert (await tls_get(port, us_roots, eu_identity)).startswith("HTTP/1.1 200"), await envoy_us.diagnostics()
    # ... a third CA, for a trust domain nobody federates with, is not ...
    unknown = Authority(DirectoryStore(tmp / "unknown" / "state"), TrustDomain("unknown.cluster.local"),
                        CASettings(), SystemClock())
    unknown.load_or_bootstrap()
    unknown_identity = write_identity(tmp, "unknown", *svid_from(unknown, "/ns/default/sa/intruder"))
    await expect_rejection(envoy_us, tls_get(port, us_roots, unknown_identity), "fail_verify_error")
    # ... nor a third CA that claims eu's trust domain (eu's entry holds eu's roots only) ...
    impostor = Authority(DirectoryStore(tmp / "impostor" / "state"), EU, CASettings(), SystemClock())
    impostor.load_or_bootstrap()
    impostor_identity = write_identity(tmp, "impostor", *svid_from(impostor, "/ns/batch/sa/report"))
    await expect_rejection(envoy_us, tls_get(port, us_roots, impostor_identity), "fail_verify_error")
    # ... nor a client without a certificate.
    await expect_rejection(envoy_us, tls_get(port, us_roots, None), "fail_verify_no_cert")
    # The control once more after the rejections: Envoy is still serving.
    assert (await tls_get(port, us_roots, eu_identity)).startswith("HTTP/1.1 200")


# ---------------------------------------------------------------- (b) eu rotates its root


def signing_root_is_trusted_by(us: App, state: AuthorityState) -> bool:
    """Whether us's TrustStore holds the root that eu's signing intermediate in ``state`` chains to."""
    signer = state.active(CAKind.INTERMEDIATE).cert
    bundle = us.trust.bundle(EU)
    if bundle is None:
        return False
    for root in bundle.roots:
        try:
            signer.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):  # another root
            continue
        return True
    return False


async def run_traffic(url: str, done: asyncio.Event, results: list[HttpResult | BaseException]) -> None:
    while not done.is_set():
        try:
            results.append(await http_get(url, timeout=5))
        except (OSError, TimeoutError) as exc:  # recorded: a failed request fails the test
            results.append(exc)
        await asyncio.sleep(REQUEST_INTERVAL)


async def test_an_eu_root_rotation_is_trusted_by_us_before_eu_signs_with_it_and_no_request_fails(
        regions: Regions) -> None:
    us, eu, envoy_us, envoy_eu = regions.us, regions.eu, regions.envoy_us, regions.envoy_eu
    assert eu.rotator is not None
    root_a = eu.authority.state.active(CAKind.ROOT).cert
    old_serial = regions.eu_serial()
    assert await served_leaf_serial(envoy_eu) == old_serial

    # At the commit where eu starts signing under a new root, is that root already in us's TrustStore?
    signer_a = fingerprint(eu.authority.state.active(CAKind.INTERMEDIATE).cert)
    at_switch: list[bool] = []

    def on_commit(old: AuthorityState, new: AuthorityState) -> None:
        if not at_switch and fingerprint(new.active(CAKind.INTERMEDIATE).cert) != signer_a:
            at_switch.append(signing_root_is_trusted_by(us, new))

    unsubscribe = eu.authority.subscribe(on_commit)
    done, results = asyncio.Event(), []  # type: ignore[var-annotated]
    traffic = asyncio.create_task(run_traffic(await envoy_eu.client_url("to-us"), done, results))
    # Iteration numbers of the first observation (us Envoy validator first, then eu Envoy's leaf).
    us_envoy_trusts_b: int | None = None
    eu_serves_under_b: int | None = None
    try:
        await wait_until(lambda: len(results) >= 5, what="traffic before the rotation")
        await eu.rotator.rotate(RotationRequest(scope=RotationScope.ROOT, reason="drill", caller="test"))
        (prepared,) = eu.authority.state.of_kind(CAKind.ROOT, SlotState.PREPARED)
        root_b = prepared.cert
        assert fingerprint(root_b) != fingerprint(root_a)
        async with asyncio.timeout(30):
            iteration = 0
            while eu_serves_under_b is None:
                iteration += 1
                eu_roots_at_us = (await validator_roots(envoy_us)).get(EU.name, frozenset())
                if us_envoy_trusts_b is None and fingerprint(root_b) in eu_roots_at_us:
                    us_envoy_trusts_b = iteration
                serial = await served_leaf_serial(envoy_eu)
                if serial is not None and serial != old_serial:
                    eu_serves_under_b = iteration
                await asyncio.sleep(REQUEST_INTERVAL)
            switched_at = len(results)
            await wait_until(lambda: len(results) >= switched_at + 10, what="traffic after the rotation")
    finally:
        done.set()
        await traffic
        unsubscribe()

    # us trusted B before eu signed with it: in us's TrustStore at eu's switch commit, and in us's Envoy
    # at an observation strictly before the first one where eu's Envoy presented a leaf under B.
    assert at_switch == [True]
    assert us_envoy_trusts_b is not None and us_envoy_trusts_b < eu_serves_under_b
    # eu's new leaf really is under B (through an intermediate signed by B) and is the one Envoy serves.
    cert = eu.registry.get(EU_NODE.id, SpiffeId.parse(EU_NODE.spiffe_id))
    assert cert is not None and int(cert.svid.leaf.serial_number) != old_serial
    cert.svid.chain[-1].verify_directly_issued_by(root_b)
    assert await served_leaf_serial(envoy_eu) == regions.eu_serial()
    # Every cross-region request across the rotation succeeded, and the last ones carried the new leaf.
    failures = [r for r in results if not isinstance(r, HttpResult) or r.status != 200]
    assert not failures, (failures[:5], await envoy_us.diagnostics())
    last = results[-1]
    assert isinstance(last, HttpResult)
    assert int(last.headers[PEER_SERIAL_HEADER], 16) == regions.eu_serial()
    hint = us.settings.federation.peers[0].refresh_hint
    assert hint is not None and hint < eu.settings.rotation.root_min_propagation  # the premise above
