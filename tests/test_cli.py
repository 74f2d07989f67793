"""The command line, run as a user runs it: in a subprocess, against a real PostGIS."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer

from revisit.cli._common import parse_duration
from revisit.db.embedded import EmbeddedPostgres
from tests.conftest import make_tempdir

REVISIT = [sys.executable, "-m", "revisit.cli"]


def revisit(
    *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*REVISIT, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def with_password(url: str, password: str = "hunter2") -> str:
    """The test cluster trusts local connections, so any password gets in."""
    return url.replace("revisit@", f"revisit:{password}@")


@pytest.fixture
def embedded_env(cli_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """An environment whose embedded database lives in a fresh data directory."""
    root = make_tempdir("revisit-cli-")
    env = {**cli_env, "REVISIT_DATA_DIR": str(root / "var")}
    yield env
    cluster = EmbeddedPostgres(root / "var")
    if cluster.is_running():
        cluster.stop()
    subprocess.run(["rm", "-rf", str(root)], check=False)


def test_bad_setting_is_one_line_without_traceback(cli_env: dict[str, str]) -> None:
    result = revisit("status", env={**cli_env, "REVISIT_POSTGRES__PORT": "not-a-port"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "postgres.port" in lines[0] and "REVISIT_POSTGRES__PORT" in lines[0]
    assert "Traceback" not in result.stderr


def test_bad_config_file_is_one_line(cli_env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "revisit.toml"
    config.write_text("[postgres]\nstart_timeout_s = -1\n")
    result = revisit("--config", str(config), "status", env=cli_env)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "postgres.start_timeout_s" in result.stderr


def test_status_lists_tables_and_hides_the_password(
    cli_env: dict[str, str], database_url: str
) -> None:
    env = {**cli_env, "REVISIT_DATABASE_URL": with_password(database_url)}
    result = revisit("status", env=env)
    assert result.returncode == 0, result.stderr
    for table in ("aoi", "location", "scene", "observation", "change_estimate", "quarantine"):
        assert table in result.stdout
    assert "(head)" in result.stdout
    assert "hunter2" not in result.stdout + result.stderr
    assert "***" in result.stdout


def test_db_url_masks_an_external_password(cli_env: dict[str, str], database_url: str) -> None:
    env = {**cli_env, "REVISIT_DATABASE_URL": with_password(database_url)}
    result = revisit("db", "url", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("postgresql://revisit:***@")
    assert "hunter2" not in result.stdout + result.stderr


def test_db_upgrade_current_downgrade(cli_env: dict[str, str], fresh_database_url: str) -> None:
    env = {**cli_env, "REVISIT_DATABASE_URL": fresh_database_url}
    assert "base (empty)" in revisit("db", "current", env=env).stdout
    up = revisit("db", "upgrade", env=env)
    assert up.returncode == 0, up.stderr
    assert "(head)" in revisit("db", "current", env=env).stdout
    down = revisit("db", "downgrade", "base", env=env)
    assert down.returncode == 0, down.stderr
    assert "base (empty)" in down.stdout


def test_db_start_and_stop_refuse_an_external_database(
    cli_env: dict[str, str], database_url: str
) -> None:
    result = revisit("db", "stop", env={**cli_env, "REVISIT_DATABASE_URL": database_url})
    assert result.returncode == 1
    assert "does not start or stop that server" in result.stderr


def test_psql_reaches_the_embedded_database(embedded_env: dict[str, str]) -> None:
    assert revisit("db", "upgrade", env=embedded_env).returncode == 0
    url = revisit("db", "url", env=embedded_env)
    assert url.returncode == 0, url.stderr
    psql = subprocess.run(
        ["psql", url.stdout.strip(), "-Atc", "select count(*) from v_change"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert psql.returncode == 0, psql.stderr
    assert psql.stdout.strip() == "0"
    stop = revisit("db", "stop", env=embedded_env)
    assert stop.returncode == 0, stop.stderr
    assert not EmbeddedPostgres(Path(embedded_env["REVISIT_DATA_DIR"])).is_running()


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_run_serves_until_signalled_and_stops_cleanly(
    embedded_env: dict[str, str], stop_signal: signal.Signals
) -> None:
    process = subprocess.Popen(
        [*REVISIT, "run"],
        env=embedded_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    deadline = time.monotonic() + 120
    seen = []
    for line in process.stderr:
        seen.append(line)
        if "revisit is running" in line or time.monotonic() > deadline:
            break
    assert any("revisit is running" in line for line in seen), "".join(seen)
    cluster = EmbeddedPostgres(Path(embedded_env["REVISIT_DATA_DIR"]))
    assert cluster.is_running()
    process.send_signal(stop_signal)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "stopped cleanly" in err
    assert "schema" in out and "(head)" in out  # the status printed at start
    assert not cluster.is_running()  # the service was its last user


def test_bad_arguments_are_one_clean_line(cli_env: dict[str, str]) -> None:
    for args in (["run", "--duration", "soon"], ["ingest", "--since", "yesterday"]):
        result = revisit(*args, env=cli_env)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
    version = revisit("--version", env=cli_env)
    assert version.returncode == 0 and version.stdout.startswith("revisit ")


def test_run_for_a_duration(cli_env: dict[str, str], database_url: str) -> None:
    env = {**cli_env, "REVISIT_DATABASE_URL": database_url}
    result = revisit("run", "--duration", "1s", env=env)
    assert result.returncode == 0, result.stderr
    assert "run duration of 1 s reached" in result.stderr


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("10m", 600), ("1.5h", 5400)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "ten minutes", "5y", "-3m"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(typer.BadParameter):
        parse_duration(text)


def test_parse_duration_zero_where_allowed() -> None:
    assert parse_duration("0s", allow_zero=True) == 0.0
    with pytest.raises(typer.BadParameter):
        parse_duration("-1s", allow_zero=True)
