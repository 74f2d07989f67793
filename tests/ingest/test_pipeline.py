"""The ingest pipeline against a real PostGIS and a real chip store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from shapely.geometry import box

from revisit.config import IngestSettings
from revisit.db import aois, cursors
from revisit.db.locations import insert_locations
from revisit.db.scenes import referenced_chip_keys
from revisit.errors import IngestError, SceneRejectedError, SourceUnavailableError
from revisit.ingest import reasons
from revisit.ingest.chips import ChipStore
from revisit.ingest.pipeline import IngestPipeline
from tests.ingest.memory_source import MemoryScene, MemorySource

T0 = datetime(2024, 5, 1, 10, 30, tzinfo=UTC)
NOW = datetime(2025, 1, 1, tzinfo=UTC)
SETTINGS = IngestSettings(chip_size=16)
POINTS = [(0.5, 40.5), (1.0, 41.0), (1.5, 41.5), (5.0, 45.0)]  # the last is outside the scenes


@pytest.fixture
def store(tmp_path: Path) -> ChipStore:
    return ChipStore(tmp_path / "chips")


@pytest.fixture
def located(engine: sa.Engine) -> sa.Engine:
    with engine.begin() as conn:
        insert_locations(conn, POINTS, origin="manual", chip_size=SETTINGS.chip_size)
    return engine


def _pipeline(engine: sa.Engine, store: ChipStore, source: MemorySource) -> IngestPipeline:
    return IngestPipeline(engine, store, source, settings=SETTINGS, clock=lambda: NOW)


def _count(engine: sa.Engine, query: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text(query)).scalar_one())


def _scenes(n: int) -> list[MemoryScene]:
    return [MemoryScene(f"P{i}", T0 + timedelta(days=5 * i)) for i in range(n)]


def test_ingests_scenes_and_twice_adds_nothing(located: sa.Engine, store: ChipStore) -> None:
    source = MemorySource(_scenes(3))
    first = _pipeline(located, store, source).run()
    assert (first.scenes, first.chips, first.quarantined) == (3, 9, 0)
    assert _count(located, "SELECT count(*) FROM observation") == 9
    assert _count(located, "SELECT count(*) FROM scene WHERE status = 'ingested'") == 3

    # Every row's chip is on disk, whole.
    with located.connect() as conn:
        rows = conn.execute(sa.text("SELECT chip_key, chip_sha256 FROM observation")).all()
        cursor = cursors.get_cursor(conn, source="memory", aoi_id=None)
    for key, sha in rows:
        assert store.get(key, sha).shape == (12, 16, 16)
    assert cursor == T0 + timedelta(days=10)

    again = _pipeline(located, store, source).run(since=T0 - timedelta(days=1))
    assert (again.scenes, again.chips) == (0, 0)
    assert again.skipped == 3
    assert _count(located, "SELECT count(*) FROM observation") == 9
    assert _count(located, "SELECT count(*) FROM scene") == 3


def test_new_locations_get_chips_of_known_scenes(located: sa.Engine, store: ChipStore) -> None:
    source = MemorySource(_scenes(2))
    _pipeline(located, store, source).run()
    with located.begin() as conn:
        insert_locations(conn, [(0.25, 40.25)], origin="manual", chip_size=16)
    source.reads.clear()
    summary = _pipeline(located, store, source).run(since=T0)
    assert summary.chips == 2  # the new location, in each of the two scenes
    assert all(len(ids) == 1 for _, ids in source.reads)
    assert _count(located, "SELECT count(*) FROM observation") == 8


def test_bad_input_is_quarantined_and_the_run_goes_on(located: sa.Engine, store: ChipStore) -> None:
    with located.connect() as conn:
        first_id = int(conn.execute(sa.text("SELECT min(id) FROM location")).scalar_one())
    scenes = [
        MemoryScene("GOOD", T0),
        MemoryScene(
            "HOLES", T0 + timedelta(days=1), reject_locations={first_id: reasons.NOT_COVERED}
        ),
        MemoryScene("NODATA", T0 + timedelta(days=2), valid_fraction=0.0),
        MemoryScene("CLOUDS", T0 + timedelta(days=3), cloud_fraction=1.0),
        MemoryScene(
            "BROKEN",
            T0 + timedelta(days=4),
            raise_on_read=SceneRejectedError(reasons.CORRUPT_RASTER, "BROKEN: truncated band B04"),
        ),
        MemoryScene("GOOD", T0 + timedelta(days=5)),  # a second product under a known id
        MemoryScene("FUTURE", NOW + timedelta(days=30)),
        MemoryScene("LAST", T0 + timedelta(days=6)),
    ]
    source = MemorySource(scenes, search_rejects=["/data/NOMTD.SAFE"])
    summary = _pipeline(located, store, source).run(until=NOW + timedelta(days=60))
    with located.connect() as conn:
        by_reason = dict(
            conn.execute(sa.text("SELECT reason, count(*) FROM quarantine GROUP BY reason")).all()
        )
        broken = conn.execute(
            sa.text("SELECT status, error FROM scene WHERE product_id = 'BROKEN'")
        ).one()
        detail = conn.execute(
            sa.text("SELECT detail FROM quarantine WHERE reason = 'future-date'")
        ).scalar_one()
    assert by_reason == {
        reasons.NOT_COVERED: 1,
        reasons.ALL_NODATA: 3,
        reasons.FULLY_CLOUDY: 3,
        reasons.CORRUPT_RASTER: 1,
        reasons.DUPLICATE_PRODUCT: 1,
        reasons.FUTURE_DATE: 1,
        reasons.MISSING_METADATA: 1,
    }
    assert broken.status == "quarantined" and "truncated band B04" in broken.error
    assert "FUTURE" in detail
    assert (
        _count(
            located,
            "SELECT count(*) FROM observation o JOIN scene s ON s.id = o.scene_id"
            " WHERE s.product_id = 'LAST'",
        )
        == 3
    )
    assert summary.scenes == 5  # GOOD, HOLES, NODATA, CLOUDS (rows, chips quarantined), LAST

    # Quarantined chips are not asked for again, nor counted twice.
    source.reads.clear()
    again = _pipeline(located, store, source).run(since=T0, until=NOW + timedelta(days=60))
    assert again.chips == 0
    assert [ids for _, ids in source.reads] == []
    assert _count(located, "SELECT count(*) FROM quarantine") == 11


def test_a_source_outage_stops_the_run_and_the_next_resumes(
    located: sa.Engine, store: ChipStore
) -> None:
    scenes = _scenes(4)
    scenes[2].raise_on_read = SourceUnavailableError("503 from the server")
    source = MemorySource(scenes)
    summary = _pipeline(located, store, source).run()
    assert summary.scenes == 2 and summary.interrupted is not None
    with located.connect() as conn:
        assert cursors.get_cursor(conn, source="memory", aoi_id=None) == scenes[1].acquired_at

    scenes[2].raise_on_read = None
    resumed = _pipeline(located, store, source).run()
    assert resumed.scenes == 2 and resumed.interrupted is None
    assert _count(located, "SELECT count(*) FROM scene") == 4
    assert _count(located, "SELECT count(*) FROM observation") == 12


def test_a_crash_mid_scene_leaves_no_rows_and_only_collectable_files(
    located: sa.Engine, store: ChipStore
) -> None:
    scenes = _scenes(2)
    scenes[1].fail_after_chips = 2
    with pytest.raises(RuntimeError, match="died"):
        _pipeline(located, store, MemorySource(scenes)).run()
    assert _count(located, "SELECT count(*) FROM scene") == 1
    assert _count(located, "SELECT count(*) FROM observation") == 3
    with located.connect() as conn:
        assert cursors.get_cursor(conn, source="memory", aoi_id=None) == scenes[0].acquired_at
        referenced = referenced_chip_keys(conn)
    assert len(list(store.keys())) == 5  # 3 referenced + 2 orphans of the crashed scene
    report = store.collect_garbage(referenced, min_age_s=0)
    assert report.chips == 2
    assert set(store.keys()) == referenced

    scenes[1].fail_after_chips = None
    assert _pipeline(located, store, MemorySource(scenes)).run().chips == 3


def test_aoi_limits_locations_and_keeps_its_own_cursor(
    located: sa.Engine, store: ChipStore
) -> None:
    with located.begin() as conn:
        aois.create_aoi(conn, name="corner", geom=box(0.0, 40.0, 0.75, 40.75))
    summary = _pipeline(located, store, MemorySource(_scenes(2))).run(aoi="corner")
    assert summary.chips == 2  # one location in the AOI, two scenes
    with located.connect() as conn:
        aoi_id = aois.get_aoi(conn, "corner").id
        assert cursors.get_cursor(conn, source="memory", aoi_id=aoi_id) is not None
        assert cursors.get_cursor(conn, source="memory", aoi_id=None) is None


def test_no_locations_is_a_clear_error(engine: sa.Engine, store: ChipStore) -> None:
    with pytest.raises(IngestError, match="revisit sample"):
        _pipeline(engine, store, MemorySource(_scenes(1))).run()


def test_a_scene_that_would_fill_the_disk_is_not_started(
    located: sa.Engine, store: ChipStore
) -> None:
    # More free space than any disk has: the floor stops the run before the first chip.
    settings = IngestSettings(chip_size=16, min_free_mb=2**40)
    source = MemorySource(_scenes(2))
    summary = IngestPipeline(located, store, source, settings=settings, clock=lambda: NOW).run()
    assert summary.interrupted is not None
    assert "ingest.min_free_mb keeps" in summary.interrupted and "P0" in summary.interrupted
    assert source.reads == []
    assert not store.root.exists() or not any(store.root.rglob("*"))
    assert _count(located, "SELECT count(*) FROM scene") == 0
    with located.connect() as conn:
        assert cursors.get_cursor(conn, source="memory", aoi_id=None) is None

    # With the default floor there is room: the run resumes at P0.
    resumed = _pipeline(located, store, source).run()
    assert (resumed.scenes, resumed.interrupted) == (2, None)
