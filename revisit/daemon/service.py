"""The service's lifecycle: open the database, migrate, serve until told to stop.

Until the scheduler lands (ingest, learning and export jobs), serving means
holding the database up and migrated and waiting for SIGINT or SIGTERM.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from revisit.config import Settings
from revisit.db.engine import Database
from revisit.db.migrate import upgrade
from revisit.db.status import DatabaseStatus, collect_status

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Set ``stop`` on SIGINT/SIGTERM while inside the block; restore the old handlers after."""

    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_service(
    settings: Settings,
    *,
    duration_s: float | None = None,
    stop: threading.Event | None = None,
    report: Callable[[Database, DatabaseStatus], None] | None = None,
) -> None:
    """Run revisit until ``stop`` is set, a signal arrives, or ``duration_s`` passes.

    Args:
        settings: The validated settings.
        duration_s: Stop after this many seconds; run until stopped when None.
        stop: An event that ends the run when set; SIGINT and SIGTERM set it.
        report: Called once the database is up and migrated, with its status.

    Raises:
        DatabaseError: The database could not be started, reached or migrated.
    """
    stop = stop or threading.Event()
    with stop_on_signals(stop), Database(settings) as db:
        log.info("database up", extra={"database": db.display_url()})
        upgrade(db.engine)
        with db.engine.connect() as conn:
            status = collect_status(conn)
        log.info("schema at revision %s", status.revision, extra={"revision": status.revision})
        if report is not None:
            report(db, status)
        started = time.monotonic()
        log.info("revisit is running; send SIGINT or SIGTERM to stop")
        while not stop.is_set():
            timeout = 1.0
            if duration_s is not None:
                left = duration_s - (time.monotonic() - started)
                if left <= 0:
                    log.info("run duration of %g s reached", duration_s)
                    break
                timeout = min(timeout, left)
            stop.wait(timeout)
        log.info("stopping")
    log.info("stopped cleanly")
