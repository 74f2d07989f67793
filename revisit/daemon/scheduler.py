"""APScheduler 3 wiring: the jobs, their store in the database, an executor with the context.

Jobs have fixed ids and live in the database's ``scheduler_job`` table
(APScheduler's ``SQLAlchemyJobStore``), so a restart replaces them instead of
adding them twice. Every job is an interval job with ``coalesce=True`` (a long
pause gives one catch-up run, never a storm), ``max_instances=1`` and a
``misfire_grace_time`` (a run later than that is skipped to its next time).
Ingest jobs share one thread, so two of them never ingest the same scene at
once; the others share ``daemon.job_threads`` threads.

Only the leader (see :mod:`revisit.daemon.leader`) builds a scheduler: the
job store cannot be shared by two schedulers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from apscheduler.executors.base import run_job as apscheduler_run_job
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.job import Job
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from revisit.daemon import jobs
from revisit.daemon.jobs import JobContext, JobFunction, run_job
from revisit.db import daemon as daemon_db
from revisit.db.aois import list_aois

log = logging.getLogger(__name__)

INGEST_EXECUTOR = "ingest"


@dataclass(frozen=True)
class JobSpec:
    """One job the daemon schedules.

    Attributes:
        id: Its fixed id.
        func: The job function (module level, so the job store can name it).
        interval_s: Seconds between runs.
        args: Its picklable arguments.
        executor: ``default``, or ``ingest`` for the one-thread ingest pool.
        run_at_start: First run as soon as the leader starts, not one interval later.
    """

    id: str
    func: JobFunction
    interval_s: float
    args: tuple[Any, ...] = ()
    executor: str = "default"
    run_at_start: bool = False
    trigger: IntervalTrigger = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "trigger", IntervalTrigger(seconds=self.interval_s, timezone=UTC))


def job_specs(ctx: JobContext, aois: list[str]) -> list[JobSpec]:
    """Every job for these settings and AOIs: ids, functions, intervals."""
    d = ctx.settings.daemon
    specs: list[JobSpec] = []
    for source in d.sources:
        for aoi in (None, *aois):  # every location, then each AOI with its own cursor
            specs.append(
                JobSpec(
                    jobs.ingest_job_id(source, aoi),
                    jobs.ingest,
                    d.ingest_every_s,
                    args=(source, aoi),
                    executor=INGEST_EXECUTOR,
                    run_at_start=True,
                )
            )
    specs += [
        JobSpec(jobs.LEARN, jobs.learn, d.learn_every_s, run_at_start=True),
        JobSpec(jobs.REFIT, jobs.refit, d.refit_every_s),
        JobSpec(jobs.EXPORT_ONNX, jobs.export_onnx, d.export_every_s),
        JobSpec(jobs.HOUSEKEEPING, jobs.housekeeping, d.housekeeping_every_s),
        JobSpec(jobs.AOI_SYNC, jobs.aoi_sync, d.ingest_every_s),
        JobSpec(
            jobs.ALERTS,
            jobs.deliver_alerts,
            ctx.settings.alerts.deliver_every_s,
            run_at_start=True,
        ),
    ]
    specs += [
        JobSpec(jobs.changemap_job_id(aoi), jobs.export_changemap, d.changemap_every_s, (aoi,))
        for aoi in aois
    ]
    return specs


class _BoundJob:
    """What APScheduler's ``run_job`` needs of a job, with the context bound into the call."""

    def __init__(self, job: Job, func: Callable[..., Any]) -> None:
        self.id = job.id
        self.misfire_grace_time = job.misfire_grace_time
        self.args: tuple[Any, ...] = ()
        self.kwargs: dict[str, Any] = {}
        self.func = func
        self._name = str(job)

    def __str__(self) -> str:
        return self._name


class RunningJobs:
    """Which jobs are running now, so that shutdown can wait for them without APScheduler's locks.

    (APScheduler's own ``shutdown(wait=True)`` waits while holding the job
    store's lock, which a running job needs to look up its next run time.)
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running: dict[str, int] = {}

    def started(self, job_id: str) -> None:
        with self._cond:
            self._running[job_id] = self._running.get(job_id, 0) + 1

    def finished(self, job_id: str) -> None:
        with self._cond:
            self._running[job_id] -= 1
            if not self._running[job_id]:
                del self._running[job_id]
            self._cond.notify_all()

    def ids(self) -> list[str]:
        """The ids of the jobs running now."""
        with self._cond:
            return sorted(self._running)

    def wait_idle(self, *, report_every_s: float = 10.0) -> None:
        """Wait until no job runs, logging which ones still do every ``report_every_s``."""
        with self._cond:
            while self._running:
                if not self._cond.wait(timeout=report_every_s) and self._running:
                    log.info("still waiting for jobs: %s", ", ".join(sorted(self._running)))


class ContextExecutor(ThreadPoolExecutor):  # type: ignore[misc]
    """A thread pool executor that runs each job through :func:`run_job` with the context.

    Stored jobs name a module-level function and its arguments only; the live
    dependencies (engine, learner, metrics) come from here.
    """

    def __init__(
        self,
        ctx: JobContext,
        running: RunningJobs,
        *,
        max_workers: int,
        closing: Callable[[], bool] = lambda: False,
    ) -> None:
        super().__init__(max_workers=max_workers)
        self._ctx = ctx
        self._tracker = running
        self._closing = closing

    def _do_submit_job(self, job: Job, run_times: list[datetime]) -> None:
        ctx, tracker = self._ctx, self._tracker
        if self._closing():
            # APScheduler's thread looks at the due jobs once more after shutdown() has
            # stopped the pools, and logs the refused submission as an error with its
            # traceback (agronholm/apscheduler#985, 3.11 included). A closing service starts
            # no job: it says so quietly.
            log.debug("job %s not started: the scheduler is shutting down", job.id)
            return

        def call() -> jobs.JobResult:
            return run_job(ctx, job.id, job.func, tuple(job.args), dict(job.kwargs))

        def done(f: Future[Any]) -> None:
            tracker.finished(job.id)
            exc = f.exception()
            if exc is not None:
                self._run_job_error(job.id, exc, exc.__traceback__)
            else:
                self._run_job_success(job.id, f.result())
            # Only now is the run no longer an instance: resuming earlier could see the next
            # run refused as a second one.
            if ctx.take_resume(job.id) and ctx.scheduler is not None:
                try:
                    ctx.scheduler.resume(job.id)
                except Exception as exc:  # the leader's watch resumes it later
                    log.warning("could not resume job %s: %s", job.id, exc)

        tracker.started(job.id)

        future = self._pool.submit(
            apscheduler_run_job, _BoundJob(job, call), job._jobstore_alias, run_times,
            self._logger.name,
        )  # fmt: skip
        future.add_done_callback(done)


class DaemonScheduler:
    """The leader's scheduler: builds the jobs, keeps them in step with the AOIs, stops.

    Args:
        ctx: The jobs' context; this scheduler attaches itself as ``ctx.scheduler``.
    """

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        d = ctx.settings.daemon
        self.running_jobs = RunningJobs()
        self._closing = False
        self._scheduler = BackgroundScheduler(
            jobstores={"default": daemon_db.JobStore(ctx.engine)},
            executors={
                "default": ContextExecutor(
                    ctx, self.running_jobs, max_workers=d.job_threads, closing=self._is_closing
                ),
                INGEST_EXECUTOR: ContextExecutor(
                    ctx, self.running_jobs, max_workers=1, closing=self._is_closing
                ),
            },
            job_defaults={
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": max(1, int(d.misfire_grace_s)),
            },
            timezone=UTC,
        )
        ctx.scheduler = self

    def _is_closing(self) -> bool:
        return self._closing

    @property
    def running(self) -> bool:
        """Whether the scheduler is started and not shut down."""
        return bool(self._scheduler.running)

    def start(self) -> None:
        """Start with the stored jobs replaced by this run's, keeping their next run times.

        A job whose trigger is unchanged keeps the next run time it had in the
        store (so a restart neither repeats nor delays it); ingest and learning
        start at once.
        """
        self._scheduler.start(paused=True)
        self._reconcile(initial=True)
        self._scheduler.resume()
        log.info(
            "scheduler started with %d jobs",
            len(self._scheduler.get_jobs()),
            extra={"jobs": sorted(job.id for job in self._scheduler.get_jobs())},
        )

    def shutdown(self) -> None:
        """Stop scheduling and wait for the jobs that are running to end.

        Set the jobs' stop event first: a learning chunk then ends after its
        current step, an ingest run after its current scene.
        """
        self._closing = True  # from here on, jobs no longer ask the scheduler anything
        if self._scheduler.running:
            self._scheduler.pause()
            self.running_jobs.wait_idle()
            self._scheduler.shutdown(wait=True)

    def sync(self) -> list[str]:
        """Add the jobs of AOIs created since, remove those of AOIs deleted; returns their ids."""
        if self._closing:
            return []
        return self._reconcile(initial=False)

    def _reconcile(self, *, initial: bool) -> list[str]:
        with self.ctx.engine.connect() as conn:
            aois = sorted(a.name for a in list_aois(conn))
        specs = {spec.id: spec for spec in job_specs(self.ctx, aois)}
        existing = {job.id: job for job in self._scheduler.get_jobs()}
        changed: list[str] = []
        now = datetime.now(UTC)
        for job_id, spec in specs.items():
            old = existing.get(job_id)
            if not initial and old is not None:
                continue
            kwargs: dict[str, Any] = {}
            if (
                old is not None
                and old.next_run_time is not None
                and (str(old.trigger) == str(spec.trigger))
            ):
                kwargs["next_run_time"] = old.next_run_time
            if spec.run_at_start:
                kwargs["next_run_time"] = now
            self._scheduler.add_job(
                spec.func,
                trigger=spec.trigger,
                args=spec.args,
                id=job_id,
                name=job_id,
                executor=spec.executor,
                replace_existing=True,
                **kwargs,
            )
            if old is None:
                changed.append(job_id)
        for job_id in existing.keys() - specs.keys():
            self._scheduler.remove_job(job_id)
            changed.append(job_id)
        if initial or changed:
            self._record_next_runs()
        if changed and not initial:
            log.info("jobs changed with the AOIs: %s", ", ".join(changed))
        return changed

    def _record_next_runs(self) -> None:
        with self.ctx.engine.begin() as conn:
            daemon_db.schedule_job_runs(
                conn,
                next_runs={job.id: job.next_run_time for job in self._scheduler.get_jobs()},
                runner=self.ctx.runner,
            )

    def keep_learning(self) -> None:
        """Resume the learn job if it is paused while not running (its resume failed)."""
        if self._closing or jobs.LEARN in self.running_jobs.ids():
            return
        job = self._scheduler.get_job(jobs.LEARN)
        if job is not None and job.next_run_time is None:
            log.warning("the learn job was left paused; resuming it")
            self._scheduler.resume_job(jobs.LEARN)

    # -- what jobs may ask (jobs.SchedulerControl) --------------------------------------------

    def wake(self, job_id: str) -> None:
        """Run a job now instead of at its next time (unless it is running already)."""
        if self._closing or job_id in self.running_jobs.ids():
            return
        try:
            self._scheduler.modify_job(job_id, next_run_time=datetime.now(UTC))
        except JobLookupError:
            log.warning("cannot wake job %s: no such job", job_id)

    def pause(self, job_id: str) -> None:
        """Keep a job from starting again until :meth:`resume`."""
        if not self._closing:
            self._scheduler.pause_job(job_id)

    def resume(self, job_id: str) -> None:
        """Schedule a paused job again from its trigger."""
        if not self._closing:
            self._scheduler.resume_job(job_id)

    def next_run_time(self, job_id: str) -> datetime | None:
        """When a job runs next; None when paused, gone, or shutting down."""
        if self._closing:
            return None
        job = self._scheduler.get_job(job_id)
        return None if job is None else job.next_run_time
