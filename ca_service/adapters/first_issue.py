"""First issues of SDS streams signed on the signing pool, batched per event-loop turn (an adapter).

A stream's first ``default`` needs a new key and SVID.  Signed in the stream's handler it would stop the
event loop for every other stream for a millisecond or more per connect, and a connect storm is
thousands of them.  Here the identities asked for in one loop turn go to the pool as one batch
(:meth:`SigningPool.issue_many`), so the loop only hands over and installs.

A pool that is not warm for the current signer (start-up, just after an intermediate rotation) would
make the first connect wait for workers to spawn; :class:`PoolColdError` then tells the registry to
sign that one in process, which takes a millisecond.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from ca_service.adapters.signing_pool import SigningPool
from ca_service.errors import NotReadyError
from ca_service.pki.identity import SpiffeId
from ca_service.services.workloads import SignedSvid

# A batch is cut at this many identities (~25 ms of worker time), as the pool cuts renewal storms.
MAX_BATCH = 256


class PoolColdError(NotReadyError):
    """The pool's workers do not (yet) hold the current signer: sign in process instead of waiting."""


@dataclass
class _Pending:
    spiffe_id: SpiffeId
    future: asyncio.Future[SignedSvid]


class FirstIssueSigner:
    """A :class:`~ca_service.services.workloads.BatchSigner` that batches the requests of one loop turn."""

    def __init__(self, pool: SigningPool) -> None:
        self._pool = pool
        self._queue: list[_Pending] = []
        self._now: dt.datetime | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def issue_many(self, spiffe_ids: Sequence[SpiffeId], *, now: dt.datetime) -> list[SignedSvid]:
        if not self._pool.is_warm():
            raise PoolColdError("signing pool not warm for the current signer")
        loop = asyncio.get_running_loop()
        pending = [_Pending(s, loop.create_future()) for s in spiffe_ids]
        if not self._queue:
            self._now = now
            loop.call_soon(self._flush)  # after every stream already runnable this turn has asked
        self._queue.extend(pending)
        if len(self._queue) >= MAX_BATCH:
            self._flush()
        return list(await asyncio.gather(*(p.future for p in pending)))

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        if not batch:
            return
        assert self._now is not None
        task = asyncio.get_running_loop().create_task(self._run(batch, self._now))
        self._tasks.add(task)  # held: a task only the loop references may be collected mid-run
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[_Pending], now: dt.datetime) -> None:
        try:
            signed = await self._pool.issue_many([p.spiffe_id for p in batch], now=now)
        except Exception as exc:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        for p, item in zip(batch, signed, strict=True):
            if not p.future.done():
                p.future.set_result(item)
