"""The database revisit uses: an external server, or the embedded cluster.

:class:`Database` is built once from Settings (by the CLI or the daemon) and
passed down. Opening it starts the embedded cluster when no ``database_url``
is set, waits until the server answers, and creates one SQLAlchemy engine.
"""

from __future__ import annotations

import logging
import time
from types import TracebackType

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url

from revisit.config import Settings, redact_url
from revisit.db.embedded import EmbeddedPostgres
from revisit.errors import DatabaseUnavailableError

log = logging.getLogger(__name__)

DRIVER = "postgresql+psycopg"


class Database:
    """The database in use, and its engine once opened.

    Args:
        settings: The validated settings; ``database_url`` picks an external
            server, its absence the embedded cluster in ``data_dir``.
        connect_timeout_s: How long :meth:`open` waits for the server to answer.
    """

    def __init__(self, settings: Settings, *, connect_timeout_s: float | None = None) -> None:
        self.settings = settings
        # Exactly one of the two is set: an external URL, or the embedded cluster.
        self._external_url: str | None = (
            settings.database_url.get_secret_value() if settings.database_url else None
        )
        self.embedded: EmbeddedPostgres | None = (
            None if self._external_url else EmbeddedPostgres.from_settings(settings)
        )
        self.connect_timeout_s = (
            connect_timeout_s
            if connect_timeout_s is not None
            else settings.postgres.start_timeout_s
        )
        self._engine: Engine | None = None

    @property
    def url(self) -> URL:
        """The SQLAlchemy URL, password included: never log it (use :meth:`display_url`)."""
        if self._external_url is not None:
            return make_url(self._external_url).set(drivername=DRIVER)
        return self._embedded().sqlalchemy_url()

    def _embedded(self) -> EmbeddedPostgres:
        if self.embedded is None:
            raise RuntimeError("an external database has no embedded cluster")
        return self.embedded

    def libpq_url(self) -> str:
        """A libpq URI for psql and other clients, with any password masked."""
        if self._external_url is None:
            return self._embedded().libpq_url()
        url = self._external_url
        scheme, sep, rest = url.partition("://")
        return redact_url(f"postgresql{sep}{rest}" if scheme.startswith("postgres") else url)

    def display_url(self) -> str:
        """Where the database is, fit for logs and ``revisit status``."""
        if self.embedded is not None:
            return f"embedded PostgreSQL in {self.embedded.pgdata} (Unix socket, no TCP)"
        return self.libpq_url()

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("Database.open() has not been called")
        return self._engine

    def open(self) -> Engine:
        """Start the embedded cluster if in use, wait for the server, create the engine.

        Raises:
            EmbeddedDatabaseError: The embedded cluster could not be started.
            DatabaseUnavailableError: The server did not answer in time.
        """
        if self._engine is not None:
            return self._engine
        if self.embedded is not None:
            self.embedded.acquire()
        try:
            engine = sa.create_engine(
                self.url,
                pool_pre_ping=True,
                pool_size=5,
                max_overflow=5,
                connect_args={"connect_timeout": 10, "application_name": "revisit"},
            )
            self._wait_until_up(engine)
        except BaseException:
            if self.embedded is not None:
                self.embedded.release()
            raise
        self._engine = engine
        return engine

    def _wait_until_up(self, engine: Engine) -> None:
        deadline = time.monotonic() + self.connect_timeout_s
        delay = 0.2
        while True:
            try:
                with engine.connect() as conn:
                    conn.execute(sa.text("SELECT 1"))
                return
            except sa.exc.OperationalError as exc:
                if time.monotonic() + delay > deadline:
                    engine.dispose()
                    reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
                    raise DatabaseUnavailableError(
                        f"database {self.display_url()} did not answer within "
                        f"{self.connect_timeout_s:g} s: {reason}"
                    ) from None
                log.warning("database not answering yet; retrying in %.1f s", delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def close(self) -> None:
        """Dispose of the engine and release the embedded cluster (the last user stops it)."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        if self.embedded is not None:
            self.embedded.release()

    def __enter__(self) -> Database:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
