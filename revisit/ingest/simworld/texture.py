"""Spatial texture primitives: smooth noise, field parcels, meandering rivers, street grids.

All vectorised numpy on small square canvases. Smooth noise is value noise:
random values on a coarse lattice, interpolated with smoothstep weights through
two small matrix products (``M_rows @ lattice @ M_cols.T``), which is both fast
and lets the same noise be sampled at shifted coordinates (cloud shadows).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]


def interp_matrix(coords: F32, cell: float, origin: int, n_nodes: int) -> F32:
    """Smoothstep interpolation weights from lattice nodes to sample coordinates.

    Args:
        coords: Sample positions in pixels, shape (n,).
        cell: Lattice spacing in pixels.
        origin: Lattice index of node 0 (node k sits at ``(origin + k) * cell``).
        n_nodes: Number of lattice nodes.

    Returns:
        (n, n_nodes) weights; each row sums to 1.

    Raises:
        ValueError: A coordinate falls outside the lattice.
    """
    pos = coords / np.float32(cell) - np.float32(origin)
    lo = np.floor(pos).astype(np.int64)
    if lo.size and (lo.min() < 0 or lo.max() + 1 >= n_nodes):
        raise ValueError("sample coordinates fall outside the noise lattice")
    t = pos - lo
    w1 = t * t * (3.0 - 2.0 * t)
    out = np.zeros((coords.shape[0], n_nodes), dtype=np.float32)
    rows = np.arange(coords.shape[0])
    out[rows, lo] = 1.0 - w1
    out[rows, lo + 1] = w1
    return out


def lattice_sample(lattice: F32, cell: float, origin: tuple[int, int], rows: F32, cols: F32) -> F32:
    """Sample value noise defined by ``lattice`` on the grid ``rows`` x ``cols``.

    Args:
        lattice: Node values, shape (n_rows, n_cols).
        cell: Lattice spacing in pixels.
        origin: Lattice index (row, col) of node (0, 0).
        rows, cols: Pixel coordinates to sample.

    Returns:
        (len(rows), len(cols)) smooth field.
    """
    mr = interp_matrix(rows, cell, origin[0], lattice.shape[0])
    mc = interp_matrix(cols, cell, origin[1], lattice.shape[1])
    return (mr @ lattice @ mc.T).astype(np.float32, copy=False)


def smooth_noise(rng: np.random.Generator, size: int, *, cell: float, octaves: int = 3) -> F32:
    """Fractal value noise on a ``size`` x ``size`` canvas, about zero mean and unit std.

    Args:
        rng: Where the lattice values come from.
        size: Canvas side in pixels.
        cell: Spacing of the coarsest lattice in pixels; each octave halves it.
        octaves: How many octaves to add (amplitude halves each time).

    Raises:
        ValueError: ``cell`` is not positive or ``octaves`` < 1.
    """
    if cell <= 0 or octaves < 1:
        raise ValueError(f"need cell > 0 and octaves >= 1, not {cell}, {octaves}")
    coords = np.arange(size, dtype=np.float32) + np.float32(0.5)
    total = np.zeros((size, size), dtype=np.float32)
    amp = 1.0
    for _ in range(octaves):
        n = math.ceil(size / cell) + 2
        lattice = rng.standard_normal((n, n)).astype(np.float32)
        total += np.float32(amp) * lattice_sample(lattice, cell, (0, 0), coords, coords)
        amp *= 0.5
        cell = max(cell / 2.0, 1.0)
    std = float(total.std())
    out: F32 = ((total - total.mean()) / (std if std > 0 else 1.0)).astype(np.float32)
    return out


def rank_uniform(field: F32) -> F32:
    """Map a field to uniform [0, 1) by rank, keeping its spatial pattern."""
    flat = field.ravel()
    ranks = np.empty(flat.size, dtype=np.float32)
    ranks[np.argsort(flat, kind="stable")] = np.arange(flat.size, dtype=np.float32) / flat.size
    return ranks.reshape(field.shape)


def rotated_coords(size: int, angle: float) -> tuple[F32, F32]:
    """Canvas coordinates rotated by ``angle`` radians: (u along, v across)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    return xx * c + yy * s, -xx * s + yy * c


def breaks(rng: np.random.Generator, lo: float, hi: float, mean_len: float) -> F32:
    """Random cut positions covering [lo, hi] with lognormal spacings of about ``mean_len``."""
    span = hi - lo
    n = int(span / max(mean_len, 1.0) * 2) + 4
    steps = mean_len * rng.lognormal(0.0, 0.45, n).astype(np.float32)
    cuts = lo - rng.uniform(0.0, mean_len) + np.cumsum(steps)
    while cuts[-1] < hi:
        cuts = np.concatenate([cuts, cuts[-1:] + mean_len * np.float32(1.0 + rng.random())])
    return cuts.astype(np.float32)


def parcels(
    rng: np.random.Generator, u: F32, v: F32, len_u: float, len_v: float
) -> tuple[I32, F32, F32]:
    """Rectangular parcels in rotated strips whose cross-cuts are staggered strip by strip.

    Args:
        rng: Generator.
        u, v: Rotated coordinates (see :func:`rotated_coords`).
        len_u, len_v: Mean parcel length along ``u`` and ``v`` in pixels.

    Returns:
        (parcel id per pixel, the ``u`` cut positions, the ``v`` cut positions).
    """
    cuts_u = breaks(rng, float(u.min()), float(u.max()), len_u)
    strip = np.searchsorted(cuts_u, u).astype(np.int32)
    phase = rng.uniform(0.0, len_v, cuts_u.size + 1).astype(np.float32)
    cuts_v = breaks(rng, float(v.min()), float(v.max()) + len_v, len_v)
    cell = np.searchsorted(cuts_v, v + phase[strip]).astype(np.int32)
    ident = strip * np.int32(cuts_v.size + 1) + cell
    _, inverse = np.unique(ident, return_inverse=True)
    return inverse.reshape(u.shape).astype(np.int32), cuts_u, cuts_v


def line_mask(coord: F32, positions: F32, width: float) -> npt.NDArray[np.bool_]:
    """Pixels within ``width / 2`` of any of the straight lines ``coord == position``."""
    if positions.size == 0:
        return np.zeros(coord.shape, dtype=bool)
    dist = np.abs(coord[..., None] - positions).min(axis=-1)
    mask: npt.NDArray[np.bool_] = dist < width / 2.0
    return mask


def meander_distance(rng: np.random.Generator, size: int) -> F32:
    """Distance in pixels from each canvas pixel to a meandering river centreline.

    The centreline crosses the canvas at a random angle and offset, with two
    sine harmonics of random wavelength and amplitude.
    """
    angle = rng.uniform(0.0, np.pi)
    u, v = rotated_coords(size, angle)
    centre = np.float32(size / 2.0)
    uc = u - (centre * np.float32(math.cos(angle) + math.sin(angle)))
    vc = v - (centre * np.float32(math.cos(angle) - math.sin(angle)))
    offset = rng.uniform(-0.3, 0.3) * size
    wave = np.zeros_like(uc)
    slope = np.zeros_like(uc)
    for scale in (1.0, 0.45):
        k = np.float32(2 * np.pi / (rng.uniform(0.6, 1.6) * size * scale))
        amp = np.float32(rng.uniform(0.05, 0.18) * size * scale)
        phase = np.float32(rng.uniform(0, 2 * np.pi))
        wave += amp * np.sin(k * uc + phase)
        slope += amp * k * np.cos(k * uc + phase)
    # Vertical distance to the curve, corrected for its local slope.
    dist: F32 = (np.abs(vc - np.float32(offset) - wave) / np.sqrt(1.0 + slope * slope)).astype(
        np.float32
    )
    return dist
