"""The learner picks up observations whose ingest transaction committed after a later one's."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from revisit.learner.mining import ObservationIndex
from revisit.learner.online import OnlineLearner
from tests.learner.conftest import learner_settings

COLUMNS = (
    "location_id, scene_id, acquired_at, valid_fraction, cloud_fraction, chip_key, chip_sha256"
)


def test_an_observation_committed_late_is_fetched_at_the_next_refresh(
    world_url: str, world_engine: sa.Engine, tmp_path: Path
) -> None:
    # Two observations the world holds, taken out so that two "workers" add them again.
    with world_engine.begin() as conn:
        rows = (
            conn.execute(
                sa.text(
                    f"DELETE FROM observation WHERE id IN (SELECT id FROM observation"
                    f" ORDER BY id DESC LIMIT 2) RETURNING {COLUMNS}"
                )
            )
            .mappings()
            .all()
        )
    insert = sa.text(
        f"INSERT INTO observation ({COLUMNS}) VALUES (:location_id, :scene_id, :acquired_at,"
        " :valid_fraction, :cloud_fraction, :chip_key, :chip_sha256) RETURNING id"
    )
    learner = OnlineLearner(
        settings=learner_settings(world_url, tmp_path / "var"), engine=world_engine
    )
    index = ObservationIndex()
    index.extend(learner._fetch_shared(index.last_id))
    held = len(index)

    slow = world_engine.connect()
    try:
        slow_tx = slow.begin()
        early_id = slow.execute(insert, dict(rows[0])).scalar_one()  # takes its id first ...
        with world_engine.begin() as fast:
            late_id = fast.execute(insert, dict(rows[1])).scalar_one()  # ... commits second
        assert early_id < late_id
        index.extend(learner._fetch_shared(index.last_id))
        assert index.last_id == late_id and early_id not in index._row_of
        slow_tx.commit()
    finally:
        slow.close()
    added = index.extend(learner._fetch_shared(index.last_id))
    assert added == 1 and early_id in index._row_of
    assert len(index) == held + 2
    # Nothing is fetched twice, and nothing more is looked for.
    assert index.extend(learner._fetch_shared(index.last_id)) == 0
    assert early_id not in learner._missing
