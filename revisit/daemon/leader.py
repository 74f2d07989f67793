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

#: The longest wait between two tries while the database is unreachable.
MAX_RETRY_S = 5.0


class LeaderLock:
    """The daemon's leader lock on a dedicated connection.

    Args:
        engine: The database.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._conn: Connection | None = None
        self.held = False
        #: Tries in a row that could not ask the database (it is down or restarting).
        self.failures = 0

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
            self.failures += 1
            # One line when the database goes away, not one per try while it stays away.
            log.log(
                logging.WARNING if self.failures == 1 else logging.DEBUG,
                "could not try the leader lock (database unreachable?); retrying with backoff: %s",
                str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                extra={"tries": self.failures},
            )
            self._drop()
            return False
        if self.failures:
            log.info(
                "the database answers again after %d failed tries", self.failures,
                extra={"tries": self.failures},
            )  # fmt: skip
            self.failures = 0
        self.held = got
        return got

    def retry_delay_s(self, poll_s: float) -> float:
        """Seconds until the next try: ``poll_s``, doubled per failed try up to :data:`MAX_RETRY_S`.

        Args:
            poll_s: The delay between tries while the database answers (a standby's poll).
        """
        if not self.failures:
            return poll_s
        return max(poll_s, min(poll_s * 2.0 ** (self.failures - 1), MAX_RETRY_S))

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
