"""Session-level PostgreSQL advisory locks: one holder per key per database.

A session lock outlives transactions (a rollback keeps it) and is freed when
released or when its connection closes, also when the holding process is killed.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection


def try_advisory_lock(conn: Connection, key: int) -> bool:
    """Take the lock ``key`` for this session without waiting; False if another session holds it."""
    return bool(
        conn.execute(sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar_one()
    )


def advisory_unlock(conn: Connection, key: int) -> bool:
    """Release the lock ``key`` taken by this session; False if this session did not hold it."""
    return bool(conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": key}).scalar_one())
