"""``revisit run`` with ``daemon.learner_processes = 2``: the learner as torch.distributed ranks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.daemon.conftest import SMALL_WORLD, Daemon


def _versions(engine: sa.Engine) -> list[tuple[int, dict]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT step, metrics FROM model_version ORDER BY step")).all()
    return [(int(r[0]), dict(r[1])) for r in rows]


def test_the_daemon_runs_its_learner_as_two_ranks_and_stops_them(
    cli_env: dict[str, str], database_url: str, engine: sa.Engine, tmp_path: Path
) -> None:
    env = {
        **cli_env,
        **SMALL_WORLD,
        "REVISIT_DATABASE_URL": database_url,
        "REVISIT_DATA_DIR": str(tmp_path / "var"),
        "REVISIT_DAEMON__LEARNER_PROCESSES": "2",
        "REVISIT_DAEMON__LEARN_EVERY_S": "1",
        "REVISIT_DAEMON__LEARN_CHUNK_S": "1",
        "REVISIT_LEARNER__BATCH_SIZE": "4",
        "REVISIT_LEARNER__THREADS": "1",
        "REVISIT_DAEMON__CHANGEMAP_EVERY_S": "3600",
    }
    daemon = Daemon(env)
    try:
        daemon.wait_for(
            "a checkpoint of two ranks",
            lambda: any(m.get("processes") == 2 for _, m in _versions(engine)),
            timeout=240,
        )
        started = [r for r in daemon.records() if r.get("message") == "started learner"]
        assert len(started) == 1
        launcher = int(started[0]["pid"])
        assert daemon.stop(timeout=150) < 150
        assert daemon.proc.returncode == 0, daemon.log_text()[-4000:]
        with pytest.raises(ProcessLookupError):  # the launcher (and its ranks) ended first
            os.kill(launcher, 0)
        steps = [s for s, _ in _versions(engine)]
        assert steps == sorted(set(steps))
        with engine.connect() as conn:
            duplicated = conn.execute(
                sa.text(
                    "SELECT count(*) FROM (SELECT location_id, step FROM change_event"
                    " GROUP BY 1, 2 HAVING count(*) > 1) d"
                )
            ).scalar_one()
        assert duplicated == 0
    finally:
        daemon.kill()
