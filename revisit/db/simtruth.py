"""The simulated world's ground truth, kept apart from what the learner reads."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from revisit.db.copy import copy_rows


def store_truth(
    conn: Connection,
    rows: Sequence[tuple[int, int, str | None, date | None, float]],
) -> int:
    """Add (location_id, seed, kind, event_date, changed_fraction) rows not yet stored.

    Concurrent writers (ingest workers on scenes that share new locations) take
    turns on an advisory lock before adding rows, and look again under it.
    """
    fresh = _unknown(conn, rows)
    if not fresh:
        return 0
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtextextended('revisit:sim_truth', 0))"))
    fresh = _unknown(conn, fresh)
    return copy_rows(
        conn, "sim_truth", ("location_id", "seed", "kind", "event_date", "changed_fraction"), fresh
    )


def _unknown(
    conn: Connection, rows: Sequence[tuple[int, int, str | None, date | None, float]]
) -> list[tuple[int, int, str | None, date | None, float]]:
    if not rows:
        return []
    known = set(
        conn.execute(
            sa.text("SELECT location_id FROM sim_truth WHERE location_id = ANY(:ids)"),
            {"ids": [r[0] for r in rows]},
        ).scalars()
    )
    return [r for r in rows if r[0] not in known]
