"""The learner's reads and batched writes, against a real PostGIS."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import numpy as np
import pytest
import sqlalchemy as sa

from revisit.db.learning import (
    LEARNER_LOCK_KEY,
    EstimateRow,
    EventRow,
    insert_model_version,
    latest_model_version,
    load_change_estimates,
    location_table,
    max_event_step,
    model_versions,
    release_learner_lock,
    set_cluster_ids,
    try_learner_lock,
    usable_observations,
    write_change_batch,
)
from revisit.errors import LearnerError

FOOTPRINT = "SRID=4326;MULTIPOLYGON(((10 45, 11 45, 11 46, 10 46, 10 45)))"


@pytest.fixture
def conn(engine: sa.Engine) -> Iterator[sa.Connection]:
    with engine.connect() as connection:
        yield connection
        connection.rollback()


def _locations(conn: sa.Connection, points: list[tuple[float, float, int | None]]) -> list[int]:
    return [
        int(
            conn.execute(
                sa.text(
                    "INSERT INTO location (geom, origin, cluster_id)"
                    " VALUES (ST_SetSRID(ST_MakePoint(:x, :y), 4326), 'manual', :c) RETURNING id"
                ),
                {"x": x, "y": y, "c": c},
            ).scalar_one()
        )
        for x, y, c in points
    ]


def _scene(conn: sa.Connection, product_id: str, acquired_at: datetime) -> int:
    return int(
        conn.execute(
            sa.text(
                "INSERT INTO scene (source, product_id, acquired_at, footprint)"
                " VALUES ('simulated', :p, :t, :f) RETURNING id"
            ),
            {"p": product_id, "t": acquired_at, "f": FOOTPRINT},
        ).scalar_one()
    )


def _observation(
    conn: sa.Connection,
    *,
    location_id: int,
    scene_id: int,
    acquired_at: datetime,
    valid: float,
    cloud: float,
) -> int:
    sha = f"{location_id:032x}{scene_id:032x}"
    return int(
        conn.execute(
            sa.text(
                "INSERT INTO observation (location_id, scene_id, acquired_at, valid_fraction,"
                " cloud_fraction, chip_key, chip_sha256)"
                " VALUES (:l, :s, :t, :v, :c, :k, :h) RETURNING id"
            ),
            {
                "l": location_id,
                "s": scene_id,
                "t": acquired_at,
                "v": valid,
                "c": cloud,
                "k": f"{sha[:2]}/{sha[2:4]}/{sha}.npy",
                "h": sha,
            },
        ).scalar_one()
    )


def _estimate(location_id: int, *, updates: int = 1, changed: bool = False) -> EstimateRow:
    return EstimateRow(
        location_id=location_id,
        ratio_ema=1.0 + updates / 10,
        ratio_last=1.5,
        long_dist=0.6,
        short_dist=0.4,
        updates=updates,
        changed=changed,
    )


def _event(location_id: int, step: int, query: int | None = None) -> EventRow:
    return EventRow(
        location_id=location_id,
        step=step,
        ratio=1.5,
        ratio_ema=1.2,
        long_dist=0.6,
        short_dist=0.4,
        query_observation_id=query,
        positive_observation_id=None,
        longterm_observation_id=None,
    )


def _count(conn: sa.Connection, table: str) -> int:
    return int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())


def test_usable_observations_filter_order_and_page(conn: sa.Connection) -> None:
    a, b = _locations(conn, [(10.1, 45.1, None), (10.2, 45.2, None)])
    t1 = datetime(2024, 6, 1, 10, 30, tzinfo=UTC)
    t2 = datetime(2024, 7, 1, 10, 30, tzinfo=UTC)
    s1, s2 = _scene(conn, "P1", t1), _scene(conn, "P2", t2)
    good_a1 = _observation(conn, location_id=a, scene_id=s1, acquired_at=t1, valid=1.0, cloud=0)
    _observation(conn, location_id=b, scene_id=s1, acquired_at=t1, valid=0.5, cloud=0.0)
    good_b2 = _observation(conn, location_id=b, scene_id=s2, acquired_at=t2, valid=0.9, cloud=0.2)
    _observation(conn, location_id=a, scene_id=s2, acquired_at=t2, valid=1.0, cloud=0.21)

    table = usable_observations(conn, min_valid_fraction=0.9, max_cloud_fraction=0.2)
    assert len(table) == 2
    assert table.id.dtype == np.int64 and table.location_id.dtype == np.int64
    assert table.acquired_at.dtype == np.float64
    assert table.id.tolist() == [good_a1, good_b2]
    assert table.location_id.tolist() == [a, b]
    assert table.acquired_at.tolist() == [t1.timestamp(), t2.timestamp()]
    assert table.chip_sha256[0] == f"{a:032x}{s1:032x}"
    assert table.chip_key[1].endswith(f"{b:032x}{s2:032x}.npy")

    after = usable_observations(
        conn, after_id=good_a1, min_valid_fraction=0.9, max_cloud_fraction=0.2
    )
    assert after.id.tolist() == [good_b2]
    first = usable_observations(conn, min_valid_fraction=0.0, max_cloud_fraction=1.0, limit=1)
    assert first.id.tolist() == [good_a1]
    assert len(usable_observations(conn, min_valid_fraction=0, max_cloud_fraction=1)) == 4

    none = usable_observations(conn, after_id=10**12, min_valid_fraction=0, max_cloud_fraction=1)
    assert len(none) == 0 and none.id.dtype == np.int64 and none.chip_key == []
    with pytest.raises(ValueError, match="limit"):
        usable_observations(conn, min_valid_fraction=0, max_cloud_fraction=1, limit=-1)


def test_location_table_and_set_cluster_ids(conn: sa.Connection) -> None:
    assert len(location_table(conn)) == 0
    a, b, c = _locations(conn, [(10.5, 45.25, 3), (-1.5, -2.75, None), (0.0, 0.0, 7)])

    table = location_table(conn)
    assert table.id.tolist() == [a, b, c]
    assert table.lon.tolist() == [10.5, -1.5, 0.0]
    assert table.lat.tolist() == [45.25, -2.75, 0.0]
    assert table.cluster_id.tolist() == [3, -1, 7]

    # numpy in, an unknown id skipped, -1 clears.
    updated = set_cluster_ids(
        conn, location_ids=np.array([b, c, 10**9]), cluster_ids=np.array([5, -1, 1])
    )
    assert updated == 2
    assert location_table(conn).cluster_id.tolist() == [3, 5, -1]
    # A second call in the same transaction (the temporary table was dropped).
    assert set_cluster_ids(conn, location_ids=[a], cluster_ids=[0]) == 1
    assert location_table(conn).cluster_id.tolist() == [0, 5, -1]
    assert set_cluster_ids(conn, location_ids=[], cluster_ids=[]) == 0

    with pytest.raises(ValueError, match="2 location ids but 1 cluster ids"):
        set_cluster_ids(conn, location_ids=[a, b], cluster_ids=[1])
    with pytest.raises(ValueError, match=f"location id {a} appears more than once"):
        set_cluster_ids(conn, location_ids=[a, a], cluster_ids=[1, 2])
    with pytest.raises(ValueError, match="below -1"):
        set_cluster_ids(conn, location_ids=[a], cluster_ids=[-2])


def test_write_change_batch_inserts_then_updates(conn: sa.Connection) -> None:
    a, b, c = _locations(conn, [(10.1, 45.1, None), (10.2, 45.2, None), (10.3, 45.3, None)])
    t = datetime(2024, 6, 1, tzinfo=UTC)
    obs = _observation(
        conn, location_id=a, scene_id=_scene(conn, "P", t), acquired_at=t, valid=1, cloud=0
    )
    v1 = insert_model_version(conn, step=10, method="caco", checkpoint_key=None, metrics={})
    v2 = insert_model_version(conn, step=20, method="caco", checkpoint_key=None, metrics={})

    assert write_change_batch(conn, estimates=[], events=[], model_version_id=v1) == (0, 0)
    written = write_change_batch(
        conn,
        estimates=[_estimate(a), _estimate(b)],
        events=[_event(a, 10, query=obs), _event(b, 10)],
        model_version_id=v1,
    )
    assert written == (2, 2)
    assert load_change_estimates(conn) == [_estimate(a), _estimate(b)]

    written = write_change_batch(
        conn,
        estimates=[_estimate(b, updates=2, changed=True), _estimate(c)],
        events=[_event(b, 20), _event(c, 20)],
        model_version_id=v2,
    )
    assert written == (2, 2)
    assert load_change_estimates(conn) == [
        _estimate(a),
        _estimate(b, updates=2, changed=True),
        _estimate(c),
    ]
    versions = dict(
        conn.execute(sa.text("SELECT location_id, model_version_id FROM change_estimate")).all()
    )
    assert versions == {a: v1, b: v2, c: v2}
    events = conn.execute(
        sa.text(
            "SELECT location_id, step, model_version_id, query_observation_id"
            " FROM change_event ORDER BY step, location_id"
        )
    ).all()
    assert [tuple(e) for e in events] == [
        (a, 10, v1, obs),
        (b, 10, v1, None),
        (b, 20, v2, None),
        (c, 20, v2, None),
    ]
    assert max_event_step(conn) == 20

    with pytest.raises(ValueError, match=f"location id among the estimates {a}"):
        write_change_batch(
            conn, estimates=[_estimate(a), _estimate(a)], events=[], model_version_id=None
        )


def test_events_alone_commit_with_the_callers_transaction(engine: sa.Engine) -> None:
    with engine.begin() as setup:
        (a,) = _locations(setup, [(10.1, 45.1, None)])
    with engine.connect() as conn:
        assert write_change_batch(
            conn, estimates=[], events=[_event(a, 1)], model_version_id=None
        ) == (0, 1)
        conn.commit()
    with engine.connect() as conn:
        assert max_event_step(conn) == 1


def test_changed_since_follows_changed(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        (a,) = _locations(conn, [(10.1, 45.1, None)])

    def write(updates: int, changed: bool) -> tuple[datetime | None, datetime]:
        with engine.begin() as conn:
            write_change_batch(
                conn,
                estimates=[_estimate(a, updates=updates, changed=changed)],
                events=[],
                model_version_id=None,
            )
            row = conn.execute(
                sa.text("SELECT changed_since, updated_at, now() FROM change_estimate")
            ).one()
            assert row.updated_at == row.now
            return row.changed_since, row.now

    assert write(1, False)[0] is None
    since, now = write(2, True)
    assert since == now
    assert write(3, True)[0] == since
    assert write(4, False)[0] is None


def test_updates_never_go_back(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        a, b = _locations(conn, [(10.1, 45.1, None), (10.2, 45.2, None)])
        write_change_batch(
            conn, estimates=[_estimate(a, updates=5)], events=[_event(a, 5)], model_version_id=None
        )
        before = load_change_estimates(conn)

    with engine.connect() as conn:
        with pytest.raises(LearnerError, match=f"location {a} would go back from 5 updates to 4"):
            write_change_batch(
                conn,
                estimates=[_estimate(b), _estimate(a, updates=4)],
                events=[_event(b, 6)],
                model_version_id=None,
            )
        conn.rollback()
        assert load_change_estimates(conn) == before
        assert _count(conn, "change_event") == 1
        # The same count is no step back.
        assert write_change_batch(
            conn,
            estimates=[_estimate(a, updates=5, changed=True)],
            events=[],
            model_version_id=None,
        ) == (1, 0)
        conn.rollback()


def test_an_event_is_never_written_twice(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        (a,) = _locations(conn, [(10.1, 45.1, None)])
        write_change_batch(conn, estimates=[], events=[_event(a, 3)], model_version_id=None)

    with engine.connect() as conn:
        with pytest.raises(LearnerError, match=rf"\(location_id, step\)=\({a}, 3\)"):
            write_change_batch(conn, estimates=[], events=[_event(a, 3)], model_version_id=None)
        conn.rollback()
        with pytest.raises(LearnerError, match="twice"):
            write_change_batch(
                conn, estimates=[], events=[_event(a, 4), _event(a, 4)], model_version_id=None
            )
        conn.rollback()
        assert _count(conn, "change_event") == 1


def test_model_versions(conn: sa.Connection) -> None:
    assert latest_model_version(conn) is None
    assert model_versions(conn) == []
    assert max_event_step(conn) is None

    first = insert_model_version(
        conn,
        step=20,
        method="caco",
        checkpoint_key="checkpoints/20.pt",
        metrics={"loss": np.float32(0.5), "n": np.int64(3), "nested": {"ok": True}},
    )
    second = insert_model_version(conn, step=20, method="moco", checkpoint_key=None, metrics={})
    early = insert_model_version(conn, step=5, method="caco", checkpoint_key=None, metrics={})

    latest = latest_model_version(conn)
    assert latest is not None
    assert (latest.id, latest.step, latest.method, latest.checkpoint_key) == (
        second,
        20,
        "moco",
        None,
    )
    versions = model_versions(conn)
    assert [v.id for v in versions] == [early, first, second]
    assert versions[1].metrics == {"loss": 0.5, "n": 3, "nested": {"ok": True}}
    assert versions[1].checkpoint_key == "checkpoints/20.pt"
    assert versions[1].created_at.tzinfo is not None

    with pytest.raises(ValueError, match="step 30"):
        insert_model_version(
            conn, step=30, method="caco", checkpoint_key=None, metrics={"loss": float("nan")}
        )


def test_the_learner_lock_is_exclusive_and_released(engine: sa.Engine) -> None:
    assert LEARNER_LOCK_KEY.bit_length() <= 63
    with engine.connect() as one, engine.connect() as two:
        assert try_learner_lock(one)
        assert not try_learner_lock(two)
        # Session level: a rollback keeps it.
        one.rollback()
        assert not try_learner_lock(two)
        release_learner_lock(one)
        assert try_learner_lock(two)
        assert not try_learner_lock(one)
        release_learner_lock(two)
        two.commit()
    with engine.connect() as three:
        assert try_learner_lock(three)
        release_learner_lock(three)
