"""Ingest workers: ingest_task, the work table that `revisit ingest --worker`
processes claim scenes from (FOR UPDATE SKIP LOCKED, under a lease), one row per
scene and cursor (source, AOI), which revisit_reader cannot read.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 19:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ingest_task",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column(
            "aoi_id",
            sa.BigInteger(),
            nullable=True,
            comment="the cursor's AOI; NULL: every location",
        ),
        sa.Column("product_id", sa.Text(), nullable=False),
        sa.Column(
            "acquired_at",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="the scene's place in cursor order",
        ),
        sa.Column(
            "scene",
            postgresql.JSONB(astext_type=sa.Text()),
            nullable=False,
            comment="the scene reference, enough to read the scene again",
        ),
        sa.Column("state", sa.Text(), server_default="queued", nullable=False),
        sa.Column(
            "attempts",
            sa.Integer(),
            server_default=sa.text("0"),
            nullable=False,
            comment="claims so far",
        ),
        sa.Column(
            "lease_owner",
            sa.Text(),
            nullable=True,
            comment="host:pid:nonce of the worker holding the lease",
        ),
        sa.Column(
            "lease_until",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="the lease ends here (database clock) unless renewed",
        ),
        sa.Column("last_error", sa.Text(), nullable=True, comment="why the last attempt failed"),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "state IN ('queued', 'claimed', 'done', 'failed')",
            name=op.f("ck_ingest_task_state_known"),
        ),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_ingest_task_attempts_nonnegative")),
        sa.CheckConstraint(
            "state <> 'claimed' OR (lease_owner IS NOT NULL AND lease_until IS NOT NULL)",
            name=op.f("ck_ingest_task_claimed_has_lease"),
        ),
        sa.ForeignKeyConstraint(
            ["aoi_id"], ["aoi.id"], name=op.f("fk_ingest_task_aoi_id_aoi"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ingest_task")),
        sa.UniqueConstraint(
            "source",
            "aoi_id",
            "product_id",
            name=op.f("uq_ingest_task_source_aoi_id_product_id"),
            postgresql_nulls_not_distinct=True,
        ),
    )
    op.create_index(
        "ix_ingest_task_unfinished",
        "ingest_task",
        ["acquired_at", "product_id"],
        postgresql_where=sa.text("state IN ('queued', 'claimed')"),
    )
    op.create_index(
        "ix_ingest_task_source_aoi_id_acquired_at",
        "ingest_task",
        ["source", "aoi_id", "acquired_at"],
    )


def downgrade() -> None:
    op.drop_index("ix_ingest_task_source_aoi_id_acquired_at", table_name="ingest_task")
    op.drop_index("ix_ingest_task_unfinished", table_name="ingest_task")
    op.drop_table("ingest_task")
