"""The SQL interface: every query docs/sql.md documents runs as written, as revisit_reader."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from revisit.db.embedded import EmbeddedPostgres
from revisit.db.models import READER_ROLE
from revisit.db.queries import changed_locations
from revisit.db.roles import RoleError, grant_reader
from tests.conftest import REPO

SECTION = re.compile(r"^## Asking SQL questions$(.*?)^## ", re.MULTILINE | re.DOTALL)
SQL_BLOCK = re.compile(r"```sql\n(.*?)```", re.DOTALL)


def documented_queries() -> list[str]:
    """The SQL blocks of docs/sql.md's 'Asking SQL questions' section."""
    section = SECTION.search((REPO / "docs" / "sql.md").read_text())
    assert section is not None, "docs/sql.md has no 'Asking SQL questions' section"
    return [q.strip() for q in SQL_BLOCK.findall(section.group(1))]


def seed(conn: sa.Connection) -> None:
    """Locations in and around Paris with estimates, history, an AOI and a user's table."""
    conn.execute(
        sa.text(
            "INSERT INTO aoi (name, geom) VALUES"
            " ('paris', ST_Multi(ST_MakeEnvelope(2.25, 48.81, 2.42, 48.90, 4326)))"
        )
    )
    conn.execute(
        sa.text(
            """
            INSERT INTO location (geom, origin)
            SELECT ST_SetSRID(ST_MakePoint(2.30 + 0.01 * (i % 10), 48.82 + 0.01 * (i / 10)), 4326),
                   'manual'
            FROM generate_series(0, 79) AS i
            """
        )
    )
    conn.execute(
        sa.text(
            """
            INSERT INTO change_estimate (location_id, ratio_ema, ratio_last, long_dist,
                                         short_dist, updates, changed, changed_since)
            SELECT id, 1.0 + (id % 7) * 0.3, 1.1, 0.4, 0.3, 3, id % 5 = 0,
                   CASE WHEN id % 5 = 0 THEN timestamptz '2024-07-01' + id * interval '1 day' END
            FROM location
            """
        )
    )
    # Four places ingest has not reached yet: in v_change, without an estimate.
    conn.execute(
        sa.text(
            "INSERT INTO location (geom, origin) SELECT"
            " ST_SetSRID(ST_MakePoint(2.41, 48.82 + 0.01 * i), 4326), 'manual'"
            " FROM generate_series(0, 3) AS i"
        )
    )
    conn.execute(
        sa.text(
            "INSERT INTO change_event (location_id, step, ratio, ratio_ema, long_dist, short_dist)"
            " SELECT 1, s, 1.0 + s * 0.1, 1.0 + s * 0.05, 0.4, 0.3 FROM generate_series(1, 5) s"
        )
    )
    conn.execute(
        sa.text(
            "CREATE TABLE my_fields (name text, geom geometry(Polygon, 4326));"
            " INSERT INTO my_fields VALUES"
            " ('north', ST_MakeEnvelope(2.29, 48.86, 2.40, 48.90, 4326)),"
            " ('south', ST_MakeEnvelope(2.29, 48.81, 2.40, 48.85, 4326));"
            f" GRANT SELECT ON my_fields TO {READER_ROLE}"
        )
    )


@pytest.fixture
def seeded(engine: sa.Engine) -> sa.Engine:
    with engine.begin() as conn:
        seed(conn)
    return engine


def test_readme_documents_at_least_six_queries() -> None:
    assert len(documented_queries()) >= 6


@pytest.mark.parametrize("query", documented_queries(), ids=lambda q: q.splitlines()[0][:40])
def test_documented_query_runs_as_written_for_a_reader(seeded: sa.Engine, query: str) -> None:
    with seeded.connect() as conn:
        conn.execute(sa.text(f"SET ROLE {READER_ROLE}"))
        rows = conn.exec_driver_sql(query).all()
    assert rows, "the documented query found nothing in the seeded database"


def test_changed_since_follows_the_changed_flag(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO location (geom, origin) VALUES ('SRID=4326;POINT(1 1)', 'manual');"
                " INSERT INTO change_estimate (location_id, ratio_ema, ratio_last, long_dist,"
                " short_dist) SELECT id, 1, 1, 0.1, 0.1 FROM location"
            )
        )

    def since() -> datetime | None:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT changed_since FROM change_estimate")).scalar_one()

    assert since() is None
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE change_estimate SET changed = true"))
    became = since()
    assert became is not None
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE change_estimate SET ratio_ema = 2"))  # still changed
    assert since() == became
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE change_estimate SET changed = false"))
    assert since() is None


def test_changed_locations_filters(seeded: sa.Engine) -> None:
    with seeded.connect() as conn:
        everything = changed_locations(conn, bbox=(2.25, 48.81, 2.42, 48.90), changed_only=False)
        changed = changed_locations(conn, bbox=(2.25, 48.81, 2.42, 48.90))
        strong = changed_locations(conn, bbox=(2.25, 48.81, 2.42, 48.90), min_ratio=2.0)
        recent = changed_locations(
            conn, bbox=(2.25, 48.81, 2.42, 48.90), since=datetime(2024, 8, 1, tzinfo=UTC)
        )
        aoi_id = conn.execute(sa.text("SELECT id FROM aoi")).scalar_one()
        in_aoi = changed_locations(conn, aoi_id=aoi_id, limit=3)
    assert len(everything) == 80
    assert len(changed) == 16 and all(r.changed for r in changed)
    assert [r.ratio_ema for r in changed] == sorted((r.ratio_ema for r in changed), reverse=True)
    assert strong and all(r.ratio_ema >= 2.0 for r in strong) and len(strong) < len(changed)
    assert recent and all(r.changed_since >= datetime(2024, 8, 1, tzinfo=UTC) for r in recent)
    assert len(in_aoi) == 3


def test_changed_locations_pages_by_offset(seeded: sa.Engine) -> None:
    with seeded.connect() as conn:
        everything = changed_locations(conn, changed_only=False)
        pages = [
            changed_locations(conn, changed_only=False, limit=30, offset=o) for o in (0, 30, 60)
        ]
        one = changed_locations(conn, changed_only=False, location_id=everything[5].location_id)
        with pytest.raises(ValueError, match="offset must be at least 0"):
            changed_locations(conn, offset=-1)
    assert [len(p) for p in pages] == [30, 30, 20]
    assert [r.location_id for p in pages for r in p] == [r.location_id for r in everything]
    assert one == [everything[5]]


@pytest.fixture
def reader_login(engine: sa.Engine) -> Iterator[str]:
    name = "analyst_" + make_url(engine.url).database.removeprefix("t_")[:8]  # type: ignore[union-attr]
    with engine.begin() as conn:
        assert grant_reader(conn, name=name, password="correct horse") is True
    yield name
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP OWNED BY {name}; DROP ROLE {name}"))


def test_a_reader_login_needs_its_password_and_can_only_read(
    engine: sa.Engine, pg_cluster: EmbeddedPostgres, reader_login: str
) -> None:
    database = make_url(engine.url).database
    assert database is not None
    common = {"host": str(pg_cluster.socket_dir), "port": pg_cluster.port, "dbname": database}
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(user=reader_login, password="wrong", **common)
    with psycopg.connect(user=reader_login, password="correct horse", **common) as conn:
        assert conn.execute("SELECT count(*) FROM v_change").fetchone() == (0,)
        for statement in ("SELECT * FROM quarantine", "DELETE FROM change_estimate"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
            conn.rollback()
    # The stored secret is a SCRAM verifier, never the password.
    with engine.connect() as conn:
        stored = conn.execute(
            sa.text("SELECT rolpassword FROM pg_authid WHERE rolname = :n"), {"n": reader_login}
        ).scalar_one()
    assert stored.startswith("SCRAM-SHA-256$") and "correct horse" not in stored


def test_grant_reader_refuses_bad_names_and_powerful_roles(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        for name in ("Robert'); DROP TABLE location;--", "pg_monitor", "revisit", "", "a" * 64):
            with pytest.raises(RoleError):
                grant_reader(conn, name=name, password="pw")
        with pytest.raises(RoleError, match="empty"):
            grant_reader(conn, name="someone", password="")
        boss = "boss_" + str(conn.execute(sa.text("SELECT current_database()")).scalar_one())[2:]
        conn.execute(sa.text(f"CREATE ROLE {boss} CREATEDB"))
        with pytest.raises(RoleError, match="powers beyond reading"):
            grant_reader(conn, name=boss, password="pw")
        conn.execute(sa.text(f"DROP ROLE {boss}"))
