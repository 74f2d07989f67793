"""The Sentinel Hub source through the whole pipeline, against the fake server on loopback."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa
from shapely.geometry import box

from revisit.config import IngestSettings
from revisit.db import aois, cursors
from revisit.db.locations import insert_locations
from revisit.ingest import reasons
from revisit.ingest.chips import ChipStore
from revisit.ingest.pipeline import IngestPipeline
from revisit.ingest.sources.sentinelhub import SentinelHubSource
from tests.ingest.fake_sentinelhub import (
    PARIS_ACQUIRED,
    PARIS_TILE,
    FakeSentinelHub,
    Fault,
    fake_sh_fixture,  # noqa: F401 - the fake_sh fixture
    require_oscd,
)

T0, TILE = PARIS_ACQUIRED, PARIS_TILE
INSIDE = [(2.333, 48.821), (2.340, 48.830), (2.350, 48.840)]  # inside the OSCD Paris crop
SETTINGS = IngestSettings(chip_size=32)


def _count(engine: sa.Engine, query: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text(query)).scalar_one())


def test_ingests_through_faults_without_losing_or_repeating_a_scene(
    fake_sh: FakeSentinelHub, engine: sa.Engine, tmp_path: Path
) -> None:
    require_oscd()
    for day in range(3):
        fake_sh.add_scene(
            f"S2A_MSIL2A_2016113{day}T105412_N0204_R051_T31UDQ", T0 + timedelta(days=day), TILE
        )
    with engine.begin() as conn:
        aoi = aois.create_aoi(conn, name="paris", geom=box(2.32, 48.81, 2.36, 48.85))
        insert_locations(conn, INSIDE, origin="manual", aoi_id=aoi.id, chip_size=32)
    source = SentinelHubSource(fake_sh.settings(max_retries=2), chip_size=32)
    store = ChipStore(tmp_path / "chips")

    # A storm of 503s outlasts the retries (3 attempts): the run stops at the first scene.
    fake_sh.inject("process", Fault.status(503), times=3)
    first = IngestPipeline(engine, store, source, settings=SETTINGS).run(
        aoi="paris", since=T0 - timedelta(days=1), until=T0 + timedelta(days=5)
    )
    assert first.interrupted is not None
    with engine.connect() as conn:
        cursor = cursors.get_cursor(conn, source="sentinelhub", aoi_id=aoi.id)
    assert cursor is None  # nothing committed, so the next run starts from the beginning
    assert _count(engine, "SELECT count(*) FROM scene") == 0
    assert _count(engine, "SELECT count(*) FROM quarantine") == 0

    # A token that expires mid-run and a reply cut short: the run goes on.
    fake_sh.expire_tokens()
    fake_sh.inject("process", Fault.truncated_tiff(), times=1)
    second = IngestPipeline(engine, store, source, settings=SETTINGS).run(aoi="paris")
    assert second.interrupted is None
    assert _count(engine, "SELECT count(*) FROM scene WHERE status = 'ingested'") == 3
    assert second.quarantined_by_reason == {reasons.BAD_REPLY: 1}
    chips = _count(engine, "SELECT count(*) FROM observation")
    assert chips == 3 * len(INSIDE) - 1
    with engine.connect() as conn:
        for key, sha in conn.execute(sa.text("SELECT chip_key, chip_sha256 FROM observation")):
            assert store.get(key, sha).shape == (12, 32, 32)
    source.close()
