"""The local source through the whole pipeline: real products in, rows and chips out."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa

from revisit.config import IngestSettings
from revisit.db import aois
from revisit.db.locations import insert_locations
from revisit.ingest import reasons
from revisit.ingest.chips import ChipStore
from revisit.ingest.pipeline import IngestPipeline
from revisit.ingest.sampling import grid_in_polygon
from revisit.ingest.sources.local import LocalSource, product_footprint
from tests.conftest import SHARED_DATA

OSCD = SHARED_DATA / "oscd" / "images"
SAFE = next(iter(sorted((SHARED_DATA / "s2_l2a_safe_T29UNU").glob("*.SAFE"))), None)
pytestmark = pytest.mark.skipif(
    not OSCD.is_dir() or SAFE is None,
    reason=f"the shared Sentinel-2 data is not at {SHARED_DATA} (it sits beside the checkout)",
)
SETTINGS = IngestSettings(chip_size=32)


def _grid_over(engine: sa.Engine, product: Path, *, name: str, spacing_m: float) -> int:
    area = product_footprint(product)
    with engine.begin() as conn:
        aoi = aois.create_aoi(conn, name=name, geom=area)
        points = grid_in_polygon(area.buffer(-0.003), spacing_m=spacing_m)
        insert_locations(conn, points, origin="aoi-grid", aoi_id=aoi.id, chip_size=32)
    return len(points)


def _count(engine: sa.Engine, query: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text(query)).scalar_one())


def test_an_oscd_city_ingests_both_dates_idempotently(engine: sa.Engine, tmp_path: Path) -> None:
    city = OSCD / "bercy"
    n = _grid_over(engine, city / "imgs_1", name="bercy", spacing_m=800)
    assert n >= 4
    store = ChipStore(tmp_path / "chips")
    pipeline = IngestPipeline(engine, store, LocalSource(city), settings=SETTINGS)
    first = pipeline.run(aoi="bercy", since=None)
    assert first.scenes == 2
    assert first.chips == 2 * n, first
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT s.product_id, s.level, count(*), min(o.valid_fraction) FROM observation o"
                " JOIN scene s ON s.id = o.scene_id GROUP BY 1, 2 ORDER BY 1"
            )
        ).all()
        key, sha = conn.execute(sa.text("SELECT chip_key, chip_sha256 FROM observation")).first()
    assert [(r[0], r[1], r[2]) for r in rows] == [("imgs_1", "L1C", n), ("imgs_2", "L1C", n)]
    assert all(r[3] > 0.99 for r in rows)
    chip = store.get(key, sha)
    assert chip.shape == (12, 32, 32) and 100 < chip.mean() < 5000

    again = IngestPipeline(engine, store, LocalSource(city), settings=SETTINGS).run(aoi="bercy")
    assert (again.scenes, again.chips) == (0, 0)
    assert _count(engine, "SELECT count(*) FROM observation") == 2 * n


def test_the_l2a_safe_ingests_with_its_offset_removed_and_clouds_counted(
    engine: sa.Engine, tmp_path: Path
) -> None:
    assert SAFE is not None
    area = product_footprint(SAFE)
    centre = area.centroid
    points = [(centre.x + dx, centre.y + dy) for dx in (-0.2, 0.0, 0.2) for dy in (-0.2, 0.0, 0.2)]
    with engine.begin() as conn:
        insert_locations(conn, points, origin="manual", chip_size=32)
    summary = IngestPipeline(
        engine, ChipStore(tmp_path / "chips"), LocalSource(SAFE.parent), settings=SETTINGS
    ).run()
    assert summary.scenes == 1
    assert summary.chips + summary.quarantined == len(points)
    with engine.connect() as conn:
        scene = conn.execute(
            sa.text("SELECT level, processing_baseline, cloud_cover FROM scene")
        ).one()
        cloudy = conn.execute(sa.text("SELECT max(cloud_fraction) FROM observation")).scalar_one()
    assert scene.level == "L2A" and scene.processing_baseline == "04.00"
    assert cloudy is not None and cloudy > 0.0


def test_bad_products_are_quarantined_and_good_ones_still_land(
    engine: sa.Engine, tmp_path: Path
) -> None:
    assert SAFE is not None
    library = tmp_path / "library"
    good = library / "good" / "imgs_1"
    shutil.copytree(OSCD / "bercy" / "imgs_1", good)
    shutil.copy(OSCD / "bercy" / "dates.txt", good.parent / "dates.txt")
    # A band folder whose B04 is cut short.
    truncated = library / "truncated" / "imgs_1"
    shutil.copytree(OSCD / "bercy" / "imgs_1", truncated)
    shutil.copy(OSCD / "bercy" / "dates.txt", truncated.parent / "dates.txt")
    b04 = next(truncated.glob("*_B04.tif"))
    b04.write_bytes(b04.read_bytes()[:2000])
    # A band folder missing a band.
    short = library / "short" / "imgs_1"
    shutil.copytree(OSCD / "bercy" / "imgs_1", short)
    shutil.copy(OSCD / "bercy" / "dates.txt", short.parent / "dates.txt")
    next(short.glob("*_B11.tif")).unlink()
    # A SAFE without its metadata file.
    no_mtd = library / SAFE.name
    shutil.copytree(SAFE, no_mtd)
    (no_mtd / "MTD_MSIL2A.xml").unlink()

    n = _grid_over(engine, OSCD / "bercy" / "imgs_1", name="bercy", spacing_m=1200)
    summary = IngestPipeline(
        engine, ChipStore(tmp_path / "chips"), LocalSource(library), settings=SETTINGS
    ).run(aoi="bercy")
    with engine.connect() as conn:
        quarantined = dict(
            conn.execute(sa.text("SELECT reason, count(*) FROM quarantine GROUP BY reason")).all()
        )
        ingested = (
            conn.execute(sa.text("SELECT product_id FROM scene WHERE status = 'ingested'"))
            .scalars()
            .all()
        )
    assert ingested == ["good/imgs_1"]
    assert summary.chips == n
    assert quarantined.get(reasons.CORRUPT_RASTER) == 1
    assert quarantined.get(reasons.WRONG_BAND_COUNT) == 1
    assert quarantined.get(reasons.MISSING_METADATA) == 1
    # Nothing half-written: every observation's chip is whole on disk.
    assert _count(engine, "SELECT count(*) FROM observation") == n


def test_a_second_copy_of_a_product_is_a_duplicate(engine: sa.Engine, tmp_path: Path) -> None:
    assert SAFE is not None
    for copy in ("a", "b"):
        shutil.copytree(SAFE, tmp_path / "library" / copy / SAFE.name)
    centre = product_footprint(SAFE).centroid
    with engine.begin() as conn:
        insert_locations(conn, [(centre.x, centre.y)], origin="manual", chip_size=32)
    summary = IngestPipeline(
        engine, ChipStore(tmp_path / "chips"), LocalSource(tmp_path / "library"), settings=SETTINGS
    ).run()
    assert summary.scenes == 1
    assert summary.quarantined_by_reason.get(reasons.DUPLICATE_PRODUCT) == 1
    assert _count(engine, "SELECT count(*) FROM scene") == 1
    with engine.connect() as conn:
        detail = conn.execute(
            sa.text("SELECT detail FROM quarantine WHERE reason = 'duplicate-product'")
        ).scalar_one()
    assert SAFE.name.removesuffix(".SAFE") in detail


def test_all_of_the_shared_data_ingests_idempotently(engine: sa.Engine, tmp_path: Path) -> None:
    """Every product under ../shared/data: each OSCD city x 2 dates, and the L2A SAFE."""
    source = LocalSource(SHARED_DATA)
    products = list(source.products(on_rejected=lambda *args: None))
    # The labeled cities and, where the folder has them, the unlabeled ones.
    cities = [d for d in ("oscd", "oscd_unlabeled") if (SHARED_DATA / d).is_dir()]
    expected = 1 + 2 * sum(len(list((SHARED_DATA / d / "images").iterdir())) for d in cities)
    assert len(products) == expected
    centres = [p.footprint.centroid for p in products]
    points = sorted({(round(c.x, 5), round(c.y, 5)) for c in centres})
    with engine.begin() as conn:
        insert_locations(conn, points, origin="manual", chip_size=32)
    store = ChipStore(tmp_path / "chips")
    first = IngestPipeline(engine, store, source, settings=SETTINGS).run()
    assert first.scenes == expected and first.interrupted is None
    # Each product gives a chip (or a quarantined one) at its own centre, and
    # the two dates of a city share their centre.
    assert first.chips + first.quarantined >= expected
    again = IngestPipeline(engine, store, LocalSource(SHARED_DATA), settings=SETTINGS).run()
    assert (again.scenes, again.chips) == (0, 0)
    assert _count(engine, "SELECT count(*) FROM scene") == expected
