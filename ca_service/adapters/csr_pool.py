"""Istio CA API requests signed on the signing pool (an adapter: it drives the pool's workers).

Requests that arrive in one event-loop turn are batched into chunks for the pool's worker processes,
which already hold the signing intermediate; the loop only parses and assembles the results through
the one :class:`~ca_service.services.issuer.Issuer`.  Measured slower than a thread for one leaf per
request (bench/istio_ca.py), so the daemon does not use it; the bench and a test do.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca_service.adapters import signing_pool
from ca_service.errors import NotReadyError
from ca_service.pki.identity import SpiffeId
from ca_service.pki.keys import PublicKey
from ca_service.pki.templates import build_svid_for
from ca_service.services.authority import Authority
from ca_service.services.issuer import IssuedSvid, SigningContext

# A batch is cut at this many leaves (~25 ms of worker time), as the pool cuts renewal storms.
MAX_BATCH = 256


def _sign_public_keys(key_id: str, items: list[tuple[str, bytes, float]], now: dt.datetime,
                      backdate: dt.timedelta) -> list[bytes]:
    """In a pool worker: one leaf (DER) per ``(SPIFFE ID, public key DER, ttl seconds)``."""
    held = signing_pool._worker_signer
    if held is None or held[0] != key_id:
        raise signing_pool.StaleSignerError(f"worker holds signer {held and held[0]}, asked for {key_id}")
    out = []
    for raw_id, key_der, ttl in items:
        public_key = serialization.load_der_public_key(key_der)
        leaf = build_svid_for(public_key, SpiffeId.parse(raw_id), held[1], now=now,  # type: ignore[arg-type]
                              ttl=dt.timedelta(seconds=ttl), backdate=backdate)
        out.append(leaf.public_bytes(serialization.Encoding.DER))
    return out


@dataclass
class _Pending:
    spiffe_id: SpiffeId
    key_der: bytes
    ttl: dt.timedelta
    future: asyncio.Future[IssuedSvid]


class PoolCsrSigner:
    """Batches the requests of one event-loop turn into worker chunks (``now`` of the batch's first request)."""

    def __init__(self, authority: Authority, pool: signing_pool.SigningPool) -> None:
        self._authority = authority
        self._pool = pool
        self._queue: list[_Pending] = []
        self._now: dt.datetime | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def sign(self, spiffe_id: SpiffeId, public_key: PublicKey, *, ttl: dt.timedelta,
                   now: dt.datetime) -> IssuedSvid:
        self._authority.issuer.check_member(spiffe_id)
        loop = asyncio.get_running_loop()
        der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        pending = _Pending(spiffe_id, der, self._authority.issuer.leaf_ttl(ttl), loop.create_future())
        if not self._queue:
            self._now = now
            loop.call_soon(self._flush)  # after every request already runnable this turn has queued
        self._queue.append(pending)
        if len(self._queue) >= MAX_BATCH:
            self._flush()
        return await pending.future

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        if not batch:
            return
        assert self._now is not None
        task = asyncio.get_running_loop().create_task(self._run(batch, self._now))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[_Pending], now: dt.datetime) -> None:
        try:
            context = self._authority.signing_context()
            executor = self._pool._executor_for(context)  # the pool's workers hold this context's signer
            items = [(str(p.spiffe_id), p.key_der, p.ttl.total_seconds()) for p in batch]
            leaves = await asyncio.get_running_loop().run_in_executor(
                executor, _sign_public_keys, context.key_id, items, now, self._authority.issuer.policy.backdate)
            results = [self._assemble(p, leaf, context, now) for p, leaf in zip(batch, leaves, strict=True)]
        except Exception as exc:
            failure = exc if isinstance(exc, NotReadyError) else signing_pool.SigningPoolError(
                f"signing pool failed: {type(exc).__name__}")
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(failure)
            return
        for p, svid in zip(batch, results, strict=True):
            if not p.future.done():
                p.future.set_result(svid)

    def _assemble(self, pending: _Pending, leaf: bytes, context: SigningContext, now: dt.datetime) -> IssuedSvid:
        return self._authority.issuer.assemble(pending.spiffe_id, x509.load_der_x509_certificate(leaf), context, now)
