"""The schema rejects bad rows: duplicates, out-of-range values, impossible coordinates."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

SHA = "ab" * 32
FOOTPRINT = "SRID=4326;MULTIPOLYGON(((10 45, 11 45, 11 46, 10 46, 10 45)))"


@pytest.fixture
def conn(engine: sa.Engine) -> Iterator[sa.Connection]:
    with engine.connect() as connection:
        yield connection
        connection.rollback()


def _insert(conn: sa.Connection, table: str, **values: Any) -> int:
    columns = ", ".join(values)
    params = ", ".join(f":{k}" for k in values)
    return int(
        conn.execute(
            sa.text(f"INSERT INTO {table} ({columns}) VALUES ({params}) RETURNING *"), values
        ).scalar_one()
    )


def _scene(conn: sa.Connection, product_id: str = "S2A_X", **values: Any) -> int:
    row = {
        "source": "simulated",
        "product_id": product_id,
        "acquired_at": "2024-06-01T10:00:00Z",
        "cloud_cover": 12.5,
        "footprint": FOOTPRINT,
        "level": "L2A",
    }
    row.update(values)
    return _insert(conn, "scene", **row)


def _location(conn: sa.Connection, lon: float = 10.5, lat: float = 45.5) -> int:
    return _insert(conn, "location", geom=f"SRID=4326;POINT({lon} {lat})", origin="manual")


def _rejects(conn: sa.Connection, constraint: str, insert: Any) -> None:
    """The insert fails on the named constraint, and the transaction is usable after."""
    savepoint = conn.begin_nested()
    with pytest.raises(IntegrityError) as info:
        insert()
    savepoint.rollback()
    assert constraint in str(info.value.orig)


def test_a_good_scene_observation_and_estimate_go_in(conn: sa.Connection) -> None:
    scene = _scene(conn)
    location = _location(conn)
    _insert(
        conn,
        "observation",
        location_id=location,
        scene_id=scene,
        acquired_at="2024-06-01T10:00:00Z",
        valid_fraction=1.0,
        cloud_fraction=0.0,
        chip_key=f"ab/cd/{SHA}.npy",
        chip_sha256=SHA,
    )
    conn.execute(
        sa.text(
            "INSERT INTO change_estimate (location_id, ratio_ema, ratio_last, long_dist,"
            " short_dist) VALUES (:l, 1.5, 2.0, 0.4, 0.2)"
        ),
        {"l": location},
    )
    assert conn.execute(sa.text("SELECT count(*) FROM v_change")).scalar_one() == 1


def test_duplicate_product_is_rejected(conn: sa.Connection) -> None:
    _scene(conn, "S2B_DUP")
    _rejects(conn, "uq_scene_source_product_id", lambda: _scene(conn, "S2B_DUP"))
    # The same product id from another source is another scene.
    _scene(conn, "S2B_DUP", source="local")


def test_cloud_cover_over_100_is_rejected(conn: sa.Connection) -> None:
    _rejects(conn, "ck_scene_cloud_cover_percent", lambda: _scene(conn, cloud_cover=140))
    _rejects(conn, "ck_scene_cloud_cover_percent", lambda: _scene(conn, cloud_cover=-1))


def test_point_at_longitude_200_is_rejected(conn: sa.Connection) -> None:
    _rejects(conn, "ck_location_geom_lonlat", lambda: _location(conn, lon=200, lat=10))
    _rejects(conn, "ck_location_geom_lonlat", lambda: _location(conn, lon=10, lat=-91))


def test_scene_footprint_beyond_the_antimeridian_is_rejected(conn: sa.Connection) -> None:
    bad = "SRID=4326;MULTIPOLYGON(((179 10, 181 10, 181 11, 179 11, 179 10)))"
    _rejects(conn, "ck_scene_footprint_lonlat", lambda: _scene(conn, footprint=bad))


def test_unknown_level_and_status_are_rejected(conn: sa.Connection) -> None:
    _rejects(conn, "ck_scene_level_known", lambda: _scene(conn, level="L3"))
    _rejects(conn, "ck_scene_status_known", lambda: _scene(conn, status="done?"))


def test_observation_fractions_hash_and_uniqueness(conn: sa.Connection) -> None:
    scene = _scene(conn)
    location = _location(conn)
    good = {
        "location_id": location,
        "scene_id": scene,
        "acquired_at": "2024-06-01T10:00:00Z",
        "valid_fraction": 0.9,
        "cloud_fraction": 0.1,
        "chip_key": "k",
        "chip_sha256": SHA,
    }
    bad_valid = {**good, "valid_fraction": 1.5}
    bad_cloud = {**good, "cloud_fraction": -0.1}
    bad_hash = {**good, "chip_sha256": "not-a-hash"}
    _rejects(
        conn,
        "ck_observation_valid_fraction_fraction",
        lambda: _insert(conn, "observation", **bad_valid),
    )
    _rejects(
        conn,
        "ck_observation_cloud_fraction_fraction",
        lambda: _insert(conn, "observation", **bad_cloud),
    )
    _rejects(
        conn, "ck_observation_chip_sha256_hex", lambda: _insert(conn, "observation", **bad_hash)
    )
    _insert(conn, "observation", **good)
    _rejects(
        conn, "uq_observation_location_id_scene_id", lambda: _insert(conn, "observation", **good)
    )


def test_observation_needs_its_location_and_scene(conn: sa.Connection) -> None:
    scene = _scene(conn)
    orphan = {
        "location_id": 999_999,
        "scene_id": scene,
        "acquired_at": "2024-06-01T10:00:00Z",
        "valid_fraction": 1.0,
        "cloud_fraction": 0.0,
        "chip_key": "k",
        "chip_sha256": SHA,
    }
    _rejects(
        conn, "fk_observation_location_id_location", lambda: _insert(conn, "observation", **orphan)
    )


def test_one_cursor_per_source_even_without_aoi(conn: sa.Connection) -> None:
    cursor = {"source": "simulated", "last_acquired_at": "2024-06-01T00:00:00Z"}
    _insert(conn, "ingest_cursor", **cursor)
    _rejects(
        conn, "uq_ingest_cursor_source_aoi_id", lambda: _insert(conn, "ingest_cursor", **cursor)
    )


def test_change_estimate_ranges(conn: sa.Connection) -> None:
    location = _location(conn)

    def estimate(**values: Any) -> int:
        row = {
            "location_id": location,
            "ratio_ema": 1.0,
            "ratio_last": 1.0,
            "long_dist": 0.1,
            "short_dist": 0.1,
        }
        row.update(values)
        return _insert(conn, "change_estimate", **row)

    _rejects(conn, "ck_change_estimate_ratio_ema_nonnegative", lambda: estimate(ratio_ema=-0.5))
    _rejects(conn, "ck_change_estimate_updates_positive", lambda: estimate(updates=0))


def test_model_version_method_must_be_known(conn: sa.Connection) -> None:
    _insert(conn, "model_version", step=0, method="caco")
    _rejects(
        conn,
        "ck_model_version_method_known",
        lambda: _insert(conn, "model_version", step=1, method="simclr"),
    )


def test_aoi_must_be_valid(conn: sa.Connection) -> None:
    bowtie = "SRID=4326;MULTIPOLYGON(((0 0, 1 1, 1 0, 0 1, 0 0)))"
    _rejects(conn, "ck_aoi_geom_valid", lambda: _insert(conn, "aoi", name="bowtie", geom=bowtie))
    _insert(conn, "aoi", name="alps", geom=FOOTPRINT)
    _rejects(conn, "uq_aoi_name", lambda: _insert(conn, "aoi", name="alps", geom=FOOTPRINT))
