"""Ingest workers: any number of processes, on any machines, sharing one database's scenes.

A plan (:meth:`~revisit.ingest.pipeline.IngestPipeline.plan`, ``revisit ingest
--plan``, or the daemon's ingest jobs when ``daemon.ingest_workers`` > 0)
queues the scenes a search finds in the work table ``ingest_task``. Each
:class:`IngestWorker` (``revisit ingest --worker``) then loops:

1. claim the oldest claimable task of its sources (``SELECT … FOR UPDATE SKIP
   LOCKED``: queued, or claimed under a lease that ran out) and commit the
   lease (``ingest.lease_s``, on the database's clock);
2. ingest the scene exactly as a single process does, while a thread renews
   the lease every third of it;
3. in the scene's own transaction: the scene's rows, the task marked done, and
   the cursor moved over the finished tasks. If the lease was lost meanwhile
   (the worker hung past it and another claimed the scene) that transaction
   rolls back: a scene is committed once, by its lease holder.

A worker killed mid-scene leaves a claimed task whose lease runs out; another
worker claims it then (the kill leaves at most chip files no row names). Each
claim counts as an attempt: a scene that fails (or kills its worker)
``ingest.max_attempts`` times is failed and quarantined as ``ingest-failed``,
and the cursor goes past it, as past any quarantined input. A source outage or
a full chip store gives the scene back uncounted, and the worker waits before
claiming again.

Chips are files under ``data_dir/chips``: workers on several machines must
share that directory (a network filesystem), as they share the database.

A first SIGTERM or SIGINT (see :func:`stop_on_signals`) lets the current scene
finish and ends the loop; a second one abandons the scene, gives the task
back, and exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import FrameType
from typing import TYPE_CHECKING

from revisit.config import IngestSettings
from revisit.db import ingest_tasks, quarantine
from revisit.errors import IngestError, TransientError
from revisit.ingest import reasons
from revisit.ingest.chips import ChipStore
from revisit.ingest.pipeline import IngestPipeline, IngestSummary
from revisit.ingest.sources.base import SceneSource
from revisit.logs import log_context

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

    from revisit.db.ingest_tasks import Task
    from revisit.types import SceneRef

log = logging.getLogger(__name__)

#: The longest wait after a source outage or a database error before claiming again.
MAX_BACKOFF_S = 60.0


class LeaseLostError(IngestError):
    """A worker's lease ran out and another worker claimed its scene; its attempt rolls back."""


class WorkerInterrupted(BaseException):
    """A second stop signal: abandon the scene in progress (it goes back to the queue)."""


def worker_name() -> str:
    """``host:pid:nonce``: unique among all workers, also after a pid is reused."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class WorkerSummary:
    """What a worker did.

    Attributes:
        tasks: Tasks finished (done): scenes ingested, skipped or quarantined as bad input.
        scenes: Scenes ingested (rows committed).
        chips: Chips committed.
        skipped: Scenes with nothing left to read.
        quarantined: Inputs quarantined (whole products and chips, ``ingest-failed`` included).
        failed: Tasks failed for good after ``ingest.max_attempts``.
        released: Tasks given back to the queue (an error to retry, an outage, a stop).
        lost: Attempts rolled back because the lease was lost.
        seconds: Time the loop ran.
    """

    tasks: int = 0
    scenes: int = 0
    chips: int = 0
    skipped: int = 0
    quarantined: int = 0
    failed: int = 0
    released: int = 0
    lost: int = 0
    seconds: float = 0.0

    def add(self, scene: IngestSummary) -> None:
        """Count one scene's summary in."""
        self.scenes += scene.scenes
        self.chips += scene.chips
        self.skipped += scene.skipped
        self.quarantined += scene.quarantined


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM/SIGINT set ``stop``; a second one raises :class:`WorkerInterrupted`.

    Only in the main thread; the previous handlers come back on leaving.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            log.warning("received %s again; giving the scene in progress back", name)
            raise WorkerInterrupted(name)
        log.info("received %s; stopping after the scene in progress", name)
        stop.set()

    sigs = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, handler) for sig in sigs}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class _Lease:
    """Renews a task's lease on a thread of its own every third of ``lease_s``.

    Args:
        engine: The database.
        task: The claimed task.
        owner: The worker holding it.
        lease_s: The lease's length.
    """

    def __init__(self, engine: Engine, task: Task, *, owner: str, lease_s: float) -> None:
        self.engine = engine
        self.task = task
        self.owner = owner
        self.lease_s = lease_s
        self.lost = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{task.id}", daemon=True)

    def __enter__(self) -> _Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=self.lease_s)

    def _renew(self) -> None:
        while not self._done.wait(self.lease_s / 3):
            try:
                with self.engine.begin() as conn:
                    held = ingest_tasks.renew(
                        conn, task_id=self.task.id, owner=self.owner, lease_s=self.lease_s
                    )
            except Exception as exc:  # the database may be briefly away: try again
                log.warning("could not renew the lease of task %d: %s", self.task.id, exc)
                continue
            if not held:
                if not self._done.is_set():
                    self.lost.set()
                return


class IngestWorker:
    """Claims planned scenes and ingests them, one at a time, until stopped.

    Args:
        engine: The database.
        store: The chip store (shared storage when workers run on several machines).
        sources: The sources this worker ingests from, by name; it claims only their tasks.
        settings: Chip checks, and the lease, attempts and idle poll of workers.
        owner: The worker's name in ``ingest_task.lease_owner``; unique by default.
        stop: Set to end the loop after the scene in progress.
        clock: The present, for the pipeline's checks.
    """

    def __init__(
        self,
        engine: Engine,
        store: ChipStore,
        sources: Mapping[str, SceneSource],
        *,
        settings: IngestSettings | None = None,
        owner: str | None = None,
        stop: threading.Event | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if not sources:
            raise ValueError("an ingest worker needs at least one source")
        self.engine = engine
        self.settings = settings or IngestSettings()
        self.owner = owner or worker_name()
        self.stop = stop or threading.Event()
        self.pipelines = {
            name: IngestPipeline(engine, store, source, settings=self.settings, clock=clock)
            for name, source in sources.items()
        }
        self.sources = sorted(self.pipelines)

    def run(
        self,
        *,
        max_tasks: int | None = None,
        drain: bool = False,
        parent_pid: int | None = None,
        on_task: Callable[[Task, WorkerSummary], None] | None = None,
    ) -> WorkerSummary:
        """Claim and ingest scenes until stopped, or until a bound below.

        Args:
            max_tasks: End after handling this many tasks (finished, failed or given back).
            drain: End once no task of this worker's sources is queued or claimed
                (it waits for other workers' leases, which may run out).
            parent_pid: End when this process's parent is no longer that process
                (a worker started by a daemon that died).
            on_task: Called after each task handled.

        Returns:
            What the worker did.

        Raises:
            WorkerInterrupted: A second stop signal; the scene in progress was given back.
        """
        began = time.monotonic()
        summary = WorkerSummary()
        handled = 0
        backoff = 0.0
        poll = self.settings.worker_poll_s
        log.info(
            "ingest worker starts",
            extra={"worker": self.owner, "sources": self.sources, "lease_s": self.settings.lease_s},
        )
        while not self.stop.is_set():
            if max_tasks is not None and handled >= max_tasks:
                break
            if parent_pid is not None and os.getppid() != parent_pid:
                log.warning("the process that started this worker is gone; stopping")
                break
            if backoff:
                self.stop.wait(backoff)
                if self.stop.is_set():
                    break
            try:
                task = self._claim(summary)
            except Exception as exc:  # the database is away: back off, the lease will do
                backoff = min(max(backoff * 2, poll), MAX_BACKOFF_S)
                log.warning("could not claim a scene (retrying in %.0f s): %s", backoff, exc)
                continue
            if task is None:
                backoff = 0.0
                if drain and self._drained():
                    log.info("no scene left to ingest; the worker ends (--drain)")
                    break
                self.stop.wait(poll)
                continue
            handled += 1
            outage = self._work(task, summary)
            backoff = min(max(backoff * 2, poll), MAX_BACKOFF_S) if outage else 0.0
            if on_task is not None:
                on_task(task, summary)
        summary.seconds = time.monotonic() - began
        log.info(
            "ingest worker stops",
            extra={
                "worker": self.owner,
                "tasks": summary.tasks,
                "scenes": summary.scenes,
                "chips": summary.chips,
                "failed": summary.failed,
                "released": summary.released,
                "seconds": round(summary.seconds, 3),
            },
        )
        return summary

    # -- one task ----------------------------------------------------------------------------

    def _claim(self, summary: WorkerSummary) -> Task | None:
        """Fail the tasks whose last allowed lease ran out, then claim the next one."""
        max_attempts = self.settings.max_attempts
        with self.engine.begin() as conn:
            exhausted = ingest_tasks.take_exhausted(
                conn,
                sources=self.sources,
                max_attempts=max_attempts,
                error=f"the lease ran out on attempt {max_attempts} of {max_attempts}",
            )
            for failed in exhausted:
                self._quarantine(conn, failed, detail=f"its worker died {max_attempts} times")
            for source, aoi_id in {(t.source, t.aoi_id) for t in exhausted}:
                ingest_tasks.advance_cursor_to_finished(conn, source=source, aoi_id=aoi_id)
            task = ingest_tasks.claim(
                conn,
                sources=self.sources,
                owner=self.owner,
                lease_s=self.settings.lease_s,
                max_attempts=max_attempts,
            )
        summary.failed += len(exhausted)
        summary.quarantined += len(exhausted)
        for failed in exhausted:
            log.error(
                "scene failed for good: its lease ran out %d times",
                max_attempts,
                extra={"task": failed.id, "scene": failed.product_id},
            )
        return task

    def _drained(self) -> bool:
        with self.engine.connect() as conn:
            return ingest_tasks.unfinished(conn, sources=self.sources) == 0

    def _work(self, task: Task, summary: WorkerSummary) -> bool:
        """Ingest one claimed task and end it; True after a source outage (back off).

        Raises:
            WorkerInterrupted: A second stop signal; the task was given back.
        """
        pipeline = self.pipelines[task.source]
        with log_context(task=task.id, scene=task.product_id, worker=self.owner):
            log.info(
                "scene claimed",
                extra={"attempt": task.attempts, "aoi_id": task.aoi_id, "source": task.source},
            )
            try:
                with _Lease(
                    self.engine, task, owner=self.owner, lease_s=self.settings.lease_s
                ) as lease:
                    result = pipeline.ingest_planned(
                        task.scene, aoi_id=task.aoi_id, finish=self._finisher(task)
                    )
            except LeaseLostError as exc:
                summary.lost += 1
                log.warning("%s", exc)
                return False
            except TransientError as exc:
                self._release(task, error=str(exc), count_attempt=False)
                summary.released += 1
                log.warning("scene given back, uncounted (source or chip store away): %s", exc)
                return True
            except WorkerInterrupted:
                self._release(task, error=None, count_attempt=False, quiet=True)
                summary.released += 1
                raise
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}".replace("\n", " ")
                if task.attempts >= self.settings.max_attempts:
                    self._fail(task, error=error)
                    summary.failed += 1
                    summary.quarantined += 1
                    log.error(
                        "scene failed for good after %d attempts: %s",
                        task.attempts,
                        error,
                        exc_info=True,
                    )
                else:
                    self._release(task, error=error, count_attempt=True)
                    summary.released += 1
                    log.warning(
                        "scene failed on attempt %d of %d; given back: %s",
                        task.attempts,
                        self.settings.max_attempts,
                        error,
                        exc_info=True,
                    )
                return False
            summary.tasks += 1
            summary.add(result)
            log.info(
                "scene done",
                extra={
                    "chips": result.chips,
                    "skipped": result.skipped,
                    "quarantined": result.quarantined,
                    "seconds": round(result.seconds, 3),
                    "lease_renewal_lost": lease.lost.is_set(),
                },
            )
            return False

    def _finisher(self, task: Task) -> Callable[[Connection, SceneRef], None]:
        """The pipeline's ``finish`` for ``task``: done, and the cursor over finished tasks."""

        def finish(conn: Connection, scene: SceneRef) -> None:
            if not ingest_tasks.complete(conn, task_id=task.id, owner=self.owner):
                raise LeaseLostError(
                    f"task {task.id} ({task.product_id}): the lease of {self.owner} ran out and "
                    "another worker claimed the scene; this attempt is rolled back"
                )
            ingest_tasks.advance_cursor_to_finished(conn, source=task.source, aoi_id=task.aoi_id)

        return finish

    def _release(
        self, task: Task, *, error: str | None, count_attempt: bool, quiet: bool = False
    ) -> None:
        try:
            with self.engine.begin() as conn:
                ingest_tasks.release(
                    conn,
                    task_id=task.id,
                    owner=self.owner,
                    error=error,
                    count_attempt=count_attempt,
                )
        except Exception as exc:  # the lease runs out instead
            if not quiet:
                log.warning("could not give task %d back (its lease runs out): %s", task.id, exc)

    def _fail(self, task: Task, *, error: str) -> None:
        with self.engine.begin() as conn:
            if ingest_tasks.fail(conn, task_id=task.id, owner=self.owner, error=error):
                self._quarantine(conn, task, detail=error)
                ingest_tasks.advance_cursor_to_finished(
                    conn, source=task.source, aoi_id=task.aoi_id
                )

    def _quarantine(self, conn: Connection, task: Task, *, detail: str) -> None:
        quarantine.quarantine(
            conn,
            source=task.source,
            ref=task.product_id,
            reason=reasons.INGEST_FAILED,
            detail=f"{task.product_id}: ingest failed {task.attempts} times: {detail}",
            payload={
                "task": task.id,
                "aoi_id": task.aoi_id,
                "attempts": task.attempts,
                "acquired_at": task.acquired_at.isoformat(),
            },
        )
