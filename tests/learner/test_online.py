"""The online learner on an ingested simulated world, against a real PostGIS.

Every method takes real steps on real chips; change estimates and events land
in the database with their checkpoint; a restart resumes where the last
checkpoint committed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
import torch

from revisit.db import learning
from revisit.errors import LearnerError
from revisit.ingest.chips import ChipStore
from revisit.learner.checkpoint import CheckpointError
from revisit.learner.online import OnlineLearner
from revisit.learner.trainer import METHODS
from tests.learner.conftest import learner_settings


def _rows(engine: sa.Engine, query: str) -> list[sa.Row[tuple[object, ...]]]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text(query)))


def _scalar(engine: sa.Engine, query: str) -> object:
    with engine.connect() as conn:
        return conn.execute(sa.text(query)).scalar_one()


# CACo, the default, in the default suite; every other method with `make test-all`.
@pytest.mark.parametrize(
    "method", [m if m == "caco" else pytest.param(m, marks=pytest.mark.slow) for m in METHODS]
)
def test_each_method_trains_and_its_loss_falls(
    method: str, world_url: str, world_engine: sa.Engine, world_store: ChipStore, tmp_path: Path
) -> None:
    # A queue as long as the batch fills after the first step, so every later
    # step has the same number of negatives and the losses compare.
    # CACo's loss falls within 24 steps (the mean of steps 2-11 against that of 15-24:
    # 3.45 -> 3.04 on this world); the other methods take their 40.
    steps = 24 if method == "caco" else 40
    settings = learner_settings(
        world_url, tmp_path / "var", lr=0.1, queue_size=8, checkpoint_every=steps // 2
    )
    losses: list[float] = []
    with OnlineLearner(
        settings=settings, engine=world_engine, store=world_store, method=method
    ) as learner:
        summary = learner.run(steps, on_step=lambda report: losses.append(report.loss))
    assert summary.steps == steps and summary.last_step == steps
    assert all(np.isfinite(losses))
    early, late = float(np.mean(losses[1:11])), float(np.mean(losses[-10:]))
    assert late < early, f"{method}: loss did not fall ({early:.3f} -> {late:.3f})"
    versions = _rows(world_engine, "SELECT step, method FROM model_version ORDER BY step")
    assert [(v.step, v.method) for v in versions] == [(steps // 2, method), (steps, method)]
    assert int(_scalar(world_engine, "SELECT count(*) FROM change_estimate")) > 0  # type: ignore[call-overload]


def test_estimates_match_their_events(
    world_url: str, world_engine: sa.Engine, world_store: ChipStore, tmp_path: Path
) -> None:
    settings = learner_settings(world_url, tmp_path / "var")
    with OnlineLearner(settings=settings, engine=world_engine, store=world_store) as learner:
        learner.run(12)
    assert [r.step for r in _rows(world_engine, "SELECT step FROM model_version ORDER BY id")] == [
        5,
        10,
        12,
    ]
    events = _rows(
        world_engine,
        "SELECT location_id, step, ratio, ratio_ema, model_version_id, positive_observation_id, "
        "longterm_observation_id FROM change_event ORDER BY location_id, step",
    )
    assert events and max(e.step for e in events) <= 12
    assert all(e.longterm_observation_id is not None for e in events)
    estimates = {
        r.location_id: r
        for r in _rows(
            world_engine,
            "SELECT location_id, ratio_ema, ratio_last, updates, model_version_id "
            "FROM change_estimate",
        )
    }
    by_location: dict[int, list[sa.Row[tuple[object, ...]]]] = {}
    for e in events:
        by_location.setdefault(int(e.location_id), []).append(e)
    assert set(by_location) == set(estimates)
    for loc, history in by_location.items():
        r = None
        for e in history:  # replay the EMA from the raw R
            r = e.ratio if r is None else 0.8 * r + 0.2 * e.ratio
            assert e.ratio_ema == pytest.approx(r)
        estimate = estimates[loc]
        assert estimate.updates == len(history)
        assert estimate.ratio_ema == pytest.approx(r)
        assert estimate.ratio_last == pytest.approx(history[-1].ratio)


def test_restart_resumes_exactly_where_the_checkpoint_left(
    world_url: str, world_engine: sa.Engine, world_store: ChipStore, tmp_path: Path
) -> None:
    settings = learner_settings(world_url, tmp_path / "var")
    with OnlineLearner(settings=settings, engine=world_engine, store=world_store) as learner:
        learner.run(7)  # checkpoints at 5 and, on the way out, 7
        weights = {k: v.clone() for k, v in learner.trainer.model.state_dict().items()}
        mixture = learner.mixture
        updates = dict(_rows(world_engine, "SELECT location_id, updates FROM change_estimate"))
    assert mixture is not None  # warm-up is 4 steps
    with OnlineLearner(settings=settings, engine=world_engine, store=world_store) as learner:
        assert learner.step == 7
        assert learner.mixture == mixture
        for key, value in learner.trainer.model.state_dict().items():
            assert torch.equal(value, weights[key]), key
        summary = learner.run(3)
    assert (summary.first_step, summary.last_step) == (8, 10)
    after = dict(_rows(world_engine, "SELECT location_id, updates FROM change_estimate"))
    assert all(after[loc] >= n for loc, n in updates.items())
    assert int(_scalar(world_engine, "SELECT max(step) FROM change_event")) <= 10  # type: ignore[call-overload]
    # Only the newest checkpoints are kept on disk (keep_checkpoints = 3).
    files = sorted(p.name for p in (tmp_path / "var" / "checkpoints" / "caco").iterdir())
    assert files == ["step-0000000005.pt", "step-0000000007.pt", "step-0000000010.pt"]


def test_a_second_learner_on_the_same_database_is_refused(
    world_url: str, world_engine: sa.Engine, world_store: ChipStore, tmp_path: Path
) -> None:
    settings = learner_settings(world_url, tmp_path / "var")
    with OnlineLearner(settings=settings, engine=world_engine, store=world_store):
        second = OnlineLearner(settings=settings, engine=world_engine, store=world_store)
        with pytest.raises(LearnerError, match="another learner"):
            second.open()
    # Released on close: a new one opens.
    with OnlineLearner(settings=settings, engine=world_engine, store=world_store) as learner:
        assert learner.step == 0


def test_another_method_needs_new_model(
    world_url: str, world_engine: sa.Engine, world_store: ChipStore, tmp_path: Path
) -> None:
    settings = learner_settings(world_url, tmp_path / "var")
    with OnlineLearner(settings=settings, engine=world_engine, store=world_store) as learner:
        learner.run(3)
    with pytest.raises(LearnerError, match="--method caco"):
        OnlineLearner(settings=settings, engine=world_engine, store=world_store, method="tp").open()
    with OnlineLearner(
        settings=settings, engine=world_engine, store=world_store, method="tp", new_model=True
    ) as learner:
        assert learner.step == 3  # the counter goes on
        summary = learner.run(2)
    assert summary.last_step == 5
    latest = _rows(world_engine, "SELECT step, method FROM model_version ORDER BY id DESC LIMIT 1")
    assert (latest[0].step, latest[0].method) == (5, "tp")


def test_a_new_model_can_start_from_another_checkpoint(
    world_url: str, world_engine: sa.Engine, world_store: ChipStore, tmp_path: Path
) -> None:
    """--new-model --init-from: another model's encoders and input statistics, fresh queues."""
    settings = learner_settings(world_url, tmp_path / "var", queue_size=64)
    with OnlineLearner(settings=settings, engine=world_engine, store=world_store) as learner:
        learner.run(2)
        assert learner._trainer is not None
        trained = {k: v.clone() for k, v in learner._trainer.model.state_dict().items()}
    source = tmp_path / "var" / "checkpoints" / "caco" / "step-0000000002.pt"
    other = learner_settings(world_url, tmp_path / "other", queue_size=32)  # another queue size
    with pytest.raises(LearnerError, match="needs new_model"):
        OnlineLearner(settings=other, engine=world_engine, store=world_store, init_from=source)
    with OnlineLearner(
        settings=other, engine=world_engine, store=world_store, new_model=True, init_from=source
    ) as learner:
        assert learner._trainer is not None
        state = learner._trainer.model.state_dict()
        for key in ("encoder.conv1.weight", "key_encoder.layer3.1.bn2.running_var"):
            assert torch.equal(state[key], trained[key])
        assert torch.equal(state["encoder.normalize.mean"], trained["encoder.normalize.mean"])
        assert not bool((state["encoder.normalize.std"] == 1).all())  # not re-estimated
        queues = [k for k in state if "queue" in k and state[k].ndim == 2]
        assert queues and all(state[k].shape[-1] == 32 or state[k].shape[0] == 32 for k in queues)
        learner.run(1)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        OnlineLearner(
            settings=other, engine=world_engine, store=world_store, new_model=True, init_from=junk
        ).open()


def test_a_damaged_checkpoint_is_a_clear_error(
    world_url: str, world_engine: sa.Engine, world_store: ChipStore, tmp_path: Path
) -> None:
    settings = learner_settings(world_url, tmp_path / "var")
    with OnlineLearner(settings=settings, engine=world_engine, store=world_store) as learner:
        learner.run(2)
    path = tmp_path / "var" / "checkpoints" / "caco" / "step-0000000002.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fails its hash"):
        OnlineLearner(settings=settings, engine=world_engine, store=world_store).open()


def test_warm_up_keeps_every_location_unchanged(
    world_url: str, world_engine: sa.Engine, world_store: ChipStore, tmp_path: Path
) -> None:
    settings = learner_settings(world_url, tmp_path / "var", warmup_steps=100)
    with OnlineLearner(settings=settings, engine=world_engine, store=world_store) as learner:
        learner.run(6)
        assert learner.mixture is None
    assert int(_scalar(world_engine, "SELECT count(*) FROM change_estimate")) > 0  # type: ignore[call-overload]
    assert not _scalar(world_engine, "SELECT bool_or(changed) FROM change_estimate")


def test_geo_tp_stores_cluster_ids(
    world_url: str, world_engine: sa.Engine, world_store: ChipStore, tmp_path: Path
) -> None:
    settings = learner_settings(world_url, tmp_path / "var", geo_clusters=3)
    with OnlineLearner(
        settings=settings, engine=world_engine, store=world_store, method="geo-tp"
    ) as learner:
        learner.run(2)
    clusters = [r.cluster_id for r in _rows(world_engine, "SELECT cluster_id FROM location")]
    assert None not in clusters
    assert set(clusters) == {0, 1, 2}


def test_lock_is_released_when_a_step_fails(
    world_url: str, world_engine: sa.Engine, tmp_path: Path
) -> None:
    settings = learner_settings(world_url, tmp_path / "var")
    empty = ChipStore(tmp_path / "no-chips")  # every read fails its lookup
    learner = OnlineLearner(settings=settings, engine=world_engine, store=empty)
    learner.open()
    try:
        with pytest.raises(LearnerError, match="readable query chips"):
            learner.run(2)
        with pytest.raises(LearnerError, match="must be reopened"):
            learner.run(1)
    finally:
        learner.close()
    with world_engine.connect() as conn:
        assert learning.try_learner_lock(conn)
        learning.release_learner_lock(conn)
        assert learning.latest_model_version(conn) is None


def test_an_empty_database_says_what_to_do(engine: sa.Engine, tmp_path: Path) -> None:
    settings = learner_settings("postgresql://unused/x", tmp_path / "var")
    with (
        OnlineLearner(settings=settings, engine=engine) as learner,
        pytest.raises(LearnerError, match="revisit ingest"),
    ):
        learner.run(1)
    with engine.connect() as conn:
        assert learning.latest_model_version(conn) is None


def _keep_two_dates(engine: sa.Engine) -> None:
    """Leave each location two usable dates about 9 months apart (as OSCD's bercy)."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "WITH usable AS (SELECT id, location_id, acquired_at FROM observation"
                "  WHERE valid_fraction >= 0.8 AND cloud_fraction <= 0.2),"
                " first AS (SELECT DISTINCT ON (location_id) id, location_id, acquired_at"
                "  FROM usable WHERE acquired_at >= '2023-02-01'"
                "  ORDER BY location_id, acquired_at),"
                " second AS (SELECT DISTINCT ON (u.location_id) u.id FROM usable u"
                "  JOIN first f ON f.location_id = u.location_id"
                "  WHERE u.acquired_at >= f.acquired_at + interval '270 days'"
                "  ORDER BY u.location_id, u.acquired_at)"
                " DELETE FROM observation WHERE id NOT IN (SELECT id FROM first)"
                " AND id NOT IN (SELECT id FROM second)"
            )
        )


def test_two_dates_are_measured_with_a_calibrated_denominator_and_v_change_says_why(
    world_url: str, world_engine: sa.Engine, world_store: ChipStore, tmp_path: Path
) -> None:
    _keep_two_dates(world_engine)
    with world_engine.begin() as conn:
        ids = [int(r[0]) for r in conn.execute(sa.text("SELECT id FROM location ORDER BY id"))]
        # One location with its older date only, one with no observation at all.
        conn.execute(
            sa.text(
                "DELETE FROM observation WHERE location_id = :a AND acquired_at ="
                " (SELECT max(acquired_at) FROM observation WHERE location_id = :a)"
            ),
            {"a": ids[0]},
        )
        conn.execute(sa.text("DELETE FROM observation WHERE location_id = :b"), {"b": ids[1]})
    # Default mining windows: 9 months is under long_min_days, so only the fallback measures.
    settings = learner_settings(world_url, tmp_path / "var", warmup_steps=6, refit_every=3)
    with OnlineLearner(settings=settings, engine=world_engine, store=world_store) as learner:
        learner.run(24)
    rows = {
        int(r.location_id): r
        for r in _rows(
            world_engine,
            "SELECT location_id, measured, unmeasured_reason, denominator, season_gap_days,"
            " change_probability, changed, ratio_ema, short_dist, long_dist FROM v_change",
        )
    }
    assert len(rows) == len(ids)  # every location, measured or not
    assert rows[ids[0]].unmeasured_reason == "one usable date only"
    assert rows[ids[1]].unmeasured_reason == "no observation"
    measured = [rows[i] for i in ids[2:]]
    assert all(r.measured and r.unmeasured_reason is None for r in measured)
    assert {r.denominator for r in measured} == {"date-pair"}
    assert all(60 < r.season_gap_days < 100 for r in measured)  # 270-ish days apart
    # Eight places: under the ten a mixture needs, so no refit and no probability yet.
    assert all(r.change_probability is None and not r.changed for r in measured)
    # The denominator is the typical distance of the pair of dates, not a view's.
    for r in measured:
        assert r.ratio_ema > 0 and r.short_dist > 0.05
    events = _rows(
        world_engine,
        "SELECT denominator, season_gap_days, positive_observation_id FROM change_event",
    )
    assert events and {e.denominator for e in events} == {"date-pair"}
    assert all(e.positive_observation_id is None for e in events)


def test_real_short_term_pairs_keep_cacos_ratio(
    world_url: str, world_engine: sa.Engine, world_store: ChipStore, tmp_path: Path
) -> None:
    settings = learner_settings(world_url, tmp_path / "var")
    with OnlineLearner(settings=settings, engine=world_engine, store=world_store) as learner:
        learner.run(10)
    events = _rows(
        world_engine,
        "SELECT ratio, long_dist, short_dist, denominator, positive_observation_id"
        " FROM change_event",
    )
    assert events
    for e in events:
        if e.positive_observation_id is not None:
            assert e.denominator == "pair"
            assert e.ratio == pytest.approx(e.long_dist / (e.short_dist + 1e-4))
        else:
            assert e.denominator in ("own", "others", "date-pair")
    assert _scalar(world_engine, "SELECT count(*) FROM change_estimate WHERE short_ref IS NOT NULL")


def test_another_change_distance_starts_the_calibration_over(
    world_url: str,
    world_engine: sa.Engine,
    world_store: ChipStore,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dense = learner_settings(world_url, tmp_path / "var")
    assert dense.learner.change_distance == "dense"
    with OnlineLearner(settings=dense, engine=world_engine, store=world_store) as learner:
        learner.run(10)
        assert learner._reference.own
    embedding = learner_settings(world_url, tmp_path / "var", change_distance="embedding")
    with (
        caplog.at_level("WARNING", logger="revisit.learner.online"),
        OnlineLearner(settings=embedding, engine=world_engine, store=world_store) as learner,
    ):
        # Short-term distances of the other scale are not mixed with the new ones.
        assert learner._reference.own == {}
        assert learner._reference.state_dict() == {"pairs": {}}
        learner.run(5)  # checkpoints at 15, now with its own distance
        measured = set(learner._reference.own)
    assert "the calibrated short-term distances (other scale) start over" in caplog.text
    stored = dict(
        _rows(
            world_engine,
            "SELECT location_id, short_ref FROM change_estimate WHERE short_ref IS NOT NULL",
        )
    )
    assert stored and set(stored) <= measured  # none of the old scale is left behind
    caplog.clear()
    with OnlineLearner(settings=embedding, engine=world_engine, store=world_store) as learner:
        assert learner._reference.own == stored  # the same distance: resumed as it was
    assert "start over" not in caplog.text
