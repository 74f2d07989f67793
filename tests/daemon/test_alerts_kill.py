"""Alerts across a ``kill -9`` of their sender: every flip arrives, copies carry the same key.

The receiver holds a POST unanswered and the sender (the whole ``revisit run``,
or ``revisit alerts deliver``) is killed -9 while it waits: the receiver has the
alert, the database does not know. After a restart the alert is sent again with
the same ``Idempotency-Key``, so counting distinct keys, each flip arrives once.
The daemon's test runs by default (about 5 s: no embedded cluster to start, no
learner); the other, which also checks what the database holds after the kill,
is marked slow.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from revisit.daemon.alerts import idempotency_key, verify
from tests.daemon.alert_receiver import SECRET, Receiver, flip, watched_area
from tests.daemon.conftest import Daemon

REVISIT = [sys.executable, "-m", "revisit.cli"]
LEASE_S = 1.5


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture
def env(cli_env: dict[str, str], database_url: str) -> dict[str, str]:
    return {
        **cli_env,
        "REVISIT_DATABASE_URL": database_url,
        "REVISIT_ALERTS__WEBHOOK_SECRET": SECRET,
        "REVISIT_ALERTS__TIMEOUT_S": "1",
        "REVISIT_ALERTS__LEASE_S": str(LEASE_S),
        "REVISIT_ALERTS__BACKOFF_S": "0.2",
        "REVISIT_ALERTS__MAX_BACKOFF_S": "0.5",
    }


def _expected_keys(engine: sa.Engine, webhook: int) -> set[str]:
    with engine.connect() as conn:
        alerts = conn.execute(sa.text("SELECT id FROM change_alert")).scalars().all()
    return {idempotency_key(a, webhook) for a in alerts}


def _pending(engine: sa.Engine) -> list[tuple[int, int]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT alert_id, attempts FROM alert_delivery WHERE status <> 'delivered'")
        )
        return [(int(a), int(n)) for a, n in rows]


def _check_received(receiver: Receiver, *, expected: set[str], twice: str) -> None:
    counts = Counter(receiver.keys())
    assert set(counts) == expected  # every flip, and nothing else
    assert counts[twice] == 2, counts  # the one whose answer the kill lost, sent again
    assert all(n == 1 for key, n in counts.items() if key != twice), counts
    copies = [p.json for p in receiver.posts if p.key == twice]
    same = {k: v for k, v in copies[0].items() if k not in ("sent_at", "attempt")}
    assert {k: v for k, v in copies[1].items() if k not in ("sent_at", "attempt")} == same
    assert all(verify(p.body, p.headers["X-Revisit-Signature"], SECRET) for p in receiver.posts)


@pytest.mark.slow
def test_a_sender_killed_mid_delivery_sends_it_again_with_the_same_key(
    engine: sa.Engine, receiver: Receiver, env: dict[str, str]
) -> None:
    webhook, ids = watched_area(engine, url=receiver.url, locations=4)
    flip(engine, ids, changed=True, updates=1)
    flip(engine, ids[:2], changed=False, updates=2)  # 6 flips
    release = receiver.hold_next()
    sender = subprocess.Popen(
        [*REVISIT, "alerts", "deliver"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert receiver.held.wait(timeout=60), "the sender never POSTed"
        os.killpg(sender.pid, signal.SIGKILL)  # it has sent the alert, and is waiting for the reply
        sender.wait(timeout=30)
    finally:
        release.set()
        if sender.poll() is None:
            os.killpg(sender.pid, signal.SIGKILL)
    (held,) = receiver.keys()
    assert sender.returncode == -signal.SIGKILL
    assert len(_pending(engine)) == 6  # the database never heard of the reply

    for _ in range(4):  # the killed sender's lease ends after LEASE_S
        done = subprocess.run(
            [*REVISIT, "alerts", "deliver"], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        if not _pending(engine):
            break
        time.sleep(LEASE_S)
    assert _pending(engine) == []
    _check_received(receiver, expected=_expected_keys(engine, webhook), twice=held)


def test_alerts_arrive_once_per_flip_across_a_kill_of_the_daemon(
    engine: sa.Engine, receiver: Receiver, env: dict[str, str]
) -> None:
    """The real ``revisit run``, killed -9 while a receiver holds one of its POSTs."""
    daemon_env = {
        **env,
        "REVISIT_DAEMON__SOURCES": "[]",
        "REVISIT_DAEMON__BOOTSTRAP_AOI": "",
        "REVISIT_ALERTS__DELIVER_EVERY_S": "0.5",
    }
    webhook, ids = watched_area(engine, url=receiver.url, locations=6)
    release = receiver.hold_next()
    first = Daemon(daemon_env)
    try:
        first.wait_for_message("scheduler started", timeout=120)
        flip(engine, ids[:3], changed=True, updates=1)
        first.wait_for("a held POST", receiver.held.is_set, timeout=60)
        os.killpg(first.pid, signal.SIGKILL)
        first.proc.wait(timeout=30)
    finally:
        release.set()
        first.kill()
    (held,) = receiver.keys()
    # While no daemon runs, more flips happen; they wait in the database.
    flip(engine, ids[3:], changed=True, updates=1)
    flip(engine, ids[:2], changed=False, updates=2)

    second = Daemon(daemon_env)
    try:
        second.wait_for("every delivery", lambda: not _pending(engine), timeout=120)
        flip(engine, ids[2:4], changed=False, updates=2)  # and some while it runs
        second.wait_for("the last deliveries", lambda: not _pending(engine), timeout=60)
        second.stop(signal.SIGTERM, timeout=60)
        assert second.proc.returncode == 0, second.log_text()[-3000:]
    finally:
        second.kill()
    assert len(_expected_keys(engine, webhook)) == 10
    _check_received(receiver, expected=_expected_keys(engine, webhook), twice=held)
