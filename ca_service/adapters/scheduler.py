"""The scheduler component: APScheduler's AsyncIOScheduler runs one reconcile job every tick.

One job, not one per certificate: renewal times live in the registry's heap, so 100k SVIDs cost
one heap peek per tick.  The job is a coroutine so it runs on the event loop (a plain function would
run in APScheduler's thread pool, next to SDS handlers touching the same registry).
"""

from __future__ import annotations

import logging
from typing import Any

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from ca_service.config import RotationSettings
from ca_service.services.reconciler import Reconciler, ReconcileReport
from ca_service.telemetry import Telemetry

log = logging.getLogger(__name__)

RECONCILE_JOB = "reconcile"


class RotationScheduler:
    """Lifecycle component (``App.components``) ticking :meth:`Reconciler.reconcile`."""

    name = "rotation-scheduler"

    def __init__(self, reconciler: Reconciler, rotation: RotationSettings, telemetry: Telemetry) -> None:
        self._reconciler = reconciler
        self._rotation = rotation
        self._telemetry = telemetry
        self._scheduler: AsyncIOScheduler | None = None
        self.last_report: ReconcileReport | None = None

    async def start(self) -> None:
        # Converge before the first tick: a restart mid-rotation resumes at once, not a tick later.
        try:
            await self.tick()
        except Exception:
            self._telemetry.job_errors.labels(job=RECONCILE_JOB).inc()
            log.exception("initial reconcile pass failed; the scheduler retries every tick")
        scheduler = AsyncIOScheduler(timezone="UTC")
        scheduler.add_listener(self._on_event, EVENT_JOB_ERROR | EVENT_JOB_MISSED)
        scheduler.add_job(
            self.tick, "interval", id=RECONCILE_JOB, seconds=self._rotation.tick_interval.total_seconds(),
            # coalesce: runs missed while the loop was blocked collapse into one (the pass is
            # level-triggered, so one late run does everything the missed ones would have).
            coalesce=True,
            # max_instances=1: two passes at once would race each other's CAS writes.
            max_instances=1,
            # Explicit grace: APScheduler's default of 1 s silently drops a run that starts late.
            misfire_grace_time=max(1, int(self._rotation.misfire_grace.total_seconds())),
        )
        scheduler.start()
        self._scheduler = scheduler
        log.info("rotation scheduler started", extra={"tick_seconds": self._rotation.tick_interval.total_seconds()})

    async def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None

    async def tick(self) -> None:
        self.last_report = await self._reconciler.reconcile()

    def _on_event(self, event: Any) -> None:
        job = getattr(event, "job_id", "?")
        if event.code == EVENT_JOB_ERROR and isinstance(event, JobExecutionEvent):
            self._telemetry.job_errors.labels(job=job).inc()
            log.error("scheduler job failed", exc_info=event.exception, extra={"job": job})
        elif event.code == EVENT_JOB_MISSED:
            self._telemetry.job_misses.labels(job=job).inc()
            log.warning("scheduler job run missed", extra={"job": job,
                                                            "scheduled": str(event.scheduled_run_time)})
