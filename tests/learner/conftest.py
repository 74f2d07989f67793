"""A small simulated world, ingested once per session, for the learner's tests.

Ten locations in Europe, 20 months of simulated Sentinel-2 acquisitions: enough
dates for short-term positives and, in the last months, long-term images a
year earlier. The database is a template; every test gets its own copy, while
the chip files (read-only to the learner) are shared.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from revisit.config import IngestSettings, Settings, load_settings
from revisit.db.embedded import EmbeddedPostgres
from revisit.db.locations import insert_locations
from revisit.ingest.chips import ChipStore
from revisit.ingest.pipeline import IngestPipeline
from revisit.ingest.sources.simulated import SimulatedSource
from tests.conftest import (
    TEMPLATE,
    TORCH_THREADS,
    _create_database,
    _drop_database,
    make_tempdir,
    url_of,
)

WORLD_POINTS = [  # one simulated tile, so the session's ingest stays short
    (2.10, 48.10),
    (2.30, 48.15),
    (2.55, 48.12),
    (2.80, 48.20),
    (2.15, 48.45),
    (2.40, 48.50),
    (2.70, 48.55),
    (2.20, 48.80),
    (2.50, 48.85),
    (2.85, 48.90),
]
WORLD_START = date(2023, 1, 1)
WORLD_END = datetime(2024, 8, 31, tzinfo=UTC)


@dataclass(frozen=True)
class LearnWorld:
    """The ingested template database and its chip directory."""

    template: str
    chips: Path
    observations: int


@pytest.fixture(scope="session")
def learn_world(pg_cluster: EmbeddedPostgres) -> Iterator[LearnWorld]:
    name = f"learnworld_{uuid.uuid4().hex[:8]}"
    _create_database(pg_cluster, name, template=TEMPLATE)
    root = make_tempdir("revisit-learnworld-")
    store = ChipStore(root / "chips", fsync=False)
    engine = sa.create_engine(url_of(pg_cluster, name), poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            insert_locations(conn, WORLD_POINTS, origin="manual", chip_size=64)
        source = SimulatedSource(seed=0, start=WORLD_START)
        IngestPipeline(engine, store, source, settings=IngestSettings()).run(
            since=datetime(2023, 1, 1, tzinfo=UTC), until=WORLD_END
        )
        with engine.connect() as conn:
            n = int(conn.execute(sa.text("SELECT count(*) FROM observation")).scalar_one())
        engine.dispose()
        yield LearnWorld(template=name, chips=root / "chips", observations=n)
    finally:
        engine.dispose()
        _drop_database(pg_cluster, name)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def world_url(pg_cluster: EmbeddedPostgres, learn_world: LearnWorld) -> Iterator[str]:
    """A copy of the ingested world's database, the test's own."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    _create_database(pg_cluster, name, template=learn_world.template)
    yield url_of(pg_cluster, name)
    _drop_database(pg_cluster, name)


@pytest.fixture
def world_engine(world_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(world_url, poolclass=sa.pool.NullPool)
    yield eng
    eng.dispose()


def learner_settings(url: str, data_dir: Path, **learner: object) -> Settings:
    """Small, fast learner settings on a world copy (tiny queue and batches)."""
    base: dict[str, object] = {
        "batch_size": 8,
        "queue_size": 64,
        "warmup_steps": 4,
        "refit_every": 4,
        "checkpoint_every": 5,
        "refresh_every": 5,
        "geo_clusters": 4,
        "prefetch": 2,
        "threads": int(TORCH_THREADS),
    }
    base.update(learner)
    return load_settings(database_url=url, data_dir=data_dir, learner=base)


@pytest.fixture
def world_store(learn_world: LearnWorld) -> ChipStore:
    return ChipStore(learn_world.chips)
