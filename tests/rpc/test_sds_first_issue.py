"""A stream's first SVID is signed off the event loop: on the signing pool, batched per loop turn, shared by a
node's concurrent streams, in process only while the pool is cold or broken; and a change that lands while it
is signed still reaches the stream."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Iterator, Sequence

import grpc
import pytest
from cryptography import x509
from envoy.service.secret.v3 import sds_pb2_grpc

from ca_service.adapters.first_issue import FirstIssueSigner, PoolColdError
from ca_service.adapters.signing_pool import SigningPool
from ca_service.app import register_reactions
from ca_service.config import GrpcListener, RotationSettings
from ca_service.pki.identity import SpiffeId
from ca_service.pki.keys import private_key_to_pem
from ca_service.pki.verify import verify_svid
from ca_service.rpc.sds_listeners import SdsComponent
from ca_service.services.authority import Authority
from ca_service.services.issuer import Issuer
from ca_service.services.trust import TrustStore
from ca_service.services.workloads import BatchSigner, ChunkSink, SignedSvid, WorkloadRegistry
from ca_service.telemetry import Telemetry
from tests.clock import FakeClock
from tests.rpc.sds_fixtures import node, peer_bundle, read, request, secrets_of
from tests.waiting import wait_for

WEB = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/a")


class CountingIssuer:
    """Counts in-process signings by wrapping the real issuer's ``issue`` (the pool's workers sign elsewhere)."""

    def __init__(self, authority: Authority, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = authority.issuer.issue

        def issue(*args: object, **kwargs: object) -> object:
            self.calls += 1
            return real(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(authority.issuer, "issue", issue)


class GatedSigner:
    """A test signer (not the pool): signs with the real issuer once the test opens its gate; counts calls."""

    def __init__(self, issuer: Issuer) -> None:
        self.gate = asyncio.Event()
        self.calls = 0
        self._issuer = issuer

    async def issue_many(self, spiffe_ids: Sequence[SpiffeId], *, now: dt.datetime,
                         on_chunk: ChunkSink | None = None) -> list[SignedSvid]:
        self.calls += 1
        await self.gate.wait()
        out = []
        for spiffe_id in spiffe_ids:
            key = self._issuer.new_key()
            out.append(SignedSvid(private_key_to_pem(key), self._issuer.issue(spiffe_id, key.public_key(), now=now),
                                  0.001))
        if on_chunk is not None:
            on_chunk(0, out)
        return out


@pytest.fixture
def pool(authority: Authority) -> Iterator[SigningPool]:
    signing_pool = SigningPool(authority.issuer, workers=1)
    yield signing_pool
    signing_pool.close()


async def serve(authority: Authority, clock: FakeClock, signer: BatchSigner | None,
                ) -> AsyncIterator[tuple[SdsComponent, WorkloadRegistry, TrustStore]]:
    registry = WorkloadRegistry(authority, RotationSettings(), clock)
    trust = TrustStore(authority)
    register_reactions(authority.reactions, trust=trust)
    component = SdsComponent([GrpcListener(address="127.0.0.1:0", trust_node_metadata=True)], registry=registry,
                             trust=trust, telemetry=Telemetry(), grace=dt.timedelta(seconds=1), first_issue=signer)
    await component.start()
    try:
        yield component, registry, trust
    finally:
        await component.stop()


async def first_svid(address: str, sa: str) -> x509.Certificate:
    async with grpc.aio.insecure_channel(address) as channel:
        call = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).StreamSecrets()
        await call.write(request(["default"], n=node(sa, node_id=f"node-{sa}")))
        secret = secrets_of(await read(call))["default"]
        call.cancel()
    return x509.load_pem_x509_certificates(secret.tls_certificate.certificate_chain.inline_bytes)[0]


async def test_first_svids_of_streams_are_signed_on_a_warm_pool_not_in_the_daemon(
        authority: Authority, clock: FakeClock, pool: SigningPool, monkeypatch: pytest.MonkeyPatch) -> None:
    await asyncio.to_thread(pool.prepare, authority.issuer.signing_context())
    counting = CountingIssuer(authority, monkeypatch)
    async for component, registry, _ in serve(authority, clock, FirstIssueSigner(pool)):
        leaves = await asyncio.gather(*(first_svid(component.bound_addresses[0], f"sa-{i}") for i in range(6)))
        assert counting.calls == 0  # no key made nor leaf signed on the event loop
        for i, leaf in enumerate(leaves):
            cert = registry.get(f"node-sa-{i}", SpiffeId.parse(f"spiffe://cluster.local/ns/default/sa/sa-{i}"))
            assert cert is not None and cert.svid.leaf == leaf
            verify_svid(leaf, cert.svid.chain[1:], cert.svid.roots, now=clock.now())


async def test_a_cold_or_closed_pool_falls_back_to_signing_in_process(
        authority: Authority, clock: FakeClock, pool: SigningPool, monkeypatch: pytest.MonkeyPatch) -> None:
    counting = CountingIssuer(authority, monkeypatch)
    signer = FirstIssueSigner(pool)
    with pytest.raises(PoolColdError):
        await signer.issue_many([WEB], now=clock.now())
    async for component, _, _ in serve(authority, clock, signer):
        await first_svid(component.bound_addresses[0], "cold")
        assert counting.calls == 1  # cold: signed here rather than waiting for workers to spawn
        await asyncio.to_thread(pool.prepare, authority.issuer.signing_context())
        pool.close()  # warm, then broken under the signer's feet
        await first_svid(component.bound_addresses[0], "closed")
        assert counting.calls == 2


async def test_identities_asked_in_one_loop_turn_go_to_the_pool_as_one_batch(
        authority: Authority, clock: FakeClock, pool: SigningPool, monkeypatch: pytest.MonkeyPatch) -> None:
    await asyncio.to_thread(pool.prepare, authority.issuer.signing_context())
    batches: list[int] = []
    real = pool.issue_many

    async def counted(spiffe_ids: Sequence[SpiffeId], *, now: dt.datetime) -> list[SignedSvid]:
        batches.append(len(spiffe_ids))
        return await real(spiffe_ids, now=now)

    monkeypatch.setattr(pool, "issue_many", counted)
    ids = [SpiffeId.parse(f"spiffe://cluster.local/ns/b/sa/sa-{i}") for i in range(10)]
    signer = FirstIssueSigner(pool)
    results = await asyncio.gather(*(signer.issue_many([s], now=clock.now()) for s in ids))
    assert batches == [10]
    assert [r[0].svid.spiffe_id for r in results] == ids  # each caller gets its own identity's SVID


async def test_a_nodes_concurrent_streams_share_one_first_signing(authority: Authority, clock: FakeClock) -> None:
    registry = WorkloadRegistry(authority, RotationSettings(), clock)
    signer = GatedSigner(authority.issuer)
    waiting = [asyncio.ensure_future(registry.obtain("node-1", WEB, signer=signer)) for _ in range(3)]
    for _ in range(10):  # every waiter has run up to the gate
        await asyncio.sleep(0)
    assert signer.calls == 1 and not any(w.done() for w in waiting)
    signer.gate.set()
    certs = await asyncio.gather(*waiting)
    assert certs[0] is certs[1] is certs[2] is registry.get("node-1", WEB)
    assert await registry.obtain("node-1", WEB, signer=signer) is certs[0] and signer.calls == 1


async def test_a_trust_change_while_the_first_svid_is_signed_reaches_the_stream(
        authority: Authority, clock: FakeClock) -> None:
    signer = GatedSigner(authority.issuer)
    async for component, _, trust in serve(authority, clock, signer):
        async with grpc.aio.insecure_channel(component.bound_addresses[0]) as channel:
            call = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).StreamSecrets()
            await call.write(request(["ROOTCA", "default"], n=node("a", node_id="node-a")))
            await wait_for(lambda: signer.calls > 0, "the SVID waiting on the gate (ROOTCA resolved)")
            trust.set_peer(peer_bundle("eu.cluster.local", clock.now()))
            signer.gate.set()
            first = secrets_of(await read(call))
            assert set(first) == {"ROOTCA", "default"}
            assert not first["ROOTCA"].validation_context.HasField("custom_validator_config")  # resolved before
            pushed = secrets_of(await read(call))  # the change, not lost while the stream waited
            assert pushed["ROOTCA"].validation_context.HasField("custom_validator_config")
            call.cancel()
