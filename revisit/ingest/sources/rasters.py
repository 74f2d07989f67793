"""Raster plumbing of the local source: what a product is made of, and how a chip is cut.

A :class:`Product` is what the local source knows about one product on disk:
when and where it was acquired, and which file (and band in it) holds each
canonical band. The functions here open those files, find the window of a
chip and warp it onto the chip's grid.

All reads run under :func:`gdal_env`: with GDAL's worker threads on, the
JPEG 2000 driver reports a truncated codestream as a logged error and returns
garbage pixels; single-threaded, the same read raises.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import rasterio
from affine import Affine
from pyproj import Transformer
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.warp import Resampling, reproject, transform_bounds
from rasterio.windows import Window, from_bounds
from shapely.geometry import box
from shapely.geometry.base import BaseGeometry
from shapely.ops import transform as shapely_transform

from revisit.errors import SceneRejectedError
from revisit.grid import ChipGrid
from revisit.ingest import reasons
from revisit.types import Level

ProductKind = Literal["safe", "band-folder", "multiband", "stac"]
CloudMaskKind = Literal["scl", "classi"]

#: Sentinel-2 DN 0 is "no data"; used when a file does not declare its own nodata.
S2_NODATA = 0
#: Source pixels added around a chip's window so that bilinear resampling has neighbours.
WINDOW_PAD = 2

_BAND_NAME = re.compile(r"^B(0?[1-9]|1[0-2]|8A)$", re.IGNORECASE)


def canonical_band(name: str | None) -> str | None:
    """``B1``, ``b01``, ``B8a`` -> ``B01``, ``B01``, ``B8A``; anything else -> None."""
    if name is None:
        return None
    match = _BAND_NAME.match(name.strip())
    if match is None:
        return None
    number = match.group(1).upper()
    return "B8A" if number == "8A" else f"B{int(number):02d}"


@dataclass(frozen=True)
class BandFile:
    """Where one band lies: a file, the (1-based) band in it, the DN to add on read."""

    path: Path
    index: int = 1
    offset: int = 0


@dataclass(frozen=True)
class CloudMask:
    """A classification layer to compute cloud fractions from."""

    kind: CloudMaskKind
    file: BandFile


@dataclass(frozen=True)
class Product:
    """One product found on disk, described well enough to search and to read it."""

    kind: ProductKind
    path: Path
    product_id: str
    acquired_at: datetime
    footprint: BaseGeometry
    bands: Mapping[str, BandFile]
    tile_id: str | None = None
    level: Level | None = None
    processing_baseline: str | None = None
    cloud_cover: float | None = None
    cloud_mask: CloudMask | None = None
    substitutions: Mapping[str, str] = field(default_factory=dict)
    #: For a SAFE: the tile's CRS and upper-left corner (MTD_TL.xml), for JP2s lacking them.
    tile_crs: str | None = None
    tile_ul: tuple[float, float] | None = None


def gdal_env() -> rasterio.Env:
    """The GDAL environment every read runs in (single-threaded, see the module doc)."""
    return rasterio.Env(GDAL_NUM_THREADS="1", GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR")


def read_window(ds: Any, index: int, window: Window) -> npt.NDArray[Any]:
    """Read one band's window; call it under :func:`gdal_env` (it counts at read time).

    Raises:
        RasterioError: The read failed.
    """
    return ds.read(index, window=window)  # type: ignore[no-any-return]


def open_raster(path: Path, product_id: str) -> Any:
    """Open a raster, turning an unreadable file into a ``corrupt-raster`` rejection.

    Raises:
        SceneRejectedError: ``corrupt-raster`` (unrecognised, truncated header) or
            ``unreadable`` (the file is missing or cannot be opened).
    """
    if not path.is_file():
        raise SceneRejectedError(reasons.UNREADABLE, f"{product_id}: {path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioError as exc:
        raise SceneRejectedError(
            reasons.CORRUPT_RASTER, f"{product_id}: {path.name}: {one_line(exc)}"
        ) from None


def one_line(exc: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(exc).split()) or type(exc).__name__


def georef(ds: Any, product: Product | None = None) -> tuple[CRS, Affine]:
    """A dataset's CRS and transform, falling back on a SAFE tile's MTD_TL.xml.

    Raises:
        SceneRejectedError: ``missing-crs``, the file has no CRS and the product gives none.
    """
    if ds.crs is not None:
        return ds.crs, ds.transform
    if product is not None and product.tile_crs and product.tile_ul is not None:
        resolution = 109800.0 / ds.width  # a Sentinel-2 tile is 109.8 km wide
        ulx, uly = product.tile_ul
        return CRS.from_user_input(product.tile_crs), Affine(
            resolution, 0.0, ulx, 0.0, -resolution, uly
        )
    pid = product.product_id if product is not None else "?"
    raise SceneRejectedError(reasons.MISSING_CRS, f"{pid}: {Path(ds.name).name}: no CRS")


def check_readable(ds: Any, product_id: str) -> None:
    """Read a GeoTIFF's last block, which a truncated file lacks; cheap for big files.

    JPEG 2000 files are left alone: decoding one tile of a 10980-pixel band is not cheap.

    Raises:
        SceneRejectedError: ``corrupt-raster``.
    """
    if ds.driver != "GTiff":
        return
    block_h, block_w = ds.block_shapes[0]
    height, width = ds.height, ds.width
    last = Window(
        (width - 1) // block_w * block_w,
        (height - 1) // block_h * block_h,
        min(block_w, width - (width - 1) // block_w * block_w),
        min(block_h, height - (height - 1) // block_h * block_h),
    )
    try:
        with gdal_env():
            for index in range(1, ds.count + 1):
                read_window(ds, index, last)
    except RasterioError as exc:
        raise SceneRejectedError(
            reasons.CORRUPT_RASTER, f"{product_id}: {Path(ds.name).name}: {one_line(exc)}"
        ) from None


def footprint_of(crs: CRS, bounds: tuple[float, float, float, float]) -> BaseGeometry:
    """The outline of ``bounds`` in ``crs``, as a lon/lat polygon (edges densified)."""
    outline = box(*bounds)
    if crs.is_geographic and crs.to_epsg() == 4326:
        return outline
    width = max(bounds[2] - bounds[0], bounds[3] - bounds[1])
    outline = outline.segmentize(width / 16)
    to_lonlat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    return shapely_transform(to_lonlat.transform, outline)


def dataset_footprint(ds: Any, product_id: str) -> BaseGeometry:
    """A raster's bounds as a lon/lat polygon.

    Raises:
        SceneRejectedError: ``missing-crs``.
    """
    if ds.crs is None:
        raise SceneRejectedError(reasons.MISSING_CRS, f"{product_id}: {Path(ds.name).name}: no CRS")
    return footprint_of(ds.crs, tuple(ds.bounds))


def parse_when(text: str) -> datetime | None:
    """A timezone-aware UTC datetime from ISO 8601, ``YYYYMMDD[THHMMSS]`` or EXIF style.

    Returns None when ``text`` is none of these.
    """
    text = text.strip()
    compact = re.fullmatch(r"(\d{8})(?:T(\d{6}))?Z?", text)
    if compact:
        return compact_datetime(compact.group(1), compact.group(2))
    exif = re.fullmatch(r"(\d{4}):(\d{2}):(\d{2})[ T](\d{2}):(\d{2}):(\d{2})", text)
    if exif:
        text = "{}-{}-{}T{}:{}:{}".format(*exif.groups())
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    if when.tzinfo is None:
        return when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


def compact_datetime(day: str, clock: str | None = None) -> datetime | None:
    """``20170829``, ``105019`` -> 2017-08-29T10:50:19Z; None if not a real date."""
    try:
        when = datetime.strptime(day + (clock or "000000"), "%Y%m%d%H%M%S")
    except ValueError:
        return None
    return when.replace(tzinfo=UTC)


def at_midnight(day: date) -> datetime:
    """A date as 00:00 UTC."""
    return datetime.combine(day, time(0, 0), tzinfo=UTC)


def verify_product(product: Product) -> Product:
    """Open every file of a product once: readable, georeferenced, band indexes in range.

    GeoTIFFs also get their last block read (see :func:`check_readable`).

    Returns:
        ``product``, verified.

    Raises:
        SceneRejectedError: ``corrupt-raster``, ``missing-crs``, ``wrong-band-count``.
    """
    files: dict[Path, int] = {}
    for band_file in product.bands.values():
        files[band_file.path] = max(files.get(band_file.path, 0), band_file.index)
    if product.cloud_mask is not None:
        mask = product.cloud_mask.file
        files[mask.path] = max(files.get(mask.path, 0), mask.index)
    for path, index in files.items():
        with open_raster(path, product.product_id) as ds:
            georef(ds, product)
            if ds.count < index:
                raise SceneRejectedError(
                    reasons.WRONG_BAND_COUNT,
                    f"{product.product_id}: {path.name} has {ds.count} bands, band {index} wanted",
                )
            check_readable(ds, product.product_id)
    return product


# -- cutting chips ---------------------------------------------------------------------------


def chip_bounds(crs: CRS, grid: ChipGrid) -> tuple[float, float, float, float]:
    """A chip's bounds in ``crs`` (edges densified, so the box holds the whole chip)."""
    left, bottom, right, top = transform_bounds(grid.crs, crs, *grid.bounds, densify_pts=21)
    return left, bottom, right, top


def chip_window(
    width: int, height: int, transform: Affine, bounds: tuple[float, float, float, float]
) -> Window | None:
    """The window of a ``width`` x ``height`` raster that covers ``bounds``, padded for
    resampling; None if the bounds lie entirely outside the raster."""
    win = from_bounds(*bounds, transform=transform)
    col0 = math.floor(win.col_off)
    row0 = math.floor(win.row_off)
    col1 = math.ceil(win.col_off + win.width)
    row1 = math.ceil(win.row_off + win.height)
    if col1 <= 0 or row1 <= 0 or col0 >= width or row0 >= height:
        return None
    col0, row0 = max(col0 - WINDOW_PAD, 0), max(row0 - WINDOW_PAD, 0)
    col1, row1 = min(col1 + WINDOW_PAD, width), min(row1 + WINDOW_PAD, height)
    return Window(col0, row0, col1 - col0, row1 - row0)


def read_dn(ds: Any, index: int, window: Window) -> npt.NDArray[np.float32]:
    """One band's window as float32 DN, NaN where the file has no data (its nodata, else 0).

    Raises:
        RasterioError: The read failed (a truncated or corrupt file).
    """
    return dn_of(read_window(ds, index, window), ds.nodata)


def dn_of(raw: npt.NDArray[Any], nodata: float | None) -> npt.NDArray[np.float32]:
    """Pixels read as float32 DN, NaN where they equal ``nodata`` (0 when None)."""
    src = raw.astype(np.float32)
    src[raw == (nodata if nodata is not None else S2_NODATA)] = np.nan
    return src


def _window_transform(transform: Affine, window: Window) -> Affine:
    return transform @ Affine.translation(window.col_off, window.row_off)


def warp_dn(
    src: npt.NDArray[np.float32], crs: CRS, transform: Affine, window: Window, grid: ChipGrid
) -> npt.NDArray[np.float32]:
    """Bands read from one ``window`` (shape (n, h, w)), bilinearly resampled onto ``grid``.

    All bands sharing a source grid go in one call: GDAL sets the warp up once.

    Returns:
        float32 DN, shape (n, size, size), NaN where no source data.
    """
    dst = np.full((src.shape[0], grid.size, grid.size), np.nan, dtype=np.float32)
    reproject(
        src,
        dst,
        src_transform=_window_transform(transform, window),
        src_crs=crs,
        src_nodata=np.nan,
        dst_transform=grid.transform,
        dst_crs=grid.crs,
        dst_nodata=np.nan,
        resampling=Resampling.bilinear,
    )
    return dst


def warp_class_array(
    raw: npt.NDArray[Any], crs: CRS, transform: Affine, window: Window, grid: ChipGrid
) -> npt.NDArray[np.uint8]:
    """A class band's window already read, nearest-neighbour onto ``grid``; 0 outside."""
    raw = raw.astype(np.uint8)
    dst = np.zeros((grid.size, grid.size), dtype=np.uint8)
    reproject(
        raw,
        dst,
        src_transform=_window_transform(transform, window),
        src_crs=crs,
        src_nodata=None,
        dst_transform=grid.transform,
        dst_crs=grid.crs,
        dst_nodata=0,
        resampling=Resampling.nearest,
    )
    return dst


def to_dn(warped: npt.NDArray[np.float32], offset: int) -> npt.NDArray[np.uint16]:
    """Warped DN with the baseline offset added, rounded and clipped to uint16; NaN -> 0."""
    out = np.rint(np.nan_to_num(warped, nan=0.0) + offset)
    out[np.isnan(warped)] = 0
    return np.clip(out, 0, 65535).astype(np.uint16)
