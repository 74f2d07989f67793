"""Locations: the places the learner knows, and which of them a scene covers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from shapely import wkt
from shapely.geometry.base import BaseGeometry
from sqlalchemy.engine import Connection

from revisit.db.copy import copy_rows
from revisit.grid import chip_grid_for


@dataclass(frozen=True)
class LocationPoint:
    id: int
    lon: float
    lat: float


def insert_locations(
    conn: Connection,
    points: Sequence[tuple[float, float]],
    *,
    origin: str,
    aoi_id: int | None = None,
    chip_size: int = 64,
) -> int:
    """Add locations (lon, lat) with their chip footprint and UTM zone, through COPY.

    Returns:
        How many were added.
    """
    rows = []
    for lon, lat in points:
        grid = chip_grid_for(lon, lat, size=chip_size)
        rows.append(
            (
                f"SRID=4326;POINT({lon!r} {lat!r})",
                f"SRID=4326;{grid.footprint_lonlat().wkt}",
                grid.epsg,
                origin,
                aoi_id,
            )
        )
    return copy_rows(conn, "location", ("geom", "footprint", "epsg", "origin", "aoi_id"), rows)


def all_points(conn: Connection, *, aoi_id: int | None = None) -> list[tuple[float, float]]:
    """(lon, lat) of every location, or of those inside an AOI."""
    query = "SELECT ST_X(l.geom), ST_Y(l.geom) FROM location l"
    params: dict[str, object] = {}
    if aoi_id is not None:
        query += " JOIN aoi a ON a.id = :aoi AND ST_Intersects(l.geom, a.geom)"
        params["aoi"] = aoi_id
    return [(float(x), float(y)) for x, y in conn.execute(sa.text(query), params)]


def count_locations(conn: Connection, *, aoi_id: int | None = None) -> int:
    """How many locations there are, or how many lie inside an AOI."""
    query = "SELECT count(*) FROM location l"
    params: dict[str, object] = {}
    if aoi_id is not None:
        query += " JOIN aoi a ON a.id = :aoi AND ST_Intersects(l.geom, a.geom)"
        params["aoi"] = aoi_id
    return int(conn.execute(sa.text(query), params).scalar_one())


def coverage_cells(conn: Connection, *, cell_deg: float = 1.0) -> BaseGeometry | None:
    """The cells of a ``cell_deg`` grid that hold at least one location, as one geometry.

    This is the area a source searches when no AOI is given: compact however
    many locations there are. None when there are no locations.
    """
    row = conn.execute(
        sa.text(
            "SELECT ST_AsText(ST_Union(ST_MakeEnvelope(x * :c, y * :c, (x + 1) * :c,"
            " (y + 1) * :c, 4326))) FROM (SELECT DISTINCT floor(ST_X(geom) / :c) AS x,"
            " floor(ST_Y(geom) / :c) AS y FROM location) cells"
        ),
        {"c": cell_deg},
    ).scalar_one()
    return None if row is None else wkt.loads(row)


def locations_to_read(
    conn: Connection,
    *,
    footprint: BaseGeometry,
    source: str,
    product_id: str,
    aoi_id: int | None = None,
) -> list[LocationPoint]:
    """Locations inside ``footprint`` (and the AOI) that this product has not yet given a chip.

    A location already observed in the product, or whose chip of it was
    quarantined, is left out: ingesting twice adds nothing.
    """
    query = """
        SELECT l.id, ST_X(l.geom), ST_Y(l.geom)
        FROM location l
        WHERE ST_Intersects(l.geom, ST_GeomFromText(:footprint, 4326))
          AND NOT EXISTS (
              SELECT 1 FROM observation o JOIN scene s ON s.id = o.scene_id
              WHERE o.location_id = l.id AND s.source = :source AND s.product_id = :product)
          AND NOT EXISTS (
              SELECT 1 FROM quarantine q
              WHERE q.location_id = l.id AND q.source = :source AND q.ref = :product)
    """
    params: dict[str, object] = {
        "footprint": footprint.wkt,
        "source": source,
        "product": product_id,
    }
    if aoi_id is not None:
        query += (
            " AND EXISTS (SELECT 1 FROM aoi a WHERE a.id = :aoi AND ST_Intersects(l.geom, a.geom))"
        )
        params["aoi"] = aoi_id
    query += " ORDER BY l.id"
    return [
        LocationPoint(int(i), float(x), float(y))
        for i, x, y in conn.execute(sa.text(query), params)
    ]
