"""Istio CA API requests signed on the signing pool (an adapter: it drives the pool's workers).

Requests that arrive in one event-loop turn are batched into chunks for the pool's worker processes,
which already hold the signing intermediate; the loop checks the CSRs, and parses and assembles the
results through the one :class:`~ca_service.services.issuer.Issuer`.  Measured slower than a thread for one leaf per
request (bench/istio_ca.py), so the daemon does not use it; the bench and a test do.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca_service.adapters import signing_pool, signing_worker
from ca_service.adapters.turn_batch import TurnBatcher
from ca_service.errors import NotReadyError
from ca_service.pki.identity import SpiffeId
from ca_service.pki.keys import public_key_der
from ca_service.pki.templates import build_svid_der_for, leaf_validity
from ca_service.services.authority import Authority
from ca_service.services.csr_signing import CsrIssuance, CsrOrder, CsrResult
from ca_service.services.issuer import IssuedSvid


def _sign_public_keys(key_id: str, items: list[tuple[str, bytes, dt.datetime, dt.datetime]]) -> list[tuple[bytes, int]]:
    """In a pool worker: one leaf (DER) and its serial per ``(SPIFFE ID, public key DER as OpenSSL writes it,
    notBefore, notAfter)``."""
    profile = signing_worker.held_signer(key_id)
    out = []
    for raw_id, key_der, not_before, not_after in items:
        public_key = serialization.load_der_public_key(key_der)
        serial = x509.random_serial_number()
        out.append((build_svid_der_for(public_key, SpiffeId.parse(raw_id), profile, serial=serial,  # type: ignore[arg-type]
                                       not_before=not_before, not_after=not_after, spki=key_der), serial))
    return out


@dataclass(frozen=True)
class _Request:
    spiffe_id: SpiffeId
    key_der: bytes
    ttl: dt.timedelta


class PoolCsrSigner:
    """Batches the requests of one event-loop turn into worker chunks (``now`` of the batch's first request)."""

    def __init__(self, authority: Authority, pool: signing_pool.SigningPool) -> None:
        self._authority = authority
        self._pool = pool
        self._steps = CsrIssuance(authority)
        self._batches: TurnBatcher[_Request, IssuedSvid] = TurnBatcher(self._run)

    async def sign(self, order: CsrOrder) -> CsrResult:
        public_key, spki = self._steps.check(order)
        self._authority.issuer.check_member(order.entitled)
        # Either way the bytes are OpenSSL's encoding of the key, which the worker's template may reuse.
        der = spki or public_key_der(public_key)
        svid = await self._batches.submit(
            _Request(order.entitled, der, self._authority.issuer.leaf_ttl(order.ttl)), order.now)
        return self._steps.finish(order, svid)

    async def _run(self, batch: list[_Request], now: dt.datetime) -> list[IssuedSvid]:
        try:
            context = self._authority.signing_context()
            executor = self._pool._executor_for(context)  # the pool's workers hold this context's signer
            validity = {ttl: leaf_validity(context.profile, now=now, ttl=ttl,
                                           backdate=self._authority.issuer.policy.backdate)
                        for ttl in {r.ttl for r in batch}}
            items = [(str(r.spiffe_id), r.key_der, *validity[r.ttl]) for r in batch]
            leaves = await asyncio.get_running_loop().run_in_executor(
                executor, _sign_public_keys, context.key_id, items)
            assemble = self._authority.issuer.assemble
            return [assemble(r.spiffe_id, leaf, serial, context, not_before=validity[r.ttl][0],
                             not_after=validity[r.ttl][1], now=now)
                    for r, (leaf, serial) in zip(batch, leaves, strict=True)]
        except NotReadyError:
            raise
        except Exception as exc:
            raise signing_pool.SigningPoolError(f"signing pool failed: {type(exc).__name__}") from exc
