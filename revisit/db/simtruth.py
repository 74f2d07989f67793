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
    """Add (location_id, seed, kind, event_date, changed_fraction) rows not yet stored."""
    if not rows:
        return 0
    ids = [r[0] for r in rows]
    known = set(
        conn.execute(
            sa.text("SELECT location_id FROM sim_truth WHERE location_id = ANY(:ids)"), {"ids": ids}
        ).scalars()
    )
    fresh = [r for r in rows if r[0] not in known]
    return copy_rows(
        conn, "sim_truth", ("location_id", "seed", "kind", "event_date", "changed_fraction"), fresh
    )
