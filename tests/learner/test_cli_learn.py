"""``revisit learn`` as a user runs it, and a kill -9 in the middle of a step."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import rasterio
import sqlalchemy as sa

from tests.conftest import SHARED_DATA, TORCH_THREADS
from tests.learner.conftest import LearnWorld

REVISIT = [sys.executable, "-m", "revisit.cli"]


def _env(cli_env: dict[str, str], url: str, world: LearnWorld, data_dir: Path) -> dict[str, str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "chips").symlink_to(world.chips)
    env = dict(cli_env)
    env.update(
        {
            "REVISIT_DATA_DIR": str(data_dir),
            "REVISIT_DATABASE_URL": url,
            "REVISIT_LEARNER__BATCH_SIZE": "8",
            "REVISIT_LEARNER__QUEUE_SIZE": "64",
            "REVISIT_LEARNER__WARMUP_STEPS": "4",
            "REVISIT_LEARNER__REFIT_EVERY": "4",
            "REVISIT_LEARNER__CHECKPOINT_EVERY": "3",
            "REVISIT_LEARNER__THREADS": TORCH_THREADS,
        }
    )
    return env


def _learn(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*REVISIT, "learn", *args], env=env, capture_output=True, text=True, timeout=300
    )


def test_learn_trains_and_prints_a_summary(
    cli_env: dict[str, str], world_url: str, learn_world: LearnWorld, tmp_path: Path
) -> None:
    env = _env(cli_env, world_url, learn_world, tmp_path / "var")
    env["REVISIT_EXPORT__DENSE_MODEL"] = "false"  # its export is the slow variant's
    env["REVISIT_EXPORT__PARITY_CHIPS"] = "2"  # as the daemon tests': parity is checked alike
    done = _learn(env, "--steps", "4", "--method", "teco")
    assert done.returncode == 0, done.stderr
    assert "teco" in done.stdout and "last step" in done.stdout
    # Another method is refused before torch is imported (seconds): the process says so.
    refuse = (
        "import sys; from revisit.cli import main;"
        " status = main(['learn', '--steps', '2', '--method', 'caco']);"
        " print('torch' in sys.modules); sys.exit(status)"
    )
    again = subprocess.run(
        [sys.executable, "-c", refuse], env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 1
    assert "--method teco" in again.stderr and "Traceback" not in again.stderr
    assert again.stdout.split() == ["False"], again.stdout
    bad = _learn(env, "--steps", "2", "--method", "simclr")
    assert bad.returncode == 2 and "--method" in bad.stderr
    # What it learned goes out as a map.
    out = tmp_path / "map.geojson"
    exported = _revisit(env, "export", "changemap", "--bbox", "2,48,3,49", "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    assert '"FeatureCollection"' in out.read_text()
    # And the encoder as ONNX, with its manifest.
    published = _revisit(env, "export", "onnx")
    assert published.returncode == 0, published.stderr
    assert "parity" in published.stdout
    latest = json.loads((tmp_path / "var" / "exports" / "onnx" / "latest.json").read_text())
    assert {"features", "embedding"} <= set(latest["files"])


@pytest.mark.slow
def test_what_learn_publishes_maps_a_real_image_pair(
    cli_env: dict[str, str], world_url: str, learn_world: LearnWorld, tmp_path: Path
) -> None:
    # The whole chain on the command line: learn, publish (the dense model too), map
    # a real OSCD pair with it.
    bercy = SHARED_DATA / "oscd" / "images" / "bercy"
    if not bercy.is_dir():
        pytest.skip(f"the OSCD images are not here ({bercy})")
    env = _env(cli_env, world_url, learn_world, tmp_path / "var")
    assert _learn(env, "--steps", "4").returncode == 0
    published = _revisit(env, "export", "onnx")
    assert published.returncode == 0, published.stderr
    args = ["pair", str(bercy / "imgs_1"), str(bercy / "imgs_2"), "--stride", "32"]
    pair = _revisit(env, "changemap", *args, "--out", str(tmp_path / "bercy.tif"))
    assert pair.returncode == 0, pair.stderr
    assert "hypercolumn" in pair.stdout  # export.pair_scoring's default
    with rasterio.open(tmp_path / "bercy.tif") as ds:
        assert ds.tags()["scoring"] == "hypercolumn"
        assert ds.tags()["model"].endswith(".dense.onnx")
        assert ds.descriptions == ("hypercolumn_distance",)
    with rasterio.open(tmp_path / "bercy.mask.tif") as ds:
        assert ds.nodata == 255 and ds.tags()["threshold_method"] == "triangle"
    assert '"FeatureCollection"' in (tmp_path / "bercy.geojson").read_text()


def _revisit(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*REVISIT, *args], env=env, capture_output=True, text=True, timeout=300)


def _summary(stdout: str) -> dict[str, str]:
    """The row of ``revisit learn``'s summary table, by column name."""
    header, row = (
        [cell.strip() for cell in re.split("[┃│]", line)]
        for line in stdout.splitlines()
        if "┃" in line or "│" in line
    )
    return dict(zip(header, row, strict=True))


def test_learn_minutes_stops_on_the_time_budget(
    cli_env: dict[str, str], world_url: str, learn_world: LearnWorld, tmp_path: Path
) -> None:
    env = _env(cli_env, world_url, learn_world, tmp_path / "var")
    began = time.monotonic()
    done = _learn(env, "--minutes", "0.05")  # 3 s of training, no step limit
    assert done.returncode == 0, done.stderr
    assert "time budget of 0.05 min reached" in done.stdout
    row = _summary(done.stdout)  # one line a row at the 80 columns of a pipe
    took = re.search(r"(\d+) steps of 8 locations in ([\d.]+) s", done.stdout)
    assert took is not None, done.stdout
    steps, seconds = int(took.group(1)), float(took.group(2))
    assert steps == int(row["steps"]) >= 1
    # It stops after the step that passes the budget: one step late at most.
    assert 3.0 <= seconds < 3.0 + 30.0
    assert time.monotonic() - began < 240
    # images/s is steps times batch size (REVISIT_LEARNER__BATCH_SIZE=8) per second.
    assert float(row["images/s"]) == pytest.approx(8 * steps / seconds, rel=0.02, abs=0.1)
    # With --steps too, whichever comes first: here the steps.
    both = _learn(env, "--minutes", "10", "--steps", "2")
    assert both.returncode == 0, both.stderr
    assert _summary(both.stdout)["steps"] == "2" and "time budget" not in both.stdout


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_learn_minutes_must_be_a_positive_number(cli_env: dict[str, str], value: str) -> None:
    bad = _learn(cli_env, "--minutes", value)
    assert bad.returncode == 2, bad.stderr
    assert "--minutes" in bad.stderr and "Traceback" not in bad.stderr


def _state(engine: sa.Engine) -> tuple[int, dict[int, int], int]:
    with engine.connect() as conn:
        step = conn.execute(
            sa.text("SELECT coalesce(max(step), 0) FROM model_version")
        ).scalar_one()
        updates = dict(
            conn.execute(sa.text("SELECT location_id, updates FROM change_estimate")).all()
        )
        events = conn.execute(sa.text("SELECT count(*) FROM change_event")).scalar_one()
    return int(step), {int(k): int(v) for k, v in updates.items()}, int(events)


def test_kill_minus_9_mid_run_resumes_from_the_last_checkpoint(
    cli_env: dict[str, str],
    world_url: str,
    world_engine: sa.Engine,
    learn_world: LearnWorld,
    tmp_path: Path,
) -> None:
    env = _env(cli_env, world_url, learn_world, tmp_path / "var")
    proc = subprocess.Popen(
        [*REVISIT, "learn", "--steps", "10000"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            step, _, _ = _state(world_engine)
            if step >= 6:
                break
            assert proc.poll() is None, "the learner exited early"
            time.sleep(0.2)
        time.sleep(0.4)  # somewhere inside the next steps
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    step, updates, events = _state(world_engine)
    assert step >= 6
    with world_engine.connect() as conn:
        max_event = conn.execute(sa.text("SELECT max(step) FROM change_event")).scalar_one()
    assert max_event <= step  # nothing past the last committed checkpoint

    done = _learn(env, "--steps", "4")
    assert done.returncode == 0, done.stderr
    step2, updates2, events2 = _state(world_engine)
    assert step2 == step + 4  # the counter went on from the checkpoint, never back
    assert events2 >= events
    assert all(updates2[loc] >= n for loc, n in updates.items())
    with world_engine.connect() as conn:
        duplicates = conn.execute(
            sa.text(
                "SELECT count(*) FROM (SELECT location_id, step FROM change_event "
                "GROUP BY 1, 2 HAVING count(*) > 1) d"
            )
        ).scalar_one()
    assert duplicates == 0
    leftovers = [
        p for p in (tmp_path / "var" / "checkpoints").rglob("*") if p.name.endswith(".tmp")
    ]
    assert leftovers == []
