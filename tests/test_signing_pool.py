"""The signing pool issues the same SVIDs as in-process signing, and the registry works with or without it."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest
from cryptography import x509

from ca_service.adapters.signing_pool import SigningPool
from ca_service.adapters.signing_worker import WORKER_NICENESS
from ca_service.config import RotationSettings
from ca_service.pki.certs import certs_to_pem, spiffe_id_of
from ca_service.pki.identity import SpiffeId
from ca_service.pki.keys import load_private_key, public_key_der
from ca_service.pki.verify import verify_svid
from ca_service.services.authority import Authority
from ca_service.services.workloads import WorkloadCert, WorkloadRegistry
from tests.clock import FakeClock
from tests.processes import children_of, is_spawned_worker
from tests.waiting import wait_for

IDS = [SpiffeId.parse(f"spiffe://cluster.local/ns/pool/sa/sa-{i}") for i in range(5)]


@pytest.fixture
def pool(authority: Authority) -> Iterator[SigningPool]:
    signing_pool = SigningPool(authority.issuer, workers=2)
    yield signing_pool
    signing_pool.close()


async def test_pool_issued_svids_verify_against_the_roots_and_match_their_keys(
    authority: Authority, pool: SigningPool, clock: FakeClock
) -> None:
    issued = await pool.issue_many(IDS, now=clock.now())
    assert [signed.svid.spiffe_id for signed in issued] == IDS
    for (key_pem, svid, seconds), spiffe_id in zip(issued, IDS, strict=True):
        assert seconds > 0
        verify_svid(svid.leaf, svid.chain[1:], svid.roots, now=clock.now())
        assert spiffe_id_of(svid.leaf) == spiffe_id
        assert public_key_der(load_private_key(key_pem).public_key()) == public_key_der(svid.leaf.public_key())
        assert svid.chain_pem() == certs_to_pem(svid.chain)


async def test_pool_issued_svid_has_the_same_profile_as_an_in_process_one(
    authority: Authority, pool: SigningPool, clock: FakeClock
) -> None:
    [(_, pooled, _)] = await pool.issue_many(IDS[:1], now=clock.now())
    registry = WorkloadRegistry(authority, RotationSettings(), clock)
    local = registry.get_or_issue("node", IDS[0]).svid
    assert pooled.leaf.not_valid_after_utc == local.leaf.not_valid_after_utc
    assert [e.oid for e in pooled.leaf.extensions] == [e.oid for e in local.leaf.extensions]
    assert [(e.critical, e.value) for e in pooled.leaf.extensions
            if not isinstance(e.value, x509.SubjectKeyIdentifier)] == [
        (e.critical, e.value) for e in local.leaf.extensions if not isinstance(e.value, x509.SubjectKeyIdentifier)]
    assert pooled.chain[1:] == local.chain[1:]


@pytest.mark.parametrize("use_pool", [False, True], ids=["in process", "on the pool"])
async def test_reissue_many_gives_every_workload_a_new_certificate_and_tells_listeners(
    authority: Authority, pool: SigningPool, clock: FakeClock, use_pool: bool
) -> None:
    registry = WorkloadRegistry(authority, RotationSettings(), clock, rng=random.Random(1))
    before = [registry.get_or_issue(f"node-{i}", spiffe_id) for i, spiffe_id in enumerate(IDS)]
    heard: list[WorkloadCert] = []
    registry.subscribe(heard.append)
    after = await registry.reissue_many([c.workload_key for c in before], reason="test",
                                        signer=pool if use_pool else None)
    assert [c.generation for c in after] == [2] * len(IDS)
    assert [c.workload_key for c in after] == [c.workload_key for c in before]  # in the order asked for
    assert all(a.svid.leaf.serial_number != b.svid.leaf.serial_number for a, b in zip(after, before, strict=True))
    assert sorted(heard, key=lambda c: c.node_id) == after  # told as each chunk landed, in whatever order
    assert [registry.get(c.node_id, c.spiffe_id) for c in after] == after
    assert public_key_der(after[0].key.public_key()) == public_key_der(after[0].svid.leaf.public_key())


@pytest.mark.parametrize("use_pool", [False, True], ids=["in process", "on the pool in chunks of two"])
async def test_each_chunk_of_a_storm_starts_a_wave_before_its_certificates_are_installed(
    authority: Authority, clock: FakeClock, use_pool: bool
) -> None:
    """The daemon's collector schedule freezes the heap on each wave (adapters/collector.py)."""
    registry = WorkloadRegistry(authority, RotationSettings(), clock)
    before = [registry.get_or_issue(f"node-{i}", spiffe_id) for i, spiffe_id in enumerate(IDS)]
    events: list[str] = []
    registry.on_wave = lambda: events.append("wave")
    registry.subscribe(lambda cert: events.append(cert.node_id))
    small = SigningPool(authority.issuer, workers=1, chunk=2)
    try:
        await registry.reissue_many([c.workload_key for c in before], reason="test", signer=small if use_pool else None)
    finally:
        small.close()
    chunks = [["node-0", "node-1"], ["node-2", "node-3"], ["node-4"]] if use_pool else [[f"node-{i}" for i in range(5)]]
    assert events == [e for chunk in chunks for e in ("wave", *chunk)]


async def test_pool_workers_run_below_the_daemons_cpu_priority(authority: Authority, pool: SigningPool) -> None:
    """A storm's workers yield the CPU to the event loop that installs and pushes what they sign."""
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    niced = min(19, ours + WORKER_NICENESS)
    assert niced > ours, f"the tests run at nice {ours}, the lowest priority: a worker cannot go lower"
    pool.warm_up()
    workers = {pid for pid in children_of(os.getpid()) if is_spawned_worker(pid)}
    assert len(workers) == 2
    # warm_up's chunks may all have gone to one worker while the other was still starting: wait for its
    # initializer, the one place a worker lowers its priority.
    await wait_for(lambda: {os.getpriority(os.PRIO_PROCESS, pid) for pid in workers} == {niced},
                   "both workers niced", timeout=30)
    assert os.getpriority(os.PRIO_PROCESS, 0) == ours  # the parent's own priority is left alone
