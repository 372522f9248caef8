"""The three CSR signers issue the same profile for the key they are given; the pool batches a burst."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from ca_service.adapters.csr_pool import PoolCsrSigner
from ca_service.adapters.signing_pool import SigningPool
from ca_service.pki.identity import SpiffeId
from ca_service.pki.keys import generate_private_key, same_public_key
from ca_service.pki.verify import verify_svid
from ca_service.services.authority import Authority
from ca_service.services.csr_signing import CsrSigner, InlineCsrSigner, ThreadCsrSigner
from tests.clock import FakeClock

HOUR = dt.timedelta(hours=1)


async def _burst(signer: CsrSigner, authority: Authority, clock: FakeClock, count: int) -> None:
    keys = [generate_private_key() for _ in range(count)]
    ids = [SpiffeId.parse(f"spiffe://cluster.local/ns/ns/sa/sa-{i}") for i in range(count)]
    svids = await asyncio.gather(*[signer.sign(i, k.public_key(), ttl=HOUR, now=clock.now())
                                   for i, k in zip(ids, keys, strict=True)])
    for spiffe_id, key, svid in zip(ids, keys, svids, strict=True):
        assert same_public_key(svid.leaf.public_key(), key.public_key())  # type: ignore[arg-type]
        assert verify_svid(svid.leaf, svid.chain[1:], authority.bundle().roots, now=clock.now()) == spiffe_id
        assert svid.not_after - svid.not_before == HOUR + authority.settings.backdate


@pytest.mark.parametrize("kind", ["inline", "thread"])
async def test_in_process_signers_issue_for_the_given_key(kind: str, authority: Authority, clock: FakeClock) -> None:
    signer = InlineCsrSigner(authority) if kind == "inline" else ThreadCsrSigner(authority)
    await _burst(signer, authority, clock, 20)


async def test_the_pool_signer_batches_a_burst_onto_the_workers(authority: Authority, clock: FakeClock) -> None:
    pool = SigningPool(authority.issuer, workers=1)
    try:
        await _burst(PoolCsrSigner(authority, pool), authority, clock, 50)
    finally:
        await asyncio.to_thread(pool.close)
