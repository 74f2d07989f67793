"""The Sentinel Hub source against a fake Sentinel Hub on 127.0.0.1 (real HTTP, no internet)."""

from __future__ import annotations

import itertools
import logging
import time
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pytest
import rasterio
from pydantic import SecretStr
from pyproj import Transformer
from shapely.geometry import MultiPoint, box

from revisit.config import Settings
from revisit.errors import (
    ConfigError,
    IngestError,
    SceneRejectedError,
    SourceUnavailableError,
)
from revisit.grid import chip_grid_for
from revisit.ingest import reasons
from revisit.ingest.sources import build_source
from revisit.ingest.sources.sentinelhub import RetryPolicy, SentinelHubSource, evalscript
from revisit.types import CANONICAL_BANDS, Chip, LocationRef, Rejection, SceneRef
from tests.ingest.fake_sentinelhub import (
    CLIENT_SECRET,
    PARIS_ACQUIRED,
    PARIS_TILE,
    FakeSentinelHub,
    Fault,
    Sleeps,
    band_file,
    fake_sh_fixture,  # noqa: F401 - the fake_sh fixture
    require_oscd,
)

T0, TILE = PARIS_ACQUIRED, PARIS_TILE
CENTRE = (2.333, 48.821)  # inside the OSCD Paris crop
EDGE = (2.3101, 48.821)  # on its western edge: half the chip has data
FAR = (4.5, 45.0)  # outside the tile
PRODUCT = "S2A_MSIL2A_20161130T105412_N0204_R051_T31UDQ_20161130T105412"
AREA = MultiPoint([CENTRE, EDGE])


class Rejected:
    """An ``on_rejected`` callback that remembers its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    def __call__(self, ref: str, reason: str, detail: str) -> None:
        self.calls.append((ref, reason, detail))


def _source(fake: FakeSentinelHub, **overrides: Any) -> SentinelHubSource:
    policy = overrides.pop("policy", None)
    return SentinelHubSource(fake.settings(**overrides), chip_size=64, policy=policy)


def _location(location_id: int, lon_lat: tuple[float, float]) -> LocationRef:
    lon, lat = lon_lat
    return LocationRef(id=location_id, lon=lon, lat=lat, grid=chip_grid_for(lon, lat, size=64))


def _search(source: SentinelHubSource, **kwargs: Any) -> list[SceneRef]:
    rejected = kwargs.pop("on_rejected", Rejected())
    return list(
        source.search(
            since=kwargs.pop("since", T0 - timedelta(days=30)),
            until=kwargs.pop("until", T0 + timedelta(days=30)),
            area=kwargs.pop("area", AREA),
            on_rejected=rejected,
        )
    )


def _paris_scene(fake: FakeSentinelHub, source: SentinelHubSource) -> SceneRef:
    fake.add_scene(PRODUCT, T0, TILE, cloud_cover=12.5)
    (scene,) = _search(source)
    return scene


def _expected_pixels(grid: Any, band: str) -> tuple[np.ndarray, np.ndarray]:
    """Source raster values at the chip's pixel centres, and where the raster has data.

    Independent of the fake's warping: each centre is projected to lon/lat and
    looked up in the OSCD raster (nearest neighbour by construction).
    """
    folder = require_oscd()
    to_lonlat = Transformer.from_crs(grid.epsg, 4326, always_xy=True)
    minx, _, _, maxy = grid.bounds
    cols, rows = np.meshgrid(np.arange(grid.size), np.arange(grid.size))
    xs = minx + (cols + 0.5) * grid.resolution
    ys = maxy - (rows + 0.5) * grid.resolution
    lons, lats = to_lonlat.transform(xs, ys)
    with rasterio.open(band_file(folder, band)) as src:
        values = src.read(1)
        r, c = rasterio.transform.rowcol(src.transform, lons.ravel(), lats.ravel())
    r = np.asarray(r).reshape(grid.size, grid.size)
    c = np.asarray(c).reshape(grid.size, grid.size)
    inside = (r >= 0) & (r < values.shape[0]) & (c >= 0) & (c < values.shape[1])
    out = np.zeros((grid.size, grid.size), dtype=np.uint16)
    out[inside] = values[r[inside], c[inside]]
    return out, inside


# -- configuration -------------------------------------------------------------------------


def test_missing_credentials_is_a_clear_config_error(fake_sh: FakeSentinelHub) -> None:
    with pytest.raises(ConfigError, match=r"sentinelhub\.client_id.*sentinelhub\.client_secret"):
        SentinelHubSource(fake_sh.settings(client_id=None, client_secret=None))
    with pytest.raises(ConfigError, match=r"sentinelhub\.client_secret") as info:
        SentinelHubSource(fake_sh.settings(client_secret=SecretStr("")))
    assert "client_id" not in str(info.value)


def test_from_settings_and_build_source(fake_sh: FakeSentinelHub) -> None:
    settings = Settings(sentinelhub=fake_sh.settings(), ingest={"chip_size": 32})
    source = build_source("sentinelhub", settings)
    assert isinstance(source, SentinelHubSource)
    assert source.name == "sentinelhub"
    assert source.chip_size == 32
    assert source.policy == RetryPolicy(max_retries=3, backoff_s=0.001, max_backoff_s=0.05)
    with pytest.raises(ConfigError, match="client_id"):
        build_source("sentinelhub", Settings())
    source.close()


def test_rejected_credentials_are_a_config_error_without_the_secret(
    fake_sh: FakeSentinelHub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    source = _source(fake_sh, client_secret=SecretStr("wrong-" + CLIENT_SECRET))
    with pytest.raises(ConfigError, match="token endpoint refused") as info:
        _search(source)
    assert CLIENT_SECRET not in str(info.value)
    assert CLIENT_SECRET not in caplog.text
    assert fake_sh.hits["token"] == 1  # not retried


# -- search --------------------------------------------------------------------------------


def test_search_follows_pages_and_returns_scenes_oldest_first(fake_sh: FakeSentinelHub) -> None:
    fake_sh.page_size = 2
    ids = {
        "late": "S2B_MSIL2A_20161210T105412_N0204_R051_T31UDQ_20161210T105412",
        "early": "S2A_MSIL2A_20161120T105412_N0400_R051_T31UDQ_20161120T105412",
        "mid": PRODUCT,
        "other": "S2A_MSIL2A_20161125T105412_N0204_R051_T31UDP_20161125T105412",
    }
    fake_sh.add_scene(ids["late"], T0 + timedelta(days=10), TILE, cloud_cover=40)
    fake_sh.add_scene(ids["early"], T0 - timedelta(days=10), TILE, cloud_cover=0.5)
    fake_sh.add_scene("cloudy", T0 + timedelta(days=1), TILE, cloud_cover=95)
    fake_sh.add_scene("too-old", T0 - timedelta(days=90), TILE)
    fake_sh.add_scene(ids["mid"], T0, TILE, cloud_cover=12.5, **{"s2:processing_baseline": "02.04"})
    fake_sh.add_scene("elsewhere", T0, box(10, 10, 11, 11))
    # In the search bbox but touching none of the area's points: filtered on this side.
    fake_sh.add_scene("between", T0, box(2.315, 48.815, 2.325, 48.825))
    fake_sh.add_scene(ids["other"], T0 - timedelta(days=5), box(2.3, 48.8, 2.4, 48.9))

    source = _source(fake_sh, max_cloud_cover=80)
    scenes = _search(source)

    assert [s.product_id for s in scenes] == [ids["early"], ids["other"], ids["mid"], ids["late"]]
    assert fake_sh.hits["catalog"] == 3  # 5 features pass the server's filters, 2 per page
    first = fake_sh.catalog_bodies[0]
    assert first["collections"] == ["sentinel-2-l2a"]
    assert first["filter"] == "eo:cloud_cover < 80"
    assert first["datetime"] == "2016-10-31T10:57:02Z/2016-12-30T10:57:02Z"
    assert first["bbox"] == pytest.approx([EDGE[0], EDGE[1], CENTRE[0], CENTRE[1]])
    assert [b.get("next") for b in fake_sh.catalog_bodies] == [None, 2, 4]

    mid = scenes[2]
    assert mid.source == "sentinelhub"
    assert mid.acquired_at == T0 and mid.acquired_at.tzinfo is not None
    assert mid.cloud_cover == 12.5
    assert mid.level == "L2A"
    assert mid.tile_id == "T31UDQ"
    assert mid.processing_baseline == "02.04"  # from the properties
    assert scenes[0].processing_baseline == "04.00"  # from the product id
    assert mid.footprint.equals(TILE)
    assert dict(mid.extra)["collection"] == "sentinel-2-l2a"


def test_search_respects_the_time_range_and_since_none(fake_sh: FakeSentinelHub) -> None:
    fake_sh.add_scene("a", T0, TILE)
    fake_sh.add_scene("b", T0 + timedelta(days=2), TILE)
    source = _source(fake_sh)
    found = _search(source, since=T0 + timedelta(seconds=1), until=T0 + timedelta(days=2))
    assert [s.product_id for s in found] == ["b"]
    found = _search(source, since=None, until=T0)
    assert [s.product_id for s in found] == ["a"]
    assert fake_sh.catalog_bodies[-1]["datetime"].startswith("2015-06-01T00:00:00Z/")


def test_malformed_features_go_to_on_rejected_and_the_search_goes_on(
    fake_sh: FakeSentinelHub,
) -> None:
    fake_sh.add_scene("no-date", None, TILE)  # type: ignore[arg-type]
    fake_sh.add_scene("bad-date", "yesterday", TILE)  # type: ignore[arg-type]
    fake_sh.add_raw_feature(
        {"id": "bad-geometry", "geometry": {"type": "Polygon", "coordinates": [[1, 2]]},
         "properties": {"datetime": "2016-11-30T10:57:02Z", "eo:cloud_cover": 1}}
    )  # fmt: skip
    fake_sh.add_raw_feature(
        {"id": "no-geometry", "geometry": None,
         "properties": {"datetime": "2016-11-30T10:57:02Z", "eo:cloud_cover": 1}}
    )  # fmt: skip
    fake_sh.add_scene("good", T0, TILE)
    rejected = Rejected()
    found = _search(_source(fake_sh), on_rejected=rejected)
    assert [s.product_id for s in found] == ["good"]
    assert sorted(ref for ref, _, _ in rejected.calls) == [
        "bad-date",
        "bad-geometry",
        "no-date",
        "no-geometry",
    ]
    assert {reason for _, reason, _ in rejected.calls} == {reasons.BAD_REPLY}
    assert all(ref in detail for ref, _, detail in rejected.calls)


def test_a_malformed_catalog_page_is_unavailable_not_retried(fake_sh: FakeSentinelHub) -> None:
    """A page that is not JSON names no product to quarantine: the run stops, cursor unmoved."""
    fake_sh.add_scene("a", T0, TILE)
    fake_sh.inject("catalog", Fault.malformed_json())
    rejected = Rejected()
    with pytest.raises(SourceUnavailableError, match="catalog"):
        _search(_source(fake_sh), on_rejected=rejected)
    assert fake_sh.hits["catalog"] == 1
    assert rejected.calls == []
    assert [s.product_id for s in _search(_source(fake_sh))] == ["a"]  # next time it works


# -- read ----------------------------------------------------------------------------------


def test_read_returns_chips_whose_pixels_match_the_source_raster(fake_sh: FakeSentinelHub) -> None:
    require_oscd()
    source = _source(fake_sh)
    scene = _paris_scene(fake_sh, source)
    locations = [_location(1, CENTRE), _location(2, EDGE), _location(3, FAR)]

    results = list(source.read(scene, locations))

    assert [r.location_id for r in results] == [1, 2, 3]
    centre, edge, far = results
    assert isinstance(far, Rejection) and far.reason == reasons.NOT_COVERED
    assert fake_sh.hits["process"] == 2  # no request for the uncovered location
    for chip, loc in ((centre, locations[0]), (edge, locations[1])):
        assert isinstance(chip, Chip)
        assert chip.data.shape == (12, 64, 64)
        assert chip.data.dtype == np.uint16
        assert chip.grid == loc.grid
        valid = chip.data.any(axis=0)
        for index, band in enumerate(CANONICAL_BANDS):
            expected, inside = _expected_pixels(loc.grid, band)
            agree = (chip.data[index] == expected)[inside].mean()
            assert agree > 0.99, f"{band} of location {loc.id}: {agree:.3f} of pixels agree"
        _, inside = _expected_pixels(loc.grid, "B02")
        assert chip.valid_fraction == pytest.approx(inside.mean(), abs=0.02)
        assert valid.mean() == pytest.approx(chip.valid_fraction, abs=0.02)

    assert isinstance(centre, Chip) and isinstance(edge, Chip)
    assert centre.valid_fraction == 1.0
    assert 0.3 < edge.valid_fraction < 0.7
    # The fake's top 25 % of rows are cloud or shadow (SCL 3/8/9/10), the rest clear.
    assert centre.cloud_fraction == pytest.approx(16 / 64)
    assert edge.cloud_fraction == pytest.approx(16 / 64)

    body = fake_sh.process_bodies[0]
    grid = locations[0].grid
    assert body["input"]["bounds"]["properties"]["crs"].endswith("/EPSG/0/32631")
    assert body["input"]["bounds"]["bbox"] == list(grid.bounds)
    assert (body["output"]["width"], body["output"]["height"]) == (64, 64)
    data = body["input"]["data"][0]
    assert data["type"] == "sentinel-2-l2a"
    assert data["dataFilter"]["mosaickingOrder"] == "mostRecent"
    assert data["processing"]["harmonizeValues"] is True
    start = datetime.fromisoformat(data["dataFilter"]["timeRange"]["from"].replace("Z", "+00:00"))
    end = datetime.fromisoformat(data["dataFilter"]["timeRange"]["to"].replace("Z", "+00:00"))
    assert start < T0 < end and end - start <= timedelta(hours=1)
    assert body["evalscript"] == evalscript("SCL")
    assert 'sampleType: "UINT16"' in body["evalscript"]


def test_l1c_uses_the_cloud_mask_band(fake_sh: FakeSentinelHub) -> None:
    require_oscd()
    fake_sh.cloud_rows = 0.5
    source = _source(fake_sh, collection="sentinel-2-l1c")
    scene = _paris_scene(fake_sh, source)
    assert scene.level == "L1C"
    (chip,) = source.read(scene, [_location(1, CENTRE)])
    assert isinstance(chip, Chip)
    assert chip.cloud_fraction == pytest.approx(0.5)
    assert '"CLM"' in fake_sh.process_bodies[0]["evalscript"]
    assert fake_sh.process_bodies[0]["input"]["data"][0]["type"] == "sentinel-2-l1c"


def test_no_data_in_the_time_range_gives_an_empty_chip(fake_sh: FakeSentinelHub) -> None:
    require_oscd()
    source = _source(fake_sh)
    scene = _paris_scene(fake_sh, source)
    moved = SceneRef(**{**scene.__dict__, "acquired_at": T0 + timedelta(days=3)})
    (chip,) = source.read(moved, [_location(1, CENTRE)])
    assert isinstance(chip, Chip)
    assert chip.valid_fraction == 0.0 and chip.cloud_fraction == 0.0
    assert not chip.data.any()


@pytest.mark.parametrize("fault", [Fault.truncated_tiff(), Fault.wrong_band_count()])
def test_a_bad_chip_reply_rejects_that_location_only(
    fake_sh: FakeSentinelHub, fault: Fault
) -> None:
    require_oscd()
    source = _source(fake_sh)
    scene = _paris_scene(fake_sh, source)
    fake_sh.inject("process", fault)
    first, second = source.read(scene, [_location(1, CENTRE), _location(2, CENTRE)])
    assert isinstance(first, Rejection)
    assert first.location_id == 1 and first.reason == reasons.BAD_REPLY
    assert PRODUCT in first.detail and "location 1" in first.detail
    if fault.kind == "wrong-band-count":
        assert "13 bands" in first.detail
    assert isinstance(second, Chip)
    assert fake_sh.hits["process"] == 2  # a bad reply is not retried


def test_a_client_error_for_one_chip_is_a_rejection(fake_sh: FakeSentinelHub) -> None:
    source = _source(fake_sh)
    scene = _paris_scene(fake_sh, source)
    fake_sh.inject("process", Fault.status(400))
    (rejection,) = source.read(scene, [_location(1, CENTRE)])
    assert isinstance(rejection, Rejection)
    assert rejection.reason == reasons.BAD_REPLY and "HTTP 400" in rejection.detail
    assert fake_sh.hits["process"] == 1


def test_a_scene_of_another_source_is_rejected(fake_sh: FakeSentinelHub) -> None:
    scene = SceneRef(source="local", product_id="x", acquired_at=T0, footprint=TILE)
    with pytest.raises(SceneRejectedError) as info:
        list(_source(fake_sh).read(scene, [_location(1, CENTRE)]))
    assert info.value.reason == reasons.UNREADABLE


# -- retry policy --------------------------------------------------------------------------


def test_policy_delays() -> None:
    policy = RetryPolicy(max_retries=5, backoff_s=0.5, max_backoff_s=3.0)
    assert [policy.backoff(n) for n in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.retry_after("250", 0) == 0.25  # Sentinel Hub: milliseconds
    assert policy.retry_after("0", 3) == 0.0
    assert policy.retry_after("12.5", 0) == pytest.approx(0.0125)
    assert policy.retry_after("600000", 0) == 3.0  # capped
    assert policy.retry_after(None, 1) == 1.0  # no header: back-off
    assert policy.retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 2) == 2.0
    assert policy.retry_after("-5", 0) == 0.5
    seconds = RetryPolicy(retry_after_unit_s=1.0, max_backoff_s=10.0)
    assert seconds.retry_after("2", 0) == 2.0


def test_a_429_storm_then_success_honours_retry_after(fake_sh: FakeSentinelHub) -> None:
    require_oscd()
    sleeps = Sleeps()
    policy = RetryPolicy(max_retries=3, backoff_s=0.001, max_backoff_s=1.0, sleep=sleeps)
    source = _source(fake_sh, policy=policy)
    scene = _paris_scene(fake_sh, source)
    fake_sh.inject("process", Fault.status(429, retry_after="40"), times=3)

    (chip,) = source.read(scene, [_location(1, CENTRE)])

    assert isinstance(chip, Chip)
    assert fake_sh.hits["process"] == 4
    assert sleeps.delays == [0.04, 0.04, 0.04]
    arrivals = fake_sh.times("process")
    assert all(b - a >= 0.04 for a, b in itertools.pairwise(arrivals))


def test_429_on_the_catalog_and_without_retry_after(fake_sh: FakeSentinelHub) -> None:
    sleeps = Sleeps()
    policy = RetryPolicy(max_retries=2, backoff_s=0.001, max_backoff_s=1.0, sleep=sleeps)
    fake_sh.add_scene("a", T0, TILE)
    fake_sh.inject("catalog", Fault.status(429, retry_after="0"))
    fake_sh.inject("catalog", Fault.status(429))
    assert [s.product_id for s in _search(_source(fake_sh, policy=policy))] == ["a"]
    assert fake_sh.hits["catalog"] == 3
    assert sleeps.delays == [0.0, 0.002]  # Retry-After 0, then back-off of the 2nd retry


def test_5xx_then_success_backs_off_exponentially(fake_sh: FakeSentinelHub) -> None:
    require_oscd()
    sleeps = Sleeps()
    policy = RetryPolicy(max_retries=4, backoff_s=0.002, max_backoff_s=0.005, sleep=sleeps)
    source = _source(fake_sh, policy=policy)
    scene = _paris_scene(fake_sh, source)
    fake_sh.inject("process", Fault.status(500))
    fake_sh.inject("process", Fault.status(503), times=2)
    (chip,) = source.read(scene, [_location(1, CENTRE)])
    assert isinstance(chip, Chip)
    assert fake_sh.hits["process"] == 4
    assert sleeps.delays == [0.002, 0.004, 0.005]


def test_retries_exhausted_raise_source_unavailable(
    fake_sh: FakeSentinelHub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="revisit.ingest.sources.sentinelhub")
    source = _source(fake_sh, max_retries=2)
    scene = _paris_scene(fake_sh, source)
    fake_sh.inject("process", Fault.status(503), times=10)
    with pytest.raises(SourceUnavailableError) as info:
        list(source.read(scene, [_location(7, CENTRE)]))
    assert fake_sh.hits["process"] == 3
    message = str(info.value)
    assert "HTTP 503" in message and PRODUCT in message and "location_id 7" in message
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert [r.__dict__["attempt"] for r in retries] == [1, 2]
    assert all(r.__dict__["product_id"] == PRODUCT for r in retries)
    assert all(r.__dict__["location_id"] == 7 for r in retries)


def test_a_catalog_outage_raises_source_unavailable(fake_sh: FakeSentinelHub) -> None:
    fake_sh.inject("catalog", Fault.status(502), times=10)
    with pytest.raises(SourceUnavailableError, match="HTTP 502"):
        _search(_source(fake_sh, max_retries=1))
    assert fake_sh.hits["catalog"] == 2


def test_a_catalog_client_error_is_not_transient(fake_sh: FakeSentinelHub) -> None:
    fake_sh.inject("catalog", Fault.status(404))
    with pytest.raises(IngestError, match="HTTP 404") as info:
        _search(_source(fake_sh))
    assert not isinstance(info.value, SourceUnavailableError)
    assert fake_sh.hits["catalog"] == 1


def test_a_slow_reply_times_out_and_is_retried(fake_sh: FakeSentinelHub) -> None:
    fake_sh.add_scene("a", T0, TILE)
    fake_sh.inject("catalog", Fault.slow(0.6))
    source = _source(fake_sh, timeout_s=0.15)
    assert [s.product_id for s in _search(source)] == ["a"]
    assert fake_sh.hits["catalog"] == 2

    fake_sh.inject("catalog", Fault.slow(0.6), times=2)
    with pytest.raises(SourceUnavailableError, match=r"no reply within 0\.15 s"):
        _search(_source(fake_sh, timeout_s=0.15, max_retries=1))


def test_a_trickled_reply_is_cut_at_the_deadline_and_retried(fake_sh: FakeSentinelHub) -> None:
    # Each piece of the body comes well within the per-read timeout; the whole does not.
    require_oscd()
    source = _source(fake_sh, timeout_s=0.5)
    scene = _paris_scene(fake_sh, source)
    fake_sh.inject("process", Fault.trickle(3.0))
    started = time.monotonic()
    (chip,) = source.read(scene, [_location(1, CENTRE)])
    assert isinstance(chip, Chip)
    assert time.monotonic() - started < 2.0  # gave up after ~0.5 s, not 3 s
    assert fake_sh.hits["process"] == 2

    fake_sh.inject("process", Fault.trickle(3.0), times=2)
    with pytest.raises(SourceUnavailableError, match=r"reply not complete within 0\.5 s"):
        list(_source(fake_sh, timeout_s=0.5, max_retries=1).read(scene, [_location(1, CENTRE)]))


@pytest.mark.parametrize("partial", [False, True], ids=["before-reply", "mid-body"])
def test_a_reset_connection_is_transient_and_never_a_bad_chip(
    fake_sh: FakeSentinelHub, partial: bool
) -> None:
    require_oscd()
    source = _source(fake_sh)
    scene = _paris_scene(fake_sh, source)
    fake_sh.inject("process", Fault.reset(partial=partial), times=2)
    (chip,) = source.read(scene, [_location(1, CENTRE)])
    assert isinstance(chip, Chip)  # half a GeoTIFF after a reset is retried, not rejected
    assert [h.status for h in fake_sh.log if h.endpoint == "process"] == [0, 0, 200]

    fake_sh.inject("catalog", Fault.reset(partial=partial), times=2)
    with pytest.raises(SourceUnavailableError, match="connection failed"):
        _search(_source(fake_sh, max_retries=1))


def test_a_token_expiring_mid_run_costs_one_refresh(fake_sh: FakeSentinelHub) -> None:
    require_oscd()
    source = _source(fake_sh, max_retries=0)
    scene = _paris_scene(fake_sh, source)
    assert fake_sh.tokens_issued == 1  # the catalog search used it
    fake_sh.inject("process", Fault.expire_token())  # it expires as the first chip is asked for
    chips = list(source.read(scene, [_location(1, CENTRE), _location(2, CENTRE)]))
    assert all(isinstance(c, Chip) for c in chips)
    assert fake_sh.tokens_issued == 2
    assert [h.status for h in fake_sh.log if h.endpoint == "process"] == [401, 200, 200]


def test_calls_share_one_kept_alive_connection_until_a_fault_breaks_it(
    fake_sh: FakeSentinelHub,
) -> None:
    require_oscd()
    source = _source(fake_sh)
    scene = _paris_scene(fake_sh, source)
    list(source.read(scene, [_location(1, CENTRE), _location(2, EDGE)]))
    assert len({hit.client_port for hit in fake_sh.log}) == 1  # token, catalog, 2 chips
    fake_sh.inject("process", Fault.trickle(3.0))
    list(_source(fake_sh, timeout_s=0.5).read(scene, [_location(1, CENTRE)]))
    ports = [hit.client_port for hit in fake_sh.log if hit.endpoint == "process"]
    assert ports[-1] != ports[-2]  # the call given up on is not reused


def test_a_refused_connection_is_transient(fake_sh: FakeSentinelHub) -> None:
    url = fake_sh.url
    fake_sh.stop()
    settings = fake_sh.settings(base_url=url, token_url=url + "/oauth/token", max_retries=1)
    with pytest.raises(SourceUnavailableError, match="connection failed"):
        _search(SentinelHubSource(settings))


def test_token_endpoint_errors_are_retried(fake_sh: FakeSentinelHub) -> None:
    fake_sh.add_scene("a", T0, TILE)
    fake_sh.inject("token", Fault.status(503))
    fake_sh.inject("token", Fault.status(429, retry_after="1"))
    assert [s.product_id for s in _search(_source(fake_sh))] == ["a"]
    assert fake_sh.hits["token"] == 3
    assert fake_sh.tokens_issued == 1


def test_an_expired_token_is_refreshed_once(fake_sh: FakeSentinelHub) -> None:
    require_oscd()
    source = _source(fake_sh, max_retries=0)  # a refresh does not use up a retry
    scene = _paris_scene(fake_sh, source)
    assert fake_sh.tokens_issued == 1
    fake_sh.expire_tokens()

    (chip,) = source.read(scene, [_location(1, CENTRE)])

    assert isinstance(chip, Chip)
    assert fake_sh.tokens_issued == 2
    assert [h.status for h in fake_sh.log if h.endpoint == "process"] == [401, 200]
    (chip,) = source.read(scene, [_location(1, CENTRE)])  # the new token is kept
    assert fake_sh.tokens_issued == 2


def test_a_401_that_a_new_token_does_not_fix_is_unavailable(fake_sh: FakeSentinelHub) -> None:
    source = _source(fake_sh, max_retries=1)
    scene = _paris_scene(fake_sh, source)
    fake_sh.inject("process", Fault.status(401), times=10)
    with pytest.raises(SourceUnavailableError, match="HTTP 401"):
        list(source.read(scene, [_location(1, CENTRE)]))
    # 1st try, 401 -> new token, 2nd try, 401 -> back-off retry, 3rd try, 401 -> give up
    assert fake_sh.hits["process"] == 3
    assert fake_sh.tokens_issued == 2


def test_the_secret_and_tokens_never_reach_logs_or_errors(
    fake_sh: FakeSentinelHub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    source = _source(fake_sh, max_retries=2)
    fake_sh.add_scene(PRODUCT, T0, TILE)
    fake_sh.inject("token", Fault.status(500))
    fake_sh.inject("catalog", Fault.status(429, retry_after="1"))
    (scene,) = _search(source)
    fake_sh.expire_tokens()
    fake_sh.inject("process", Fault.status(503), times=5)
    errors: list[str] = []
    try:
        list(source.read(scene, [_location(1, CENTRE)]))
    except SourceUnavailableError as exc:
        errors.append(str(exc))
        errors.append(repr(exc.__cause__) + repr(exc.__context__))
    assert errors, "the read was expected to fail"
    text = caplog.text + "\n".join(errors) + repr(source.settings) + str(source.settings)
    assert "retrying" in caplog.text  # the logs are there ...
    assert CLIENT_SECRET not in text  # ... without the secret
    assert "Bearer" not in text
    assert "eyJ" not in text  # no JWT (base64url of '{"')
