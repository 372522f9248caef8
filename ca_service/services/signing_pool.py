"""A process pool that generates workload keys and signs SVIDs on every core.

A rotation storm (a forced re-issue of every node, an intermediate rotation) is CPU-bound: key
generation plus an ECDSA signature per leaf.  One Python process uses one core, so the work goes to a
:class:`concurrent.futures.ProcessPoolExecutor` whose workers load the signing intermediate once
(initializer) and return DER bytes; the event loop only awaits, parses and wraps the results.

The authority stays the one place that decides *what* is signed: the parent takes the
:class:`~ca_service.services.authority.SigningContext` of the current state, the worker signs under it,
and :meth:`Authority.assemble_svid` checks the signer chain as for an in-process issuance.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca_service.errors import NotReadyError
from ca_service.pki.identity import SpiffeId
from ca_service.pki.keys import KeyAlgorithm, generate_private_key, load_private_key, private_key_to_pem
from ca_service.pki.templates import IssuerProfile, build_svid_for
from ca_service.services.authority import Authority, IssuedSvid, SigningContext

# Requests go to workers in chunks: one round trip per chunk amortises the parent's per-task cost
# (executor bookkeeping, a future, a wake-up: ~0.5 ms), which on two cores competes with the workers.
# A storm is cut into about CHUNKS_PER_WORKER chunks per worker (so a slow worker does not leave the
# other idle at the end), each of at most DEFAULT_CHUNK leaves (~25 ms of work).
DEFAULT_CHUNK = 256
CHUNKS_PER_WORKER = 4

_worker_signer: tuple[str, IssuerProfile] | None = None


class StaleSignerError(NotReadyError):
    """A worker was asked to sign with an intermediate other than the one it loaded."""


def _init_worker(key_id: str, cert_pem: bytes, key_pem: bytes) -> None:
    global _worker_signer
    cert = x509.load_pem_x509_certificate(cert_pem)
    _worker_signer = (key_id, IssuerProfile.of(cert, load_private_key(key_pem)))


def _sign_chunk(
    key_id: str, spiffe_ids: Sequence[str], now: dt.datetime, ttl: dt.timedelta, backdate: dt.timedelta,
    algorithm: KeyAlgorithm,
) -> list[tuple[bytes, bytes]]:
    """In a worker: a fresh key and a signed leaf per identity, as (leaf DER, PKCS#8 PEM key).

    The key comes back as the PEM that SDS sends, so the parent never parses it (17 us a key, a third
    of the parent's share of the work, which on two cores competes with the workers).
    """
    if _worker_signer is None or _worker_signer[0] != key_id:
        raise StaleSignerError(f"worker holds signer {_worker_signer and _worker_signer[0]}, asked for {key_id}")
    profile = _worker_signer[1]
    out = []
    for raw in spiffe_ids:
        key = generate_private_key(algorithm)
        leaf = build_svid_for(key.public_key(), SpiffeId.parse(raw), profile, now=now, ttl=ttl, backdate=backdate)
        out.append((leaf.public_bytes(serialization.Encoding.DER),
                    private_key_to_pem(key)))
    return out


class SigningPool:
    """Key generation + signing for many identities at once, on ``workers`` processes.

    Call :meth:`close` on shutdown.  The pool follows the authority: when the active intermediate
    changes, the workers are replaced by ones holding the new signer before anything is signed.
    """

    def __init__(self, authority: Authority, *, workers: int | None = None, chunk: int = DEFAULT_CHUNK,
                 key_algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {chunk}")
        self._authority = authority
        self.workers = workers or os.cpu_count() or 1
        self._chunk = chunk
        self._algorithm = key_algorithm
        self._executor: Executor | None = None
        self._key_id: str | None = None

    def _executor_for(self, context: SigningContext) -> Executor:
        if self._executor is None or self._key_id != context.key_id:
            self.close()
            assert context.signer.key is not None  # SigningContext.of guarantees it
            key_pem = context.signer.key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            # spawn, not fork: the daemon runs grpc and asyncio threads that must not be forked.
            self._executor = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                initargs=(context.key_id, context.signer.cert.public_bytes(serialization.Encoding.PEM), key_pem))
            self._key_id = context.key_id
        return self._executor

    def warm_up(self) -> None:
        """Start every worker now (spawning costs a few hundred ms each), not on the first storm."""
        context = self._authority.signing_context()
        executor = self._executor_for(context)
        futures = [executor.submit(_sign_chunk, context.key_id, (), dt.datetime.now(dt.UTC), dt.timedelta(hours=1),
                                   dt.timedelta(0), self._algorithm) for _ in range(self.workers * 2)]
        for future in futures:
            future.result()

    async def issue_many(
        self, spiffe_ids: Sequence[SpiffeId], *, now: dt.datetime, ttl: dt.timedelta | None = None
    ) -> list[tuple[bytes, IssuedSvid]]:
        """A new key (PKCS#8 PEM) and SVID per identity, in order; the event loop stays free while workers sign.

        Raises:
            NotReadyError: if the CA cannot sign (no active intermediate, an identity of another domain).
        """
        for spiffe_id in spiffe_ids:
            self._authority.check_member(spiffe_id)
        context = self._authority.signing_context()
        executor = self._executor_for(context)
        loop = asyncio.get_running_loop()
        leaf_ttl, backdate = self._authority.leaf_ttl(ttl), self._authority.settings.backdate

        async def one_chunk(chunk: Sequence[SpiffeId]) -> list[tuple[bytes, IssuedSvid]]:
            # Each chunk is wrapped as soon as it returns, overlapping the parent's share with the workers.
            signed = await loop.run_in_executor(executor, _sign_chunk, context.key_id, [str(s) for s in chunk], now,
                                                leaf_ttl, backdate, self._algorithm)
            return [(key_pem, self._authority.assemble_svid(spiffe_id, x509.load_der_x509_certificate(leaf), context,
                                                             now))
                    for spiffe_id, (leaf, key_pem) in zip(chunk, signed, strict=True)]

        size = max(1, min(self._chunk, -(-len(spiffe_ids) // (self.workers * CHUNKS_PER_WORKER))))
        chunks = [spiffe_ids[i:i + size] for i in range(0, len(spiffe_ids), size)]
        results = await asyncio.gather(*[one_chunk(chunk) for chunk in chunks])
        return [item for chunk_result in results for item in chunk_result]

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
            self._key_id = None
