"""Two ``revisit run`` on one database: one leads, the other waits, and takes over when it dies."""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import psycopg

from revisit.db.embedded import EmbeddedPostgres
from tests.daemon.conftest import Daemon, data_dir


def _runners(env: dict[str, str]) -> set[str]:
    """The ``host:pid`` of every daemon that recorded a job run or schedule."""
    cluster = EmbeddedPostgres(data_dir(env))
    with psycopg.connect(cluster.conninfo()) as conn:
        rows = conn.execute("SELECT DISTINCT runner FROM job_run WHERE runner IS NOT NULL")
        return {str(r[0]) for r in rows}


def _pids(runners: set[str]) -> set[int]:
    return {int(r.rsplit(":", 1)[1]) for r in runners}


def _role(daemon: Daemon) -> Any:
    _, body = daemon.get("/readyz")
    return json.loads(body)["role"]


def test_a_second_daemon_waits_as_standby_and_takes_over_within_seconds(
    daemon_env: dict[str, str], daemons: list[Daemon]
) -> None:
    # No ingest and no bootstrap: the jobs are light; the learn job waits for data.
    env = {
        **daemon_env,
        "REVISIT_DAEMON__SOURCES": "[]",
        "REVISIT_DAEMON__BOOTSTRAP_AOI": "",
        "REVISIT_DAEMON__REFIT_EVERY_S": "0.5",
    }
    first = Daemon(env)
    daemons.append(first)
    first.wait_for_message("scheduler started", timeout=120)
    second = Daemon(env)
    daemons.append(second)
    second.wait_for_message("standby: another `revisit run` leads this database", timeout=120)

    # While the first lives, only it schedules and runs jobs.
    time.sleep(3)
    assert _role(first) == "leader"
    assert _role(second) == "standby"
    status, _ = second.get("/readyz")
    assert status == 200  # a standby with a database is ready, as a standby
    _, metrics = second.get("/metrics")
    assert "revisit_leader 0.0" in metrics
    assert not any(m.startswith(("leader", "scheduler started")) for m in second.messages())
    assert not any("job" in r for r in second.records())
    assert _pids(_runners(env)) == {first.pid}

    # kill -9: its session ends, PostgreSQL frees the lock, the standby leads.
    killed = time.monotonic()
    first.kill()
    second.wait_for_message("scheduler started", timeout=30)
    takeover = time.monotonic() - killed
    print(f"standby took over {takeover:.1f} s after the leader's kill -9")
    assert takeover < 10
    assert _role(second) == "leader"
    second.wait_for("a job run by the new leader", lambda: second.pid in _pids(_runners(env)),
                    timeout=30)  # fmt: skip

    seconds = second.stop(signal.SIGTERM)
    assert second.proc.returncode == 0, second.log_text()[-3000:]
    print(f"SIGTERM to exit: {seconds:.1f} s")
    assert "stopped cleanly" in second.messages()
    # The killed leader's claim on the embedded cluster went with it: the last one out stopped it.
    assert not EmbeddedPostgres(data_dir(env)).is_running()
