"""The tiled feature-map scoring of pair change maps (revisit.export.hypercolumn)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from revisit.export.hypercolumn import _Moments, tiles_of, upsampled_sq_norm


@pytest.mark.parametrize(
    ("stride", "coarse", "fine"),
    [
        (1, (20, 11), (20, 11)),
        (4, (30, 17), (118, 66)),
        (8, (9, 9), (70, 72)),
        (16, (5, 7), (80, 100)),
    ],
)
def test_upsampled_norm_is_the_norm_of_the_zoomed_vectors(
    stride: int, coarse: tuple[int, int], fine: tuple[int, int]
) -> None:
    rng = np.random.default_rng(stride)
    diff = rng.normal(size=(13, *coarse)).astype(np.float32)
    zoomed = ndimage.zoom(diff, (1, stride, stride), order=1, mode="nearest", grid_mode=True)
    expected = (zoomed[:, : fine[0], : fine[1]] ** 2).sum(axis=0)
    got = upsampled_sq_norm(diff, stride, *fine)
    assert got.shape == fine
    assert float(np.abs(got - expected).max()) < 1e-5 * float(expected.max())


def test_tiles_cover_the_grid_once_and_start_on_the_coarse_grid() -> None:
    tiles = tiles_of(1000, 777, tile=250, halo=128, align=16)
    cover = np.zeros((1000, 777), dtype=int)
    for t in tiles:
        assert t.row % 16 == 0 and t.col % 16 == 0  # tile 250 rounds up to 256
        assert t.cut_row % 16 == 0 and t.cut_col % 16 == 0
        assert t.cut_row <= t.row and t.cut_row + t.cut_height >= t.row + t.height
        assert t.cut_row == max(t.row - 128, 0)
        cover[t.row : t.row + t.height, t.col : t.col + t.width] += 1
    assert (cover == 1).all()


def test_moments_give_means_deviations_and_correlations() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(2.0, 3.0, size=(3, 5000))
    b = 0.5 * a + rng.normal(size=(3, 5000))
    b[2] = 7.0  # no spread: std 0, rho 1 (never selected as changed)
    m = _Moments()
    m.add(a[:, :2000], b[:, :2000])
    m.add(a[:, 2000:], b[:, 2000:])
    ma, sa, mb, sb, rho = m.stats()
    assert np.allclose(ma, a.mean(axis=1)) and np.allclose(sa, a.std(axis=1))
    assert np.allclose(mb[:2], b[:2].mean(axis=1)) and sb[2] == pytest.approx(0, abs=1e-6)
    assert np.allclose(rho[:2], [np.corrcoef(a[i], b[i])[0, 1] for i in range(2)])
    assert rho[2] == 1.0
