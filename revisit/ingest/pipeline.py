"""The ingest pipeline, one for every source: search → chips → chip store → rows.

For each scene a source finds, oldest first:

1. a scene acquired in the future, or a second product under an id already
   seen in this run, is quarantined;
2. the locations inside its footprint that it has not yet given a chip (nor had
   one quarantined) are read; a scene with none left is skipped;
3. each chip is checked (shape, dtype, valid and cloud fractions) and written
   to the chip store, whole, before any row names it;
4. in **one transaction**: the scene row, the observation rows (COPY), the
   quarantine rows of its rejected chips, the simulated ground truth if any,
   and the cursor of the source and AOI, moved to the scene's time. The
   transaction holds the scene's advisory lock and leaves out the chips another
   writer committed meanwhile, so concurrent writers of one scene add each row
   once.

:meth:`IngestPipeline.run` does all of it in one process. For ingest workers
(:mod:`revisit.ingest.workers`) the work is split: :meth:`IngestPipeline.plan`
does the search and step 1 and queues each scene as an ``ingest_task``;
:meth:`IngestPipeline.ingest_planned` does steps 2 to 4 for one claimed task,
with the worker's ``finish`` (task done, cursor over the finished tasks) in the
transaction that commits the scene, in place of the cursor move.

A product that is bad as a whole is quarantined and the run goes on. A source
that does not answer, or a chip store out of space (both
:class:`~revisit.errors.TransientError`), ends the run early, with the cursor
still before the scene it could not finish, so the next run starts there. A
scene whose chips would leave less than ``ingest.min_free_mb`` free is not
started. A kill at any moment leaves at most chip files that no row
names, which garbage collection removes.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from revisit.config import IngestSettings
from revisit.db import aois, cursors, ingest_tasks, locations, quarantine, scenes, simtruth
from revisit.errors import ChipStoreFullError, IngestError, SceneRejectedError, TransientError
from revisit.grid import chip_grid_for
from revisit.ingest import reasons
from revisit.ingest.chips import ChipStore, StoredChip
from revisit.ingest.sources.base import SceneSource
from revisit.types import CANONICAL_BANDS, Chip, LocationRef, Rejection, SceneRef

if TYPE_CHECKING:
    from datetime import date

    from shapely.geometry.base import BaseGeometry
    from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)

#: Threads hashing, writing and fsyncing chip files (fsync releases the GIL).
WRITER_THREADS = 2
#: Chips of one scene held in memory while their files are written (~100 kB each).
MAX_PENDING_WRITES = 64


def _drain(writes: deque[tuple[Chip, Future[StoredChip]]]) -> None:
    """Wait for writes already started; their files are orphans for garbage collection."""
    for _, future in writes:
        future.exception()
    writes.clear()


@runtime_checkable
class HasGroundTruth(Protocol):
    """A source that knows the truth of its world (the simulated one)."""

    seed: int

    def ground_truth(self, locations: Sequence[LocationRef]) -> Sequence[Any]: ...


@dataclass
class IngestSummary:
    """What one run did."""

    scenes: int = 0
    chips: int = 0
    skipped: int = 0
    quarantined: int = 0
    seconds: float = 0.0
    quarantined_by_reason: dict[str, int] = field(default_factory=dict)
    interrupted: str | None = None

    def _quarantined(self, reason: str) -> None:
        self.quarantined += 1
        self.quarantined_by_reason[reason] = self.quarantined_by_reason.get(reason, 0) + 1


@dataclass
class PlanSummary(IngestSummary):
    """What one plan did: scenes queued for the workers, and scenes they already had."""

    queued: int = 0
    known: int = 0


#: Called after each scene with the scene and the running summary (for progress bars).
Progress = Callable[[SceneRef | None, IngestSummary], None]
#: Called in the transaction that ends a planned scene (ingested, skipped or quarantined).
Finish = Callable[["Connection", SceneRef], None]


class IngestPipeline:
    """Ingest from one source into the database and the chip store.

    Args:
        engine: The database.
        store: Where chip files go.
        source: Where imagery comes from.
        settings: Chip size and the thresholds for unusable chips.
        clock: The present, for refusing acquisitions from the future.
    """

    def __init__(
        self,
        engine: Engine,
        store: ChipStore,
        source: SceneSource,
        *,
        settings: IngestSettings | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.engine = engine
        self.store = store
        self.source = source
        self.settings = settings or IngestSettings()
        self.clock = clock

    def run(
        self,
        *,
        aoi: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        progress: Progress | None = None,
    ) -> IngestSummary:
        """Ingest what the source has in ``[since, until]`` for the AOI (or all locations).

        Args:
            aoi: Only locations inside this AOI, and its own cursor.
            since: Start here instead of at the cursor (to backfill).
            until: Stop at this acquisition time; now by default.
            progress: Called after each scene.

        Returns:
            Counts of scenes, chips, skips and quarantined items.

        Raises:
            IngestError: There are no locations to ingest for.
        """
        began = time.monotonic()
        summary = IngestSummary()
        now = self.clock()
        with self.engine.connect() as conn:
            aoi_id, area = self._area(conn, aoi)
            if since is None:
                since = cursors.get_cursor(conn, source=self.source.name, aoi_id=aoi_id)
        until = until or now
        log.info(
            "ingest starts",
            extra={"source": self.source.name, "aoi": aoi, "since": since, "until": until},
        )
        seen: set[str] = set()
        self._writer = ThreadPoolExecutor(max_workers=WRITER_THREADS, thread_name_prefix="chips")
        try:
            for scene in self.source.search(
                since=since, until=until, area=area, on_rejected=self._on_rejected(summary)
            ):
                if self._screen(scene, now=now, seen=seen, summary=summary):
                    self._ingest_scene(scene, aoi_id=aoi_id, summary=summary)
                if progress is not None:
                    progress(scene, summary)
        except TransientError as exc:
            summary.interrupted = str(exc)
            log.warning("ingest interrupted; the next run resumes here: %s", exc)
        finally:
            self._writer.shutdown(wait=True)
        summary.seconds = time.monotonic() - began
        log.info(
            "ingest done",
            extra={
                "source": self.source.name,
                "scenes": summary.scenes,
                "chips": summary.chips,
                "skipped": summary.skipped,
                "quarantined": summary.quarantined,
                "seconds": round(summary.seconds, 3),
            },
        )
        return summary

    def plan(
        self,
        *,
        aoi: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        max_scenes: int | None = None,
        progress: Progress | None = None,
    ) -> PlanSummary:
        """Queue the scenes the source has in ``[since, until]`` for the ingest workers.

        The search and the checks of whole products are those of :meth:`run`;
        each scene that passes becomes an ``ingest_task`` of the source and AOI,
        once (planning again queues nothing twice). The cursor does not move:
        the workers move it as they finish scenes.

        Args:
            aoi: Only locations inside this AOI, and its own cursor.
            since: Start here instead of after what is planned already, and queue
                finished scenes again (a backfill: new locations get their chips).
            until: Stop at this acquisition time; now by default.
            max_scenes: Stop after queueing this many scenes; the next plan goes on.
            progress: Called after each scene found.

        Returns:
            Counts of scenes queued, already known and quarantined.

        Raises:
            IngestError: There are no locations to ingest for.
        """
        began = time.monotonic()
        summary = PlanSummary()
        now = self.clock()
        name = self.source.name
        requeue = since is not None
        with self.engine.connect() as conn:
            aoi_id, area = self._area(conn, aoi)
            if since is None:
                # From the last scene planned (seen again, and known): not from the cursor,
                # which waits for the workers, so that the same range is not searched twice.
                marks = (
                    cursors.get_cursor(conn, source=name, aoi_id=aoi_id),
                    ingest_tasks.planned_until(conn, source=name, aoi_id=aoi_id),
                )
                since = max((m for m in marks if m is not None), default=None)
        until = until or now
        log.info("plan starts", extra={"source": name, "aoi": aoi, "since": since, "until": until})
        seen: set[str] = set()
        try:
            for scene in self.source.search(
                since=since, until=until, area=area, on_rejected=self._on_rejected(summary)
            ):
                if self._screen(scene, now=now, seen=seen, summary=summary):
                    with self.engine.begin() as conn:
                        queued = ingest_tasks.enqueue(conn, scene, aoi_id=aoi_id, requeue=requeue)
                    summary.queued += queued
                    summary.known += not queued
                if progress is not None:
                    progress(scene, summary)
                if max_scenes is not None and summary.queued >= max_scenes:
                    break
        except TransientError as exc:
            summary.interrupted = str(exc)
            log.warning("plan interrupted; the next plan resumes here: %s", exc)
        summary.seconds = time.monotonic() - began
        log.info(
            "plan done",
            extra={
                "source": name,
                "queued": summary.queued,
                "known": summary.known,
                "quarantined": summary.quarantined,
                "seconds": round(summary.seconds, 3),
            },
        )
        return summary

    def ingest_planned(
        self, scene: SceneRef, *, aoi_id: int | None, finish: Finish
    ) -> IngestSummary:
        """Ingest one scene a plan queued: what :meth:`run` does for it after the search.

        Args:
            scene: The scene, as the plan found it.
            aoi_id: Its cursor's AOI; None: every location.
            finish: Called in the one transaction that ends the scene (its rows, its
                skip or its quarantine), before the commit; what it raises rolls
                that transaction back.

        Returns:
            What the scene gave: 1 scene (or 1 skipped, or quarantined items) and its chips.

        Raises:
            TransientError: The source did not answer or the chip store is full;
                nothing of the scene was committed.
        """
        began = time.monotonic()
        summary = IngestSummary()
        self._writer = ThreadPoolExecutor(max_workers=WRITER_THREADS, thread_name_prefix="chips")
        try:
            self._ingest_scene(scene, aoi_id=aoi_id, summary=summary, finish=finish)
        finally:
            self._writer.shutdown(wait=True)
        summary.seconds = time.monotonic() - began
        return summary

    def _area(self, conn: Connection, aoi: str | None) -> tuple[int | None, BaseGeometry]:
        """The AOI's id and polygon, or (None, the cells that hold locations).

        Raises:
            IngestError: There are no locations to ingest for.
        """
        if aoi is not None:
            found = aois.get_aoi(conn, aoi)
            return found.id, found.geom
        cells = locations.coverage_cells(conn)
        if cells is None:
            raise IngestError(
                "there are no locations to ingest for: add some with "
                "`revisit sample --n 100`, or `revisit aoi add` then "
                "`revisit sample --aoi NAME --grid`"
            )
        return None, cells

    def _on_rejected(self, summary: IngestSummary) -> Callable[[str, str, str], None]:
        """The search's ``on_rejected``: quarantine the product, count it."""

        def rejected(ref: str, reason: str, detail: str) -> None:
            with self.engine.begin() as conn:
                quarantine.quarantine(
                    conn, source=self.source.name, ref=ref, reason=reason, detail=detail
                )
            summary._quarantined(reason)
            log.warning("product quarantined: %s", detail, extra={"ref": ref, "reason": reason})

        return rejected

    # -- one scene ------------------------------------------------------------------------

    def _screen(
        self, scene: SceneRef, *, now: datetime, seen: set[str], summary: IngestSummary
    ) -> bool:
        """Whether a scene found by a search is to be ingested; quarantines it if not."""
        if scene.acquired_at > now + timedelta(seconds=self.settings.future_tolerance_s):
            self._reject_scene(
                scene,
                reasons.FUTURE_DATE,
                f"{scene.product_id} claims acquisition at {scene.acquired_at.isoformat()}, "
                f"after the present ({now.isoformat()})",
                summary,
                record_scene=False,
            )
            return False
        if scene.product_id in seen:
            self._reject_scene(
                scene,
                reasons.DUPLICATE_PRODUCT,
                f"a second product named {scene.product_id} "
                f"({dict(scene.extra).get('path', 'no path')})",
                summary,
                record_scene=False,
                ref=f"{scene.product_id}#duplicate:{dict(scene.extra).get('path', '')}",
            )
            return False
        seen.add(scene.product_id)
        return True

    def _ingest_scene(
        self,
        scene: SceneRef,
        *,
        aoi_id: int | None,
        summary: IngestSummary,
        finish: Finish | None = None,
    ) -> None:
        """Read, store and commit one scene; ``finish`` (if any) replaces the cursor move."""
        name = self.source.name
        with self.engine.connect() as conn:
            status = scenes.scene_status(conn, source=name, product_id=scene.product_id)
            if status == "quarantined":
                summary.skipped += 1
                if finish is not None:
                    with self.engine.begin() as done:
                        finish(done, scene)
                return
            todo = locations.locations_to_read(
                conn,
                footprint=scene.footprint,
                source=name,
                product_id=scene.product_id,
                aoi_id=aoi_id,
            )
        if status is not None and not todo:
            summary.skipped += 1
            with self.engine.begin() as conn:
                self._finish(conn, scene, aoi_id=aoi_id, finish=finish)
            return

        size = self.settings.chip_size
        self._check_space(scene, len(todo), size)
        refs = [
            LocationRef(id=p.id, lon=p.lon, lat=p.lat, grid=chip_grid_for(p.lon, p.lat, size=size))
            for p in todo
        ]
        rows: list[scenes.ObservationRow] = []
        rejections: list[Rejection] = []
        # Chip files are hashed, written and fsynced on worker threads while the
        # source produces the next chips; all are on disk before any row commits.
        writes: deque[tuple[Chip, Future[StoredChip]]] = deque()

        def collect(pending: tuple[Chip, Future[StoredChip]]) -> None:
            chip, future = pending
            stored = future.result()
            rows.append(
                scenes.ObservationRow(
                    location_id=chip.location_id,
                    acquired_at=scene.acquired_at,
                    valid_fraction=float(chip.valid_fraction),
                    cloud_fraction=float(chip.cloud_fraction),
                    chip_key=stored.key,
                    chip_sha256=stored.sha256,
                    epsg=chip.grid.epsg,
                    bounds=chip.grid.bounds,
                )
            )

        try:
            for item in self.source.read(scene, refs) if refs else ():
                if isinstance(item, Rejection):
                    rejections.append(item)
                    continue
                problem = self._check(item, size)
                if problem is not None:
                    rejections.append(problem)
                    continue
                writes.append((item, self._writer.submit(self.store.put, item.data)))
                while len(writes) > MAX_PENDING_WRITES:
                    collect(writes.popleft())
            while writes:
                collect(writes.popleft())
        except SceneRejectedError as exc:
            _drain(writes)
            self._reject_scene(
                scene, exc.reason, exc.detail, summary, record_scene=True, finish=finish
            )
            return
        except BaseException:
            _drain(writes)
            raise

        truth: list[tuple[int, int, str | None, date | None, float]] = []
        if isinstance(self.source, HasGroundTruth) and refs:
            truth = [
                (t.location_id, self.source.seed, t.kind, t.event_date, float(t.changed_fraction))
                for t in self.source.ground_truth(refs)
            ]

        with self.engine.begin() as conn:
            # Another writer of this scene (an ingest worker with another cursor's task) may
            # have committed some of these chips since `todo` was read: leave those out.
            ingest_tasks.lock_scene(conn, source=name, product_id=scene.product_id)
            written = ingest_tasks.locations_done(conn, source=name, product_id=scene.product_id)
            if written:
                rows = [r for r in rows if r.location_id not in written]
                rejections = [r for r in rejections if r.location_id not in written]
            scene_id = scenes.upsert_scene(conn, scene)
            scenes.copy_observations(conn, scene_id, rows)
            for rejection in rejections:
                quarantine.quarantine(
                    conn,
                    source=name,
                    ref=scene.product_id,
                    location_id=rejection.location_id,
                    reason=rejection.reason,
                    detail=rejection.detail,
                )
            simtruth.store_truth(conn, truth)
            self._finish(conn, scene, aoi_id=aoi_id, finish=finish)
        summary.scenes += 1
        summary.chips += len(rows)
        for rejection in rejections:
            summary._quarantined(rejection.reason)
        log.info(
            "scene ingested",
            extra={
                "scene": scene.product_id,
                "scene_id": scene_id,
                "chips": len(rows),
                "rejected": len(rejections),
            },
        )

    def _finish(
        self, conn: Connection, scene: SceneRef, *, aoi_id: int | None, finish: Finish | None
    ) -> None:
        """End a scene in its transaction: the worker's ``finish``, or the cursor moves to it."""
        if finish is not None:
            finish(conn, scene)
        else:
            cursors.advance_cursor(
                conn, source=self.source.name, aoi_id=aoi_id, to=scene.acquired_at
            )

    def _check_space(self, scene: SceneRef, chips: int, size: int) -> None:
        """Stop before a scene whose chips would leave less than ``ingest.min_free_mb`` free.

        Raises:
            ChipStoreFullError: Not enough room; nothing of the scene was written.
        """
        floor = self.settings.min_free_mb * 2**20
        if floor <= 0 or chips == 0:
            return
        need = chips * (len(CANONICAL_BANDS) * size * size * 2 + 128)  # .npy header
        free = self.store.free_bytes()
        if free - need < floor:
            raise ChipStoreFullError(
                f"{free / 2**20:.1f} MB free under {self.store.root}; the {chips} chips of "
                f"{scene.product_id} need {need / 2**20:.1f} MB and ingest.min_free_mb keeps "
                f"{self.settings.min_free_mb:g} MB free: free space there (or lower "
                "ingest.min_free_mb)"
            )

    def _check(self, chip: Chip, size: int) -> Rejection | None:
        """A rejection for a chip that is malformed or unusable, None for a good one."""
        expected = (len(CANONICAL_BANDS), size, size)
        if chip.data.shape != expected or chip.data.dtype.name != "uint16":
            bands_wrong = chip.data.shape[:1] != expected[:1]
            return Rejection(
                chip.location_id,
                reasons.WRONG_BAND_COUNT if bands_wrong else reasons.BAD_REPLY,
                f"chip of location {chip.location_id} is {chip.data.dtype} {chip.data.shape}, "
                f"expected uint16 {expected}",
            )
        if not chip.valid_fraction >= self.settings.min_valid_fraction:
            return Rejection(
                chip.location_id,
                reasons.ALL_NODATA,
                f"chip of location {chip.location_id} has {chip.valid_fraction:.1%} valid pixels "
                f"(minimum {self.settings.min_valid_fraction:.1%})",
            )
        if not chip.cloud_fraction <= self.settings.max_cloud_fraction:
            return Rejection(
                chip.location_id,
                reasons.FULLY_CLOUDY,
                f"chip of location {chip.location_id} is {chip.cloud_fraction:.1%} cloud or "
                f"shadow (maximum {self.settings.max_cloud_fraction:.1%})",
            )
        return None

    def _reject_scene(
        self,
        scene: SceneRef,
        reason: str,
        detail: str,
        summary: IngestSummary,
        *,
        record_scene: bool,
        ref: str | None = None,
        finish: Finish | None = None,
    ) -> None:
        """Quarantine a whole product; with ``record_scene`` its scene row says so too.

        The cursor does not move (the next run sees the scene again, and skips
        it); a worker's ``finish`` runs in the same transaction.
        """
        with self.engine.begin() as conn:
            if record_scene:
                scenes.upsert_scene(conn, scene, status="quarantined", error=f"{reason}: {detail}")
            quarantine.quarantine(
                conn,
                source=self.source.name,
                ref=ref or scene.product_id,
                reason=reason,
                detail=detail,
                payload={"acquired_at": scene.acquired_at.isoformat(), **dict(scene.extra)},
            )
            if finish is not None:
                finish(conn, scene)
        summary._quarantined(reason)
        log.warning(
            "scene quarantined: %s", detail, extra={"scene": scene.product_id, "reason": reason}
        )
