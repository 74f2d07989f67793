"""Questions people ask of the change estimates, with every value a bound parameter."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection


@dataclass(frozen=True)
class ChangedLocation:
    location_id: int
    lon: float
    lat: float
    ratio_ema: float
    ratio_last: float
    updates: int
    changed: bool
    change_probability: float | None
    changed_since: datetime | None
    updated_at: datetime
    aoi_name: str | None


def changed_locations(
    conn: Connection,
    *,
    bbox: tuple[float, float, float, float] | None = None,
    aoi_id: int | None = None,
    min_ratio: float | None = None,
    since: datetime | None = None,
    changed_only: bool = True,
    limit: int | None = None,
) -> list[ChangedLocation]:
    """Locations with a change estimate, most changed first.

    Args:
        bbox: (minlon, minlat, maxlon, maxlat): only locations inside it.
        aoi_id: Only locations inside this AOI's polygon.
        min_ratio: Only locations whose r (ratio_ema) is at least this.
        since: Only locations that became changed at or after this time.
        changed_only: Only locations the change mixture classifies as changed.
        limit: At most this many rows.
    """
    where = ["c.measured"]
    params: dict[str, object] = {}
    if bbox is not None:
        where.append("c.geom && ST_MakeEnvelope(:minx, :miny, :maxx, :maxy, 4326)")
        params.update(zip(("minx", "miny", "maxx", "maxy"), bbox, strict=True))
    if aoi_id is not None:
        where.append("ST_Intersects(c.geom, (SELECT geom FROM aoi WHERE id = :aoi_id))")
        params["aoi_id"] = aoi_id
    if min_ratio is not None:
        where.append("c.ratio_ema >= :min_ratio")
        params["min_ratio"] = min_ratio
    if since is not None:
        where.append("c.changed_since >= :since")
        params["since"] = since
    if changed_only:
        where.append("c.changed")
    query = (
        "SELECT c.location_id, ST_X(c.geom), ST_Y(c.geom), c.ratio_ema, c.ratio_last,"
        " c.updates, c.changed, c.changed_since, c.updated_at, c.aoi_name, c.change_probability"
        f" FROM v_change c WHERE {' AND '.join(where)}"
        " ORDER BY c.ratio_ema DESC, c.location_id"
    )
    if limit is not None:
        query += " LIMIT :limit"
        params["limit"] = limit
    return [
        ChangedLocation(
            location_id=int(r[0]),
            lon=float(r[1]),
            lat=float(r[2]),
            ratio_ema=float(r[3]),
            ratio_last=float(r[4]),
            updates=int(r[5]),
            changed=bool(r[6]),
            change_probability=None if r[10] is None else float(r[10]),
            changed_since=r[7],
            updated_at=r[8],
            aoi_name=r[9],
        )
        for r in conn.execute(sa.text(query), params)
    ]
