"""A dense change map for a pair of images (DESIGN §5), with the exported encoder under onnxruntime.

Both dates are read with the local source's product discovery (an OSCD-style
band folder, a SAFE, a multi-band GeoTIFF: see
:mod:`revisit.ingest.sources.local`) into the 12 canonical bands, as DN with
the product's offset applied (the L2A ``-1000`` of baseline 04.00 removed).
BEFORE is read on its own 10 m grid; AFTER is warped onto it (bilinear).

Two scorings, both onnxruntime only (CPU execution provider; PyTorch is not
used here):

``dense`` (the default)
    The encoder's **stem** -- its first convolution (7x7, BatchNorm folded in by
    the exporter) and ReLU, cut from the exported graph -- is evaluated at
    **every pixel** (the convolution's stride set to 1: a 7x7 window slid with
    stride 1), giving a 64-d feature vector per pixel and date. The input is
    each date's bands **standardised** over its own valid pixels (per band:
    ``(DN - mean) / std``, the normalisation change-vector analysis uses), with
    no-data pixels set to 0 (the band mean); the model's own fixed input
    standardisation, the graph's first nodes, is skipped. A pixel's score is the Euclidean
    distance between its two feature vectors. Deeper layers see 32x32 pixels
    at once (total stride 32): too coarse for OSCD's changes, which are a few
    pixels wide; on the four OSCD cities the stem on standardised bands scores
    a mean pixel AUROC about 0.1 above the same stem on reflectance and 0.25
    above whole-window embeddings (``bench/oscd.py``). The image is processed
    in tiles with a halo of half the kernel, so the result is exactly that of
    one pass over the whole image, in bounded memory.
``windows``
    A window of ``window`` pixels (the model's ``patch_size`` by default)
    slides over both with step ``stride``, the last row and column of windows
    flush with the image edges so every pixel is covered. Each window of each
    date is embedded by the whole model (``DN * 1e-4`` float32, NCHW). A
    window's score is the **cosine distance** ``1 - cos(a, b)`` between the two
    L2-normalised embeddings (in [0, 2]). A pixel's value is the mean score of
    the windows that cover it. Invalid pixels are filled with that date's band
    mean before embedding.

The output is NaN where it cannot be scored: for ``dense`` where either date
has no data, for ``windows`` where neither has.

The map is a float32 Cloud-Optimized GeoTIFF on BEFORE's exact grid (CRS,
transform, width, height), validated with rio-cogeo and published atomically
(temporary file, fsync, rename).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import rasterio
import rasterio.errors
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import Resampling, reproject, transform_bounds
from rasterio.windows import Window

from revisit.errors import ExportError, SceneRejectedError
from revisit.export.changemap import write_float_cog
from revisit.export.hypercolumn import (
    DEFAULT_KEEP,
    DenseEncoder,
    Level,
    Scorer,
    Tile,
    score_tiles,
)
from revisit.fsutil import sha256_file
from revisit.ingest.sources.geotiff import BAND_FILE
from revisit.ingest.sources.local import LocalSource
from revisit.ingest.sources.rasters import (
    Product,
    chip_window,
    gdal_env,
    georef,
    one_line,
    open_raster,
    read_dn,
)
from revisit.ingest.sources.safe import MTD_NAMES
from revisit.types import CANONICAL_BANDS, DN_SCALE

__all__ = [
    "BAND_DESCRIPTION",
    "SCORINGS",
    "OnnxEncoder",
    "PairMapResult",
    "Scene",
    "Scoring",
    "StemEncoder",
    "cva_map",
    "pair_change_map",
    "read_canonical",
    "reproject_onto",
    "score_dense",
    "score_pair",
    "standardized",
]

log = logging.getLogger(__name__)

Scoring = Literal["hypercolumn", "stem", "windows"]
#: The scorings :func:`pair_change_map` knows (``dense`` is accepted as the old name of ``stem``).
SCORINGS: tuple[Scoring, ...] = ("hypercolumn", "stem", "windows")

#: Description of the one band of a pair change map, by scoring.
BAND_DESCRIPTION: dict[Scoring, str] = {
    "hypercolumn": "hypercolumn_distance",
    "stem": "feature_distance",
    "windows": "cosine_distance",
}
#: What the values mean (a dataset tag), by scoring.
VALUES_MEANING: dict[Scoring, str] = {
    "hypercolumn": (
        "deep change vector analysis: sqrt of the mean over the levels (the standardised"
        " bands, and the dense model's stem, layer1, layer2, layer3) of the mean squared"
        " difference of the z-normalised kept channels, upsampled to 10 m; each date's bands"
        " standardised over its usable pixels; 0 = unchanged"
    ),
    "stem": (
        "Euclidean distance between the encoder stem's features (first convolution and ReLU,"
        " evaluated at every pixel) of the two dates, each date's bands standardised over its"
        " valid pixels; 0 = unchanged"
    ),
    "windows": (
        "mean over the windows covering the pixel of 1 - cos(e_before, e_after), e the"
        " L2-normalised embeddings of the window at each date; 0 = unchanged, up to 2"
    ),
}
#: Units of the values, by scoring.
UNITS: dict[Scoring, str] = {
    "hypercolumn": "z-normalised feature distance",
    "stem": "feature distance",
    "windows": "cosine distance",
}
#: Target resolution (metres) of a projected product's grid.
TARGET_RESOLUTION_M = 10.0
#: Bands whose native resolution is 10 m; the grid comes from the finest of them.
_TEN_METRE_BANDS = ("B02", "B03", "B04", "B08")
#: Tile side of pair maps: 384 + 2 x 128 halo = 640-pixel cuts keep a full tile pair's
#: peak memory well under 2 GB (512-pixel tiles peaked near it); smaller tiles cost more
#: halo (the deepest layer's receptive field) per pixel.
DEFAULT_TILE = 384
#: GDAL's block cache while a pair map is made, MB.
GDAL_CACHE_MB = 128
#: The smallest window side the encoder is meant for (``min_size`` of exported models).
_MIN_WINDOW = 32


@dataclass(frozen=True)
class Scene:
    """One date on one grid.

    Attributes:
        dn: (12, height, width) float32 DN, :data:`~revisit.types.CANONICAL_BANDS`
            order, the product's offset applied; NaN where the band has no data.
        crs: The grid's CRS.
        transform: The grid's affine transform.
        width: Columns.
        height: Rows.
        valid: (height, width) bool, True where every band has data.
        source: Where it was read from (a path, or a note).
    """

    dn: npt.NDArray[np.float32]
    crs: CRS
    transform: Affine
    width: int
    height: int
    valid: npt.NDArray[np.bool_]
    source: str = ""

    @property
    def nodata(self) -> npt.NDArray[np.bool_]:
        """(height, width) bool, True where some band has no data."""
        return ~self.valid


@dataclass(frozen=True)
class PairMapResult:
    """What :func:`pair_change_map` wrote."""

    path: Path
    width: int
    height: int
    windows: int
    pixels_per_s: float
    seconds: float
    sha256: str
    size_bytes: int
    window: int
    stride: int
    scoring: Scoring = "windows"
    mask_path: Path | None = None
    polygons_path: Path | None = None
    threshold: float | None = None
    threshold_method: str = ""
    changed_pixels: int = 0
    valid_pixels: int = 0
    polygons: int = 0


# -- reading ---------------------------------------------------------------------------------


def _normalise_input(path: Path) -> Path:
    """A SAFE's MTD XML -> the SAFE; a band file of a band folder -> the folder."""
    if path.is_file() and path.name in MTD_NAMES:
        return path.parent
    if path.is_file() and BAND_FILE.match(path.name):
        return path.parent
    return path


def _find_product(path: Path) -> Product:
    """The one product at ``path``, found by the local source.

    Raises:
        ExportError: Missing, not a product, unusable, or more than one product.
    """
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise ExportError(f"{path}: no such file or directory")
    root = _normalise_input(path)
    rejected: list[str] = []

    def on_rejected(ref: str, reason: str, detail: str) -> None:
        rejected.append(f"{reason}: {detail}")

    try:
        products = list(LocalSource(root).products(on_rejected))
    except (OSError, rasterio.errors.RasterioError) as exc:
        raise ExportError(f"cannot read {path}: {one_line(exc)}") from exc
    if not products:
        why = "; ".join(rejected) if rejected else "no Sentinel-2 product found"
        raise ExportError(f"cannot read {path}: {why}")
    if len(products) > 1:
        ids = ", ".join(p.product_id for p in products[:4])
        raise ExportError(
            f"{path} holds {len(products)} products ({ids}...); give the one product to compare"
        )
    return products[0]


def _reference_grid(product: Product) -> tuple[CRS, Affine, int, int]:
    """The product's own 10 m grid: its finest 10 m band's, resampled to 10 m if projected."""
    best: tuple[float, CRS, Affine, int, int] | None = None
    for name in _TEN_METRE_BANDS:
        file = product.bands[name]
        with open_raster(file.path, product.product_id) as ds:
            crs, transform = georef(ds, product)
            size = abs(transform.a)
            if best is None or size < best[0]:
                best = (size, crs, transform, ds.width, ds.height)
    if best is None:  # pragma: no cover - _TEN_METRE_BANDS is not empty
        raise ExportError(f"{product.product_id}: no 10 m band")
    size, crs, transform, width, height = best
    if crs.is_projected and size > TARGET_RESOLUTION_M * 1.001:
        # e.g. a SAFE with only its 60 m bands: the same extent on a 10 m grid.
        factor = size / TARGET_RESOLUTION_M
        width, height = round(width * factor), round(height * factor)
        transform = Affine(
            TARGET_RESOLUTION_M, 0.0, transform.c, 0.0, -TARGET_RESOLUTION_M, transform.f
        )
    return crs, transform, width, height


def read_canonical(path: Path) -> Scene:
    """Read a product (band folder, SAFE, multi-band GeoTIFF) onto its own 10 m grid.

    The grid is that of the finest of its 10 m bands (B02, B03, B04, B08), a
    projected one resampled to 10 m when coarser (a SAFE holding only its 60 m
    JP2s). Other bands are warped onto it bilinearly. The whole scene is held
    in memory (12 float32 bands): meant for change-detection crops, not whole
    100 km tiles.

    Args:
        path: The product: a band folder (or one of its band files), a SAFE
            folder (or its MTD XML), or a multi-band GeoTIFF.

    Raises:
        ExportError: The path is missing, is not one Sentinel-2 product, or a
            file of it cannot be read.
    """
    product = _find_product(path)
    try:
        crs, transform, width, height = _reference_grid(product)
        dn = np.full((len(CANONICAL_BANDS), height, width), np.nan, dtype=np.float32)
        opened: dict[Path, Any] = {}
        try:
            with gdal_env():
                for i, name in enumerate(CANONICAL_BANDS):
                    file = product.bands[name]
                    if file.path not in opened:
                        opened[file.path] = open_raster(file.path, product.product_id)
                    ds = opened[file.path]
                    src_crs, src_transform = georef(ds, product)
                    src = read_dn(ds, file.index, Window(0, 0, ds.width, ds.height))
                    if file.offset:
                        src = np.maximum(src + np.float32(file.offset), np.float32(0.0))
                    if (
                        src_crs == crs
                        and src_transform == transform
                        and src.shape == (height, width)
                    ):
                        dn[i] = src
                        continue
                    reproject(
                        src,
                        dn[i],
                        src_transform=src_transform,
                        src_crs=src_crs,
                        src_nodata=np.nan,
                        dst_transform=transform,
                        dst_crs=crs,
                        dst_nodata=np.nan,
                        resampling=Resampling.bilinear,
                    )
        finally:
            for ds in opened.values():
                ds.close()
    except SceneRejectedError as exc:
        raise ExportError(f"cannot read {path}: {exc.reason}: {exc.detail}") from exc
    except (OSError, rasterio.errors.RasterioError) as exc:
        raise ExportError(f"cannot read {path}: {one_line(exc)}") from exc
    valid = np.all(np.isfinite(dn), axis=0)
    return Scene(dn, crs, transform, width, height, valid, str(path))


def reproject_onto(scene: Scene, like: Scene) -> Scene:
    """``scene`` warped bilinearly onto ``like``'s grid; NaN (invalid) outside it."""
    dn = np.full((scene.dn.shape[0], like.height, like.width), np.nan, dtype=np.float32)
    with gdal_env():
        reproject(
            np.ascontiguousarray(scene.dn, dtype=np.float32),
            dn,
            src_transform=scene.transform,
            src_crs=scene.crs,
            src_nodata=np.nan,
            dst_transform=like.transform,
            dst_crs=like.crs,
            dst_nodata=np.nan,
            resampling=Resampling.bilinear,
        )
    valid = np.all(np.isfinite(dn), axis=0)
    return Scene(dn, like.crs, like.transform, like.width, like.height, valid, scene.source)


def _same_pixels(a: Affine, b: Affine) -> bool:
    """Whether two north-up transforms share pixel size and their origins differ by whole pixels."""
    if a.b or a.d or b.b or b.d or a.a != b.a or a.e != b.e:
        return False
    cols = (b.c - a.c) / a.a
    rows = (b.f - a.f) / a.e
    return abs(cols - round(cols)) < 1e-6 and abs(rows - round(rows)) < 1e-6


class SceneSource:
    """A :class:`Scene` in memory as a :class:`~revisit.export.hypercolumn.GridSource`."""

    def __init__(self, scene: Scene) -> None:
        self.scene = scene

    def read(
        self, row: int, col: int, height: int, width: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        """The window's DN (NaN no data) and usable mask; outside the scene: no data."""
        dn = np.full((self.scene.dn.shape[0], height, width), np.nan, dtype=np.float32)
        ok = np.zeros((height, width), dtype=bool)
        r0, c0 = max(row, 0), max(col, 0)
        r1, c1 = min(row + height, self.scene.height), min(col + width, self.scene.width)
        if r1 > r0 and c1 > c0:
            dn[:, r0 - row : r1 - row, c0 - col : c1 - col] = self.scene.dn[:, r0:r1, c0:c1]
            ok[r0 - row : r1 - row, c0 - col : c1 - col] = self.scene.valid[r0:r1, c0:c1]
        return dn, ok


class ProductSource:
    """One product read window by window onto a 10 m grid (a :class:`GridSource`).

    Each band's file is opened once; a window reads only the part of each band
    that covers it (padded for resampling) and warps it bilinearly onto the
    window, so memory is bounded by the window whatever the product's size.
    Where the product has a cloud layer or a detector
    (:func:`revisit.export.clouds.cloud_detector`), cloud and cloud-shadow
    pixels are not usable.

    Args:
        path: The product (band folder, SAFE, multi-band GeoTIFF).
        crs: The output grid's CRS; the product's own 10 m grid by default.
        transform: The output grid's transform (with ``crs``).
        clouds: Mask clouds (default True).

    Raises:
        ExportError: The path is not one readable product.
    """

    def __init__(
        self,
        path: Path,
        *,
        crs: CRS | None = None,
        transform: Affine | None = None,
        width: int | None = None,
        height: int | None = None,
        clouds: bool = True,
    ) -> None:
        self.path = Path(path)
        self.product = _find_product(self.path)
        self._opened: dict[Path, Any] = {}
        try:
            own = _reference_grid(self.product)
        except SceneRejectedError as exc:
            raise ExportError(f"cannot read {path}: {exc.reason}: {exc.detail}") from exc
        except (OSError, rasterio.errors.RasterioError) as exc:
            raise ExportError(f"cannot read {path}: {one_line(exc)}") from exc
        if crs is None or transform is None or width is None or height is None:
            self.crs, self.transform, self.width, self.height = own
        else:
            self.crs, self.transform, self.width, self.height = crs, transform, width, height
        self.detector: Any = None
        if clouds:
            from revisit.export.clouds import cloud_detector

            self.detector = cloud_detector(self.product)

    @property
    def cloud_note(self) -> str:
        """What masks clouds for this product (for the map's tags)."""
        if self.detector is None:
            return "not masked"
        return f"{self.detector.kind}: {self.detector.detail}"

    def _dataset(self, file_path: Path) -> Any:
        if file_path not in self._opened:
            self._opened[file_path] = open_raster(file_path, self.product.product_id)
        return self._opened[file_path]

    def close(self) -> None:
        """Close the band files."""
        for ds in self._opened.values():
            ds.close()
        self._opened.clear()

    def __enter__(self) -> ProductSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(
        self, row: int, col: int, height: int, width: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        """The window's 12 bands as DN (offset applied, NaN no data) and its usable mask.

        Raises:
            ExportError: A band file cannot be read.
        """
        window_transform = self.transform * Affine.translation(col, row)
        dn = np.full((len(CANONICAL_BANDS), height, width), np.nan, dtype=np.float32)
        try:
            with gdal_env():
                for i, name in enumerate(CANONICAL_BANDS):
                    self._read_band(name, dn[i], window_transform, width, height)
                usable = np.all(np.isfinite(dn), axis=0)
                if self.detector is not None and usable.any():
                    from revisit.export.clouds import cloud_mask

                    cloudy = cloud_mask(
                        self.product,
                        self.detector,
                        crs=self.crs,
                        transform=window_transform,
                        width=width,
                        height=height,
                    )
                    if cloudy is not None:
                        usable &= ~cloudy
        except SceneRejectedError as exc:
            raise ExportError(f"cannot read {self.path}: {exc.reason}: {exc.detail}") from exc
        except (OSError, rasterio.errors.RasterioError) as exc:
            raise ExportError(f"cannot read {self.path}: {one_line(exc)}") from exc
        return dn, usable

    def _read_band(
        self, name: str, out: npt.NDArray[np.float32], transform: Affine, width: int, height: int
    ) -> None:
        file = self.product.bands[name]
        ds = self._dataset(file.path)
        src_crs, src_transform = georef(ds, self.product)
        if src_crs == self.crs and _same_pixels(src_transform, transform):
            # The band lies on the output grid (BEFORE's 10 m bands): read, no resampling.
            col0 = round((transform.c - src_transform.c) / src_transform.a)
            row0 = round((transform.f - src_transform.f) / src_transform.e)
            c0, r0 = max(col0, 0), max(row0, 0)
            c1, r1 = min(col0 + width, ds.width), min(row0 + height, ds.height)
            if c1 > c0 and r1 > r0:
                src = read_dn(ds, file.index, Window(c0, r0, c1 - c0, r1 - r0))
                if file.offset:
                    src = np.maximum(src + np.float32(file.offset), np.float32(0.0))
                out[r0 - row0 : r1 - row0, c0 - col0 : c1 - col0] = src
            return
        left, top = transform * (0, 0)
        right, bottom = transform * (width, height)
        bounds = (min(left, right), min(top, bottom), max(left, right), max(top, bottom))
        if src_crs != self.crs:
            bounds = transform_bounds(self.crs, src_crs, *bounds, densify_pts=21)
        window = chip_window(ds.width, ds.height, src_transform, bounds)
        if window is None:
            return  # the band does not reach this window: no data
        src = read_dn(ds, file.index, window)
        if file.offset:
            src = np.maximum(src + np.float32(file.offset), np.float32(0.0))
        src_window_transform = src_transform * Affine.translation(window.col_off, window.row_off)
        reproject(
            src,
            out,
            src_transform=src_window_transform,
            src_crs=src_crs,
            src_nodata=np.nan,
            dst_transform=transform,
            dst_crs=self.crs,
            dst_nodata=np.nan,
            resampling=Resampling.bilinear,
        )


# -- scoring ---------------------------------------------------------------------------------


def standardized(scene: Scene) -> npt.NDArray[np.float32]:
    """Each band as ``(DN - mean) / std`` over the scene's valid pixels; 0 where invalid.

    A band with no spread over the valid pixels is only centred. A scene with
    no valid pixel is all zeros.

    Returns:
        (bands, height, width) float32.
    """
    pixels = scene.dn[:, scene.valid].astype(np.float64)
    if pixels.size:
        mean = pixels.mean(axis=1)
        std = pixels.std(axis=1)
    else:
        mean = np.zeros(scene.dn.shape[0])
        std = np.ones(scene.dn.shape[0])
    std[std == 0] = 1.0
    out = ((scene.dn - mean[:, None, None]) / std[:, None, None]).astype(np.float32)
    out[:, ~scene.valid] = 0.0
    filled: npt.NDArray[np.float32] = np.nan_to_num(out, nan=0.0)
    return filled


def cva_map(before: Scene, after: Scene) -> npt.NDArray[np.float32]:
    """Change-vector analysis: the norm of the difference of per-image standardised bands.

    Each band of each date is standardised by its mean and standard deviation
    over that date's valid pixels (:func:`standardized`). Both scenes must be
    on the same grid.

    Returns:
        (height, width) float32, NaN where either date has no data.
    """
    if before.dn.shape != after.dn.shape:
        raise ValueError(f"scenes differ in shape: {before.dn.shape} vs {after.dn.shape}")
    diff = standardized(before) - standardized(after)
    score: npt.NDArray[np.float32] = np.sqrt(np.sum(diff * diff, axis=0)).astype(np.float32)
    score[~(before.valid & after.valid)] = np.nan
    return score


def _starts(size: int, window: int, stride: int) -> list[int]:
    """Window offsets along one axis: every ``stride``, the last one flush with the edge."""
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def _filled_reflectance(scene: Scene) -> npt.NDArray[np.float32]:
    """``DN * 1e-4`` with no-data pixels set to the band's mean over valid pixels."""
    out = scene.dn * np.float32(DN_SCALE)
    if not scene.valid.all():
        bad = ~np.isfinite(out)
        means = np.nanmean(np.where(bad, np.nan, out).reshape(out.shape[0], -1), axis=1)
        means = np.nan_to_num(means, nan=0.0)
        out = np.where(bad, means[:, None, None].astype(np.float32), out)
    return np.ascontiguousarray(out, dtype=np.float32)


class OnnxEncoder:
    """An exported model under onnxruntime (CPU), giving unit vectors."""

    def __init__(self, model: Path) -> None:
        if not model.is_file():
            raise ExportError(f"ONNX model {model}: no such file")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(model), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
            raise ExportError(f"cannot load ONNX model {model}: {one_line(exc)}") from exc
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def __call__(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        (out,) = self.session.run([self.output_name], {self.input_name: batch})
        vectors = np.asarray(out, dtype=np.float32).reshape(batch.shape[0], -1)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        unit: npt.NDArray[np.float32] = vectors / np.maximum(norms, np.float32(1e-12))
        return unit  # the division is a no-op for an "embedding" output


def _batches(positions: list[tuple[int, int]], batch: int) -> Iterator[list[tuple[int, int]]]:
    for i in range(0, len(positions), batch):
        yield positions[i : i + batch]


def score_pair(
    before: Scene,
    after: Scene,
    encoder: OnnxEncoder,
    *,
    window: int,
    stride: int,
    batch: int,
) -> tuple[npt.NDArray[np.float32], int]:
    """Per-pixel mean cosine distance of the windows covering it (scenes on one grid).

    Returns:
        The (height, width) float32 map (NaN where neither date has data), and
        how many windows were scored.
    """
    height, width = before.height, before.width
    a = _filled_reflectance(before)
    b = _filled_reflectance(after)
    positions = [
        (row, col)
        for row in _starts(height, window, stride)
        for col in _starts(width, window, stride)
    ]
    total = np.zeros((height, width), dtype=np.float64)
    count = np.zeros((height, width), dtype=np.int32)
    for chunk in _batches(positions, batch):
        cut = [a[:, r : r + window, c : c + window] for r, c in chunk]
        cut += [b[:, r : r + window, c : c + window] for r, c in chunk]
        vectors = encoder(np.stack(cut))
        n = len(chunk)
        scores = 1.0 - np.einsum("ij,ij->i", vectors[:n], vectors[n:]).astype(np.float64)
        for (r, c), s in zip(chunk, scores.tolist(), strict=True):
            total[r : r + window, c : c + window] += s
            count[r : r + window, c : c + window] += 1
    result = (total / np.maximum(count, 1)).astype(np.float32)
    result[~(before.valid | after.valid)] = np.nan
    return result, len(positions)


class StemEncoder:
    """The stem of an exported model -- first convolution (+ BatchNorm) and ReLU -- at stride 1.

    The graph is cut from the exported file: the ``Conv`` that reads the model's
    input, an optional ``BatchNormalization`` (the exporter usually folds it into
    the convolution) and the ``Relu`` after them, with the convolution's stride
    set to 1 so it is evaluated at every pixel. Its padding must keep the size
    (``kernel // 2`` on each side), so a pixel's feature is that of the
    ``kernel`` x ``kernel`` window centred on it.

    Args:
        model: An exported ``.onnx`` file (``features`` or ``embedding``).

    Raises:
        ExportError: The file is missing or unreadable, or its graph does not
            start with such a stem.
    """

    def __init__(self, model: Path) -> None:
        if not model.is_file():
            raise ExportError(f"ONNX model {model}: no such file")
        try:
            proto = onnx.load(str(model))
        except Exception as exc:  # protobuf's DecodeError, OSError
            raise ExportError(f"cannot load ONNX model {model}: {one_line(exc)}") from exc
        self.metadata: dict[str, str] = {e.key: e.value for e in proto.metadata_props}
        stem, self.input_name, self.channels, self.kernel = _cut_stem(proto, model)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.enable_cpu_mem_arena = False  # see DenseEncoder
        try:
            self.session = ort.InferenceSession(
                stem.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ExportError(f"cannot run the stem of {model}: {one_line(exc)}") from exc
        self.halo = self.kernel // 2

    def __call__(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """(N, bands, H, W) float32 -> (N, channels, H, W) float32 features."""
        (out,) = self.session.run(None, {self.input_name: batch})
        return np.asarray(out, dtype=np.float32)


def _cut_stem(proto: onnx.ModelProto, model: Path) -> tuple[onnx.ModelProto, str, int, int]:
    """The stem graph of ``proto`` at stride 1, its input name, its channels and kernel side."""
    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ExportError(f"{model}: expected one input, found {len(inputs)}")
    input_name = inputs[0].name

    def consumers(name: str) -> list[onnx.NodeProto]:
        return [node for node in graph.node if name in node.input]

    # The model's own input standardisation (Sub and Div by constants) is skipped:
    # dense scoring standardises each date over its own valid pixels instead.
    head = input_name
    while True:
        # A Shape node may read the input too (for the batch size of a later reshape).
        nodes = [node for node in consumers(head) if node.op_type != "Shape"]
        if (
            len(nodes) == 1
            and nodes[0].op_type in ("Sub", "Div", "Mul", "Add")
            and nodes[0].input[0] == head
            and nodes[0].input[1] in initializers
        ):
            head = nodes[0].output[0]
            continue
        break
    convs = [node for node in consumers(head) if node.op_type == "Conv"]
    if len(convs) != 1:
        raise ExportError(f"{model}: no single convolution reads the input {input_name!r}")
    conv = onnx.NodeProto()
    conv.CopyFrom(convs[0])
    conv.input[0] = input_name
    chain = [conv]
    following = consumers(conv.output[0])
    if len(following) == 1 and following[0].op_type == "BatchNormalization":
        chain.append(following[0])
        following = consumers(following[0].output[0])
    if len(following) != 1 or following[0].op_type != "Relu":
        raise ExportError(f"{model}: the first convolution is not followed by a ReLU")
    chain.append(following[0])
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
    weight = initializers.get(conv.input[1])
    if weight is None or len(weight.dims) != 4:
        raise ExportError(f"{model}: the first convolution's weight is not a 4-d initializer")
    channels, _, kernel_h, kernel_w = (int(d) for d in weight.dims)
    pads = list(attributes.get("pads", [0, 0, 0, 0]))
    if (
        kernel_h != kernel_w
        or kernel_h % 2 == 0
        or pads != [kernel_h // 2] * 4
        or list(attributes.get("dilations", [1, 1])) != [1, 1]
        or int(attributes.get("group", 1)) != 1
    ):
        raise ExportError(
            f"{model}: the first convolution ({kernel_h}x{kernel_w}, pads {pads}) does not keep"
            " the size at stride 1"
        )
    for attribute in conv.attribute:
        if attribute.name == "strides":
            del attribute.ints[:]
            attribute.ints.extend([1, 1])
    used = [name for node in chain for name in node.input if name in initializers]
    output = onnx.helper.make_tensor_value_info(
        chain[-1].output[0], onnx.TensorProto.FLOAT, ["batch", channels, "height", "width"]
    )
    stem_graph = onnx.helper.make_graph(
        chain,
        "stem",
        [inputs[0]],
        [output],
        initializer=[initializers[name] for name in dict.fromkeys(used)],
    )
    stem = onnx.helper.make_model(
        stem_graph, opset_imports=list(proto.opset_import), ir_version=proto.ir_version
    )
    try:
        onnx.checker.check_model(stem)
    except Exception as exc:  # onnx.checker.ValidationError
        raise ExportError(f"{model}: the stem cut from it is not valid: {one_line(exc)}") from exc
    return stem, input_name, channels, kernel_h


def score_dense(
    before: Scene, after: Scene, stem: StemEncoder, *, tile: int = 512
) -> npt.NDArray[np.float32]:
    """Per-pixel Euclidean distance of the stem's features of two standardised dates.

    The ``stem`` scoring of :func:`pair_change_map` on scenes in memory, with
    the band statistics of every tile (so tiling does not change the result).

    Args:
        before: One date.
        after: The other, on the same grid.
        stem: The exported model's stem.
        tile: Side of the tiles the image is processed in (each with a halo of
            half the kernel).

    Returns:
        (height, width) float32, NaN where either date has no data.
    """
    if before.dn.shape != after.dn.shape:
        raise ValueError(f"scenes differ in shape: {before.dn.shape} vs {after.dn.shape}")
    if tile < 1:
        raise ValueError(f"tile must be positive, got {tile}")
    scorer = Scorer(_StemExtractor(stem), normalize=False, input_level=False, stat_tiles=1 << 30)
    return _score_in_memory(before, after, scorer, tile=tile)


def _score_in_memory(
    before: Scene, after: Scene, scorer: Scorer, *, tile: int
) -> npt.NDArray[np.float32]:
    """:func:`score_tiles` over two scenes in memory, into one array (NaN where unusable)."""
    result = np.full((before.height, before.width), np.nan, dtype=np.float32)

    def sink(t: Tile, values: npt.NDArray[np.float32]) -> None:
        result[t.row : t.row + t.height, t.col : t.col + t.width] = values

    score_tiles(
        SceneSource(before),
        SceneSource(after),
        height=before.height,
        width=before.width,
        scorer=scorer,
        tile=tile,
        sink=sink,
    )
    return result


# -- writing ---------------------------------------------------------------------------------


def _remove_stale_scratch(out: Path) -> None:
    """Delete the scratch files of earlier maps of ``out`` whose process is gone (killed)."""
    for scratch in out.parent.glob(f".{out.name}.scores-*-*.tif"):
        try:
            pid = int(scratch.name.rsplit(".scores-", 1)[1].split("-", 1)[0])
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                scratch.unlink()
                log.info("removed %s, left by a killed pair map", scratch)
        except PermissionError:
            continue  # another user's live process


class _ScoreWriter:
    """Scores written tile by tile into a temporary tiled GeoTIFF, then published as a COG.

    The temporary lies beside the output; :meth:`publish` turns it into a
    validated deflate COG with rio-cogeo (block by block, not in memory) under
    another temporary name and renames that onto the output. Nothing is left
    behind if anything fails.
    """

    def __init__(self, out: Path, *, crs: CRS, transform: Affine, width: int, height: int) -> None:
        self.out = out
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_scratch(out)
        self.scratch = out.parent / f".{out.name}.scores-{os.getpid()}-{time.monotonic_ns()}.tif"
        profile = {
            "driver": "GTiff",
            "dtype": "float32",
            "count": 1,
            "width": width,
            "height": height,
            "crs": crs,
            "transform": transform,
            "nodata": float("nan"),
            "tiled": True,
            "blockxsize": 512,
            "blockysize": 512,
            "BIGTIFF": "IF_SAFER",
        }
        try:
            self.dataset = rasterio.open(self.scratch, "w", **profile)
        except (OSError, rasterio.errors.RasterioError) as exc:
            raise ExportError(f"could not write {out}: {one_line(exc)}") from exc

    def write(self, row: int, col: int, values: npt.NDArray[np.float32]) -> None:
        self.dataset.write(values, 1, window=Window(col, row, values.shape[1], values.shape[0]))

    def publish(self, *, description: str, units: str, tags: dict[str, str]) -> tuple[str, int]:
        from rio_cogeo.profiles import cog_profiles

        from revisit.export.changemap import _publish, _temporary, translate_to_cog

        self.dataset.set_band_description(1, description)
        self.dataset.update_tags(**tags)
        self.dataset.update_tags(1, name=description, units=units)
        self.dataset.close()
        profile: dict[str, Any] = dict(cog_profiles["deflate"])
        profile.update(predictor=3)
        try:
            with _temporary(self.out) as tmp:
                with rasterio.open(self.scratch) as src:
                    translate_to_cog(
                        src,
                        tmp,
                        profile,
                        what=str(self.out),
                        overview_resampling="average",
                        in_memory=False,
                    )
                written = _publish(tmp, self.out)
        except (OSError, rasterio.errors.RasterioError) as exc:
            raise ExportError(f"could not write the COG {self.out}: {one_line(exc)}") from exc
        finally:
            self.discard()
        return written.sha256, written.size_bytes

    def discard(self) -> None:
        if not self.dataset.closed:
            self.dataset.close()
        with contextlib.suppress(OSError):
            self.scratch.unlink()


def _write_cog(
    values: npt.NDArray[np.float32],
    like: Scene,
    path: Path,
    tags: dict[str, str],
    scoring: Scoring,
) -> tuple[str, int]:
    written = write_float_cog(
        values,
        path,
        crs=like.crs,
        transform=like.transform,
        description=BAND_DESCRIPTION[scoring],
        units=UNITS[scoring],
        tags=tags,
    )
    return written.sha256, written.size_bytes


def dense_model_for(model: Path) -> Path:
    """The ``dense`` model published beside ``model`` (``V.embedding.onnx`` -> ``V.dense.onnx``).

    A model that is itself dense is returned as it is.

    Raises:
        ExportError: No dense model lies beside it.
    """
    if not model.is_file():
        raise ExportError(f"ONNX model {model}: no such file")
    meta_output = ""
    with contextlib.suppress(Exception):  # an unreadable file fails later, with its own error
        meta_output = {e.key: e.value for e in onnx.load(str(model)).metadata_props}.get(
            "output", ""
        )
    if meta_output == "dense":
        return model
    for suffix in (".embedding.onnx", ".features.onnx"):
        if model.name.endswith(suffix):
            sibling = model.with_name(model.name[: -len(suffix)] + ".dense.onnx")
            if sibling.is_file():
                return sibling
    raise ExportError(
        f"{model} is not a dense model and no V.dense.onnx lies beside it: publish the model"
        " again with `revisit export onnx` (it writes V.dense.onnx), pass --model V.dense.onnx,"
        " or use --scoring stem"
    )


def _scorer(scoring: Scoring, model: Path, *, keep: float) -> tuple[Scorer, dict[str, str]]:
    if scoring == "hypercolumn":
        dense = DenseEncoder(dense_model_for(model))
        return Scorer(dense, normalize=True, keep=keep), dense.metadata
    stem = StemEncoder(model)
    return Scorer(_StemExtractor(stem), normalize=False, input_level=False), stem.metadata


class _StemExtractor:
    """:class:`StemEncoder` as a one-level :class:`~revisit.export.hypercolumn.FeatureExtractor`."""

    def __init__(self, stem: StemEncoder) -> None:
        self.stem = stem
        self.levels: tuple[Level, ...] = (Level("stem", 1, stem.channels),)
        self.halo = stem.halo
        self.align = 1

    def __call__(self, z: npt.NDArray[np.float32]) -> list[npt.NDArray[np.float32]]:
        return [self.stem(np.ascontiguousarray(z))]


def score_scenes(
    before: Scene,
    after: Scene,
    model: Path,
    *,
    scoring: Scoring = "hypercolumn",
    keep: float = DEFAULT_KEEP,
    tile: int = 512,
) -> npt.NDArray[np.float32]:
    """Score two in-memory scenes on one grid (``hypercolumn`` or ``stem``), as an array.

    The same computation as :func:`pair_change_map`, for benches and tests.

    Returns:
        (height, width) float32, NaN where either date is not usable.
    """
    if before.dn.shape != after.dn.shape:
        raise ValueError(f"scenes differ in shape: {before.dn.shape} vs {after.dn.shape}")
    scoring = _canonical_scoring(scoring)
    if scoring == "windows":
        raise ValueError("score_scenes scores hypercolumn or stem; use score_pair for windows")
    scorer, _ = _scorer(scoring, model, keep=keep)
    return _score_in_memory(before, after, scorer, tile=tile)


def _canonical_scoring(scoring: str) -> Scoring:
    name = "stem" if scoring == "dense" else scoring  # "dense" was the stem scoring's old name
    if name not in SCORINGS:
        raise ExportError(f"unknown scoring {scoring!r}; expected one of {', '.join(SCORINGS)}")
    return name


def sidecar_paths(out: Path) -> tuple[Path, Path]:
    """The default mask and polygon files of a score map: ``map.mask.tif``, ``map.geojson``."""
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return out.with_name(f"{stem}.mask.tif"), out.with_name(f"{stem}.geojson")


def pair_change_map(
    before: Path,
    after: Path,
    *,
    model: Path,
    out: Path,
    scoring: str = "hypercolumn",
    stride: int = 16,
    window: int | None = None,
    batch: int = 64,
    tile: int = DEFAULT_TILE,
    keep: float = DEFAULT_KEEP,
    clouds: bool = True,
    mask: Path | None = None,
    polygons: Path | None = None,
    write_mask: bool = True,
    threshold: float | None = None,
    threshold_method: str | None = None,
    opening_radius_px: int = 0,
    min_area_m2: float = 0.0,
) -> PairMapResult:
    """Score how far the encoder's features moved between two dates, per pixel, as a COG.

    Args:
        before: The older product (its grid is the map's).
        after: The newer product (warped onto BEFORE's grid).
        model: An exported ``.onnx`` model: for ``hypercolumn`` the ``dense``
            model or a model published beside one; for ``stem`` and
            ``windows`` an ``embedding`` or ``features`` model.
        out: The score COG to write; replaced atomically.
        scoring: ``hypercolumn``, ``stem`` or ``windows`` (see the module
            docstring); ``dense`` is the old name of ``stem``.
        stride: Pixels between windows (``windows`` only).
        window: Window side (``windows`` only); the model's ``patch_size``
            metadata by default, capped at the image size, at least 32.
        batch: Windows per onnxruntime call (``windows`` only; each date counts once).
        tile: Tile side (``hypercolumn`` and ``stem``).
        keep: Fraction of channels kept per level (``hypercolumn``).
        clouds: Make cloud and cloud-shadow pixels of either date no-data.
        mask: The change mask COG (default ``<out stem>.mask.tif``).
        polygons: The GeoJSON polygons (default ``<out stem>.geojson``).
        write_mask: Write the mask and polygons (default True).
        threshold: The score above which a pixel is change; automatic by default.
        threshold_method: How the automatic threshold is found (see
            :mod:`revisit.export.changemask`).
        opening_radius_px: Morphological opening radius of the mask (0: none).
        min_area_m2: Minimum mapping unit: smaller change regions are dropped.

    Returns:
        Where the map went, its size, windows scored (one per pixel but for
        ``windows``), throughput, and the mask's threshold.

    Raises:
        ExportError: An input unreadable, the model unloadable, the image
            smaller than the window, bad arguments, or a file not written.
    """
    scoring_name = _canonical_scoring(scoring)
    if stride < 1:
        raise ExportError(f"stride must be at least 1, got {stride}")
    if batch < 1:
        raise ExportError(f"batch must be at least 1, got {batch}")
    if tile < 16:
        raise ExportError(f"tile must be at least 16, got {tile}")
    if opening_radius_px < 0:
        raise ExportError(f"opening radius must be >= 0, got {opening_radius_px}")
    if min_area_m2 < 0:
        raise ExportError(f"minimum mapping unit must be >= 0 m², got {min_area_m2}")
    model = Path(model).expanduser().absolute()
    out = Path(out).expanduser().absolute()
    mask_default, polygons_default = sidecar_paths(out)
    mask_path = Path(mask).expanduser().absolute() if mask else mask_default
    polygons_path = Path(polygons).expanduser().absolute() if polygons else polygons_default
    started = time.perf_counter()
    if scoring_name == "windows":
        result = _windows_map(
            Path(before), Path(after), model=model, out=out, stride=stride, window=window,
            batch=batch,
        )  # fmt: skip
    else:
        result = _dense_map(
            Path(before),
            Path(after),
            model=model,
            out=out,
            scoring=scoring_name,
            tile=tile,
            keep=keep,
            clouds=clouds,
        )
    if write_mask:
        from revisit.export.changemask import DEFAULT_THRESHOLD_METHOD, write_change_mask

        masked = write_change_mask(
            out,
            mask_path=mask_path,
            polygons_path=polygons_path,
            threshold=threshold,
            method=threshold_method or DEFAULT_THRESHOLD_METHOD,
            opening_radius_px=opening_radius_px,
            min_area_m2=min_area_m2,
            tags={"scoring": scoring_name, "model": str(model)},
        )
        result = dataclasses.replace(
            result,
            mask_path=masked.mask_path,
            polygons_path=masked.polygons_path,
            threshold=masked.threshold,
            threshold_method=masked.method,
            changed_pixels=masked.changed_pixels,
            valid_pixels=masked.valid_pixels,
            polygons=masked.polygons,
        )
    seconds = time.perf_counter() - started
    pixels = result.width * result.height
    return dataclasses.replace(
        result, seconds=seconds, pixels_per_s=pixels / seconds if seconds > 0 else float("inf")
    )


def _common_tags(
    before: Path, after: Path, model: Path, meta: dict[str, str], scoring: Scoring
) -> dict[str, str]:
    return {
        "values": VALUES_MEANING[scoring],
        "scoring": scoring,
        "before": str(before.expanduser().absolute()),
        "after": str(after.expanduser().absolute()),
        "model": str(model),
        "model_sha256": sha256_file(model),
        "model_version": meta.get("model_version", ""),
        "model_published_version": meta.get("version", ""),
        "model_output": meta.get("output", ""),
        "method": meta.get("method", ""),
        "step": meta.get("step", ""),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }


def _dense_map(
    before: Path,
    after: Path,
    *,
    model: Path,
    out: Path,
    scoring: Scoring,
    tile: int,
    keep: float,
    clouds: bool,
) -> PairMapResult:
    # The model is loaded first: a bad model fails before the images are read.
    scorer, meta = _scorer(scoring, model, keep=keep)
    used_model = dense_model_for(model) if scoring == "hypercolumn" else model
    # GDAL's block cache defaults to 5 % of the machine's memory and fills with the
    # decompressed blocks of every band read and of the scores written: bound it.
    with (
        rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB),
        ProductSource(before, clouds=clouds) as first,
        ProductSource(
            after,
            crs=first.crs,
            transform=first.transform,
            width=first.width,
            height=first.height,
            clouds=clouds,
        ) as second,
    ):
        writer = _ScoreWriter(
            out,
            crs=first.crs,
            transform=first.transform,
            width=first.width,
            height=first.height,
        )
        try:
            measured = score_tiles(
                first,
                second,
                height=first.height,
                width=first.width,
                scorer=scorer,
                tile=tile,
                sink=lambda t, values: writer.write(t.row, t.col, values),
            )
            tags = _common_tags(before, after, used_model, meta, scoring)
            tags.update(
                {
                    "tile": str(tile),
                    "tiles": str(measured["tiles"]),
                    "stat_tiles": str(measured["stat_tiles"]),
                    "clouds_before": first.cloud_note,
                    "clouds_after": second.cloud_note,
                    "nodata": "NaN: either date has no data, cloud or cloud shadow",
                }
            )
            if scoring == "stem":
                tags["window"] = str(scorer.extractor.halo * 2 + 1)
                tags["stride"] = "1"
            if scoring == "hypercolumn":
                tags["keep"] = repr(keep)
                tags["kept_channels"] = json.dumps(measured["kept"])
            sha256, size = writer.publish(
                description=BAND_DESCRIPTION[scoring], units=UNITS[scoring], tags=tags
            )
        except BaseException:
            writer.discard()
            raise
    log.info("pair change map %s (%s): %dx%d", out, scoring, first.width, first.height)
    kernel = scorer.extractor.halo * 2 + 1 if scoring == "stem" else 0
    return PairMapResult(
        path=out,
        width=first.width,
        height=first.height,
        windows=first.width * first.height,
        pixels_per_s=0.0,
        seconds=0.0,
        sha256=sha256,
        size_bytes=size,
        window=kernel,
        stride=1,
        scoring=scoring,
    )


def _windows_map(
    before: Path,
    after: Path,
    *,
    model: Path,
    out: Path,
    stride: int,
    window: int | None,
    batch: int,
) -> PairMapResult:
    encoder = OnnxEncoder(model)
    meta = encoder.metadata
    first = read_canonical(before)
    second = reproject_onto(read_canonical(after), first)
    min_size = int(meta.get("min_size") or _MIN_WINDOW)
    if window is None:
        window = int(meta.get("patch_size") or 64)
        window = min(window, first.width, first.height)
    if window < min_size:
        raise ExportError(
            f"window {window} is smaller than the model's minimum of {min_size} pixels"
            f" (image {first.width}x{first.height})"
        )
    if window > first.width or window > first.height:
        raise ExportError(
            f"window {window} does not fit in the {first.width}x{first.height} image of {before}"
        )
    if not (first.valid | second.valid).any():
        raise ExportError(f"{before} and {after} have no valid pixel in common grid")
    values, windows = score_pair(first, second, encoder, window=window, stride=stride, batch=batch)
    tags = _common_tags(before, after, model, meta, "windows")
    tags.update(
        {
            "model_output": meta.get("output", encoder.output_name),
            "stride": str(stride),
            "window": str(window),
            "windows": str(windows),
            "nodata": "NaN: neither date has data",
        }
    )
    sha256, size = _write_cog(values, first, out, tags, "windows")
    return PairMapResult(
        path=out,
        width=first.width,
        height=first.height,
        windows=windows,
        pixels_per_s=0.0,
        seconds=0.0,
        sha256=sha256,
        size_bytes=size,
        window=window,
        stride=stride,
        scoring="windows",
    )
