"""revisit_reader reads the views and nothing else."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from revisit.db.migrate import upgrade
from revisit.db.models import READER_ROLE, TABLES, VIEWS


@pytest.fixture
def reader(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A connection acting as revisit_reader, on a database with one estimate in it."""
    with engine.begin() as conn:
        location = conn.execute(
            sa.text(
                "INSERT INTO location (geom, origin) VALUES"
                " ('SRID=4326;POINT(2.35 48.85)', 'manual') RETURNING id"
            )
        ).scalar_one()
        conn.execute(
            sa.text(
                "INSERT INTO change_estimate (location_id, ratio_ema, ratio_last, long_dist,"
                " short_dist) VALUES (:l, 1.2, 1.4, 0.3, 0.2)"
            ),
            {"l": location},
        )
    with engine.connect() as conn:
        conn.execute(sa.text(f"SET ROLE {READER_ROLE}"))
        yield conn
        conn.rollback()


def _denied(conn: sa.Connection, statement: str, reason: str = "permission denied") -> None:
    savepoint = conn.begin_nested()
    with pytest.raises(DBAPIError) as info:
        conn.execute(sa.text(statement))
    savepoint.rollback()
    assert reason in str(info.value.orig)


def test_reader_reads_the_views(reader: sa.Connection) -> None:
    rows = reader.execute(sa.text("SELECT location_id, ratio_ema, ST_X(geom) FROM v_change")).all()
    assert [(r[1], r[2]) for r in rows] == [(1.2, 2.35)]
    assert reader.execute(sa.text("SELECT count(*) FROM v_change_history")).scalar_one() == 0


@pytest.mark.parametrize("table", TABLES)
def test_reader_cannot_read_base_tables(reader: sa.Connection, table: str) -> None:
    _denied(reader, f"SELECT * FROM {table} LIMIT 1")


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO location (geom, origin) VALUES ('SRID=4326;POINT(0 0)', 'manual')",
        "UPDATE change_estimate SET ratio_ema = 0",
        "DELETE FROM change_estimate",
        "INSERT INTO quarantine (source, ref, reason) VALUES ('x', 'y', 'z')",
        "TRUNCATE scene",
        "CREATE TABLE mine (id int)",
        "CREATE VIEW mine AS SELECT 1",
        "CREATE FUNCTION mine() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "SELECT * FROM alembic_version",
        "SELECT * FROM pg_authid",
        "SELECT payload FROM quarantine",
        "SELECT error FROM scene",
    ],
)
def test_reader_cannot_write_or_create(reader: sa.Connection, statement: str) -> None:
    _denied(reader, statement)


@pytest.mark.parametrize("statement", ["UPDATE v_change SET ratio_ema = 0", "DELETE FROM v_change"])
def test_nobody_writes_through_the_views(reader: sa.Connection, statement: str) -> None:
    _denied(reader, statement, reason="cannot")


def test_reader_role_cannot_log_in_and_has_only_view_grants(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        can_login = conn.execute(
            sa.text("SELECT rolcanlogin FROM pg_roles WHERE rolname = :r"), {"r": READER_ROLE}
        ).scalar_one()
        granted = conn.execute(
            sa.text(
                "SELECT DISTINCT table_name FROM information_schema.role_table_grants"
                " WHERE grantee = :r"
            ),
            {"r": READER_ROLE},
        ).scalars()
        assert can_login is False
        assert set(granted) == set(VIEWS)


def test_reader_cannot_create_temporary_tables(fresh_database_url: str) -> None:
    """Database privileges are not copied from a template: migrate a database of its own."""
    engine = sa.create_engine(fresh_database_url, poolclass=sa.pool.NullPool)
    upgrade(engine)
    with engine.connect() as conn:
        conn.execute(sa.text("CREATE TEMP TABLE mine (id int)"))  # revisit itself still can
        conn.execute(sa.text(f"SET ROLE {READER_ROLE}"))
        _denied(conn, "CREATE TEMP TABLE scratch (id int)")
        conn.rollback()
    engine.dispose()
