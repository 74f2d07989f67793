"""Learner: no change_event is written twice for the same step of a location.

The learner writes its events in batches by COPY; a batch replayed after a
crash (or by a second learner) then fails instead of doubling the history.
The constraint's index also serves "the events of a location, by step".

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 06:10:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_unique_constraint(
        op.f("uq_change_event_location_id_step"), "change_event", ["location_id", "step"]
    )


def downgrade() -> None:
    op.drop_constraint(op.f("uq_change_event_location_id_step"), "change_event", type_="unique")
