"""How a storm's chunks reach the registry: each as soon as it is signed, and none after the batch failed.

The order in which real worker processes finish is not under a test's control, so these tests put a FAKE
executor in place of the pool's ``ProcessPoolExecutor`` (:class:`HeldExecutor`): it runs the real worker
function (``sign_chunk``, with the real signer in this process) only when the test releases that chunk,
or fails it with the error a dead worker gives.  Everything else (the pool's batching and error handling,
``Issuer.assemble``, the registry) is the real code.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ca_service.adapters import signing_pool, signing_worker
from ca_service.adapters.signing_pool import SigningPool, SigningPoolError, chunk_bounds
from ca_service.config import RotationSettings
from ca_service.pki.identity import SpiffeId
from ca_service.pki.templates import IssuerProfile
from ca_service.services.authority import Authority
from ca_service.services.workloads import SignedSvid, WorkloadRegistry
from tests.clock import FakeClock

IDS = [SpiffeId.parse(f"spiffe://cluster.local/ns/chunks/sa/sa-{i}") for i in range(4)]


class HeldExecutor:
    """FAKE executor: each submitted chunk waits until the test releases it (see the module docstring)."""

    def __init__(self) -> None:
        self.held: list[tuple[concurrent.futures.Future[Any], Callable[[], Any]]] = []
        self._processes = None  # what SigningPool._retire reads from a real executor

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        future.set_running_or_notify_cancel()  # as in a real pool once a worker has it: it cannot be cancelled
        self.held.append((future, lambda: fn(*args)))
        return future

    def release(self, index: int) -> None:
        future, call = self.held[index]
        future.set_result(call())

    def fail(self, index: int) -> None:
        self.held[index][0].set_exception(BrokenProcessPool("a worker died (test)"))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass


@pytest.fixture
def held(authority: Authority, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[SigningPool, HeldExecutor]]:
    pool = SigningPool(authority.issuer, workers=1, chunk=1)  # one identity per chunk
    executor = HeldExecutor()
    context = authority.issuer.signing_context()
    # The worker's global signer, set in this process as init_worker sets it in a worker.
    monkeypatch.setattr(signing_worker, "_worker_signer",
                        (context.key_id, IssuerProfile.of(context.signer.cert, context.signer.key)))
    monkeypatch.setattr(pool, "_executor_for", lambda _context: executor)
    yield pool, executor
    pool.close()


async def submitted(executor: HeldExecutor, count: int) -> None:
    for _ in range(100):
        if len(executor.held) == count:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{len(executor.held)} chunks submitted, expected {count}")


async def settle() -> None:
    for _ in range(20):  # every callback a released future can set off, and theirs
        await asyncio.sleep(0)


async def test_each_chunk_is_installed_while_the_next_ones_are_still_signing(
        authority: Authority, clock: FakeClock, held: tuple[SigningPool, HeldExecutor]) -> None:
    pool, executor = held
    registry = WorkloadRegistry(authority, RotationSettings(), clock, rng=random.Random(3))
    before = [registry.get_or_issue(f"node-{i}", spiffe_id) for i, spiffe_id in enumerate(IDS)]
    storm = asyncio.create_task(registry.reissue_many([c.workload_key for c in before], reason="test", signer=pool))
    await submitted(executor, len(IDS))

    def generations() -> list[int]:
        return [registry.get(c.node_id, c.spiffe_id).generation for c in before]  # type: ignore[union-attr]

    executor.release(2)
    await settle()
    assert generations() == [1, 1, 2, 1] and not storm.done()  # installed (and pushed) before the rest
    for index in (0, 3, 1):
        executor.release(index)
    after = await storm
    assert generations() == [2, 2, 2, 2]
    assert [c.workload_key for c in after] == [c.workload_key for c in before]


async def test_no_chunk_lands_after_the_batch_failed(
        authority: Authority, clock: FakeClock, held: tuple[SigningPool, HeldExecutor]) -> None:
    pool, executor = held
    seen: list[int] = []
    batch = asyncio.create_task(pool.issue_many(IDS, now=clock.now(), on_chunk=lambda start, _: seen.append(start)))
    await submitted(executor, len(IDS))
    executor.release(0)
    await settle()
    executor.fail(1)
    with pytest.raises(SigningPoolError, match="BrokenProcessPool"):
        await batch
    for index in (2, 3):  # signed after all, once the caller was told the batch failed
        executor.release(index)
    await settle()
    assert seen == [0]


async def test_an_error_of_the_callers_own_is_raised_as_it_is_not_as_a_pool_failure(
        authority: Authority, clock: FakeClock, held: tuple[SigningPool, HeldExecutor],
        monkeypatch: pytest.MonkeyPatch) -> None:
    pool, executor = held
    discarded: list[object] = []
    monkeypatch.setattr(pool, "_discard", discarded.append)

    def broken(start: int, chunk: list[SignedSvid]) -> None:
        raise RuntimeError("the registry broke (test)")

    batch = asyncio.create_task(pool.issue_many(IDS[:2], now=clock.now(), on_chunk=broken))
    await submitted(executor, 2)
    executor.release(0)
    with pytest.raises(RuntimeError, match="the registry broke") as raised:
        await batch
    assert not isinstance(raised.value, SigningPoolError)
    assert discarded == []  # the workers are fine: not torn down as a broken pool


# ---------------------------------------------------------------- how a storm is cut (pure)


@settings(max_examples=300, deadline=None)
@given(total=st.integers(0, 20_000), workers=st.integers(1, 16), largest=st.integers(1, 2048))
def test_chunks_cover_the_storm_once_in_order_and_shrink_towards_the_end(total: int, workers: int,
                                                                         largest: int) -> None:
    bounds = chunk_bounds(total, workers, largest)
    assert [start for start, _ in bounds] == ([0, *(end for _, end in bounds[:-1])] if total else [])
    assert (bounds[-1][1] if bounds else 0) == total
    sizes = [end - start for start, end in bounds]
    assert all(0 < size <= largest for size in sizes)
    assert all(size >= min(signing_pool.MIN_CHUNK, largest, -(-total // workers)) for size in sizes[:-1])
    assert not sizes or sizes[0] <= -(-total // workers)  # even a small storm is spread over the workers
    assert sizes == sorted(sizes, reverse=True)


def test_a_large_storm_is_a_few_large_chunks_then_small_ones_for_the_last_leaves() -> None:
    sizes = [end - start for start, end in chunk_bounds(4000, 2, signing_pool.DEFAULT_CHUNK)]
    assert sizes[0] == signing_pool.DEFAULT_CHUNK and len(sizes) <= 12
    # What either worker may still be signing when the other runs out of work: a small chunk.
    assert max(sizes[-2:]) <= 2 * signing_pool.MIN_CHUNK


@pytest.mark.parametrize(("total", "expected"), [(16, [8, 8]), (40, [20, 20]), (100, [50, 32, 18]), (1, [1])])
def test_a_small_storm_is_shared_between_the_workers(total: int, expected: list[int]) -> None:
    assert [end - start for start, end in chunk_bounds(total, 2, signing_pool.DEFAULT_CHUNK)] == expected


@pytest.mark.parametrize(("workers", "largest"), [(0, 512), (2, 0), (2, -1)])
def test_chunk_bounds_refuses_no_workers_or_no_room(workers: int, largest: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        chunk_bounds(10, workers, largest)
