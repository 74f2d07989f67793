"""Scenes and their observations (the chips' rows)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from revisit.db.copy import copy_rows
from revisit.types import SceneRef

OBSERVATION_COLUMNS = (
    "location_id",
    "scene_id",
    "acquired_at",
    "valid_fraction",
    "cloud_fraction",
    "chip_key",
    "chip_sha256",
    "epsg",
    "bounds",
)


@dataclass(frozen=True)
class ObservationRow:
    """One chip's row, ready for COPY."""

    location_id: int
    acquired_at: datetime
    valid_fraction: float
    cloud_fraction: float
    chip_key: str
    chip_sha256: str
    epsg: int
    bounds: tuple[float, float, float, float]


def scene_status(conn: Connection, *, source: str, product_id: str) -> str | None:
    """The status of a known scene (``ingested``, ``quarantined``, ...), or None if unknown."""
    return conn.execute(
        sa.text("SELECT status FROM scene WHERE source = :s AND product_id = :p"),
        {"s": source, "p": product_id},
    ).scalar_one_or_none()


def upsert_scene(
    conn: Connection, scene: SceneRef, *, status: str = "ingested", error: str | None = None
) -> int:
    """The id of the scene's row, inserting it first if it is new.

    A scene already present keeps its row; it is never inserted twice.
    """
    row = conn.execute(
        sa.text(
            """
            INSERT INTO scene (source, product_id, tile_id, acquired_at, cloud_cover, footprint,
                               level, processing_baseline, status, error, metadata, ingested_at)
            VALUES (:source, :product_id, :tile_id, :acquired_at, :cloud_cover,
                    ST_Multi(ST_CollectionExtract(ST_MakeValid(ST_GeomFromText(:wkt, 4326)), 3)),
                    :level, :baseline, :status, :error, CAST(:metadata AS jsonb), now())
            ON CONFLICT (source, product_id) DO NOTHING
            RETURNING id
            """
        ),
        {
            "source": scene.source,
            "product_id": scene.product_id,
            "tile_id": scene.tile_id,
            "acquired_at": scene.acquired_at,
            "cloud_cover": scene.cloud_cover,
            "wkt": scene.footprint.wkt,
            "level": scene.level,
            "baseline": scene.processing_baseline,
            "status": status,
            "error": error,
            "metadata": json.dumps(dict(scene.extra), default=str),
        },
    ).first()
    if row is not None:
        return int(row[0])
    return int(
        conn.execute(
            sa.text("SELECT id FROM scene WHERE source = :s AND product_id = :p"),
            {"s": scene.source, "p": scene.product_id},
        ).scalar_one()
    )


def copy_observations(conn: Connection, scene_id: int, rows: Sequence[ObservationRow]) -> int:
    """COPY the observations of one scene; returns how many."""
    return copy_rows(
        conn,
        "observation",
        OBSERVATION_COLUMNS,
        (
            (
                r.location_id,
                scene_id,
                r.acquired_at,
                r.valid_fraction,
                r.cloud_fraction,
                r.chip_key,
                r.chip_sha256,
                r.epsg,
                list(r.bounds),
            )
            for r in rows
        ),
    )


def referenced_chip_keys(conn: Connection) -> set[str]:
    """Every chip key an observation names (for garbage collection)."""
    return set(conn.execute(sa.text("SELECT DISTINCT chip_key FROM observation")).scalars())


def chip_refs(conn: Connection) -> Iterator[tuple[int, str, str]]:
    """(observation id, chip key, sha256) of every observation, streamed in id order."""
    rows = conn.execution_options(stream_results=True, yield_per=10_000).execute(
        sa.text("SELECT id, chip_key, chip_sha256 FROM observation ORDER BY id")
    )
    for obs_id, key, sha in rows:
        yield int(obs_id), str(key), str(sha)
