"""Migrations: up, down, up; models and migrations agree; autogenerate leaves PostGIS be."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from geoalchemy2 import alembic_helpers

from revisit.db.migrate import current_revision, downgrade, head_revision, upgrade
from revisit.db.models import READER_ROLE, TABLES, VIEWS, Base


def _relations(conn: sa.Connection) -> set[str]:
    rows = conn.execute(
        sa.text(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'v')"
        )
    )
    return {name for (name,) in rows}


def test_upgrade_downgrade_upgrade(fresh_database_url: str) -> None:
    engine = sa.create_engine(fresh_database_url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        assert current_revision(conn) is None
        postgis_only = _relations(conn)

    upgrade(engine)
    with engine.connect() as conn:
        assert current_revision(conn) == head_revision()
        assert set(TABLES) | set(VIEWS) <= _relations(conn)

    downgrade(engine, "base")
    with engine.connect() as conn:
        assert current_revision(conn) is None
        # Everything revisit made is gone; PostGIS's own tables stay.
        assert _relations(conn) - {"alembic_version"} == postgis_only

    upgrade(engine)
    with engine.connect() as conn:
        assert current_revision(conn) == head_revision()
        assert set(TABLES) | set(VIEWS) <= _relations(conn)
        role = conn.execute(
            sa.text("SELECT rolcanlogin FROM pg_roles WHERE rolname = :r"), {"r": READER_ROLE}
        ).scalar_one()
        assert role is False
    engine.dispose()


def test_models_match_migrations(engine: sa.Engine) -> None:
    """Autogenerate against a migrated database finds nothing to do, PostGIS included."""
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn,
            opts={
                "include_object": alembic_helpers.include_object,
                "compare_type": True,
                "target_metadata": Base.metadata,
            },
        )
        diff = compare_metadata(context, Base.metadata)
    assert diff == []


def test_every_geometry_has_a_gist_index(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        geometry_columns = set(
            conn.execute(
                sa.text(
                    "SELECT f_table_name, f_geometry_column FROM geometry_columns"
                    " WHERE f_table_schema = 'public' AND f_table_name = ANY(:tables)"
                ),
                {"tables": list(TABLES)},
            ).all()
        )
        indexed = set(
            conn.execute(
                sa.text(
                    "SELECT t.relname, a.attname FROM pg_index x"
                    " JOIN pg_class i ON i.oid = x.indexrelid"
                    " JOIN pg_class t ON t.oid = x.indrelid"
                    " JOIN pg_am am ON am.oid = i.relam"
                    " JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = x.indkey[0]"
                    " WHERE am.amname = 'gist'"
                )
            ).all()
        )
    assert len(geometry_columns) == 5
    assert geometry_columns <= indexed


def test_upgrade_is_idempotent(engine: sa.Engine) -> None:
    upgrade(engine)
    upgrade(engine)
    with engine.connect() as conn:
        assert current_revision(conn) == head_revision()
