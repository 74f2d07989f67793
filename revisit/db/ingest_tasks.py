"""The ingest work table: scenes a plan found, claimed by workers under a lease.

A task is one scene for one cursor (source and AOI; NULL: every location). Its
life: ``queued`` (planned) → ``claimed`` (a worker holds a lease until
``lease_until``, on the database's clock) → ``done`` (in the same transaction as
the scene's rows) or ``failed`` (``ingest.max_attempts`` claims without
success). A claimed task whose lease ran out is claimable again: its worker
died or hung. Every claim counts as an attempt, so a scene that kills its
worker each time fails in the end instead of being retried forever.

The cursor of a source and AOI moves only to the end of the longest run of
finished (done or failed) tasks in cursor order, ``(acquired_at, product_id)``:
never past a scene that is still queued or claimed.

Two advisory transaction locks keep concurrent workers apart where rows meet:
one per scene (two tasks of different cursors may hold the same product) and
one per cursor.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import sqlalchemy as sa
from shapely import wkb
from sqlalchemy.engine import Connection

from revisit.db import cursors
from revisit.types import Level, SceneRef

#: Columns of a :class:`Task`, as an UPDATE … RETURNING of the row ``t`` lists them.
_RETURNING = ", ".join(
    f"t.{c}"
    for c in ("id", "source", "aoi_id", "product_id", "acquired_at", "scene", "attempts",
              "lease_owner")
)  # fmt: skip
#: A task no worker will work on again.
_FINISHED = "state IN ('done', 'failed')"
#: A task a worker may work on: queued, or claimed under a lease that ran out.
_CLAIMABLE = "(state = 'queued' OR (state = 'claimed' AND lease_until < now()))"


@dataclass(frozen=True)
class Task:
    """A task as a worker holds it.

    Attributes:
        id: The row's id.
        source: The source's name.
        aoi_id: The cursor's AOI; None: every location.
        product_id: The scene's product id.
        acquired_at: The scene's acquisition time.
        scene: The scene, as the plan found it.
        attempts: Claims so far, this one included.
        lease_owner: The worker that holds (or last held) the lease.
    """

    id: int
    source: str
    aoi_id: int | None
    product_id: str
    acquired_at: datetime
    scene: SceneRef
    attempts: int
    lease_owner: str | None


# -- the scene reference as JSON ------------------------------------------------------------


def scene_to_json(scene: SceneRef) -> dict[str, Any]:
    """``scene`` as JSON: its footprint as hex WKB, so that it comes back bit for bit."""
    return {
        "source": scene.source,
        "product_id": scene.product_id,
        "acquired_at": scene.acquired_at.isoformat(),
        "footprint_wkb": wkb.dumps(scene.footprint, hex=True),
        "tile_id": scene.tile_id,
        "cloud_cover": scene.cloud_cover,
        "level": scene.level,
        "processing_baseline": scene.processing_baseline,
        "extra": dict(scene.extra),
    }


def scene_from_json(data: Mapping[str, Any]) -> SceneRef:
    """The :class:`SceneRef` that :func:`scene_to_json` wrote.

    Raises:
        KeyError: A field is missing.
        ValueError: A field is malformed.
    """
    return SceneRef(
        source=str(data["source"]),
        product_id=str(data["product_id"]),
        acquired_at=datetime.fromisoformat(str(data["acquired_at"])),
        footprint=wkb.loads(str(data["footprint_wkb"]), hex=True),
        tile_id=data.get("tile_id"),
        cloud_cover=data.get("cloud_cover"),
        level=cast("Level | None", data.get("level")),
        processing_baseline=data.get("processing_baseline"),
        extra=dict(data.get("extra") or {}),
    )


# -- planning --------------------------------------------------------------------------------


def enqueue(
    conn: Connection, scene: SceneRef, *, aoi_id: int | None, requeue: bool = False
) -> bool:
    """Queue ``scene`` for the cursor of its source and ``aoi_id``, unless it is already known.

    Args:
        conn: The caller's transaction.
        scene: The scene a search found.
        aoi_id: The cursor's AOI; None: every location.
        requeue: Queue a finished (done or failed) task again, with its attempts reset
            (a backfill: new locations get the chips of known scenes).

    Returns:
        True when the scene was queued (new, or finished and requeued).
    """
    conflict = (
        "DO UPDATE SET state = 'queued', attempts = 0, lease_owner = NULL, lease_until = NULL,"
        " last_error = NULL, finished_at = NULL, updated_at = now()"
        " WHERE ingest_task.state IN ('done', 'failed')"
        if requeue
        else "DO NOTHING"
    )
    row = conn.execute(
        sa.text(
            "INSERT INTO ingest_task (source, aoi_id, product_id, acquired_at, scene)"
            " VALUES (:source, :aoi, :product, :acquired, CAST(:scene AS jsonb))"
            f" ON CONFLICT (source, aoi_id, product_id) {conflict} RETURNING id"
        ),
        {
            "source": scene.source,
            "aoi": aoi_id,
            "product": scene.product_id,
            "acquired": scene.acquired_at,
            "scene": json.dumps(scene_to_json(scene), default=str),
        },
    ).first()
    return row is not None


def planned_until(conn: Connection, *, source: str, aoi_id: int | None) -> datetime | None:
    """The acquisition time of the newest task of this source and AOI, or None."""
    return conn.execute(
        sa.text(
            "SELECT max(acquired_at) FROM ingest_task"
            " WHERE source = :s AND aoi_id IS NOT DISTINCT FROM :a"
        ),
        {"s": source, "a": aoi_id},
    ).scalar_one_or_none()


# -- claiming and leases -------------------------------------------------------------------


def _task(row: sa.Row[Any]) -> Task:
    return Task(
        id=int(row.id),
        source=str(row.source),
        aoi_id=None if row.aoi_id is None else int(row.aoi_id),
        product_id=str(row.product_id),
        acquired_at=row.acquired_at,
        scene=scene_from_json(row.scene),
        attempts=int(row.attempts),
        lease_owner=row.lease_owner,
    )


def take_exhausted(
    conn: Connection, *, sources: Sequence[str], max_attempts: int, error: str
) -> list[Task]:
    """Fail the claimed tasks whose lease ran out on their last allowed attempt.

    Their workers died (or hung) ``max_attempts`` times on them. Rows another
    transaction holds are left for later.

    Args:
        conn: The caller's transaction; it quarantines the scenes and moves the cursors.
        sources: Only tasks of these sources.
        max_attempts: ``ingest.max_attempts``.
        error: The reason kept in ``last_error``, with the last lease owner's name and the
            error of an earlier attempt, if any.

    Returns:
        The tasks now failed.
    """
    rows = conn.execute(
        sa.text(
            f"""
            WITH doomed AS (
                SELECT id FROM ingest_task
                WHERE source = ANY(:sources) AND state = 'claimed' AND lease_until < now()
                  AND attempts >= :max
                ORDER BY acquired_at, product_id
                FOR UPDATE SKIP LOCKED
            )
            UPDATE ingest_task t
            SET state = 'failed',
                last_error = :error || ' (last held by ' || t.lease_owner || ')'
                             || COALESCE('; earlier: ' || t.last_error, ''),
                lease_until = NULL, finished_at = now(), updated_at = now()
            FROM doomed WHERE t.id = doomed.id
            RETURNING {_RETURNING}
            """
        ),
        {"sources": list(sources), "max": max_attempts, "error": error},
    ).all()
    return [_task(r) for r in rows]


def claim(
    conn: Connection, *, sources: Sequence[str], owner: str, lease_s: float, max_attempts: int
) -> Task | None:
    """Claim the oldest claimable task of ``sources`` for ``owner``, under a lease.

    ``SELECT … FOR UPDATE SKIP LOCKED``: concurrent claims never wait for one
    another and never get the same row. Commit right after, so that the lease
    is visible to the other workers.

    Args:
        conn: The caller's transaction.
        sources: Only tasks of these sources.
        owner: The worker's name (``host:pid:nonce``).
        lease_s: Seconds the lease lasts unless renewed.
        max_attempts: A task is not claimed again after this many claims.

    Returns:
        The task, its attempt counted; None when nothing is claimable now.
    """
    row = conn.execute(
        sa.text(
            f"""
            WITH next AS (
                SELECT id FROM ingest_task
                WHERE source = ANY(:sources) AND {_CLAIMABLE} AND attempts < :max
                ORDER BY acquired_at, product_id
                LIMIT 1
                FOR UPDATE SKIP LOCKED
            )
            UPDATE ingest_task t
            SET state = 'claimed', lease_owner = :owner,
                lease_until = now() + make_interval(secs => :lease),
                attempts = t.attempts + 1, updated_at = now()
            FROM next WHERE t.id = next.id
            RETURNING {_RETURNING}
            """
        ),
        {"sources": list(sources), "owner": owner, "lease": lease_s, "max": max_attempts},
    ).first()
    return None if row is None else _task(row)


def renew(conn: Connection, *, task_id: int, owner: str, lease_s: float) -> bool:
    """Extend ``owner``'s lease on a task by ``lease_s`` from now.

    Returns:
        False when ``owner`` no longer holds it (another worker claimed it after
        the lease ran out, or it is finished).
    """
    row = conn.execute(
        sa.text(
            "UPDATE ingest_task SET lease_until = now() + make_interval(secs => :lease),"
            " updated_at = now()"
            " WHERE id = :id AND lease_owner = :owner AND state = 'claimed' RETURNING id"
        ),
        {"id": task_id, "owner": owner, "lease": lease_s},
    ).first()
    return row is not None


def complete(conn: Connection, *, task_id: int, owner: str) -> bool:
    """Mark ``owner``'s task done; call it in the transaction of the scene's rows.

    The row stays locked until that transaction ends, so no other worker can
    claim it in between.

    Returns:
        False when ``owner`` no longer holds the task: the caller must roll back.
    """
    row = conn.execute(
        sa.text(
            "UPDATE ingest_task SET state = 'done', lease_until = NULL, last_error = NULL,"
            " finished_at = now(), updated_at = now()"
            " WHERE id = :id AND lease_owner = :owner AND state = 'claimed' RETURNING id"
        ),
        {"id": task_id, "owner": owner},
    ).first()
    return row is not None


def release(
    conn: Connection, *, task_id: int, owner: str, error: str | None, count_attempt: bool
) -> bool:
    """Give ``owner``'s task back to the queue, for any worker to claim at once.

    Args:
        conn: The caller's transaction.
        task_id: The task.
        owner: The worker giving it back.
        error: Why, kept in ``last_error`` (None: a clean stop).
        count_attempt: False gives the attempt back too (a source outage, a stop).

    Returns:
        False when ``owner`` no longer held it.
    """
    row = conn.execute(
        sa.text(
            "UPDATE ingest_task SET state = 'queued', lease_until = NULL,"
            " last_error = COALESCE(:error, last_error), updated_at = now(),"
            " attempts = CASE WHEN :count THEN attempts ELSE greatest(attempts - 1, 0) END"
            " WHERE id = :id AND lease_owner = :owner AND state = 'claimed' RETURNING id"
        ),
        {"id": task_id, "owner": owner, "error": error, "count": count_attempt},
    ).first()
    return row is not None


def fail(conn: Connection, *, task_id: int, owner: str, error: str) -> bool:
    """Mark ``owner``'s task failed for good, with the reason.

    Returns:
        False when ``owner`` no longer held it.
    """
    row = conn.execute(
        sa.text(
            "UPDATE ingest_task SET state = 'failed', lease_until = NULL, last_error = :error,"
            " finished_at = now(), updated_at = now()"
            " WHERE id = :id AND lease_owner = :owner AND state = 'claimed' RETURNING id"
        ),
        {"id": task_id, "owner": owner, "error": error},
    ).first()
    return row is not None


# -- cursors -------------------------------------------------------------------------------


def _lock(conn: Connection, key: str) -> None:
    """An advisory lock on ``key`` (hashed to 64 bits) until the transaction ends."""
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": key})


def scene_lock_key(source: str, product_id: str) -> str:
    """The name of a scene's advisory lock (see :func:`lock_scene`)."""
    return f"revisit:scene:{source}\x1f{product_id}"


def lock_scene(conn: Connection, *, source: str, product_id: str) -> None:
    """Hold the scene's lock until the transaction ends: one writer of its rows at a time.

    Two tasks of different cursors can hold the same scene; the second writer
    waits here, then sees the first one's rows.
    """
    _lock(conn, scene_lock_key(source, product_id))


def advance_cursor_to_finished(
    conn: Connection, *, source: str, aoi_id: int | None
) -> datetime | None:
    """Move the cursor of ``source`` and ``aoi_id`` to the end of its finished tasks.

    Finished: done or failed. The cursor goes to the acquisition time of the
    last task before the first unfinished one in ``(acquired_at, product_id)``
    order, and never back. Writers of one cursor take turns (an advisory lock),
    so that two tasks finishing at once both count.

    Returns:
        Where the cursor is now (None: no cursor yet).
    """
    _lock(conn, f"revisit:cursor:{source}\x1f{'' if aoi_id is None else aoi_id}")
    params = {"s": source, "a": aoi_id}
    scope = "source = :s AND aoi_id IS NOT DISTINCT FROM :a"
    first = conn.execute(
        sa.text(
            f"SELECT acquired_at, product_id FROM ingest_task WHERE {scope} AND NOT {_FINISHED}"
            " ORDER BY acquired_at, product_id LIMIT 1"
        ),
        params,
    ).first()
    query = f"SELECT max(acquired_at) FROM ingest_task WHERE {scope} AND {_FINISHED}"
    if first is not None:
        query += " AND (acquired_at, product_id) < (:t, :p)"
        params |= {"t": first.acquired_at, "p": first.product_id}
    end = conn.execute(sa.text(query), params).scalar_one_or_none()
    if end is not None:
        cursors.advance_cursor(conn, source=source, aoi_id=aoi_id, to=end)
    return cursors.get_cursor(conn, source=source, aoi_id=aoi_id)


# -- concurrent writers of one scene ---------------------------------------------------------


def locations_done(conn: Connection, *, source: str, product_id: str) -> set[int]:
    """Locations this scene has given a chip, or had one quarantined (read under its lock)."""
    rows = conn.execute(
        sa.text(
            "SELECT o.location_id FROM observation o JOIN scene s ON s.id = o.scene_id"
            " WHERE s.source = :s AND s.product_id = :p"
            " UNION SELECT location_id FROM quarantine"
            " WHERE source = :s AND ref = :p AND location_id IS NOT NULL"
        ),
        {"s": source, "p": product_id},
    )
    return {int(i) for (i,) in rows}


# -- for people --------------------------------------------------------------------------------


def count_by_state(conn: Connection, *, source: str | None = None) -> dict[str, int]:
    """How many tasks are in each state (only states with tasks)."""
    query = "SELECT state, count(*) FROM ingest_task"
    params: dict[str, object] = {}
    if source is not None:
        query += " WHERE source = :source"
        params["source"] = source
    query += " GROUP BY state ORDER BY state"
    return {str(s): int(n) for s, n in conn.execute(sa.text(query), params)}


def unfinished(conn: Connection, *, sources: Sequence[str]) -> int:
    """Tasks of ``sources`` still queued or claimed: what a draining worker waits for."""
    return int(
        conn.execute(
            sa.text(
                "SELECT count(*) FROM ingest_task"
                " WHERE source = ANY(:sources) AND state IN ('queued', 'claimed')"
            ),
            {"sources": list(sources)},
        ).scalar_one()
    )
