"""Daemon: the last run of each scheduled job (job_run), and APScheduler's job
store (scheduler_job), created here so that the scheduler never creates tables.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 14:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "job_run",
        sa.Column("job_id", sa.Text(), nullable=False),
        sa.Column("last_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_outcome", sa.Text(), nullable=True, comment="ok, skipped or failed"),
        sa.Column("last_duration_s", sa.Double(), nullable=True),
        sa.Column(
            "last_detail",
            sa.Text(),
            nullable=True,
            comment="one line: what the run did, or why it failed",
        ),
        sa.Column("next_run_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("runs", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("failures", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("runner", sa.Text(), nullable=True, comment="host:pid of the daemon that ran it"),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "last_outcome IN ('ok', 'skipped', 'failed')", name=op.f("ck_job_run_outcome_known")
        ),
        sa.CheckConstraint(
            "runs >= 0 AND failures >= 0", name=op.f("ck_job_run_counts_nonnegative")
        ),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_job_run")),
    )
    op.create_table(
        "scheduler_job",
        sa.Column("id", sa.String(length=191), nullable=False),
        sa.Column("next_run_time", sa.Double(), nullable=True),
        sa.Column("job_state", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scheduler_job")),
    )
    op.create_index(
        "ix_scheduler_job_next_run_time", "scheduler_job", ["next_run_time"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_scheduler_job_next_run_time", table_name="scheduler_job")
    op.drop_table("scheduler_job")
    op.drop_table("job_run")
