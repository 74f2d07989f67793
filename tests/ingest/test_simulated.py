"""The simulated source: schedule, determinism, spectra, texture, clouds, planted change."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from itertools import pairwise

import numpy as np
import pytest
from shapely.geometry import MultiPoint, Point, box

from revisit.config import Settings
from revisit.errors import SceneRejectedError
from revisit.grid import chip_grid_for
from revisit.ingest import reasons
from revisit.ingest.simworld import draw_profile, render_chip, world_for
from revisit.ingest.simworld import landcover as lc
from revisit.ingest.simworld.events import KINDS
from revisit.ingest.simworld.orbit import SceneWeather
from revisit.ingest.sources.simulated import SimTruth, SimulatedSource
from revisit.types import CANONICAL_BANDS, Chip, LocationRef, Rejection, SceneRef

START = date(2023, 1, 1)
CLEAR = SceneWeather(
    cloud_cover=0.0,
    aod550=0.1,
    vapour_scale=1.0,
    shift_px=(0.0, 0.0),
    cloud_height_km=1.0,
    thin_clouds=False,
)
B03, B04, B08, B11 = (CANONICAL_BANDS.index(b) for b in ("B03", "B04", "B08", "B11"))


def loc(i: int, lon: float, lat: float, size: int = 64) -> LocationRef:
    return LocationRef(id=i, lon=lon, lat=lat, grid=chip_grid_for(lon, lat, size=size))


def utc(year: int, month: int, day: int) -> datetime:
    return datetime(year, month, day, tzinfo=UTC)


def ignore(*_: str) -> None:
    raise AssertionError("the simulated source never rejects a product")


def find(
    pred: Callable[[lc.LocationProfile], bool], lon0: float, lat0: float, n: int = 3000
) -> tuple[float, float]:
    """The first point of a fixed sweep whose profile satisfies ``pred``."""
    for k in range(n):
        lon, lat = lon0 + (0.0173 * k) % 0.9, lat0 + (0.0111 * k) % 0.9
        if pred(draw_profile(0, lon, lat, START)):
            return lon, lat
    raise AssertionError("no such location in the sweep")


def clear_chip(lon: float, lat: float, day: date, seed: int = 0) -> np.ndarray:
    world = world_for(seed, lon, lat, START, chip_grid_for(lon, lat, size=64))
    data, cloud_fraction = render_chip(world, day, "S2A", CLEAR)
    assert cloud_fraction == 0.0
    return data.astype(np.float64)


@pytest.fixture(scope="module")
def src() -> SimulatedSource:
    return SimulatedSource(seed=0)


@pytest.fixture(scope="module")
def paris() -> list[LocationRef]:
    return [loc(i, 2.31 + 0.013 * i, 48.52 + 0.011 * i) for i in range(6)]


@pytest.fixture(scope="module")
def paris_scenes(src: SimulatedSource, paris: list[LocationRef]) -> list[SceneRef]:
    area = MultiPoint([(p.lon, p.lat) for p in paris])
    return list(src.search(since=None, until=utc(2023, 12, 31), area=area, on_rejected=ignore))


# --- search -----------------------------------------------------------------------------


def test_scenes_every_five_days_alternating_satellites(paris_scenes: list[SceneRef]) -> None:
    assert len(paris_scenes) == 73  # 365 days / 5
    times = [s.acquired_at for s in paris_scenes]
    assert all(b - a == timedelta(days=5) for a, b in pairwise(times))
    sats = [s.extra["satellite"] for s in paris_scenes]
    assert set(sats) == {"S2A", "S2B"}
    assert all(a != b for a, b in pairwise(sats))
    first = paris_scenes[0]
    assert first.source == "simulated" and first.level == "L1C"
    assert first.tile_id == "X+0002_Y+0048"
    assert first.product_id.startswith(f"SIM_{first.extra['satellite']}_2023")
    assert first.product_id.endswith("_X+0002_Y+0048")
    assert first.footprint.equals(box(2, 48, 3, 49))
    assert first.acquired_at.tzinfo is not None
    # 10:30 local solar time at 2.5 deg E is about 10:20 UTC.
    hour = first.acquired_at.hour + first.acquired_at.minute / 60
    assert 10.0 < hour < 10.5
    assert len({s.product_id for s in paris_scenes}) == len(paris_scenes)
    json.dumps(dict(first.extra))
    assert all(0.0 <= (s.cloud_cover or 0.0) <= 100.0 for s in paris_scenes)


def test_tiles_ascending_across_tiles_with_own_orbits(src: SimulatedSource) -> None:
    area = MultiPoint([(2.5, 48.5), (30.5, 10.5), (-60.5, -20.5), (120.5, 40.5)])
    scenes = list(src.search(since=None, until=utc(2023, 3, 1), area=area, on_rejected=ignore))
    keys = [(s.acquired_at, s.product_id) for s in scenes]
    assert keys == sorted(keys)
    by_tile: dict[str, list[datetime]] = {}
    for s in scenes:
        by_tile.setdefault(str(s.tile_id), []).append(s.acquired_at)
    assert len(by_tile) == 4
    assert all(len(v) in (11, 12) for v in by_tile.values())
    first_days = {v[0].date() for v in by_tile.values()}
    assert len(first_days) > 1  # tiles are not all seen on the same day


def test_since_until_and_start_respected(src: SimulatedSource) -> None:
    area = Point(2.5, 48.5)
    every = list(src.search(since=None, until=utc(2023, 2, 1), area=area, on_rejected=ignore))
    assert every[0].acquired_at >= utc(2023, 1, 1)
    early = list(
        src.search(since=utc(2020, 1, 1), until=utc(2023, 2, 1), area=area, on_rejected=ignore)
    )
    assert [s.product_id for s in early] == [s.product_id for s in every]
    one = every[3].acquired_at
    exact = list(src.search(since=one, until=one, area=area, on_rejected=ignore))
    assert [s.product_id for s in exact] == [every[3].product_id]
    assert list(src.search(since=one + timedelta(seconds=1), until=one, area=area,
                           on_rejected=ignore)) == []  # fmt: skip
    later = SimulatedSource(seed=0, start=date(2023, 1, 20))
    assert all(
        s.acquired_at >= utc(2023, 1, 20)
        for s in later.search(since=None, until=utc(2023, 2, 1), area=area, on_rejected=ignore)
    )
    with pytest.raises(ValueError, match="timezone-aware"):
        list(src.search(since=None, until=datetime(2023, 2, 1), area=area, on_rejected=ignore))


def test_only_tiles_that_intersect_the_area(src: SimulatedSource) -> None:
    aoi = box(2.2, 48.2, 3.4, 48.8)  # spans tiles x=2 and x=3 of row y=48
    scenes = list(src.search(since=None, until=utc(2023, 1, 31), area=aoi, on_rejected=ignore))
    assert {s.tile_id for s in scenes} == {"X+0002_Y+0048", "X+0003_Y+0048"}
    assert all(s.footprint.intersects(aoi) for s in scenes)
    ocean = box(-40.6, 30.2, -40.4, 30.4)
    tiles = {s.tile_id for s in src.search(since=None, until=utc(2023, 1, 31), area=ocean,
                                          on_rejected=ignore)}  # fmt: skip
    assert tiles == {"X-0041_Y+0030"}


# --- read ---------------------------------------------------------------------------------


def test_chips_shapes_and_determinism(
    src: SimulatedSource, paris: list[LocationRef], paris_scenes: list[SceneRef]
) -> None:
    scene = paris_scenes[30]
    chips = list(src.read(scene, paris))
    assert [c.location_id for c in chips] == [p.id for p in paris]
    for chip, ref in zip(chips, paris, strict=True):
        assert isinstance(chip, Chip)
        assert chip.data.shape == (12, 64, 64) and chip.data.dtype == np.uint16
        assert chip.valid_fraction == 1.0 and 0.0 <= chip.cloud_fraction <= 1.0
        assert chip.grid == ref.grid
        assert chip.data.min() >= 1
    again = list(SimulatedSource(seed=0).read(scene, paris))
    assert all(
        isinstance(b, Chip) and a.data.tobytes() == b.data.tobytes()
        for a, b in zip(chips, again, strict=True)
        if isinstance(a, Chip)
    )
    other_world = SimulatedSource(seed=1)
    other_scene = replace(scene, extra={**scene.extra, "seed": 1})
    other = list(other_world.read(other_scene, paris))
    assert all(
        isinstance(b, Chip) and a.data.tobytes() != b.data.tobytes()
        for a, b in zip(chips, other, strict=True)
        if isinstance(a, Chip)
    )
    small = list(src.read(scene, [loc(99, 2.4, 48.6, size=24)]))
    assert isinstance(small[0], Chip) and small[0].data.shape == (12, 24, 24)


def test_location_outside_the_tile_is_not_covered(
    src: SimulatedSource, paris_scenes: list[SceneRef]
) -> None:
    out = list(src.read(paris_scenes[0], [loc(1, 2.5, 48.5), loc(2, 12.5, 41.9)]))
    assert isinstance(out[0], Chip)
    assert isinstance(out[1], Rejection)
    assert out[1].location_id == 2 and out[1].reason == reasons.NOT_COVERED


def test_bad_metadata_rejects_the_scene(
    src: SimulatedSource, paris: list[LocationRef], paris_scenes: list[SceneRef]
) -> None:
    broken = replace(paris_scenes[0], extra={"satellite": "S2A"})
    with pytest.raises(SceneRejectedError) as info:
        list(src.read(broken, paris))
    assert info.value.reason == reasons.MISSING_METADATA


def test_from_settings() -> None:
    source = SimulatedSource.from_settings(
        Settings(simulated={"seed": 7, "start": date(2024, 3, 1), "tile_size_deg": 0.5})
    )
    assert (source.seed, source.start, source.tile_size_deg) == (7, date(2024, 3, 1), 0.5)
    with pytest.raises(ValueError):
        SimulatedSource(tile_size_deg=0)


# --- realism ------------------------------------------------------------------------------


def test_spectral_sanity() -> None:
    lon, lat = find(lambda p: p.mix[lc.FOREST] > 0.6 and p.event is None, 8.05, 48.05)
    world = world_for(0, lon, lat, START, chip_grid_for(lon, lat, size=64))
    summer = clear_chip(lon, lat, date(2023, 7, 10))
    ndvi = (summer[B08] - summer[B04]) / (summer[B08] + summer[B04])
    forest = world.land_cover(date(2023, 7, 10)) == lc.FOREST
    assert np.median(ndvi[forest]) > 0.5
    assert 2000 < np.median(summer[B08][forest]) < 4500

    lon, lat = find(lambda p: p.mix[lc.WATER] > 0.3 and p.event is None, 8.05, 48.05)
    world = world_for(0, lon, lat, START, chip_grid_for(lon, lat, size=64))
    chip = clear_chip(lon, lat, date(2023, 7, 10))
    water = world.land_cover(date(2023, 7, 10)) == lc.WATER
    assert water.mean() > 0.1
    assert np.median(chip[B08][water]) < 500
    assert np.median(chip[B11][water]) < 300

    lon, lat = find(lambda p: p.t_mean - p.t_amp < -8 and p.event is None, 25.05, 62.05)
    winter = clear_chip(lon, lat, date(2023, 2, 20))
    snow = winter[B03] > 5000
    assert snow.mean() > 0.3
    assert np.median(winter[B11][snow]) < 2000  # snow is dark in SWIR, unlike cloud


def test_chips_are_textured() -> None:
    for i in range(6):
        lon, lat = 5.1 + 0.07 * i, 45.2 + 0.05 * i
        chip = clear_chip(lon, lat, date(2023, 6, 20))
        nir = chip[B08]
        assert nir.std() / nir.mean() > 0.03, (lon, lat)
        assert len(np.unique(nir)) > 200


def test_clouds_and_cloud_fraction(
    src: SimulatedSource, paris: list[LocationRef], paris_scenes: list[SceneRef]
) -> None:
    fractions, bright = [], []
    for scene in paris_scenes[::2]:
        for chip in src.read(scene, paris[:3]):
            assert isinstance(chip, Chip)
            x = chip.data.astype(np.float64)
            # Thick cloud: bright in the visible *and* still bright at 1.6 um.
            cloudy = (x[1] > 4500) & (x[B11] > 4000)
            fractions.append(chip.cloud_fraction)
            bright.append(cloudy.mean())
            if (scene.cloud_cover or 0.0) <= 2.0:
                assert chip.cloud_fraction == 0.0
    f, b = np.array(fractions), np.array(bright)
    assert (f == 0).mean() > 0.3
    assert (f > 0.2).sum() >= 5
    assert np.all(b <= f + 0.03)
    assert np.all(b[f == 0] == 0)
    assert np.corrcoef(f, b)[0, 1] > 0.6


def test_about_ten_percent_of_locations_change(src: SimulatedSource) -> None:
    rng = np.random.default_rng(3)
    lons, lats = rng.uniform(-10, 30, 300), rng.uniform(35, 60, 300)
    locs = [
        loc(i, float(a), float(b), size=16) for i, (a, b) in enumerate(zip(lons, lats, strict=True))
    ]
    truth = src.ground_truth(locs)
    assert [t.location_id for t in truth] == list(range(300))
    changed = [t for t in truth if t.kind is not None]
    assert 0.05 <= len(changed) / len(truth) <= 0.15
    for t in changed:
        assert t.kind in KINDS and t.event_date is not None
        assert START <= t.event_date <= START + timedelta(days=3 * 365)
        assert 0.05 < t.changed_fraction < 0.95
    assert all(t == SimTruth(t.location_id, None, None, 0.0) for t in truth if t.kind is None)
    assert len({t.kind for t in changed}) == 3


def _same_season_difference(lon: float, lat: float) -> float:
    before = clear_chip(lon, lat, date(2023, 7, 10))
    after = clear_chip(lon, lat, date(2025, 7, 10))
    return float(np.abs(after - before).mean())


def test_change_shows_and_seasons_are_not_change() -> None:
    def eventful(kind: str) -> Callable[[lc.LocationProfile], bool]:
        def pred(p: lc.LocationProfile) -> bool:
            ev = p.event
            return (
                ev is not None and ev.kind == kind and date(2023, 8, 1) <= ev.day < date(2025, 1, 1)
            )

        return pred

    changed: list[float] = []
    stable: list[float] = []
    for kind in KINDS:
        lon, lat = find(eventful(kind), 3.05, 46.05)
        changed.append(_same_season_difference(lon, lat))
    for i in range(4):
        lon, lat = find(lambda p: p.event is None, 3.05 + 0.21 * i, 46.05)
        stable.append(_same_season_difference(lon, lat))
        # Winter and summer differ a lot, yet the location has no event.
        winter = clear_chip(lon, lat, date(2023, 1, 20))
        summer = clear_chip(lon, lat, date(2023, 7, 10))
        assert np.abs(summer - winter).mean() > 2 * max(stable[-1], 1.0)
    assert min(changed) > 3 * max(stable), (changed, stable)
