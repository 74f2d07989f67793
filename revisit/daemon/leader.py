"""One leader per database: a PostgreSQL advisory lock held on a connection of its own.

The leading ``revisit run`` holds :data:`revisit.db.daemon.DAEMON_LOCK_KEY` for
as long as its session lives. A second one against the same database is a
standby: it tries the lock every ``daemon.standby_poll_s`` seconds and leads as
soon as it gets it. When the leader dies, even by ``kill -9``, its connection
closes, PostgreSQL frees the lock, and the standby takes over at its next try.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from revisit.db import daemon as daemon_db

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)


class LeaderLock:
    """The daemon's leader lock on a dedicated connection.

    Args:
        engine: The database.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._conn: Connection | None = None
        self.held = False

    def try_acquire(self) -> bool:
        """Try the lock once, without waiting.

        Returns:
            True when this process leads. False when another session holds the
            lock, or the database could not be asked (logged; the next try
            reconnects).
        """
        if self.held:
            return True
        try:
            if self._conn is None:
                self._conn = self.engine.connect()
            got = daemon_db.try_leader_lock(self._conn)
            self._conn.commit()  # the lock is the session's; no transaction stays open
        except Exception as exc:
            log.warning("could not try the leader lock: %s", exc)
            self._drop()
            return False
        self.held = got
        return got

    def alive(self) -> bool:
        """Whether the lock's session still answers (and so the lock is still held)."""
        if self._conn is None or not self.held:
            return False
        try:
            daemon_db.ping(self._conn)
            self._conn.commit()
        except Exception as exc:
            log.error("the leader lock's database session is gone: %s", exc)
            self._drop()
            return False
        return True

    def release(self) -> None:
        """Release the lock (if held) and close its connection."""
        conn = self._conn
        if conn is not None and self.held:
            try:
                daemon_db.release_leader_lock(conn)
                conn.commit()
            except Exception as exc:  # closing the session frees it anyway
                log.warning("could not release the leader lock cleanly: %s", exc)
        self._drop()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        self.held = False
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
