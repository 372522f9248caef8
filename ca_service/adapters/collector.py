"""When the cyclic garbage collector makes its passes: full ones on a schedule, in a quiet moment, not mid-push.

CPython starts a full (generation 2) collection whenever the objects that survived younger
collections grow by a quarter.  A daemon holding 10,000 SDS streams tracks about a million objects
(grpc.aio keeps ~100 per stream), and one full pass over them stops the event loop for 0.6-0.7 s.
The allocation burst of a push to every stream is exactly what triggers one, so a bundle push took
twice as long whenever it landed in it (bench/sds_fanout.py, README "Performance").

So the daemon turns the automatic full pass off and runs it itself every :data:`FULL_INTERVAL`, after
a second without an SDS push (:data:`QUIET`), or :data:`MAX_DEFER` later at the latest, whatever is
going on.  Young collections (generations 0 and 1) run as CPython decides: they are cheap and reclaim
most short-lived cycles.  Everything allocated by start-up (modules, config, CA state) is frozen out of
every pass but the scheduled ones.  Stopping restores CPython's own behaviour.

Young collections are cheap only while the young generations are small, and a push wave fills them
behind CPython's back: a young collection is due after 700 more allocations than deallocations, and a
stream that answers a push frees the objects it waited with (old ones) as it makes new ones (young), so
the count stands still while ~10 objects per stream pile up.  At 10,000 streams the next young pass
found ~96,000 objects (55-95 ms), and the middle generation's pass went over them again: ~210 ms of
GC in a 1.7 s forced re-issue of 5,000 nodes.  So :meth:`CollectorSchedule.wave_started` freezes what
exists when a wave begins (each chunk of a re-issue storm, a storm signed in process, the spread of a
forced re-issue, each trust bundle change): the young passes
of the wave go over the objects the wave makes, not the ones every idle stream already held.  A
scheduled full pass unfreezes, collects everything and freezes again, so a garbage cycle frozen by a
wave lives until the next full pass (:data:`FULL_INTERVAL` + :data:`MAX_DEFER` at most), never longer.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import logging
import time
from collections.abc import Callable

from ca_service.clock import Clock

log = logging.getLogger(__name__)

FULL_INTERVAL = dt.timedelta(minutes=5)
QUIET = dt.timedelta(seconds=1)
MAX_DEFER = dt.timedelta(minutes=5)
# A generation-2 threshold never reached: CPython counts young collections against it.
_NEVER = 2**31 - 1

# Several daemons may run in one process (tests): the first start changes the collector, the last stop
# restores it.
_holders = 0
_saved_threshold: tuple[int, int, int] | None = None


class CollectorSchedule:
    """A component: full collections on a schedule (see the module docstring).

    ``activity`` returns a number that grows with every SDS push (the ACK ledger's push count); a
    collection waits until it stands still for :data:`QUIET`.
    """

    name = "gc-schedule"

    def __init__(self, clock: Clock, activity: Callable[[], int], *, interval: dt.timedelta = FULL_INTERVAL,
                 quiet: dt.timedelta = QUIET, max_defer: dt.timedelta = MAX_DEFER,
                 observe: Callable[[float], None] | None = None) -> None:
        self._clock = clock
        self._activity = activity
        self._observe = observe  # told each pass's duration (ca_gc_full_pass_duration_seconds)
        self._interval, self._quiet, self._max_defer = interval, quiet, max_defer
        self._task: asyncio.Task[None] | None = None
        self.collections = 0  # full passes this schedule ran

    async def start(self) -> None:
        global _holders, _saved_threshold
        if _holders == 0:
            _saved_threshold = gc.get_threshold()
            gc.collect()
            gc.freeze()
            young, middle, _ = _saved_threshold
            gc.set_threshold(young, middle, _NEVER)
        _holders += 1
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        global _holders
        if self._task is None:
            return
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        _holders -= 1
        if _holders == 0 and _saved_threshold is not None:
            gc.set_threshold(*_saved_threshold)
            gc.unfreeze()

    def wave_started(self) -> None:
        """A push to many streams begins: freeze what exists, so the wave's young collections skip it.

        Cheap on the CPython the daemon runs on (3.11, with the GIL: the generations' lists are linked onto
        the frozen one; a free-threaded build walks the heap instead).  Nothing happens unless the schedule
        is running, since only its full passes unfreeze again.
        """
        if self._task is not None and not self._task.done():
            gc.freeze()

    async def _run(self) -> None:
        while True:
            await self._clock.sleep(self._interval)
            await self._wait_for_quiet()
            started = time.perf_counter()
            # Waves froze what they found: give it back to this pass (the start-up heap too, ~60,000
            # objects, ~15 ms), then freeze the survivors again.
            gc.unfreeze()
            found = gc.collect(2)
            gc.freeze()
            seconds = time.perf_counter() - started
            self.collections += 1
            if self._observe is not None:
                self._observe(seconds)
            log.debug("full garbage collection", extra={"collected": found, "seconds": round(seconds, 3)})

    async def _wait_for_quiet(self) -> None:
        deadline = self._clock.now() + self._max_defer
        while self._clock.now() < deadline:
            before = self._activity()
            await self._clock.sleep(self._quiet)
            if self._activity() == before:
                return
