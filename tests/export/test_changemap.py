"""Change maps from change_estimate: GeoJSON, COG and PNG, by bbox and by AOI, on real PostGIS."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import sqlalchemy as sa
from matplotlib.image import imread
from rio_cogeo.cogeo import cog_validate

from revisit.config import Settings, load_settings
from revisit.db.aois import AoiNotFoundError
from revisit.db.artifacts import list_artifacts
from revisit.db.changemaps import ChangeMapRows, change_map_rows, validate_bbox
from revisit.db.locations import insert_locations
from revisit.errors import ExportError
from revisit.export.changemap import (
    BAND_DESCRIPTION,
    cell_size,
    export_change_map,
    grid_change,
    write_geojson,
)

PARIS = (2.25, 48.81, 2.42, 48.90)
SPACING = 0.02
GRID = [
    (round(2.275 + SPACING * i, 6), round(48.835 + SPACING * j, 6))
    for i in range(5)
    for j in range(4)
]
KNOWN = (2.315, 48.855)  # r = 3.0, changed
NO_ESTIMATE = (2.355, 48.895)  # a location the learner has not measured
CW_CENTRE = (2.405, 48.875)  # its footprint is stored clockwise
NO_FOOTPRINT = (2.415, 48.825)  # a point without a footprint
OUTSIDE = (3.50, 49.50)  # has an estimate, outside the AOI and the bbox
RESOLUTION = 0.01
# Every location lies mid-cell of a RESOLUTION grid from PARIS's corner: no edge cases.


@dataclass(frozen=True)
class World:
    engine: sa.Engine
    settings: Settings
    newest_model_id: int
    ratio: dict[tuple[float, float], float]


def _location_id(conn: sa.Connection, lon: float, lat: float) -> int:
    return int(
        conn.execute(
            sa.text(
                "SELECT id FROM location WHERE ST_DWithin(geom,"
                " ST_SetSRID(ST_MakePoint(:lon, :lat), 4326), 1e-9)"
            ),
            {"lon": lon, "lat": lat},
        ).scalar_one()
    )


def seed(conn: sa.Connection) -> tuple[int, dict[tuple[float, float], float]]:
    """The Paris AOI, two model versions, locations with and without estimates."""
    conn.execute(
        sa.text(
            "INSERT INTO aoi (name, geom) VALUES"
            " ('paris', ST_Multi(ST_MakeEnvelope(2.25, 48.81, 2.42, 48.90, 4326)))"
        )
    )
    old, new = (
        int(
            conn.execute(
                sa.text(
                    "INSERT INTO model_version (step, method, created_at)"
                    " VALUES (:step, 'caco', :at) RETURNING id"
                ),
                {"step": step, "at": at},
            ).scalar_one()
        )
        for step, at in ((50, "2025-01-01T00:00:00Z"), (100, "2025-02-01T00:00:00Z"))
    )
    insert_locations(conn, [*GRID, OUTSIDE], origin="manual")
    conn.execute(
        sa.text(
            "INSERT INTO location (geom, footprint, origin) VALUES"
            " ('SRID=4326;POINT(2.405 48.875)',"
            "  ST_MakeEnvelope(2.404, 48.874, 2.406, 48.876, 4326), 'manual'),"
            " ('SRID=4326;POINT(2.415 48.825)', NULL, 'manual')"
        )
    )
    ratio: dict[tuple[float, float], float] = {}
    for k, point in enumerate([*GRID, OUTSIDE, CW_CENTRE, NO_FOOTPRINT]):
        if point == NO_ESTIMATE:
            continue
        r = 3.0 if point == KNOWN else 1.0 + 0.05 * k
        ratio[point] = r
        conn.execute(
            sa.text(
                "INSERT INTO change_estimate (location_id, ratio_ema, ratio_last, long_dist,"
                " short_dist, updates, changed, model_version_id, updated_at)"
                " VALUES (:id, :r, :r + 0.1, 0.4, 0.3, :updates, :changed, :mv,"
                " '2025-02-01T12:00:00+02:00')"
            ),
            {
                "id": _location_id(conn, *point),
                "r": r,
                "updates": k + 1,
                "changed": point == KNOWN,
                "mv": new if k % 2 else old,
            },
        )
    return new, ratio


@pytest.fixture
def world(engine: sa.Engine, database_url: str, tmp_path: Path) -> World:
    with engine.begin() as conn:
        newest, ratio = seed(conn)
    settings = load_settings(
        database_url=database_url,
        data_dir=tmp_path / "var",
        export={"cog_resolution_deg": RESOLUTION},
    )
    return World(engine, settings, newest, ratio)


def _export(world: World, fmt: Any, out: Path, **where: Any) -> Any:
    return export_change_map(
        engine=world.engine, settings=world.settings, fmt=fmt, out=out, **where
    )


def _shoelace(ring: list[list[float]]) -> float:
    """Twice the signed area of a closed ring: positive when counter-clockwise."""
    return sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in itertools.pairwise(ring))


def _exterior_rings(geometry: dict[str, Any]) -> Iterator[list[list[float]]]:
    if geometry["type"] == "Polygon":
        yield geometry["coordinates"][0]
    elif geometry["type"] == "MultiPolygon":
        for polygon in geometry["coordinates"]:
            yield polygon[0]


def _decimals(value: float) -> int:
    text = repr(value)
    return len(text.split(".")[1]) if "." in text and "e" not in text else 0


# -- the rows -------------------------------------------------------------------------------


def test_rows_by_bbox_hold_every_estimate_inside(world: World) -> None:
    with world.engine.connect() as conn:
        rows = change_map_rows(conn, bbox=PARIS)
    inside = {p for p in world.ratio if p != OUTSIDE}
    assert len(rows) == len(inside)
    assert rows.bbox == PARIS
    assert rows.aoi is None
    assert list(rows.location_id) == sorted(rows.location_id)
    assert rows.newest_model_version is not None
    assert rows.newest_model_version.id == world.newest_model_id
    got = {
        (round(x, 6), round(y, 6)): r
        for x, y, r in zip(rows.lon, rows.lat, rows.ratio_ema, strict=True)
    }
    assert got == pytest.approx({p: world.ratio[p] for p in inside})


def test_rows_need_exactly_one_selection_and_a_valid_bbox(world: World) -> None:
    with world.engine.connect() as conn:
        with pytest.raises(ValueError, match="exactly one"):
            change_map_rows(conn)
        with pytest.raises(ValueError, match="exactly one"):
            change_map_rows(conn, bbox=PARIS, aoi="paris")
        with pytest.raises(ValueError, match="west < east"):
            change_map_rows(conn, bbox=(2.3, 48.8, 2.3, 48.9))
        with pytest.raises(ValueError, match="latitudes"):
            change_map_rows(conn, bbox=(2.3, 48.8, 2.4, 91))
    with pytest.raises(ValueError, match="four numbers"):
        validate_bbox((1, 2, 3))


# -- GeoJSON --------------------------------------------------------------------------------


def test_geojson_follows_rfc_7946(world: World, tmp_path: Path) -> None:
    out = tmp_path / "maps" / "paris.geojson"
    exported = _export(world, "geojson", out, bbox=PARIS)
    data = json.loads(out.read_text())  # valid JSON

    assert data["type"] == "FeatureCollection"
    assert "crs" not in data
    features = data["features"]
    assert len(features) == exported.counts["locations"] == len(world.ratio) - 1
    west, south, east, north = data["bbox"]
    for feature in features:
        assert feature["type"] == "Feature"
        assert "crs" not in feature["geometry"]
        assert set(feature["properties"]) == {
            "location_id",
            "ratio_ema",
            "ratio_last",
            "changed",
            "updates",
            "updated_at",
        }
        assert feature["properties"]["updated_at"] == "2025-02-01T10:00:00Z"
        rings = list(_exterior_rings(feature["geometry"]))
        for ring in rings:
            assert ring[0] == ring[-1]
            assert _shoelace(ring) > 0, f"clockwise exterior ring in {feature['id']}"
            for lon, lat in ring:
                assert 2.2 < lon < 2.5 and 48.7 < lat < 49.0  # lon first, then lat
                assert west <= lon <= east and south <= lat <= north
                assert _decimals(lon) <= 7 and _decimals(lat) <= 7
    kinds = {f["geometry"]["type"] for f in features}
    assert kinds == {"Polygon", "Point"}

    by_id = {f["id"]: f for f in features}
    with world.engine.connect() as conn:
        known = by_id[_location_id(conn, *KNOWN)]
        cw = by_id[_location_id(conn, *CW_CENTRE)]
        point = by_id[_location_id(conn, *NO_FOOTPRINT)]
        stored_cw = conn.execute(
            sa.text("SELECT ST_IsPolygonCW(footprint) FROM location WHERE id = :id"),
            {"id": cw["id"]},
        ).scalar_one()
    assert stored_cw, "the test needs a footprint stored clockwise"
    ring = np.array(known["geometry"]["coordinates"][0][:-1])
    assert ring.mean(axis=0) == pytest.approx(KNOWN, abs=2e-4)
    assert known["properties"]["ratio_ema"] == 3.0
    assert known["properties"]["changed"] is True
    assert point["geometry"] == {"type": "Point", "coordinates": list(NO_FOOTPRINT)}
    assert data["revisit"]["model_version_id"] == world.newest_model_id


def test_geojson_of_no_rows_is_an_empty_collection(world: World, tmp_path: Path) -> None:
    with world.engine.connect() as conn:
        rows = change_map_rows(conn, bbox=(10, 10, 11, 11))
    written = write_geojson(rows, tmp_path / "empty.geojson")
    data = json.loads(written.path.read_text())
    assert data["features"] == []
    assert "bbox" not in data
    assert not list(tmp_path.glob(".*.tmp")), "a temporary file was left behind"


# -- COG ------------------------------------------------------------------------------------


def test_cog_is_valid_and_holds_r_where_there_are_estimates(world: World, tmp_path: Path) -> None:
    out = tmp_path / "paris.tif"
    exported = _export(world, "cog", out, bbox=PARIS)

    valid, errors, _ = cog_validate(str(out), quiet=True)
    assert valid, errors
    with rasterio.open(out) as ds:
        assert ds.crs.to_epsg() == 4326
        assert ds.count == 1
        assert ds.dtypes == ("float32",)
        assert math.isnan(ds.nodata)
        assert ds.descriptions == (BAND_DESCRIPTION,)
        tags = ds.tags()
        assert tags["model_version"].startswith(f"{world.newest_model_id} (caco, step 100)")
        assert tags["method"] == "caco"
        assert tags["created_at"].endswith("Z")
        assert "ratio_ema" in tags["values"]
        assert ds.res == pytest.approx((RESOLUTION, RESOLUTION))
        left, bottom, right, top = ds.bounds
        assert left == pytest.approx(PARIS[0]) and top == pytest.approx(PARIS[3])
        assert right >= PARIS[2] - 1e-9 and bottom <= PARIS[1] + 1e-9
        assert right - PARIS[2] < RESOLUTION and PARIS[1] - bottom < RESOLUTION
        values = ds.read(1)

    def at(lon: float, lat: float) -> float:
        row, col = rasterio.transform.rowcol(ds.transform, lon, lat)
        return float(values[row, col])

    assert at(*KNOWN) == 3.0
    for point, r in world.ratio.items():
        if point != OUTSIDE:
            assert at(*point) == pytest.approx(r, rel=1e-6)
    assert math.isnan(at(*NO_ESTIMATE))
    assert math.isnan(at(2.255, 48.815))  # no location there at all
    assert int(np.count_nonzero(np.isfinite(values))) == exported.counts["cells_with_data"]
    assert exported.counts["cells"] == values.size


def test_cog_by_aoi_covers_the_aoi(world: World, tmp_path: Path) -> None:
    out = tmp_path / "aoi.tif"
    exported = _export(world, "cog", out, aoi="paris")
    assert cog_validate(str(out), quiet=True)[0]
    assert exported.bbox == pytest.approx(PARIS)
    with rasterio.open(out) as ds:
        assert ds.bounds.left == pytest.approx(PARIS[0])
        assert ds.bounds.top == pytest.approx(PARIS[3])
        assert ds.bounds.right >= PARIS[2] - 1e-9 and ds.bounds.bottom <= PARIS[1] + 1e-9
    assert exported.counts["locations"] == len(world.ratio) - 1


def test_default_cell_size_follows_the_location_spacing(world: World) -> None:
    with world.engine.connect() as conn:
        rows = change_map_rows(conn, aoi="paris")
    xres, yres = cell_size(rows, bbox=PARIS)
    shrink = math.cos(math.radians(float(np.mean(rows.lat))))
    # The nearest neighbours are east-west: SPACING degrees of longitude.
    assert xres == pytest.approx(SPACING, rel=1e-6)
    assert yres == pytest.approx(SPACING * shrink, rel=1e-6)
    grid = grid_change(rows, bbox=PARIS)
    assert grid.cells_with_data == len(rows)  # one location per cell
    assert cell_size(rows, bbox=PARIS, resolution_deg=0.5) == (0.5, 0.5)


def test_grid_means_the_locations_of_a_cell(world: World) -> None:
    with world.engine.connect() as conn:
        rows = change_map_rows(conn, bbox=PARIS)
    grid = grid_change(rows, bbox=PARIS, resolution_deg=1.0)
    assert (grid.width, grid.height) == (1, 1)
    assert float(grid.values[0, 0]) == pytest.approx(float(np.mean(rows.ratio_ema)), rel=1e-6)
    assert int(grid.counts[0, 0]) == len(rows)


# -- PNG ------------------------------------------------------------------------------------


def test_png_quicklook_is_a_real_png(world: World, tmp_path: Path) -> None:
    out = tmp_path / "paris.png"
    exported = _export(world, "png", out, aoi="paris")
    data = out.read_bytes()
    assert len(data) > 1000
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(out)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert exported.kind == "quicklook"


# -- errors and artifacts -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["geojson", "cog", "png"])
def test_an_empty_selection_is_a_clear_error(world: World, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"empty.{fmt}"
    with pytest.raises(ExportError, match=r"no location with a change estimate in bbox 10,10"):
        _export(world, fmt, out, bbox=(10, 10, 11, 11))
    assert not out.exists()
    with world.engine.connect() as conn:
        assert list_artifacts(conn) == []


def test_an_unknown_aoi_is_named(world: World, tmp_path: Path) -> None:
    with pytest.raises(AoiNotFoundError, match=r"no AOI named 'atlantis' \(known: paris\)"):
        _export(world, "geojson", tmp_path / "x.geojson", aoi="atlantis")


def test_an_unknown_format_is_refused(world: World, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="format"):
        _export(world, "shp", tmp_path / "x.shp", bbox=PARIS)


def test_every_export_records_an_artifact(world: World, tmp_path: Path) -> None:
    outs = {
        "geojson": world.settings.data_dir / "maps" / "m.geojson",
        "cog": tmp_path / "m.tif",
        "png": tmp_path / "m.png",
    }
    exported = {fmt: _export(world, fmt, out, aoi="paris") for fmt, out in outs.items()}
    with world.engine.connect() as conn:
        artifacts = {a.kind: a for a in list_artifacts(conn)}
    assert set(artifacts) == {"changemap-geojson", "changemap-cog", "quicklook"}
    for fmt, result in exported.items():
        artifact = artifacts[result.kind]
        assert artifact.id == result.artifact_id
        assert (
            artifact.sha256 == result.sha256 == hashlib.sha256(outs[fmt].read_bytes()).hexdigest()
        )
        assert artifact.size_bytes == outs[fmt].stat().st_size
        assert artifact.model_version_id == world.newest_model_id
        assert artifact.bbox == pytest.approx(PARIS)
        assert artifact.metadata["format"] == fmt
        assert artifact.metadata["aoi"] == "paris"
        assert artifact.metadata["counts"] == result.counts
    assert artifacts["changemap-geojson"].path == "maps/m.geojson"  # data-dir relative
    assert artifacts["changemap-cog"].path == str(outs["cog"])
    assert "resolution_deg" in artifacts["changemap-cog"].metadata


def test_rows_type_is_columnar(world: World) -> None:
    with world.engine.connect() as conn:
        rows: ChangeMapRows = change_map_rows(conn, aoi="paris")
    assert rows.aoi_bounds == pytest.approx(PARIS)
    assert rows.lon.dtype == np.float64 and rows.location_id.dtype == np.int64
    assert rows.changed_count == 1
    assert len(rows.footprint) == len(rows.updated_at) == len(rows.model_version_id) == len(rows)


def test_rows_without_footprints_make_grids_but_no_geojson(world: World, tmp_path: Path) -> None:
    with world.engine.connect() as conn:
        rows = change_map_rows(conn, bbox=PARIS, footprints=False)
        full = change_map_rows(conn, bbox=PARIS)
    assert rows.footprint is None
    np.testing.assert_array_equal(rows.ratio_ema, full.ratio_ema)
    assert rows.extent == full.extent
    with pytest.raises(ValueError, match="footprints"):
        write_geojson(rows, tmp_path / "x.geojson")
    assert not list(tmp_path.iterdir())
