"""Change alerts raised by the database: one per flip, in the estimate's transaction, notified."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from revisit.db import alerts as alerts_db
from revisit.db.aois import create_aoi
from revisit.db.embedded import EmbeddedPostgres
from revisit.db.learning import EstimateRow, insert_model_version, write_change_batch
from revisit.db.models import READER_ROLE
from revisit.ingest.areas import parse_bbox
from tests.conftest import REPO

DOCS = REPO / "docs" / "alerts.md"


@pytest.fixture
def world(engine: sa.Engine) -> dict[str, Any]:
    """Two overlapping AOIs with a webhook each, and three locations: in both, in one, in none."""
    with engine.begin() as conn:
        west = create_aoi(conn, name="west", geom=parse_bbox("2.0,48.0,2.6,49.0"))
        east = create_aoi(conn, name="east", geom=parse_bbox("2.4,48.0,3.0,49.0"))
        hooks = {
            name: alerts_db.create_webhook(conn, aoi_id=aoi.id, url=f"http://127.0.0.1:9/{name}")
            for name, aoi in (("west", west), ("east", east))
        }
        ids = [
            int(
                conn.execute(
                    sa.text(
                        "INSERT INTO location (geom, origin) VALUES"
                        " (ST_SetSRID(ST_MakePoint(:x, 48.5), 4326), 'manual') RETURNING id"
                    ),
                    {"x": x},
                ).scalar_one()
            )
            for x in (2.5, 2.1, 5.0)  # both AOIs, west only, neither
        ]
        model = insert_model_version(conn, step=10, method="caco", checkpoint_key=None, metrics={})
    return {"aois": {"west": west.id, "east": east.id}, "hooks": hooks, "ids": ids, "mv": model}


def _estimate(location: int, *, changed: bool, r: float = 1.0, updates: int = 1) -> EstimateRow:
    return EstimateRow(
        location_id=location,
        ratio_ema=r,
        ratio_last=r,
        long_dist=0.4,
        short_dist=0.3,
        updates=updates,
        changed=changed,
        change_probability=0.9 if changed else 0.1,
    )


def _write(engine: sa.Engine, rows: list[EstimateRow], model_version_id: int | None) -> None:
    with engine.begin() as conn:
        write_change_batch(conn, estimates=rows, events=[], model_version_id=model_version_id)


def _alerts(engine: sa.Engine) -> list[alerts_db.AlertRow]:
    with engine.connect() as conn:
        return list(reversed(alerts_db.recent_alerts(conn, limit=100)))


def test_one_alert_per_flip_and_none_when_the_classification_stays(
    engine: sa.Engine, world: dict[str, Any]
) -> None:
    both, west_only, neither = world["ids"]
    mv = world["mv"]
    # First estimates: an INSERT that is changed counts as a flip, one that is not does not.
    _write(engine, [_estimate(both, changed=True, r=2.0), _estimate(west_only, changed=False)], mv)
    first = _alerts(engine)
    assert [(a.location_id, a.changed) for a in first] == [(both, True)]
    alert = first[0]
    assert alert.aoi_names == ["west", "east"]  # every AOI whose polygon holds it, by id
    assert alert.aoi_ids == [world["aois"]["west"], world["aois"]["east"]]
    assert (alert.ratio_ema, alert.change_probability, alert.model_version_id) == (2.0, 0.9, mv)
    assert (alert.lon, alert.lat) == (2.5, 48.5)

    # r moves but nobody's class does: no alert. Then one flips each way.
    _write(engine, [_estimate(both, changed=True, r=2.5, updates=2),
                    _estimate(west_only, changed=False, r=1.1, updates=2)], mv)  # fmt: skip
    assert len(_alerts(engine)) == 1
    _write(engine, [_estimate(both, changed=False, r=0.9, updates=3),
                    _estimate(west_only, changed=True, r=3.0, updates=3),
                    _estimate(neither, changed=True, r=4.0)], mv)  # fmt: skip
    flips = [(a.location_id, a.changed, a.ratio_ema, a.aoi_names) for a in _alerts(engine)[1:]]
    assert sorted(flips) == sorted(
        [(both, False, 0.9, ["west", "east"]), (west_only, True, 3.0, ["west"]),
         (neither, True, 4.0, [])]
    )  # fmt: skip

    # One delivery per alert and webhook of its AOIs; none for a location in no AOI.
    with engine.connect() as conn:
        deliveries = conn.execute(
            sa.text(
                "SELECT c.location_id, d.webhook_id, d.status, d.attempts FROM alert_delivery d"
                " JOIN change_alert c ON c.id = d.alert_id ORDER BY c.id, d.webhook_id"
            )
        ).all()
    west, east = world["hooks"]["west"], world["hooks"]["east"]
    assert sorted(tuple(d) for d in deliveries) == sorted(
        [(both, west, "pending", 0), (both, east, "pending", 0),
         (both, west, "pending", 0), (both, east, "pending", 0),
         (west_only, west, "pending", 0)]
    )  # fmt: skip


def test_a_listener_hears_each_flip_at_commit_and_a_rollback_leaves_nothing(
    engine: sa.Engine, world: dict[str, Any], pg_cluster: EmbeddedPostgres
) -> None:
    both, west_only, _ = world["ids"]
    dbname = engine.url.database
    assert dbname is not None
    with psycopg.connect(pg_cluster.conninfo(dbname), autocommit=True) as listener:
        listener.execute(f"LISTEN {alerts_db.CHANNEL}")

        # A write that fails (or is rolled back) raises nothing: no row, no notification.
        with engine.connect() as conn:
            write_change_batch(
                conn, estimates=[_estimate(both, changed=True)], events=[], model_version_id=None
            )
            assert conn.execute(sa.text("SELECT count(*) FROM change_alert")).scalar_one() == 1
            conn.rollback()
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM change_alert")).scalar_one() == 0
            assert conn.execute(sa.text("SELECT count(*) FROM alert_delivery")).scalar_one() == 0
        assert list(listener.notifies(timeout=0.5, stop_after=1)) == []

        # Inside an open transaction the listener hears nothing yet; at commit it hears both.
        heard: list[dict[str, Any]] = []
        with engine.connect() as conn:
            write_change_batch(
                conn,
                estimates=[
                    _estimate(both, changed=True, r=2.0),
                    _estimate(west_only, changed=True),
                ],
                events=[],
                model_version_id=world["mv"],
            )
            assert list(listener.notifies(timeout=0.3, stop_after=1)) == []
            conn.commit()
        for note in listener.notifies(timeout=5, stop_after=2):
            assert note.channel == alerts_db.CHANNEL
            heard.append(json.loads(note.payload))
    by_location = {n["location_id"]: n for n in heard}
    assert set(by_location) == {both, west_only}
    ids = {a.location_id: a.id for a in _alerts(engine)}
    assert by_location[both] == {
        "alert_id": ids[both],
        "location_id": both,
        "aoi_ids": [world["aois"]["west"], world["aois"]["east"]],
        "aois": ["west", "east"],
        "changed": True,
        "r": 2.0,
        "change_probability": 0.9,
        "model_version_id": world["mv"],
    }


def test_the_reader_reads_the_alerts_view_and_may_listen(
    engine: sa.Engine, world: dict[str, Any]
) -> None:
    _write(engine, [_estimate(world["ids"][0], changed=True)], None)
    with engine.connect() as conn:
        conn.execute(sa.text(f"SET ROLE {READER_ROLE}"))
        rows = conn.execute(
            sa.text("SELECT location_id, aoi_names, changed, ST_X(geom) FROM v_change_alert")
        ).all()
        assert [tuple(r) for r in rows] == [(world["ids"][0], ["west", "east"], True, 2.5)]
        conn.execute(sa.text(f"LISTEN {alerts_db.CHANNEL}"))
        # The query docs/alerts.md shows runs as written.
        (query,) = re.findall(r"```sql\n(.*?)```", DOCS.read_text(), re.DOTALL)
        assert conn.execute(sa.text(query.replace("lyon", "west"))).all()
        conn.rollback()


def test_claims_skip_locked_rows_and_back_off_per_webhook(
    engine: sa.Engine, world: dict[str, Any]
) -> None:
    both, west_only, _ = world["ids"]
    _write(engine, [_estimate(both, changed=True), _estimate(west_only, changed=True)], None)
    # Two senders at once never take the same delivery.
    with engine.connect() as one, engine.connect() as two:
        first = alerts_db.claim_delivery(one, lease_s=60)
        second = alerts_db.claim_delivery(two, lease_s=60)
        assert first is not None and second is not None
        assert (first.alert.id, first.webhook_id) != (second.alert.id, second.webhook_id)
        one.rollback()
        two.rollback()
    # A lease taken and committed keeps the delivery from the next claim.
    with engine.begin() as conn:
        leased = alerts_db.claim_delivery(conn, lease_s=60)
    assert leased is not None
    with engine.begin() as conn:
        others = [alerts_db.claim_delivery(conn, lease_s=60) for _ in range(3)]
    claimed = {(c.alert.id, c.webhook_id) for c in others if c is not None}
    assert (leased.alert.id, leased.webhook_id) not in claimed
    assert len(claimed) == 2 and others[2] is None  # 3 deliveries in all

    # Failures double the webhook's wait from backoff_s up to the cap, a Retry-After within it.
    delays = []
    with engine.begin() as conn:
        for _ in range(5):
            out = alerts_db.record_failed_attempt(
                conn, alert_id=leased.alert.id, webhook_id=leased.webhook_id, error="HTTP 503",
                backoff_s=10, max_backoff_s=60, max_age_s=3600,
            )  # fmt: skip
            delays.append(out.retry_in_s)
        asked = alerts_db.record_failed_attempt(
            conn, alert_id=leased.alert.id, webhook_id=leased.webhook_id, error="HTTP 429",
            backoff_s=10, max_backoff_s=600, max_age_s=3600, retry_after_s=500,
        )  # fmt: skip
    assert delays == [10, 20, 40, 60, 60]
    assert asked.retry_in_s == 500 and asked.consecutive_failures == 6 and not asked.gave_up
    with engine.connect() as conn:
        hooks = {w.id: w for w in alerts_db.list_webhooks(conn)}
        assert hooks[leased.webhook_id].retry_at is not None
        assert hooks[leased.webhook_id].last_error == "HTTP 429"
        # With the leases over, only the webhook that is not backing off has deliveries due.
        conn.execute(sa.text("UPDATE alert_delivery SET next_attempt_at = now()"))
        due = [alerts_db.claim_delivery(conn, lease_s=60) for _ in range(3)]
        assert {c.webhook_id for c in due if c is not None} == set(hooks) - {leased.webhook_id}
        conn.rollback()
    with engine.begin() as conn:
        alerts_db.record_delivered(conn, alert_id=leased.alert.id, webhook_id=leased.webhook_id)
        hook = alerts_db.get_webhook(conn, leased.webhook_id)
    assert (hook.consecutive_failures, hook.retry_at, hook.delivered) == (0, None, 1)


def test_old_deliveries_are_given_up_with_their_last_error(
    engine: sa.Engine, world: dict[str, Any]
) -> None:
    _write(engine, [_estimate(world["ids"][1], changed=True)], None)  # west only: one delivery
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE change_alert SET created_at = now() - interval '2 hours'"))
        claimed = alerts_db.claim_delivery(conn, lease_s=60)
        assert claimed is not None
        out = alerts_db.record_failed_attempt(
            conn, alert_id=claimed.alert.id, webhook_id=claimed.webhook_id,
            error="ConnectionError: refused", backoff_s=1, max_backoff_s=1, max_age_s=3600,
        )  # fmt: skip
        assert out.gave_up
        (status, error) = conn.execute(
            sa.text("SELECT status, last_error FROM alert_delivery")
        ).one()
    assert (status, error) == ("failed", "ConnectionError: refused")
    # A paused webhook's deliveries wait, then age out too.
    _write(engine, [_estimate(world["ids"][1], changed=False, updates=2)], None)
    with engine.begin() as conn:
        alerts_db.set_webhook_active(conn, world["hooks"]["west"], active=False)
        assert alerts_db.claim_delivery(conn, lease_s=60) is None
        assert alerts_db.give_up_expired(conn, max_age_s=3600) == 0
        conn.execute(sa.text("UPDATE change_alert SET created_at = now() - interval '2 hours'"))
        assert alerts_db.give_up_expired(conn, max_age_s=3600) == 1
        assert alerts_db.pending_deliveries(conn) == 0


def test_webhooks_are_unique_per_aoi_and_removed_with_their_deliveries(
    engine: sa.Engine, world: dict[str, Any]
) -> None:
    with engine.begin() as conn, pytest.raises(alerts_db.WebhookExistsError, match="already"):
        alerts_db.create_webhook(conn, aoi_id=world["aois"]["west"], url="http://127.0.0.1:9/west")
    _write(engine, [_estimate(world["ids"][0], changed=True)], None)
    with engine.begin() as conn:
        alerts_db.remove_webhook(conn, world["hooks"]["east"])
        assert [w.id for w in alerts_db.list_webhooks(conn)] == [world["hooks"]["west"]]
        assert alerts_db.pending_deliveries(conn) == 1
        with pytest.raises(alerts_db.WebhookNotFoundError):
            alerts_db.remove_webhook(conn, world["hooks"]["east"])
        assert len(alerts_db.recent_alerts(conn)) == 1  # the alert stays
        # A location that goes takes its alerts and their deliveries with it.
        conn.execute(sa.text("DELETE FROM location WHERE id = :id"), {"id": world["ids"][0]})
        assert alerts_db.recent_alerts(conn) == []
        assert conn.execute(sa.text("SELECT count(*) FROM alert_delivery")).scalar_one() == 0


def test_concurrent_writers_each_raise_their_own_alerts(
    engine: sa.Engine, world: dict[str, Any]
) -> None:
    """Two transactions flipping different locations at once: each commits its own alert."""
    both, west_only, _ = world["ids"]
    barrier = threading.Barrier(2)

    def flip(location: int) -> None:
        with engine.connect() as conn:
            write_change_batch(
                conn, estimates=[_estimate(location, changed=True)], events=[],
                model_version_id=None,
            )  # fmt: skip
            barrier.wait(timeout=10)
            conn.commit()

    threads = [threading.Thread(target=flip, args=(loc,)) for loc in (both, west_only)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(a.location_id for a in _alerts(engine)) == sorted([both, west_only])


@pytest.fixture
def conn(engine: sa.Engine) -> Iterator[sa.Connection]:
    with engine.connect() as connection:
        yield connection
        connection.rollback()


def test_a_notification_with_very_many_aois_stays_under_the_limit(
    conn: sa.Connection, world: dict[str, Any]
) -> None:
    for i in range(120):
        create_aoi(conn, name=f"{'x' * 100}{i:03d}", geom=parse_bbox("2.0,48.0,3.0,49.0"))
    conn.commit()
    dbname = conn.engine.url.database
    assert dbname is not None
    raw = conn.connection.driver_connection
    assert isinstance(raw, psycopg.Connection)
    raw.execute(f"LISTEN {alerts_db.CHANNEL}")
    raw.commit()
    write_change_batch(
        conn, estimates=[_estimate(world["ids"][0], changed=True)], events=[],
        model_version_id=None,
    )  # fmt: skip
    conn.commit()
    (note,) = list(raw.notifies(timeout=5, stop_after=1))
    body = json.loads(note.payload)
    assert body["aois_truncated"] is True and len(body["aoi_ids"]) == 100
    assert len(note.payload.encode()) < 8000
    assert len(alerts_db.recent_alerts(conn)[0].aoi_names) == 122  # the row keeps them all


def test_webhooks_take_turns_and_a_healthy_one_gets_the_oldest_first(
    engine: sa.Engine, world: dict[str, Any]
) -> None:
    both, west_only, _ = world["ids"]
    west, east = world["hooks"]["west"], world["hooks"]["east"]
    _write(engine, [_estimate(west_only, changed=True)], None)  # west: alerts 1, 3
    _write(engine, [_estimate(both, changed=True)], None)  # west and east: alert 2
    _write(engine, [_estimate(west_only, changed=False, updates=2)], None)
    served = []
    for _ in range(4):
        with engine.begin() as conn:
            claimed = alerts_db.claim_delivery(conn, lease_s=60)
            assert claimed is not None
            alerts_db.record_delivered(
                conn, alert_id=claimed.alert.id, webhook_id=claimed.webhook_id
            )
        served.append((claimed.webhook_id, claimed.alert.location_id, claimed.alert.changed))
    assert served == [
        (west, west_only, True),  # the oldest of west's
        (east, both, True),  # east's turn: it was never served
        (west, both, True),
        (west, west_only, False),  # a location's flips in order
    ]


def test_a_ratio_json_cannot_hold_goes_into_the_notification_as_null(
    conn: sa.Connection, world: dict[str, Any]
) -> None:
    raw = conn.connection.driver_connection
    assert isinstance(raw, psycopg.Connection)
    raw.execute(f"LISTEN {alerts_db.CHANNEL}")
    raw.commit()
    write_change_batch(
        conn,
        estimates=[_estimate(world["ids"][0], changed=True, r=float("inf"))],
        events=[],
        model_version_id=None,
    )
    conn.commit()
    (note,) = list(raw.notifies(timeout=5, stop_after=1))

    def not_json(constant: str) -> None:
        raise AssertionError(f"{constant} in the notification: not JSON")

    body = json.loads(note.payload, parse_constant=not_json)
    assert body["r"] is None and body["changed"] is True
