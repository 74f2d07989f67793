"""What the learner reads from and writes to the database (DESIGN §4).

It reads usable observations and location coordinates as columns (numpy arrays,
never ORM objects: a million observations load in two or three seconds), and writes its
change estimates and events in batches: COPY into a temporary table, then one
``UPDATE … FROM`` and one ``INSERT … SELECT``. Every function runs inside the
caller's transaction and leaves commit and rollback to the caller.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from revisit.db.copy import copy_rows, driver_connection
from revisit.db.locks import advisory_unlock, try_advisory_lock
from revisit.errors import LearnerError

log = logging.getLogger(__name__)

# "revlearn" in ASCII; the migration lock (revisit/db/migrations/env.py) is "revisit".
LEARNER_LOCK_KEY = 0x7265766C6561726E
"""Key of the session-level advisory lock that one learner holds while it runs."""

_ESTIMATE_TMP = "revisit_estimate_batch"
_ESTIMATE_COLUMNS = (
    "location_id",
    "ratio_ema",
    "ratio_last",
    "long_dist",
    "short_dist",
    "updates",
    "changed",
    "change_probability",
    "short_ref",
    "season_gap_days",
    "denominator",
)
_EVENT_COLUMNS = (
    "location_id",
    "step",
    "ratio",
    "ratio_ema",
    "long_dist",
    "short_dist",
    "query_observation_id",
    "positive_observation_id",
    "longterm_observation_id",
    "season_gap_days",
    "denominator",
    "model_version_id",
)
_CLUSTER_TMP = "revisit_cluster_batch"


@dataclass(frozen=True, eq=False)
class ObservationTable:
    """Usable observations, columnar, ordered by id.

    Attributes:
        id: Observation ids, ascending.
        location_id: The location each observation sees.
        acquired_at: Acquisition time, POSIX seconds (UTC).
        chip_key: Where each chip lies in the chip store.
        chip_sha256: Each chip's content hash.
    """

    id: npt.NDArray[np.int64]
    location_id: npt.NDArray[np.int64]
    acquired_at: npt.NDArray[np.float64]
    chip_key: list[str]
    chip_sha256: list[str]

    def __len__(self) -> int:
        return int(self.id.shape[0])


@dataclass(frozen=True, eq=False)
class LocationTable:
    """Every location's coordinates and geo cluster, columnar, ordered by id.

    Attributes:
        id: Location ids, ascending.
        lon: Longitude of each location's centre (EPSG:4326).
        lat: Latitude of each location's centre (EPSG:4326).
        cluster_id: Geo cluster of each location; -1 where none is set.
    """

    id: npt.NDArray[np.int64]
    lon: npt.NDArray[np.float64]
    lat: npt.NDArray[np.float64]
    cluster_id: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.id.shape[0])


@dataclass(frozen=True)
class EstimateRow:
    """The current change state of one location (a ``change_estimate`` row)."""

    location_id: int
    ratio_ema: float
    ratio_last: float
    long_dist: float
    short_dist: float
    updates: int
    changed: bool
    #: P(changed) under the last mixture refit; None before the first.
    change_probability: float | None = None
    #: The location's running short-term distance from real pairs; None without any.
    short_ref: float | None = None
    #: Days of year between the last measurement's q and k_lt (circular).
    season_gap_days: float | None = None
    #: Where the last R's denominator came from (see revisit.learner.calibration).
    denominator: str | None = None


@dataclass(frozen=True)
class EventRow:
    """One measurement of R for a location at a step (a ``change_event`` row)."""

    location_id: int
    step: int
    ratio: float
    ratio_ema: float
    long_dist: float
    short_dist: float
    query_observation_id: int | None
    positive_observation_id: int | None
    longterm_observation_id: int | None
    season_gap_days: float | None = None
    denominator: str | None = None


@dataclass(frozen=True)
class ModelVersionRow:
    """One checkpoint of the learner (a ``model_version`` row)."""

    id: int
    step: int
    method: str
    checkpoint_key: str | None
    metrics: dict[str, Any]
    created_at: datetime


def max_observation_id(conn: Connection) -> int:
    """The largest observation id (0 on an empty table)."""
    return int(conn.execute(sa.text("SELECT coalesce(max(id), 0) FROM observation")).scalar_one())


def observation_ids(
    conn: Connection, *, after_id: int, up_to_id: int, among: Sequence[int] = ()
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Ids of every observation (usable or not) in (``after_id``, ``up_to_id``], and of ``among``.

    Returns:
        The ids in the range, ascending; the ids of ``among`` that exist.
    """
    in_range = conn.execute(
        sa.text("SELECT id FROM observation WHERE id > :a AND id <= :b ORDER BY id"),
        {"a": int(after_id), "b": int(up_to_id)},
    ).scalars()
    found: Any = (
        conn.execute(
            sa.text("SELECT id FROM observation WHERE id = ANY(:ids) ORDER BY id"),
            {"ids": [int(i) for i in among]},
        ).scalars()
        if among
        else []
    )
    return np.fromiter(in_range, dtype=np.int64), np.fromiter(found, dtype=np.int64)


def concat_observations(tables: Sequence[ObservationTable]) -> ObservationTable:
    """The rows of several tables, ordered by id (ids distinct)."""
    ids = np.concatenate([t.id for t in tables]) if tables else np.empty(0, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    keys = [k for t in tables for k in t.chip_key]
    shas = [h for t in tables for h in t.chip_sha256]
    return ObservationTable(
        id=ids[order],
        location_id=np.concatenate([t.location_id for t in tables])[order],
        acquired_at=np.concatenate([t.acquired_at for t in tables])[order],
        chip_key=[keys[i] for i in order.tolist()],
        chip_sha256=[shas[i] for i in order.tolist()],
    )


def usable_observations(
    conn: Connection,
    *,
    after_id: int = 0,
    min_valid_fraction: float,
    max_cloud_fraction: float,
    limit: int | None = None,
    up_to_id: int | None = None,
    ids: Sequence[int] | None = None,
) -> ObservationTable:
    """Observations good enough to train on, as columns.

    Args:
        conn: A connection inside the caller's transaction.
        after_id: Only observations with a larger id (to read what is new since).
        min_valid_fraction: Keep observations with ``valid_fraction >=`` this.
        max_cloud_fraction: Keep observations with ``cloud_fraction <=`` this.
        limit: At most this many (the lowest ids); None for all.
        up_to_id: Only observations with an id up to this one (what every rank of
            a distributed learner reads alike); None for no bound.
        ids: Only these observations (with ``after_id`` 0: whatever their id).

    Returns:
        The observations, ordered by id.

    Raises:
        ValueError: ``limit`` is negative.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, not {limit}")
    query = (
        "SELECT id, location_id, EXTRACT(EPOCH FROM acquired_at)::double precision,"
        " chip_key, chip_sha256 FROM observation"
        " WHERE id > %(after)s AND valid_fraction >= %(valid)s AND cloud_fraction <= %(cloud)s"
        " AND (%(upto)s::bigint IS NULL OR id <= %(upto)s::bigint)"
        " AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))"
        " ORDER BY id LIMIT %(limit)s"
    )
    params = {
        "upto": None if up_to_id is None else int(up_to_id),
        "ids": None if ids is None else [int(i) for i in ids],
        "after": int(after_id),
        "valid": float(min_valid_fraction),
        "cloud": float(max_cloud_fraction),
        "limit": limit,
    }
    # Binary rows through the driver's cursor: no text parsing, no ORM objects.
    with _driver(conn).cursor(binary=True) as cursor:
        cursor.execute(query, params)
        rows = cursor.fetchall()
    if not rows:
        return ObservationTable(
            id=np.empty(0, dtype=np.int64),
            location_id=np.empty(0, dtype=np.int64),
            acquired_at=np.empty(0, dtype=np.float64),
            chip_key=[],
            chip_sha256=[],
        )
    ids, location_ids, acquired, keys, hashes = zip(*rows, strict=True)
    return ObservationTable(
        id=np.fromiter(ids, dtype=np.int64, count=len(rows)),
        location_id=np.fromiter(location_ids, dtype=np.int64, count=len(rows)),
        acquired_at=np.fromiter(acquired, dtype=np.float64, count=len(rows)),
        chip_key=list(keys),
        chip_sha256=list(hashes),
    )


def location_table(conn: Connection) -> LocationTable:
    """Every location's centre and geo cluster, ordered by id.

    Args:
        conn: A connection inside the caller's transaction.

    Returns:
        The locations; ``cluster_id`` is -1 where the location has none.
    """
    with _driver(conn).cursor(binary=True) as cursor:
        cursor.execute(
            "SELECT id, ST_X(geom), ST_Y(geom), COALESCE(cluster_id, -1)::bigint"
            " FROM location ORDER BY id"
        )
        rows = cursor.fetchall()
    n = len(rows)
    ids, lons, lats, clusters = zip(*rows, strict=True) if rows else ((), (), (), ())
    return LocationTable(
        id=np.fromiter(ids, dtype=np.int64, count=n),
        lon=np.fromiter(lons, dtype=np.float64, count=n),
        lat=np.fromiter(lats, dtype=np.float64, count=n),
        cluster_id=np.fromiter(clusters, dtype=np.int64, count=n),
    )


def set_cluster_ids(
    conn: Connection,
    *,
    location_ids: Sequence[int] | npt.NDArray[np.integer[Any]],
    cluster_ids: Sequence[int] | npt.NDArray[np.integer[Any]],
) -> int:
    """Set the geo cluster of many locations with one COPY and one UPDATE.

    Args:
        conn: A connection inside the caller's transaction.
        location_ids: The locations to set, each at most once.
        cluster_ids: Their clusters, in the same order; -1 clears a location's cluster.

    Returns:
        How many locations were updated (ids that name no location are skipped).

    Raises:
        ValueError: The two sequences differ in length, a location id repeats, or a
            cluster id is below -1.
    """
    locations = np.asarray(location_ids, dtype=np.int64).reshape(-1)
    clusters = np.asarray(cluster_ids, dtype=np.int64).reshape(-1)
    if locations.shape != clusters.shape:
        raise ValueError(f"{locations.shape[0]} location ids but {clusters.shape[0]} cluster ids")
    if locations.size == 0:
        return 0
    if clusters.min() < -1:
        bad = int(np.argmin(clusters))
        raise ValueError(
            f"cluster id {int(clusters[bad])} for location {int(locations[bad])} is below -1"
        )
    _reject_repeats(locations, what="location id")
    conn.exec_driver_sql(
        f"CREATE TEMPORARY TABLE {_CLUSTER_TMP}"
        " (location_id bigint NOT NULL, cluster_id integer) ON COMMIT DROP"
    )
    copy_rows(
        conn,
        _CLUSTER_TMP,
        ("location_id", "cluster_id"),
        (
            (loc, None if cluster < 0 else cluster)
            for loc, cluster in zip(locations.tolist(), clusters.tolist(), strict=True)
        ),
    )
    conn.exec_driver_sql(f"ANALYZE {_CLUSTER_TMP}")
    updated = conn.exec_driver_sql(
        f"UPDATE location SET cluster_id = t.cluster_id FROM {_CLUSTER_TMP} t"
        " WHERE location.id = t.location_id"
    ).rowcount
    # Dropped now, not only at commit, so a second call in the same transaction works.
    conn.exec_driver_sql(f"DROP TABLE {_CLUSTER_TMP}")
    return int(updated)


def load_change_estimates(conn: Connection) -> list[EstimateRow]:
    """Every ``change_estimate`` row, ordered by location id.

    Args:
        conn: A connection inside the caller's transaction.

    Returns:
        The stored estimates.
    """
    rows = conn.execute(
        sa.text(
            "SELECT location_id, ratio_ema, ratio_last, long_dist, short_dist, updates, changed,"
            " change_probability, short_ref, season_gap_days, denominator"
            " FROM change_estimate ORDER BY location_id"
        )
    )
    return [
        EstimateRow(
            location_id=int(loc),
            ratio_ema=float(ema),
            ratio_last=float(last),
            long_dist=float(long_d),
            short_dist=float(short_d),
            updates=int(updates),
            changed=bool(changed),
            change_probability=_optional_float(prob),
            short_ref=_optional_float(ref),
            season_gap_days=_optional_float(gap),
            denominator=None if source is None else str(source),
        )
        for loc, ema, last, long_d, short_d, updates, changed, prob, ref, gap, source in rows
    ]


def write_change_batch(
    conn: Connection,
    *,
    estimates: Sequence[EstimateRow],
    events: Sequence[EventRow],
    model_version_id: int | None,
) -> tuple[int, int]:
    """Write a batch of change estimates and events, never row by row.

    The estimates go by COPY into a temporary table, then one ``UPDATE … FROM``
    updates the locations already estimated and one ``INSERT … SELECT`` adds the
    others. The events go by COPY straight into ``change_event``. A trigger keeps
    ``changed_since``. On an error the transaction is aborted: roll it back.

    Args:
        conn: A connection inside the caller's transaction.
        estimates: The new state of each location, each location at most once.
        events: The measurements behind them.
        model_version_id: The checkpoint that produced them (set on every row), or None.

    Returns:
        (estimates written, events written).

    Raises:
        ValueError: A location appears twice among ``estimates``.
        LearnerError: An estimate's ``updates`` is below the stored one (the
            message names the location and both counts), an event repeats a
            (location, step) already stored or in the batch, or a stored estimate
            changed under this writer.
    """
    written = _write_estimates(conn, estimates=estimates, model_version_id=model_version_id)
    return written, _write_events(conn, events=events, model_version_id=model_version_id)


def _write_estimates(
    conn: Connection, *, estimates: Sequence[EstimateRow], model_version_id: int | None
) -> int:
    if not estimates:
        return 0
    _reject_repeats(
        np.fromiter((e.location_id for e in estimates), dtype=np.int64, count=len(estimates)),
        what="location id among the estimates",
    )
    conn.exec_driver_sql(
        f"CREATE TEMPORARY TABLE {_ESTIMATE_TMP} ("
        " location_id bigint NOT NULL, ratio_ema double precision NOT NULL,"
        " ratio_last double precision NOT NULL, long_dist double precision NOT NULL,"
        " short_dist double precision NOT NULL, updates integer NOT NULL,"
        " changed boolean NOT NULL, change_probability double precision,"
        " short_ref double precision, season_gap_days double precision,"
        " denominator text) ON COMMIT DROP"
    )
    copy_rows(
        conn,
        _ESTIMATE_TMP,
        _ESTIMATE_COLUMNS,
        (
            (
                int(e.location_id),
                float(e.ratio_ema),
                float(e.ratio_last),
                float(e.long_dist),
                float(e.short_dist),
                int(e.updates),
                bool(e.changed),
                _optional_float(e.change_probability),
                _optional_float(e.short_ref),
                _optional_float(e.season_gap_days),
                e.denominator,
            )
            for e in estimates
        ),
    )
    # A temporary table has no statistics until analysed; without them the planner
    # joins by nested loops and a batch of 1e5 rows takes minutes, not a second.
    conn.exec_driver_sql(f"ANALYZE {_ESTIMATE_TMP}")
    # Materialised: with a plain ORDER BY … LIMIT 1 the planner walks the primary key
    # expecting an early hit, and when no row goes back (the usual case) that is
    # a nested loop over both tables.
    went_back = conn.exec_driver_sql(
        f"WITH back AS MATERIALIZED (SELECT t.location_id, t.updates AS new, e.updates AS stored"
        f" FROM {_ESTIMATE_TMP} t JOIN change_estimate e ON e.location_id = t.location_id"
        " WHERE t.updates < e.updates)"
        " SELECT location_id, new, stored, count(*) OVER () FROM back"
        " ORDER BY location_id LIMIT 1"
    ).first()
    if went_back is not None:
        location, new, stored, count = went_back
        conn.exec_driver_sql(f"DROP TABLE {_ESTIMATE_TMP}")
        others = f" (and {count - 1} more locations)" if count > 1 else ""
        raise LearnerError(
            f"change estimate of location {location} would go back from {stored} updates"
            f" to {new}{others}; nothing written"
        )
    params = {"mv": model_version_id}
    # The guard repeats the check above, so a concurrent writer cannot be overwritten.
    updated = conn.execute(
        sa.text(
            f"UPDATE change_estimate SET ratio_ema = t.ratio_ema, ratio_last = t.ratio_last,"
            f" long_dist = t.long_dist, short_dist = t.short_dist, updates = t.updates,"
            f" changed = t.changed, change_probability = t.change_probability,"
            f" short_ref = t.short_ref, season_gap_days = t.season_gap_days,"
            f" denominator = t.denominator, model_version_id = :mv, updated_at = now()"
            f" FROM {_ESTIMATE_TMP} t"
            f" WHERE change_estimate.location_id = t.location_id"
            f" AND t.updates >= change_estimate.updates"
        ),
        params,
    ).rowcount
    inserted = conn.execute(
        sa.text(
            f"INSERT INTO change_estimate (location_id, ratio_ema, ratio_last, long_dist,"
            f" short_dist, updates, changed, change_probability, short_ref, season_gap_days,"
            f" denominator, model_version_id)"
            f" SELECT t.location_id, t.ratio_ema, t.ratio_last, t.long_dist, t.short_dist,"
            f" t.updates, t.changed, t.change_probability, t.short_ref, t.season_gap_days,"
            f" t.denominator, :mv FROM {_ESTIMATE_TMP} t"
            f" WHERE NOT EXISTS"
            f" (SELECT 1 FROM change_estimate e WHERE e.location_id = t.location_id)"
        ),
        params,
    ).rowcount
    conn.exec_driver_sql(f"DROP TABLE {_ESTIMATE_TMP}")
    written = int(updated) + int(inserted)
    if written != len(estimates):
        raise LearnerError(
            f"wrote {written} of {len(estimates)} change estimates: another writer"
            " changed them meanwhile"
        )
    return written


def _write_events(
    conn: Connection, *, events: Sequence[EventRow], model_version_id: int | None
) -> int:
    if not events:
        return 0
    rows = (
        (
            int(e.location_id),
            int(e.step),
            float(e.ratio),
            float(e.ratio_ema),
            float(e.long_dist),
            float(e.short_dist),
            _optional_int(e.query_observation_id),
            _optional_int(e.positive_observation_id),
            _optional_int(e.longterm_observation_id),
            _optional_float(e.season_gap_days),
            e.denominator,
            model_version_id,
        )
        for e in events
    )
    _driver(conn)
    try:
        return copy_rows(conn, "change_event", _EVENT_COLUMNS, rows)
    except psycopg.errors.UniqueViolation as error:
        detail = error.diag.message_detail or str(error)
        raise LearnerError(
            f"a change event was written twice for the same location and step: {detail}"
        ) from error


def insert_model_version(
    conn: Connection,
    *,
    step: int,
    method: str,
    checkpoint_key: str | None,
    metrics: Mapping[str, Any],
) -> int:
    """Record a checkpoint.

    Args:
        conn: A connection inside the caller's transaction.
        step: The learner's step at the checkpoint.
        method: The learning method (one of ``revisit.db.models.METHODS``).
        checkpoint_key: Where the checkpoint lies in the store, or None.
        metrics: JSON-serialisable metrics (numpy scalars are accepted).

    Returns:
        The new row's id.

    Raises:
        ValueError: A metric is not finite or not serialisable as JSON.
    """
    try:
        payload = json.dumps(dict(metrics), allow_nan=False, default=_json_scalar)
    except (TypeError, ValueError) as error:
        raise ValueError(f"metrics of step {step} are not valid JSON: {error}") from error
    return int(
        conn.execute(
            sa.text(
                "INSERT INTO model_version (step, method, checkpoint_key, metrics)"
                " VALUES (:step, :method, :key, CAST(:metrics AS jsonb)) RETURNING id"
            ),
            {"step": int(step), "method": method, "key": checkpoint_key, "metrics": payload},
        ).scalar_one()
    )


_MODEL_VERSION_SELECT = (
    "SELECT id, step, method, checkpoint_key, metrics, created_at FROM model_version"
)


def latest_model_version(conn: Connection) -> ModelVersionRow | None:
    """The checkpoint with the highest step (ties: the latest row), or None if none.

    Args:
        conn: A connection inside the caller's transaction.

    Returns:
        The latest model version, or None when there is none.
    """
    row = conn.execute(
        sa.text(f"{_MODEL_VERSION_SELECT} ORDER BY step DESC, id DESC LIMIT 1")
    ).first()
    return None if row is None else _model_version(row)


def check_resumable(latest: ModelVersionRow | None, method: str, *, new_model: bool) -> None:
    """Refuse to resume ``latest`` as a learner of ``method``: the learner's first check.

    Light (no torch), so that ``revisit learn`` says it before the seconds of its imports.

    Raises:
        LearnerError: The newest checkpoint is of another method and ``new_model`` is off.
    """
    if latest is None or new_model or latest.method == method:
        return
    raise LearnerError(
        f"this database's learner is at step {latest.step} with method "
        f"{latest.method!r}, not {method!r}; run with --method {latest.method} "
        "to go on, or pass --new-model to start a new model (the step counter and "
        "the change estimates carry on)"
    )


def model_versions(conn: Connection) -> list[ModelVersionRow]:
    """Every checkpoint, ordered by step then id.

    Args:
        conn: A connection inside the caller's transaction.

    Returns:
        The model versions.
    """
    rows = conn.execute(sa.text(f"{_MODEL_VERSION_SELECT} ORDER BY step, id"))
    return [_model_version(row) for row in rows]


def max_event_step(conn: Connection) -> int | None:
    """The highest step of any change event, or None when there are none.

    Args:
        conn: A connection inside the caller's transaction.

    Returns:
        ``max(change_event.step)``.
    """
    step = conn.execute(sa.text("SELECT max(step) FROM change_event")).scalar_one()
    return None if step is None else int(step)


def try_learner_lock(conn: Connection) -> bool:
    """Take the learner's session-level advisory lock, without waiting.

    The lock belongs to the database session, not to a transaction: a rollback
    keeps it; :func:`release_learner_lock` or closing the connection frees it.

    Args:
        conn: The connection that holds the lock while the learner runs.

    Returns:
        True if this session now holds the lock, False if another one does.
    """
    return try_advisory_lock(conn, LEARNER_LOCK_KEY)


def release_learner_lock(conn: Connection) -> None:
    """Release the learner's advisory lock taken on this connection.

    Args:
        conn: The connection that took the lock.
    """
    if not advisory_unlock(conn, LEARNER_LOCK_KEY):
        log.warning("learner lock %#x was not held by this session", LEARNER_LOCK_KEY)


def _driver(conn: Connection) -> psycopg.Connection[Any]:
    """The psycopg connection under ``conn``, in the transaction SQLAlchemy commits.

    Work done straight on the driver must not start a transaction SQLAlchemy does
    not know of: its ``commit()`` would then do nothing.
    """
    if not conn.in_transaction():
        conn.begin()
    return driver_connection(conn)


def _model_version(row: sa.Row[Any]) -> ModelVersionRow:
    return ModelVersionRow(
        id=int(row.id),
        step=int(row.step),
        method=str(row.method),
        checkpoint_key=None if row.checkpoint_key is None else str(row.checkpoint_key),
        metrics=dict(row.metrics),
        created_at=row.created_at,
    )


def _reject_repeats(values: npt.NDArray[np.int64], *, what: str) -> None:
    unique, counts = np.unique(values, return_counts=True)
    if unique.size != values.size:
        raise ValueError(f"{what} {int(unique[np.argmax(counts > 1)])} appears more than once")


def _optional_int(value: int | None) -> int | None:
    return None if value is None else int(value)


def _json_scalar(value: object) -> object:
    """numpy scalars (float32, int64, bool_) as their Python value."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _optional_float(value: float | None) -> float | None:
    """A float, or None for None and NaN (NULL in the database)."""
    if value is None:
        return None
    out = float(value)
    return None if out != out else out
