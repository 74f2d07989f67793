"""A binary change mask and its polygons from a change-score raster (DESIGN §5).

The input is a float32 single-band score GeoTIFF/COG as ``revisit changemap
pair`` writes it: higher means more change; NaN (or any non-finite value, or
the file's own nodata value) means no data. The outputs are

- a **mask**: a uint8 Cloud-Optimized GeoTIFF on the score raster's exact grid
  (CRS, transform, size), ``0`` no change, ``1`` change, ``255`` no data
  (its nodata value), deflate, checked with ``rio_cogeo.cogeo.cog_validate``;
- optionally **polygons**: an RFC 7946 FeatureCollection of the change regions
  in lon/lat (EPSG:4326), counter-clockwise exterior rings, each Feature with
  ``id``, ``area_m2`` (geodesic, WGS84), ``mean_score`` and ``pixels``, and a
  foreign member ``revisit`` with the threshold and the parameters.

Steps, in bounded memory (the score is read in strips of ``block`` rows, with
GDAL's block cache held to :data:`GDAL_CACHE_MB`; only the uint8 mask and, for
polygons or a minimum area, an int32 label array of the whole grid are held,
never a float copy of the scores). On a synthetic 10980 x 10980 tile
(2 shared cores) the peak resident size, ~250 MB of imports included, was
1.0 GB with a 1-pixel opening and a 300 m² unit (3,021 polygons, 30 s), and
1.26 GB without clean-up (446,000 one-pixel polygons of noise, 65 s):

1. **Threshold**: given, or chosen automatically from :func:`score_sample`
   by :func:`automatic_threshold`. A pixel changes where ``score > threshold``.
2. **Opening** (``opening_radius_px`` > 0): a binary opening with a disk of
   that radius (``skimage.morphology.opening`` with ``mode="ignore"``: pixels
   outside the image are ignored, as in ``binary_opening``), strip by strip
   with a halo of twice the radius (erosion and dilation each reach one
   radius), so the result equals one whole-image pass. No-data pixels count as
   unchanged in the opening and are 255 afterwards.
3. **Minimum mapping unit** (``min_area_m2`` > 0): the change regions
   (4-connected: pixels sharing an edge) are labelled once with
   ``scipy.ndimage.label``; their sizes are counted strip by strip with
   ``np.bincount``; regions with fewer pixels than ``min_area_m2`` needs become
   0. No-change and no-data pixels are never altered (GDAL's sieve would also
   fill small holes and merge no-data). The same labels then give the
   polygons, so every polygon is at least the mapping unit
   (``skimage.morphology.remove_small_objects`` would label the grid a second
   time and count it in one int64 copy, 1 GB on a full tile). The pixel area
   comes from the transform and the CRS's linear unit; for a geographic CRS
   (EPSG:4326, say) it is the geodesic area (``pyproj.Geod`` on the CRS's
   ellipsoid) of the pixel at the raster's centre, so the unit is exact at the
   centre latitude and approximate away from it.
4. **Polygons**: ``rasterio.features.shapes`` of the label array, 4-connected
   (one valid polygon per region, holes as interior rings; 8-connectivity
   would join regions touching at a corner into self-touching, invalid
   rings). They are reprojected to EPSG:4326 with ``pyproj.Transformer``
   (``always_xy``), all the vertices of 4,096 polygons in one call through
   ``shapely.transform``: ``rasterio.warp.transform_geom`` per polygon gave
   the same coordinates but made the noisy tile above take 410 s, not 65 s.
   A polygon that comes out wider than 180° of longitude crosses the
   antimeridian and is redone with ``transform_geom``, which cuts it into a
   MultiPolygon. Rings are oriented with ``shapely.geometry.polygon.orient``
   (exteriors counter-clockwise, RFC 7946 §3.1.6) and rounded to 7 decimals
   (about 1 cm); ``area_m2`` is measured before rounding, with
   ``pyproj.Geod(ellps="WGS84").geometry_area_perimeter``. ``mean_score`` is
   the mean score of the region's pixels, summed strip by strip with
   ``np.bincount``. With no changed pixel the collection is empty and still
   written.

Every file is written to a temporary name beside its target, fsynced and
renamed (the mask only after it is a valid COG, both only after both are
complete), so a failure never leaves a part of a file.

**The automatic threshold.** Change is rare (0.3-2.6 % of the pixels of the
labelled OSCD cities) and score distributions are heavy-tailed: a bulk of
unchanged pixels and a long upper tail that holds the change, a few extreme
values (clouds, saturation, edge effects) at its end. Measured by
``bench/threshold.py`` on the four labelled OSCD cities with CVA and with the
dense stem of a random encoder (pooled F1 at the automatic threshold, CVA /
stem; the best F1 reachable, one oracle threshold per city, is 0.31 / 0.27):

- ``otsu`` on the scores: 0.13 / 0.12. Not too much flagged here but too
  little: the extreme tail drags the split far out (rennes flags 0.1 %,
  F1 0.00), and one pixel at ten times the maximum makes it flag nothing
  (CVA);
- ``otsu-log``, Otsu on log(scores): 0.07 / 0.08, flagging 28-35 % of the
  pixels: in log space it splits the unchanged bulk itself in two;
- ``mixture``, a two-component Gaussian mixture on log(scores), threshold where
  the upper component's posterior crosses 0.5: 0.10 / 0.12, flagging 17-23 %:
  the log bulk is not Gaussian, and the second component fits its skew, not
  the rare change;
- ``triangle`` (the default): Zack's triangle method
  (``skimage.filters.threshold_triangle``), made for this shape -- one
  dominant peak and a long thin tail of rare foreground -- applied to the log
  of the positive scores at or above their median: 0.28 / 0.24, flagging
  4.0 / 4.4 % (per city, CVA: 0.19 / 0.22 / 0.07 / 0.48 against the best
  0.19 / 0.26 / 0.10 / 0.53). Its two choices are for robustness, not for
  these cities: on the raw scores the triangle does as well on clean data
  (0.29 / 0.25) but ten pixels at 100x the maximum take it to 0.00 / 0.01 and
  one at 10x to 0.09 / 0.09, while in log space it stays at 0.28 / 0.21 and
  0.28 / 0.24; on all the log scores, ten near-zero scores give the log a long
  lower tail, the method follows that one and flags 100 %, while the upper
  half alone (change assumed a minority, < 50 %) is unmoved. No constant is
  fitted: the bins are scikit-image's default 256.

A 1-pixel opening lifts the default's pooled F1 to 0.30 (CVA) / 0.24 (stem);
clean-up is off unless asked for.

Connectivity is 4 throughout (labels, minimum area, polygons).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt
import rasterio
import rasterio.errors
import rasterio.features
import rasterio.transform
import rasterio.warp
import shapely
from pyproj import CRS as ProjCRS
from pyproj import Geod, Transformer
from rasterio.crs import CRS
from rasterio.io import DatasetReader
from rasterio.windows import Window
from rio_cogeo.profiles import cog_profiles
from scipy import ndimage
from shapely.geometry import MultiPolygon, Polygon, shape
from shapely.geometry.polygon import orient
from skimage.filters import threshold_otsu, threshold_triangle
from skimage.morphology import disk, opening
from sklearn.mixture import GaussianMixture

from revisit.errors import ExportError
from revisit.export.changemap import _publish, _temporary, translate_to_cog

__all__ = [
    "CONNECTIVITY",
    "DEFAULT_THRESHOLD_METHOD",
    "NODATA",
    "THRESHOLD_METHODS",
    "VALUES_MEANING",
    "MaskResult",
    "automatic_threshold",
    "score_sample",
    "write_change_mask",
]

log = logging.getLogger(__name__)

#: The automatic thresholds :func:`automatic_threshold` knows (see the module docstring).
THRESHOLD_METHODS: tuple[str, ...] = ("triangle", "otsu", "otsu-log", "mixture")
#: Chosen by measurement on OSCD: see the module docstring.
DEFAULT_THRESHOLD_METHOD = "triangle"
#: The ``threshold_method`` tag when the caller gave the threshold.
GIVEN_METHOD = "given"
#: The mask's nodata value.
NODATA = 255
#: What the mask's values mean (its ``values`` tag).
VALUES_MEANING = "0 no change, 1 change, 255 no data"
#: Pixel connectivity of change regions: 4 (pixels sharing an edge).
CONNECTIVITY = 4
#: The Gaussian mixture is fitted on at most this many values (evenly spaced in the sample).
_MIXTURE_MAX_VALUES = 500_000
#: Points on which the mixture's posterior is evaluated to find where it crosses 0.5.
_MIXTURE_GRID = 4097
#: Tile side of the mask's intermediate GTiff and of the COG.
_TILE = 512
_DECIMALS = 7
#: Polygons reprojected per PROJ call.
_POLYGON_BATCH = 4096
#: GDAL's block cache (MB) while a mask is made: every tile is read about once, so a
#: small cache loses nothing, and GDAL's default (5 % of the machine's RAM) would
#: fill with the decompressed score raster.
GDAL_CACHE_MB = 128
_WGS84 = Geod(ellps="WGS84")
_EPSG4326 = CRS.from_epsg(4326)
_CROSS = ndimage.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class MaskResult:
    """What :func:`write_change_mask` wrote.

    Attributes:
        mask_path: The mask COG.
        polygons_path: The GeoJSON, or None when none was asked for.
        threshold: The threshold applied (``score > threshold`` is change).
        method: ``given`` or the automatic method used.
        valid_pixels: Pixels with a finite score.
        changed_pixels: Pixels that are 1 in the final mask.
        polygons: Features written (0 without ``polygons_path``).
        seconds: Wall time.
    """

    mask_path: Path
    polygons_path: Path | None
    threshold: float
    method: str
    valid_pixels: int
    changed_pixels: int
    polygons: int
    seconds: float


# -- reading ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _open_score(path: Path) -> Iterator[DatasetReader]:
    """Open a one-band score raster, or raise ExportError saying what is wrong with it."""
    if not path.exists():
        raise ExportError(f"score file {path} not found")
    if not path.is_file():
        raise ExportError(f"score file {path} is not a file")
    try:
        dataset = rasterio.open(path)
    except (rasterio.errors.RasterioError, OSError) as exc:
        raise ExportError(f"cannot read the score file {path}: {exc}") from exc
    with dataset:
        if dataset.count != 1:
            raise ExportError(
                f"score file {path} has {dataset.count} bands; a change score has exactly one"
            )
        yield dataset


def _strips(height: int, block: int) -> Iterator[tuple[int, int]]:
    for top in range(0, height, block):
        yield top, min(height, top + block)


def _read_rows(dataset: DatasetReader, top: int, bottom: int) -> npt.NDArray[np.float32]:
    """Rows ``top:bottom`` of the score as float32, NaN wherever there is no data."""
    try:
        values: npt.NDArray[np.float32] = dataset.read(
            1, window=Window(0, top, dataset.width, bottom - top), out_dtype=np.float32
        )
    except (rasterio.errors.RasterioError, OSError) as exc:
        raise ExportError(f"cannot read rows {top}-{bottom} of {dataset.name}: {exc}") from exc
    values[~np.isfinite(values)] = np.nan
    nodata = dataset.nodata
    if nodata is not None and math.isfinite(nodata):
        values[values == np.float32(nodata)] = np.nan
    return values


def _check_block(block: int) -> None:
    if block < 1:
        raise ExportError(f"block must be at least 1 row, got {block}")


def score_sample(
    score_path: Path, *, max_pixels: int = 4_000_000, block: int = 1024
) -> npt.NDArray[np.float32]:
    """A deterministic sample of the finite scores of a raster, read strip by strip.

    All the finite scores when there are at most ``max_pixels``; otherwise
    exactly ``max_pixels`` of them, evenly spaced in raster order (the k-th of
    the sample is the ``floor(k * n / max_pixels)``-th finite score, n the
    number of finite scores). The raster is read once, or twice when it has
    more finite scores than ``max_pixels``.

    Args:
        score_path: A one-band score GeoTIFF.
        max_pixels: The most values returned.
        block: Rows read at a time.

    Returns:
        A 1-d float32 array, empty when the raster has no finite score.

    Raises:
        ExportError: The file is missing, unreadable or not one band, or
            ``max_pixels`` or ``block`` is below 1.
    """
    if max_pixels < 1:
        raise ExportError(f"max_pixels must be at least 1, got {max_pixels}")
    _check_block(block)
    path = Path(score_path)
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB), _open_score(path) as dataset:
        kept: list[npt.NDArray[np.float32]] = []
        counts: list[int] = []
        total = 0
        for top, bottom in _strips(dataset.height, block):
            values = _read_rows(dataset, top, bottom)
            finite = values[np.isfinite(values)]
            counts.append(int(finite.size))
            total += int(finite.size)
            if total <= max_pixels:
                kept.append(finite)
            else:
                kept.clear()
        if total <= max_pixels:
            return np.concatenate(kept) if kept else np.empty(0, dtype=np.float32)
        parts: list[npt.NDArray[np.float32]] = []
        first = 0  # ordinal of the strip's first finite score
        for (top, bottom), count in zip(_strips(dataset.height, block), counts, strict=True):
            # The sample indices j whose ordinal j*n//m falls in [first, first + count).
            start = -((-first * max_pixels) // total)
            stop = -((-(first + count) * max_pixels) // total)
            if stop > start:
                finite = _read_rows(dataset, top, bottom)
                finite = finite[np.isfinite(finite)]
                ordinals = np.arange(start, stop, dtype=np.int64) * total // max_pixels
                parts.append(finite[ordinals - first])
            first += count
        return np.concatenate(parts)


# -- thresholds -------------------------------------------------------------------------------


def _mixture_threshold(log_values: npt.NDArray[np.float64]) -> float:
    """Where the upper component's posterior of a 2-Gaussian mixture first reaches 0.5."""
    step = max(1, math.ceil(log_values.size / _MIXTURE_MAX_VALUES))
    fitted = log_values[::step].reshape(-1, 1)
    mixture = GaussianMixture(n_components=2, random_state=0).fit(fitted)
    means = mixture.means_.ravel()
    upper = int(np.argmax(means))
    # Above the lower component's mean: with unequal variances the posterior of the
    # broader component also reaches 0.5 far out in the lower tail.
    grid = np.linspace(float(means.min()), float(log_values.max()), _MIXTURE_GRID)
    posterior = mixture.predict_proba(grid.reshape(-1, 1))[:, upper]
    above = np.flatnonzero(posterior >= 0.5)
    if above.size == 0:
        return float(log_values.max())  # no value is more likely upper: nothing changes
    i = int(above[0])
    if i == 0:
        return float(grid[0])
    return float(np.interp(0.5, posterior[i - 1 : i + 1], grid[i - 1 : i + 1]))


def automatic_threshold(
    sample: npt.NDArray[np.floating[Any]], method: str = DEFAULT_THRESHOLD_METHOD
) -> float:
    """A change threshold for a sample of scores (``score > threshold`` is change).

    Methods (see the module docstring for how they compare):

    - ``triangle``: ``skimage.filters.threshold_triangle`` of log(score) over
      the positive scores at or above their median;
    - ``otsu``: ``skimage.filters.threshold_otsu`` of the scores;
    - ``otsu-log``: Otsu of log(score) over the positive scores;
    - ``mixture``: a 2-component ``sklearn.mixture.GaussianMixture`` on
      log(score) of the positive scores (fitted on at most 500,000 of them,
      evenly spaced); the threshold is where the posterior of the component
      with the larger mean first reaches 0.5 above the other's mean.

    The log methods treat scores <= 0 as unchanged. When the values to
    threshold are all equal there is nothing to separate: the threshold is the
    largest score, so nothing changes.

    Args:
        sample: Scores, any shape; non-finite values are ignored.
        method: One of :data:`THRESHOLD_METHODS`.

    Returns:
        The threshold, in score units.

    Raises:
        ExportError: An unknown method, or no finite value in the sample.
    """
    if method not in THRESHOLD_METHODS:
        raise ExportError(
            f"unknown threshold method {method!r}; expected one of {', '.join(THRESHOLD_METHODS)}"
        )
    values = np.asarray(sample, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ExportError("the score sample has no finite value: nothing to threshold")
    highest = float(values.max())
    if float(values.min()) == highest:
        return highest
    if method == "otsu":
        return float(threshold_otsu(values))  # type: ignore[no-untyped-call]
    positive = values[values > 0]
    if positive.size == 0 or float(positive.min()) == float(positive.max()):
        return highest
    log_values = np.log(positive)
    if method == "otsu-log":
        return float(np.exp(threshold_otsu(log_values)))  # type: ignore[no-untyped-call]
    if method == "mixture":
        return float(np.exp(_mixture_threshold(log_values)))
    upper = log_values[log_values >= np.median(log_values)]
    if float(upper.min()) == float(upper.max()):
        return highest
    return float(np.exp(threshold_triangle(upper)))  # type: ignore[no-untyped-call]


# -- areas ------------------------------------------------------------------------------------


def _pixel_area_m2(crs: CRS, transform: Any, width: int, height: int) -> float:
    """Area of one pixel in m²: from the transform, or geodesic at the centre if geographic."""
    if crs.is_geographic:
        col, row = width // 2, height // 2
        lons, lats = rasterio.transform.xy(
            transform, [row, row, row + 1, row + 1], [col, col + 1, col + 1, col], offset="ul"
        )
        geod = ProjCRS.from_wkt(crs.to_wkt()).get_geod() or _WGS84
        area, _ = geod.polygon_area_perimeter(lons, lats)
        return abs(float(area))
    try:
        _unit, factor = crs.linear_units_factor
    except rasterio.errors.CRSError as exc:
        raise ExportError(f"the score raster's CRS {crs} has no linear unit: {exc}") from exc
    return abs(float(transform.determinant)) * float(factor) ** 2


def _min_pixels(min_area_m2: float, pixel_area_m2: float) -> int:
    """Fewest pixels a region needs to cover ``min_area_m2`` (a tiny tolerance for rounding)."""
    if min_area_m2 <= 0:
        return 0
    return max(1, math.ceil(min_area_m2 / pixel_area_m2 * (1 - 1e-9)))


# -- the mask ---------------------------------------------------------------------------------


def _threshold_rows(
    dataset: DatasetReader,
    mask: npt.NDArray[np.uint8],
    *,
    threshold: float,
    radius: int,
    block: int,
) -> int:
    """Fill ``mask`` (0, 1, 255) strip by strip, opened with a disk; returns valid pixels."""
    height = dataset.height
    halo = 2 * radius
    footprint = disk(radius) if radius > 0 else None  # type: ignore[no-untyped-call]
    valid_pixels = 0
    for top, bottom in _strips(height, block):
        start, stop = max(0, top - halo), min(height, bottom + halo)
        score = _read_rows(dataset, start, stop)
        changed = score > threshold  # NaN compares False: no data is unchanged here
        if footprint is not None:
            changed = opening(changed, footprint=footprint, mode="ignore")
        inner = slice(top - start, bottom - start)
        rows = changed[inner].astype(np.uint8)
        missing = np.isnan(score[inner])
        rows[missing] = NODATA
        mask[top:bottom] = rows
        valid_pixels += int(missing.size - np.count_nonzero(missing))
    return valid_pixels


def _label_regions(
    mask: npt.NDArray[np.uint8], *, min_pixels: int, block: int
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int64]]:
    """Label the 4-connected change regions, dropping those under ``min_pixels`` from the mask.

    Returns:
        The labels (0 outside any kept region, 1..n in raster order) and each
        label's pixel count (index 0 unused).
    """
    labels = np.zeros(mask.shape, dtype=np.int32)
    count = int(ndimage.label(mask == 1, structure=_CROSS, output=labels))
    sizes = np.zeros(count + 1, dtype=np.int64)
    # Strip by strip, labelled pixels only: bincount copies its input to int64.
    for top, bottom in _strips(mask.shape[0], block):
        rows = labels[top:bottom]
        sizes += np.bincount(rows[rows > 0], minlength=count + 1)
    if min_pixels <= 1 or count == 0:
        return labels, sizes
    small = sizes < min_pixels
    small[0] = False
    kept = ~small
    kept[0] = False
    relabel = np.zeros(count + 1, dtype=np.int32)
    relabel[kept] = np.arange(1, int(np.count_nonzero(kept)) + 1, dtype=np.int32)
    for top, bottom in _strips(mask.shape[0], block):
        rows = labels[top:bottom].reshape(-1)  # views: whole rows of C-ordered arrays
        inside = np.flatnonzero(rows)
        values = rows[inside]
        mask[top:bottom].reshape(-1)[inside[small[values]]] = 0
        rows[inside] = relabel[values]
    return labels, np.concatenate([[0], sizes[kept]]).astype(np.int64)


def _score_sums(
    dataset: DatasetReader, labels: npt.NDArray[np.int32], *, regions: int, block: int
) -> npt.NDArray[np.float64]:
    """The sum of the score over each label's pixels, strip by strip."""
    sums = np.zeros(regions + 1, dtype=np.float64)
    for top, bottom in _strips(dataset.height, block):
        rows = labels[top:bottom]
        inside = rows > 0
        if inside.any():
            score = _read_rows(dataset, top, bottom)
            sums += np.bincount(rows[inside], weights=score[inside], minlength=regions + 1)
    return sums


def _write_mask_cog(
    mask: npt.NDArray[np.uint8], *, crs: CRS, transform: Any, tags: Mapping[str, str], out: Path
) -> None:
    """Write ``mask`` as a validated uint8 COG at ``out`` (a temporary name)."""
    height, width = mask.shape
    profile = {
        "driver": "GTiff",
        "dtype": "uint8",
        "count": 1,
        "width": width,
        "height": height,
        "crs": crs,
        "transform": transform,
        "nodata": NODATA,
        "tiled": True,
        "blockxsize": _TILE,
        "blockysize": _TILE,
        "compress": "deflate",
    }
    with _temporary(out.with_name(out.name + ".src.tif")) as source:
        try:
            with rasterio.open(source, "w", **profile) as dataset:
                for top, bottom in _strips(height, _TILE):
                    dataset.write(mask[top:bottom], 1, window=Window(0, top, width, bottom - top))
                dataset.set_band_description(1, "change")
                dataset.update_tags(**tags)
            cog_profile: dict[str, Any] = dict(cog_profiles["deflate"])
            cog_profile.update(blockxsize=_TILE, blockysize=_TILE)
            with rasterio.open(source) as dataset:
                translate_to_cog(
                    dataset,
                    out,
                    cog_profile,
                    what="the change mask",
                    nodata=NODATA,
                    overview_resampling="mode",
                    in_memory=False,
                )
        finally:
            with contextlib.suppress(OSError):
                source.unlink()


# -- polygons ---------------------------------------------------------------------------------


def _ring(coords: Any) -> list[list[float]]:
    return [[round(x, _DECIMALS), round(y, _DECIMALS)] for x, y, *_ in coords]


def _polygon_coordinates(polygon: Polygon) -> list[list[list[float]]]:
    return [_ring(polygon.exterior.coords)] + [_ring(ring.coords) for ring in polygon.interiors]


def _geojson_geometry(geometry: Polygon | MultiPolygon) -> dict[str, Any]:
    if isinstance(geometry, Polygon):
        return {"type": "Polygon", "coordinates": _polygon_coordinates(geometry)}
    return {
        "type": "MultiPolygon",
        "coordinates": [_polygon_coordinates(part) for part in geometry.geoms],
    }


def _oriented(geometry: Any) -> Polygon | MultiPolygon:
    """Exterior rings counter-clockwise, holes clockwise (RFC 7946 §3.1.6)."""
    if isinstance(geometry, Polygon):
        return orient(geometry, sign=1.0)
    if isinstance(geometry, MultiPolygon):
        return MultiPolygon([orient(part, sign=1.0) for part in geometry.geoms])
    raise ExportError(f"unexpected geometry {geometry.geom_type} from a change region")


def _to_lonlat(crs: CRS) -> Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]] | None:
    """A vectorised (n, 2) map from ``crs`` to lon/lat, or None when ``crs`` is EPSG:4326."""
    if crs == _EPSG4326:
        return None
    transformer = Transformer.from_crs(
        ProjCRS.from_wkt(crs.to_wkt()), ProjCRS.from_epsg(4326), always_xy=True
    )

    def apply(xy: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        lon, lat = transformer.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([lon, lat])

    return apply


def _lonlat_geometries(
    geometries: list[dict[str, Any]],
    *,
    crs: CRS,
    to_lonlat: Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]] | None,
) -> list[Polygon | MultiPolygon]:
    """The polygons in lon/lat, oriented for RFC 7946.

    All the vertices of a batch go through PROJ in one call (per-polygon
    ``transform_geom`` costs about 0.5 ms each, minutes for a noisy tile); a
    polygon that comes out wider than 180° of longitude crosses the
    antimeridian and is redone with ``rasterio.warp.transform_geom``, which cuts it.
    """
    shaped = np.array([shape(g) for g in geometries], dtype=object)
    if to_lonlat is None:
        return [_oriented(g) for g in shaped]
    moved = shapely.transform(shaped, to_lonlat)
    out = []
    for original, geometry in zip(geometries, moved, strict=True):
        west, _south, east, _north = geometry.bounds
        if east - west > 180:
            geometry = shape(rasterio.warp.transform_geom(crs, _EPSG4326, original))
        out.append(_oriented(geometry))
    return out


def _write_polygons(
    f: IO[str],
    *,
    labels: npt.NDArray[np.int32],
    sizes: npt.NDArray[np.int64],
    sums: npt.NDArray[np.float64],
    crs: CRS,
    transform: Any,
    about: dict[str, Any],
) -> int:
    """Stream the FeatureCollection of the labelled regions to ``f``; returns features written."""
    to_lonlat = _to_lonlat(crs)
    f.write('{"type": "FeatureCollection", "features": [')
    written = 0

    def flush(batch: list[tuple[dict[str, Any], int]]) -> None:
        nonlocal written
        geometries = _lonlat_geometries([g for g, _ in batch], crs=crs, to_lonlat=to_lonlat)
        for geometry, (_, label) in zip(geometries, batch, strict=True):
            area, _perimeter = _WGS84.geometry_area_perimeter(geometry)
            pixels = int(sizes[label])
            feature = {
                "type": "Feature",
                "id": label,
                "geometry": _geojson_geometry(geometry),
                "properties": {
                    "id": label,
                    "area_m2": round(abs(float(area)), 2),
                    "mean_score": float(sums[label] / pixels),
                    "pixels": pixels,
                },
            }
            f.write((",\n" if written else "\n") + json.dumps(feature))
            written += 1
        batch.clear()

    batch: list[tuple[dict[str, Any], int]] = []
    for geometry, value in rasterio.features.shapes(
        labels, mask=labels > 0, connectivity=CONNECTIVITY, transform=transform
    ):
        batch.append((geometry, int(value)))
        if len(batch) == _POLYGON_BATCH:
            flush(batch)
    flush(batch)
    about["polygons"] = written
    f.write('\n], "revisit": ' + json.dumps(about) + "}\n")
    return written


# -- the whole ---------------------------------------------------------------------------------


def _check_arguments(
    *,
    score_path: Path,
    mask_path: Path,
    polygons_path: Path | None,
    threshold: float | None,
    method: str,
    opening_radius_px: int,
    min_area_m2: float,
    block: int,
) -> None:
    if method not in THRESHOLD_METHODS:
        raise ExportError(
            f"unknown threshold method {method!r}; expected one of {', '.join(THRESHOLD_METHODS)}"
        )
    if threshold is not None and not math.isfinite(threshold):
        raise ExportError(f"threshold must be a finite number, got {threshold}")
    if int(opening_radius_px) != opening_radius_px or opening_radius_px < 0:
        raise ExportError(f"opening_radius_px must be a whole number >= 0, got {opening_radius_px}")
    if not math.isfinite(min_area_m2) or min_area_m2 < 0:
        raise ExportError(f"min_area_m2 must be a finite number >= 0, got {min_area_m2}")
    _check_block(block)
    outputs = [mask_path] if polygons_path is None else [mask_path, polygons_path]
    resolved = [p.resolve() for p in outputs]
    if score_path.resolve() in resolved:
        raise ExportError(f"an output would overwrite the score file {score_path}")
    if len(set(resolved)) != len(resolved):
        raise ExportError(f"the mask and the polygons cannot both be {mask_path}")


def write_change_mask(
    score_path: Path,
    *,
    mask_path: Path,
    polygons_path: Path | None,
    threshold: float | None = None,
    method: str = DEFAULT_THRESHOLD_METHOD,
    opening_radius_px: int = 0,
    min_area_m2: float = 0.0,
    tags: Mapping[str, str] | None = None,
    block: int = 1024,
) -> MaskResult:
    """Threshold a change-score raster into a mask COG and, optionally, GeoJSON polygons.

    See the module docstring for the steps, the formats and the memory bound.
    The mask's dataset tags: ``threshold``, ``threshold_method`` (``given`` or
    the method), ``opening_radius_px``, ``min_area_m2``, ``min_area_px``,
    ``pixel_area_m2``, ``connectivity``, ``score_file``, ``values``, and
    ``tags`` (which cannot override those).

    Args:
        score_path: A one-band score GeoTIFF (higher = more change, NaN = no data).
        mask_path: The mask COG to write; replaced atomically.
        polygons_path: The GeoJSON to write (replaced atomically), or None for none.
        threshold: ``score > threshold`` is change; chosen by ``method`` if None.
        method: The automatic threshold, one of :data:`THRESHOLD_METHODS`
            (ignored when ``threshold`` is given).
        opening_radius_px: Radius of the disk of the binary opening; 0 for none.
        min_area_m2: Change regions smaller than this become 0; 0 keeps all.
        tags: More dataset tags for the mask (also in the GeoJSON's ``revisit``).
        block: Rows of the score read at a time.

    Returns:
        The files written, the threshold and the counts.

    Raises:
        ExportError: The score file is missing, unreadable, not one band or not
            georeferenced; an argument is out of range; the automatic
            threshold has no finite score to work on; or a file could not be
            written. No output is left half-written.
    """
    started = time.perf_counter()
    score_path = Path(score_path).expanduser().absolute()
    mask_path = Path(mask_path).expanduser().absolute()
    polygons_path = None if polygons_path is None else Path(polygons_path).expanduser().absolute()
    _check_arguments(
        score_path=score_path,
        mask_path=mask_path,
        polygons_path=polygons_path,
        threshold=threshold,
        method=method,
        opening_radius_px=opening_radius_px,
        min_area_m2=min_area_m2,
        block=block,
    )
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
        return _write_change_mask(
            score_path,
            mask_path=mask_path,
            polygons_path=polygons_path,
            threshold=threshold,
            method=method,
            radius=int(opening_radius_px),
            min_area_m2=min_area_m2,
            tags=tags,
            block=block,
            started=started,
        )


def _write_change_mask(
    score_path: Path,
    *,
    mask_path: Path,
    polygons_path: Path | None,
    threshold: float | None,
    method: str,
    radius: int,
    min_area_m2: float,
    tags: Mapping[str, str] | None,
    block: int,
    started: float,
) -> MaskResult:
    """:func:`write_change_mask` once its arguments are checked."""
    with _open_score(score_path) as dataset:
        crs, transform = dataset.crs, dataset.transform
        if crs is None:
            raise ExportError(f"score file {score_path} has no CRS: the mask cannot be placed")
        width, height = dataset.width, dataset.height
        pixel_area = _pixel_area_m2(crs, transform, width, height)
        min_pixels = _min_pixels(min_area_m2, pixel_area)
        if threshold is None:
            used_method = method
            threshold = automatic_threshold(score_sample(score_path, block=block), method)
        else:
            used_method = GIVEN_METHOD
            threshold = float(threshold)

        mask = np.empty((height, width), dtype=np.uint8)
        valid_pixels = _threshold_rows(
            dataset, mask, threshold=threshold, radius=radius, block=block
        )
        labels: npt.NDArray[np.int32] | None = None
        sums = sizes = None
        if polygons_path is not None or min_pixels > 1:
            labels, sizes = _label_regions(mask, min_pixels=min_pixels, block=block)
        if polygons_path is not None and labels is not None and sizes is not None:
            sums = _score_sums(dataset, labels, regions=sizes.size - 1, block=block)
    changed_pixels = int(np.count_nonzero(mask == 1))

    parameters: dict[str, str] = {
        "threshold": repr(float(threshold)),
        "threshold_method": used_method,
        "opening_radius_px": str(radius),
        "min_area_m2": repr(float(min_area_m2)),
        "min_area_px": str(min_pixels),
        "pixel_area_m2": repr(pixel_area),
        "connectivity": str(CONNECTIVITY),
        "score_file": str(score_path),
        "values": VALUES_MEANING,
    }
    mask_tags = {**dict(tags or {}), **parameters}
    polygons = 0
    try:
        with contextlib.ExitStack() as stack:
            mask_tmp = stack.enter_context(_temporary(mask_path))
            _write_mask_cog(mask, crs=crs, transform=transform, tags=mask_tags, out=mask_tmp)
            del mask
            polygons_tmp = None
            if polygons_path is not None and labels is not None:
                if sizes is None or sums is None:  # pragma: no cover - set together above
                    raise ExportError("internal: region sizes and sums missing")
                polygons_tmp = stack.enter_context(_temporary(polygons_path))
                about: dict[str, Any] = {
                    "threshold": float(threshold),
                    "threshold_method": used_method,
                    "opening_radius_px": radius,
                    "min_area_m2": float(min_area_m2),
                    "min_area_px": min_pixels,
                    "pixel_area_m2": pixel_area,
                    "connectivity": CONNECTIVITY,
                    "score_file": str(score_path),
                    "mask_file": str(mask_path),
                    "source_crs": crs.to_string(),
                    "valid_pixels": valid_pixels,
                    "changed_pixels": changed_pixels,
                    "tags": dict(tags or {}),
                }
                with polygons_tmp.open("w", encoding="utf-8") as f:
                    polygons = _write_polygons(
                        f,
                        labels=labels,
                        sizes=sizes,
                        sums=sums,
                        crs=crs,
                        transform=transform,
                        about=about,
                    )
            _publish(mask_tmp, mask_path)
            if polygons_tmp is not None and polygons_path is not None:
                _publish(polygons_tmp, polygons_path)
    except (OSError, rasterio.errors.RasterioError) as exc:
        raise ExportError(f"could not write the change mask {mask_path}: {exc}") from exc
    seconds = time.perf_counter() - started
    log.info(
        "change mask %s: threshold %.6g (%s), %d of %d valid pixels changed, %d polygons, %.1f s",
        mask_path,
        threshold,
        used_method,
        changed_pixels,
        valid_pixels,
        polygons,
        seconds,
    )
    return MaskResult(
        mask_path=mask_path,
        polygons_path=polygons_path,
        threshold=float(threshold),
        method=used_method,
        valid_pixels=valid_pixels,
        changed_pixels=changed_pixels,
        polygons=polygons,
        seconds=seconds,
    )
