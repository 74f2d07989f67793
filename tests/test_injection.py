"""Hostile input from the command line never reaches SQL as code.

Every value the CLI passes to the database is a bound parameter or a validated
identifier: hypothesis sends hostile strings as AOI names, bbox text and source
names, and the database must be unchanged (or, where the input was acceptable,
hold exactly that input as data) and the error must be one clean line.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from revisit.cli import main
from revisit.db.models import TABLES

PAYLOADS = [
    "x'; DROP TABLE aoi; --",
    "'); DELETE FROM location; --",
    "paris' OR '1'='1",
    'a"; DROP SCHEMA public CASCADE; --',
    "0,0,1,1); DROP TABLE scene; --",
    "1e400,0,1,1",
    "nan,0,1,1",
    "$$; DROP TABLE quarantine; $$",
    "\\'; COPY location TO PROGRAM 'id'; --",
    "simulated; DROP TABLE scene",
    "../../etc/passwd",
    "\uff41\uff4f\uff49",  # full-width letters
    "a" * 5000,
]
hostile = st.one_of(
    st.sampled_from(PAYLOADS),
    st.text(alphabet=st.characters(blacklist_characters="\x00"), max_size=60),
)


@pytest.fixture(scope="module")
def cli_database(pg_cluster: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A migrated database for the module, and REVISIT_* pointing at it."""
    from tests.conftest import TEMPLATE, _create_database, _drop_database, url_of

    name = "t_injection"
    _create_database(pg_cluster, name, template=TEMPLATE)  # type: ignore[arg-type]
    url = url_of(pg_cluster, name)  # type: ignore[arg-type]
    saved = {k: v for k, v in os.environ.items() if k.startswith("REVISIT_")}
    for key in saved:
        del os.environ[key]
    os.environ.update(
        REVISIT_DATABASE_URL=url,
        REVISIT_DATA_DIR=str(tmp_path_factory.mktemp("injection") / "var"),
        REVISIT_LOG_LEVEL="ERROR",
    )
    try:
        yield url
    finally:
        for key in ("REVISIT_DATABASE_URL", "REVISIT_DATA_DIR", "REVISIT_LOG_LEVEL"):
            os.environ.pop(key, None)
        os.environ.update(saved)
        _drop_database(pg_cluster, name)  # type: ignore[arg-type]


def fingerprint(engine: sa.Engine) -> dict[str, object]:
    with engine.connect() as conn:
        state: dict[str, object] = {
            t: conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one() for t in TABLES
        }
        state["relations"] = conn.execute(
            sa.text("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE n.nspname = 'public'")
        ).scalar_one()  # fmt: skip
        state["roles"] = conn.execute(sa.text("SELECT count(*) FROM pg_roles")).scalar_one()
        state["aois"] = conn.execute(
            sa.text("SELECT array_agg(name ORDER BY name) FROM aoi")
        ).scalar_one()
    return state


def run(*argv: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, err.getvalue()


def clean(code: int, err: str) -> None:
    assert code in (1, 2), err
    assert "Traceback" not in err
    assert err.strip(), "a refusal says why"


@pytest.fixture(scope="module")
def engine_(cli_database: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(cli_database, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO aoi (name, geom)"
                " VALUES ('keep', ST_Multi(ST_MakeEnvelope(0, 0, 1, 1, 4326)))"
            )
        )
    yield engine
    engine.dispose()


SLOW_OK = settings(
    max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None
)


@SLOW_OK
@given(name=hostile)
def test_hostile_aoi_names(engine_: sa.Engine, name: str) -> None:
    before = fingerprint(engine_)
    code, err = run("aoi", "add", name, "--bbox", "0,0,1,1")
    if code == 0:
        # An acceptable name is stored as data, exactly as given, and nothing else moved.
        with engine_.begin() as conn:
            stored = conn.execute(
                sa.text("SELECT name FROM aoi WHERE name = :n"), {"n": name}
            ).all()
            assert stored == [(name,)]
            conn.execute(sa.text("DELETE FROM aoi WHERE name = :n"), {"n": name})
    else:
        clean(code, err)
    assert fingerprint(engine_) == before
    code, err = run("query", "changed", "--aoi", name)
    if code != 0:
        clean(code, err)
    assert fingerprint(engine_) == before


@SLOW_OK
@given(text=hostile)
def test_hostile_bbox_text(engine_: sa.Engine, text: str) -> None:
    before = fingerprint(engine_)
    code, err = run("aoi", "add", "boxed", "--bbox", text)
    if code == 0:
        with engine_.begin() as conn:
            conn.execute(sa.text("DELETE FROM aoi WHERE name = 'boxed'"))
    else:
        clean(code, err)
    code, err = run("query", "changed", "--bbox", text, "--format", "csv")
    if code != 0:
        clean(code, err)
    assert fingerprint(engine_) == before


@SLOW_OK
@given(source=hostile)
def test_hostile_source_names(engine_: sa.Engine, source: str) -> None:
    before = fingerprint(engine_)
    if source in ("simulated", "local", "sentinelhub"):
        return
    code, err = run("ingest", "--source", source, "--aoi", "keep")
    clean(code, err)
    assert fingerprint(engine_) == before


@pytest.mark.parametrize("name", ["\ud800", "a\udfffb"])
def test_names_that_are_not_utf8_are_refused_cleanly(engine_: sa.Engine, name: str) -> None:
    # Found by test_hostile_aoi_names: a lone surrogate used to escape as a
    # UnicodeEncodeError from the database driver.
    before = fingerprint(engine_)
    for argv in (
        ("aoi", "add", name, "--bbox", "0,0,1,1"),
        ("query", "changed", "--aoi", name),
        ("export", "changemap", "--aoi", name, "--out", os.devnull),
    ):
        code, err = run(*argv)
        assert code != 0
        clean(code, err)
    assert fingerprint(engine_) == before
