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

import logging
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
from rasterio.warp import Resampling, reproject
from rasterio.windows import Window

from revisit.errors import ExportError, SceneRejectedError
from revisit.export.changemap import write_float_cog
from revisit.fsutil import sha256_file
from revisit.ingest.sources.geotiff import BAND_FILE
from revisit.ingest.sources.local import LocalSource
from revisit.ingest.sources.rasters import (
    Product,
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

Scoring = Literal["dense", "windows"]
#: The scorings :func:`pair_change_map` knows.
SCORINGS: tuple[Scoring, ...] = ("dense", "windows")

#: Description of the one band of a pair change map, by scoring.
BAND_DESCRIPTION: dict[Scoring, str] = {
    "dense": "feature_distance",
    "windows": "cosine_distance",
}
#: What the values mean (a dataset tag), by scoring.
VALUES_MEANING: dict[Scoring, str] = {
    "dense": (
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
UNITS: dict[Scoring, str] = {"dense": "feature distance", "windows": "cosine distance"}
#: Target resolution (metres) of a projected product's grid.
TARGET_RESOLUTION_M = 10.0
#: Bands whose native resolution is 10 m; the grid comes from the finest of them.
_TEN_METRE_BANDS = ("B02", "B03", "B04", "B08")
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

    Args:
        before: One date.
        after: The other, on the same grid.
        stem: The exported model's stem.
        tile: Side of the tiles the image is processed in (each with a halo of
            half the kernel, so tiling does not change the result).

    Returns:
        (height, width) float32, NaN where either date has no data.
    """
    if before.dn.shape != after.dn.shape:
        raise ValueError(f"scenes differ in shape: {before.dn.shape} vs {after.dn.shape}")
    if tile < 1:
        raise ValueError(f"tile must be positive, got {tile}")
    height, width = before.height, before.width
    a = standardized(before)
    b = standardized(after)
    halo = stem.halo
    result = np.empty((height, width), dtype=np.float32)
    for row in range(0, height, tile):
        for col in range(0, width, tile):
            r0, r1 = max(row - halo, 0), min(row + tile + halo, height)
            c0, c1 = max(col - halo, 0), min(col + tile + halo, width)
            # A pixel at least ``halo`` inside the cut sees only real neighbours; at the
            # image's edges the convolution's zero padding is that of one whole pass.
            cut = np.stack([a[:, r0:r1, c0:c1], b[:, r0:r1, c0:c1]])
            features = stem(np.ascontiguousarray(cut))
            diff = features[0] - features[1]
            distance = np.sqrt(np.einsum("chw,chw->hw", diff, diff))
            top, left = row - r0, col - c0
            rows = min(tile, height - row)
            cols = min(tile, width - col)
            result[row : row + rows, col : col + cols] = distance[
                top : top + rows, left : left + cols
            ]
    result[~(before.valid & after.valid)] = np.nan
    return result


# -- writing ---------------------------------------------------------------------------------


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


def pair_change_map(
    before: Path,
    after: Path,
    *,
    model: Path,
    out: Path,
    scoring: Scoring = "dense",
    stride: int = 16,
    window: int | None = None,
    batch: int = 64,
    tile: int = 512,
) -> PairMapResult:
    """Score how far the encoder's features moved between two dates, per pixel, as a COG.

    Args:
        before: The older product (its grid is the map's).
        after: The newer product (warped onto BEFORE's grid).
        model: An exported ``.onnx`` model (``embedding`` or ``features`` output).
        out: The COG to write; replaced atomically.
        scoring: ``dense`` (the stem at every pixel) or ``windows`` (whole-model
            embeddings of sliding windows); see the module docstring.
        stride: Pixels between windows (``windows`` only).
        window: Window side (``windows`` only); the model's ``patch_size``
            metadata by default, capped at the image size, at least 32.
        batch: Windows per onnxruntime call (``windows`` only; each date counts once).
        tile: Tile side (``dense`` only).

    Returns:
        Where the map went, its size, windows scored (``dense``: one per pixel),
        throughput.

    Raises:
        ExportError: An input unreadable, the model unloadable, the image
            smaller than the window, bad arguments, or the COG not written.
    """
    if scoring not in SCORINGS:
        raise ExportError(f"unknown scoring {scoring!r}; expected one of {', '.join(SCORINGS)}")
    if stride < 1:
        raise ExportError(f"stride must be at least 1, got {stride}")
    if batch < 1:
        raise ExportError(f"batch must be at least 1, got {batch}")
    if tile < 1:
        raise ExportError(f"tile must be at least 1, got {tile}")
    model = Path(model).expanduser().absolute()
    out = Path(out).expanduser().absolute()
    started = time.perf_counter()
    # The model is loaded first: a bad model fails before the images are read.
    stem = StemEncoder(model) if scoring == "dense" else None
    encoder = OnnxEncoder(model) if stem is None else None
    meta = stem.metadata if stem is not None else encoder.metadata if encoder else {}
    first = read_canonical(Path(before))
    second = reproject_onto(read_canonical(Path(after)), first)
    if stem is not None:
        if not (first.valid & second.valid).any():
            raise ExportError(f"{before} and {after} have no valid pixel in common")
        values = score_dense(first, second, stem, tile=tile)
        window, stride, windows = stem.kernel, 1, first.width * first.height
        output_name = meta.get("output", "")
        nodata = "NaN: either date has no data"
    elif encoder is not None:
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
                f"window {window} does not fit in the {first.width}x{first.height} image"
                f" of {before}"
            )
        if not (first.valid | second.valid).any():
            raise ExportError(f"{before} and {after} have no valid pixel in common grid")
        values, windows = score_pair(
            first, second, encoder, window=window, stride=stride, batch=batch
        )
        output_name = meta.get("output", encoder.output_name)
        nodata = "NaN: neither date has data"
    else:  # pragma: no cover - one of the two is always set
        raise ExportError(f"no encoder for scoring {scoring!r}")
    tags = {
        "values": VALUES_MEANING[scoring],
        "scoring": scoring,
        "before": str(Path(before).expanduser().absolute()),
        "after": str(Path(after).expanduser().absolute()),
        "model": str(model),
        "model_sha256": sha256_file(model),
        "model_version": meta.get("model_version", ""),
        "model_published_version": meta.get("version", ""),
        "model_output": output_name,
        "method": meta.get("method", ""),
        "step": meta.get("step", ""),
        "stride": str(stride),
        "window": str(window),
        "windows": str(windows),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "nodata": nodata,
    }
    sha256, size = _write_cog(values, first, out, tags, scoring)
    seconds = time.perf_counter() - started
    pixels_per_s = first.width * first.height / seconds if seconds > 0 else float("inf")
    log.info(
        "pair change map %s (%s): %dx%d, %d windows, %.0f px/s",
        out,
        scoring,
        first.width,
        first.height,
        windows,
        pixels_per_s,
    )
    return PairMapResult(
        path=out,
        width=first.width,
        height=first.height,
        windows=windows,
        pixels_per_s=pixels_per_s,
        seconds=seconds,
        sha256=sha256,
        size_bytes=size,
        window=window,
        stride=stride,
        scoring=scoring,
    )
