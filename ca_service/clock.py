"""Time source.  Everything that decides by time takes ``now``; only the edges read a :class:`Clock`.

Every loop that waits (serving-certificate renewal, peer polling, retries) sleeps through the
injected clock, so tests drive it with a fake clock (``tests/clock.py``) and never sleep for real.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Protocol


class Clock(Protocol):
    """Tells the current instant as an aware UTC datetime, and waits."""

    def now(self) -> dt.datetime: ...

    async def sleep(self, delay: dt.timedelta) -> None:
        """Return after ``delay`` has passed on this clock (at once for a zero or negative delay)."""
        ...


class SystemClock:
    """The wall clock."""

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)

    async def sleep(self, delay: dt.timedelta) -> None:
        await asyncio.sleep(max(delay.total_seconds(), 0.0))


async def sleep_until(clock: Clock, deadline: dt.datetime) -> None:
    """Sleep on ``clock`` until ``deadline`` (returns at once if it has passed)."""
    await clock.sleep(deadline - clock.now())
