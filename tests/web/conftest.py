"""A small world for the web map: an AOI, locations with estimates and history, and a server.

Everything is written through revisit's own database functions (create_aoi,
insert_locations, insert_model_version, write_change_batch), as the learner does.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa
from shapely.geometry import box

from revisit.daemon.health import HealthServer
from revisit.daemon.metrics import Metrics
from revisit.db.aois import create_aoi
from revisit.db.embedded import EmbeddedPostgres
from revisit.db.learning import EstimateRow, EventRow, insert_model_version, write_change_batch
from revisit.db.locations import insert_locations
from tests.conftest import migrated_database

#: The AOI around the grid: a lake shore west of Geneva.
AOI_BOX = (6.10, 46.20, 6.22, 46.28)
COLUMNS, ROWS = 6, 5
#: One location beyond the AOI (east of it) and one known but not measured yet.
OUTSIDE = (6.30, 46.24)
UNMEASURED = (6.205, 46.275)


@dataclass(frozen=True)
class Place:
    id: int
    lon: float
    lat: float
    ratio_ema: float
    changed: bool
    steps: int


@dataclass(frozen=True)
class World:
    engine: sa.Engine
    #: Every location with an estimate, by id.
    places: dict[int, Place]
    unmeasured_id: int
    aoi_id: int


def grid_points() -> list[tuple[float, float]]:
    west, south, east, north = AOI_BOX
    return [
        (
            round(west + (east - west) * (i + 0.5) / COLUMNS, 6),
            round(south + (north - south) * (j + 0.5) / ROWS, 6),
        )
        for j in range(ROWS)
        for i in range(COLUMNS)
    ]


def seed_world(engine: sa.Engine) -> World:
    """30 locations in the AOI and one outside with estimates and 1 to 4 steps of history each."""
    points = [*grid_points(), OUTSIDE]
    with engine.begin() as conn:
        aoi = create_aoi(conn, name="geneva-shore", geom=box(*AOI_BOX))
        insert_locations(conn, points, origin="manual", aoi_id=aoi.id, chip_size=32)
        insert_locations(conn, [UNMEASURED], origin="manual", aoi_id=aoi.id, chip_size=32)
        ids = {
            (round(float(x), 6), round(float(y), 6)): int(i)
            for i, x, y in conn.execute(
                sa.text("SELECT id, ST_X(geom), ST_Y(geom) FROM location ORDER BY id")
            )
        }
        model = insert_model_version(conn, step=40, method="caco", checkpoint_key=None, metrics={})
        places: dict[int, Place] = {}
        estimates: list[EstimateRow] = []
        events: list[EventRow] = []
        for k, (lon, lat) in enumerate(points):
            location = ids[(lon, lat)]
            steps = 1 + k % 4
            changed = k % 5 == 0
            ema = 1.0
            ratio = 1.0
            for s in range(1, steps + 1):
                ratio = 0.8 + 0.1 * ((k * 7 + s * 3) % 13) + (1.5 if changed and s == steps else 0)
                ema = ratio if s == 1 else 0.7 * ema + 0.3 * ratio
                events.append(
                    EventRow(
                        location_id=location,
                        step=10 * s,
                        ratio=ratio,
                        ratio_ema=ema,
                        long_dist=0.4 * ratio,
                        short_dist=0.4,
                        query_observation_id=None,
                        positive_observation_id=None,
                        longterm_observation_id=None,
                        denominator="pair",
                    )
                )
            estimates.append(
                EstimateRow(
                    location_id=location,
                    ratio_ema=ema,
                    ratio_last=ratio,
                    long_dist=0.4 * ratio,
                    short_dist=0.4,
                    updates=steps,
                    changed=changed,
                    change_probability=0.9 if changed else 0.05,
                    denominator="pair",
                )
            )
            places[location] = Place(location, lon, lat, ema, changed, steps)
        write_change_batch(conn, estimates=estimates, events=events, model_version_id=model)
    return World(engine, places, ids[UNMEASURED], aoi.id)


@pytest.fixture(scope="module")
def world(pg_cluster: EmbeddedPostgres) -> Iterator[World]:
    """The world in a database of the module's own: every test here only reads it."""
    with migrated_database(pg_cluster) as url:
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        try:
            yield seed_world(engine)
        finally:
            engine.dispose()


@pytest.fixture(scope="module")
def server(world: World) -> Iterator[HealthServer]:
    """The service's HTTP server on a free loopback port, reading the world's database."""
    with HealthServer(
        port=0, metrics=Metrics(), readiness=lambda: (True, {}), engine=world.engine
    ) as running:
        yield running


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    url: str, path: str, *, method: str = "GET", headers: dict[str, str] | None = None
) -> Reply:
    """One HTTP request, sent as written (no normalisation of the path)."""
    where = urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname or "127.0.0.1", where.port, timeout=20)
    try:
        conn.request(method, path, headers=headers or {})
        reply = conn.getresponse()
        return Reply(reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read())
    finally:
        conn.close()
