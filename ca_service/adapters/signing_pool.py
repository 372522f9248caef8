"""A process pool that generates workload keys and signs SVIDs on every core.

A rotation storm (a forced re-issue of every node, an intermediate rotation) is CPU-bound: key
generation plus an ECDSA signature per leaf.  One Python process uses one core, so the work goes to a
:class:`concurrent.futures.ProcessPoolExecutor` whose workers (:mod:`.signing_worker`) load the signing
intermediate once and return DER bytes; the event loop only awaits and wraps the results (it parses one
leaf per signer, to check the chain).

The :class:`~ca_service.services.issuer.Issuer` stays the one place that decides *what* is signed:
the parent asks it for a :class:`~ca_service.services.issuer.BatchPlan` (identities checked, TTL
clamped, the current signer), the workers run only :func:`~ca_service.services.issuer.sign_leaf`
under it, and :meth:`Issuer.assemble` checks the chain as for an in-process issuance.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import multiprocessing
import multiprocessing.connection
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor
from multiprocessing.process import BaseProcess

from cryptography.hazmat.primitives import serialization

from ca_service.adapters.signing_worker import init_worker, sign_chunk
from ca_service.errors import NotReadyError
from ca_service.pki.identity import SpiffeId
from ca_service.pki.templates import CAKind
from ca_service.rotation.state import AuthorityState, SlotState
from ca_service.services.issuer import Issuer, SigningContext
from ca_service.services.state_changes import StateChange
from ca_service.services.workloads import ChunkSink, SignedSvid

log = logging.getLogger(__name__)

# Requests go to workers in chunks: one round trip per chunk amortises the parent's per-chunk cost
# (executor bookkeeping, a future, pipe reads, thread wake-ups: ~0.5 ms of parent CPU, measured), which on
# two cores competes with the workers.  A storm is cut by guided self-scheduling (see chunk_bounds): chunks
# of at most DEFAULT_CHUNK leaves (~60 ms of work) first, then ever smaller ones down to MIN_CHUNK (~4 ms),
# so that the workers finish close together even when one is slowed by the parent or a neighbour.
DEFAULT_CHUNK = 512
MIN_CHUNK = 32

# How long close() lets workers finish before killing them: a chunk is at most ~60 ms of work and a worker
# that is still importing needs ~0.5 s; SIGTERM of the daemon must drain within a few seconds.
CLOSE_GRACE = dt.timedelta(seconds=2)

def chunk_bounds(total: int, workers: int, largest: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each chunk of a ``total``-leaf storm, in the order they are handed out.

    Guided self-scheduling: each chunk is what is left divided by the workers, at most ``largest`` and at
    least the smallest of MIN_CHUNK, ``largest`` and an even share of the whole storm (so a storm of a few
    dozen is still spread over the workers); the last chunk takes what remains.  Workers take chunks in order as
    they free up: big chunks first keep the parent's per-chunk cost to a few chunks, and ever smaller ones
    at the end leave a worker idle only while the other finishes a small one (equal chunks left up to one
    whole chunk, ~6% of a 4,000-leaf storm, on the worker that shared its core with the parent).

    Raises:
        ValueError: if ``workers`` or ``largest`` is below 1.
    """
    if workers < 1 or largest < 1:
        raise ValueError(f"workers and largest must be at least 1, got {workers} and {largest}")
    smallest = min(MIN_CHUNK, largest, -(-total // workers))
    bounds: list[tuple[int, int]] = []
    start = 0
    while start < total:
        size = min(largest, max(smallest, -(-(total - start) // workers)))
        bounds.append((start, min(total, start + size)))
        start += size
    return bounds


class SigningPoolError(NotReadyError):
    """The pool cannot sign now (closed, or a worker died); the caller signs in process instead."""


class _SinkError(Exception):
    """What ``on_chunk`` raised, carried past the pool's own failure handling to the caller as it was."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def default_workers() -> int:
    """One worker per core this process may run on (the affinity mask, which containers narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class SigningPool:
    """Key generation + signing for many identities at once, on ``workers`` processes.

    The pool follows the authority: when the active intermediate changes, the workers are replaced by
    ones holding the new signer before anything is signed (old workers exit in the background).  The
    intermediate's key reaches the workers over the anonymous pipe ``spawn`` uses, never a file.
    Call :meth:`close` on shutdown; a closed pool refuses work with :class:`SigningPoolError`.
    """

    def __init__(self, issuer: Issuer, *, workers: int | None = None, chunk: int = DEFAULT_CHUNK) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {chunk}")
        self.issuer = issuer
        self.workers = workers or default_workers()
        self._chunk = chunk
        self._algorithm = issuer.policy.key_algorithm
        # The executor is swapped from the event loop (a storm) and from a warm-up thread (start-up,
        # an intermediate rotation), so the swap is guarded.
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None
        self._key_id: str | None = None
        self._warm_key_id: str | None = None  # the signer of the workers prepare() saw all started
        self._closed = False
        # Workers of executors replaced by a rotation or discarded after a failure: they finish what
        # was queued and exit on their own, but close() must not wait on them unboundedly, nor leave
        # them behind (each holds a signing key).
        # Kept as the executors' own process tables (dicts), not copies: a submit racing with a swap or a
        # close (a warm-up thread for an older signer) may still spawn a worker into a table after it was
        # retired, and close() must reach that worker too.
        self._retired: list[Mapping[int, BaseProcess]] = []

    @property
    def signer_key_id(self) -> str | None:
        """The intermediate the current workers hold (None before the first use and after close)."""
        return self._key_id

    def is_warm(self) -> bool:
        """Whether every worker is started and holds the issuer's current signer (a call would not wait
        for workers to spawn)."""
        try:
            current = self.issuer.signing_context().key_id
        except NotReadyError:
            return False
        return self._warm_key_id == current == self._key_id

    def _executor_for(self, context: SigningContext) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise SigningPoolError("the signing pool is closed")
            if self._executor is not None and self._key_id == context.key_id:
                return self._executor
            if self._executor is not None:
                # Neither waiting nor cancelling: chunks already queued (a storm in flight while the
                # intermediate rotates) are still signed under the old intermediate, which stays valid
                # until its leaves expire; then the old workers exit.
                self._retire(self._executor)
                self._executor.shutdown(wait=False)
            assert context.signer.key is not None  # SigningContext.of guarantees it
            key_pem = context.signer.key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            # spawn, not fork: the daemon runs grpc and asyncio threads that must not be forked.
            self._executor = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=init_worker,
                initargs=(context.key_id, context.signer.cert.public_bytes(serialization.Encoding.PEM), key_pem))
            self._key_id = context.key_id
            return self._executor

    def _retire(self, executor: ProcessPoolExecutor) -> None:
        """Remember ``executor``'s workers until they exit (call with ``_lock`` held, before its shutdown)."""
        # _processes is the executor's own table of its workers (set to None by shutdown): the only way
        # to reach them, and ProcessPoolExecutor has had it since 3.2.
        self._retired = [table for table in self._retired if any(p.is_alive() for p in list(table.values()))]
        if executor._processes is not None:
            self._retired.append(executor._processes)

    def _discard(self, executor: ProcessPoolExecutor) -> None:
        """Forget a broken executor so the next call starts fresh workers."""
        with self._lock:
            if self._executor is executor:
                self._executor = None
                self._key_id = None
            self._retire(executor)
        executor.shutdown(wait=False, cancel_futures=True)

    def prepare(self, context: SigningContext) -> None:
        """Start every worker for ``context`` now (each spends a few hundred ms importing), not in a storm.

        Blocking: call it from a thread (:class:`SigningPoolComponent` does).
        """
        executor = self._executor_for(context)
        try:
            now = dt.datetime.now(dt.UTC)
            futures = [executor.submit(sign_chunk, context.key_id, (), now, now, self._algorithm)
                       for _ in range(self.workers * 2)]
        except RuntimeError:  # shut down under us: a newer signer's warm-up or close() replaced it
            raise SigningPoolError("the pool's workers were replaced during warm-up") from None
        for future in futures:
            future.result()
        self._warm_key_id = context.key_id

    def warm_up(self) -> None:
        """:meth:`prepare` for the issuer's current signer."""
        self.prepare(self.issuer.signing_context())

    async def issue_many(
        self, spiffe_ids: Sequence[SpiffeId], *, now: dt.datetime, ttl: dt.timedelta | None = None,
        on_chunk: ChunkSink | None = None,
    ) -> list[SignedSvid]:
        """A new key (PKCS#8 PEM) and SVID per identity, in order; the event loop stays free while workers sign.

        ``on_chunk`` gets each chunk on the event loop as soon as it is signed, with the index of its first
        identity, so a storm's first certificates are installed and pushed while the rest is signed.  It is
        never called once this method has raised: the chunks still signing are cancelled first.

        Raises:
            NotReadyError: if the CA cannot sign (no active intermediate).
            PolicyViolationError: if an identity is of another trust domain.
            SigningPoolError: if the pool is closed or a worker died (the next call starts new workers).
        """
        plan = self.issuer.plan_batch(spiffe_ids, now=now, ttl=ttl)
        context = plan.context
        executor = self._executor_for(context)
        loop = asyncio.get_running_loop()
        not_before, not_after, assemble = plan.not_before, plan.not_after, self.issuer.assemble

        async def one_chunk(start: int, chunk: Sequence[SpiffeId]) -> list[SignedSvid]:
            # Each chunk is wrapped as soon as it returns, overlapping the parent's share with the workers.
            signed = await loop.run_in_executor(executor, sign_chunk, context.key_id, [str(s) for s in chunk],
                                                not_before, not_after, self._algorithm, plan.encoder)
            out = [SignedSvid(key_pem, assemble(spiffe_id, leaf, serial, context, not_before=not_before,
                                                not_after=not_after, now=now), seconds)
                   for spiffe_id, leaf, serial, key_pem, seconds in zip(chunk, *signed, strict=True)]
            if on_chunk is not None:
                try:
                    on_chunk(start, out)
                except Exception as exc:
                    raise _SinkError(exc) from exc  # the caller's own failure, not the pool's
            return out

        tasks = [asyncio.ensure_future(one_chunk(start, spiffe_ids[start:end]))
                 for start, end in chunk_bounds(len(spiffe_ids), self.workers, self._chunk)]
        try:
            try:
                results = await asyncio.gather(*tasks)
            except BaseException:
                # gather leaves the other chunks running: stop them before the caller hears of the failure,
                # so none reaches on_chunk after it (a cancelled task never resumes past its await).
                for chunk_task in tasks:
                    chunk_task.cancel()
                raise
        except _SinkError as exc:
            raise exc.error from None  # the workers are fine: nothing to discard or to call a pool failure
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # our caller is being cancelled: not a pool failure
            # The executor cancelled our chunks: the pool was closed while we waited.
            raise SigningPoolError("signing pool closed during a batch") from None
        except (BrokenExecutor, RuntimeError) as exc:
            # A worker died (OOM killer, a signal) or the executor was shut down before our submit.
            self._discard(executor)
            raise SigningPoolError(f"signing pool failed: {type(exc).__name__}: {exc}") from exc
        return [item for chunk_result in results for item in chunk_result]

    def close(self) -> None:
        """Stop every worker, current and retired, within :data:`CLOSE_GRACE` (then kill), and refuse
        further work.  Blocking: the component calls it from a thread."""
        with self._lock:
            self._closed = True
            executor, self._executor, self._key_id = self._executor, None, None
            if executor is not None:
                self._retire(executor)
            tables, self._retired = self._retired, []
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        # After every shutdown: no table can gain a worker any more.
        workers = list({p.pid: p for table in tables for p in list(table.values())}.values())
        deadline = time.monotonic() + CLOSE_GRACE.total_seconds()
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        for worker in workers:
            if worker.is_alive():
                # Still importing or mid-chunk past the grace: nothing durable runs in a worker.
                worker.kill()
                worker.join(1)


class SigningPoolComponent:
    """Lifecycle of the daemon's pool (``App.components``): workers ready before the first storm.

    Warm-up runs in a thread after start (spawning must not delay readiness) and again whenever the
    active intermediate changes, so a rotation storm finds workers that already hold the new signer.
    """

    name = "signing-pool"

    def __init__(self, pool: SigningPool) -> None:
        self.pool = pool
        self._running = False
        # One warm-up at a time: a burst of rotations (20 forced at once) must not spawn a set of workers
        # per rotation.  A change seen while warming marks ``_rewarm``; the running warm-up then loops once
        # more for whatever signer is current by then (intermediate ones are skipped, never spawned).
        self._warming: asyncio.Task[None] | None = None
        self._rewarm = False

    async def start(self) -> None:
        self._running = True
        self._warm()

    def on_state_change(self, change: StateChange) -> None:
        """State reaction (registered by the assembly): a new active intermediate gets warm workers."""
        if self._running and _active_signer(change.new) not in (None, self.pool.signer_key_id):
            self._warm()

    def _warm(self) -> None:
        if self._warming is not None and not self._warming.done():
            self._rewarm = True
            return
        self._warming = asyncio.get_running_loop().create_task(self._warm_until_current())

    async def _warm_until_current(self) -> None:
        while True:
            self._rewarm = False
            try:
                context = self.pool.issuer.signing_context()
            except NotReadyError:
                return  # nothing to sign with (intermediate-only mode without a key): workers start on demand
            if context.key_id != self.pool.signer_key_id:
                await self._prepare(context)
            if not self._rewarm:
                return

    async def _prepare(self, context: SigningContext) -> None:
        try:
            await asyncio.to_thread(self.pool.prepare, context)
            log.info("signing pool ready", extra={"workers": self.pool.workers, "key_id": context.key_id})
        except SigningPoolError:
            pass  # closed while warming: shutting down
        except Exception:
            # A storm would start workers on demand; warming is only an optimisation.
            log.exception("signing pool warm-up failed")

    async def stop(self) -> None:
        self._running = False
        self._rewarm = False
        await asyncio.to_thread(self.pool.close)
        if self._warming is not None:
            await asyncio.gather(self._warming, return_exceptions=True)


def _active_signer(state: AuthorityState) -> str | None:
    active = state.of_kind(CAKind.INTERMEDIATE, SlotState.ACTIVE)
    return active[0].key_id if active else None
