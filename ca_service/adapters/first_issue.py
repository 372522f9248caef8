"""First issues of SDS streams signed on the signing pool, batched per event-loop turn (an adapter).

A stream's first ``default`` needs a new key and SVID.  Signed in the stream's handler it would stop the
event loop for every other stream for a millisecond or more per connect, and a connect storm is
thousands of them.  Here the identities asked for in one loop turn go to the pool as one batch
(:class:`~ca_service.adapters.turn_batch.TurnBatcher`, :meth:`SigningPool.issue_many`), so the loop only
hands over and installs.

A pool that is not warm for the current signer (start-up, just after an intermediate rotation) would
make the first connect wait for workers to spawn; :class:`PoolColdError` then tells the registry to
sign that one in process, which takes a millisecond.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence

from ca_service.adapters.signing_pool import SigningPool
from ca_service.adapters.turn_batch import TurnBatcher
from ca_service.errors import NotReadyError
from ca_service.pki.identity import SpiffeId
from ca_service.services.workloads import ChunkSink, SignedSvid


class PoolColdError(NotReadyError):
    """The pool's workers do not (yet) hold the current signer: sign in process instead of waiting."""


class FirstIssueSigner:
    """A :class:`~ca_service.services.workloads.BatchSigner` that batches the requests of one loop turn."""

    def __init__(self, pool: SigningPool) -> None:
        self._pool = pool
        self._batches: TurnBatcher[SpiffeId, SignedSvid] = TurnBatcher(self._sign)

    async def issue_many(self, spiffe_ids: Sequence[SpiffeId], *, now: dt.datetime,
                         on_chunk: ChunkSink | None = None) -> list[SignedSvid]:
        if not self._pool.is_warm():
            raise PoolColdError("signing pool not warm for the current signer")
        signed = list(await asyncio.gather(*(self._batches.submit(s, now) for s in spiffe_ids)))
        if on_chunk is not None:  # first issues are one identity at a time: the whole batch is one chunk
            on_chunk(0, signed)
        return signed

    async def _sign(self, spiffe_ids: list[SpiffeId], now: dt.datetime) -> list[SignedSvid]:
        return await self._pool.issue_many(spiffe_ids, now=now)
