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
   and the cursor of the source and AOI, moved to the scene's time.

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
from revisit.db import aois, cursors, locations, quarantine, scenes, simtruth
from revisit.errors import ChipStoreFullError, IngestError, SceneRejectedError, TransientError
from revisit.ingest import reasons
from revisit.ingest.chips import ChipStore, StoredChip
from revisit.ingest.grid import chip_grid_for
from revisit.ingest.sources.base import SceneSource
from revisit.types import CANONICAL_BANDS, Chip, LocationRef, Rejection, SceneRef

if TYPE_CHECKING:
    from datetime import date

    from sqlalchemy.engine import Engine

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


#: Called after each scene with the scene and the running summary (for progress bars).
Progress = Callable[[SceneRef | None, IngestSummary], None]


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
            aoi_id = None
            if aoi is not None:
                found = aois.get_aoi(conn, aoi)
                aoi_id, area = found.id, found.geom
            else:
                cells = locations.coverage_cells(conn)
                if cells is None:
                    raise IngestError(
                        "there are no locations to ingest for: add some with "
                        "`revisit sample --n 100`, or `revisit aoi add` then "
                        "`revisit sample --aoi NAME --grid`"
                    )
                area = cells
            if since is None:
                since = cursors.get_cursor(conn, source=self.source.name, aoi_id=aoi_id)
        until = until or now
        log.info(
            "ingest starts",
            extra={"source": self.source.name, "aoi": aoi, "since": since, "until": until},
        )

        def rejected(ref: str, reason: str, detail: str) -> None:
            with self.engine.begin() as conn:
                quarantine.quarantine(
                    conn, source=self.source.name, ref=ref, reason=reason, detail=detail
                )
            summary._quarantined(reason)
            log.warning("product quarantined: %s", detail, extra={"ref": ref, "reason": reason})

        seen: set[str] = set()
        self._writer = ThreadPoolExecutor(max_workers=WRITER_THREADS, thread_name_prefix="chips")
        try:
            for scene in self.source.search(
                since=since, until=until, area=area, on_rejected=rejected
            ):
                self._ingest_scene(scene, aoi_id=aoi_id, now=now, seen=seen, summary=summary)
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

    # -- one scene ------------------------------------------------------------------------

    def _ingest_scene(
        self,
        scene: SceneRef,
        *,
        aoi_id: int | None,
        now: datetime,
        seen: set[str],
        summary: IngestSummary,
    ) -> None:
        name = self.source.name
        if scene.acquired_at > now + timedelta(seconds=self.settings.future_tolerance_s):
            self._reject_scene(
                scene,
                reasons.FUTURE_DATE,
                f"{scene.product_id} claims acquisition at {scene.acquired_at.isoformat()}, "
                f"after the present ({now.isoformat()})",
                summary,
                record_scene=False,
            )
            return
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
            return
        seen.add(scene.product_id)

        with self.engine.connect() as conn:
            status = scenes.scene_status(conn, source=name, product_id=scene.product_id)
            if status == "quarantined":
                summary.skipped += 1
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
                cursors.advance_cursor(conn, source=name, aoi_id=aoi_id, to=scene.acquired_at)
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

        def finish(pending: tuple[Chip, Future[StoredChip]]) -> None:
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
                    finish(writes.popleft())
            while writes:
                finish(writes.popleft())
        except SceneRejectedError as exc:
            _drain(writes)
            self._reject_scene(scene, exc.reason, exc.detail, summary, record_scene=True)
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
            cursors.advance_cursor(conn, source=name, aoi_id=aoi_id, to=scene.acquired_at)
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
    ) -> None:
        """Quarantine a whole product; with ``record_scene`` its scene row says so too."""
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
        summary._quarantined(reason)
        log.warning(
            "scene quarantined: %s", detail, extra={"scene": scene.product_id, "reason": reason}
        )
