"""The fake clock itself: sleepers wake exactly when the clock passes their deadline, never before."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from tests.clock import FakeClock
from tests.conftest import START


async def test_a_sleeper_wakes_only_once_the_clock_passes_its_deadline():
    clock = FakeClock(START)
    task = asyncio.create_task(clock.sleep(dt.timedelta(seconds=10)))
    await clock.settle(1)
    clock.advance(dt.timedelta(seconds=9))
    await asyncio.sleep(0)
    assert not task.done()
    clock.advance(dt.timedelta(seconds=1))
    await asyncio.wait_for(task, 1)
    assert clock.sleepers == 0


async def test_setting_the_clock_past_a_deadline_wakes_the_sleeper():
    clock = FakeClock(START)
    task = asyncio.create_task(clock.sleep(dt.timedelta(hours=1)))
    await clock.settle(1)
    clock.set(START + dt.timedelta(days=1))
    await asyncio.wait_for(task, 1)


async def test_a_zero_or_negative_sleep_returns_at_once():
    clock = FakeClock(START)
    await asyncio.wait_for(clock.sleep(dt.timedelta(0)), 1)
    await asyncio.wait_for(clock.sleep(dt.timedelta(seconds=-5)), 1)


def test_the_clock_does_not_go_backwards():
    with pytest.raises(ValueError, match="backwards"):
        FakeClock(START).advance(dt.timedelta(seconds=-1))


async def test_settle_fails_when_nobody_goes_to_sleep():
    with pytest.raises(AssertionError, match="sleeper"):
        await FakeClock(START).settle(1, rounds=10)
