"""`revisit aoi`, `revisit sample` and `revisit ingest`, run as a user runs them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import sqlalchemy as sa

from tests.test_cli import revisit


def _env(cli_env: dict[str, str], database_url: str, **extra: str) -> dict[str, str]:
    return {
        **cli_env,
        "REVISIT_DATABASE_URL": database_url,
        "REVISIT_INGEST__CHIP_SIZE": "16",
        **extra,
    }


def test_aoi_grid_sample_and_simulated_ingest(
    cli_env: dict[str, str], database_url: str, engine: sa.Engine
) -> None:
    env = _env(cli_env, database_url)
    added = revisit("aoi", "add", "lake", "--bbox", "8.50,47.30,8.53,47.32", env=env)
    assert added.returncode == 0, added.stderr
    assert "AOI lake" in added.stdout
    grid = revisit("sample", "--aoi", "lake", "--grid", "--spacing", "640", env=env)
    assert grid.returncode == 0, grid.stderr
    again = revisit("sample", "--aoi", "lake", "--grid", "--spacing", "640", env=env)
    assert "added 0 locations" in again.stdout  # the same grid twice adds nothing
    with engine.connect() as conn:
        n = conn.execute(
            sa.text("SELECT count(*) FROM location WHERE origin = 'aoi-grid'")
        ).scalar_one()
    assert 6 <= n <= 20  # ~2.3 km x 2.2 km at 640 m
    listed = revisit("aoi", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if "lake" in line)
    assert row.split()[-1] == str(n)  # the location count, in the last column

    run = revisit(
        "ingest", "--source", "simulated", "--aoi", "lake", "--since", "2023-06-01",
        "--until", "2023-06-20", env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    with engine.connect() as conn:
        chips = conn.execute(sa.text("SELECT count(*) FROM observation")).scalar_one()
        scenes = conn.execute(sa.text("SELECT count(*) FROM scene")).scalar_one()
    assert scenes >= 3 and chips > 0
    rerun = revisit(
        "ingest", "--source", "simulated", "--aoi", "lake", "--since", "2023-06-01",
        "--until", "2023-06-20", env=env,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM observation")).scalar_one() == chips


def test_sample_near_cities(cli_env: dict[str, str], database_url: str, engine: sa.Engine) -> None:
    result = revisit("sample", "--n", "25", "--seed", "3", env=_env(cli_env, database_url))
    assert result.returncode == 0, result.stderr
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT count(*), count(DISTINCT epsg) FROM location"
                " WHERE origin = 'urban-gaussian'"
            )
        ).one()
    assert rows[0] == 25 and rows[1] >= 1


def test_hostile_aoi_input_is_refused_cleanly(
    cli_env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    env = _env(cli_env, database_url)
    bad_name = revisit("aoi", "add", "x'; DROP TABLE aoi; --", "--bbox", "0,0,1,1", env=env)
    assert bad_name.returncode == 2 and "Traceback" not in bad_name.stderr
    bad_box = revisit("aoi", "add", "ok", "--bbox", "0,0,1; DROP TABLE aoi", env=env)
    assert bad_box.returncode == 2 and "Traceback" not in bad_box.stderr
    points = tmp_path / "points.geojson"
    points.write_text(json.dumps({"type": "Point", "coordinates": [1, 2]}))
    bad_file = revisit("aoi", "add", "ok", "--geojson", str(points), env=env)
    assert bad_file.returncode == 2 and "Traceback" not in bad_file.stderr
    missing = revisit("ingest", "--source", "simulated", "--aoi", "nowhere", env=env)
    assert missing.returncode == 1 and "no AOI named 'nowhere'" in missing.stderr


def test_ingest_without_locations_says_what_to_do(
    cli_env: dict[str, str], database_url: str
) -> None:
    result = revisit("ingest", "--source", "simulated", env=_env(cli_env, database_url))
    assert result.returncode == 1
    assert "revisit sample" in result.stderr


def test_local_source_needs_a_directory(cli_env: dict[str, str], database_url: str) -> None:
    result = revisit("ingest", "--source", "local", env=_env(cli_env, database_url))
    assert result.returncode == 2
    assert "--path DIR" in result.stderr


def test_chips_verify_and_gc(cli_env: dict[str, str], database_url: str) -> None:
    env = _env(cli_env, database_url)
    assert (
        revisit("aoi", "add", "dot", "--bbox", "8.500,47.300,8.506,47.304", env=env).returncode == 0
    )
    assert revisit("sample", "--aoi", "dot", "--grid", "--spacing", "320", env=env).returncode == 0
    ingest = revisit(
        "ingest", "--aoi", "dot", "--since", "2023-06-01", "--until", "2023-06-12", env=env
    )
    assert ingest.returncode == 0, ingest.stderr
    ok = revisit("chips", "verify", env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ": 0 missing or corrupt" in ok.stdout

    chips = Path(env["REVISIT_DATA_DIR"]) / "chips"
    victim = next(chips.glob("??/??/*.npy"))
    victim.write_bytes(victim.read_bytes()[:-10])
    orphan = chips / "00" / "00" / ("0" * 64 + ".npy")
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"no row names me")
    broken = revisit("chips", "verify", env=env)
    assert broken.returncode == 1
    assert ": 1 missing or corrupt" in broken.stdout and "fails its hash" in broken.stdout

    gc = revisit("chips", "gc", "--min-age", "1h", env=env)
    assert gc.returncode == 0, gc.stderr
    assert "removed 0 unreferenced chips" in gc.stdout  # young files stay
    os.utime(orphan, (0, 0))
    gc = revisit("chips", "gc", "--min-age", "1h", env=env)
    assert "removed 1 unreferenced chips" in gc.stdout
    assert not orphan.exists() and victim.exists()
