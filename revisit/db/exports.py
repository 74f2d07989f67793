"""The exporter's advisory lock: one ONNX publisher at a time per database.

Publishing moves files in ``<data_dir>/exports/onnx``, writes ``artifact`` rows
and replaces ``latest.json``; two publishers at once (the daemon and a person
running ``revisit export``) would remove each other's temporary files. The lock
is a session-level PostgreSQL advisory lock, so it is freed when its connection
closes, also when the process holding it is killed.
"""

from __future__ import annotations

from sqlalchemy.engine import Connection

from revisit.db.locks import advisory_unlock, try_advisory_lock

# "revexpor" in ASCII; the learner's lock is "revlearn", the migrations' "revisit".
EXPORT_LOCK_KEY = 0x7265766578706F72
"""Key of the session-level advisory lock a publisher holds while it publishes."""


def try_export_lock(conn: Connection) -> bool:
    """Take the exporter's advisory lock, without waiting.

    Args:
        conn: The connection that holds the lock while publishing.

    Returns:
        True if this session now holds the lock, False if another one does.
    """
    return try_advisory_lock(conn, EXPORT_LOCK_KEY)


def release_export_lock(conn: Connection) -> bool:
    """Release the exporter's advisory lock taken on this connection.

    Args:
        conn: The connection that took the lock.

    Returns:
        Whether this session held it.
    """
    return advisory_unlock(conn, EXPORT_LOCK_KEY)
