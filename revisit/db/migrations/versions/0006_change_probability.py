"""Change estimates that say what they are: the change probability, the source of
R's denominator, the seasonal gap of its pair, and v_change over every location,
saying why an unmeasured one is unmeasured.

- change_estimate gains change_probability (the posterior of the mixture's
  upper component), short_ref (the location's running short-term distance from
  real pairs), season_gap_days and denominator; change_event gains the last two;
- v_change lists every location: a measured one as before, an unmeasured one
  with NULL estimates and unmeasured_reason (no observation, no usable
  observation, one usable date only, dates too close together, not measured
  yet), judged with the usability thresholds of the newest model version.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 12:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

READER = "revisit_reader"
SOURCES = "('pair', 'own', 'others', 'date-pair')"

V_CHANGE_0003 = """
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

# The thresholds are the newest learner's (model_version.metrics->'usable'), or the
# learner's defaults before any learner ran. The observation counts are only read
# for unmeasured locations (the subquery's filter on e is a one-time filter).
V_CHANGE = """
CREATE VIEW v_change AS
WITH policy AS (
    SELECT COALESCE((m.metrics->'usable'->>'min_valid_fraction')::double precision, 0.8)
               AS min_valid,
           COALESCE((m.metrics->'usable'->>'max_cloud_fraction')::double precision, 0.2)
               AS max_cloud,
           COALESCE((m.metrics->'usable'->>'pair_gap_days')::double precision, 120)
               AS pair_gap_days
    FROM (SELECT 1) AS one
    LEFT JOIN LATERAL (
        SELECT metrics FROM model_version ORDER BY step DESC, id DESC LIMIT 1
    ) m ON true
)
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
       e.change_probability,
       e.season_gap_days,
       e.denominator,
       e.model_version_id,
       mv.method          AS model_method,
       mv.step            AS model_step,
       e.updated_at,
       e.location_id IS NOT NULL AS measured,
       CASE
           WHEN e.location_id IS NOT NULL THEN NULL
           WHEN o.observations = 0 THEN 'no observation'
           WHEN o.usable = 0 THEN 'no usable observation (cloud or no data)'
           WHEN o.usable_days = 1 THEN 'one usable date only'
           WHEN o.span_days <= p.pair_gap_days THEN
               'usable dates within ' || p.pair_gap_days::text || ' days of each other'
           ELSE 'not measured yet'
       END                AS unmeasured_reason
FROM location l
CROSS JOIN policy p
LEFT JOIN change_estimate e ON e.location_id = l.id
LEFT JOIN aoi a ON a.id = l.aoi_id
LEFT JOIN model_version mv ON mv.id = e.model_version_id
LEFT JOIN LATERAL (
    SELECT count(*) AS observations,
           count(*) FILTER (WHERE u.ok) AS usable,
           count(DISTINCT u.acquired_at::date) FILTER (WHERE u.ok) AS usable_days,
           COALESCE(EXTRACT(EPOCH FROM max(u.acquired_at) FILTER (WHERE u.ok)
                    - min(u.acquired_at) FILTER (WHERE u.ok)) / 86400.0, 0) AS span_days
    FROM (
        SELECT ob.acquired_at,
               ob.valid_fraction >= p.min_valid AND ob.cloud_fraction <= p.max_cloud AS ok
        FROM observation ob
        WHERE ob.location_id = l.id AND e.location_id IS NULL
    ) u
) o ON true
"""


def upgrade() -> None:
    for name, comment in (
        ("change_probability", "P(changed) under the last mixture refit; NULL before the first"),
        ("short_ref", "running short-term distance from real pairs; NULL without any"),
        ("season_gap_days", "days of year between the last R's two images"),
    ):
        op.add_column(
            "change_estimate",
            sa.Column(name, sa.Double(), nullable=True, comment=comment),
        )
    op.add_column(
        "change_estimate",
        sa.Column(
            "denominator",
            sa.Text(),
            nullable=True,
            comment="where the last R's denominator came from: pair, own, others, date-pair",
        ),
    )
    op.create_check_constraint(
        op.f("ck_change_estimate_probability_range"),
        "change_estimate",
        "change_probability >= 0 AND change_probability <= 1",
    )
    op.create_check_constraint(
        op.f("ck_change_estimate_denominator_known"),
        "change_estimate",
        f"denominator IN {SOURCES}",
    )
    op.add_column(
        "change_event",
        sa.Column(
            "season_gap_days",
            sa.Double(),
            nullable=True,
            comment="days of year between the query and the long-term image",
        ),
    )
    op.add_column(
        "change_event",
        sa.Column(
            "denominator",
            sa.Text(),
            nullable=True,
            comment="where R's denominator came from: pair, own, others, date-pair",
        ),
    )
    op.create_check_constraint(
        op.f("ck_change_event_denominator_known"), "change_event", f"denominator IN {SOURCES}"
    )
    op.execute("DROP VIEW v_change")
    op.execute(V_CHANGE)
    op.execute(f"GRANT SELECT ON v_change TO {READER}")


def downgrade() -> None:
    op.execute("DROP VIEW v_change")
    op.execute(V_CHANGE_0003)
    op.execute(f"GRANT SELECT ON v_change TO {READER}")
    op.drop_constraint(op.f("ck_change_event_denominator_known"), "change_event", type_="check")
    op.drop_column("change_event", "denominator")
    op.drop_column("change_event", "season_gap_days")
    op.drop_constraint(
        op.f("ck_change_estimate_denominator_known"), "change_estimate", type_="check"
    )
    op.drop_constraint(
        op.f("ck_change_estimate_probability_range"), "change_estimate", type_="check"
    )
    for name in ("denominator", "season_gap_days", "short_ref", "change_probability"):
        op.drop_column("change_estimate", name)
