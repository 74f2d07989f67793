"""The STAC source against a real STAC API and COG server on loopback, built from real data.

The fake (``tests/ingest/fake_stac.py``) serves the OSCD band files and the L2A
SAFE converted to COGs, honours ``Range`` and counts the bytes it sends. The
checks: chips equal what the local source cuts from the same files; a chip
reads a small part of each file; the offset and SCL are handled per item;
faults are retried or quarantined with their reasons; the CLI ingests
idempotently.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from shapely.geometry import box
from shapely.geometry.base import BaseGeometry

from revisit.config import IngestSettings, StacSettings
from revisit.db import aois
from revisit.db.locations import insert_locations
from revisit.errors import IngestError, SceneRejectedError, SourceUnavailableError
from revisit.grid import chip_grid_for
from revisit.ingest import reasons
from revisit.ingest.chips import ChipStore
from revisit.ingest.pipeline import IngestPipeline
from revisit.ingest.sampling import grid_in_polygon
from revisit.ingest.sources.local import LocalSource, product_footprint
from revisit.ingest.sources.retry import RetryPolicy
from revisit.ingest.sources.stac import PlanetaryComputerSigner, StacSource, clear_http_cache
from revisit.types import Chip, LocationRef, Rejection, SceneRef
from tests.ingest.fake_sentinelhub import OSCD_IMAGES
from tests.ingest.fake_stac import (
    ES_COLLECTION,
    ES_ITEM_ID,
    L2A_SAFE,
    OSCD_COLLECTION,
    PC_COLLECTION,
    PC_ITEM_ID,
    FakeStac,
    Fault,
    fake_stac_fixture,  # noqa: F401
    oscd_item_id,
)
from tests.test_cli import revisit

NOW = datetime(2030, 1, 1, tzinfo=UTC)
SIZE = 32


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def _source(fake: FakeStac, collection: str, *, retries: int = 3) -> tuple[StacSource, Sleeps]:
    sleeps = Sleeps()
    policy = RetryPolicy(
        max_retries=retries,
        backoff_s=0.001,
        max_backoff_s=0.01,
        retry_after_unit_s=1.0,  # what StacSource's own policy says
        sleep=sleeps,
    )
    settings = StacSettings(api_url=fake.url, collection=collection, timeout_s=10)
    return StacSource(settings, policy=policy), sleeps


def _locations(area: BaseGeometry, *, spacing_m: float = 800, start: int = 1) -> list[LocationRef]:
    points = grid_in_polygon(area.buffer(-0.003), spacing_m=spacing_m)
    return [
        LocationRef(start + i, x, y, chip_grid_for(x, y, size=SIZE))
        for i, (x, y) in enumerate(points)
    ]


def _search(source: StacSource, area: BaseGeometry) -> tuple[list[SceneRef], list[tuple[str, ...]]]:
    rejected: list[tuple[str, ...]] = []
    scenes = list(
        source.search(
            since=None, until=NOW, area=area, on_rejected=lambda *r: rejected.append(tuple(r))
        )
    )
    return scenes, rejected


def _forget(*scenes: SceneRef) -> None:
    """Make GDAL forget the scenes' files, so the next read goes to the server."""
    for scene in scenes:
        clear_http_cache([f"/vsicurl/{href}" for href in scene.extra["assets"].values()])


def _chips(items: list[Chip | Rejection]) -> dict[int, Chip]:
    return {c.location_id: c for c in items if isinstance(c, Chip)}


def test_chips_equal_the_local_sources_and_read_a_small_part_of_each_file(
    fake_stac: FakeStac,
) -> None:
    city = OSCD_IMAGES / "paris"
    area = product_footprint(city / "imgs_1")
    source, sleeps = _source(fake_stac, OSCD_COLLECTION)
    scenes, rejected = _search(source, area)
    assert rejected == []
    assert [s.product_id for s in scenes] == [
        f"{OSCD_COLLECTION}/{oscd_item_id('paris', 1)}",
        f"{OSCD_COLLECTION}/{oscd_item_id('paris', 2)}",
    ]
    first = scenes[0]
    assert first.level == "L1C" and first.processing_baseline == "02.06"
    assert first.tile_id == "T31UDQ" and first.cloud_cover == pytest.approx(4.2)
    assert first.extra["offset"] == 0

    locations = _locations(area)
    assert len(locations) >= 8
    local = LocalSource(city)
    local_scenes = list(local.search(since=None, until=NOW, area=area, on_rejected=print))
    for scene, local_scene in zip(scenes, local_scenes, strict=True):
        remote = _chips(list(source.read(scene, locations)))
        here = _chips(list(local.read(local_scene, locations)))
        assert set(remote) == set(here) == {loc.id for loc in locations}
        for loc_id, chip in remote.items():
            np.testing.assert_array_equal(chip.data, here[loc_id].data)
            assert chip.valid_fraction == here[loc_id].valid_fraction
    assert sleeps == []

    # One chip: a few tiles of each COG, not the files (GDAL's cache forgotten first).
    _forget(scenes[0])
    fake_stac.reset_counters()
    one = list(source.read(scenes[0], locations[:1]))
    assert isinstance(one[0], Chip)
    item = oscd_item_id("paris", 1)
    paths = fake_stac.local_paths(item)
    total = sum(path.stat().st_size for key, path in paths.items() if key != "cirrus")
    served = fake_stac.total_bytes_served()
    assert 0 < served < 0.5 * total, (served, total)
    assert fake_stac.request_count("B10.tif") == 0  # cirrus is not one of the 12


def test_l2a_offset_and_scl_per_item_equal_the_local_safe(fake_stac: FakeStac) -> None:
    area = product_footprint(L2A_SAFE)
    centre = area.centroid
    locations = [
        LocationRef(
            i + 1,
            centre.x + dx,
            centre.y + dy,
            chip_grid_for(centre.x + dx, centre.y + dy, size=SIZE),
        )
        for i, (dx, dy) in enumerate([(-0.2, -0.2), (0.0, 0.0), (0.2, 0.1), (-0.1, 0.2)])
    ]
    pc, _ = _source(fake_stac, PC_COLLECTION)
    es, _ = _source(fake_stac, ES_COLLECTION)
    (pc_scene,), _ = _search(pc, area)
    (es_scene,), _ = _search(es, area)
    assert pc_scene.product_id == f"{PC_COLLECTION}/{PC_ITEM_ID}"
    assert es_scene.product_id == f"{ES_COLLECTION}/{ES_ITEM_ID}"
    assert pc_scene.level == es_scene.level == "L2A"
    # Planetary Computer's COGs carry the +1000; Earth Search says it removed it.
    assert pc_scene.extra["offset"] == -1000 and es_scene.extra["offset"] == 0
    from_pc = _chips(list(pc.read(pc_scene, locations)))
    from_es = _chips(list(es.read(es_scene, locations)))
    local = LocalSource(L2A_SAFE)
    (local_scene,) = list(local.search(since=None, until=NOW, area=area, on_rejected=print))
    from_safe = _chips(list(local.read(local_scene, locations)))
    assert set(from_pc) == set(from_safe) and len(from_pc) >= 3
    clouds = []
    for loc_id, chip in from_pc.items():
        np.testing.assert_array_equal(chip.data, from_safe[loc_id].data)
        np.testing.assert_array_equal(chip.data, from_es[loc_id].data)
        assert chip.cloud_fraction == pytest.approx(from_safe[loc_id].cloud_fraction)
        assert chip.valid_fraction == pytest.approx(from_safe[loc_id].valid_fraction)
        clouds.append(chip.cloud_fraction)
    assert max(clouds) > 0  # the SCL was read: this product is cloudy


def test_the_cloud_filter_and_paging(fake_stac: FakeStac) -> None:
    source, _ = _source(fake_stac, OSCD_COLLECTION)
    source.settings = StacSettings(
        api_url=fake_stac.url, collection=OSCD_COLLECTION, page_size=1, max_cloud_cover=80
    )
    rennes = product_footprint(OSCD_IMAGES / "rennes" / "imgs_1")
    paris = product_footprint(OSCD_IMAGES / "paris" / "imgs_1")
    scenes, _ = _search(source, rennes.union(paris).envelope)
    ids = [s.product_id.split("/")[1] for s in scenes]
    assert oscd_item_id("rennes", 2) not in ids  # 86.5 % cloud
    assert {oscd_item_id("rennes", 1), oscd_item_id("paris", 1), oscd_item_id("paris", 2)} == set(
        ids
    )
    assert fake_stac.search_requests >= 3  # one item a page
    assert [s.acquired_at for s in scenes] == sorted(s.acquired_at for s in scenes)


class _NoQueryExtension(FakeStac):
    """A STAC API without the query extension: it would ignore ``query`` if sent."""

    def landing(self) -> dict[str, Any]:
        page = super().landing()
        page["conformsTo"] = [c for c in page["conformsTo"] if not c.endswith("#query")]
        return page


def test_an_api_without_the_query_extension_is_filtered_here(fake_stac: FakeStac) -> None:
    bare = _NoQueryExtension(fake_stac.catalog)
    bare.start()
    try:
        source, _ = _source(bare, OSCD_COLLECTION)
        rennes = product_footprint(OSCD_IMAGES / "rennes" / "imgs_1")
        scenes, _ = _search(source, rennes)
        assert [s.product_id.split("/")[1] for s in scenes] == [oscd_item_id("rennes", 1)]
        assert bare.search_params and all("query" not in p for p in bare.search_params)
    finally:
        bare.stop()


def test_search_faults_are_retried_then_reported(fake_stac: FakeStac) -> None:
    source, sleeps = _source(fake_stac, OSCD_COLLECTION, retries=3)
    paris = product_footprint(OSCD_IMAGES / "paris" / "imgs_1")
    fake_stac.inject("/search", Fault.status(503))
    fake_stac.inject("/search", Fault.reset())
    scenes, _ = _search(source, paris)
    assert len(scenes) == 2 and len(sleeps) == 2
    # A 429 waits what its Retry-After says (seconds, as RFC 9110 has it).
    fake_stac.inject("/search", Fault.status(429, retry_after="0.005"))
    sleeps.clear()
    assert len(_search(source, paris)[0]) == 2
    assert sleeps == [pytest.approx(0.005)]
    fake_stac.inject("/search", Fault.status(502), times=10)
    with pytest.raises(SourceUnavailableError, match="after 4 attempts"):
        _search(source, paris)
    fake_stac.clear_faults()
    wrong, _ = _source(fake_stac, "no-such-collection")
    fake_stac.inject("/search", Fault.status(400))
    with pytest.raises(IngestError, match="refused the search"):
        _search(wrong, paris)


def test_read_faults_are_retried(fake_stac: FakeStac) -> None:
    source, sleeps = _source(fake_stac, OSCD_COLLECTION, retries=4)
    paris = product_footprint(OSCD_IMAGES / "paris" / "imgs_1")
    scenes, _ = _search(source, paris)
    locations = _locations(paris)[:3]
    clean = _chips(list(source.read(scenes[0], locations)))
    _forget(*scenes)
    # The header of one COG fails at open, then a tile read of another is reset.
    fake_stac.inject("/files/paris/1/B04.tif", Fault.status(503), times=2)
    fake_stac.inject("/files/paris/1/B11.tif", Fault.reset())
    again, retried = _source(fake_stac, OSCD_COLLECTION, retries=4)
    faulty = _chips(list(again.read(scenes[0], locations)))
    assert set(faulty) == set(clean)
    for loc_id, chip in faulty.items():
        np.testing.assert_array_equal(chip.data, clean[loc_id].data)
    assert sleeps == [] and 2 <= len(retried) <= 4
    fake_stac.inject("/files/paris/2/B04.tif", Fault.status(500), times=50)
    stubborn, waited = _source(fake_stac, OSCD_COLLECTION, retries=2)
    with pytest.raises(SourceUnavailableError, match="HTTP 500"):
        list(stubborn.read(scenes[1], locations))
    assert len(waited) == 2


def test_bad_items_and_files_are_rejected_with_their_reasons(fake_stac: FakeStac) -> None:
    source, _ = _source(fake_stac, OSCD_COLLECTION)
    paris = product_footprint(OSCD_IMAGES / "paris" / "imgs_1")
    fake_stac.drop_asset(oscd_item_id("paris", 2), "red")
    undated = fake_stac.add_item_without_datetime(oscd_item_id("paris", 1))
    scenes, rejected = _search(source, paris)
    assert [s.product_id for s in scenes] == [f"{OSCD_COLLECTION}/{oscd_item_id('paris', 1)}"]
    by_reason = {r[1]: r for r in rejected}
    assert set(by_reason) == {reasons.WRONG_BAND_COUNT, reasons.MISSING_METADATA}
    assert "B04" in by_reason[reasons.WRONG_BAND_COUNT][2]
    assert undated in by_reason[reasons.MISSING_METADATA][0]

    # A COG cut short: its header reads, its later tiles do not.
    locations = _locations(paris)
    fake_stac.truncate("/files/paris/1/B02.tif")
    with pytest.raises(SceneRejectedError) as error:
        list(source.read(scenes[0], locations))
    assert error.value.reason == reasons.CORRUPT_RASTER
    assert "truncated" in error.value.detail


def test_a_band_file_missing_on_the_server_is_unreadable(fake_stac: FakeStac) -> None:
    source, _ = _source(fake_stac, OSCD_COLLECTION)
    paris = product_footprint(OSCD_IMAGES / "paris" / "imgs_1")
    scenes, _ = _search(source, paris)
    scene = scenes[0]
    assets = dict(scene.extra["assets"])
    assets["B03"] = assets["B03"].replace(".tif", "-gone.tif")
    moved = SceneRef(**{**scene.__dict__, "extra": {**scene.extra, "assets": assets}})
    with pytest.raises(SceneRejectedError) as error:
        list(source.read(moved, _locations(paris)[:2]))
    assert error.value.reason == reasons.UNREADABLE
    assert "HTTP 404" in error.value.detail


def test_the_pipeline_quarantines_bad_items_and_ingests_idempotently(
    fake_stac: FakeStac, engine: sa.Engine, tmp_path: Path
) -> None:
    paris = product_footprint(OSCD_IMAGES / "paris" / "imgs_1")
    with engine.begin() as conn:
        aoi = aois.create_aoi(conn, name="paris", geom=paris)
        points = grid_in_polygon(paris.buffer(-0.003), spacing_m=1000)
        insert_locations(conn, points, origin="aoi-grid", aoi_id=aoi.id, chip_size=SIZE)
    # Three bad inputs: an item without a date, one lacking its red band, a truncated COG.
    fake_stac.add_item_without_datetime(oscd_item_id("paris", 1))
    second = fake_stac.item(oscd_item_id("paris", 2))
    no_red = {k: v for k, v in second["assets"].items() if k != "red"}
    fake_stac.add_raw_item({**second, "id": f"{second['id']}-no-red", "assets": no_red})
    fake_stac.truncate("/files/paris/1/B02.tif")
    source, _ = _source(fake_stac, OSCD_COLLECTION)
    store = ChipStore(tmp_path / "chips")
    pipeline = IngestPipeline(engine, store, source, settings=IngestSettings(chip_size=SIZE))
    first = pipeline.run(aoi="paris", since=None, until=NOW)
    assert (first.scenes, first.chips) == (1, len(points))
    assert first.quarantined_by_reason == {
        reasons.MISSING_METADATA: 1,
        reasons.WRONG_BAND_COUNT: 1,
        reasons.CORRUPT_RASTER: 1,
    }
    again = pipeline.run(aoi="paris", since=None, until=NOW)
    assert (again.scenes, again.chips) == (0, 0)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT source, product_id, status, metadata FROM scene ORDER BY acquired_at")
        ).all()
        quarantined = conn.execute(
            sa.text("SELECT source, ref, reason, detail FROM quarantine ORDER BY reason")
        ).all()
    # The truncated scene's row says it was quarantined; only the good one has chips.
    assert [(r.source, r.product_id, r.status == "quarantined") for r in rows] == [
        ("stac", f"{OSCD_COLLECTION}/{oscd_item_id('paris', 1)}", True),
        ("stac", f"{OSCD_COLLECTION}/{oscd_item_id('paris', 2)}", False),
    ]
    assert rows[1].metadata["offset"] == 0 and rows[1].metadata["collection"] == OSCD_COLLECTION
    by_reason = {q.reason: q for q in quarantined}
    assert set(by_reason) == {
        reasons.MISSING_METADATA,
        reasons.WRONG_BAND_COUNT,
        reasons.CORRUPT_RASTER,
    }
    assert all(q.source == "stac" for q in quarantined)
    assert len(quarantined) == 3, quarantined  # a second run does not quarantine them again
    assert "truncated" in by_reason[reasons.CORRUPT_RASTER].detail
    assert "B04" in by_reason[reasons.WRONG_BAND_COUNT].detail


def test_revisit_ingest_source_stac_from_the_cli(
    fake_stac: FakeStac, cli_env: dict[str, str], database_url: str, engine: sa.Engine
) -> None:
    env = {
        **cli_env,
        "REVISIT_DATABASE_URL": database_url,
        "REVISIT_INGEST__CHIP_SIZE": str(SIZE),
        "REVISIT_STAC__MAX_RETRIES": "2",
        "REVISIT_STAC__BACKOFF_S": "0.01",
    }
    folder = OSCD_IMAGES / "paris" / "imgs_1"
    assert revisit("aoi", "add", "paris", "--footprint", str(folder), env=env).returncode == 0
    grid = revisit("sample", "--aoi", "paris", "--grid", "--spacing", "1200", env=env)
    assert grid.returncode == 0, grid.stderr
    args = ("ingest", "--source", "stac", "--aoi", "paris", "--catalog", fake_stac.url)
    args += ("--collection", OSCD_COLLECTION)
    run = revisit(*args, env=env)
    assert run.returncode == 0, run.stderr
    with engine.connect() as conn:
        chips = conn.execute(sa.text("SELECT count(*) FROM observation")).scalar_one()
        n = conn.execute(sa.text("SELECT count(*) FROM location")).scalar_one()
    assert chips == 2 * n > 0
    rerun = revisit(*args, env=env)
    assert rerun.returncode == 0, rerun.stderr
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM observation")).scalar_one() == chips
    bad = revisit("ingest", "--source", "stac", "--catalog", "ftp://x", env=env)
    assert bad.returncode != 0 and "--catalog" in bad.stderr


# -- Planetary Computer signing -------------------------------------------------------------


@pytest.fixture
def token_server() -> Iterator[tuple[str, list[str]]]:
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            asked.append(self.path)
            if len(asked) == 1:
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = json.dumps(
                {"msft:expiry": "2099-01-01T00:00:00Z", "token": f"se=2099&sig=abc{len(asked)}"}
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api/sas/v1/token", asked
    finally:
        server.shutdown()
        server.server_close()


def test_planetary_computer_urls_are_signed_with_a_cached_token(
    token_server: tuple[str, list[str]],
) -> None:
    url, asked = token_server
    sleeps = Sleeps()
    signer = PlanetaryComputerSigner(
        url,
        "sentinel-2-l2a",
        policy=RetryPolicy(max_retries=2, backoff_s=0.001, sleep=sleeps),
        timeout_s=5,
    )
    blob = "https://sentinel2l2a01.blob.core.windows.net/sentinel2-l2/29/U/NU/B04.tif"
    signed = signer(blob)
    assert signed == f"{blob}?se=2099&sig=abc2"
    assert signer(blob + "?x=1") == f"{blob}?x=1&se=2099&sig=abc2"
    assert signer("http://127.0.0.1:1/other.tif") == "http://127.0.0.1:1/other.tif"
    assert signer(signed) == signed  # already signed
    assert asked == ["/api/sas/v1/token/sentinel-2-l2a"] * 2 and len(sleeps) == 1
    signer.refresh()
    assert signer(blob).endswith("sig=abc3")


def test_a_scene_of_another_source_is_refused(fake_stac: FakeStac) -> None:
    source, _ = _source(fake_stac, OSCD_COLLECTION)
    other = SceneRef("local", "x", NOW, box(0, 0, 1, 1))
    with pytest.raises(SceneRejectedError, match="not stac"):
        list(source.read(other, [LocationRef(1, 0.5, 0.5, chip_grid_for(0.5, 0.5))]))
