"""FakeClock: a clock that moves only when told to; tests and benchmarks walk lifetimes with it, never sleeping.

``sleep()`` parks the caller until :meth:`FakeClock.advance` (or :meth:`FakeClock.set`) moves the clock
to or past its deadline, so a renewal or polling loop runs one iteration per advance, with no real
waiting.  ``real_sleeps=True`` is for integration fixtures whose loops talk to real peers in real time
while ``now()`` stays under the test's control: sleeps then pass in real time (and also end early
when the fake clock is moved past their deadline).
"""

from __future__ import annotations

import asyncio
import datetime as dt


class FakeClock:
    def __init__(self, start: dt.datetime | None = None, *, real_sleeps: bool = False) -> None:
        self._now = start or dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
        if self._now.tzinfo is None:
            raise ValueError("FakeClock needs an aware datetime")
        self._real_sleeps = real_sleeps
        self._sleepers: list[tuple[dt.datetime, asyncio.Future[None]]] = []

    def now(self) -> dt.datetime:
        return self._now

    def advance(self, delta: dt.timedelta) -> dt.datetime:
        if delta < dt.timedelta(0):
            raise ValueError(f"a clock does not go backwards (asked to advance by {delta})")
        self._now += delta
        self._wake()
        return self._now

    def set(self, instant: dt.datetime) -> None:
        self._now = instant
        self._wake()

    async def sleep(self, delay: dt.timedelta) -> None:
        if delay <= dt.timedelta(0):
            await asyncio.sleep(0)  # still a yield point, as asyncio.sleep(0) is
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (self._now + delay, waiter)
        self._sleepers.append(entry)
        try:
            if self._real_sleeps:
                await asyncio.wait_for(asyncio.shield(waiter), delay.total_seconds())
            else:
                await waiter
        except TimeoutError:
            pass  # real_sleeps: the real delay passed
        finally:
            if entry in self._sleepers:
                self._sleepers.remove(entry)

    @property
    def sleepers(self) -> int:
        """How many tasks are parked in :meth:`sleep` right now."""
        return len(self._sleepers)

    def next_deadline(self) -> dt.datetime | None:
        """The earliest deadline of a parked sleeper (None if nobody sleeps)."""
        return min((at for at, _ in self._sleepers), default=None)

    async def settle(self, sleepers: int = 1, *, rounds: int = 1000) -> None:
        """Let the event loop run until at least ``sleepers`` tasks are parked in :meth:`sleep`.

        Bounded by event-loop turns, not by time: a loop that never sleeps again fails the test.
        """
        for _ in range(rounds):
            if len(self._sleepers) >= sleepers:
                return
            await asyncio.sleep(0)
        raise AssertionError(f"expected {sleepers} sleeper(s) on the fake clock, found {len(self._sleepers)}")

    def _wake(self) -> None:
        # Woken sleepers leave the list at once, so settle() after an advance waits for the *next* sleep.
        for entry in list(self._sleepers):
            at, waiter = entry
            if at <= self._now:
                self._sleepers.remove(entry)
                if not waiter.done():
                    waiter.set_result(None)
