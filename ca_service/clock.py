"""Time source.  Everything that decides by time takes ``now``; only the edges read a :class:`Clock`."""

from __future__ import annotations

import datetime as dt
from typing import Protocol


class Clock(Protocol):
    """Tells the current instant as an aware UTC datetime."""

    def now(self) -> dt.datetime: ...


class SystemClock:
    """The wall clock."""

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)


class FakeClock:
    """A clock that moves only when told to; tests and benchmarks walk lifetimes with it, never sleeping."""

    def __init__(self, start: dt.datetime | None = None) -> None:
        self._now = start or dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
        if self._now.tzinfo is None:
            raise ValueError("FakeClock needs an aware datetime")

    def now(self) -> dt.datetime:
        return self._now

    def advance(self, delta: dt.timedelta) -> dt.datetime:
        if delta < dt.timedelta(0):
            raise ValueError(f"a clock does not go backwards (asked to advance by {delta})")
        self._now += delta
        return self._now

    def set(self, instant: dt.datetime) -> None:
        self._now = instant
