"""SingleFlight: one run per key for concurrent callers; a caller leaving does not cancel it for the rest."""

from __future__ import annotations

import asyncio

import pytest

from ca_service.services.single_flight import SingleFlight


async def test_concurrent_callers_share_one_run_and_the_key_is_free_after() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    started: list[int] = []
    gate = asyncio.Event()

    async def work() -> int:
        started.append(1)
        await gate.wait()
        return len(started)

    callers = [asyncio.create_task(flight.run("k", work)) for _ in range(5)]
    await asyncio.sleep(0)
    assert flight.running("k") and not flight.running("other")
    gate.set()
    assert await asyncio.gather(*callers) == [1] * 5
    assert started == [1] and not flight.running("k")
    assert await flight.run("k", work) == 2  # done: the next caller starts a new run


async def test_a_cancelled_caller_does_not_cancel_the_run_for_the_others() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    gate = asyncio.Event()

    async def work() -> str:
        await gate.wait()
        return "done"

    leaving = asyncio.create_task(flight.run("k", work))
    staying = asyncio.create_task(flight.run("k", work))
    await asyncio.sleep(0)
    leaving.cancel()
    gate.set()
    assert await staying == "done"
    assert leaving.cancelled()


async def test_every_waiter_gets_the_error_and_the_key_is_released() -> None:
    flight: SingleFlight[str, None] = SingleFlight()

    async def fail() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("review failed")

    results = await asyncio.gather(*[flight.run("k", fail) for _ in range(3)], return_exceptions=True)
    assert [str(r) for r in results] == ["review failed"] * 3
    assert not flight.running("k")
    with pytest.raises(RuntimeError):
        await flight.run("k", fail)
