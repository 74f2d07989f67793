"""Per-pixel change scores from an encoder's feature maps, tile by tile, in bounded memory.

Two scorings share one tiled driver (:func:`score_tiles`):

``hypercolumn`` (the default of ``revisit changemap pair``)
    Deep change vector analysis (Saha, Bovolo and Bruzzone, "Unsupervised deep
    change vector analysis for multiple-change detection in VHR images", TGRS
    2019) on the exported ``dense`` model (:class:`~revisit.export.onnx.DenseModel`):

    1. each date's bands are standardised over its own usable pixels (per band
       ``z = (DN - mean) / std``, cloud and no-data excluded, as change-vector
       analysis does) and handed to the model as ``band_mean + band_std * z``
       (the model's own input statistics), so the graph's first layer sees
       ``z``: each date is matched, band by band, to the distribution the
       encoder was trained on, which removes most of the illumination and
       atmosphere difference between the dates;
    2. the levels: the standardised bands themselves (``input``, the spectral
       level change-vector analysis works on) and the model's feature maps at
       four depths (``stem`` at every pixel, ``layer1``/``layer2``/``layer3``
       at strides 4, 8, 16). The input level is there because the deep levels
       alone rank OSCD's pixels below change-vector analysis (their 40-160 m
       cells blur changes a few pixels wide: docs/change-maps.md);
    3. per level, DCVA's selection: the ``keep`` fraction (half by default) of
       the channels whose raw difference varies most over the image
       (``var(a - b) = var(a) + var(b) - 2 cov(a, b)``);
    4. every kept channel is z-normalised per date (its mean and standard
       deviation over the pixels usable on both dates);
    5. the kept differences are upsampled bilinearly to the 10 m grid (pixel
       centres aligned, as ``scipy.ndimage.zoom`` with ``grid_mode`` does;
       :func:`upsampled_sq_norm` gives the squared norm of the upsampled
       vectors without materialising them);
    6. a pixel's score is ``sqrt(mean over levels of mean over kept channels of
       diff^2)``: each level weighs the same whatever its width (concatenating
       the channels, as DCVA does, would let layer3's 256 channels outvote the
       12 bands and the stem, which alone see pixel-sized changes).

    The statistics of steps 1, 3 and 4 come from a first pass over up to
    ``stat_tiles`` tiles spread over the image (all of them for an image of
    that many tiles or fewer, so a change-detection crop gets exact global
    statistics).
``stem``
    The encoder's first convolution and ReLU at every pixel
    (:class:`~revisit.export.pairmap.StemEncoder`) on the same standardised
    bands; a pixel's score is the Euclidean distance between its two 64-d
    stem vectors (no feature normalisation, no selection).

Tiles are ``tile`` pixels square, read with a halo of half the deepest layer's
receptive field (rounded up to its stride) so a tile's interior sees what one
pass over the whole image would; tile origins are multiples of the deepest
stride, so every tile's coarse grids are the whole image's.

Nothing here imports PyTorch: the models run under onnxruntime (CPU).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from revisit.errors import ExportError
from revisit.ingest.sources.rasters import one_line
from revisit.types import CANONICAL_BANDS, DN_SCALE

__all__ = [
    "DEFAULT_KEEP",
    "DenseEncoder",
    "FeatureExtractor",
    "GridSource",
    "Level",
    "Scorer",
    "Tile",
    "score_tiles",
    "tiles_of",
    "upsampled_sq_norm",
]

log = logging.getLogger(__name__)

#: Fraction of each level's channels kept (the least correlated between the dates).
DEFAULT_KEEP = 0.5
#: Tiles the statistics pass reads at most.
DEFAULT_STAT_TILES = 16
#: Feature maps of sampled tiles kept between the two passes, at most (bytes).
_CACHE_BYTES = 256 << 20
#: Channels scored at once (bounds the scoring pass's temporaries).
_CHANNEL_CHUNK = 8
_EMPTY = np.zeros((0, 0, 0), dtype=np.float32)
_BANDS = len(CANONICAL_BANDS)

F32 = npt.NDArray[np.float32]
Bool = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Level:
    """One feature map of a dense model: its output name, stride and channels."""

    name: str
    stride: int
    channels: int


class GridSource(Protocol):
    """One date on the output grid, readable window by window."""

    def read(self, row: int, col: int, height: int, width: int) -> tuple[F32, Bool]:
        """DN (12, height, width) float32, NaN where no data, and the usable mask.

        Usable: every band has data and the pixel is neither cloud nor cloud
        shadow. The window may reach past the grid; such pixels are not usable.
        """
        ...


class FeatureExtractor(Protocol):
    """A model giving feature maps of standardised bands."""

    levels: tuple[Level, ...]
    #: Halo (pixels) a tile needs so its interior is exact.
    halo: int
    #: Tile origins must be multiples of it (the deepest stride).
    align: int

    def __call__(self, z: F32) -> list[F32]:
        """(1, 12, H, W) standardised bands -> one (1, C, ceil(H/s), ceil(W/s)) map per level."""
        ...


def _parse_levels(text: str, model: Path) -> tuple[Level, ...]:
    levels: list[Level] = []
    try:
        for item in text.split(","):
            name, stride, channels = item.split(":")
            levels.append(Level(name, int(stride), int(channels)))
    except ValueError:
        raise ExportError(f"{model}: bad dense_outputs metadata {text!r}") from None
    if not levels:
        raise ExportError(f"{model}: no dense outputs")
    return tuple(levels)


class DenseEncoder:
    """An exported ``dense`` model under onnxruntime: feature maps at several depths.

    Its input is reflectance like every revisit model; :meth:`__call__` takes
    bands standardised per date and maps them onto the model's own input
    statistics (``band_mean + band_std * z``, from the metadata), so the
    graph's standardisation gives back ``z``.

    Args:
        model: A ``V.dense.onnx`` file.

    Raises:
        ExportError: Missing, unloadable, or not a dense model.
    """

    def __init__(self, model: Path) -> None:
        if not model.is_file():
            raise ExportError(f"ONNX model {model}: no such file")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # Without the arena, buffers of one tile's run go back when it ends: the arena
        # would keep its high-water mark (several full-resolution stem maps) for good.
        options.enable_cpu_mem_arena = False
        try:
            self.session = ort.InferenceSession(
                str(model), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
            raise ExportError(f"cannot load ONNX model {model}: {one_line(exc)}") from exc
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        if self.metadata.get("output") != "dense" or "dense_outputs" not in self.metadata:
            raise ExportError(
                f"{model} is not a dense model (output {self.metadata.get('output')!r}):"
                " hypercolumn scoring needs the V.dense.onnx that `revisit export onnx` publishes"
            )
        self.levels = _parse_levels(self.metadata["dense_outputs"], model)
        names = {o.name for o in self.session.get_outputs()}
        missing = [lv.name for lv in self.levels if lv.name not in names]
        if missing:
            raise ExportError(f"{model}: dense outputs {missing} not in the graph")
        self.input_name = self.session.get_inputs()[0].name
        self.mean, self.std = _band_statistics(self.metadata, model)
        self.align = max(lv.stride for lv in self.levels)
        field_px = int(self.metadata.get("dense_receptive_field") or 0) or 211
        # Half the receptive field, plus one coarse pixel for the bilinear upsampling.
        self.halo = _round_up(math.ceil(field_px / 2) + self.align, self.align)

    def __call__(self, z: F32) -> list[F32]:
        """(1, 12, H, W) standardised bands -> the feature map of every level."""
        x = (self.mean[None, :, None, None] + self.std[None, :, None, None] * z).astype(np.float32)
        outs = self.session.run([lv.name for lv in self.levels], {self.input_name: x})
        return [np.asarray(o, dtype=np.float32) for o in outs]


def _band_statistics(meta: dict[str, str], model: Path) -> tuple[F32, F32]:
    """The model's input standardisation (reflectance units); 0 and 1 when it has none."""
    try:
        mean = np.array([float(v) for v in meta.get("band_mean", "").split(",") if v], np.float32)
        std = np.array([float(v) for v in meta.get("band_std", "").split(",") if v], np.float32)
    except ValueError:
        raise ExportError(f"{model}: bad band_mean/band_std metadata") from None
    if mean.size == 0:
        mean, std = np.zeros(_BANDS, np.float32), np.ones(_BANDS, np.float32)
    if mean.shape != (_BANDS,) or std.shape != (_BANDS,):
        raise ExportError(f"{model}: band_mean/band_std do not have {_BANDS} values")
    return mean, std


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class Tile:
    """An output tile (``row``, ``col``, ``height``, ``width``) and the cut read for it."""

    row: int
    col: int
    height: int
    width: int
    cut_row: int
    cut_col: int
    cut_height: int
    cut_width: int


def tiles_of(height: int, width: int, *, tile: int, halo: int, align: int) -> list[Tile]:
    """The tiles covering a ``height`` x ``width`` grid, each with its halo'd cut.

    ``tile`` is rounded up to a multiple of ``align`` so every cut starts on
    the coarsest level's grid.
    """
    if tile < 1:
        raise ValueError(f"tile must be positive, got {tile}")
    size = _round_up(tile, align)
    out: list[Tile] = []
    for row in range(0, height, size):
        for col in range(0, width, size):
            r0, c0 = max(row - halo, 0), max(col - halo, 0)
            r1, c1 = min(row + size + halo, height), min(col + size + halo, width)
            out.append(
                Tile(
                    row,
                    col,
                    min(size, height - row),
                    min(size, width - col),
                    r0,
                    c0,
                    r1 - r0,
                    c1 - c0,
                )
            )
    return out


def _spread(tiles: Sequence[Tile], n: int) -> list[Tile]:
    """``n`` tiles evenly spread over the list (all of them when there are few)."""
    if len(tiles) <= n:
        return list(tiles)
    picks = np.linspace(0, len(tiles) - 1, n).round().astype(int)
    return [tiles[i] for i in sorted(set(picks.tolist()))]


@dataclass
class _Moments:
    """Running sums for means, variances and correlations, in float64."""

    n: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    sa: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    sb: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    saa: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    sbb: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    sab: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))

    def add(self, a: npt.NDArray[np.floating], b: npt.NDArray[np.floating]) -> None:
        """Add (C, N) samples of both dates."""
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        if self.n.size == 0:
            c = a.shape[0]
            self.n, self.sa, self.sb = np.zeros(c), np.zeros(c), np.zeros(c)
            self.saa, self.sbb, self.sab = np.zeros(c), np.zeros(c), np.zeros(c)
        self.n += a.shape[1]
        self.sa += a64.sum(axis=1)
        self.sb += b64.sum(axis=1)
        self.saa += np.einsum("cn,cn->c", a64, a64)
        self.sbb += np.einsum("cn,cn->c", b64, b64)
        self.sab += np.einsum("cn,cn->c", a64, b64)

    def stats(self) -> tuple[npt.NDArray[np.float64], ...]:
        """(mean_a, std_a, mean_b, std_b, rho); std 0 and rho 1 where there is no spread."""
        n = np.maximum(self.n, 1.0)
        ma, mb = self.sa / n, self.sb / n
        va = np.maximum(self.saa / n - ma * ma, 0.0)
        vb = np.maximum(self.sbb / n - mb * mb, 0.0)
        cov = self.sab / n - ma * mb
        sa, sb = np.sqrt(va), np.sqrt(vb)
        ok = (sa > 1e-6) & (sb > 1e-6)
        rho = np.where(ok, cov / np.where(ok, sa * sb, 1.0), 1.0)
        return ma, sa, mb, sb, rho


@dataclass(frozen=True)
class _LevelStats:
    mean_a: F32
    std_a: F32
    mean_b: F32
    std_b: F32
    kept: npt.NDArray[np.intp]


@dataclass
class Scorer:
    """How a pixel's score is made from the feature maps (see the module docstring).

    Attributes:
        extractor: The model.
        normalize: z-normalise every channel per date and keep the least
            correlated ``keep`` fraction per level (``hypercolumn``); False:
            the raw Euclidean distance over all channels (``stem``).
        keep: Fraction of each level's channels kept.
        stat_tiles: Tiles the statistics pass reads at most.
    """

    extractor: FeatureExtractor
    normalize: bool = True
    keep: float = DEFAULT_KEEP
    stat_tiles: int = DEFAULT_STAT_TILES
    input_level: bool = True

    @property
    def levels(self) -> tuple[Level, ...]:
        """The levels scored: the standardised bands (``input``) first, then the model's."""
        own = tuple(self.extractor.levels)
        return (Level("input", 1, _BANDS), *own) if self.input_level else own

    def __post_init__(self) -> None:
        if not 0.0 < self.keep <= 1.0:
            raise ExportError(f"keep must be in (0, 1], got {self.keep}")
        if self.stat_tiles < 1:
            raise ExportError(f"stat_tiles must be at least 1, got {self.stat_tiles}")


def _standardise(dn: F32, usable: Bool, mean: F32, std: F32) -> F32:
    z = ((dn - mean[:, None, None]) / std[:, None, None]).astype(np.float32)
    z[:, ~usable] = 0.0
    out: F32 = np.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)
    return out


def _coarse(mask: Bool, stride: int) -> Bool:
    """A fine mask at a level's resolution: a coarse pixel counts if its centre pixel does."""
    if stride == 1:
        return mask
    offset = stride // 2
    h, w = -(-mask.shape[0] // stride), -(-mask.shape[1] // stride)
    out = np.zeros((h, w), dtype=bool)
    picked = mask[offset::stride, offset::stride]
    out[: picked.shape[0], : picked.shape[1]] = picked
    return out


def _taps(size: int, coarse: int, stride: int) -> tuple[npt.NDArray[np.intp], F32]:
    """Bilinear taps along one axis: the first coarse index (into the edge-padded map) and weight.

    Fine pixel ``i``'s centre lies at coarse coordinate ``(i + 0.5) / stride - 0.5``
    (``scipy.ndimage.zoom``'s ``grid_mode``); outside the map the edge value is
    repeated (``mode="nearest"``), which the one-pixel edge padding gives.
    """
    u = (np.arange(size, dtype=np.float64) + 0.5) / stride - 0.5
    first = np.floor(u)
    weight = (u - first).astype(np.float32)
    index = np.clip(first.astype(np.intp) + 1, 0, coarse)  # +1: the padding
    return index, weight


def upsampled_sq_norm(diff: F32, stride: int, height: int, width: int) -> F32:
    """``sum_c up(diff)_c ** 2`` at full resolution, ``up`` the bilinear upsampling.

    The same as ``(_upsample(diff, ...) ** 2).sum(0)`` without the C x H x W
    upsampled array: bilinear upsampling is linear, so the squared norm at a
    fine pixel is a quadratic form in its four coarse neighbours' vectors, and
    only their inner products (each pixel with itself and with its right,
    lower and two diagonal neighbours) are needed, computed once at the
    coarse resolution. Written here because no library computes the norm of an
    upsampled vector field without materialising it, which costs C times the
    memory and time (C up to 128 kept channels per level).

    Args:
        diff: (C, h, w) coarse difference vectors.
        stride: The upsampling factor.
        height: Fine rows (at most h * stride).
        width: Fine columns (at most w * stride).
    """
    if stride == 1:
        out1: F32 = np.einsum("chw,chw->hw", diff[:, :height, :width], diff[:, :height, :width])
        return out1
    _, h, w = diff.shape
    p = np.pad(diff, ((0, 0), (1, 1), (1, 1)), mode="edge")
    norm = np.einsum("chw,chw->hw", p, p)
    right = np.einsum("chw,chw->hw", p[:, :, :-1], p[:, :, 1:])
    down = np.einsum("chw,chw->hw", p[:, :-1, :], p[:, 1:, :])
    diag = np.einsum("chw,chw->hw", p[:, :-1, :-1], p[:, 1:, 1:])
    anti = np.einsum("chw,chw->hw", p[:, :-1, 1:], p[:, 1:, :-1])
    i0, fy = _taps(height, h, stride)
    j0, fx = _taps(width, w, stride)
    i1, j1 = i0 + 1, j0 + 1
    r0, r1 = i0[:, None], i1[:, None]
    c0, c1 = j0[None, :], j1[None, :]
    gy, gx = fy[:, None], fx[None, :]
    a = (1 - gy) * (1 - gx)
    b = (1 - gy) * gx
    c = gy * (1 - gx)
    d = gy * gx
    out: F32 = (
        a * a * norm[r0, c0]
        + b * b * norm[r0, c1]
        + c * c * norm[r1, c0]
        + d * d * norm[r1, c1]
        + 2 * a * b * right[r0, c0]
        + 2 * c * d * right[r1, c0]
        + 2 * a * c * down[r0, c0]
        + 2 * b * d * down[r0, c1]
        + 2 * a * d * diag[r0, c0]
        + 2 * b * c * anti[r0, c0]
    ).astype(np.float32)
    return out


def score_tiles(
    before: GridSource,
    after: GridSource,
    *,
    height: int,
    width: int,
    scorer: Scorer,
    tile: int = 512,
    sink: Callable[[Tile, F32], None],
) -> dict[str, object]:
    """Score every pixel of a ``height`` x ``width`` grid, tile by tile, into ``sink``.

    Args:
        before: The older date.
        after: The newer date, on the same grid.
        height: Grid rows.
        width: Grid columns.
        scorer: The model and the scoring.
        tile: Output tile side (rounded up to the model's coarsest stride).
        sink: Called with each tile and its (height, width) float32 scores,
            NaN where either date is not usable.

    Returns:
        What was measured: the band statistics of both dates, the channels kept
        per level, tiles scored and the statistics tiles.

    Raises:
        ExportError: The dates share no usable pixel.
    """
    ex = scorer.extractor
    levels = scorer.levels if scorer.normalize else tuple(ex.levels)
    tiles = tiles_of(height, width, tile=tile, halo=ex.halo, align=ex.align)
    sample = _spread(tiles, scorer.stat_tiles)
    # Only a crop whose every tile is sampled keeps features between the passes: on a
    # big image the one or two tiles that fit would hold memory through the whole pass.
    every_tile_sampled = len(sample) == len(tiles)

    # Pass 1a: each date's band statistics over its usable pixels, on the sampled tiles.
    bands_a, bands_b = _Moments(), _Moments()
    joint = 0
    for t in sample:
        dn_a, ok_a = before.read(t.row, t.col, t.height, t.width)
        dn_b, ok_b = after.read(t.row, t.col, t.height, t.width)
        if ok_a.any():
            x = dn_a[:, ok_a]
            bands_a.add(x, x)
        if ok_b.any():
            x = dn_b[:, ok_b]
            bands_b.add(x, x)
        joint += int((ok_a & ok_b).sum())
    if joint == 0:
        raise ExportError("the two dates share no usable pixel (no data or cloud on either)")
    mean_a, std_a, _, _, _ = bands_a.stats()
    mean_b, std_b, _, _, _ = bands_b.stats()
    std_a[std_a == 0] = 1.0
    std_b[std_b == 0] = 1.0
    band_stats = (
        mean_a.astype(np.float32),
        std_a.astype(np.float32),
        mean_b.astype(np.float32),
        std_b.astype(np.float32),
    )

    # The sampled tiles' features, kept from the statistics pass for the scoring pass
    # while they fit in ``_CACHE_BYTES`` (a change-detection crop is computed once).
    cache: dict[Tile, tuple[list[F32], list[F32], Bool]] = {}
    cached_bytes = 0

    def features(t: Tile) -> tuple[list[F32], list[F32], Bool]:
        nonlocal cached_bytes
        if t in cache:
            return cache.pop(t)
        got = _features(t)
        size = sum(f.nbytes for f in got[0]) * 2
        if scorer.normalize and every_tile_sampled and cached_bytes + size <= _CACHE_BYTES:
            cache[t] = got
            cached_bytes += size
        return got

    def _features(t: Tile) -> tuple[list[F32], list[F32], Bool]:
        dn_a, ok_a = before.read(t.cut_row, t.cut_col, t.cut_height, t.cut_width)
        dn_b, ok_b = after.read(t.cut_row, t.cut_col, t.cut_height, t.cut_width)
        za = _standardise(dn_a, ok_a, band_stats[0], band_stats[1])
        zb = _standardise(dn_b, ok_b, band_stats[2], band_stats[3])
        del dn_a, dn_b
        fa = [f[0] for f in ex(za[None])]
        fb = [f[0] for f in ex(zb[None])]
        if scorer.normalize and scorer.input_level:
            fa, fb = [za, *fa], [zb, *fb]
        return fa, fb, ok_a & ok_b

    def interior(t: Tile, level: Level) -> tuple[slice, slice]:
        s = level.stride
        top, left = (t.row - t.cut_row) // s, (t.col - t.cut_col) // s
        return slice(top, top + -(-t.height // s)), slice(left, left + -(-t.width // s))

    # Pass 1b: per level, per channel, both dates' moments over jointly usable pixels.
    level_stats: list[_LevelStats] = []
    if scorer.normalize:
        moments = [_Moments() for _ in levels]
        for t in sample:
            fa, fb, ok = features(t)
            for i, level in enumerate(levels):
                rows, cols = interior(t, level)
                mask = _coarse(ok, level.stride)[rows, cols]
                if mask.any():
                    moments[i].add(fa[i][:, rows, cols][:, mask], fb[i][:, rows, cols][:, mask])
        for m in moments:
            ma, sa, mb, sb, rho = m.stats()
            live = (sa > 1e-6) & (sb > 1e-6)
            n_keep = max(1, round(scorer.keep * int(live.sum()))) if live.any() else 0
            # DCVA's selection: the channels whose raw difference varies most over the
            # image, var(a - b) = var(a) + var(b) - 2 cov(a, b).
            key = -(sa * sa + sb * sb - 2 * rho * sa * sb)
            order = np.argsort(np.where(live, key, np.inf), kind="stable")
            level_stats.append(
                _LevelStats(
                    ma.astype(np.float32),
                    np.where(live, sa, 1.0).astype(np.float32),
                    mb.astype(np.float32),
                    np.where(live, sb, 1.0).astype(np.float32),
                    np.sort(order[:n_keep]),
                )
            )

    # Pass 2: every tile.
    for t in tiles:
        fa, fb, ok = features(t)
        total = np.zeros((t.cut_height, t.cut_width), dtype=np.float32)
        levels_used = 0
        for i, level in enumerate(levels):
            if scorer.normalize:
                st = level_stats[i]
                if st.kept.size == 0:
                    continue
                # The squared norm adds up over channels: chunks of them bound the memory.
                level_sum = np.zeros_like(total)
                for start in range(0, st.kept.size, _CHANNEL_CHUNK):
                    k = st.kept[start : start + _CHANNEL_CHUNK]
                    diff = (fa[i][k] - st.mean_a[k, None, None]) / st.std_a[k, None, None]
                    diff -= (fb[i][k] - st.mean_b[k, None, None]) / st.std_b[k, None, None]
                    level_sum += upsampled_sq_norm(diff, level.stride, *total.shape)
                total += level_sum / np.float32(st.kept.size)
            else:
                for start in range(0, fa[i].shape[0], _CHANNEL_CHUNK):
                    chunk = slice(start, start + _CHANNEL_CHUNK)
                    diff = fa[i][chunk] - fb[i][chunk]
                    total += upsampled_sq_norm(diff, level.stride, *total.shape)
            fa[i] = fb[i] = _EMPTY  # this level's maps are no longer needed
            levels_used += 1
        score = np.sqrt(total / max(levels_used, 1)) if scorer.normalize else np.sqrt(total)
        top, left = t.row - t.cut_row, t.col - t.cut_col
        out = np.array(score[top : top + t.height, left : left + t.width], dtype=np.float32)
        out[~ok[top : top + t.height, left : left + t.width]] = np.nan
        sink(t, out)
    return {
        "tiles": len(tiles),
        "stat_tiles": len(sample),
        "band_mean_before": [float(v) * DN_SCALE for v in band_stats[0]],
        "band_mean_after": [float(v) * DN_SCALE for v in band_stats[2]],
        "kept": {
            level.name: int(st.kept.size) for level, st in zip(levels, level_stats, strict=False)
        },  # empty without normalisation (every channel is used)
    }
