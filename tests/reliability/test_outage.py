"""A database outage under a running service: not ready meanwhile, quiet retries, recovery.

The embedded cluster that ``revisit run`` started is stopped under it (``pg_ctl
stop -m fast`` as its OS user, the way :class:`EmbeddedPostgres` stops it),
left down for a while and started again. The service must stay up, answer
``/readyz`` with 503 and the database unreachable, retry with backoff (a
bounded number of log lines, whatever the outage's length), lead again and go
on learning without a restart, and have lost no committed row.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from revisit.daemon.leader import MAX_RETRY_S, LeaderLock
from revisit.db.embedded import EmbeddedPostgres
from tests.daemon.conftest import Daemon, daemon_env, daemons, data_dir  # noqa: F401

TABLES = ("scene", "observation", "model_version", "change_estimate")
#: Log lines the service may write while the database is away, however long that is.
MAX_OUTAGE_LINES = 60


def _counts(env: dict[str, str]) -> dict[str, int]:
    cluster = EmbeddedPostgres(data_dir(env))
    with psycopg.connect(cluster.conninfo()) as conn:
        return {t: int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in TABLES}  # type: ignore[index]


def _step(env: dict[str, str]) -> int:
    cluster = EmbeddedPostgres(data_dir(env))
    with psycopg.connect(cluster.conninfo()) as conn:
        row = conn.execute("SELECT coalesce(max(step), 0) FROM model_version").fetchone()
        return int(row[0]) if row else 0


def _ready(daemon: Daemon) -> tuple[int, dict[str, Any]]:
    status, body = daemon.get("/readyz")
    return status, json.loads(body)


def _learned(daemon: Daemon, after: int) -> bool:
    return any(
        str(r.get("message", "")).startswith("job learn done") for r in daemon.records()[after:]
    )


def outage(env: dict[str, str], daemons: list[Daemon], *, seconds: float) -> None:  # noqa: F811
    """Stop the database under a running service for ``seconds``, start it, check the service."""
    daemon = Daemon(env)
    daemons.append(daemon)
    daemon.wait_for("a learning chunk", lambda: _learned(daemon, 0), timeout=180)
    daemon.wait_for("a committed model version", lambda: _step(env) > 0, timeout=60)
    assert _ready(daemon)[0] == 200
    before, step_before = _counts(env), _step(env)

    cluster = EmbeddedPostgres(data_dir(env))
    first_line = len(daemon.records())
    down_at = time.monotonic()
    cluster.stop()
    not_ready: list[float] = []
    bodies: list[dict[str, Any]] = []
    while time.monotonic() - down_at < seconds:
        status, body = _ready(daemon)
        if status == 503:
            not_ready.append(time.monotonic())
            bodies.append(body)
        time.sleep(0.5)
    assert daemon.proc.poll() is None, daemon.log_text()[-4000:]
    during = daemon.records()[first_line:]
    cluster.ensure_started()
    up_at = time.monotonic()

    assert bodies, "/readyz never said 503 while the database was down"
    assert all(str(b["checks"]["database"]).startswith("unreachable") for b in bodies), bodies[-1]
    assert bodies[-1]["ready"] is False
    not_ready_s = not_ready[-1] - not_ready[0]
    assert not_ready_s >= seconds - 6  # not ready for (nearly) all of the outage
    assert len(during) <= MAX_OUTAGE_LINES, "\n".join(str(r["message"]) for r in during)
    assert not any(r.get("level") == "critical" for r in during)
    messages = [str(r.get("message", "")) for r in during]
    # The leader noticed, stepped down, and retried quietly: one line, not one per try.
    assert any(m.startswith("lost the leader lock") for m in messages), messages
    assert sum(m.startswith("could not try the leader lock") for m in messages) <= 1, messages

    # Recovery without a restart: ready as leader again, learning goes on past the old step.
    daemon.wait_for(
        "/readyz 200 as leader",
        lambda: _ready(daemon)[0] == 200 and _ready(daemon)[1]["role"] == "leader",
        timeout=60,
    )
    recovered_s = time.monotonic() - up_at
    mark = len(daemon.records())
    daemon.wait_for(
        "a learning chunk after the outage", lambda: _learned(daemon, mark), timeout=120
    )
    daemon.wait_for("a new checkpoint", lambda: _step(env) > step_before, timeout=120)
    after = _counts(env)
    assert all(after[t] >= before[t] for t in TABLES), (before, after)
    print(
        f"outage of {seconds:g} s: not ready for {not_ready_s:.1f} s, {len(during)} log lines "
        f"during it, ready again {recovered_s:.1f} s after the database; "
        f"step {step_before} -> {_step(env)}; rows {before} -> {after}"
    )

    print("\n".join(f"  {r['level']:7} {str(r['message'])[:140]}" for r in during))
    daemon.stop(signal.SIGTERM)
    assert daemon.proc.returncode == 0, daemon.log_text()[-4000:]
    assert "stopped cleanly" in daemon.messages()


def test_a_ten_second_database_outage_is_ridden_out(
    daemon_env: dict[str, str],  # noqa: F811
    daemons: list[Daemon],  # noqa: F811
) -> None:
    outage(daemon_env, daemons, seconds=10)


@pytest.mark.slow
def test_a_thirty_second_database_outage_is_ridden_out(
    daemon_env: dict[str, str],  # noqa: F811
    daemons: list[Daemon],  # noqa: F811
) -> None:
    outage(daemon_env, daemons, seconds=30)


def test_the_leader_lock_backs_off_and_logs_once_while_the_database_is_away(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A Unix socket directory with no server in it: every connection fails at once.
    engine = sa.create_engine(f"postgresql+psycopg://revisit@/revisit?host={tmp_path}")
    lock = LeaderLock(engine)
    assert lock.retry_delay_s(1.0) == 1.0
    with caplog.at_level(logging.DEBUG, logger="revisit.daemon.leader"):
        delays = []
        for _ in range(6):
            assert not lock.try_acquire()
            delays.append(lock.retry_delay_s(1.0))
    assert delays == [1.0, 2.0, 4.0, MAX_RETRY_S, MAX_RETRY_S, MAX_RETRY_S]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "could not try the leader lock" in warnings[0].getMessage()
    assert lock.failures == 6 and not lock.held
    engine.dispose()
