"""Fulfilling a CSR for the Istio CA API (``CsrSigner``): check it, sign it, check the chain handed out.

The steps are one :class:`CsrIssuance`, wherever they run:

- :class:`InlineCsrSigner`: all on the event loop, ~0.5 ms a CSR.
- :class:`ThreadCsrSigner` (the daemon's): all in a thread.  ``cryptography`` releases the GIL while it
  verifies a signature (two per CSR: the CSR's own, and the leaf's under our intermediate) but not while
  it signs (2 threads verify 1.9x as fast as one, and sign 1.0x).  Faster than inline on a busy
  machine, slower on a quiet one, and steadier (see ``rpc/istio_ca_wiring.py``).
- ``adapters.csr_pool.PoolCsrSigner``: signs on the signing pool's worker processes; checks on the loop.

bench/istio_ca.py measures them side by side.  All sign through the one :class:`Issuer`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

from ca_service.pki.bundle import TrustBundle
from ca_service.pki.csr import CsrKeyType, accept_csr, parse_csr
from ca_service.pki.identity import SpiffeId
from ca_service.pki.keys import KeyAlgorithm, PublicKey
from ca_service.pki.verify import IssuedChainVerifier
from ca_service.services.authority import Authority
from ca_service.services.issuer import IssuedSvid


@dataclass(frozen=True)
class CsrOrder:
    """A CSR to sign for an identity the caller is entitled to (authentication and TTL already decided)."""

    csr_pem: bytes | str
    entitled: SpiffeId
    allowed_key_types: Collection[CsrKeyType | KeyAlgorithm]
    ttl: dt.timedelta
    now: dt.datetime


@dataclass(frozen=True)
class CsrResult:
    svid: IssuedSvid
    bundle: TrustBundle  # the roots the chain was verified against: the ones to send with it


class CsrSigner(Protocol):
    async def sign(self, order: CsrOrder) -> CsrResult:
        """Raises: InvalidCSRError / CSRRejectedError for the CSR, as :meth:`Issuer.issue` for signing,
        ChainVerificationError if the chain does not verify against the current roots."""


class CsrIssuance:
    """The steps of one order; safe to run in several threads at once."""

    def __init__(self, authority: Authority) -> None:
        self._authority = authority
        self._chains = IssuedChainVerifier()

    def check(self, order: CsrOrder) -> tuple[PublicKey, bytes | None]:
        """The CSR's checked public key, and its SubjectPublicKeyInfo DER if the leaf can reuse it."""
        return accept_csr(parse_csr(order.csr_pem), order.entitled, order.allowed_key_types)

    def finish(self, order: CsrOrder, svid: IssuedSvid) -> CsrResult:
        # The bundle is read after signing and the leaf checked against exactly it: a root rotation
        # between the two cannot hand out a chain that does not verify against the roots sent with it.
        bundle = self._authority.bundle()
        self._chains.verify(svid.leaf, svid.chain[1:], bundle.roots, now=order.now, expected=order.entitled)
        return CsrResult(svid, bundle)

    def fulfil(self, order: CsrOrder) -> CsrResult:
        public_key, spki = self.check(order)
        svid = self._authority.issuer.issue(order.entitled, public_key, ttl=order.ttl, now=order.now, spki=spki)
        return self.finish(order, svid)


class InlineCsrSigner:
    def __init__(self, authority: Authority) -> None:
        self._steps = CsrIssuance(authority)

    async def sign(self, order: CsrOrder) -> CsrResult:
        return self._steps.fulfil(order)


class ThreadCsrSigner:
    def __init__(self, authority: Authority) -> None:
        self._steps = CsrIssuance(authority)

    async def sign(self, order: CsrOrder) -> CsrResult:
        return await asyncio.to_thread(self._steps.fulfil, order)
