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
    offset: int = 0,
    location_id: int | None = None,
) -> list[ChangedLocation]:
    """Locations with a change estimate, most changed first.

    Args:
        bbox: (minlon, minlat, maxlon, maxlat): only locations inside it.
        aoi_id: Only locations inside this AOI's polygon.
        min_ratio: Only locations whose r (ratio_ema) is at least this.
        since: Only locations that became changed at or after this time.
        changed_only: Only locations the change mixture classifies as changed.
        limit: At most this many rows.
        offset: Skip this many rows first. The order (r descending, then location
            id) is total, so pages of ``limit`` rows at offsets 0, limit, 2·limit…
            list every row once while the estimates do not change in between.
        location_id: Only this location.

    Raises:
        ValueError: ``limit`` below 0 or ``offset`` below 0.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be at least 0, not {limit}")
    if offset < 0:
        raise ValueError(f"offset must be at least 0, not {offset}")
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
    if location_id is not None:
        where.append("c.location_id = :location_id")
        params["location_id"] = location_id
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
    if offset:
        query += " OFFSET :offset"
        params["offset"] = offset
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


@dataclass(frozen=True)
class ChangeEventPoint:
    """One measurement of R for a location (a ``change_event`` row)."""

    step: int
    #: R of this update.
    ratio: float
    #: r after it.
    ratio_ema: float
    long_dist: float
    short_dist: float
    season_gap_days: float | None
    denominator: str | None
    #: When the query image (t0) and the long-term image were acquired, if known.
    query_acquired_at: datetime | None
    longterm_acquired_at: datetime | None
    created_at: datetime


@dataclass(frozen=True)
class LocationHistory:
    """A location, its current change estimate (if measured) and every measurement behind it."""

    location_id: int
    lon: float
    lat: float
    aoi_name: str | None
    #: Why there is no estimate yet (``v_change.unmeasured_reason``); None when measured.
    unmeasured_reason: str | None
    estimate: ChangedLocation | None
    events: list[ChangeEventPoint]


def location_history(conn: Connection, location_id: int) -> LocationHistory | None:
    """A location's change estimate and its history of R and r, oldest step first.

    Returns:
        None when no location has that id.
    """
    place = conn.execute(
        sa.text(
            "SELECT ST_X(c.geom), ST_Y(c.geom), c.aoi_name, c.measured, c.unmeasured_reason"
            " FROM v_change c WHERE c.location_id = :id"
        ),
        {"id": location_id},
    ).first()
    if place is None:
        return None
    estimate = None
    if place[3]:
        matches = changed_locations(conn, location_id=location_id, changed_only=False)
        estimate = matches[0] if matches else None
    events = [
        ChangeEventPoint(
            step=int(r[0]),
            ratio=float(r[1]),
            ratio_ema=float(r[2]),
            long_dist=float(r[3]),
            short_dist=float(r[4]),
            season_gap_days=None if r[5] is None else float(r[5]),
            denominator=r[6],
            query_acquired_at=r[7],
            longterm_acquired_at=r[8],
            created_at=r[9],
        )
        for r in conn.execute(
            sa.text(
                "SELECT ev.step, ev.ratio, ev.ratio_ema, ev.long_dist, ev.short_dist,"
                " ev.season_gap_days, ev.denominator, q.acquired_at, lt.acquired_at,"
                " ev.created_at"
                " FROM change_event ev"
                " LEFT JOIN observation q ON q.id = ev.query_observation_id"
                " LEFT JOIN observation lt ON lt.id = ev.longterm_observation_id"
                " WHERE ev.location_id = :id ORDER BY ev.step, ev.id"
            ),
            {"id": location_id},
        )
    ]
    return LocationHistory(
        location_id=location_id,
        lon=float(place[0]),
        lat=float(place[1]),
        aoi_name=place[2],
        unmeasured_reason=None if place[3] else place[4],
        estimate=estimate,
        events=events,
    )


@dataclass(frozen=True)
class AoiOutline:
    """An AOI's polygon (as GeoJSON geometry text) and what its locations say."""

    aoi_id: int
    name: str
    geojson: str
    locations: int
    changed: int
    mean_ratio: float | None
    updated_at: datetime | None


def aoi_outlines(conn: Connection) -> list[AoiOutline]:
    """Every AOI with its polygon and counts of its measured and changed locations, by name."""
    return [
        AoiOutline(
            aoi_id=int(r[0]),
            name=str(r[1]),
            geojson=str(r[2]),
            locations=int(r[3]),
            changed=int(r[4]),
            mean_ratio=None if r[5] is None else float(r[5]),
            updated_at=r[6],
        )
        for r in conn.execute(
            sa.text(
                "SELECT aoi_id, aoi_name, ST_AsGeoJSON(geom, 7), locations, changed,"
                " mean_ratio, updated_at FROM v_aoi_change ORDER BY aoi_name"
            )
        )
    ]


def location_extent(conn: Connection) -> list[float] | None:
    """[minlon, minlat, maxlon, maxlat] of every location with an estimate; None without any."""
    row = conn.execute(
        sa.text(
            "SELECT ST_XMin(b), ST_YMin(b), ST_XMax(b), ST_YMax(b) FROM"
            " (SELECT ST_Extent(l.geom) AS b FROM change_estimate e"
            " JOIN location l ON l.id = e.location_id) AS extent"
        )
    ).one()
    return None if row[0] is None else [float(v) for v in row]
