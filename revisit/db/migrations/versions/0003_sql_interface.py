"""SQL interface: when a location became changed, a per-AOI view, a geography index
for radius queries, and a reader that can create nothing.

- change_estimate.changed_since, kept by a trigger: set when ``changed`` turns
  true, cleared when it turns false, so "changed since a date" is one index scan;
- v_change gains changed_since; v_aoi_change summarises each AOI;
- a GiST index on geom::geography, so ST_DWithin in metres uses an index;
- revisit_reader (and every role through PUBLIC) loses TEMPORARY on the
  database and CREATE on schema public, where revisit may revoke them.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 04:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

READER = "revisit_reader"

TRACK_CHANGED_SINCE = """
CREATE FUNCTION revisit_track_changed_since() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT NEW.changed THEN
        NEW.changed_since := NULL;
    ELSIF TG_OP = 'INSERT' THEN
        NEW.changed_since := COALESCE(NEW.changed_since, now());
    ELSIF NOT OLD.changed THEN
        NEW.changed_since := now();
    ELSE
        NEW.changed_since := OLD.changed_since;
    END IF;
    RETURN NEW;
END
$$
"""

V_CHANGE_0001 = """
CREATE VIEW v_change AS
SELECT l.id AS location_id, l.geom, l.footprint, l.origin, l.aoi_id, a.name AS aoi_name,
       e.ratio_ema, e.ratio_last, e.long_dist, e.short_dist, e.updates, e.changed,
       e.model_version_id, mv.method AS model_method, mv.step AS model_step, e.updated_at
FROM change_estimate e
JOIN location l ON l.id = e.location_id
LEFT JOIN aoi a ON a.id = l.aoi_id
LEFT JOIN model_version mv ON mv.id = e.model_version_id
"""

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
       e.changed_since,
       e.model_version_id,
       mv.method          AS model_method,
       mv.step            AS model_step,
       e.updated_at
FROM change_estimate e
JOIN location l ON l.id = e.location_id
LEFT JOIN aoi a ON a.id = l.aoi_id
LEFT JOIN model_version mv ON mv.id = e.model_version_id
"""

# Every location inside the AOI's polygon counts, whatever placed it there.
V_AOI_CHANGE = """
CREATE VIEW v_aoi_change AS
SELECT a.id                                            AS aoi_id,
       a.name                                          AS aoi_name,
       a.geom,
       count(e.location_id)                            AS locations,
       count(e.location_id) FILTER (WHERE e.changed)   AS changed,
       COALESCE(avg(e.changed::int), 0)::double precision AS changed_fraction,
       avg(e.ratio_ema)                                AS mean_ratio,
       max(e.updated_at)                               AS updated_at
FROM aoi a
LEFT JOIN location l ON ST_Intersects(l.geom, a.geom)
LEFT JOIN change_estimate e ON e.location_id = l.id
GROUP BY a.id, a.name, a.geom
"""

# Only where revisit's role may: on a server it does not own, say so and go on.
LOCK_DOWN_PUBLIC = """
DO $$
BEGIN
    EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC', current_database());
    EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO %I', current_database(), current_user);
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'revisit could not revoke TEMPORARY from PUBLIC on this database';
END
$$;
DO $$
BEGIN
    REVOKE CREATE ON SCHEMA public FROM PUBLIC;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'revisit could not revoke CREATE on schema public from PUBLIC';
END
$$
"""

RESTORE_PUBLIC = """
DO $$
BEGIN
    EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO PUBLIC', current_database());
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'revisit could not give TEMPORARY back to PUBLIC';
END
$$
"""


def upgrade() -> None:
    op.add_column(
        "change_estimate",
        sa.Column(
            "changed_since",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="when the location last became changed; NULL while unchanged (kept by a trigger)",
        ),
    )
    op.execute("UPDATE change_estimate SET changed_since = updated_at WHERE changed")
    op.create_check_constraint(
        op.f("ck_change_estimate_changed_since_when_changed"),
        "change_estimate",
        "changed OR changed_since IS NULL",
    )
    op.create_index(
        "ix_change_estimate_changed_since",
        "change_estimate",
        ["changed_since"],
        postgresql_where=sa.text("changed"),
    )
    op.execute(TRACK_CHANGED_SINCE)
    op.execute(
        "CREATE TRIGGER change_estimate_changed_since"
        " BEFORE INSERT OR UPDATE ON change_estimate"
        " FOR EACH ROW EXECUTE FUNCTION revisit_track_changed_since()"
    )
    # Radius queries in metres (ST_DWithin on geography) use this index.
    op.execute("CREATE INDEX ix_location_geog ON location USING gist ((geom::geography))")
    op.execute("DROP VIEW v_change")
    op.execute(V_CHANGE)
    op.execute(V_AOI_CHANGE)
    op.execute(f"GRANT SELECT ON v_change, v_aoi_change TO {READER}")
    op.execute(LOCK_DOWN_PUBLIC)


def downgrade() -> None:
    op.execute(RESTORE_PUBLIC)
    op.execute("DROP VIEW v_aoi_change")
    op.execute("DROP VIEW v_change")
    op.execute(V_CHANGE_0001)
    op.execute(f"GRANT SELECT ON v_change TO {READER}")
    op.execute("DROP INDEX ix_location_geog")
    op.execute("DROP TRIGGER change_estimate_changed_since ON change_estimate")
    op.execute("DROP FUNCTION revisit_track_changed_since()")
    op.drop_index("ix_change_estimate_changed_since", table_name="change_estimate")
    op.drop_constraint(
        op.f("ck_change_estimate_changed_since_when_changed"), "change_estimate", type_="check"
    )
    op.drop_column("change_estimate", "changed_since")
