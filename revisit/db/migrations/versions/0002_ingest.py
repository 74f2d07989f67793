"""Ingest: quarantine rows per product or per chip (with a detail line, one row
per rejected thing), and the simulated world's ground truth in sim_truth,
which revisit_reader cannot read.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 04:09:41.241469
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sim_truth",
        sa.Column("location_id", sa.BigInteger(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=True, comment="NULL: the location never changes"),
        sa.Column("event_date", sa.Date(), nullable=True),
        sa.Column(
            "changed_fraction",
            sa.Double(),
            nullable=False,
            comment="share of the chip that changes",
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "kind IN ('construction', 'clearing', 'flooding', 'reservoir')",
            name=op.f("ck_sim_truth_kind_known"),
        ),
        sa.CheckConstraint(
            "(kind IS NULL) = (event_date IS NULL)", name=op.f("ck_sim_truth_event_date_with_kind")
        ),
        sa.CheckConstraint(
            "changed_fraction >= 0 AND changed_fraction <= 1",
            name=op.f("ck_sim_truth_changed_fraction_fraction"),
        ),
        sa.ForeignKeyConstraint(
            ["location_id"],
            ["location.id"],
            name=op.f("fk_sim_truth_location_id_location"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("location_id", name=op.f("pk_sim_truth")),
    )
    op.add_column(
        "quarantine",
        sa.Column(
            "location_id",
            sa.BigInteger(),
            nullable=True,
            comment="the location whose chip was rejected; NULL for a whole product",
        ),
    )
    op.add_column(
        "quarantine", sa.Column("detail", sa.Text(), nullable=True, comment="one line for a person")
    )
    op.alter_column(
        "quarantine",
        "ref",
        existing_type=sa.TEXT(),
        comment="what was rejected: a product id or a path",
        existing_comment="what was rejected",
        existing_nullable=False,
    )
    op.alter_column(
        "quarantine",
        "reason",
        existing_type=sa.TEXT(),
        comment="a short code",
        existing_nullable=False,
    )
    op.create_index("ix_quarantine_reason", "quarantine", ["reason"], unique=False)
    op.create_unique_constraint(
        op.f("uq_quarantine_source_ref_location_id"),
        "quarantine",
        ["source", "ref", "location_id"],
        postgresql_nulls_not_distinct=True,
    )
    op.create_foreign_key(
        op.f("fk_quarantine_location_id_location"),
        "quarantine",
        "location",
        ["location_id"],
        ["id"],
        ondelete="CASCADE",
    )


def downgrade() -> None:
    op.drop_constraint(op.f("fk_quarantine_location_id_location"), "quarantine", type_="foreignkey")
    op.drop_constraint(op.f("uq_quarantine_source_ref_location_id"), "quarantine", type_="unique")
    op.drop_index("ix_quarantine_reason", table_name="quarantine")
    op.alter_column(
        "quarantine",
        "reason",
        existing_type=sa.TEXT(),
        comment=None,
        existing_comment="a short code",
        existing_nullable=False,
    )
    op.alter_column(
        "quarantine",
        "ref",
        existing_type=sa.TEXT(),
        comment="what was rejected",
        existing_comment="what was rejected: a product id or a path",
        existing_nullable=False,
    )
    op.drop_column("quarantine", "detail")
    op.drop_column("quarantine", "location_id")
    op.drop_table("sim_truth")
