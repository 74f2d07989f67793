"""What the database holds, for ``revisit status``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from revisit.db.migrate import current_revision, head_revision
from revisit.db.models import TABLES

# Above this many rows (by the planner's estimate) a table is not counted exactly:
# count(*) over tens of millions of observations takes seconds.
EXACT_COUNT_LIMIT = 1_000_000


@dataclass(frozen=True)
class TableCount:
    table: str
    rows: int
    exact: bool


@dataclass(frozen=True)
class LatestScene:
    source: str
    product_id: str
    acquired_at: datetime
    status: str


@dataclass(frozen=True)
class LatestModel:
    id: int
    method: str
    step: int
    created_at: datetime


@dataclass(frozen=True)
class DatabaseStatus:
    revision: str | None
    head: str
    tables: tuple[TableCount, ...]
    latest_scene: LatestScene | None
    latest_model: LatestModel | None

    @property
    def migrated(self) -> bool:
        return self.revision == self.head


def collect_status(conn: Connection) -> DatabaseStatus:
    """Row counts of every table, the newest scene and model version, and the schema revision.

    Tables the schema does not have yet (an unmigrated database) are left out.
    """
    revision = current_revision(conn)
    existing = set(sa.inspect(conn).get_table_names())
    counts = []
    for table in TABLES:
        if table not in existing:
            continue
        estimate = conn.execute(
            sa.text("SELECT reltuples::bigint FROM pg_class WHERE oid = CAST(:t AS regclass)"),
            {"t": table},
        ).scalar_one()
        if estimate > EXACT_COUNT_LIMIT:
            counts.append(TableCount(table, int(estimate), exact=False))
        else:
            rows = conn.execute(
                sa.select(sa.func.count()).select_from(sa.table(table))
            ).scalar_one()
            counts.append(TableCount(table, int(rows), exact=True))
    scene = model = None
    if "scene" in existing:
        row = conn.execute(
            sa.text(
                "SELECT source, product_id, acquired_at, status FROM scene"
                " ORDER BY acquired_at DESC, id DESC LIMIT 1"
            )
        ).first()
        scene = LatestScene(*row) if row else None
    if "model_version" in existing:
        row = conn.execute(
            sa.text(
                "SELECT id, method, step, created_at FROM model_version"
                " ORDER BY created_at DESC, id DESC LIMIT 1"
            )
        ).first()
        model = LatestModel(*row) if row else None
    return DatabaseStatus(
        revision=revision,
        head=head_revision(),
        tables=tuple(counts),
        latest_scene=scene,
        latest_model=model,
    )
