"""Initial schema: the ten tables of DESIGN §2, the views v_change and
v_change_history, and the read-only role revisit_reader.

Revision ID: 0001
Revises:
Create Date: 2026-11-22 03:57:56.050710
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from geoalchemy2 import Geometry
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


READER = "revisit_reader"

V_CHANGE = """
CREATE VIEW v_change AS
SELECT l.id               AS location_id,
       l.geom,
       l.footprint,
       l.origin,
       l.aoi_id,
       a.name             AS aoi_name,
       e.ratio_ema,
       e.ratio_last,
       e.long_dist,
       e.short_dist,
       e.updates,
       e.changed,
       e.model_version_id,
       mv.method          AS model_method,
       mv.step            AS model_step,
       e.updated_at
FROM change_estimate e
JOIN location l ON l.id = e.location_id
LEFT JOIN aoi a ON a.id = l.aoi_id
LEFT JOIN model_version mv ON mv.id = e.model_version_id
"""

V_CHANGE_HISTORY = """
CREATE VIEW v_change_history AS
SELECT ev.id              AS event_id,
       ev.location_id,
       l.geom,
       l.aoi_id,
       ev.step,
       ev.ratio,
       ev.ratio_ema,
       ev.long_dist,
       ev.short_dist,
       q.acquired_at      AS query_acquired_at,
       p.acquired_at      AS positive_acquired_at,
       lt.acquired_at     AS longterm_acquired_at,
       ev.model_version_id,
       ev.created_at
FROM change_event ev
JOIN location l ON l.id = ev.location_id
LEFT JOIN observation q ON q.id = ev.query_observation_id
LEFT JOIN observation p ON p.id = ev.positive_observation_id
LEFT JOIN observation lt ON lt.id = ev.longterm_observation_id
"""

# Roles belong to the whole cluster, not to one database: create it only if it
# is missing, and tolerate a concurrent migration of another database creating it.
CREATE_READER = f"""
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{READER}') THEN
        CREATE ROLE {READER} NOLOGIN;
    END IF;
EXCEPTION
    WHEN duplicate_object OR unique_violation THEN NULL;
    WHEN insufficient_privilege THEN
        RAISE EXCEPTION 'revisit needs the CREATEROLE privilege to create the role {READER};'
            ' or have an administrator run: CREATE ROLE {READER} NOLOGIN';
END
$$
"""

# The role stays when another database of the cluster still grants it something.
DROP_READER = f"""
DO $$
BEGIN
    DROP ROLE IF EXISTS {READER};
EXCEPTION
    WHEN dependent_objects_still_exist THEN
        RAISE NOTICE 'role {READER} kept: objects in another database depend on it';
END
$$
"""


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS postgis")
    op.create_geospatial_table(
        "aoi",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column(
            "geom",
            Geometry(
                geometry_type="MULTIPOLYGON",
                srid=4326,
                dimension=2,
                spatial_index=False,
                from_text="ST_GeomFromEWKT",
                name="geometry",
                nullable=False,
            ),
            nullable=False,
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("ST_IsValid(geom)", name=op.f("ck_aoi_geom_valid")),
        sa.CheckConstraint(
            "ST_XMin(geom) >= -180 AND ST_XMax(geom) <= 180 AND ST_YMin(geom) >= -90 AND ST_YMax(geom) <= 90",
            name=op.f("ck_aoi_geom_lonlat"),
        ),
        sa.CheckConstraint("char_length(name) BETWEEN 1 AND 128", name=op.f("ck_aoi_name_length")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_aoi")),
        sa.UniqueConstraint("name", name=op.f("uq_aoi_name")),
    )
    op.create_geospatial_index(
        "ix_aoi_geom", "aoi", ["geom"], unique=False, postgresql_using="gist", postgresql_ops={}
    )
    op.create_table(
        "model_version",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("method", sa.Text(), nullable=False),
        sa.Column("checkpoint_key", sa.Text(), nullable=True),
        sa.Column(
            "metrics",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "method IN ('moco', 'tp', 'geo-tp', 'seco', 'teco', 'caco')",
            name=op.f("ck_model_version_method_known"),
        ),
        sa.CheckConstraint("step >= 0", name=op.f("ck_model_version_step_nonnegative")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_version")),
    )
    op.create_index("ix_model_version_created_at", "model_version", ["created_at"], unique=False)
    op.create_table(
        "quarantine",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("ref", sa.Text(), nullable=False, comment="what was rejected"),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column(
            "payload",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_quarantine")),
    )
    op.create_index("ix_quarantine_created_at", "quarantine", ["created_at"], unique=False)
    op.create_geospatial_table(
        "scene",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("product_id", sa.Text(), nullable=False),
        sa.Column("tile_id", sa.Text(), nullable=True),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cloud_cover", sa.Double(), nullable=True),
        sa.Column(
            "footprint",
            Geometry(
                geometry_type="MULTIPOLYGON",
                srid=4326,
                dimension=2,
                spatial_index=False,
                from_text="ST_GeomFromEWKT",
                name="geometry",
            ),
            nullable=True,
        ),
        sa.Column("level", sa.Text(), nullable=True),
        sa.Column("processing_baseline", sa.Text(), nullable=True),
        sa.Column("status", sa.Text(), server_default="pending", nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column(
            "metadata",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("ingested_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("level IN ('L1C', 'L2A')", name=op.f("ck_scene_level_known")),
        sa.CheckConstraint(
            "status IN ('pending', 'ingested', 'failed', 'quarantined')",
            name=op.f("ck_scene_status_known"),
        ),
        sa.CheckConstraint(
            "ST_XMin(footprint) >= -180 AND ST_XMax(footprint) <= 180 AND ST_YMin(footprint) >= -90 AND ST_YMax(footprint) <= 90",
            name=op.f("ck_scene_footprint_lonlat"),
        ),
        sa.CheckConstraint(
            "char_length(source) BETWEEN 1 AND 64", name=op.f("ck_scene_source_length")
        ),
        sa.CheckConstraint(
            "cloud_cover >= 0 AND cloud_cover <= 100", name=op.f("ck_scene_cloud_cover_percent")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scene")),
        sa.UniqueConstraint("source", "product_id", name=op.f("uq_scene_source_product_id")),
    )
    op.create_index("ix_scene_acquired_at", "scene", ["acquired_at"], unique=False)
    op.create_geospatial_index(
        "ix_scene_footprint",
        "scene",
        ["footprint"],
        unique=False,
        postgresql_using="gist",
        postgresql_ops={},
    )
    op.create_geospatial_table(
        "artifact",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("model_version_id", sa.BigInteger(), nullable=True),
        sa.Column(
            "bbox",
            Geometry(
                geometry_type="POLYGON",
                srid=4326,
                dimension=2,
                spatial_index=False,
                from_text="ST_GeomFromEWKT",
                name="geometry",
            ),
            nullable=True,
        ),
        sa.Column(
            "metadata",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "kind IN ('onnx', 'changemap-cog', 'changemap-geojson', 'quicklook')",
            name=op.f("ck_artifact_kind_known"),
        ),
        sa.CheckConstraint("sha256 ~ '^[0-9a-f]{64}$'", name=op.f("ck_artifact_sha256_hex")),
        sa.CheckConstraint(
            "ST_XMin(bbox) >= -180 AND ST_XMax(bbox) <= 180 AND ST_YMin(bbox) >= -90 AND ST_YMax(bbox) <= 90",
            name=op.f("ck_artifact_bbox_lonlat"),
        ),
        sa.CheckConstraint("size_bytes >= 0", name=op.f("ck_artifact_size_nonnegative")),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_version.id"],
            name=op.f("fk_artifact_model_version_id_model_version"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_artifact")),
    )
    op.create_geospatial_index(
        "ix_artifact_bbox",
        "artifact",
        ["bbox"],
        unique=False,
        postgresql_using="gist",
        postgresql_ops={},
    )
    op.create_index("ix_artifact_kind_created_at", "artifact", ["kind", "created_at"], unique=False)
    op.create_table(
        "ingest_cursor",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("aoi_id", sa.BigInteger(), nullable=True),
        sa.Column("last_acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["aoi_id"], ["aoi.id"], name=op.f("fk_ingest_cursor_aoi_id_aoi"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ingest_cursor")),
        sa.UniqueConstraint(
            "source",
            "aoi_id",
            name=op.f("uq_ingest_cursor_source_aoi_id"),
            postgresql_nulls_not_distinct=True,
        ),
    )
    op.create_geospatial_table(
        "location",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column(
            "geom",
            Geometry(
                geometry_type="POINT",
                srid=4326,
                dimension=2,
                spatial_index=False,
                from_text="ST_GeomFromEWKT",
                name="geometry",
                nullable=False,
            ),
            nullable=False,
        ),
        sa.Column(
            "footprint",
            Geometry(
                geometry_type="POLYGON",
                srid=4326,
                dimension=2,
                spatial_index=False,
                from_text="ST_GeomFromEWKT",
                name="geometry",
            ),
            nullable=True,
        ),
        sa.Column("epsg", sa.Integer(), nullable=True, comment="UTM zone of the chip grid"),
        sa.Column("origin", sa.Text(), nullable=False),
        sa.Column("aoi_id", sa.BigInteger(), nullable=True),
        sa.Column("cluster_id", sa.Integer(), nullable=True, comment="geo cluster (GASSL)"),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "origin IN ('urban-gaussian', 'aoi-grid', 'manual')",
            name=op.f("ck_location_origin_known"),
        ),
        sa.CheckConstraint(
            "ST_XMin(footprint) >= -180 AND ST_XMax(footprint) <= 180 AND ST_YMin(footprint) >= -90 AND ST_YMax(footprint) <= 90",
            name=op.f("ck_location_footprint_lonlat"),
        ),
        sa.CheckConstraint(
            "ST_XMin(geom) >= -180 AND ST_XMax(geom) <= 180 AND ST_YMin(geom) >= -90 AND ST_YMax(geom) <= 90",
            name=op.f("ck_location_geom_lonlat"),
        ),
        sa.CheckConstraint("cluster_id >= 0", name=op.f("ck_location_cluster_id_nonnegative")),
        sa.CheckConstraint(
            "epsg BETWEEN 32601 AND 32660 OR epsg BETWEEN 32701 AND 32760",
            name=op.f("ck_location_epsg_utm"),
        ),
        sa.ForeignKeyConstraint(
            ["aoi_id"], ["aoi.id"], name=op.f("fk_location_aoi_id_aoi"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_location")),
    )
    op.create_index(op.f("ix_location_aoi_id"), "location", ["aoi_id"], unique=False)
    op.create_geospatial_index(
        "ix_location_footprint",
        "location",
        ["footprint"],
        unique=False,
        postgresql_using="gist",
        postgresql_ops={},
    )
    op.create_geospatial_index(
        "ix_location_geom",
        "location",
        ["geom"],
        unique=False,
        postgresql_using="gist",
        postgresql_ops={},
    )
    op.create_table(
        "change_estimate",
        sa.Column("location_id", sa.BigInteger(), nullable=False),
        sa.Column("ratio_ema", sa.Double(), nullable=False),
        sa.Column("ratio_last", sa.Double(), nullable=False),
        sa.Column("long_dist", sa.Double(), nullable=False),
        sa.Column("short_dist", sa.Double(), nullable=False),
        sa.Column("updates", sa.Integer(), server_default="1", nullable=False),
        sa.Column("changed", sa.Boolean(), server_default="false", nullable=False),
        sa.Column("model_version_id", sa.BigInteger(), nullable=True),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "long_dist >= 0 AND short_dist >= 0", name=op.f("ck_change_estimate_dist_nonnegative")
        ),
        sa.CheckConstraint("ratio_ema >= 0", name=op.f("ck_change_estimate_ratio_ema_nonnegative")),
        sa.CheckConstraint(
            "ratio_last >= 0", name=op.f("ck_change_estimate_ratio_last_nonnegative")
        ),
        sa.CheckConstraint("updates >= 1", name=op.f("ck_change_estimate_updates_positive")),
        sa.ForeignKeyConstraint(
            ["location_id"],
            ["location.id"],
            name=op.f("fk_change_estimate_location_id_location"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_version.id"],
            name=op.f("fk_change_estimate_model_version_id_model_version"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("location_id", name=op.f("pk_change_estimate")),
    )
    op.create_index("ix_change_estimate_ratio_ema", "change_estimate", ["ratio_ema"], unique=False)
    op.create_table(
        "observation",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("location_id", sa.BigInteger(), nullable=False),
        sa.Column("scene_id", sa.BigInteger(), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("valid_fraction", sa.Double(), nullable=False),
        sa.Column("cloud_fraction", sa.Double(), nullable=False),
        sa.Column("chip_key", sa.Text(), nullable=False),
        sa.Column("chip_sha256", sa.Text(), nullable=False),
        sa.Column("epsg", sa.Integer(), nullable=True, comment="native CRS of the chip grid"),
        sa.Column(
            "bounds",
            postgresql.ARRAY(sa.Double()),
            nullable=True,
            comment="chip bounds in its native CRS: minx, miny, maxx, maxy",
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "chip_sha256 ~ '^[0-9a-f]{64}$'", name=op.f("ck_observation_chip_sha256_hex")
        ),
        sa.CheckConstraint(
            "bounds IS NULL OR (array_length(bounds, 1) = 4 AND bounds[1] < bounds[3] AND bounds[2] < bounds[4])",
            name=op.f("ck_observation_bounds_box"),
        ),
        sa.CheckConstraint(
            "cloud_fraction >= 0 AND cloud_fraction <= 1",
            name=op.f("ck_observation_cloud_fraction_fraction"),
        ),
        sa.CheckConstraint(
            "valid_fraction >= 0 AND valid_fraction <= 1",
            name=op.f("ck_observation_valid_fraction_fraction"),
        ),
        sa.ForeignKeyConstraint(
            ["location_id"],
            ["location.id"],
            name=op.f("fk_observation_location_id_location"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["scene_id"],
            ["scene.id"],
            name=op.f("fk_observation_scene_id_scene"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_observation")),
        sa.UniqueConstraint(
            "location_id", "scene_id", name=op.f("uq_observation_location_id_scene_id")
        ),
    )
    op.create_index("ix_observation_chip_sha256", "observation", ["chip_sha256"], unique=False)
    op.create_index(
        "ix_observation_location_id_acquired_at",
        "observation",
        ["location_id", "acquired_at"],
        unique=False,
    )
    op.create_index("ix_observation_scene_id", "observation", ["scene_id"], unique=False)
    op.create_table(
        "change_event",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("location_id", sa.BigInteger(), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("ratio", sa.Double(), nullable=False, comment="R of this update"),
        sa.Column("ratio_ema", sa.Double(), nullable=False, comment="r after it"),
        sa.Column("long_dist", sa.Double(), nullable=False),
        sa.Column("short_dist", sa.Double(), nullable=False),
        sa.Column(
            "query_observation_id", sa.BigInteger(), nullable=True, comment="the image at t0"
        ),
        sa.Column(
            "positive_observation_id",
            sa.BigInteger(),
            nullable=True,
            comment="the image at t1; NULL when k+ was a second view of the query",
        ),
        sa.Column(
            "longterm_observation_id", sa.BigInteger(), nullable=True, comment="the long-term image"
        ),
        sa.Column("model_version_id", sa.BigInteger(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "long_dist >= 0 AND short_dist >= 0", name=op.f("ck_change_event_dist_nonnegative")
        ),
        sa.CheckConstraint(
            "ratio >= 0 AND ratio_ema >= 0", name=op.f("ck_change_event_ratio_nonnegative")
        ),
        sa.CheckConstraint("step >= 0", name=op.f("ck_change_event_step_nonnegative")),
        sa.ForeignKeyConstraint(
            ["location_id"],
            ["location.id"],
            name=op.f("fk_change_event_location_id_location"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["longterm_observation_id"],
            ["observation.id"],
            name=op.f("fk_change_event_longterm_observation_id_observation"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_version.id"],
            name=op.f("fk_change_event_model_version_id_model_version"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["positive_observation_id"],
            ["observation.id"],
            name=op.f("fk_change_event_positive_observation_id_observation"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["query_observation_id"],
            ["observation.id"],
            name=op.f("fk_change_event_query_observation_id_observation"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_change_event")),
    )
    op.create_index(
        "ix_change_event_location_id_created_at",
        "change_event",
        ["location_id", "created_at"],
        unique=False,
    )

    op.execute(V_CHANGE)
    op.execute(V_CHANGE_HISTORY)
    op.execute(CREATE_READER)
    op.execute(f"GRANT USAGE ON SCHEMA public TO {READER}")
    op.execute(f"GRANT SELECT ON v_change, v_change_history TO {READER}")


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS v_change_history")
    op.execute("DROP VIEW IF EXISTS v_change")
    op.execute(f"REVOKE USAGE ON SCHEMA public FROM {READER}")
    op.execute(DROP_READER)
    op.drop_index("ix_change_event_location_id_created_at", table_name="change_event")
    op.drop_table("change_event")
    op.drop_index("ix_observation_scene_id", table_name="observation")
    op.drop_index("ix_observation_location_id_acquired_at", table_name="observation")
    op.drop_index("ix_observation_chip_sha256", table_name="observation")
    op.drop_table("observation")
    op.drop_index("ix_change_estimate_ratio_ema", table_name="change_estimate")
    op.drop_table("change_estimate")
    op.drop_geospatial_index(
        "ix_location_geom", table_name="location", postgresql_using="gist", column_name="geom"
    )
    op.drop_geospatial_index(
        "ix_location_footprint",
        table_name="location",
        postgresql_using="gist",
        column_name="footprint",
    )
    op.drop_index(op.f("ix_location_aoi_id"), table_name="location")
    op.drop_geospatial_table("location")
    op.drop_table("ingest_cursor")
    op.drop_index("ix_artifact_kind_created_at", table_name="artifact")
    op.drop_geospatial_index(
        "ix_artifact_bbox", table_name="artifact", postgresql_using="gist", column_name="bbox"
    )
    op.drop_geospatial_table("artifact")
    op.drop_geospatial_index(
        "ix_scene_footprint", table_name="scene", postgresql_using="gist", column_name="footprint"
    )
    op.drop_index("ix_scene_acquired_at", table_name="scene")
    op.drop_geospatial_table("scene")
    op.drop_index("ix_quarantine_created_at", table_name="quarantine")
    op.drop_table("quarantine")
    op.drop_index("ix_model_version_created_at", table_name="model_version")
    op.drop_table("model_version")
    op.drop_geospatial_index(
        "ix_aoi_geom", table_name="aoi", postgresql_using="gist", column_name="geom"
    )
    op.drop_geospatial_table("aoi")
