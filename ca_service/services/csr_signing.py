"""Signing CSR public keys for the Istio CA API (``CsrSigner``).

- :class:`InlineCsrSigner`: on the event loop (~0.2 ms a P-256 leaf): the least overhead per request.
- :class:`ThreadCsrSigner`: in a thread; the loop keeps serving gRPC I/O while the Rust/OpenSSL part runs.
- ``adapters.csr_pool.PoolCsrSigner``: batched onto the signing pool's worker processes.

bench/istio_ca.py measures them side by side; the daemon signs in a thread (the pool measured
slowest; thread and inline are within noise).  All go through the one :class:`Issuer`, so what is
signed and the signer-chain check stay in one place.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Protocol

from ca_service.pki.identity import SpiffeId
from ca_service.pki.keys import PublicKey
from ca_service.services.authority import Authority
from ca_service.services.issuer import IssuedSvid


class CsrSigner(Protocol):
    async def sign(self, spiffe_id: SpiffeId, public_key: PublicKey, *, ttl: dt.timedelta,
                   now: dt.datetime) -> IssuedSvid: ...


class InlineCsrSigner:
    def __init__(self, authority: Authority) -> None:
        self._authority = authority

    async def sign(self, spiffe_id: SpiffeId, public_key: PublicKey, *, ttl: dt.timedelta,
                   now: dt.datetime) -> IssuedSvid:
        return self._authority.issuer.issue(spiffe_id, public_key, ttl=ttl, now=now)


class ThreadCsrSigner:
    def __init__(self, authority: Authority) -> None:
        self._authority = authority

    async def sign(self, spiffe_id: SpiffeId, public_key: PublicKey, *, ttl: dt.timedelta,
                   now: dt.datetime) -> IssuedSvid:
        return await asyncio.to_thread(self._authority.issuer.issue, spiffe_id, public_key, ttl=ttl, now=now)
