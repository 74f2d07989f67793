"""Sampling of locations around cities, and grids of locations inside areas."""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import pytest
from global_land_mask import globe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyproj import Geod, Transformer
from shapely import contains_xy
from shapely.geometry import MultiPolygon, Point, Polygon, box

from revisit.grid import utm_epsg
from revisit.ingest.sampling import (
    LandMask,
    _cities,
    _offset,
    grid_in_polygon,
    sample_locations,
)


@functools.cache
def _land_mask() -> LandMask:
    return LandMask.load()


def sample(n: int, **kwargs: Any) -> list[tuple[float, float]]:
    """``sample_locations`` with the land mask read once for the module, not per call
    (reading it takes seconds); a few tests call ``sample_locations`` itself."""
    return sample_locations(n, land_mask=_land_mask(), **kwargs)


GEOD = Geod(ellps="WGS84")
SPACING = 20_000.0  # large enough that the spacing rule bites around big cities

Points = list[tuple[float, float]]


def pairwise_geodesic_m(a: Points, b: Points) -> np.ndarray:
    """Geodesic distances between every point of a and every point of b, shape (len a, len b)."""
    lon1, lat1 = np.array(a, dtype=float).T
    lon2, lat2 = np.array(b, dtype=float).T
    l1, l2 = np.meshgrid(lon1, lon2, indexing="ij")
    p1, p2 = np.meshgrid(lat1, lat2, indexing="ij")
    _, _, dist = GEOD.inv(l1.ravel(), p1.ravel(), l2.ravel(), p2.ravel())
    return np.asarray(dist).reshape(len(a), len(b))


def min_pairwise_m(points: Points) -> float:
    d = pairwise_geodesic_m(points, points)
    d[np.diag_indices_from(d)] = np.inf
    return float(d.min())


@pytest.fixture(scope="module")
def spaced() -> Points:
    return sample(400, seed=7, min_spacing_m=SPACING)


@pytest.fixture(scope="module")
def default_sample() -> Points:
    return sample(1000, seed=3)


def test_returns_n_valid_lonlat(default_sample: Points) -> None:
    assert len(default_sample) == 1000
    lon, lat = np.array(default_sample).T
    assert np.isfinite(lon).all() and np.isfinite(lat).all()
    assert ((lon >= -180) & (lon < 180)).all()
    assert ((lat >= -90) & (lat <= 90)).all()
    assert all(type(x) is float and type(y) is float for x, y in default_sample)


def test_no_point_in_the_ocean(default_sample: Points, spaced: Points) -> None:
    for points in (default_sample, spaced):
        lon, lat = np.array(points).T
        assert globe.is_land(lat, lon).all()


def test_spacing_holds_pairwise(spaced: Points) -> None:
    assert min_pairwise_m(spaced) >= SPACING
    # The rule does bite: without it the same draw puts points closer together.
    unspaced = sample(400, seed=7, min_spacing_m=0.0)
    assert min_pairwise_m(unspaced) < SPACING


def test_default_spacing_is_one_chip(default_sample: Points) -> None:
    assert min_pairwise_m(default_sample[:500]) >= 640.0


def test_same_seed_same_points_and_different_seeds_differ(default_sample: Points) -> None:
    assert sample_locations(1000, seed=3) == default_sample
    other = sample(1000, seed=4)
    assert len(set(other) & set(default_sample)) == 0


def test_larger_n_extends_smaller_n(default_sample: Points) -> None:
    assert sample(250, seed=3) == default_sample[:250]


def test_existing_locations_are_kept_apart(spaced: Points) -> None:
    new = sample(300, seed=8, min_spacing_m=SPACING, existing=spaced)
    assert pairwise_geodesic_m(new, spaced).min() >= SPACING
    assert min_pairwise_m(new) >= SPACING
    # Without them, the same seed lands next to some of them.
    free = sample(300, seed=8, min_spacing_m=SPACING)
    assert pairwise_geodesic_m(free, spaced).min() < SPACING


def unit(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    lam, phi = np.radians(lon), np.radians(lat)
    return np.stack([np.cos(phi) * np.cos(lam), np.cos(phi) * np.sin(lam), np.sin(phi)], axis=-1)


def nearest_city_km(points: Points) -> np.ndarray:
    cities = _cities(15_000)
    towns = unit(cities.lon, cities.lat)
    here = unit(*np.array(points).T)
    cosines = np.concatenate([(chunk @ towns.T).max(axis=1) for chunk in np.array_split(here, 10)])
    return np.asarray(6371.0 * np.arccos(np.clip(cosines, -1.0, 1.0)))


def test_concentrated_near_cities(default_sample: Points) -> None:
    nearest_km = nearest_city_km(default_sample)
    assert np.median(nearest_km) < 100.0
    assert np.quantile(nearest_km, 0.99) < 300.0


def test_sigma_sets_the_spread() -> None:
    # With sigma 0 every point is a city centre; with sigma 50 km, few are.
    at_cities = sample(50, seed=1, sigma_m=0.0, min_spacing_m=0.0)
    assert (nearest_city_km(at_cities) < 0.01).all()
    spread = sample(50, seed=1, min_spacing_m=0.0)
    assert (nearest_city_km(spread) > 1.0).mean() > 0.8


def test_impossible_request_raises() -> None:
    with pytest.raises(ValueError, match=r"placed only \d+ of 100 locations"):
        sample(100, seed=0, min_spacing_m=3_000_000.0)
    with pytest.raises(ValueError, match="in 5 tries"):
        sample_locations(10, seed=0, max_tries=5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": -1}, "n must be"),
        ({"seed": -3}, "seed must be"),
        ({"sigma_m": math.nan}, "sigma_m"),
        ({"sigma_m": -1.0}, "sigma_m"),
        ({"min_spacing_m": math.inf}, "min_spacing_m"),
        ({"max_tries": -1}, "max_tries"),
        ({"existing": [(0.0, 0.0), (181.0, 0.0)]}, "existing location 1"),
        ({"existing": [(math.nan, 0.0)]}, "existing location 0 is not finite"),
        ({"min_population": 10**12}, "no GeoNames city"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"n": 5, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=message):
        sample_locations(**args)  # type: ignore[arg-type]


def test_zero_points() -> None:
    assert sample(0, seed=0) == []


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(min_value=0, max_value=2**63),
    n=st.integers(min_value=1, max_value=60),
    spacing=st.floats(min_value=0.0, max_value=200_000.0),
    sigma=st.floats(min_value=0.0, max_value=500_000.0),
)
def test_any_request_gives_spaced_land_points(
    seed: int, n: int, spacing: float, sigma: float
) -> None:
    try:
        points = sample(n, seed=seed, min_spacing_m=spacing, sigma_m=sigma)
    except ValueError as exc:
        assert "placed only" in str(exc)
        return
    assert len(points) == n
    lon, lat = np.array(points).T
    assert globe.is_land(lat, lon).all()
    if n > 1:
        assert min_pairwise_m(points) >= spacing


@given(
    lon=st.floats(min_value=-180.0, max_value=180.0),
    lat=st.floats(min_value=-90.0, max_value=90.0),
    east=st.floats(min_value=-1e8, max_value=1e8),
    north=st.floats(min_value=-1e8, max_value=1e8),
)
def test_offset_stays_in_range(lon: float, lat: float, east: float, north: float) -> None:
    new_lon, new_lat = _offset(*(np.array([v]) for v in (lon, lat, east, north)))
    assert -180.0 <= new_lon[0] < 180.0
    assert -90.0 <= new_lat[0] <= 90.0


def test_offset_converts_metres_with_latitude() -> None:
    lon, lat = _offset(
        np.array([10.0, 10.0]), np.array([0.0, 60.0]), np.array([111_320.0, 0.0]), np.zeros(2)
    )
    assert lon[0] == pytest.approx(11.0) and lat[0] == pytest.approx(0.0)
    lon, lat = _offset(np.array([10.0]), np.array([60.0]), np.array([55_660.0]), np.zeros(1))
    assert lon[0] == pytest.approx(11.0)  # cos 60° = 1/2
    lon, lat = _offset(np.array([179.5]), np.array([0.0]), np.array([111_320.0]), np.zeros(1))
    assert lon[0] == pytest.approx(-179.5)  # wrapped across the antimeridian
    lon, lat = _offset(np.array([0.0]), np.array([89.5]), np.zeros(1), np.array([111_320.0]))
    assert lat[0] == pytest.approx(89.5) and lon[0] == pytest.approx(-180.0)  # over the pole


# --- grids inside areas ---------------------------------------------------------------------


def to_utm(points: Points, epsg: int) -> np.ndarray:
    transformer = Transformer.from_crs(4326, epsg, always_xy=True)
    x, y = transformer.transform(*np.array(points).T)
    return np.stack([x, y], axis=-1)


PARIS = box(2.2, 48.8, 2.5, 48.95)


def test_grid_points_inside_polygon() -> None:
    triangle = Polygon([(2.2, 48.8), (2.5, 48.8), (2.35, 48.95)])
    for area in (PARIS, triangle):
        points = grid_in_polygon(area)
        assert points
        assert contains_xy(area, *np.array(points).T).all()


def test_grid_spacing_in_metres() -> None:
    centroid = PARIS.centroid
    epsg = utm_epsg(centroid.x, centroid.y)
    for spacing in (640.0, 1000.0):
        xy = to_utm(grid_in_polygon(PARIS, spacing_m=spacing), epsg)
        # On whole multiples of the spacing in the zone...
        np.testing.assert_allclose(xy / spacing, np.round(xy / spacing), atol=1e-6)
        # ...one spacing from the nearest neighbour...
        d = np.hypot(xy[:, None, 0] - xy[None, :, 0], xy[:, None, 1] - xy[None, :, 1])
        d[np.diag_indices_from(d)] = np.inf
        np.testing.assert_allclose(d.min(axis=1), spacing, rtol=1e-9)
        # ...and as many as the area holds.
        utm_area = Polygon(to_utm(list(PARIS.exterior.coords), epsg)).area
        assert len(xy) == pytest.approx(utm_area / spacing**2, rel=0.05)


def test_overlapping_areas_share_grid_points() -> None:
    a = box(2.2, 48.8, 2.5, 48.95)
    b = box(2.4, 48.9, 2.7, 49.1)
    ga = grid_in_polygon(a)
    gb = grid_in_polygon(b)
    in_both_a = {(round(x, 9), round(y, 9)) for x, y in ga if b.contains(Point(x, y))}
    in_both_b = {(round(x, 9), round(y, 9)) for x, y in gb if a.contains(Point(x, y))}
    assert len(in_both_a) > 50
    assert in_both_a == in_both_b


def test_grid_multipolygon_and_southern_hemisphere() -> None:
    parts = MultiPolygon([box(18.40, -33.95, 18.45, -33.90), box(18.50, -33.95, 18.55, -33.90)])
    points = grid_in_polygon(parts, spacing_m=500.0)
    lon, lat = np.array(points).T
    assert contains_xy(parts, lon, lat).all()
    assert (lon < 18.45).any() and (lon > 18.5).any()
    xy = to_utm(points, 32734)
    np.testing.assert_allclose(xy / 500.0, np.round(xy / 500.0), atol=1e-6)


def test_grid_smaller_than_spacing_can_be_empty() -> None:
    assert grid_in_polygon(box(2.30001, 48.80001, 2.30002, 48.80002)) == []


def test_too_large_polygon_refused() -> None:
    with pytest.raises(ValueError, match=r"about [\d,]+ grid points"):
        grid_in_polygon(box(-10.0, 40.0, 10.0, 60.0))
    with pytest.raises(ValueError, match=r"about 1,2\d\d,\d{3},\d{3} grid points"):
        grid_in_polygon(box(-180.0, -90.0, 180.0, 90.0))
    with pytest.raises(ValueError, match="max_points=100"):
        grid_in_polygon(PARIS, max_points=100)


@pytest.mark.parametrize(
    ("area", "message"),
    [
        (Polygon(), "empty"),
        (Polygon([(0, 0), (1, 1), (1, 0), (0, 1)]), "not valid"),
        (Point(0, 0), "Polygon or MultiPolygon"),
        (box(200.0, 0.0, 201.0, 1.0), "not in longitude/latitude"),
    ],
)
def test_bad_polygon_refused(area: Polygon, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        grid_in_polygon(area)


def test_bad_spacing_refused() -> None:
    for spacing in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="spacing_m"):
            grid_in_polygon(PARIS, spacing_m=spacing)


@settings(max_examples=30, deadline=None)
@given(
    lon=st.floats(min_value=-179.0, max_value=178.0),
    lat=st.floats(min_value=-79.0, max_value=78.0),
    width=st.floats(min_value=0.001, max_value=0.2),
    height=st.floats(min_value=0.001, max_value=0.2),
)
def test_grid_any_small_box(lon: float, lat: float, width: float, height: float) -> None:
    area = box(lon, lat, lon + width, lat + height)
    points = grid_in_polygon(area, spacing_m=1000.0)
    if not points:
        return
    assert contains_xy(area, *np.array(points).T).all()
    epsg = utm_epsg(area.centroid.x, area.centroid.y)
    xy = to_utm(points, epsg)
    np.testing.assert_allclose(xy / 1000.0, np.round(xy / 1000.0), atol=1e-6)
