"""Concurrent callers with one key share one run (the first SVID of a node, a TokenReview, a /metrics render).

The first caller starts the run as a task of its own, so a caller that goes away (a closed stream, a
cancelled RPC) does not cancel it for the others; the rest await the same task; the key is free again
once the run is done, success or failure, and every waiter gets its result or re-raises its error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._running: dict[K, asyncio.Future[V]] = {}

    def running(self, key: K) -> bool:
        return key in self._running

    async def run(self, key: K, start: Callable[[], Awaitable[V]]) -> V:
        """The result of the run for ``key``: the one already going, or ``start()`` begun now."""
        future = self._running.get(key)
        if future is None:
            future = asyncio.ensure_future(start())
            self._running[key] = future
            future.add_done_callback(lambda done: self._done(key, done))
        return await asyncio.shield(future)

    def _done(self, key: K, done: asyncio.Future[V]) -> None:
        if self._running.get(key) is done:
            del self._running[key]
        if not done.cancelled():
            done.exception()  # retrieved: every waiter re-raises it, and none left must not warn
