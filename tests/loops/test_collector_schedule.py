"""Full garbage collections run on the schedule's fake clock, wait for SDS to be quiet (bounded), and never
start on their own while the schedule runs; stopping gives the collector back to CPython."""

from __future__ import annotations

import datetime as dt
import gc
import weakref
from collections.abc import Iterator

import pytest

from ca_service.adapters.collector import MAX_DEFER, QUIET, CollectorSchedule
from tests.clock import FakeClock

INTERVAL = dt.timedelta(minutes=5)


@pytest.fixture
def full_passes() -> Iterator[list[int]]:
    """Every real generation-2 collection in this process, as it happens (gc.callbacks)."""
    seen: list[int] = []

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "stop" and info["generation"] == 2:
            seen.append(info["collected"])

    gc.callbacks.append(callback)
    yield seen
    gc.callbacks.remove(callback)


async def test_a_full_pass_runs_each_interval_once_sds_is_quiet(clock: FakeClock, full_passes: list[int]) -> None:
    pushes = [0]
    durations: list[float] = []
    schedule = CollectorSchedule(clock, lambda: pushes[0], observe=durations.append)
    threshold = gc.get_threshold()
    await schedule.start()
    try:
        assert gc.get_threshold()[:2] == threshold[:2] and gc.get_threshold()[2] > 10**9  # no automatic full pass
        assert gc.get_freeze_count() > 0  # the start-up heap is out of every pass
        full_passes.clear()  # the collection before the freeze
        await clock.settle()
        clock.advance(INTERVAL)
        await clock.settle()
        pushes[0] += 1  # a push during the quiet window: not yet
        clock.advance(QUIET)
        await clock.settle()
        assert schedule.collections == 0 and full_passes == []
        clock.advance(QUIET)  # a quiet second
        await clock.settle()
        assert schedule.collections == 1 and len(full_passes) == 1
        assert len(durations) == 1 and durations[0] > 0  # ca_gc_full_pass_duration_seconds
    finally:
        await schedule.stop()
    assert gc.get_threshold() == threshold and gc.get_freeze_count() == 0


async def test_a_busy_daemon_still_gets_its_full_pass_after_the_longest_deferral(clock: FakeClock) -> None:
    pushes = [0]

    def busy() -> int:
        pushes[0] += 1  # a push between every two looks
        return pushes[0]

    schedule = CollectorSchedule(clock, busy)
    await schedule.start()
    try:
        await clock.settle()
        clock.advance(INTERVAL)
        waited = dt.timedelta(0)
        while schedule.collections == 0:
            await clock.settle()
            clock.advance(QUIET)
            waited += QUIET
            assert waited <= MAX_DEFER + QUIET, "deferred past MAX_DEFER"
        assert waited >= MAX_DEFER
    finally:
        await schedule.stop()


async def test_two_schedules_in_one_process_restore_the_collector_once_both_stop(clock: FakeClock) -> None:
    threshold = gc.get_threshold()
    first, second = CollectorSchedule(clock, lambda: 0), CollectorSchedule(clock, lambda: 0)
    await first.start()
    await second.start()
    await first.stop()
    assert gc.get_threshold() != threshold  # the second daemon still runs
    await second.stop()
    assert gc.get_threshold() == threshold and gc.get_freeze_count() == 0


class _Cycle:
    """A garbage cycle the collector alone can free (a weak reference says when it has)."""

    def __init__(self) -> None:
        self.me = self


def _garbage_cycle() -> weakref.ref[_Cycle]:
    return weakref.ref(_Cycle())


async def test_a_wave_freezes_what_exists_and_the_next_full_pass_still_frees_its_garbage(clock: FakeClock) -> None:
    """What a push wave finds is kept out of the wave's young collections, never out of the scheduled full pass."""
    schedule = CollectorSchedule(clock, lambda: 0)
    cycle = _garbage_cycle()
    schedule.wave_started()  # not running: CPython's collector is left alone
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert cycle() is None
    await schedule.start()
    try:
        await clock.settle()
        cycle = _garbage_cycle()
        frozen = gc.get_freeze_count()
        schedule.wave_started()
        assert gc.get_freeze_count() > frozen
        gc.collect(1)  # a young collection does not see it any more
        assert cycle() is not None
        clock.advance(INTERVAL)
        await clock.settle()
        clock.advance(QUIET)
        await clock.settle()
        assert schedule.collections == 1
        assert cycle() is None  # the full pass unfroze, freed it, and froze the survivors again
        assert gc.get_freeze_count() > 0
    finally:
        await schedule.stop()
    assert gc.get_freeze_count() == 0
