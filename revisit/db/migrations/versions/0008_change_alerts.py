"""Change alerts: change_alert, written by triggers on change_estimate whenever a
location's classification flips, a NOTIFY on channel revisit_change for each, and
webhooks per AOI (alert_webhook) with one alert_delivery row per alert and webhook.

- Two AFTER row triggers whose WHEN clause the executor evaluates without calling
  anything: INSERT WHEN (NEW.changed) (a first estimate that is changed counts as a
  flip to changed) and UPDATE OF changed WHEN (OLD.changed IS DISTINCT FROM
  NEW.changed). Each flipped row makes one call that inserts its change_alert row
  (with the AOIs whose polygon holds the location), the alert_delivery rows of
  those AOIs' webhooks, and pg_notify()s it. Measured with bench/alerts.py on the
  learner's batch write of 1e5 estimates (1.5 s without triggers): statement-level
  triggers with transition tables cost +28 % (+0.4 s) on every batch, flips or not
  (capturing every old and new row), while these cost nothing on a batch without
  flips, the usual one, and about 120 us per flip (+0.16 s with 1 % flipping,
  +1.2 s with 10 %, +13 s in the rare batch where every location flips).
- Being triggers, they run in the estimate's transaction, for every writer: a
  rolled-back write leaves no alert, no delivery and no notification (NOTIFY is
  sent at commit).
- alert_delivery.alert_id has no foreign key: PostgreSQL checks one with a plan
  cached per session, and one planned while change_alert looked empty (analysed
  when it was) scans the whole table for every delivery of a big batch of flips:
  minutes for 1e5 of them. A statement trigger on change_alert deletes an alert's
  deliveries with it instead.
- v_change_alert is the alerts with the location's geometry; revisit_reader may
  read it (the webhooks, whose URLs may hold tokens, and the deliveries stay
  hidden). LISTEN needs no privilege.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

READER = "revisit_reader"

# Per flipped row: the alert (with the AOIs whose polygon holds the location), its
# deliveries to those AOIs' webhooks, and its notification. (Three statements: one
# statement of data-modifying CTEs was up to five times slower on some plans.) A
# NOTIFY payload must stay under 8000 bytes: with very many overlapping AOIs the
# names go and the ids are cut to the first 100 ("aois_truncated": true).
# JSON has no NaN or infinity: such values go into the notification as null.
JSON_NUMBER = """
CREATE FUNCTION revisit_json_number(value double precision) RETURNS double precision
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN value IN ('NaN', 'Infinity', '-Infinity') THEN NULL ELSE value END
$$
"""

RAISE_ALERT = """
CREATE FUNCTION revisit_raise_change_alert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    alert record;
    body text;
BEGIN
    INSERT INTO change_alert (location_id, aoi_ids, aoi_names, changed, ratio_ema,
                              change_probability, model_version_id)
    SELECT NEW.location_id, COALESCE(m.ids, '{}'), COALESCE(m.names, '{}'), NEW.changed,
           NEW.ratio_ema, NEW.change_probability, NEW.model_version_id
    FROM location l
    LEFT JOIN LATERAL (
        SELECT array_agg(a.id ORDER BY a.id) AS ids, array_agg(a.name ORDER BY a.id) AS names
        FROM aoi a
        WHERE ST_Intersects(l.geom, a.geom)
    ) m ON true
    WHERE l.id = NEW.location_id
    RETURNING id, aoi_ids, aoi_names INTO alert;
    IF cardinality(alert.aoi_ids) > 0 THEN
        INSERT INTO alert_delivery (alert_id, webhook_id)
        SELECT alert.id, w.id FROM alert_webhook w WHERE w.aoi_id = ANY (alert.aoi_ids);
    END IF;
    body := json_build_object(
        'alert_id', alert.id, 'location_id', NEW.location_id, 'aoi_ids', alert.aoi_ids,
        'aois', alert.aoi_names, 'changed', NEW.changed, 'r', revisit_json_number(NEW.ratio_ema),
        'change_probability', revisit_json_number(NEW.change_probability),
        'model_version_id', NEW.model_version_id)::text;
    IF octet_length(body) >= 8000 THEN
        body := json_build_object(
            'alert_id', alert.id, 'location_id', NEW.location_id,
            'aoi_ids', alert.aoi_ids[1:100], 'aois_truncated', true, 'changed', NEW.changed,
            'r', revisit_json_number(NEW.ratio_ema),
            'change_probability', revisit_json_number(NEW.change_probability),
            'model_version_id', NEW.model_version_id)::text;
    END IF;
    PERFORM pg_notify('revisit_change', body);
    RETURN NULL;
END
$$
"""

# alert_delivery.alert_id has no foreign key (see the module docstring); this keeps
# "an alert's deliveries go with it", in one statement per DELETE.
DROP_DELIVERIES = """
CREATE FUNCTION revisit_drop_alert_deliveries() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM alert_delivery d USING gone g WHERE d.alert_id = g.id;
    RETURN NULL;
END
$$
"""

V_CHANGE_ALERT = """
CREATE VIEW v_change_alert AS
SELECT c.id               AS alert_id,
       c.location_id,
       l.geom,
       c.aoi_ids,
       c.aoi_names,
       c.changed,
       c.ratio_ema,
       c.change_probability,
       c.model_version_id,
       c.created_at
FROM change_alert c
JOIN location l ON l.id = c.location_id
"""


def upgrade() -> None:
    op.create_table(
        "change_alert",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("location_id", sa.BigInteger(), nullable=False),
        sa.Column(
            "aoi_ids",
            postgresql.ARRAY(sa.BigInteger()),
            server_default=sa.text("'{}'::bigint[]"),
            nullable=False,
            comment="the AOIs whose polygon holds the location, when the alert was raised",
        ),
        sa.Column(
            "aoi_names",
            postgresql.ARRAY(sa.Text()),
            server_default=sa.text("'{}'::text[]"),
            nullable=False,
            comment="their names then, in the order of aoi_ids",
        ),
        sa.Column(
            "changed",
            sa.Boolean(),
            nullable=False,
            comment="the new classification: true = turned changed",
        ),
        sa.Column("ratio_ema", sa.Double(), nullable=False, comment="r at the flip"),
        sa.Column("change_probability", sa.Double(), nullable=True),
        sa.Column("model_version_id", sa.BigInteger(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("ratio_ema >= 0", name=op.f("ck_change_alert_ratio_ema_nonnegative")),
        sa.CheckConstraint(
            "change_probability >= 0 AND change_probability <= 1",
            name=op.f("ck_change_alert_probability_range"),
        ),
        sa.ForeignKeyConstraint(
            ["location_id"],
            ["location.id"],
            name=op.f("fk_change_alert_location_id_location"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_version.id"],
            name=op.f("fk_change_alert_model_version_id_model_version"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_change_alert")),
    )
    op.create_index(
        "ix_change_alert_location_id_created_at", "change_alert", ["location_id", "created_at"]
    )
    op.create_index("ix_change_alert_created_at", "change_alert", ["created_at"])
    op.create_index("ix_change_alert_aoi_ids", "change_alert", ["aoi_ids"], postgresql_using="gin")

    op.create_table(
        "alert_webhook",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("aoi_id", sa.BigInteger(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column(
            "active",
            sa.Boolean(),
            server_default=sa.text("true"),
            nullable=False,
            comment="false: paused, its deliveries wait",
        ),
        sa.Column(
            "consecutive_failures",
            sa.Integer(),
            server_default=sa.text("0"),
            nullable=False,
            comment="failed attempts since a success",
        ),
        sa.Column(
            "retry_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="backing off: nothing is sent to it before this",
        ),
        sa.Column("last_error", sa.Text(), nullable=True, comment="why the last attempt failed"),
        sa.Column("last_delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("url ~ '^https?://'", name=op.f("ck_alert_webhook_url_http")),
        sa.CheckConstraint(
            "consecutive_failures >= 0", name=op.f("ck_alert_webhook_failures_nonnegative")
        ),
        sa.ForeignKeyConstraint(
            ["aoi_id"], ["aoi.id"], name=op.f("fk_alert_webhook_aoi_id_aoi"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alert_webhook")),
        sa.UniqueConstraint("aoi_id", "url", name=op.f("uq_alert_webhook_aoi_id_url")),
    )

    op.create_table(
        "alert_delivery",
        sa.Column(
            "alert_id",
            sa.BigInteger(),
            nullable=False,
            comment="the change_alert (its deliveries go with it)",
        ),
        sa.Column("webhook_id", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.Text(), server_default="pending", nullable=False),
        sa.Column(
            "attempts",
            sa.Integer(),
            server_default=sa.text("0"),
            nullable=False,
            comment="POSTs so far",
        ),
        sa.Column(
            "next_attempt_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
            comment="not claimed again before this: the lease of the process sending it",
        ),
        sa.Column("last_error", sa.Text(), nullable=True, comment="why the last attempt failed"),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'delivered', 'failed')",
            name=op.f("ck_alert_delivery_status_known"),
        ),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_alert_delivery_attempts_nonnegative")),
        sa.ForeignKeyConstraint(
            ["webhook_id"],
            ["alert_webhook.id"],
            name=op.f("fk_alert_delivery_webhook_id_alert_webhook"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("alert_id", "webhook_id", name=op.f("pk_alert_delivery")),
    )
    op.create_index("ix_alert_delivery_webhook_id", "alert_delivery", ["webhook_id"])
    op.create_index(
        "ix_alert_delivery_pending",
        "alert_delivery",
        ["webhook_id", "alert_id"],
        postgresql_where=sa.text("status = 'pending'"),
    )

    op.execute(JSON_NUMBER)
    op.execute(RAISE_ALERT)
    # Row triggers whose WHEN the executor evaluates itself: a row whose classification
    # stays costs no function call (bench/alerts.py; see the module docstring).
    op.execute(
        "CREATE TRIGGER change_estimate_alert_insert AFTER INSERT ON change_estimate"
        " FOR EACH ROW WHEN (NEW.changed) EXECUTE FUNCTION revisit_raise_change_alert()"
    )
    op.execute(
        "CREATE TRIGGER change_estimate_alert_update AFTER UPDATE OF changed ON change_estimate"
        " FOR EACH ROW WHEN (OLD.changed IS DISTINCT FROM NEW.changed)"
        " EXECUTE FUNCTION revisit_raise_change_alert()"
    )
    op.execute(DROP_DELIVERIES)
    op.execute(
        "CREATE TRIGGER change_alert_drop_deliveries AFTER DELETE ON change_alert"
        " REFERENCING OLD TABLE AS gone"
        " FOR EACH STATEMENT EXECUTE FUNCTION revisit_drop_alert_deliveries()"
    )
    op.execute(V_CHANGE_ALERT)
    op.execute(f"GRANT SELECT ON v_change_alert TO {READER}")


def downgrade() -> None:
    op.execute("DROP VIEW v_change_alert")
    op.execute("DROP TRIGGER change_alert_drop_deliveries ON change_alert")
    op.execute("DROP FUNCTION revisit_drop_alert_deliveries()")
    op.execute("DROP TRIGGER change_estimate_alert_update ON change_estimate")
    op.execute("DROP TRIGGER change_estimate_alert_insert ON change_estimate")
    op.execute("DROP FUNCTION revisit_raise_change_alert()")
    op.execute("DROP FUNCTION revisit_json_number(double precision)")
    op.drop_index("ix_alert_delivery_pending", table_name="alert_delivery")
    op.drop_index("ix_alert_delivery_webhook_id", table_name="alert_delivery")
    op.drop_table("alert_delivery")
    op.drop_table("alert_webhook")
    op.drop_index("ix_change_alert_aoi_ids", table_name="change_alert")
    op.drop_index("ix_change_alert_created_at", table_name="change_alert")
    op.drop_index("ix_change_alert_location_id_created_at", table_name="change_alert")
    op.drop_table("change_alert")
