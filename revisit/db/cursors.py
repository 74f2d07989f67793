"""Ingest cursors: how far each source has come, per AOI (NULL: all locations)."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection


def get_cursor(conn: Connection, *, source: str, aoi_id: int | None) -> datetime | None:
    """The latest acquisition time committed for this source and AOI, or None."""
    return conn.execute(
        sa.text(
            "SELECT last_acquired_at FROM ingest_cursor"
            " WHERE source = :s AND aoi_id IS NOT DISTINCT FROM :a"
        ),
        {"s": source, "a": aoi_id},
    ).scalar_one_or_none()


def advance_cursor(conn: Connection, *, source: str, aoi_id: int | None, to: datetime) -> None:
    """Move the cursor forward to ``to``; it never moves back. Call it in the rows' transaction."""
    conn.execute(
        sa.text(
            """
            INSERT INTO ingest_cursor (source, aoi_id, last_acquired_at)
            VALUES (:s, :a, :t)
            ON CONFLICT (source, aoi_id) DO UPDATE
            SET last_acquired_at = GREATEST(ingest_cursor.last_acquired_at,
                                            EXCLUDED.last_acquired_at),
                updated_at = now()
            """
        ),
        {"s": source, "a": aoi_id, "t": to},
    )
