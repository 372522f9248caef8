"""Requests that arrive in one event-loop turn, handed to the signing pool as one batch.

Both pool front ends (first SVIDs of SDS streams, Istio CA API CSRs) use it: each caller queues one item
and awaits its own result, the first item of a turn schedules the flush after every request already
runnable this turn has queued, and a batch is cut at ``max_batch`` items (~25 ms of worker time at 256).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

# Worker time per batch stays around 25 ms at this many leaves, as the pool cuts renewal storms.
MAX_BATCH = 256


class TurnBatcher(Generic[Item, Result]):
    """Queues items, runs ``run_batch(items, now)`` once per loop turn (``now`` of the turn's first item)."""

    def __init__(self, run_batch: Callable[[list[Item], dt.datetime], Awaitable[Sequence[Result]]], *,
                 max_batch: int = MAX_BATCH) -> None:
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._queue: list[tuple[Item, asyncio.Future[Result]]] = []
        self._now: dt.datetime | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: Item, now: dt.datetime) -> Result:
        """The result for ``item``; raises what the batch's run raised."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        if not self._queue:
            self._now = now
            loop.call_soon(self._flush)  # after every request already runnable this turn has queued
        self._queue.append((item, future))
        if len(self._queue) >= self._max_batch:
            self._flush()
        return await future

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        if not batch:
            return
        assert self._now is not None
        task = asyncio.get_running_loop().create_task(self._run(batch, self._now))
        self._tasks.add(task)  # held: a task only the loop references may be collected mid-run
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[Item, asyncio.Future[Result]]], now: dt.datetime) -> None:
        try:
            results = await self._run_batch([item for item, _ in batch], now)
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
