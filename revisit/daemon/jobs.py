"""The daemon's jobs, and the context they run in.

Each job is a plain function of its (picklable) arguments; the scheduler's
executor passes the live :class:`JobContext` as the keyword ``ctx`` (see
:mod:`revisit.daemon.scheduler`), and :func:`run_job` wraps every run: the job's
id goes on every log line, the run is timed, counted in the metrics and
recorded in ``job_run``, and an exception is logged with its traceback and
ends only that run: the job runs again at its next time.

A job returns a :class:`JobResult`: ``ok`` when it did its work, ``skipped``
when there was nothing to do yet (no observations to learn from, no estimates
to map), ``failed`` when it could not.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

from revisit.config import Settings
from revisit.daemon.metrics import Metrics
from revisit.db import alerts as alerts_db
from revisit.db import daemon as daemon_db
from revisit.db import learning
from revisit.db.aois import create_aoi, list_aois
from revisit.db.artifacts import delete_artifacts, list_artifacts
from revisit.db.locations import count_locations, insert_locations
from revisit.db.scenes import referenced_chip_keys
from revisit.fsutil import TMP_SUFFIX
from revisit.ingest.chips import ChipStore
from revisit.logs import log_context
from revisit.memory import trim_heap

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

    from revisit.daemon.supervisor import Supervisor
    from revisit.ingest.pipeline import IngestSummary, PlanSummary
    from revisit.ingest.sources.base import SceneSource
    from revisit.learner.online import OnlineLearner, StepReport
    from revisit.types import SceneRef

log = logging.getLogger(__name__)

Outcome = Literal["ok", "skipped", "failed"]

#: Fixed job ids (AOI and source jobs add their names to these).
LEARN = "learn"
REFIT = "refit"
EXPORT_ONNX = "export:onnx"
HOUSEKEEPING = "housekeeping"
AOI_SYNC = "aoi-sync"
ALERTS = "alerts:deliver"
CHANGEMAP_DIR = "exports/changemaps"
_EXTENSIONS = {"geojson": "geojson", "cog": "tif", "png": "png"}
_CHANGEMAP_KINDS = ("changemap-geojson", "changemap-cog", "quicklook")


def ingest_job_id(source: str, aoi: str | None) -> str:
    """``ingest:<source>`` (every location) or ``ingest:<source>:<aoi>``."""
    return f"ingest:{source}" if aoi is None else f"ingest:{source}:{aoi}"


def changemap_job_id(aoi: str) -> str:
    """``export:changemap:<aoi>``."""
    return f"export:changemap:{aoi}"


@dataclass(frozen=True)
class JobResult:
    """What one run of a job did.

    Attributes:
        outcome: ``ok``, ``skipped`` (nothing to do yet) or ``failed``.
        detail: One line for a person.
    """

    outcome: Outcome
    detail: str


class SchedulerControl(Protocol):
    """What a job may ask of the scheduler that runs it."""

    def wake(self, job_id: str) -> None:
        """Run the job now instead of at its next time."""

    def pause(self, job_id: str) -> None:
        """Keep the job from being started again until :meth:`resume`."""

    def resume(self, job_id: str) -> None:
        """Schedule the job again from its trigger."""

    def next_run_time(self, job_id: str) -> datetime | None:
        """When the job runs next; None when paused or gone."""

    def sync(self) -> list[str]:
        """Add the jobs of new AOIs, remove those of AOIs gone; returns the ids changed."""


class LearnerSlot:
    """The one :class:`OnlineLearner` the daemon keeps open across learning chunks.

    The learn and refit jobs take :attr:`lock` while they use it, so a refit
    never runs in the middle of a chunk; shutdown takes it to close (and
    checkpoint) the learner. (The ONNX export runs in a child process from the
    committed checkpoint, and needs neither.)
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.learner: OnlineLearner | None = None
        self.step = 0
        self.exported_at_step = 0
        self.last_progress = time.monotonic()

    def progressed(self) -> None:
        """The learner took steps, or had nothing to learn from yet: it is not stalled."""
        self.last_progress = time.monotonic()

    def close(self, *, checkpoint: bool = True) -> None:
        """Close the learner (checkpointing its unsaved steps) if it is open."""
        with self.lock:
            self._close(checkpoint=checkpoint)

    def _close(self, *, checkpoint: bool) -> None:
        learner, self.learner = self.learner, None
        if learner is not None:
            learner.close(checkpoint=checkpoint)
            self.step = learner.step


@dataclass
class JobContext:
    """Everything a job needs, built once per leadership by the service.

    Attributes:
        settings: The validated settings.
        engine: The database.
        store: The chip store.
        metrics: The daemon's metrics.
        stop: Set when the service stops (or loses the leadership): jobs end early.
        runner: ``host:pid`` of this daemon, recorded with each run.
        until_step: The learner stops at this step (``revisit run --until-step``).
        learner: The learner kept open across chunks.
        scheduler: The scheduler running the jobs (set once it is built).
        learner_children: With ``daemon.learner_processes`` > 1, the supervised
            ``revisit learn --nproc N`` (started by the learn job once there is
            something to learn from); None otherwise.
    """

    settings: Settings
    engine: Engine
    store: ChipStore
    metrics: Metrics
    stop: threading.Event
    runner: str
    until_step: int | None = None
    learner: LearnerSlot = field(default_factory=LearnerSlot)
    scheduler: SchedulerControl | None = None
    learner_children: Supervisor | None = None
    _last_detail: dict[str, str] = field(default_factory=dict)
    _resume: set[str] = field(default_factory=set)

    def resume_when_done(self, job_id: str) -> None:
        """Ask for a job paused by itself to be resumed once its run has fully ended."""
        self._resume.add(job_id)

    def take_resume(self, job_id: str) -> bool:
        """Whether the run just ended asked to be resumed (the executor asks, once)."""
        if job_id in self._resume:
            self._resume.discard(job_id)
            return True
        return False

    @property
    def control(self) -> SchedulerControl:
        """The scheduler; an error before it is attached."""
        if self.scheduler is None:
            raise RuntimeError("the job context has no scheduler yet")
        return self.scheduler


def _context(ctx: JobContext | None) -> JobContext:
    if ctx is None:
        raise TypeError("daemon jobs run inside `revisit run`, which passes them ctx=")
    return ctx


# -- the wrapper of every run ---------------------------------------------------------------


JobFunction = Callable[..., JobResult]


def run_job(
    ctx: JobContext,
    job_id: str,
    func: JobFunction,
    args: tuple[Any, ...] = (),
    kwargs: Mapping[str, Any] | None = None,
) -> JobResult:
    """Run one job: log with its id, time it, count it, record it; never raise an ``Exception``.

    Args:
        ctx: The daemon's context, passed to the job as ``ctx``.
        job_id: The job's fixed id.
        func: The job function.
        args: Its stored positional arguments.
        kwargs: Its stored keyword arguments.

    Returns:
        What the run did; ``failed`` with the exception when it raised.
    """
    started = datetime.now(UTC)
    began = time.monotonic()
    with log_context(job=job_id):
        try:
            result = func(*args, ctx=ctx, **dict(kwargs or {}))
        except Exception as exc:
            result = JobResult("failed", f"{type(exc).__name__}: {exc}".replace("\n", " "))
            # The traceback once; the same failure again (a job failing every second while
            # something is wrong) is one line.
            again = ctx._last_detail.get(job_id) == result.detail
            log.log(
                logging.WARNING if again else logging.ERROR,
                "job %s failed%s; it runs again at its next time: %s",
                job_id,
                " again" if again else "",
                result.detail,
                exc_info=not again,
                extra={"job": job_id, "outcome": "failed"},
            )
        else:
            if result.outcome == "failed":  # a failure the job reported itself
                log.warning(
                    "job %s failed; it runs again at its next time: %s",
                    job_id,
                    result.detail,
                    extra={"job": job_id, "outcome": "failed"},
                )
        seconds = time.monotonic() - began
        # What the run freed (a chunk's activations, an ingest run's rasters) goes back to
        # the system instead of staying in the C heap of a process that runs for months.
        trim_heap(collect=False)
        if result.outcome == "ok":
            log.info(
                "job %s done in %.1f s: %s",
                job_id,
                seconds,
                result.detail,
                extra={"job": job_id, "outcome": "ok", "seconds": round(seconds, 3)},
            )
        elif result.outcome == "skipped":
            # A job waiting for data says so once, not at every run.
            level = logging.INFO if ctx._last_detail.get(job_id) != result.detail else logging.DEBUG
            log.log(
                level,
                "job %s skipped: %s",
                job_id,
                result.detail,
                extra={"job": job_id, "outcome": "skipped"},
            )
        ctx._last_detail[job_id] = result.detail
        ctx.metrics.job_ran(job=job_id, outcome=result.outcome, seconds=seconds)
        try:
            next_run = ctx.scheduler.next_run_time(job_id) if ctx.scheduler else None
            if next_run is None and job_id in ctx._resume:  # resumed right after this record
                next_run = datetime.now(UTC) + timedelta(seconds=ctx.settings.daemon.learn_every_s)
            with ctx.engine.begin() as conn:
                daemon_db.record_job_run(
                    conn,
                    job_id=job_id,
                    started_at=started,
                    finished_at=datetime.now(UTC),
                    outcome=result.outcome,
                    detail=result.detail,
                    next_run_at=next_run,
                    runner=ctx.runner,
                )
        except Exception as exc:  # the record is for people; the job itself is done
            log.warning("could not record the run of job %s: %s", job_id, exc)
    return result


# -- start-up ----------------------------------------------------------------------------------


def bootstrap(settings: Settings, engine: Engine) -> int:
    """On a database without locations, add the bootstrap AOI and a grid of locations in it.

    This is what makes ``make run`` on a fresh clone have something to ingest,
    learn from and map. Nothing happens when any location exists or
    ``daemon.bootstrap_aoi`` is unset.

    Returns:
        How many locations were added.
    """
    from revisit.ingest.areas import parse_bbox
    from revisit.ingest.sampling import grid_in_polygon

    name = settings.daemon.bootstrap_aoi
    if name is None:
        return 0
    with engine.begin() as conn:
        if count_locations(conn) > 0:
            return 0
        area = parse_bbox(",".join(str(v) for v in settings.daemon.bootstrap_bbox))
        aoi = next((a for a in list_aois(conn) if a.name == name), None)
        if aoi is None:
            aoi = create_aoi(conn, name=name, geom=area)
        points = grid_in_polygon(aoi.geom, spacing_m=settings.daemon.bootstrap_spacing_m)
        added = insert_locations(
            conn, points, origin="aoi-grid", aoi_id=aoi.id, chip_size=settings.ingest.chip_size
        )
    log.info(
        "the database had no locations: added AOI %s with a grid of %d locations "
        "(daemon.bootstrap_aoi)",
        name,
        added,
        extra={"aoi": name, "locations": added},
    )
    return added


# -- ingest ----------------------------------------------------------------------------------


class _EnoughForNow(Exception):
    """Ends an ingest run between two scenes: the run's scene budget is spent, or shutdown."""


def ingest(source: str, aoi: str | None = None, *, ctx: JobContext | None = None) -> JobResult:
    """Ingest up to ``daemon.ingest_max_scenes`` scenes from a source, from its cursor on.

    Args:
        source: ``simulated``, ``local`` or ``sentinelhub``.
        aoi: Only this AOI's locations, with its own cursor; every location when None.
        ctx: The daemon's context.

    Returns:
        Counts of scenes, chips, skips and quarantined inputs.
    """
    from revisit.ingest.pipeline import IngestPipeline
    from revisit.ingest.sources import build_source

    c = _context(ctx)
    with c.engine.connect() as conn:
        aoi_id = None
        if aoi is not None:
            found = next((a for a in list_aois(conn) if a.name == aoi), None)
            if found is None:
                return JobResult("skipped", f"AOI {aoi} no longer exists")
            aoi_id = found.id
        if count_locations(conn, aoi_id=aoi_id) == 0:
            where = f"in AOI {aoi}" if aoi else "at all"
            return JobResult("skipped", f"no locations {where}: add some with `revisit sample`")
    scene_source = build_source(source, c.settings)
    if c.settings.daemon.ingest_workers > 0:
        return _plan_for_workers(c, scene_source, aoi=aoi)
    budget = c.settings.daemon.ingest_max_scenes
    seen = 0
    latest: list[IngestSummary] = []

    def progress(scene: SceneRef | None, summary: IngestSummary) -> None:
        nonlocal seen
        seen += 1
        latest[:] = [summary]
        if scene is not None:
            log.debug(
                "scene done",
                extra={"scene": scene.product_id, "source": source, "chips": summary.chips},
            )
        if seen >= budget or c.stop.is_set():
            raise _EnoughForNow

    more = ""
    try:
        pipeline = IngestPipeline(c.engine, c.store, scene_source, settings=c.settings.ingest)
        try:
            summary = pipeline.run(aoi=aoi, progress=progress)
        except _EnoughForNow:
            summary = latest[0]
            more = "; shutting down" if c.stop.is_set() else "; more next run"
    finally:
        scene_source.close()
    c.metrics.ingested(
        source=source,
        scenes=summary.scenes,
        chips=summary.chips,
        quarantined=summary.quarantined_by_reason,
    )
    detail = (
        f"{summary.scenes} scenes, {summary.chips} chips, {summary.skipped} skipped, "
        f"{summary.quarantined} quarantined{more}"
    )
    if summary.interrupted:
        return JobResult("failed", f"{detail}; interrupted: {summary.interrupted}")
    return JobResult("ok", detail)


def _plan_for_workers(c: JobContext, scene_source: SceneSource, *, aoi: str | None) -> JobResult:
    """The ingest job when ``daemon.ingest_workers`` > 0: queue scenes for the workers.

    Up to ``daemon.ingest_max_scenes`` new scenes a run; the daemon's
    ``revisit ingest --worker`` children ingest them and move the cursor.
    """
    from revisit.db.ingest_tasks import count_by_state
    from revisit.ingest.pipeline import IngestPipeline

    latest: list[IngestSummary] = []

    def progress(scene: SceneRef | None, summary: IngestSummary) -> None:
        latest[:] = [summary]
        if c.stop.is_set():
            raise _EnoughForNow

    more = ""
    try:
        pipeline = IngestPipeline(c.engine, c.store, scene_source, settings=c.settings.ingest)
        try:
            planned = pipeline.plan(
                aoi=aoi, max_scenes=c.settings.daemon.ingest_max_scenes, progress=progress
            )
        except _EnoughForNow:
            planned = cast("PlanSummary", latest[0])
            more = "; shutting down"
    finally:
        scene_source.close()
    c.metrics.ingested(
        source=scene_source.name, scenes=0, chips=0, quarantined=planned.quarantined_by_reason
    )
    with c.engine.connect() as conn:
        states = count_by_state(conn, source=scene_source.name)
    detail = (
        f"queued {planned.queued} scenes for the ingest workers ({planned.known} known, "
        f"{planned.quarantined} quarantined); {states.get('queued', 0)} waiting, "
        f"{states.get('claimed', 0)} claimed, {states.get('failed', 0)} failed{more}"
    )
    if planned.interrupted:
        return JobResult("failed", f"{detail}; interrupted: {planned.interrupted}")
    return JobResult("ok", detail)


# -- learning --------------------------------------------------------------------------------


def learn(*, ctx: JobContext | None = None) -> JobResult:
    """Take one chunk of learner steps on the learner kept open, then hand the thread back.

    A chunk ends after ``daemon.learn_chunk_steps`` steps, ``daemon.learn_chunk_s``
    seconds, or the step in progress when the service stops. The job pauses
    itself while it runs and the executor resumes it once the run has ended, so
    chunks follow each other ``daemon.learn_every_s`` apart without ever
    overlapping (nor being refused as a second instance). Every
    ``daemon.export_every_steps`` steps it checkpoints and wakes the ONNX export.
    """
    c = _context(ctx)
    slot = c.learner
    if c.stop.is_set():
        return JobResult("skipped", "shutting down")
    if c.settings.daemon.learner_processes > 1:
        c.control.pause(LEARN)  # as a chunk: runs follow each other, never overlap
        try:
            return _learn_in_children(c)
        finally:
            if not c.stop.is_set():
                c.resume_when_done(LEARN)
    control = c.control
    control.pause(LEARN)  # first: the next chunk is scheduled when this one has ended
    export_due = False
    try:
        with slot.lock:
            learner = slot.learner
            if learner is None:
                with c.engine.connect() as conn:
                    waiting = _waiting_for_data(c, conn)
                if waiting is not None:
                    return waiting
                from revisit.learner.online import OnlineLearner  # torch: seconds to import

                if c.stop.is_set():  # stopped during the import: opening would only delay the exit
                    return JobResult("skipped", "shutting down")
                learner = OnlineLearner(settings=c.settings, engine=c.engine, store=c.store)
                learner.open()
                slot.learner = learner
                slot.step = slot.exported_at_step = learner.step
                c.metrics.step.set(learner.step)
                log.info(
                    "learner open: %s at step %d",
                    learner.method,
                    learner.step,
                    extra={"step": learner.step},
                )
            steps = c.settings.daemon.learn_chunk_steps
            if c.until_step is not None:
                steps = min(steps, c.until_step - learner.step)
                if steps <= 0:
                    return JobResult("skipped", f"at step {learner.step}, --until-step reached")

            def on_step(report: StepReport) -> None:
                slot.step = report.step
                m = c.metrics
                m.steps.inc()
                m.step.set(report.step)
                m.loss.set(report.loss)
                m.steps_per_s.set(report.steps_per_s)
                m.changed_fraction.set(report.changed_fraction)
                m.measured.set(report.measured)
                log.debug(
                    "step %d: loss %.4f", report.step, report.loss, extra={"step": report.step}
                )

            try:
                summary = learner.run(
                    steps,
                    stop=c.stop,
                    max_seconds=c.settings.daemon.learn_chunk_s,
                    on_step=on_step,
                    checkpoint=False,
                )
            except BaseException:
                # The learner is broken after a failed step: reopen from the last checkpoint.
                with contextlib.suppress(Exception):
                    slot._close(checkpoint=False)
                raise
            slot.step = learner.step
            slot.progressed()
            if learner.step - slot.exported_at_step >= c.settings.daemon.export_every_steps:
                learner.run(0, checkpoint=True)  # no steps: a checkpoint of the current step
                slot.exported_at_step = learner.step
                export_due = True
        if summary.steps == 0:
            return JobResult("skipped", f"no step taken (at step {learner.step})")
        rate = summary.steps / summary.seconds if summary.seconds > 0 else 0.0
        return JobResult(
            "ok",
            f"steps {summary.first_step}-{summary.last_step}, mean loss {summary.mean_loss:.4f}, "
            f"{rate:.2f} steps/s, changed {summary.changed_fraction:.1%} of {summary.measured}",
        )
    finally:
        if export_due:
            control.wake(EXPORT_ONNX)
        # At --until-step the service is about to stop: no further chunk (it would only
        # record a `skipped` run over the last `ok` one).
        reached = c.until_step is not None and slot.step >= c.until_step
        if not c.stop.is_set() and not reached:
            c.resume_when_done(LEARN)


def _waiting_for_data(c: JobContext, conn: Connection) -> JobResult | None:
    """The skipped run of a learner with nothing to learn from yet; None when there is."""
    lc = c.settings.learner
    ready = daemon_db.has_trainable_locations(
        conn, min_valid_fraction=lc.min_valid_fraction, max_cloud_fraction=lc.max_cloud_fraction
    )
    if ready:
        return None
    c.learner.progressed()  # waiting for data is not a stall
    return JobResult(
        "skipped", "waiting for usable observations of at least 2 locations (ingest first)"
    )


def _learn_in_children(c: JobContext) -> JobResult:
    """``daemon.learner_processes`` > 1: start the distributed learner, then follow its steps.

    The learner runs as a supervised child (``revisit learn --nproc N --forever``,
    restarted should it end); this job starts it once two locations have usable
    observations and, on every run, waits ``daemon.learn_chunk_s`` and reads the
    step of its newest checkpoint: the step metric, readiness (a checkpoint is
    progress) and the ONNX export every ``daemon.export_every_steps`` steps
    follow it.
    """
    from revisit.daemon.supervisor import Supervisor, learner_spec

    slot = c.learner
    if c.learner_children is not None:
        c.stop.wait(c.settings.daemon.learn_chunk_s)
    with c.engine.connect() as conn:
        latest = learning.latest_model_version(conn)
        waiting = _waiting_for_data(c, conn) if c.learner_children is None else None
        if waiting is not None:
            return waiting
    step = latest.step if latest is not None else 0
    n = c.settings.daemon.learner_processes
    if c.learner_children is None:
        # Stop-on-shutdown waits for the ranks' last step and checkpoint.
        c.learner_children = Supervisor([learner_spec(c.settings)], stop_timeout_s=120)
        c.learner_children.start()
        slot.step = slot.exported_at_step = step
        slot.progressed()
        log.info("learner started: %d processes from step %d", n, step, extra={"step": step})
    if step > slot.step:
        c.metrics.steps.inc(step - slot.step)
        slot.step = step
        slot.progressed()
    c.metrics.step.set(step)
    if step - slot.exported_at_step >= c.settings.daemon.export_every_steps:
        slot.exported_at_step = step
        c.control.wake(EXPORT_ONNX)
    running = c.learner_children.running()
    return JobResult(
        "ok", f"{n} learner processes ({running} launcher running), checkpoint at step {step}"
    )


def refit(*, ctx: JobContext | None = None) -> JobResult:
    """Refit the change mixture on every current r and reclassify the locations.

    The learner also refits every ``learner.refit_every`` steps; this job makes
    sure the classification follows the estimates on a clock too. The new
    classes are written with the next checkpoint.
    """
    c = _context(ctx)
    slot = c.learner
    with slot.lock:
        learner = slot.learner
        if learner is None:
            return JobResult("skipped", "the learner has not started")
        warmup = c.settings.learner.warmup_steps
        if learner.step < warmup:
            return JobResult("skipped", f"warm-up: step {learner.step} of {warmup}")
        mixture = learner.refit()
        if mixture is None:
            return JobResult("skipped", f"too few distinct ratios at step {learner.step}")
        changed = learner.state.changed_fraction()
    c.metrics.changed_fraction.set(changed)
    return JobResult(
        "ok",
        f"refitted at step {learner.step} on {mixture.n_samples} ratios; changed {changed:.1%}",
    )


# -- exports ---------------------------------------------------------------------------------


def export_onnx(*, ctx: JobContext | None = None) -> JobResult:
    """Publish the newest checkpoint as ONNX, unless it is published already.

    The export runs in a child process (:mod:`revisit.export.child`): the
    exporter's memory goes back to the system when it ends, and learning goes on
    meanwhile (the checkpoint is read from disk). Once the graph cache holds the
    graphs, the daemon prepares each model's weights and reference outputs and
    the child publishes them without importing PyTorch. A child that
    fails or is killed makes a ``failed`` run with the child's message, and
    publishes nothing.
    """
    from revisit.export.child import ChildExportError, publish_in_child

    c = _context(ctx)
    with c.engine.connect() as conn:
        latest = learning.latest_model_version(conn)
    if latest is None:
        return JobResult("skipped", "no checkpoint yet: the learner has not committed one")
    try:
        published = publish_in_child(
            engine=c.engine,
            settings=c.settings,
            chip_root=c.store.root,
            log_ids={"job": EXPORT_ONNX},
        )
    except ChildExportError as exc:
        return JobResult("failed", str(exc).replace("\n", " "))
    if published.reused:
        return JobResult("skipped", f"{published.version} is already published")
    c.metrics.last_export.labels(kind="onnx").set(time.time())
    return JobResult(
        "ok",
        f"published {published.version} (step {published.step}, model version "
        f"{published.model_version_id}) to {published.paths['embedding'].parent}"
        f" in child process {published.pid}{'' if published.torch else ' without PyTorch'}",
    )


def export_changemap(aoi: str, *, ctx: JobContext | None = None) -> JobResult:
    """Write the AOI's change map in each of ``daemon.changemap_formats``.

    Files go to ``<data_dir>/exports/changemaps/<aoi>/<aoi>-<UTC time>.<ext>``,
    each with an ``artifact`` row; the newest ``daemon.keep_changemaps`` of each
    format are kept.
    """
    from revisit.export.changemap import export_change_map

    c = _context(ctx)
    with c.engine.connect() as conn:
        counts = daemon_db.aoi_estimate_counts(conn)
    if aoi not in counts:
        return JobResult("skipped", f"AOI {aoi} no longer exists")
    if counts[aoi] == 0:
        return JobResult("skipped", f"no location in AOI {aoi} has a change estimate yet")
    directory = c.settings.data_dir / CHANGEMAP_DIR / aoi
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    written: list[str] = []
    for fmt in c.settings.daemon.changemap_formats:
        out = directory / f"{aoi}-{stamp}.{_EXTENSIONS[fmt]}"
        exported = export_change_map(
            engine=c.engine, settings=c.settings, fmt=fmt, out=out, aoi=aoi
        )
        c.metrics.last_export.labels(kind=exported.kind).set(time.time())
        written.append(out.name)
    removed = prune_changemaps(c.settings, c.engine, keep=c.settings.daemon.keep_changemaps)
    tail = f"; removed {removed} old" if removed else ""
    return JobResult(
        "ok", f"{counts[aoi]} locations: wrote {', '.join(written)} in {directory}{tail}"
    )


def prune_changemaps(settings: Settings, engine: Engine, *, keep: int) -> int:
    """Keep the newest ``keep`` scheduled change maps per AOI and kind; remove the rest.

    Only files the daemon wrote (under ``exports/changemaps/``) are touched: a
    map written with ``revisit export changemap --out`` stays.

    Returns:
        How many files were removed.
    """
    with engine.begin() as conn:
        doomed: list[tuple[int, str]] = []
        for kind in _CHANGEMAP_KINDS:
            groups: dict[str, list[tuple[int, str]]] = {}
            for row in list_artifacts(conn, kind=kind):
                if row.path.startswith(CHANGEMAP_DIR + "/"):
                    groups.setdefault(str(row.metadata.get("aoi")), []).append((row.id, row.path))
            for rows in groups.values():  # oldest first
                doomed.extend(rows[: max(0, len(rows) - keep)])
        delete_artifacts(conn, [artifact_id for artifact_id, _ in doomed])
    for _, path in doomed:
        with contextlib.suppress(OSError):
            (settings.data_dir / Path(path)).unlink(missing_ok=True)
    return len(doomed)


# -- housekeeping ----------------------------------------------------------------------------


def housekeeping(*, ctx: JobContext | None = None) -> JobResult:
    """Remove chip files no observation names (older than ``daemon.chip_gc_min_age_s``).

    Also applies the change-map retention, for maps left from a run with a
    larger ``daemon.keep_changemaps``, and removes the temporaries of change
    maps a kill interrupted (as old). ONNX retention, and the removal of what a
    killed publish left, are part of every publish.
    """
    c = _context(ctx)
    with c.engine.connect() as conn:
        referenced = referenced_chip_keys(conn)
    min_age_s = c.settings.daemon.chip_gc_min_age_s
    report = c.store.collect_garbage(referenced, min_age_s=min_age_s)
    removed = prune_changemaps(c.settings, c.engine, keep=c.settings.daemon.keep_changemaps)
    abandoned = remove_changemap_temporaries(c.settings.data_dir, min_age_s=min_age_s)
    return JobResult(
        "ok",
        f"removed {report.chips} unreferenced chips and {report.temporaries + abandoned} "
        f"temporaries ({report.bytes / 1e6:.1f} MB), {removed} old change maps",
    )


def remove_changemap_temporaries(data_dir: Path, *, min_age_s: float) -> int:
    """Remove temporary files a killed change-map export left, older than ``min_age_s``.

    A map is written to a hidden temporary name and renamed (see
    :mod:`revisit.fsutil`); a kill between the two leaves the temporary, which
    nothing else ever names. A young one may be a write in progress, and stays.

    Returns:
        How many were removed.
    """
    root = data_dir / CHANGEMAP_DIR
    if not root.is_dir():
        return 0
    cutoff = time.time() - min_age_s
    removed = 0
    for path in root.glob(f"*/.*{TMP_SUFFIX}"):
        try:
            if path.stat().st_mtime > cutoff:
                continue
            path.unlink()
        except FileNotFoundError:
            continue
        removed += 1
    return removed


def aoi_sync(*, ctx: JobContext | None = None) -> JobResult:
    """Give a new AOI its ingest and change-map jobs, and drop the jobs of an AOI removed."""
    c = _context(ctx)
    changed = c.control.sync()
    if not changed:
        return JobResult("skipped", "the jobs match the AOIs")
    return JobResult("ok", f"jobs added or removed: {', '.join(changed)}")


# -- change alerts ---------------------------------------------------------------------------

_NO_SECRET = (
    "webhook deliveries wait: alerts.webhook_secret (REVISIT_ALERTS__WEBHOOK_SECRET) is not"
    " set, and revisit sends no unsigned webhook"
)


def deliver_alerts(*, ctx: JobContext | None = None) -> JobResult:
    """POST the due change alerts to their webhooks (see :mod:`revisit.daemon.alerts`).

    Without ``alerts.webhook_secret`` nothing is sent: the run says so (a warning
    once, not at every run) and the deliveries wait.
    """
    from revisit.daemon.alerts import deliver_due

    c = _context(ctx)
    settings = c.settings.alerts
    if settings.webhook_secret is None:
        with c.engine.connect() as conn:
            waiting = alerts_db.pending_deliveries(conn)
        if not waiting:
            return JobResult("skipped", "no webhook delivery waiting")
        if c._last_detail.get(ALERTS) != _NO_SECRET:
            log.warning(_NO_SECRET, extra={"job": ALERTS, "deliveries": waiting})
        return JobResult("skipped", _NO_SECRET)
    # A run ends after a minute at most (its record stays fresh); the next one goes on.
    report = deliver_due(
        c.engine, settings, stop=c.stop, max_seconds=max(60.0, settings.deliver_every_s)
    )
    if report.attempts == 0 and report.gave_up == 0:
        return JobResult("skipped", f"nothing due ({report.pending} pending)")
    return JobResult("ok", report.line())
