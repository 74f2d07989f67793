"""The one exception hierarchy of revisit.

Every error revisit raises on purpose derives from :class:`RevisitError`. Each
class also derives from the builtin it means (a missing file is a
``FileNotFoundError`` too), and from :class:`TransientError` where retrying the
same thing later can succeed. Retry policies catch ``TransientError`` and
nothing else.
"""

from __future__ import annotations


class RevisitError(Exception):
    """Root of every error revisit raises on purpose."""


class TransientError(RevisitError):
    """A failure that may go away if the same operation is tried again later."""


class ConfigError(RevisitError, ValueError):
    """A setting is invalid; the message names the setting and the problem."""


class DatabaseError(RevisitError):
    """The database could not be reached, started or migrated."""


class DatabaseUnavailableError(DatabaseError, TransientError, ConnectionError):
    """The database did not answer; it may come back."""


class EmbeddedDatabaseError(DatabaseError):
    """The embedded PostgreSQL cluster could not be created, started or stopped."""


class PostgresNotFoundError(EmbeddedDatabaseError, FileNotFoundError):
    """The PostgreSQL server programs (initdb, pg_ctl) are not installed."""


class PostGISNotInstalledError(EmbeddedDatabaseError):
    """The PostGIS extension is not installed for the PostgreSQL server in use."""


class MigrationError(DatabaseError):
    """The schema could not be brought to the requested revision."""


class IngestError(RevisitError):
    """Imagery could not be ingested."""


class SceneRejectedError(IngestError, ValueError):
    """A whole scene is bad input; it goes to ``quarantine`` and the run goes on.

    Args:
        reason: A short code from :data:`revisit.ingest.reasons.REASONS`.
        detail: One line for a person, naming the product and what was wrong.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class SourceUnavailableError(IngestError, TransientError, ConnectionError):
    """A source did not answer (network, rate limit, server error); try again later."""


class ChipStoreError(IngestError, OSError):
    """A chip file could not be written, or is missing or corrupt on read."""


class ChipStoreFullError(ChipStoreError, TransientError):
    """The chip store's filesystem is full (or below ``ingest.min_free_mb``).

    Ingest stops before committing the scene it was writing; it resumes from
    that scene once space is freed.
    """


class LearnerError(RevisitError):
    """The learner could not train, estimate change or checkpoint."""


class DegenerateRatiosError(LearnerError, ValueError):
    """The ratios cannot support a two-component mixture (too few, or all equal).

    The caller stays in (or goes back to) warm-up: no location is treated as changed.
    """


class ExportError(RevisitError):
    """An export (an ONNX model, a change map) could not be made or published."""


class ParityError(ExportError, ValueError):
    """An exported model disagrees with PyTorch by more than the tolerance."""
