"""Cloud and cloud-shadow masks of a product, on any window of a destination grid.

A pair change map compares two products window by window on BEFORE's 10 m
grid; a pixel that is cloud or cloud shadow on either date becomes no-data.
:func:`cloud_detector` picks, once per product, the best layer it has:

``scl``
    The Level-2A scene classification (Sen2Cor): classes 3 (cloud shadow),
    8 and 9 (cloud, medium and high probability) and 10 (thin cirrus),
    nearest-neighbour onto the window. The only kind that masks shadows.
``classi``
    The Level-1C ``MSK_CLASSI_B00`` of processing baseline 04.00 and later:
    its opaque-cloud and cirrus bands, nearest-neighbour. No shadows.
``s2cloudless``
    A product without either (an OSCD band folder, an older L1C) but with its
    B10 band: Sentinel Hub's pixel classifier (LightGBM), run on top-of-atmosphere
    reflectance averaged onto a 60 m version of the window, with a margin, then
    nearest-upsampled. No shadows.
``none``
    Nothing to detect clouds with; the detector's ``detail`` says why.

**s2cloudless at 60 m.** The classifier is per pixel; its authors run it at
160 m in production, with the probability averaged over a disk of 4 pixels and
the mask dilated by 2 (640 m and 320 m). 60 m is the native resolution of
three of its ten bands (B01, B09, B10), so nothing is invented for them, and a
60 m pixel still resolves the small cumulus a 160 m one smears out, at 1/36 of
the 10 m cost. The post-processing is scaled in metres from the settings its
authors give for 60 m and 10 m (4 and 2 pixels at 60 m, 22 and 11 at 10 m:
both about 240 m of averaging and 120 m of dilation). The coarse grid is laid on
a lattice fixed by the destination grid, not by the window, and read with a
margin wider than averaging and dilation together, so adjacent windows agree
with each other and with one pass over the whole image. Input is reflectance
``(DN + offset) / 10000`` (the ``-1000`` of baseline 04.00 is in
:attr:`~revisit.ingest.sources.rasters.BandFile.offset`), clipped at 0. Like
any per-pixel spectral test it can take bright, hazy city for thin cloud (OSCD
bercy ``imgs_1``, clear to the eye, comes out 11 % cloud; at 160 m, 5 %).

B10 is not one of revisit's canonical bands; :func:`find_b10` looks for it
beside B01 (the same folder and file-name stem: ``<stem>_B10.tif``,
``T31UDQ_..._B10.jp2`` in a SAFE's ``IMG_DATA``), or as a band described
``B10`` in a multi-band file.

Memory and reads are bounded by the window (plus a few source pixels, and for
s2cloudless a margin of 420 m): no band is ever read whole. All reads run under
:func:`~revisit.ingest.sources.rasters.gdal_env`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import RasterioError
from rasterio.warp import Resampling, reproject, transform_bounds
from rasterio.windows import Window

from revisit.errors import ExportError, SceneRejectedError
from revisit.ingest.cloud import SCL_CLOUD_CLASSES, classi_cloud_mask, scl_cloud_mask
from revisit.ingest.sources.geotiff import BAND_FILE
from revisit.ingest.sources.rasters import (
    BandFile,
    Product,
    check_readable,
    chip_window,
    gdal_env,
    georef,
    one_line,
    open_raster,
    read_dn,
)
from revisit.types import DN_SCALE

if TYPE_CHECKING:
    from s2cloudless.cloud_detector import S2PixelCloudDetector

__all__ = [
    "S2CLOUDLESS_AVERAGE_OVER_M",
    "S2CLOUDLESS_BANDS",
    "S2CLOUDLESS_DILATION_M",
    "S2CLOUDLESS_RESOLUTION_M",
    "S2CLOUDLESS_THRESHOLD",
    "CloudDetector",
    "CloudDetectorKind",
    "cloud_detector",
    "cloud_mask",
    "find_b10",
]

CloudDetectorKind = Literal["scl", "classi", "s2cloudless", "none"]
BoolArray = npt.NDArray[np.bool_]

#: The resolution s2cloudless runs at (coarse pixels are a whole number of destination pixels).
S2CLOUDLESS_RESOLUTION_M = 60.0
#: Cloud probability above which a pixel is cloud (its authors' default).
S2CLOUDLESS_THRESHOLD = 0.4
#: Radius of the disk the probability is averaged over (4 pixels at 60 m).
S2CLOUDLESS_AVERAGE_OVER_M = 240.0
#: Radius of the disk the mask is dilated by (2 pixels at 60 m).
S2CLOUDLESS_DILATION_M = 120.0
#: The ten bands the classifier takes, in its order.
S2CLOUDLESS_BANDS: tuple[str, ...] = (
    "B01", "B02", "B04", "B05", "B08", "B8A", "B09", "B10", "B11", "B12",
)  # fmt: skip
#: The band whose footprint bounds an s2cloudless mask (the finest; outside it: not cloud).
_COVERAGE_BAND = "B02"
#: Pixel lattices are compared with this slack (in pixels) against float round-off.
_EPS = 1e-6
#: Metres per degree of latitude (and of longitude at the equator), for geographic grids.
_M_PER_DEGREE = 111_320.0


@dataclass(frozen=True)
class CloudDetector:
    """How clouds are found in one product.

    Attributes:
        kind: ``scl``, ``classi``, ``s2cloudless`` or ``none``.
        detail: One line for a person: what is detected and from which file, or
            (``none``) why nothing is.
        b10: For ``s2cloudless``, where the product's B10 band lies.
    """

    kind: CloudDetectorKind
    detail: str
    b10: BandFile | None = None


def _scl_detail(name: str) -> str:
    classes = ", ".join(str(c) for c in SCL_CLOUD_CLASSES)
    return (
        f"SCL classes {classes} (Sen2Cor): cloud shadow, medium and high probability cloud,"
        f" thin cirrus; from {name}"
    )


def _s2cloudless_detail(product: Product, b10: BandFile) -> str:
    trained = "" if product.level != "L2A" else "; applied to L2A, it was trained on L1C"
    return (
        f"s2cloudless (Sentinel Hub's LightGBM pixel classifier, probability > "
        f"{S2CLOUDLESS_THRESHOLD}) at {S2CLOUDLESS_RESOLUTION_M:.0f} m, averaged over"
        f" {S2CLOUDLESS_AVERAGE_OVER_M:.0f} m and dilated by {S2CLOUDLESS_DILATION_M:.0f} m,"
        f" B10 from {b10.path.name}: clouds and cirrus, no cloud shadows{trained}"
    )


def cloud_detector(product: Product) -> CloudDetector:
    """Choose how to find clouds in ``product``: SCL, else MSK_CLASSI, else s2cloudless.

    The chosen mask file (or B10) is opened once, so that an unreadable one fails
    here, before any window is read.

    Args:
        product: A product found by the local source.

    Returns:
        The detector; kind ``none`` with the reason when the product has no
        mask and no B10 band.

    Raises:
        ExportError: The mask file (or B10) is missing, unreadable, or (MSK_CLASSI)
            has fewer than two bands.
    """
    mask = product.cloud_mask
    if mask is not None and mask.kind == "scl":
        _check_readable(product, mask.file, what="SCL cloud mask", bands=mask.file.index)
        return CloudDetector("scl", _scl_detail(mask.file.path.name))
    if mask is not None and mask.kind == "classi":
        _check_readable(product, mask.file, what="MSK_CLASSI cloud mask", bands=2)
        return CloudDetector(
            "classi",
            f"MSK_CLASSI_B00 opaque clouds and cirrus (L1C, baseline 04.00 and later), from"
            f" {mask.file.path.name}; no cloud shadows",
        )
    b10 = find_b10(product)
    if b10 is None:
        return CloudDetector(
            "none", "no SCL, no MSK_CLASSI_B00 and no B10 band: s2cloudless needs B10"
        )
    try:
        import s2cloudless  # noqa: F401
    except ImportError as exc:
        return CloudDetector("none", f"s2cloudless cannot be imported: {one_line(exc)}")
    _check_readable(product, b10, what="B10 band", bands=b10.index)
    return CloudDetector("s2cloudless", _s2cloudless_detail(product, b10), b10)


def find_b10(product: Product) -> BandFile | None:
    """The product's B10 band: beside B01 with the same name stem, or a band named ``B10``.

    Args:
        product: A product found by the local source (whose bands omit B10).

    Returns:
        Where B10 lies (with B01's DN offset), or None if the product has none.
    """
    b01 = product.bands["B01"]
    if product.kind == "multiband":
        return _b10_band_of(b01)
    match = BAND_FILE.match(b01.path.name)
    if match is None:
        return None
    stem = match.group("stem").lower()
    try:
        names = sorted(p.name for p in b01.path.parent.iterdir())
    except OSError:
        return None
    for name in names:
        other = BAND_FILE.match(name)
        if (
            other is not None
            and other.group("band").upper() == "B10"
            and other.group("stem").lower() == stem
            and (b01.path.parent / name).is_file()
        ):
            return BandFile(b01.path.parent / name, 1, b01.offset)
    return None


def _b10_band_of(b01: BandFile) -> BandFile | None:
    """B10 of a multi-band file: the band whose description is ``B10``."""
    try:
        with open_raster(b01.path, b01.path.name) as ds:
            descriptions = [(d or "").strip().upper() for d in ds.descriptions]
    except SceneRejectedError:
        return None
    if "B10" not in descriptions:
        return None
    return BandFile(b01.path, descriptions.index("B10") + 1, b01.offset)


def _check_readable(product: Product, file: BandFile, *, what: str, bands: int) -> None:
    try:
        with open_raster(file.path, product.product_id) as ds:
            georef(ds, product)
            check_readable(ds, product.product_id)
            count = ds.count
    except SceneRejectedError as exc:
        raise _unreadable(product, file.path, what, exc.detail) from None
    if count < bands:
        raise ExportError(
            f"{product.product_id}: {file.path.name}: the {what} has {count} band(s),"
            f" {bands} wanted"
        )


def _unreadable(product: Product, path: Path, what: str, why: str) -> ExportError:
    prefix = f"{product.product_id}: "
    why = why[len(prefix) :] if why.startswith(prefix) else why
    return ExportError(f"{product.product_id}: cannot read the {what} {path.name}: {why}")


def cloud_mask(
    product: Product,
    detector: CloudDetector,
    *,
    crs: CRS,
    transform: Affine,
    width: int,
    height: int,
) -> BoolArray | None:
    """Where ``product`` is cloud or cloud shadow, on one window of a destination grid.

    Args:
        product: The product.
        detector: Its detector, from :func:`cloud_detector`.
        crs: The destination grid's CRS.
        transform: The window's transform (its top-left pixel's corner), north up.
        width: The window's width in pixels.
        height: The window's height in pixels.

    Returns:
        A ``(height, width)`` boolean array, True where cloud (or, for ``scl``,
        cloud shadow), False where clear, where the layer has no data and outside
        the product; None for kind ``none``.

    Raises:
        ExportError: A mask or band file cannot be read.
        ValueError: The window is empty, or (s2cloudless) its grid is rotated.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"empty window: {width} x {height}")
    if detector.kind == "none":
        return None
    dst = _Grid(crs, transform, width, height)
    with gdal_env():
        if detector.kind == "s2cloudless":
            if detector.b10 is None:
                raise ValueError("an s2cloudless detector needs its b10 band file")
            return _s2cloudless_mask(product, detector.b10, dst)
        mask = product.cloud_mask
        if mask is None or mask.kind != detector.kind:
            raise ValueError(
                f"{product.product_id}: a {detector.kind} detector, but the product's mask is"
                f" {mask.kind if mask else 'none'}"
            )
        if mask.kind == "scl":
            (scl,) = _read_nearest(product, mask.file.path, (mask.file.index,), dst, "SCL")
            return scl_cloud_mask(scl)
        opaque, cirrus = _read_nearest(product, mask.file.path, (1, 2), dst, "MSK_CLASSI")
        return classi_cloud_mask(opaque, cirrus)


@dataclass(frozen=True)
class _Grid:
    crs: CRS
    transform: Affine
    width: int
    height: int

    def bounds(self) -> tuple[float, float, float, float]:
        t = self.transform
        xs = (t.c, t.c + t.a * self.width)
        ys = (t.f, t.f + t.e * self.height)
        return min(xs), min(ys), max(xs), max(ys)


def _source_window(ds: Any, src_crs: CRS, src_transform: Affine, dst: _Grid) -> Window | None:
    """The window of ``ds`` covering ``dst`` (padded by a few source pixels), or None."""
    bounds = transform_bounds(dst.crs, src_crs, *dst.bounds(), densify_pts=21)
    return chip_window(ds.width, ds.height, src_transform, bounds)


def _window_transform(transform: Affine, window: Window) -> Affine:
    return transform @ Affine.translation(window.col_off, window.row_off)


def _read_nearest(
    product: Product, path: Path, indexes: tuple[int, ...], dst: _Grid, what: str
) -> npt.NDArray[np.uint8]:
    """Class bands of one file, nearest-neighbour onto ``dst``; 0 outside the file.

    Raises:
        ExportError: The file cannot be opened or read.
    """
    out = np.zeros((len(indexes), dst.height, dst.width), dtype=np.uint8)
    try:
        with open_raster(path, product.product_id) as ds:
            src_crs, src_transform = georef(ds, product)
            win = _source_window(ds, src_crs, src_transform, dst)
            if win is None:
                return out
            raw = ds.read(list(indexes), window=win).astype(np.uint8)
    except SceneRejectedError as exc:
        raise _unreadable(product, path, f"{what} cloud mask", exc.detail) from None
    except RasterioError as exc:
        raise _unreadable(product, path, f"{what} cloud mask", one_line(exc)) from None
    reproject(
        raw,
        out,
        src_transform=_window_transform(src_transform, win),
        src_crs=src_crs,
        src_nodata=None,
        dst_transform=dst.transform,
        dst_crs=dst.crs,
        dst_nodata=0,
        resampling=Resampling.nearest,
    )
    return out


# -- s2cloudless -----------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _s2cloudless(average_over: int, dilation_size: int) -> S2PixelCloudDetector:
    """A detector, its model loaded once per process (parsing it takes a while)."""
    from s2cloudless.cloud_detector import S2PixelCloudDetector

    detector = S2PixelCloudDetector(
        threshold=S2CLOUDLESS_THRESHOLD,
        average_over=average_over,
        dilation_size=dilation_size,
        all_bands=False,
    )
    detector.classifier  # noqa: B018 - load the model now, not in the first window
    return detector


def _pixel_metres(dst: _Grid) -> float:
    """The side of a destination pixel in metres (geometric mean of its two sides)."""
    t = dst.transform
    if dst.crs.is_geographic:
        lat = math.radians(t.f + t.e * dst.height / 2)
        dx = abs(t.a) * _M_PER_DEGREE * max(math.cos(lat), 1e-3)
        dy = abs(t.e) * _M_PER_DEGREE
    else:
        unit = dst.crs.linear_units_factor[1]
        dx, dy = abs(t.a) * unit, abs(t.e) * unit
    return math.sqrt(dx * dy)


@dataclass(frozen=True)
class _Coarse:
    """The coarse grid s2cloudless runs on, and how a window's pixels map onto it."""

    grid: _Grid
    rows: npt.NDArray[np.intp]
    cols: npt.NDArray[np.intp]
    average_over: int
    dilation_size: int


def _lattice_start(origin: float, step: float) -> int:
    """The index, on the destination grid's own lattice, of a window's first pixel."""
    return math.floor(origin / step + _EPS)


def _coarse_grid(dst: _Grid) -> _Coarse:
    """A grid of whole blocks of ``factor`` x ``factor`` destination pixels around ``dst``.

    Blocks sit on a lattice fixed by the destination grid (pixel index divisible
    by ``factor``), not by the window, so every window of one grid shares them.
    """
    t = dst.transform
    if t.b != 0 or t.d != 0:
        raise ValueError(f"s2cloudless needs a north-up grid, not {tuple(t)[:6]}")
    pixel_m = _pixel_metres(dst)
    factor = max(1, round(S2CLOUDLESS_RESOLUTION_M / pixel_m))
    coarse_m = factor * pixel_m
    average_over = max(1, round(S2CLOUDLESS_AVERAGE_OVER_M / coarse_m))
    dilation_size = max(1, round(S2CLOUDLESS_DILATION_M / coarse_m))
    margin = average_over + dilation_size + 1
    # The window's first pixel, as an index on the lattice of its grid's pixels.
    col0 = _lattice_start(t.c, t.a)
    row0 = _lattice_start(t.f, t.e)
    block_col0 = col0 // factor - margin
    block_row0 = row0 // factor - margin
    ncols = (col0 + dst.width - 1) // factor + margin + 1 - block_col0
    nrows = (row0 + dst.height - 1) // factor + margin + 1 - block_row0
    coarse_transform = Affine(
        t.a * factor, 0.0, t.c + (block_col0 * factor - col0) * t.a,
        0.0, t.e * factor, t.f + (block_row0 * factor - row0) * t.e,
    )  # fmt: skip
    cols = (col0 + np.arange(dst.width)) // factor - block_col0
    rows = (row0 + np.arange(dst.height)) // factor - block_row0
    return _Coarse(
        _Grid(dst.crs, coarse_transform, ncols, nrows),
        rows.astype(np.intp),
        cols.astype(np.intp),
        average_over,
        dilation_size,
    )


def _s2cloudless_mask(product: Product, b10: BandFile, dst: _Grid) -> BoolArray:
    coarse = _coarse_grid(dst)
    grid = coarse.grid
    files = {band: b10 if band == "B10" else product.bands[band] for band in S2CLOUDLESS_BANDS}
    reflectance = np.full(
        (grid.height, grid.width, len(S2CLOUDLESS_BANDS)), np.nan, dtype=np.float32
    )
    coverage = np.zeros((dst.height, dst.width), dtype=bool)
    for i, (band, file) in enumerate(files.items()):
        try:
            with open_raster(file.path, product.product_id) as ds:
                src_crs, src_transform = georef(ds, product)
                win = _source_window(ds, src_crs, src_transform, grid)
                if win is None:
                    continue
                dn = read_dn(ds, file.index, win)
        except SceneRejectedError as exc:
            raise _unreadable(product, file.path, f"{band} band", exc.detail) from None
        except RasterioError as exc:
            raise _unreadable(product, file.path, f"{band} band", one_line(exc)) from None
        src = np.maximum((dn + np.float32(file.offset)) * np.float32(DN_SCALE), np.float32(0))
        win_transform = _window_transform(src_transform, win)
        out = np.full((grid.height, grid.width), np.nan, dtype=np.float32)
        reproject(
            src,
            out,
            src_transform=win_transform,
            src_crs=src_crs,
            src_nodata=np.nan,
            dst_transform=grid.transform,
            dst_crs=grid.crs,
            dst_nodata=np.nan,
            resampling=Resampling.average,
        )
        reflectance[..., i] = out
        if band == _COVERAGE_BAND:
            coverage = _coverage(np.isfinite(src), src_crs, win_transform, dst)
    valid = np.all(np.isfinite(reflectance), axis=-1)
    if not valid.any():
        return np.zeros((dst.height, dst.width), dtype=bool)
    detector = _s2cloudless(coarse.average_over, coarse.dilation_size)
    # The classifier costs ~30 us a pixel: no-data pixels (a product's edge) are not run.
    probability = np.zeros((grid.height, grid.width), dtype=np.float32)
    probability[valid] = detector.get_cloud_probability_maps(
        reflectance[valid][np.newaxis, np.newaxis]
    )[0, 0]
    blocks = _post_process(probability, valid, detector)
    return blocks[coarse.rows[:, np.newaxis], coarse.cols[np.newaxis, :]] & coverage


def _post_process(
    probability: npt.NDArray[np.float32], valid: BoolArray, detector: S2PixelCloudDetector
) -> BoolArray:
    """s2cloudless's averaging, threshold and dilation, with no-data left out of the average.

    ``S2PixelCloudDetector.get_mask_from_prob`` reflects the image at its
    border; here the average is over the disk's valid pixels only (a normalised
    convolution), which is the same inside the data and, at a product's edge or
    no-data, neither counts no-data as clear sky nor depends on where the window
    ends. Same disks as the detector's.
    """
    import cv2

    weight = valid.astype(np.float32)
    kernel = detector.conv_filter.astype(np.float32)
    total = cv2.filter2D(probability * weight, -1, kernel, borderType=cv2.BORDER_CONSTANT)
    norm = cv2.filter2D(weight, -1, kernel, borderType=cv2.BORDER_CONSTANT)
    averaged = np.where(norm > 0, total / np.maximum(norm, np.float32(1e-6)), np.float32(0))
    cloud = ((averaged > detector.threshold) & valid).astype(np.uint8)
    dilated = cv2.dilate(cloud, detector.dilation_filter)
    return np.asarray(dilated, dtype=bool) & valid


def _coverage(
    finite: npt.NDArray[np.bool_], src_crs: CRS, src_transform: Affine, dst: _Grid
) -> BoolArray:
    """Where ``dst`` has source data, nearest-neighbour from one band's read window."""
    out = np.zeros((dst.height, dst.width), dtype=np.uint8)
    reproject(
        finite.astype(np.uint8),
        out,
        src_transform=src_transform,
        src_crs=src_crs,
        src_nodata=None,
        dst_transform=dst.transform,
        dst_crs=dst.crs,
        dst_nodata=0,
        resampling=Resampling.nearest,
    )
    return out.astype(bool)
