"""The service's lifecycle (DESIGN §6): database, health server, leadership, jobs, shutdown.

:func:`run_service` is ``revisit run``:

1. open the database (starting the embedded cluster when no URL is set) and
   migrate it;
2. serve ``/healthz``, ``/readyz``, ``/metrics`` and the web map of the
   change estimates (``/``, docs/web-map.md) on 127.0.0.1;
3. wait as a standby until this process holds the leader lock (at once when
   no other ``revisit run`` leads this database);
4. as leader: add the bootstrap AOI to an empty database, start the scheduler
   and its jobs (and ``daemon.ingest_workers`` supervised ``revisit ingest
   --worker`` children, if any), and watch the lock, the clock
   (``--duration``) and the learner's step (``--until-step``);
5. on SIGINT/SIGTERM (or the bound): stop scheduling, let the running jobs end
   (the learning chunk after its current step), checkpoint the learner,
   release the lock, close the database (the embedded cluster stops when this
   was its last user). The process then exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

from sqlalchemy.exc import DBAPIError

from revisit.config import Settings
from revisit.daemon.health import HealthServer
from revisit.daemon.jobs import JobContext, bootstrap
from revisit.daemon.leader import MAX_RETRY_S, LeaderLock
from revisit.daemon.metrics import Metrics
from revisit.daemon.scheduler import DaemonScheduler
from revisit.daemon.supervisor import Supervisor, ingest_worker_specs
from revisit.db import daemon as daemon_db
from revisit.db.engine import Database
from revisit.db.migrate import upgrade
from revisit.db.status import DatabaseStatus, collect_status
from revisit.ingest.chips import ChipStore

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Seconds between two checks that the leader lock's session is still there.
LOCK_CHECK_S = 5.0


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Set ``stop`` on SIGINT/SIGTERM while inside the block; restore the old handlers after."""

    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def check_sources(settings: Settings) -> None:
    """Build (and close) every source the daemon will ingest from, so a bad one stops it now.

    Raises:
        ConfigError: A source lacks what it needs (a path, credentials).
    """
    from revisit.ingest.sources import build_source

    for name in settings.daemon.sources:
        build_source(name, settings).close()


@dataclass
class _Role:
    """What ``/readyz`` reports: this process's role and, as leader, its scheduler and learner."""

    db: Database
    settings: Settings
    scheduler: DaemonScheduler | None = None
    ctx: JobContext | None = None

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        checks: dict[str, str] = {}
        try:
            with self.db.engine.connect() as conn:
                daemon_db.ping(conn)
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"unreachable: {type(exc).__name__}: {exc}".splitlines()[0]
        scheduler, ctx = self.scheduler, self.ctx
        role = "leader" if scheduler is not None else "standby"
        if scheduler is not None and ctx is not None:
            checks["scheduler"] = "running" if scheduler.running else "stopped"
            idle = time.monotonic() - ctx.learner.last_progress
            limit = self.settings.daemon.stall_after_s
            checks["learner"] = (
                f"ok (step {ctx.learner.step})" if idle <= limit else f"stalled for {idle:.0f} s"
            )
        ready = all(v == "ok" or v == "running" or v.startswith("ok ") for v in checks.values())
        return ready, {"role": role, "checks": checks}


def run_service(
    settings: Settings,
    *,
    duration_s: float | None = None,
    until_step: int | None = None,
    stop: threading.Event | None = None,
    report: Callable[[Database, DatabaseStatus], None] | None = None,
) -> None:
    """Run revisit until ``stop`` is set, a signal arrives, or a bound is reached.

    Args:
        settings: The validated settings.
        duration_s: Stop after this many seconds (standby time included).
        until_step: Stop once the learner has reached this step.
        stop: An event that ends the run when set; SIGINT and SIGTERM set it.
        report: Called once the database is up and migrated, with its status.

    Raises:
        ConfigError: A source in ``daemon.sources`` cannot be built.
        DatabaseError: The database could not be started, reached or migrated.
        HealthServerError: The health port is taken.
    """
    stop = stop or threading.Event()
    check_sources(settings)
    started = time.monotonic()
    runner = f"{socket.gethostname()}:{os.getpid()}"

    def bound_reached(ctx: JobContext | None) -> bool:
        if duration_s is not None and time.monotonic() - started >= duration_s:
            log.info("run duration of %g s reached", duration_s)
            return True
        if until_step is not None and ctx is not None and ctx.learner.step >= until_step:
            log.info("the learner reached step %d (--until-step)", ctx.learner.step)
            return True
        return False

    with stop_on_signals(stop), Database(settings) as db:
        log.info("database up", extra={"database": db.display_url()})
        upgrade(db.engine)
        with db.engine.connect() as conn:
            status = collect_status(conn)
        log.info("schema at revision %s", status.revision, extra={"revision": status.revision})
        if report is not None:
            report(db, status)
        metrics = Metrics()
        role = _Role(db=db, settings=settings)
        lock = LeaderLock(db.engine)
        with HealthServer(
            port=settings.daemon.http_port,
            metrics=metrics,
            readiness=role.readiness,
            engine=db.engine,
        ):
            log.info("revisit is running; send SIGINT or SIGTERM to stop")
            try:
                waiting_logged = False
                failed_leads = 0
                while not stop.is_set() and not bound_reached(None):
                    if not lock.try_acquire():
                        if not waiting_logged and not lock.failures:
                            log.info(
                                "standby: another `revisit run` leads this database; "
                                "taking over when it stops"
                            )
                            waiting_logged = True
                        # While the database is away, back off instead of polling it every second.
                        stop.wait(lock.retry_delay_s(settings.daemon.standby_poll_s))
                        continue
                    waiting_logged = False
                    try:
                        lost = _lead(
                            settings=settings,
                            db=db,
                            metrics=metrics,
                            role=role,
                            lock=lock,
                            stop=stop,
                            runner=runner,
                            until_step=until_step,
                            bound_reached=bound_reached,
                        )
                    except DBAPIError as exc:
                        # The database went away while this process took the lead (bootstrap,
                        # the scheduler's start): wait as a standby and try again, not crash.
                        failed_leads += 1
                        reason = str(exc.orig or exc).strip().splitlines()[0:1]
                        log.error(
                            "could not lead: the database failed (%s); waiting as standby",
                            reason[0] if reason else type(exc).__name__,
                        )
                        lock.release()
                        stop.wait(min(settings.daemon.standby_poll_s * 2.0**failed_leads,
                                      MAX_RETRY_S))  # fmt: skip
                        continue
                    failed_leads = 0
                    if not lost:
                        break
            finally:
                lock.release()
        log.info("stopping")
    log.info("stopped cleanly")


def _lead(
    *,
    settings: Settings,
    db: Database,
    metrics: Metrics,
    role: _Role,
    lock: LeaderLock,
    stop: threading.Event,
    runner: str,
    until_step: int | None,
    bound_reached: Callable[[JobContext | None], bool],
) -> bool:
    """Lead until the service stops; returns True when the leadership was lost instead."""
    log.info("leader: this process schedules the jobs of this database", extra={"runner": runner})
    term_stop = threading.Event()
    ctx = JobContext(
        settings=settings,
        engine=db.engine,
        store=ChipStore(settings.data_dir / "chips"),
        metrics=metrics,
        stop=term_stop,
        runner=runner,
        until_step=until_step,
    )
    bootstrap(settings, db.engine)
    scheduler = DaemonScheduler(ctx)
    # daemon.ingest_workers > 0: the ingest jobs plan, and these children ingest.
    workers = Supervisor(ingest_worker_specs(settings)) if settings.daemon.ingest_workers else None
    lost = False
    try:
        scheduler.start()
        if workers is not None:
            workers.start()
        role.scheduler, role.ctx = scheduler, ctx
        metrics.leader.set(1)
        next_check = time.monotonic() + LOCK_CHECK_S
        while not stop.is_set():
            if bound_reached(ctx):
                break
            if time.monotonic() >= next_check:
                if not lock.alive():
                    log.error("lost the leader lock; stopping the jobs and waiting as standby")
                    lost = True
                    break
                try:
                    scheduler.keep_learning()
                except Exception as exc:  # the database may be briefly away; try again later
                    log.warning("could not check the learn job: %s", exc)
                next_check = time.monotonic() + LOCK_CHECK_S
            stop.wait(0.5)
    finally:
        term_stop.set()
        if workers is not None:
            workers.terminate()  # they finish their scenes while the jobs end
        if ctx.learner_children is not None:
            ctx.learner_children.terminate()  # the ranks checkpoint and stop together
        began = time.monotonic()
        log.info("stopping the scheduler; waiting for running jobs to end")
        scheduler.shutdown()
        if workers is not None:
            workers.stop()
        if ctx.learner_children is not None:
            ctx.learner_children.stop()
        try:
            ctx.learner.close(checkpoint=True)
        except Exception as exc:  # the last committed checkpoint stands; the next run resumes there
            log.error("could not checkpoint the learner at shutdown: %s", exc, exc_info=True)
        role.scheduler = role.ctx = None
        metrics.leader.set(0)
        log.info(
            "jobs stopped and learner checkpointed in %.1f s",
            time.monotonic() - began,
            extra={"step": ctx.learner.step},
        )
    return lost
