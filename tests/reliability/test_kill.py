"""Kill -9 trials: the service killed at random moments of ingest, learning and export.

See :mod:`tests.reliability.harness` for what is checked after every kill.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from revisit.daemon.jobs import CHANGEMAP_DIR, remove_changemap_temporaries
from tests.daemon.conftest import daemon_env  # noqa: F401  (a fixture)
from tests.reliability.harness import KillHarness


def _trials(env: dict[str, str], *, seed: int, trials: int) -> None:
    harness = KillHarness(env, seed=seed, trials=trials)
    try:
        report = harness.run()
    finally:
        harness.kill_all()
    print(report.render())
    assert report.trials and report.final is not None
    assert not report.failures, report.render()


def test_three_kills_leave_a_consistent_service(daemon_env: dict[str, str]) -> None:  # noqa: F811
    _trials(daemon_env, seed=7, trials=3)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # about 5 minutes on two shared cores
def test_twenty_four_kills_leave_a_consistent_service(
    daemon_env: dict[str, str],  # noqa: F811
) -> None:
    _trials(daemon_env, seed=20261130, trials=24)


def test_housekeeping_removes_what_a_killed_change_map_export_left(tmp_path: Path) -> None:
    directory = tmp_path / CHANGEMAP_DIR / "demo"
    directory.mkdir(parents=True)
    kept_map = directory / "demo-20260101T000000Z.geojson"
    abandoned = directory / ".demo-20260101T000000Z.tif.123.456.tmp"
    in_progress = directory / ".demo-20260101T000500Z.tif.789.123.tmp"
    for path in (kept_map, abandoned, in_progress):
        path.write_bytes(b"x")
    hour_ago = time.time() - 3600
    os.utime(abandoned, (hour_ago, hour_ago))
    os.utime(kept_map, (hour_ago, hour_ago))

    assert remove_changemap_temporaries(tmp_path, min_age_s=60) == 1
    assert not abandoned.exists()
    assert kept_map.exists() and in_progress.exists()  # a map, and a write that may be going on
    assert remove_changemap_temporaries(tmp_path / "elsewhere", min_age_s=0) == 0
