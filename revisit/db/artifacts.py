"""Published exports: one ``artifact`` row per file revisit published."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from revisit.db.models import ARTIFACT_KINDS


@dataclass(frozen=True)
class ArtifactRow:
    """One published file."""

    id: int
    kind: str
    path: str
    sha256: str
    size_bytes: int | None
    model_version_id: int | None
    bbox: tuple[float, float, float, float] | None
    metadata: dict[str, Any]
    created_at: datetime


def insert_artifact(
    conn: Connection,
    *,
    kind: str,
    path: str,
    sha256: str,
    size_bytes: int | None,
    model_version_id: int | None,
    bbox: tuple[float, float, float, float] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> int:
    """Record a published file; returns the new row's id.

    Args:
        conn: A connection in the caller's transaction.
        kind: One of ``onnx``, ``changemap-cog``, ``changemap-geojson``, ``quicklook``.
        path: Where the file is (data-dir relative or absolute).
        sha256: Its hex digest.
        size_bytes: Its size.
        model_version_id: The model it came from, if any.
        bbox: (west, south, east, north) in degrees, if the file covers an area.
        metadata: JSON-able details.

    Raises:
        ValueError: An unknown kind.
    """
    if kind not in ARTIFACT_KINDS:
        raise ValueError(f"kind must be one of {ARTIFACT_KINDS}, got {kind!r}")
    params: dict[str, Any] = {
        "kind": kind,
        "path": path,
        "sha": sha256,
        "size": size_bytes,
        "mv": model_version_id,
        "meta": json.dumps(dict(metadata or {})),
        "w": None,
        "s": None,
        "e": None,
        "n": None,
    }
    if bbox is not None:
        params.update(zip(("w", "s", "e", "n"), (float(v) for v in bbox), strict=True))
    return int(
        conn.execute(
            sa.text(
                "INSERT INTO artifact (kind, path, sha256, size_bytes, model_version_id, bbox,"
                " metadata) VALUES (:kind, :path, :sha, :size, :mv,"
                " CASE WHEN CAST(:w AS double precision) IS NULL THEN NULL ELSE"
                " ST_MakeEnvelope(:w, :s, :e, :n, 4326) END, CAST(:meta AS jsonb)) RETURNING id"
            ),
            params,
        ).scalar_one()
    )


def list_artifacts(conn: Connection, *, kind: str | None = None) -> list[ArtifactRow]:
    """Published files, oldest first; of one kind when given."""
    rows = conn.execute(
        sa.text(
            "SELECT id, kind, path, sha256, size_bytes, model_version_id,"
            " ST_XMin(bbox), ST_YMin(bbox), ST_XMax(bbox), ST_YMax(bbox), metadata, created_at"
            " FROM artifact WHERE CAST(:kind AS text) IS NULL OR kind = :kind ORDER BY id"
        ),
        {"kind": kind},
    ).all()
    return [
        ArtifactRow(
            id=int(r[0]),
            kind=str(r[1]),
            path=str(r[2]),
            sha256=str(r[3]),
            size_bytes=None if r[4] is None else int(r[4]),
            model_version_id=None if r[5] is None else int(r[5]),
            bbox=None if r[6] is None else (float(r[6]), float(r[7]), float(r[8]), float(r[9])),
            metadata=dict(r[10]),
            created_at=r[11],
        )
        for r in rows
    ]


def delete_artifacts(conn: Connection, ids: list[int]) -> int:
    """Remove artifact rows (their files are the caller's to remove); returns how many."""
    if not ids:
        return 0
    return int(
        conn.execute(sa.text("DELETE FROM artifact WHERE id = ANY(:ids)"), {"ids": ids}).rowcount
    )
