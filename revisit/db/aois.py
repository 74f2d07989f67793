"""Areas of interest: named polygons a user asked revisit to watch."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from shapely import wkt
from shapely.geometry.base import BaseGeometry
from sqlalchemy.engine import Connection

from revisit.errors import RevisitError


class AoiNotFoundError(RevisitError, LookupError):
    """No AOI has the given name."""


class AoiExistsError(RevisitError, ValueError):
    """An AOI of that name exists already."""


@dataclass(frozen=True)
class Aoi:
    id: int
    name: str
    geom: BaseGeometry


def create_aoi(conn: Connection, *, name: str, geom: BaseGeometry) -> Aoi:
    """Add an AOI (a lon/lat polygon or multipolygon).

    Raises:
        AoiExistsError: The name is taken.
    """
    row = conn.execute(
        sa.text(
            "INSERT INTO aoi (name, geom) VALUES (:name, ST_Multi(ST_GeomFromText(:wkt, 4326)))"
            " ON CONFLICT (name) DO NOTHING RETURNING id"
        ),
        {"name": name, "wkt": geom.wkt},
    ).first()
    if row is None:
        raise AoiExistsError(f"an AOI named {name!r} exists already")
    return Aoi(int(row[0]), name, geom)


def get_aoi(conn: Connection, name: str) -> Aoi:
    """The AOI of that name.

    Raises:
        AoiNotFoundError: There is none; the message lists what there is.
    """
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: no stored name can equal it
        raise AoiNotFoundError(f"no AOI named {name!r}: not valid UTF-8 text") from None
    row = conn.execute(
        sa.text("SELECT id, name, ST_AsText(geom) FROM aoi WHERE name = :name"), {"name": name}
    ).first()
    if row is None:
        names = [a.name for a in list_aois(conn)]
        known = ", ".join(names[:20]) if names else "none yet: add one with `revisit aoi add`"
        raise AoiNotFoundError(f"no AOI named {name!r} (known: {known})")
    return Aoi(int(row[0]), str(row[1]), wkt.loads(row[2]))


def list_aois(conn: Connection) -> list[Aoi]:
    rows = conn.execute(sa.text("SELECT id, name, ST_AsText(geom) FROM aoi ORDER BY name"))
    return [Aoi(int(i), str(n), wkt.loads(g)) for i, n, g in rows]
