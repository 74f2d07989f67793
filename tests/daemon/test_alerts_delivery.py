"""Webhook delivery of change alerts to a real HTTP receiver on loopback."""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from revisit.config import AlertSettings, Settings, load_settings
from revisit.daemon import jobs
from revisit.daemon.alerts import deliver_due, describe_url, idempotency_key, verify
from revisit.daemon.metrics import Metrics
from revisit.db import alerts as alerts_db
from revisit.errors import ConfigError
from revisit.ingest.chips import ChipStore
from tests.daemon.alert_receiver import SECRET, Receiver, flip, watched_area

#: Back-off short enough for a test to wait out.
FAST = {"webhook_secret": SECRET, "backoff_s": 0.1, "max_backoff_s": 0.2, "timeout_s": 2}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def _settings(**values: object) -> AlertSettings:
    return AlertSettings(**{**FAST, **values})  # type: ignore[arg-type]


def _job_context(settings: Settings, engine: sa.Engine, tmp_path: Path) -> jobs.JobContext:
    """What the daemon hands a job, for running ``alerts:deliver`` as it does."""
    return jobs.JobContext(
        settings=settings,
        engine=engine,
        store=ChipStore(tmp_path / "chips"),
        metrics=Metrics(),
        stop=threading.Event(),
        runner="test:1",
    )


def _statuses(engine: sa.Engine) -> list[tuple[int, str, int]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT alert_id, status, attempts FROM alert_delivery ORDER BY alert_id")
        )
        return [(int(a), str(s), int(n)) for a, s, n in rows]


def test_a_delivery_is_signed_keyed_and_sent_once(engine: sa.Engine, receiver: Receiver) -> None:
    webhook, ids = watched_area(engine, url=receiver.url, locations=2)
    flip(engine, ids[:1], changed=True, updates=1)
    before = time.time()

    report = deliver_due(engine, _settings())

    assert (report.delivered, report.failed_attempts, report.pending) == (1, 0, 0)
    (post,) = receiver.posts
    with engine.connect() as conn:
        (alert,) = alerts_db.recent_alerts(conn)
    # The signature is the HMAC-SHA256 of the raw body, as docs/alerts.md checks it.
    expected = hmac.new(SECRET.encode(), post.body, hashlib.sha256).hexdigest()
    assert post.headers["X-Revisit-Signature"] == f"sha256={expected}"
    assert verify(post.body, post.headers["X-Revisit-Signature"], SECRET)
    assert not verify(post.body + b" ", post.headers["X-Revisit-Signature"], SECRET)
    assert post.key == idempotency_key(alert.id, webhook) == f"revisit-{alert.id}-{webhook}"
    assert before - 1 <= int(post.headers["X-Revisit-Timestamp"]) <= time.time() + 1
    assert post.headers["Content-Type"] == "application/json"
    assert post.headers["User-Agent"].startswith("revisit/")
    body = post.json
    assert {k: body[k] for k in ("type", "alert_id", "location_id", "changed", "r", "attempt")} == {
        "type": "revisit.change_alert",
        "alert_id": alert.id,
        "location_id": ids[0],
        "changed": True,
        "r": 2.0,
        "attempt": 1,
    }
    assert body["aois"] == [{"id": alert.aoi_ids[0], "name": "watched"}]
    assert body["idempotency_key"] == post.key
    assert datetime.fromisoformat(body["created_at"]).tzinfo is not None
    assert SECRET not in post.body.decode()
    assert _statuses(engine) == [(alert.id, "delivered", 1)]
    # Delivered is delivered: the next run sends nothing.
    assert deliver_due(engine, _settings()).attempts == 0
    assert len(receiver.posts) == 1


def test_5xx_is_retried_with_the_same_key_and_a_fresh_signature(
    engine: sa.Engine, receiver: Receiver
) -> None:
    _, ids = watched_area(engine, url=receiver.url, locations=1)
    flip(engine, ids, changed=True, updates=1)
    receiver.statuses.extend([503, 500])

    first = deliver_due(engine, _settings())
    assert (first.delivered, first.failed_attempts, first.pending) == (0, 1, 1)
    assert deliver_due(engine, _settings()).attempts == 0  # backing off: not yet
    deadline = time.monotonic() + 10
    while _statuses(engine)[0][1] != "delivered" and time.monotonic() < deadline:
        time.sleep(0.1)
        deliver_due(engine, _settings())

    assert [s for _, s, _ in _statuses(engine)] == ["delivered"]
    assert _statuses(engine)[0][2] == 3
    assert len(receiver.posts) == 3 and len(set(receiver.keys())) == 1
    assert [p.json["attempt"] for p in receiver.posts] == [1, 2, 3]
    assert all(verify(p.body, p.headers["X-Revisit-Signature"], SECRET) for p in receiver.posts)
    with engine.connect() as conn:
        (hook,) = alerts_db.list_webhooks(conn)
    assert (hook.consecutive_failures, hook.retry_at, hook.last_error) == (0, None, None)


def test_a_receiver_down_for_a_while_gets_every_alert_when_it_returns(
    engine: sa.Engine,
) -> None:
    receiver = Receiver()  # a port nobody listens on yet: connections are refused
    _, ids = watched_area(engine, url=receiver.url, locations=5)
    flip(engine, ids, changed=True, updates=1)
    flip(engine, ids[:2], changed=False, updates=2)  # two flip back: 7 alerts

    # While it is down, each run makes one attempt (not one per alert) and backs off.
    for _ in range(3):
        report = deliver_due(engine, _settings())
        assert (report.delivered, report.failed_attempts, report.pending) == (0, 1, 7)
        time.sleep(0.25)
    with engine.connect() as conn:
        (hook,) = alerts_db.list_webhooks(conn)
    assert hook.consecutive_failures == 3 and "ConnectionError" in (hook.last_error or "")

    receiver.start()
    try:
        time.sleep(0.25)  # the back-off ends
        report = deliver_due(engine, _settings())  # the whole backlog in one run
    finally:
        receiver.stop()
    assert (report.delivered, report.failed_attempts, report.pending) == (7, 0, 0)
    with engine.connect() as conn:
        alerts = {a.id: a for a in alerts_db.recent_alerts(conn)}
    assert sorted(p.json["alert_id"] for p in receiver.posts) == sorted(alerts)
    assert len(set(receiver.keys())) == 7
    # Each location's flips arrive in the order they happened.
    order = [p.json["alert_id"] for p in receiver.posts]
    for location in ids[:2]:
        mine = [a for a in order if alerts[a].location_id == location]
        assert mine == sorted(mine)


def test_without_a_secret_nothing_is_sent_and_the_job_says_why_once(
    engine: sa.Engine,
    receiver: Receiver,
    database_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, ids = watched_area(engine, url=receiver.url, locations=1)
    with pytest.raises(ConfigError, match="webhook_secret"):
        deliver_due(engine, AlertSettings())
    settings = load_settings(
        database_url=database_url, data_dir=tmp_path / "var", daemon={"bootstrap_aoi": None}
    )
    ctx = _job_context(settings, engine, tmp_path)
    assert jobs.run_job(ctx, jobs.ALERTS, jobs.deliver_alerts).detail == (
        "no webhook delivery waiting"
    )
    flip(engine, ids, changed=True, updates=1)
    with caplog.at_level(logging.WARNING, logger="revisit.daemon.jobs"):
        results = [jobs.run_job(ctx, jobs.ALERTS, jobs.deliver_alerts) for _ in range(3)]
    assert {r.outcome for r in results} == {"skipped"}
    assert "REVISIT_ALERTS__WEBHOOK_SECRET" in results[0].detail
    assert [r.message for r in caplog.records if "webhook_secret" in r.message] == [
        results[0].detail
    ]
    assert receiver.posts == []
    assert _statuses(engine)[0][1:] == ("pending", 0)


def test_the_daemon_job_delivers_and_never_logs_the_secret_or_the_url_path(
    engine: sa.Engine, database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    down = Receiver()
    url = f"http://127.0.0.1:{down.port}/hook?token=abc123"
    _, ids = watched_area(engine, url=url, locations=2)
    flip(engine, ids, changed=True, updates=1)
    settings = load_settings(
        database_url=database_url,
        data_dir=tmp_path / "var",
        daemon={"bootstrap_aoi": None},
        alerts=FAST,
    )
    ctx = _job_context(settings, engine, tmp_path)
    with caplog.at_level(logging.DEBUG, logger="revisit"):
        failed = jobs.run_job(ctx, jobs.ALERTS, jobs.deliver_alerts)
        down.start()
        try:
            time.sleep(0.25)
            done = jobs.run_job(ctx, jobs.ALERTS, jobs.deliver_alerts)
        finally:
            down.stop()
    assert failed.outcome == "ok" and "1 failed attempts" in failed.detail
    assert done.outcome == "ok" and done.detail.startswith("2 delivered")
    assert {p.path for p in down.posts} == {"/hook?token=abc123"}
    assert SECRET not in caplog.text and "abc123" not in caplog.text
    assert describe_url(url) in caplog.text  # which receiver failed, without its token
    with engine.connect() as conn:
        errors = conn.execute(sa.text("SELECT last_error FROM alert_webhook")).scalars().all()
    assert errors == [None]


def test_an_old_alert_is_given_up_with_its_last_error(engine: sa.Engine) -> None:
    down = Receiver()
    _, ids = watched_area(engine, url=down.url, locations=1)
    flip(engine, ids, changed=True, updates=1)
    first = deliver_due(engine, _settings(max_age_s=60))
    assert (first.failed_attempts, first.gave_up, first.pending) == (1, 0, 1)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE change_alert SET created_at = now() - interval '1 hour'"))
    report = deliver_due(engine, _settings(max_age_s=60))  # given up before any attempt
    assert (report.attempts, report.gave_up, report.pending) == (0, 1, 0)
    with engine.connect() as conn:
        status, error = conn.execute(sa.text("SELECT status, last_error FROM alert_delivery")).one()
    assert status == "failed" and error.startswith("ConnectionError")


def test_retry_after_and_settings_are_validated() -> None:
    from revisit.daemon.alerts import _retry_after, validate_webhook_url

    assert _retry_after("120") == 120
    assert _retry_after(None) is None and _retry_after("soon") is None
    assert 0 <= (_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") or 0) < 1  # in the past
    far = datetime.now(UTC).replace(microsecond=0).timestamp() + 60
    stamp = datetime.fromtimestamp(far, UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert 50 < (_retry_after(stamp) or 0) <= 61
    for bad in ("ftp://x/y", "http://", "http://a b/", "https://host:99999/"):
        with pytest.raises(ValueError):
            validate_webhook_url(bad)
    assert validate_webhook_url("https://example.org/hook?x=1") == "https://example.org/hook?x=1"
    with pytest.raises(ValueError, match="16 characters"):
        AlertSettings(webhook_secret="short")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lease_s"):
        AlertSettings(timeout_s=30, lease_s=10)
    with pytest.raises(ConfigError) as info:
        load_settings(alerts={"webhook_secret": "tooshort-secret"})
    assert "tooshort-secret" not in str(info.value)  # a secret is never echoed
    assert AlertSettings(webhook_secret="").webhook_secret is None  # type: ignore[arg-type]
