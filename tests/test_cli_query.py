"""`revisit query changed` and `revisit db grant-reader`, run as a user runs them."""

from __future__ import annotations

import csv
import io
import json
import subprocess

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from revisit.db.embedded import EmbeddedPostgres
from tests.db.test_queries import seed
from tests.test_cli import REVISIT, revisit


def test_query_changed_in_three_formats(
    cli_env: dict[str, str], database_url: str, engine: sa.Engine
) -> None:
    with engine.begin() as conn:
        seed(conn)
    env = {**cli_env, "REVISIT_DATABASE_URL": database_url}
    table = revisit("query", "changed", "--bbox", "2.25,48.81,2.42,48.90", env=env)
    assert table.returncode == 0, table.stderr
    assert "16 locations" in table.stdout

    geojson = revisit(
        "query", "changed", "--aoi", "paris", "--min-ratio", "2", "--format", "geojson", env=env
    )
    assert geojson.returncode == 0, geojson.stderr
    collection = json.loads(geojson.stdout)
    assert collection["type"] == "FeatureCollection" and "crs" not in collection
    ratios = [f["properties"]["ratio_ema"] for f in collection["features"]]
    assert ratios and all(r >= 2 for r in ratios) and ratios == sorted(ratios, reverse=True)
    lon, lat = collection["features"][0]["geometry"]["coordinates"]
    assert 2.25 <= lon <= 2.42 and 48.81 <= lat <= 48.90  # lon/lat order (RFC 7946)

    as_csv = revisit(
        "query", "changed", "--bbox", "2.25,48.81,2.42,48.90", "--since", "2024-08-01",
        "--all", "--format", "csv", env=env,
    )  # fmt: skip
    assert as_csv.returncode == 0, as_csv.stderr
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert rows and all(r["changed_since"] >= "2024-08-01" for r in rows)

    wrong = revisit("query", "changed", env=env)
    assert wrong.returncode == 2 and "exactly one of --bbox or --aoi" in wrong.stderr


def test_grant_reader_reads_the_password_from_stdin(
    cli_env: dict[str, str], database_url: str, pg_cluster: EmbeddedPostgres
) -> None:
    env = {**cli_env, "REVISIT_DATABASE_URL": database_url}
    database = make_url(database_url).database
    assert database is not None
    name = f"viewer_{database[2:10]}"
    result = subprocess.run(
        [*REVISIT, "db", "grant-reader", name],
        input="s3cret pass\n",
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"created login {name}" in result.stdout
    assert "s3cret" not in result.stdout + result.stderr
    with psycopg.connect(
        host=str(pg_cluster.socket_dir), port=pg_cluster.port, dbname=database,
        user=name, password="s3cret pass",
    ) as conn:  # fmt: skip
        assert conn.execute("SELECT count(*) FROM v_change").fetchone() == (0,)
    bad = revisit("db", "grant-reader", "Robert'); DROP TABLE aoi;--", env=env)
    assert bad.returncode == 1 and "bad role name" in bad.stderr
    with psycopg.connect(pg_cluster.conninfo(database), autocommit=True) as conn:
        conn.execute(f"DROP ROLE {name}")
