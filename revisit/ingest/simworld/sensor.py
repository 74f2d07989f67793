"""The instrument: misregistration, native band resolution, noise and quantisation.

The scene is rendered on a 10 m canvas a little larger than the chip. The
sensor then

- shifts it by the acquisition's geolocation error (sub-pixel, bilinear), so
  two dates of one chip are never perfectly co-registered;
- averages the 20 m bands (B05 B06 B07 B8A B11 B12) over 2 x 2 and the 60 m
  bands (B01 B09) over 6 x 6 pixel blocks aligned to the global UTM grid, and
  hands them back at 10 m (nearest neighbour), as a 10 m chip of L1C looks;
- adds noise (a floor plus a share of the signal, per band, drawn at each band's
  native resolution) and quantises to
  uint16 DN = reflectance x 10000, with 0 reserved for nodata.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Final

import numpy as np
import numpy.typing as npt

from revisit.ingest.simworld import spectra as sp

F32 = npt.NDArray[np.float32]
U16 = npt.NDArray[np.uint16]

#: Largest geolocation error the canvas margin allows, in pixels.
MAX_SHIFT_PX: Final = 1.5
_SHIFT_PAD: Final = 2


def band_groups(resolution_m: float) -> list[tuple[int, list[int]]]:
    """(block factor, band indices) for the 10, 20 and 60 m bands on a grid of ``resolution_m``."""
    groups: dict[int, list[int]] = {}
    for band, native in enumerate(sp.NATIVE_RES_M):
        factor = max(1, round(native / resolution_m))
        groups.setdefault(factor, []).append(band)
    return sorted(groups.items())


def margin_for(resolution_m: float) -> int:
    """Canvas margin (pixels per side) that the shift and the coarsest band blocks need."""
    coarsest = max(f for f, _ in band_groups(resolution_m))
    return coarsest + _SHIFT_PAD


def _shift(img: F32, dy: float, dx: float) -> F32:
    """Bilinear resample of (bands, C, C) at (row + dy, col + dx); loses 2 px per side."""
    if abs(dy) > MAX_SHIFT_PX or abs(dx) > MAX_SHIFT_PX:
        raise ValueError(f"shift ({dy}, {dx}) exceeds {MAX_SHIFT_PX} px")
    size = img.shape[-1] - 2 * _SHIFT_PAD
    iy, ix = math.floor(dy), math.floor(dx)
    fy, fx = np.float32(dy - iy), np.float32(dx - ix)
    r0, c0 = _SHIFT_PAD + iy, _SHIFT_PAD + ix
    top = img[:, r0 : r0 + size, c0 : c0 + size + 1]
    bot = img[:, r0 + 1 : r0 + 1 + size, c0 : c0 + size + 1]
    rows = top + fy * (bot - top)
    return rows[:, :, :size] + fx * (rows[:, :, 1:] - rows[:, :, :size])


_BANK_SIZE: Final = 1 << 20


@lru_cache(maxsize=1)
def _noise_bank() -> F32:
    """A fixed bank of standard normal draws; chips read random windows of it.

    Drawing ~50 000 normals per chip costs more than rendering the chip, so the
    noise of a chip is a window of this bank at an offset drawn from the chip's
    generator: still a pure function of the chip's inputs, and uncorrelated
    between chips in any way a model could use.
    """
    return np.random.default_rng(20150623).standard_normal(_BANK_SIZE, dtype=np.float32)


def standard_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> F32:
    """Standard normal noise of ``shape``, from the bank when it is big enough."""
    count = math.prod(shape)
    if count > _BANK_SIZE // 4:
        return rng.standard_normal(shape, dtype=np.float32)
    start = int(rng.integers(0, _BANK_SIZE - count))
    return _noise_bank()[start : start + count].reshape(shape)


def _block_mean(
    img: F32, factor: int, margin: int, size: int, origin: tuple[int, int]
) -> tuple[F32, int, int]:
    """Average (bands, L, L) over ``factor`` blocks aligned to the global grid.

    Returns:
        (block means, row offset, column offset) where the offsets locate the
        chip's first pixel inside the blocks once upsampled.
    """
    spans = []
    for first in origin:  # global index of the chip's first row, then column
        start = (first // factor) * factor
        end = -(-(first + size) // factor) * factor
        lo = margin - (first - start)
        spans.append((lo, lo + (end - start), first - start))
    (ylo, yhi, yoff), (xlo, xhi, xoff) = spans
    part = img[:, ylo:yhi, xlo:xhi]
    nb, h, w = part.shape
    cols = part.reshape(nb, h, w // factor, factor).sum(axis=3)
    sums = cols.reshape(nb, h // factor, factor, w // factor).sum(axis=2)
    return sums * np.float32(1.0 / (factor * factor)), yoff, xoff


def acquire(
    rng: np.random.Generator,
    toa: F32,
    *,
    size: int,
    shift: tuple[float, float],
    origin: tuple[int, int],
    resolution_m: float,
) -> U16:
    """Turn a TOA reflectance canvas into the chip the sensor delivers.

    Args:
        rng: The chip's generator (for noise).
        toa: (12, C, C) top-of-atmosphere reflectance, C = size + 2 * margin.
        size: Chip side in pixels.
        shift: (rows, cols) geolocation error in pixels, each within +-1.5.
        origin: Global (row, col) pixel index of the chip's top-left pixel.
        resolution_m: Metres per pixel.

    Returns:
        (12, size, size) uint16 DN.

    Raises:
        ValueError: Shapes do not match or the shift is too large.
    """
    margin = (toa.shape[-1] - size) // 2
    if toa.shape != (sp.N_BANDS, size + 2 * margin, size + 2 * margin):
        raise ValueError(f"canvas {toa.shape} does not fit a {size} px chip")
    moved = _shift(toa, *shift)
    inner = margin - _SHIFT_PAD
    out = np.empty((sp.N_BANDS, size, size), dtype=np.float32)
    for factor, bands in band_groups(resolution_m):
        floor = sp.NOISE_FLOOR[bands, None, None]
        if factor == 1:
            sel = moved[bands, inner : inner + size, inner : inner + size]
            noise = standard_noise(rng, sel.shape)
            out[bands] = sel + (floor + sp.NOISE_GAIN * sel) * noise
            continue
        mean, yoff, xoff = _block_mean(moved[bands], factor, inner, size, origin)
        mean += (floor + sp.NOISE_GAIN * mean) * standard_noise(rng, mean.shape)
        full = np.repeat(np.repeat(mean, factor, axis=1), factor, axis=2)
        out[bands] = full[:, yoff : yoff + size, xoff : xoff + size]
    dn = np.rint(out * np.float32(10000.0))
    result: U16 = np.clip(dn, 1.0, 65535.0).astype(np.uint16)
    return result
