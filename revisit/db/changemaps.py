"""What a change map is made of: every location with an estimate in a bbox or an AOI.

One query returns the rows as columns (numpy arrays and tuples, never ORM
objects), selected with the GiST index on ``location.geom``, together with the
footprint of each location as RFC 7946 GeoJSON text (lon/lat, exterior rings
counter-clockwise, at most :data:`GEOJSON_DECIMALS` decimals) and the model
versions behind the estimates. The function runs inside the caller's
transaction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy.engine import Connection

from revisit.db.aois import get_aoi
from revisit.db.copy import driver_connection

BBox = tuple[float, float, float, float]
"""(west, south, east, north) in degrees."""

GEOJSON_DECIMALS = 7
"""Decimals of a degree kept in GeoJSON coordinates (about 1 cm)."""

_GEOJSON = f"ST_AsGeoJSON(ST_ForcePolygonCCW(COALESCE(l.footprint, l.geom)), {GEOJSON_DECIMALS}, 0)"
_SELECT = """
SELECT l.id,
       ST_X(l.geom),
       ST_Y(l.geom),
       {footprint},
       ST_XMin(COALESCE(l.footprint, l.geom)),
       ST_YMin(COALESCE(l.footprint, l.geom)),
       ST_XMax(COALESCE(l.footprint, l.geom)),
       ST_YMax(COALESCE(l.footprint, l.geom)),
       e.ratio_ema,
       e.ratio_last,
       e.changed,
       e.updates::bigint,
       e.updated_at,
       e.model_version_id
FROM change_estimate e
JOIN location l ON l.id = e.location_id
"""


@dataclass(frozen=True)
class ModelVersionInfo:
    """A model version behind some of the estimates."""

    id: int
    method: str
    step: int
    created_at: datetime

    @property
    def label(self) -> str:
        """How a person reads it, e.g. ``7 (caco, step 2000)``."""
        return f"{self.id} ({self.method}, step {self.step})"


@dataclass(frozen=True, eq=False)
class ChangeMapRows:
    """Every location with a change estimate in the selected area, ordered by id.

    Attributes:
        location_id: Location ids.
        lon, lat: Location centres, degrees.
        footprint: Each location's chip footprint (its point where it has none)
            as GeoJSON geometry text: lon/lat, exterior rings counter-clockwise,
            no ``crs`` member. None when not asked for.
        ratio_ema: r, the moving average of the change ratio (higher: more change).
        ratio_last: R of the latest update.
        changed: Whether the change mixture classifies the location as changed.
        updates: How many times R was measured.
        updated_at: When each estimate was last written (timezone-aware).
        model_version_id: The model behind each estimate (None where unknown).
        model_versions: Those model versions, by id.
        bbox: The bbox asked for, when selected by bbox.
        aoi: The AOI's name, when selected by AOI.
        aoi_bounds: The AOI's (west, south, east, north), when selected by AOI.
        extent: (west, south, east, north) of every footprint; None when empty.
    """

    location_id: npt.NDArray[np.int64]
    lon: npt.NDArray[np.float64]
    lat: npt.NDArray[np.float64]
    footprint: tuple[str, ...] | None
    ratio_ema: npt.NDArray[np.float64]
    ratio_last: npt.NDArray[np.float64]
    changed: npt.NDArray[np.bool_]
    updates: npt.NDArray[np.int64]
    updated_at: tuple[datetime, ...]
    model_version_id: tuple[int | None, ...]
    model_versions: dict[int, ModelVersionInfo]
    bbox: BBox | None
    aoi: str | None
    aoi_bounds: BBox | None
    extent: BBox | None

    def __len__(self) -> int:
        return len(self.location_id)

    @property
    def area(self) -> BBox:
        """The box the selection was made in: the bbox, or the AOI's bounds."""
        area = self.bbox if self.bbox is not None else self.aoi_bounds
        if area is None:  # pragma: no cover - change_map_rows always sets one
            raise ValueError("rows were selected neither by bbox nor by AOI")
        return area

    @property
    def newest_model_version(self) -> ModelVersionInfo | None:
        """The most recently created model version among the rows, if any."""
        if not self.model_versions:
            return None
        return max(self.model_versions.values(), key=lambda m: (m.created_at, m.id))

    @property
    def changed_count(self) -> int:
        return int(np.count_nonzero(self.changed))


def validate_bbox(bbox: Any) -> BBox:
    """Check a (west, south, east, north) box in degrees and return it as floats.

    Raises:
        ValueError: Not four finite numbers, out of lon/lat range, or a minimum
            not below its maximum (boxes across the antimeridian are not
            accepted: split them in two).
    """
    try:
        values = tuple(float(v) for v in bbox)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"bbox must be four numbers (west, south, east, north), not {bbox!r}"
        ) from exc
    if len(values) != 4:
        raise ValueError(f"bbox must be four numbers (west, south, east, north), got {len(values)}")
    west, south, east, north = values
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"bbox coordinates must be finite, got {values}")
    if not (-180 <= west <= 180 and -180 <= east <= 180):
        raise ValueError(f"bbox longitudes must be within [-180, 180], got {west}, {east}")
    if not (-90 <= south <= 90 and -90 <= north <= 90):
        raise ValueError(f"bbox latitudes must be within [-90, 90], got {south}, {north}")
    if not (west < east and south < north):
        raise ValueError(
            f"bbox must have west < east and south < north, got {values}"
            " (a box across the antimeridian must be split in two)"
        )
    return west, south, east, north


def change_map_rows(
    conn: Connection,
    *,
    bbox: tuple[float, float, float, float] | None = None,
    aoi: str | None = None,
    footprints: bool = True,
) -> ChangeMapRows:
    """Every location with a change estimate inside a bbox or an AOI, as columns.

    A location belongs to the selection when its centre point does: inside the
    bbox (edges included), or intersecting the AOI's polygon. Both use the GiST
    index on ``location.geom``. At 100,000 locations the rows come back in
    about a second with footprints (most of it PostGIS writing the GeoJSON) and
    in about a third of that without.

    Args:
        conn: A connection inside the caller's transaction.
        bbox: (west, south, east, north) in degrees.
        aoi: The name of an AOI.
        footprints: Whether to fetch each footprint's GeoJSON (a grid needs none).

    Returns:
        The rows, ordered by location id; empty when nothing has an estimate there.

    Raises:
        ValueError: Both or neither of ``bbox`` and ``aoi``, or an invalid bbox.
        AoiNotFoundError: No AOI has that name; the message names it.
    """
    if (bbox is None) == (aoi is None):
        raise ValueError("give exactly one of bbox and aoi")
    aoi_bounds: BBox | None = None
    select = _SELECT.format(footprint=_GEOJSON if footprints else "NULL::text")
    with driver_connection(conn).cursor(binary=True) as cursor:
        if bbox is not None:
            bbox = validate_bbox(bbox)
            cursor.execute(
                select + "WHERE l.geom && ST_MakeEnvelope(%s, %s, %s, %s, 4326) ORDER BY l.id",
                bbox,
            )
            rows = cursor.fetchall()
        elif aoi is not None:
            found = get_aoi(conn, aoi)
            aoi_id = found.id
            west, south, east, north = found.geom.bounds
            aoi_bounds = (float(west), float(south), float(east), float(north))
            cursor.execute(
                select + "JOIN aoi a ON a.id = %s AND ST_Intersects(l.geom, a.geom) ORDER BY l.id",
                (aoi_id,),
            )
            rows = cursor.fetchall()
        model_ids = sorted({int(r[13]) for r in rows if r[13] is not None})
        model_versions: dict[int, ModelVersionInfo] = {}
        if model_ids:
            cursor.execute(
                "SELECT id, method, step, created_at FROM model_version WHERE id = ANY(%s)",
                (model_ids,),
            )
            for mid, method, step, created_at in cursor.fetchall():
                model_versions[int(mid)] = ModelVersionInfo(
                    int(mid), str(method), int(step), created_at
                )
    return _columns(
        rows,
        bbox=bbox,
        aoi=aoi,
        aoi_bounds=aoi_bounds,
        models=model_versions,
        footprints=footprints,
    )


def _columns(
    rows: list[tuple[Any, ...]],
    *,
    bbox: BBox | None,
    aoi: str | None,
    aoi_bounds: BBox | None,
    models: dict[int, ModelVersionInfo],
    footprints: bool,
) -> ChangeMapRows:
    n = len(rows)
    cols: list[tuple[Any, ...]] = list(zip(*rows, strict=True)) if rows else [()] * 14

    def floats(i: int) -> npt.NDArray[np.float64]:
        return np.fromiter(cols[i], dtype=np.float64, count=n)

    extent: BBox | None = None
    if n:
        extent = (
            float(floats(4).min()),
            float(floats(5).min()),
            float(floats(6).max()),
            float(floats(7).max()),
        )
    return ChangeMapRows(
        location_id=np.fromiter(cols[0], dtype=np.int64, count=n),
        lon=floats(1),
        lat=floats(2),
        footprint=tuple(str(g) for g in cols[3]) if footprints else None,
        ratio_ema=floats(8),
        ratio_last=floats(9),
        changed=np.fromiter(cols[10], dtype=np.bool_, count=n),
        updates=np.fromiter(cols[11], dtype=np.int64, count=n),
        updated_at=tuple(cols[12]),
        model_version_id=tuple(None if m is None else int(m) for m in cols[13]),
        model_versions=models,
        bbox=bbox,
        aoi=aoi,
        aoi_bounds=aoi_bounds,
        extent=extent,
    )
