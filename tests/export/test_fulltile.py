"""The generated full-size product pair (bench/fulltile.py) and the pair map's memory on it.

The fast tests generate a small pair and check that the pair-map reader takes
its layout and that it is deterministic. The ``slow`` test generates a whole
10,980 x 10,980 tile pair (1.74 GiB on disk, about 45 s on 2 cores), runs
``revisit changemap pair`` on it as a child process (bench/pairmap.py's
measurement: ``ru_maxrss`` from ``os.wait4``) and holds its peak resident
memory to 2 GiB.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from revisit.export.pairmap import read_canonical
from revisit.types import CANONICAL_BANDS
from tests.conftest import load_bench, make_tempdir

REPO = Path(__file__).resolve().parents[2]
SMALL = 732
GIB = 2**30


fulltile = load_bench("fulltile")
bench_pairmap = load_bench("pairmap")


@pytest.fixture(scope="module")
def small_root() -> Iterator[Path]:
    root = make_tempdir("revisit-fulltile-")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _pixels(root: Path) -> dict[str, np.ndarray]:
    files = sorted(root.rglob("*.tif"))
    out = {}
    for path in files:
        with rasterio.open(path) as ds:
            out[str(path.relative_to(root))] = ds.read(1)
    return out


def test_small_pair_is_read_on_its_grid(small_root: Path) -> None:
    pair = fulltile.generate_pair(small_root / "a", size=SMALL, changes=40)
    assert not pair.reused
    before = read_canonical(pair.before)
    after = read_canonical(pair.after)
    for scene in (before, after):
        assert scene.dn.shape == (len(CANONICAL_BANDS), SMALL, SMALL)
        assert scene.crs.to_epsg() == 32631
        assert scene.transform.a == 10.0 and scene.transform.e == -10.0
        assert (scene.transform.c, scene.transform.f) == fulltile.ORIGIN
        assert scene.valid.all()
        assert 300 < float(np.median(scene.dn)) < 4000
    # Native resolutions: B01 at 60 m, B05 at 20 m, B10 written though the reader skips it.
    stem = fulltile.stem_of(fulltile.DATES[0])
    for band, side in (("B01", SMALL // 6), ("B05", SMALL // 2), ("B10", SMALL // 6)):
        with rasterio.open(pair.before / f"{stem}_{band}.tif") as ds:
            assert (ds.width, ds.height, ds.dtypes[0]) == (side, side, "uint16")
            assert ds.profile["tiled"] and ds.block_shapes[0] == (512, 512)
            assert ds.nodata == 0
    with rasterio.open(pair.mask) as ds:
        mask = ds.read(1)
        assert (ds.width, ds.height) == (SMALL, SMALL)
        assert ds.transform == before.transform
    assert 0 < mask.mean() < 0.5
    # The rectangles change the spectrum far more than the radiometric jitter does.
    diff = np.abs(after.dn[1] - before.dn[1])
    assert np.median(diff[mask == 1]) > 5 * np.median(diff[mask == 0])


def test_small_pair_is_deterministic_and_reused(small_root: Path) -> None:
    first = fulltile.generate_pair(small_root / "b", size=SMALL, changes=40)
    again = fulltile.generate_pair(small_root / "b", size=SMALL, changes=40)
    assert again.reused
    second = fulltile.generate_pair(small_root / "c", size=SMALL, changes=40)
    a, b = _pixels(first.root), _pixels(second.root)
    assert sorted(a) == sorted(b)
    assert len(a) == 2 * len(fulltile.BANDS) + 1
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    other = fulltile.generate_pair(small_root / "b", size=SMALL, changes=40, seed=1)
    assert not other.reused


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_full_tile_pair_map_within_2_gib() -> None:
    root = make_tempdir("revisit-fulltile-")
    try:
        pair = fulltile.generate_pair(root / "pair", size=fulltile.FULL_SIZE)
        model = bench_pairmap.export_random(root)  # + random.dense.onnx beside it
        out = root / "map.tif"
        command = bench_pairmap.pair_command(pair.before, pair.after, out=out, model=model)
        env = dict(os.environ, REVISIT_DATA_DIR=str(root / "var"))
        # Killed well before a whole-scene reader could exhaust a shared machine.
        run = bench_pairmap.run_measured(command, env=env, kill_above_bytes=3 * GIB, echo=False)
        assert not run.killed, f"killed above 3 GiB after {run.wall_s:.0f} s"
        assert run.returncode == 0, run.output[-3000:]
        assert run.peak_rss_bytes <= 2 * GIB, f"peak RSS {run.peak_rss_bytes / GIB:.2f} GiB"
        with rasterio.open(pair.mask) as grid, rasterio.open(out) as ds:
            assert (ds.width, ds.height) == (fulltile.FULL_SIZE, fulltile.FULL_SIZE)
            assert (ds.crs, ds.transform) == (grid.crs, grid.transform)
            assert ds.dtypes[0] == "float32"
            finite = 0
            for row in range(0, ds.height, 1024):
                values = ds.read(1, window=Window(0, row, ds.width, min(1024, ds.height - row)))
                ok = np.isfinite(values)
                assert (values[ok] >= 0).all(), f"negative distances in rows {row}+"
                finite += int(ok.sum())
        # The pair has no no-data and no cloud (its surfaces score under 0.2 for s2cloudless):
        # only a stray false cloud may be masked.
        assert finite >= 0.999 * ds.width * ds.height, f"{finite:,} finite pixels"
    finally:
        shutil.rmtree(root, ignore_errors=True)
