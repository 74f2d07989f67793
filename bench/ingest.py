"""Ingest speed: simulated scenes end to end, against the least the same work can cost.

The pipeline run ingests simulated scenes for N locations: search, pixels,
checks, chip files written and fsynced, one transaction per scene with the
observation rows through COPY, cursor moves. The baseline, in the same run and
on the same database, generates the same chips and COPYs the same rows into an
empty copy of the ``observation`` table in one go, with no chip files, checks
or per-scene transactions. The figure printed last is baseline time / pipeline
time (1.0 would mean the pipeline's bookkeeping costs nothing; target >= 0.5).

    .venv/bin/python bench/ingest.py [--locations 40] [--days 60]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from shapely.geometry import box

from revisit.config import IngestSettings
from revisit.db.copy import copy_rows
from revisit.db.embedded import EmbeddedPostgres
from revisit.db.locations import insert_locations
from revisit.db.migrate import upgrade
from revisit.grid import chip_grid_for
from revisit.ingest.chips import ChipStore
from revisit.ingest.pipeline import IngestPipeline
from revisit.ingest.simworld.render import world_for
from revisit.ingest.sources.simulated import SimulatedSource
from revisit.types import Chip, LocationRef


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--locations", type=int, default=40)
    parser.add_argument("--days", type=int, default=60)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="revisit-bench-ingest-"))
    root.chmod(0o755)
    cluster = EmbeddedPostgres(root / "var")
    try:
        cluster.acquire()
        engine = sa.create_engine(cluster.sqlalchemy_url())
        upgrade(engine)
        # Locations spread over one simulated tile (8-9 E, 47-48 N).
        side = max(1, round(args.locations**0.5))
        points = [
            (8.05 + 0.9 * (i % side) / side, 47.05 + 0.9 * (i // side) / side)
            for i in range(args.locations)
        ]
        with engine.begin() as conn:
            insert_locations(conn, points, origin="manual")
        start = datetime(2023, 6, 1, tzinfo=UTC)
        until = start + timedelta(days=args.days)
        source = SimulatedSource(seed=0)
        store = ChipStore(root / "var" / "chips")
        pipeline = IngestPipeline(engine, store, source, settings=IngestSettings())
        world_for.cache_clear()

        began = time.perf_counter()
        summary = pipeline.run(since=start, until=until)
        pipeline_s = time.perf_counter() - began

        with engine.connect() as conn:
            ids = list(conn.execute(sa.text("SELECT id FROM location ORDER BY id")).scalars())
            scene_ids = dict(conn.execute(sa.text("SELECT product_id, id FROM scene")).all())
        refs = [
            LocationRef(id=i, lon=lon, lat=lat, grid=chip_grid_for(lon, lat, size=64))
            for i, (lon, lat) in zip(ids, points, strict=True)
        ]
        world_for.cache_clear()  # the baseline builds each location's world anew, as the run did
        began = time.perf_counter()
        rows = []
        area = box(8.0, 47.0, 9.0, 48.0)
        for scene in source.search(
            since=start, until=until, area=area, on_rejected=lambda *a: None
        ):
            for chip in source.read(scene, refs):
                if isinstance(chip, Chip):
                    scene_id = scene_ids[scene.product_id]
                    rows.append(
                        (chip.location_id, scene_id, scene.acquired_at, chip.valid_fraction,
                         chip.cloud_fraction, "k", "0" * 64, chip.grid.epsg,
                         list(chip.grid.bounds))
                    )  # fmt: skip
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE observation_copy (LIKE observation INCLUDING ALL)"))
            copy_rows(
                conn,
                "observation_copy",
                ("location_id", "scene_id", "acquired_at", "valid_fraction", "cloud_fraction",
                 "chip_key", "chip_sha256", "epsg", "bounds"),
                rows,
            )  # fmt: skip
        baseline_s = time.perf_counter() - began
        engine.dispose()
    finally:
        cluster.release()
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"scenes: {summary.scenes}, chips: {summary.chips},"
        f" quarantined: {summary.quarantined_by_reason}"
    )
    print(f"pipeline end to end: {summary.chips / pipeline_s:.1f} chips/s ({pipeline_s:.2f} s)")
    print(
        f"baseline (generate + one COPY): {len(rows) / baseline_s:.1f} chips/s ({baseline_s:.2f} s)"
    )
    print(f"pipeline chips/s: {summary.chips / pipeline_s:.1f}")
    print(f"baseline/pipeline time ratio: {baseline_s / pipeline_s:.2f}")


if __name__ == "__main__":
    main()
