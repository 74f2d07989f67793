"""What the daemon keeps in the database: its leader lock, its job store, the last run of each job.

- One daemon per database schedules jobs: the one holding the session-level
  advisory lock :data:`DAEMON_LOCK_KEY` on a connection of its own. The lock
  goes with the session, so a leader that dies (even by ``kill -9``) frees it.
- APScheduler's job store is the table ``scheduler_job`` (created by migration
  0005, never by the scheduler), in the same database.
- ``job_run`` holds the last run of every job, so that ``revisit status`` in
  another process can show it.

Every function runs inside the caller's transaction and leaves commit and
rollback to the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from sqlalchemy.engine import Connection, Engine

from revisit.db.locks import advisory_unlock, try_advisory_lock
from revisit.db.models import JOB_OUTCOMES, SCHEDULER_JOB_TABLE

# "revdaemo" in ASCII; distinct from the learner's ("revlearn"), the exporter's
# ("revexpor") and the migrations' ("revisit") keys.
DAEMON_LOCK_KEY = 0x7265766461656D6F
"""Key of the session-level advisory lock the leading ``revisit run`` holds."""


def try_leader_lock(conn: Connection) -> bool:
    """Take the daemon's leader lock for this session without waiting.

    Returns:
        True when this session now leads (or already did); False when another
        session holds the lock.
    """
    return try_advisory_lock(conn, DAEMON_LOCK_KEY)


def release_leader_lock(conn: Connection) -> bool:
    """Release the leader lock; False if this session did not hold it."""
    return advisory_unlock(conn, DAEMON_LOCK_KEY)


@dataclass(frozen=True)
class LeaderInfo:
    """The session that holds the leader lock, as PostgreSQL sees it."""

    backend_pid: int
    since: datetime | None
    application_name: str | None


def current_leader(conn: Connection) -> LeaderInfo | None:
    """The session holding the leader lock, or None when no daemon leads this database."""
    row = conn.execute(
        sa.text(
            "SELECT l.pid, a.backend_start, a.application_name FROM pg_locks l"
            " LEFT JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.database ="
            " (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND l.classid = CAST(:hi AS oid) AND l.objid = CAST(:lo AS oid) AND l.objsubid = 1"
        ),
        {"hi": DAEMON_LOCK_KEY >> 32, "lo": DAEMON_LOCK_KEY & 0xFFFFFFFF},
    ).first()
    if row is None:
        return None
    return LeaderInfo(backend_pid=int(row[0]), since=row[1], application_name=row[2])


class JobStore(SQLAlchemyJobStore):  # type: ignore[misc]
    """APScheduler's SQLAlchemy job store on revisit's engine and its ``scheduler_job`` table.

    Unlike APScheduler's own, shutting it down leaves the engine alone: the
    daemon shares it with everything else and disposes of it itself.
    """

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine=engine, tablename=SCHEDULER_JOB_TABLE)

    def shutdown(self) -> None:
        """Nothing to do: the engine belongs to the daemon."""


@dataclass(frozen=True)
class JobRunRow:
    """The last run of one job."""

    job_id: str
    last_started_at: datetime | None
    last_finished_at: datetime | None
    last_outcome: str | None
    last_duration_s: float | None
    last_detail: str | None
    next_run_at: datetime | None
    runs: int
    failures: int
    runner: str | None


def record_job_run(
    conn: Connection,
    *,
    job_id: str,
    started_at: datetime,
    finished_at: datetime,
    outcome: str,
    detail: str | None,
    next_run_at: datetime | None,
    runner: str,
) -> None:
    """Record that a job ran: its times, outcome and next run; count it.

    Args:
        conn: A connection in the caller's transaction.
        job_id: The job's fixed id.
        started_at: When the run began.
        finished_at: When it ended.
        outcome: ``ok``, ``skipped`` or ``failed``.
        detail: One line: what the run did, or why it failed.
        next_run_at: When the job runs next, if scheduled.
        runner: ``host:pid`` of the daemon that ran it.

    Raises:
        ValueError: An unknown outcome.
    """
    if outcome not in JOB_OUTCOMES:
        raise ValueError(f"outcome must be one of {JOB_OUTCOMES}, not {outcome!r}")
    conn.execute(
        sa.text(
            """
            INSERT INTO job_run (job_id, last_started_at, last_finished_at, last_outcome,
                                 last_duration_s, last_detail, next_run_at, runs, failures,
                                 runner)
            VALUES (:job, :started, :finished, :outcome,
                    :duration, :detail, :next, 1, CASE WHEN :outcome = 'failed' THEN 1 ELSE 0 END,
                    :runner)
            ON CONFLICT (job_id) DO UPDATE SET
                last_started_at = EXCLUDED.last_started_at,
                last_finished_at = EXCLUDED.last_finished_at,
                last_outcome = EXCLUDED.last_outcome,
                last_duration_s = EXCLUDED.last_duration_s,
                last_detail = EXCLUDED.last_detail,
                next_run_at = EXCLUDED.next_run_at,
                runs = job_run.runs + 1,
                failures = job_run.failures + EXCLUDED.failures,
                runner = EXCLUDED.runner,
                updated_at = now()
            """
        ),
        {
            "job": job_id,
            "started": started_at,
            "finished": finished_at,
            "outcome": outcome,
            "duration": (finished_at - started_at).total_seconds(),
            "detail": None if detail is None else detail[:2000],
            "next": next_run_at,
            "runner": runner,
        },
    )


def schedule_job_runs(
    conn: Connection, *, next_runs: dict[str, datetime | None], runner: str
) -> None:
    """Record when each scheduled job runs next, and forget jobs no longer scheduled.

    Args:
        conn: A connection in the caller's transaction.
        next_runs: Every scheduled job's id and its next run time.
        runner: ``host:pid`` of the daemon that scheduled them.
    """
    for job_id, when in next_runs.items():
        conn.execute(
            sa.text(
                "INSERT INTO job_run (job_id, next_run_at, runner) VALUES (:job, :next, :runner)"
                " ON CONFLICT (job_id) DO UPDATE SET next_run_at = EXCLUDED.next_run_at,"
                " runner = EXCLUDED.runner, updated_at = now()"
            ),
            {"job": job_id, "next": when, "runner": runner},
        )
    conn.execute(
        sa.text("DELETE FROM job_run WHERE NOT (job_id = ANY(:ids))"),
        {"ids": list(next_runs)},
    )


def job_runs(conn: Connection) -> list[JobRunRow]:
    """The last run of every job, by id; empty before the first ``revisit run``."""
    rows = conn.execute(
        sa.text(
            "SELECT job_id, last_started_at, last_finished_at, last_outcome, last_duration_s,"
            " last_detail, next_run_at, runs, failures, runner FROM job_run ORDER BY job_id"
        )
    ).all()
    return [
        JobRunRow(
            job_id=str(r[0]),
            last_started_at=r[1],
            last_finished_at=r[2],
            last_outcome=r[3],
            last_duration_s=None if r[4] is None else float(r[4]),
            last_detail=r[5],
            next_run_at=r[6],
            runs=int(r[7]),
            failures=int(r[8]),
            runner=r[9],
        )
        for r in rows
    ]


def has_trainable_locations(
    conn: Connection, *, min_valid_fraction: float, max_cloud_fraction: float
) -> bool:
    """Whether at least two locations have an observation the learner would mine.

    Contrastive learning needs in-batch negatives: with fewer, the learner
    cannot take a step.
    """
    n = conn.execute(
        sa.text(
            "SELECT count(*) FROM (SELECT DISTINCT location_id FROM observation"
            " WHERE valid_fraction >= :valid AND cloud_fraction <= :cloud LIMIT 2) d"
        ),
        {"valid": float(min_valid_fraction), "cloud": float(max_cloud_fraction)},
    ).scalar_one()
    return int(n) >= 2


def aoi_estimate_counts(conn: Connection) -> dict[str, int]:
    """Every AOI's name and how many locations inside it have a change estimate."""
    rows = conn.execute(
        sa.text(
            "SELECT a.name, count(e.location_id) FROM aoi a"
            " LEFT JOIN location l ON ST_Intersects(l.geom, a.geom)"
            " LEFT JOIN change_estimate e ON e.location_id = l.id"
            " GROUP BY a.name ORDER BY a.name"
        )
    ).all()
    return {str(name): int(n) for name, n in rows}


def latest_artifacts(conn: Connection) -> list[dict[str, Any]]:
    """The newest published file of each kind: kind, path, created_at, model version, AOI."""
    rows = conn.execute(
        sa.text(
            "SELECT DISTINCT ON (kind) kind, path, created_at, model_version_id,"
            " metadata->>'aoi' FROM artifact ORDER BY kind, created_at DESC, id DESC"
        )
    ).all()
    return [
        {
            "kind": str(r[0]),
            "path": str(r[1]),
            "created_at": r[2],
            "model_version_id": None if r[3] is None else int(r[3]),
            "aoi": r[4],
        }
        for r in rows
    ]


def ping(conn: Connection) -> None:
    """Ask the server for nothing; raises if the connection is gone."""
    conn.execute(sa.text("SELECT 1")).scalar_one()
