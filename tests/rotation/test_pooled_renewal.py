"""Renewal storms are signed on the real signing pool; any pool failure falls back to signing in process.

Every test here uses a real :class:`SigningPool` (spawned worker processes).  ``RecordingSigner`` only
wraps it to count the batches it receives; the SVIDs are the pool's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from envoy.service.secret.v3 import sds_pb2_grpc
from rotation_kit import Env, metric

from ca_service.adapters.signing_pool import SigningPool, SigningPoolComponent, SigningPoolError
from ca_service.app import build_app, register_reactions
from ca_service.config import load_settings
from ca_service.pki.identity import SpiffeId
from ca_service.pki.keys import load_private_key, public_key_der
from ca_service.pki.templates import CAKind
from ca_service.pki.verify import verify_svid
from ca_service.services.ports import RotationRequest, RotationScope
from ca_service.services.reconciler import POOL_MIN_BATCH
from ca_service.services.rotator import RotationService
from ca_service.services.workloads import ChunkSink, SignedSvid, WorkloadCert
from tests.rpc.sds_fixtures import node, peer_bundle, read, request, secrets_of
from tests.waiting import wait_for


class RecordingSigner:
    """Delegates every batch to the real pool and records its size; ``before`` runs first (to interfere)."""

    def __init__(self, pool: SigningPool, before: Callable[[], None] | None = None) -> None:
        self.pool = pool
        self.batches: list[int] = []
        self._before = before

    async def issue_many(self, spiffe_ids: Sequence[SpiffeId], *, now: dt.datetime,
                         on_chunk: ChunkSink | None = None) -> list[SignedSvid]:
        self.batches.append(len(spiffe_ids))
        if self._before is not None:
            self._before()
        return await self.pool.issue_many(spiffe_ids, now=now, on_chunk=on_chunk)


@pytest.fixture
def pool(env: Env) -> Iterator[SigningPool]:
    signing_pool = SigningPool(env.authority.issuer, workers=2)
    yield signing_pool
    signing_pool.close()


def fleet(env: Env, n: int, prefix: str = "storm") -> list[WorkloadCert]:
    return [env.registry.get_or_issue(f"{prefix}-node-{i}", SpiffeId.parse(f"spiffe://cluster.local/ns/{prefix}/sa/s{i}"))
            for i in range(n)]


def assert_renewed(env: Env, before: list[WorkloadCert]) -> list[WorkloadCert]:
    after = []
    for old in before:
        new = env.registry.get(old.node_id, old.spiffe_id)
        assert new is not None and new.generation == old.generation + 1
        assert new.svid.leaf.serial_number != old.svid.leaf.serial_number
        verify_svid(new.svid.leaf, new.svid.chain[1:], new.svid.roots, now=env.clock.now())
        assert public_key_der(load_private_key(new.key_pem).public_key()) == public_key_der(new.svid.leaf.public_key())
        after.append(new)
    return after


async def test_a_renewal_storm_is_signed_on_the_pool_and_every_new_svid_verifies(env: Env, pool: SigningPool) -> None:
    certs = fleet(env, POOL_MIN_BATCH + 4)
    signer = RecordingSigner(pool)
    env.reconciler.signer = signer
    env.clock.set(max(c.renew_at for c in certs))
    report = await env.reconciler.reconcile()
    assert signer.batches == [len(certs)]
    assert report.renewed == len(certs)
    assert_renewed(env, certs)
    assert metric(env.telemetry, "ca_rotations_total", kind="workload", reason="scheduled") == len(certs)
    # Issued first in process, then on the pool: both are counted and timed.
    assert metric(env.telemetry, "ca_certificates_issued_total", kind="workload",
                  trust_domain="cluster.local") == 2 * len(certs)
    assert metric(env.telemetry, "ca_signing_duration_seconds_count") == 2 * len(certs)
    assert metric(env.telemetry, "ca_signing_duration_seconds_sum") > 0


async def test_a_storm_installs_each_chunk_as_soon_as_it_is_signed(env: Env) -> None:
    chunked = SigningPool(env.authority.issuer, workers=2, chunk=4)
    events: list[str] = []

    class Watching(RecordingSigner):
        async def issue_many(self, spiffe_ids: Sequence[SpiffeId], *, now: dt.datetime,
                             on_chunk: ChunkSink | None = None) -> list[SignedSvid]:
            assert on_chunk is not None

            def seen(start: int, chunk: Sequence[SignedSvid]) -> None:
                events.append(f"chunk@{start}")
                on_chunk(start, chunk)

            return await self.pool.issue_many(spiffe_ids, now=now, on_chunk=seen)

    try:
        certs = fleet(env, POOL_MIN_BATCH)
        env.registry.subscribe(lambda cert: events.append("install"))
        env.reconciler.signer = Watching(chunked)
        env.clock.set(max(c.renew_at for c in certs))
        assert (await env.reconciler.reconcile()).renewed == len(certs)
    finally:
        chunked.close()
    assert_renewed(env, certs)
    # Several chunks, each followed by its own installs before the next chunk is handed over: the first
    # pushes of a storm do not wait for its last signature.
    chunks = [e for e in events if e.startswith("chunk@")]
    assert len(chunks) > 1
    size = len(certs) // len(chunks)
    assert sorted(int(c.removeprefix("chunk@")) for c in chunks) == list(range(0, len(certs), size))
    assert events == [e for c in chunks for e in (c, *["install"] * size)]


async def test_a_pool_that_dies_mid_storm_keeps_what_it_installed_and_signs_only_the_rest_in_process(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    chunked = SigningPool(env.authority.issuer, workers=2, chunk=1)
    before = set(multiprocessing.active_children())
    chunked.warm_up()
    workers = set(multiprocessing.active_children()) - before
    installed_after_failure: list[WorkloadCert] = []
    failed = False

    def kill_workers() -> None:
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid or 0, signal.SIGKILL)

    class KillAfterFirstChunk(RecordingSigner):
        async def issue_many(self, spiffe_ids: Sequence[SpiffeId], *, now: dt.datetime,
                             on_chunk: ChunkSink | None = None) -> list[SignedSvid]:
            nonlocal failed
            assert on_chunk is not None
            chunks = 0

            def first_then_kill(start: int, chunk: Sequence[SignedSvid]) -> None:
                nonlocal chunks
                chunks += 1
                on_chunk(start, chunk)
                if chunks == 1:
                    kill_workers()

            try:
                return await self.pool.issue_many(spiffe_ids, now=now, on_chunk=first_then_kill)
            except SigningPoolError:
                failed = True
                raise

    try:
        certs = fleet(env, POOL_MIN_BATCH * 2)
        env.registry.subscribe(lambda cert: installed_after_failure.append(cert) if failed else None)
        env.reconciler.signer = KillAfterFirstChunk(chunked)
        env.clock.set(max(c.renew_at for c in certs))
        assert (await env.reconciler.reconcile()).renewed == len(certs)
    finally:
        chunked.close()
    assert_renewed(env, certs)  # each exactly one generation on: none signed twice, none skipped
    [fallback] = [r for r in caplog.records if r.getMessage() == "signing pool failed; renewing in process"]
    pooled = len(certs) - fallback.count  # type: ignore[attr-defined]  # the log record's extra
    assert 1 <= pooled < len(certs)
    # After the pool failed only the in-process renewals installed anything: no late chunk from the pool.
    assert len(installed_after_failure) == len(certs) - pooled


async def test_a_few_due_renewals_are_signed_in_process(env: Env, pool: SigningPool) -> None:
    certs = fleet(env, POOL_MIN_BATCH - 1)
    signer = RecordingSigner(pool)
    env.reconciler.signer = signer
    env.clock.set(max(c.renew_at for c in certs))
    assert (await env.reconciler.reconcile()).renewed == len(certs)
    assert signer.batches == []
    assert_renewed(env, certs)


async def test_killed_workers_fail_one_batch_which_is_signed_in_process_then_new_workers_take_the_next(
        env: Env, pool: SigningPool, caplog: pytest.LogCaptureFixture) -> None:
    before = set(multiprocessing.active_children())
    pool.warm_up()
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 2
    for worker in workers:
        # The executor kills and reaps the other worker once it sees the first die: it may be gone already.
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid or 0, signal.SIGKILL)
        worker.join(10)
    signer = RecordingSigner(pool)
    env.reconciler.signer = signer
    first = fleet(env, POOL_MIN_BATCH)
    env.clock.set(max(c.renew_at for c in first))
    assert (await env.reconciler.reconcile()).renewed == len(first)
    second = assert_renewed(env, first)
    assert [r for r in caplog.records if r.getMessage() == "signing pool failed; renewing in process"]

    caplog.clear()
    env.clock.set(max(c.renew_at for c in second))
    assert (await env.reconciler.reconcile()).renewed == len(second)
    assert_renewed(env, second)
    assert signer.batches == [len(first), len(second)]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_closed_pool_refuses_work_and_renewals_go_on_in_process(env: Env, pool: SigningPool) -> None:
    pool.close()
    with pytest.raises(SigningPoolError):
        await pool.issue_many([SpiffeId.parse("spiffe://cluster.local/ns/a/sa/b")], now=env.clock.now())
    env.reconciler.signer = pool
    certs = fleet(env, POOL_MIN_BATCH)
    env.clock.set(max(c.renew_at for c in certs))
    assert (await env.reconciler.reconcile()).renewed == len(certs)
    assert_renewed(env, certs)


async def test_a_workload_forgotten_while_the_pool_signs_is_not_brought_back(env: Env, pool: SigningPool) -> None:
    certs = fleet(env, POOL_MIN_BATCH)
    gone = certs[3]
    env.reconciler.signer = RecordingSigner(pool, before=lambda: env.registry.forget(gone.node_id, gone.spiffe_id))
    env.clock.set(max(c.renew_at for c in certs))
    assert (await env.reconciler.reconcile()).renewed == len(certs) - 1
    assert env.registry.get(gone.node_id, gone.spiffe_id) is None
    assert_renewed(env, [c for c in certs if c is not gone])


async def test_after_an_intermediate_rotation_the_pool_signs_with_the_new_intermediate(
        env: Env, pool: SigningPool) -> None:
    pool.warm_up()
    old = env.authority.state.active(CAKind.INTERMEDIATE).key_id
    assert pool.signer_key_id == old
    await RotationService.of(env.reconciler).rotate(RotationRequest(RotationScope.INTERMEDIATE, reason="test"))
    new = env.authority.state.active(CAKind.INTERMEDIATE).key_id
    assert new != old
    env.reconciler.signer = pool
    certs = fleet(env, POOL_MIN_BATCH)
    env.clock.set(max(c.renew_at for c in certs))
    await env.reconciler.reconcile()
    assert {c.svid.issuer_key_id for c in assert_renewed(env, certs)} == {new}
    assert pool.signer_key_id == new


async def test_two_passes_at_once_renew_each_certificate_once(env: Env, pool: SigningPool) -> None:
    env.reconciler.signer = pool
    certs = fleet(env, POOL_MIN_BATCH * 2)
    env.clock.set(max(c.renew_at for c in certs))
    reports = await asyncio.gather(env.reconciler.reconcile(), env.reconciler.reconcile())
    assert sorted(r.renewed for r in reports) == [0, len(certs)]
    assert_renewed(env, certs)


async def test_the_component_warms_workers_rewarms_them_after_a_rotation_and_closes_on_stop(
        env: Env, pool: SigningPool) -> None:
    component = SigningPoolComponent(pool)
    register_reactions(env.authority.reactions, pool=component)
    await component.start()
    try:
        await wait_for(lambda: pool.signer_key_id == env.authority.state.active(CAKind.INTERMEDIATE).key_id,
                       "workers holding the active intermediate", timeout=30)
        await RotationService.of(env.reconciler).rotate(RotationRequest(RotationScope.INTERMEDIATE, reason="test"))
        new = env.authority.state.active(CAKind.INTERMEDIATE).key_id
        await wait_for(lambda: pool.signer_key_id == new, "workers holding the new intermediate", timeout=30)
    finally:
        await component.stop()
    with pytest.raises(SigningPoolError):
        await pool.issue_many([SpiffeId.parse("spiffe://cluster.local/ns/a/sa/b")], now=env.clock.now())


@pytest.mark.parametrize("count", [POOL_MIN_BATCH - 1, POOL_MIN_BATCH], ids=["a few", "a storm"])
async def test_a_storm_signed_in_process_starts_a_wave_and_a_few_renewals_do_not(env: Env, count: int) -> None:
    """Without a pool (``ca.signing_workers: 0``, or after it failed) a storm is still a wave of pushes."""
    certs = fleet(env, count)
    waves: list[int] = []  # how many of the fleet were renewed when each wave began
    env.registry.on_wave = lambda: waves.append(sum(c.generation > 1 for c in env.registry))
    env.clock.set(max(c.renew_at for c in certs))
    assert (await env.reconciler.reconcile()).renewed == count
    assert waves == ([0] if count >= POOL_MIN_BATCH else [])


def test_the_daemon_freezes_its_heap_on_each_push_wave(tmp_path: Path) -> None:
    """The wiring: a re-issue chunk (through the registry) and a trust change reach the collector schedule."""
    from ca_service.adapters.collector import CollectorSchedule

    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path), "ca": {"signing_workers": 0}})
    app = build_app(settings)
    [collector] = [c for c in app.components if isinstance(c, CollectorSchedule)]
    assert app.registry.on_wave == collector.wave_started  # each chunk of a storm, each forced spread
    waves: list[str] = []
    collector.wave_started = lambda: waves.append("wave")  # type: ignore[method-assign]
    app.trust.set_peer(peer_bundle("eu.cluster.local", app.clock.now()))  # a trust change: every ROOTCA stream
    assert waves == ["wave"]


def test_signing_workers_zero_builds_a_daemon_without_a_pool(tmp_path: Path) -> None:
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path), "ca": {"signing_workers": 0}})
    app = build_app(settings)
    assert not [c for c in app.components if isinstance(c, SigningPoolComponent)]
    assert app.reconciler is not None and app.reconciler.signer is None


async def test_the_daemon_reissues_all_workloads_on_its_pool_and_pushes_the_new_svid_over_sds(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    settings = load_settings(environ={}, overrides={
        "data_dir": str(tmp_path / "data"), "http": {"address": "127.0.0.1:0"}, "rotation": {"reissue_window": "0s"},
        "grpc": [{"address": "127.0.0.1:0", "trust_node_metadata": True}]})
    app = build_app(settings)
    [component] = [c for c in app.components if isinstance(c, SigningPoolComponent)]
    await app.start()
    try:
        assert app.sds is not None and app.rotator is not None
        await wait_for(lambda: component.pool.signer_key_id is not None, "a warm pool", timeout=30)
        for i in range(POOL_MIN_BATCH):
            app.registry.get_or_issue(f"other-{i}", SpiffeId.parse(f"spiffe://cluster.local/ns/default/sa/o{i}"))
        async with grpc.aio.insecure_channel(app.sds.bound_addresses[0]) as channel:
            call = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).StreamSecrets()
            await call.write(request(["default"], n=node("a")))
            first = await read(call)
            await call.write(request(["default"], version=first.version_info, nonce=first.nonce))
            caplog.clear()
            await app.rotator.rotate(RotationRequest(RotationScope.ALL_WORKLOADS, reason="drill", caller="test"))
            pushed = await read(call)
            call.cancel()
    finally:
        await app.stop()
    batches = [r for r in caplog.records if r.getMessage() == "workload certificates re-issued"]
    assert [getattr(r, "count", None) for r in batches] == [POOL_MIN_BATCH + 1]
    old, new = (secrets_of(r)["default"].tls_certificate for r in (first, pushed))
    chain = x509.load_pem_x509_certificates(new.certificate_chain.inline_bytes)
    old_leaf = x509.load_pem_x509_certificates(old.certificate_chain.inline_bytes)[0]
    assert chain[0].serial_number != old_leaf.serial_number
    verify_svid(chain[0], chain[1:], app.authority.state.roots, now=app.clock.now())
    key = load_private_key(new.private_key.inline_bytes)
    assert public_key_der(key.public_key()) == public_key_der(chain[0].public_key())
