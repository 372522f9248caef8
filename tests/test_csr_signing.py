"""The three CSR signers issue the same profile for the key they are given; the pool batches a burst."""

from __future__ import annotations

import asyncio
import datetime as dt
import re

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from ca_service.adapters.csr_pool import PoolCsrSigner
from ca_service.adapters.signing_pool import SigningPool
from ca_service.adapters.turn_batch import TurnBatcher
from ca_service.errors import CSRRejectedError
from ca_service.pki.csr import DEFAULT_ALLOWED_KEY_TYPES
from ca_service.pki.identity import SpiffeId
from ca_service.pki.keys import PrivateKey, generate_private_key, same_public_key
from ca_service.pki.verify import ChainVerificationError, verify_svid
from ca_service.rpc.istio_ca import chain_for
from ca_service.services.authority import Authority
from ca_service.services.csr_signing import CsrIssuance, CsrOrder, CsrSigner, InlineCsrSigner, ThreadCsrSigner
from tests.clock import FakeClock

HOUR = dt.timedelta(hours=1)


def _csr(key: PrivateKey, spiffe_id: SpiffeId) -> bytes:
    return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
                           critical=False)
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))  # type: ignore[arg-type]


def _order(key: PrivateKey, spiffe_id: SpiffeId, clock: FakeClock) -> CsrOrder:
    return CsrOrder(_csr(key, spiffe_id), spiffe_id, DEFAULT_ALLOWED_KEY_TYPES, HOUR, clock.now())


async def _burst(signer: CsrSigner, authority: Authority, clock: FakeClock, count: int) -> None:
    keys = [generate_private_key() for _ in range(count)]
    ids = [SpiffeId.parse(f"spiffe://cluster.local/ns/ns/sa/sa-{i}") for i in range(count)]
    results = await asyncio.gather(*[signer.sign(_order(k, i, clock)) for i, k in zip(ids, keys, strict=True)])
    for spiffe_id, key, result in zip(ids, keys, results, strict=True):
        svid = result.svid
        assert same_public_key(svid.leaf.public_key(), key.public_key())  # type: ignore[arg-type]
        assert result.bundle is authority.bundle()
        assert verify_svid(svid.leaf, svid.chain[1:], result.bundle.roots, now=clock.now()) == spiffe_id
        assert svid.not_after - svid.not_before == HOUR + authority.settings.backdate


@pytest.mark.parametrize("kind", ["inline", "thread", "pool"])
async def test_every_signer_refuses_a_csr_for_another_identity_and_signs_nothing(
        kind: str, authority: Authority, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    signed: list[object] = []
    monkeypatch.setattr(authority.issuer, "issue", lambda *a, **k: signed.append(a))
    monkeypatch.setattr(TurnBatcher, "submit", lambda *a, **k: signed.append(a))
    pool = SigningPool(authority.issuer, workers=1) if kind == "pool" else None
    signer: CsrSigner = (PoolCsrSigner(authority, pool) if pool is not None else
                         InlineCsrSigner(authority) if kind == "inline" else ThreadCsrSigner(authority))
    entitled = SpiffeId.parse("spiffe://cluster.local/ns/ns/sa/mine")
    order = CsrOrder(_csr(generate_private_key(), SpiffeId.parse("spiffe://cluster.local/ns/ns/sa/theirs")),
                     entitled, DEFAULT_ALLOWED_KEY_TYPES, HOUR, clock.now())
    try:
        with pytest.raises(CSRRejectedError) as refused:
            await signer.sign(order)
    finally:
        if pool is not None:
            await asyncio.to_thread(pool.close)
    assert refused.value.rule == "san-uri"
    assert signed == []


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


async def test_a_leaf_for_another_identity_than_the_order_is_never_handed_out(authority: Authority,
                                                                              clock: FakeClock) -> None:
    # The last step checks the leaf against the identity the caller is entitled to, not only against the
    # chain: a signer that got the identity wrong is caught before anything is returned.
    steps = CsrIssuance(authority)
    mine, theirs = (SpiffeId.parse(f"spiffe://cluster.local/ns/ns/sa/{n}") for n in ("mine", "theirs"))
    key = generate_private_key()
    order = _order(key, mine, clock)
    for _ in range(2):  # the first leaf of a signer takes the full verifier, the next the per-leaf checks
        assert steps.finish(order, authority.issue_svid(mine, key.public_key(), now=clock.now())).svid.spiffe_id == mine
        with pytest.raises(ChainVerificationError, match=re.escape(f"not {mine}")):
            steps.finish(order, authority.issue_svid(theirs, key.public_key(), now=clock.now()))


def test_the_istio_ca_reply_has_each_certificate_as_cryptography_writes_it_then_the_roots(authority: Authority,
                                                                                           clock: FakeClock) -> None:
    svid = authority.issue_svid(SpiffeId.parse("spiffe://cluster.local/ns/ns/sa/mine"),
                                generate_private_key().public_key(), now=clock.now())
    roots = authority.bundle().to_pem()
    expected = [c.public_bytes(serialization.Encoding.PEM).decode() for c in svid.chain] + [roots.decode()]
    assert chain_for(svid, roots) == expected
