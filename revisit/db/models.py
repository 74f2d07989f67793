"""The relational model of revisit (DESIGN §2), as SQLAlchemy declarative classes.

The Alembic migrations are the truth about the schema; these classes describe
the same tables for queries and for ``alembic revision --autogenerate``, and a
test checks that the two agree. Every geometry is EPSG:4326 and carries a GiST
index. Pixels never live here: an ``observation`` points at a chip file by its
content hash.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from geoalchemy2 import Geometry
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Double,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SRID = 4326

METHODS = ("moco", "tp", "geo-tp", "seco", "teco", "caco")
LOCATION_ORIGINS = ("urban-gaussian", "aoi-grid", "manual")
SCENE_LEVELS = ("L1C", "L2A")
SCENE_STATUSES = ("pending", "ingested", "failed", "quarantined")
SIM_EVENT_KINDS = ("construction", "clearing", "flooding", "reservoir")
ARTIFACT_KINDS = ("onnx", "changemap-cog", "changemap-geojson", "quicklook")
JOB_OUTCOMES = ("ok", "skipped", "failed")
#: States of a webhook delivery of a change alert (revisit.db.alerts).
DELIVERY_STATUSES = ("pending", "delivered", "failed")
#: States of an ingest worker's task (revisit.db.ingest_tasks).
TASK_STATES = ("queued", "claimed", "done", "failed")
#: Where R's denominator came from (revisit.learner.calibration.SOURCES).
DENOMINATOR_SOURCES = ("pair", "own", "others", "date-pair")
#: The table of the daemon's APScheduler job store (its jobs, pickled).
SCHEDULER_JOB_TABLE = "scheduler_job"

# Constraint names follow one convention so that migrations can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _fraction(column: str) -> CheckConstraint:
    return CheckConstraint(f"{column} >= 0 AND {column} <= 1", name=f"{column}_fraction")


def _lonlat_bounds(column: str) -> CheckConstraint:
    """Every coordinate of ``column`` is a valid longitude/latitude."""
    return CheckConstraint(
        f"ST_XMin({column}) >= -180 AND ST_XMax({column}) <= 180"
        f" AND ST_YMin({column}) >= -90 AND ST_YMax({column}) <= 90",
        name=f"{column}_lonlat",
    )


def _sha256(column: str) -> CheckConstraint:
    return CheckConstraint(f"{column} ~ '^[0-9a-f]{{64}}$'", name=f"{column}_hex")


def _created_at() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


def _geometry(geometry_type: str) -> Geometry:
    return Geometry(geometry_type=geometry_type, srid=SRID, spatial_index=False)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Aoi(Base):
    """An area a user asked revisit to watch."""

    __tablename__ = "aoi"
    __table_args__ = (
        CheckConstraint("char_length(name) BETWEEN 1 AND 128", name="name_length"),
        CheckConstraint("ST_IsValid(geom)", name="geom_valid"),
        _lonlat_bounds("geom"),
        Index("ix_aoi_geom", "geom", postgresql_using="gist"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(Text, nullable=False, unique=True)
    geom: Mapped[Any] = mapped_column(_geometry("MULTIPOLYGON"), nullable=False)
    created_at: Mapped[datetime] = _created_at()


class Location(Base):
    """One place the learner knows: a chip centre and its footprint."""

    __tablename__ = "location"
    __table_args__ = (
        _lonlat_bounds("geom"),
        _lonlat_bounds("footprint"),
        CheckConstraint(_in("origin", LOCATION_ORIGINS), name="origin_known"),
        CheckConstraint(
            "epsg BETWEEN 32601 AND 32660 OR epsg BETWEEN 32701 AND 32760", name="epsg_utm"
        ),
        CheckConstraint("cluster_id >= 0", name="cluster_id_nonnegative"),
        Index("ix_location_geom", "geom", postgresql_using="gist"),
        Index("ix_location_footprint", "footprint", postgresql_using="gist"),
        # For radius queries in metres: ST_DWithin(geom::geography, ..., metres).
        Index("ix_location_geog", text("(geom::geography)"), postgresql_using="gist"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    geom: Mapped[Any] = mapped_column(_geometry("POINT"), nullable=False)
    footprint: Mapped[Any | None] = mapped_column(_geometry("POLYGON"))
    epsg: Mapped[int | None] = mapped_column(Integer, comment="UTM zone of the chip grid")
    origin: Mapped[str] = mapped_column(Text, nullable=False)
    aoi_id: Mapped[int | None] = mapped_column(
        ForeignKey("aoi.id", ondelete="SET NULL"), index=True
    )
    cluster_id: Mapped[int | None] = mapped_column(Integer, comment="geo cluster (GASSL)")
    created_at: Mapped[datetime] = _created_at()


class Scene(Base):
    """One acquired product, from one source."""

    __tablename__ = "scene"
    __table_args__ = (
        UniqueConstraint("source", "product_id"),
        CheckConstraint("cloud_cover >= 0 AND cloud_cover <= 100", name="cloud_cover_percent"),
        CheckConstraint(_in("level", SCENE_LEVELS), name="level_known"),
        CheckConstraint(_in("status", SCENE_STATUSES), name="status_known"),
        CheckConstraint("char_length(source) BETWEEN 1 AND 64", name="source_length"),
        _lonlat_bounds("footprint"),
        Index("ix_scene_footprint", "footprint", postgresql_using="gist"),
        Index("ix_scene_acquired_at", "acquired_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    source: Mapped[str] = mapped_column(Text, nullable=False)
    product_id: Mapped[str] = mapped_column(Text, nullable=False)
    tile_id: Mapped[str | None] = mapped_column(Text)
    acquired_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    cloud_cover: Mapped[float | None] = mapped_column(Double)
    footprint: Mapped[Any | None] = mapped_column(_geometry("MULTIPOLYGON"))
    level: Mapped[str | None] = mapped_column(Text)
    processing_baseline: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, nullable=False, server_default="pending")
    error: Mapped[str | None] = mapped_column(Text)
    metadata_: Mapped[dict[str, Any]] = mapped_column(
        "metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")
    )
    created_at: Mapped[datetime] = _created_at()
    ingested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Observation(Base):
    """One chip: a location seen in a scene. The pixels are a file named by its hash."""

    __tablename__ = "observation"
    __table_args__ = (
        UniqueConstraint("location_id", "scene_id"),
        _fraction("valid_fraction"),
        _fraction("cloud_fraction"),
        _sha256("chip_sha256"),
        CheckConstraint(
            "bounds IS NULL OR (array_length(bounds, 1) = 4"
            " AND bounds[1] < bounds[3] AND bounds[2] < bounds[4])",
            name="bounds_box",
        ),
        Index("ix_observation_location_id_acquired_at", "location_id", "acquired_at"),
        Index("ix_observation_scene_id", "scene_id"),
        Index("ix_observation_chip_sha256", "chip_sha256"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    location_id: Mapped[int] = mapped_column(
        ForeignKey("location.id", ondelete="CASCADE"), nullable=False
    )
    scene_id: Mapped[int] = mapped_column(
        ForeignKey("scene.id", ondelete="CASCADE"), nullable=False
    )
    acquired_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    valid_fraction: Mapped[float] = mapped_column(Double, nullable=False)
    cloud_fraction: Mapped[float] = mapped_column(Double, nullable=False)
    chip_key: Mapped[str] = mapped_column(Text, nullable=False)
    chip_sha256: Mapped[str] = mapped_column(Text, nullable=False)
    epsg: Mapped[int | None] = mapped_column(Integer, comment="native CRS of the chip grid")
    bounds: Mapped[list[float] | None] = mapped_column(
        ARRAY(Double), comment="chip bounds in its native CRS: minx, miny, maxx, maxy"
    )
    created_at: Mapped[datetime] = _created_at()


class ModelVersion(Base):
    """One checkpoint of the learner."""

    __tablename__ = "model_version"
    __table_args__ = (
        CheckConstraint("step >= 0", name="step_nonnegative"),
        CheckConstraint(_in("method", METHODS), name="method_known"),
        Index("ix_model_version_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, nullable=False)
    method: Mapped[str] = mapped_column(Text, nullable=False)
    checkpoint_key: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[dict[str, Any]] = mapped_column(
        JSONB, nullable=False, server_default=text("'{}'::jsonb")
    )
    created_at: Mapped[datetime] = _created_at()


class ChangeEstimate(Base):
    """The current change state of one location."""

    __tablename__ = "change_estimate"
    __table_args__ = (
        CheckConstraint("ratio_ema >= 0", name="ratio_ema_nonnegative"),
        CheckConstraint("ratio_last >= 0", name="ratio_last_nonnegative"),
        CheckConstraint("long_dist >= 0 AND short_dist >= 0", name="dist_nonnegative"),
        CheckConstraint("updates >= 1", name="updates_positive"),
        CheckConstraint("changed OR changed_since IS NULL", name="changed_since_when_changed"),
        CheckConstraint(
            "change_probability >= 0 AND change_probability <= 1", name="probability_range"
        ),
        CheckConstraint(_in("denominator", DENOMINATOR_SOURCES), name="denominator_known"),
        Index("ix_change_estimate_ratio_ema", "ratio_ema"),
        Index(
            "ix_change_estimate_changed_since",
            "changed_since",
            postgresql_where=text("changed"),
        ),
    )

    location_id: Mapped[int] = mapped_column(
        ForeignKey("location.id", ondelete="CASCADE"), primary_key=True
    )
    ratio_ema: Mapped[float] = mapped_column(Double, nullable=False)
    ratio_last: Mapped[float] = mapped_column(Double, nullable=False)
    long_dist: Mapped[float] = mapped_column(Double, nullable=False)
    short_dist: Mapped[float] = mapped_column(Double, nullable=False)
    updates: Mapped[int] = mapped_column(Integer, nullable=False, server_default="1")
    changed: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="false")
    changed_since: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True),
        comment="when the location last became changed; NULL while unchanged (kept by a trigger)",
    )
    change_probability: Mapped[float | None] = mapped_column(
        Double, comment="P(changed) under the last mixture refit; NULL before the first"
    )
    short_ref: Mapped[float | None] = mapped_column(
        Double, comment="running short-term distance from real pairs; NULL without any"
    )
    season_gap_days: Mapped[float | None] = mapped_column(
        Double, comment="days of year between the last R's two images"
    )
    denominator: Mapped[str | None] = mapped_column(
        Text, comment="where the last R's denominator came from: pair, own, others, date-pair"
    )
    model_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_version.id", ondelete="SET NULL")
    )
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


class ChangeEvent(Base):
    """One measurement of R for a location: the history behind its estimate."""

    __tablename__ = "change_event"
    __table_args__ = (
        CheckConstraint("step >= 0", name="step_nonnegative"),
        CheckConstraint("ratio >= 0 AND ratio_ema >= 0", name="ratio_nonnegative"),
        CheckConstraint("long_dist >= 0 AND short_dist >= 0", name="dist_nonnegative"),
        CheckConstraint(_in("denominator", DENOMINATOR_SOURCES), name="denominator_known"),
        # No event is written twice for the same step of a location.
        UniqueConstraint("location_id", "step"),
        Index("ix_change_event_location_id_created_at", "location_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    location_id: Mapped[int] = mapped_column(
        ForeignKey("location.id", ondelete="CASCADE"), nullable=False
    )
    step: Mapped[int] = mapped_column(BigInteger, nullable=False)
    ratio: Mapped[float] = mapped_column(Double, nullable=False, comment="R of this update")
    ratio_ema: Mapped[float] = mapped_column(Double, nullable=False, comment="r after it")
    long_dist: Mapped[float] = mapped_column(Double, nullable=False)
    short_dist: Mapped[float] = mapped_column(Double, nullable=False)
    query_observation_id: Mapped[int | None] = mapped_column(
        ForeignKey("observation.id", ondelete="SET NULL"), comment="the image at t0"
    )
    positive_observation_id: Mapped[int | None] = mapped_column(
        ForeignKey("observation.id", ondelete="SET NULL"),
        comment="the image at t1; NULL when k+ was a second view of the query",
    )
    longterm_observation_id: Mapped[int | None] = mapped_column(
        ForeignKey("observation.id", ondelete="SET NULL"), comment="the long-term image"
    )
    season_gap_days: Mapped[float | None] = mapped_column(
        Double, comment="days of year between the query and the long-term image"
    )
    denominator: Mapped[str | None] = mapped_column(
        Text, comment="where R's denominator came from: pair, own, others, date-pair"
    )
    model_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_version.id", ondelete="SET NULL")
    )
    created_at: Mapped[datetime] = _created_at()


class Artifact(Base):
    """One published export: a model or a map."""

    __tablename__ = "artifact"
    __table_args__ = (
        CheckConstraint(_in("kind", ARTIFACT_KINDS), name="kind_known"),
        _sha256("sha256"),
        CheckConstraint("size_bytes >= 0", name="size_nonnegative"),
        _lonlat_bounds("bbox"),
        Index("ix_artifact_bbox", "bbox", postgresql_using="gist"),
        Index("ix_artifact_kind_created_at", "kind", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    kind: Mapped[str] = mapped_column(Text, nullable=False)
    path: Mapped[str] = mapped_column(Text, nullable=False)
    sha256: Mapped[str] = mapped_column(Text, nullable=False)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    model_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_version.id", ondelete="SET NULL")
    )
    bbox: Mapped[Any | None] = mapped_column(_geometry("POLYGON"))
    metadata_: Mapped[dict[str, Any]] = mapped_column(
        "metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")
    )
    created_at: Mapped[datetime] = _created_at()


class IngestCursor(Base):
    """How far ingest has come, per source and AOI (NULL AOI: the whole world)."""

    __tablename__ = "ingest_cursor"
    __table_args__ = (UniqueConstraint("source", "aoi_id", postgresql_nulls_not_distinct=True),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    source: Mapped[str] = mapped_column(Text, nullable=False)
    aoi_id: Mapped[int | None] = mapped_column(ForeignKey("aoi.id", ondelete="CASCADE"))
    last_acquired_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


class IngestTask(Base):
    """One scene for the ingest workers: planned, claimed under a lease, then done or failed."""

    __tablename__ = "ingest_task"
    __table_args__ = (
        # One task per scene and cursor: planning twice queues nothing twice.
        UniqueConstraint("source", "aoi_id", "product_id", postgresql_nulls_not_distinct=True),
        CheckConstraint(_in("state", TASK_STATES), name="state_known"),
        CheckConstraint("attempts >= 0", name="attempts_nonnegative"),
        CheckConstraint(
            "state <> 'claimed' OR (lease_owner IS NOT NULL AND lease_until IS NOT NULL)",
            name="claimed_has_lease",
        ),
        # What a worker claims next: the oldest unfinished scene.
        Index(
            "ix_ingest_task_unfinished",
            "acquired_at",
            "product_id",
            postgresql_where=text("state IN ('queued', 'claimed')"),
        ),
        Index("ix_ingest_task_source_aoi_id_acquired_at", "source", "aoi_id", "acquired_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    source: Mapped[str] = mapped_column(Text, nullable=False)
    aoi_id: Mapped[int | None] = mapped_column(
        ForeignKey("aoi.id", ondelete="CASCADE"), comment="the cursor's AOI; NULL: every location"
    )
    product_id: Mapped[str] = mapped_column(Text, nullable=False)
    acquired_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, comment="the scene's place in cursor order"
    )
    scene: Mapped[dict[str, Any]] = mapped_column(
        JSONB, nullable=False, comment="the scene reference, enough to read the scene again"
    )
    state: Mapped[str] = mapped_column(Text, nullable=False, server_default="queued")
    attempts: Mapped[int] = mapped_column(
        Integer, nullable=False, server_default=text("0"), comment="claims so far"
    )
    lease_owner: Mapped[str | None] = mapped_column(
        Text, comment="host:pid:nonce of the worker holding the lease"
    )
    lease_until: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), comment="the lease ends here (database clock) unless renewed"
    )
    last_error: Mapped[str | None] = mapped_column(Text, comment="why the last attempt failed")
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Quarantine(Base):
    """Input that was rejected, and why: a whole product, or one location's chip of it."""

    __tablename__ = "quarantine"
    __table_args__ = (
        Index("ix_quarantine_created_at", "created_at"),
        Index("ix_quarantine_reason", "reason"),
        # One row per rejected thing: a product (location_id NULL) or a chip of it.
        UniqueConstraint("source", "ref", "location_id", postgresql_nulls_not_distinct=True),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    source: Mapped[str] = mapped_column(Text, nullable=False)
    ref: Mapped[str] = mapped_column(
        Text, nullable=False, comment="what was rejected: a product id or a path"
    )
    location_id: Mapped[int | None] = mapped_column(
        ForeignKey("location.id", ondelete="CASCADE"),
        comment="the location whose chip was rejected; NULL for a whole product",
    )
    reason: Mapped[str] = mapped_column(Text, nullable=False, comment="a short code")
    detail: Mapped[str | None] = mapped_column(Text, comment="one line for a person")
    payload: Mapped[dict[str, Any]] = mapped_column(
        JSONB, nullable=False, server_default=text("'{}'::jsonb")
    )
    created_at: Mapped[datetime] = _created_at()


class SimTruth(Base):
    """Ground truth of the simulated world, for scoring only: the learner never reads it."""

    __tablename__ = "sim_truth"
    __table_args__ = (
        CheckConstraint(_in("kind", SIM_EVENT_KINDS), name="kind_known"),
        _fraction("changed_fraction"),
        CheckConstraint("(kind IS NULL) = (event_date IS NULL)", name="event_date_with_kind"),
    )

    location_id: Mapped[int] = mapped_column(
        ForeignKey("location.id", ondelete="CASCADE"), primary_key=True
    )
    seed: Mapped[int] = mapped_column(BigInteger, nullable=False)
    kind: Mapped[str | None] = mapped_column(Text, comment="NULL: the location never changes")
    event_date: Mapped[date | None] = mapped_column(Date)
    changed_fraction: Mapped[float] = mapped_column(
        Double, nullable=False, comment="share of the chip that changes"
    )
    created_at: Mapped[datetime] = _created_at()


class JobRun(Base):
    """The last run of one of the daemon's scheduled jobs, for ``revisit status``."""

    __tablename__ = "job_run"
    __table_args__ = (
        CheckConstraint(_in("last_outcome", JOB_OUTCOMES), name="outcome_known"),
        CheckConstraint("runs >= 0 AND failures >= 0", name="counts_nonnegative"),
    )

    job_id: Mapped[str] = mapped_column(Text, primary_key=True)
    last_started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_outcome: Mapped[str | None] = mapped_column(Text, comment="ok, skipped or failed")
    last_duration_s: Mapped[float | None] = mapped_column(Double)
    last_detail: Mapped[str | None] = mapped_column(
        Text, comment="one line: what the run did, or why it failed"
    )
    next_run_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    runs: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    failures: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    runner: Mapped[str | None] = mapped_column(Text, comment="host:pid of the daemon that ran it")
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


class SchedulerJob(Base):
    """APScheduler's job store (``SQLAlchemyJobStore``): one row per scheduled job.

    The layout is APScheduler 3's own; the migration creates it so that the
    scheduler never has to.
    """

    __tablename__ = SCHEDULER_JOB_TABLE
    __table_args__ = (Index("ix_scheduler_job_next_run_time", "next_run_time"),)

    id: Mapped[str] = mapped_column(String(191), primary_key=True)
    next_run_time: Mapped[float | None] = mapped_column(Double)
    job_state: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)


class ChangeAlert(Base):
    """A location's classification flipped: to changed, or back (written by a trigger)."""

    __tablename__ = "change_alert"
    __table_args__ = (
        CheckConstraint("ratio_ema >= 0", name="ratio_ema_nonnegative"),
        CheckConstraint(
            "change_probability >= 0 AND change_probability <= 1", name="probability_range"
        ),
        Index("ix_change_alert_location_id_created_at", "location_id", "created_at"),
        Index("ix_change_alert_created_at", "created_at"),
        Index("ix_change_alert_aoi_ids", "aoi_ids", postgresql_using="gin"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    location_id: Mapped[int] = mapped_column(
        ForeignKey("location.id", ondelete="CASCADE"), nullable=False
    )
    aoi_ids: Mapped[list[int]] = mapped_column(
        ARRAY(BigInteger),
        nullable=False,
        server_default=text("'{}'::bigint[]"),
        comment="the AOIs whose polygon holds the location, when the alert was raised",
    )
    aoi_names: Mapped[list[str]] = mapped_column(
        ARRAY(Text),
        nullable=False,
        server_default=text("'{}'::text[]"),
        comment="their names then, in the order of aoi_ids",
    )
    changed: Mapped[bool] = mapped_column(
        Boolean, nullable=False, comment="the new classification: true = turned changed"
    )
    ratio_ema: Mapped[float] = mapped_column(Double, nullable=False, comment="r at the flip")
    change_probability: Mapped[float | None] = mapped_column(Double)
    model_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_version.id", ondelete="SET NULL")
    )
    created_at: Mapped[datetime] = _created_at()


class AlertWebhook(Base):
    """A URL that receives the change alerts of one AOI."""

    __tablename__ = "alert_webhook"
    __table_args__ = (
        UniqueConstraint("aoi_id", "url"),
        CheckConstraint("url ~ '^https?://'", name="url_http"),
        CheckConstraint("consecutive_failures >= 0", name="failures_nonnegative"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    aoi_id: Mapped[int] = mapped_column(ForeignKey("aoi.id", ondelete="CASCADE"), nullable=False)
    url: Mapped[str] = mapped_column(Text, nullable=False)
    active: Mapped[bool] = mapped_column(
        Boolean,
        nullable=False,
        server_default=text("true"),
        comment="false: paused, its deliveries wait",
    )
    consecutive_failures: Mapped[int] = mapped_column(
        Integer, nullable=False, server_default=text("0"), comment="failed attempts since a success"
    )
    retry_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), comment="backing off: nothing is sent to it before this"
    )
    last_error: Mapped[str | None] = mapped_column(Text, comment="why the last attempt failed")
    last_delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _created_at()


class AlertDelivery(Base):
    """One change alert for one webhook: pending until a 2xx, or failed when too old."""

    __tablename__ = "alert_delivery"
    __table_args__ = (
        CheckConstraint(_in("status", DELIVERY_STATUSES), name="status_known"),
        CheckConstraint("attempts >= 0", name="attempts_nonnegative"),
        Index("ix_alert_delivery_webhook_id", "webhook_id"),
        # What the delivery job claims next: a webhook's pending deliveries, oldest first.
        Index(
            "ix_alert_delivery_pending",
            "webhook_id",
            "alert_id",
            postgresql_where=text("status = 'pending'"),
        ),
    )

    # No foreign key: its check is a cached plan per session, and one planned while
    # change_alert looked empty scans the table for every delivery a big batch of flips
    # makes. A trigger on change_alert deletes an alert's deliveries with it instead.
    alert_id: Mapped[int] = mapped_column(
        BigInteger, primary_key=True, comment="the change_alert (its deliveries go with it)"
    )
    webhook_id: Mapped[int] = mapped_column(
        ForeignKey("alert_webhook.id", ondelete="CASCADE"), primary_key=True
    )
    status: Mapped[str] = mapped_column(Text, nullable=False, server_default="pending")
    attempts: Mapped[int] = mapped_column(
        Integer, nullable=False, server_default=text("0"), comment="POSTs so far"
    )
    next_attempt_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True),
        nullable=False,
        server_default=func.now(),
        comment="not claimed again before this: the lease of the process sending it",
    )
    last_error: Mapped[str | None] = mapped_column(Text, comment="why the last attempt failed")
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _created_at()


TABLES = (
    "aoi",
    "location",
    "scene",
    "observation",
    "change_estimate",
    "change_event",
    "model_version",
    "artifact",
    "ingest_cursor",
    "ingest_task",
    "quarantine",
    "sim_truth",
    "job_run",
    SCHEDULER_JOB_TABLE,
    "change_alert",
    "alert_webhook",
    "alert_delivery",
)
VIEWS = ("v_change", "v_change_history", "v_aoi_change", "v_change_alert")
READER_ROLE = "revisit_reader"
