"""A generated full-size Sentinel-2 product pair, for memory and speed benches of pair maps.

Writes, under ``ROOT``, the OSCD layout that
:class:`revisit.ingest.sources.local.LocalSource` reads (see
:mod:`revisit.ingest.sources.geotiff`)::

    ROOT/
      dates.txt                 date_1: 20240601 / date_2: 20240701
      imgs_1/T31UDQ_20240601T105031_B01.tif ... _B12.tif, _B8A.tif   (BEFORE)
      imgs_2/T31UDQ_20240701T105031_B01.tif ...                      (AFTER)
      change_mask.tif           uint8 at 10 m: 1 where AFTER was changed
      fulltile.json             the parameters; a pair with the same ones is reused

Each band is one single-band uint16 GeoTIFF (nodata 0) at its native
resolution -- 10 m (B02 B03 B04 B08), 20 m (B05 B06 B07 B8A B11 B12), 60 m
(B01 B09 B10) -- on a UTM 31N grid (EPSG:32631) whose upper-left corner is
that of tile T31UDQ and whose extent is ``size * 10`` m (109,800 m, 10,980
pixels at 10 m, by default), tiled 512 x 512 and compressed (ZSTD level 1,
horizontal predictor; DEFLATE level 1 where GDAL lacks ZSTD).

Content. Four surfaces (vegetation, bare soil, built-up, water) with
plausible top-of-atmosphere spectra (DN 500 to 4,000, B10 about 20) are mixed
by softmax abundances of a smooth random field (bilinear from 600 m cells)
plus a parcel field (constant over 120 m cells, which align with every band's
grid); a smooth brightness field, a per-pixel texture common to both dates,
and sensor noise per date are added. AFTER is BEFORE with radiometric jitter
(a gain of 1 +- 3 % and an offset of +- 30 DN per band, a +- 1.5 % smooth
haze) and ``changes`` rectangles (5 to 50 pixels a side at 10 m, anywhere in
the tile) painted with another surface (concrete, asphalt, bare soil, water); a
20 m or 60 m pixel that a rectangle covers in part takes the covered fraction
of the new surface. ``change_mask.tif`` marks the rectangles at 10 m.

Everything is computed strip by strip (512 rows of each grid, every band of a
grid and both dates at once), the random numbers of a strip seeded by (seed,
grid, strip), so the pair is deterministic and the generator's memory is
bounded (0.55 GiB peak at 10,980 pixels) whatever the size.

Disk: at 10,980 pixels, 13 bands x 2 dates (10 m bands 241 MB each
uncompressed, 20 m 60 MB, 60 m 6.7 MB: 1.35 GB a date) compress to 1.74 GiB
for the pair (0.87 GiB a date; the mask 40 kB); generation takes about 45 s
on 2 cores (the size is printed with the time).

    .venv/bin/python bench/fulltile.py [--out DIR] [--size 10980] [--seed 0]
        [--changes 200] [--threads 2] [--force]
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ first on the path would make ``import onnx`` (anywhere below) find bench/onnx.py.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402
import rasterio  # noqa: E402
from affine import Affine  # noqa: E402
from rasterio.windows import Window  # noqa: E402

#: Bump when the content or layout changes: an older pair on disk is then regenerated.
FORMAT_VERSION = 2
FULL_SIZE = 10980
PIXEL_M = 10.0
CRS = "EPSG:32631"
#: Upper-left corner of Sentinel-2 tile T31UDQ (UTM 31N).
ORIGIN = (399960.0, 5500020.0)
TILE_ID = "T31UDQ"
DATES = ("20240601", "20240701")
SENSING_TIME = "105031"
BLOCK = 512
#: Rows of a grid computed and written at once (a whole row of tiles).
STRIP_ROWS = BLOCK
STAMP = "fulltile.json"
MASK = "change_mask.tif"

#: Every band file written, in file-name order, with its resolution in metres.
BANDS: tuple[tuple[str, int], ...] = (
    ("B01", 60),
    ("B02", 10),
    ("B03", 10),
    ("B04", 10),
    ("B05", 20),
    ("B06", 20),
    ("B07", 20),
    ("B08", 10),
    ("B09", 60),
    ("B10", 60),
    ("B11", 20),
    ("B12", 20),
    ("B8A", 20),
)
RESOLUTIONS = (10, 20, 60)

# Top-of-atmosphere DN (reflectance x 1e4) of each band of BANDS, by surface.
_SURFACES = np.array(
    [
        # B01   B02   B03   B04   B05   B06   B07   B08   B09  B10   B11   B12   B8A
        [1300, 1000, 900, 700, 1200, 2400, 2900, 3100, 1000, 20, 1900, 1000, 3300],  # vegetation
        [1500, 1400, 1600, 1900, 2200, 2400, 2600, 2700, 900, 25, 3300, 2700, 2900],  # soil
        [1700, 1600, 1600, 1700, 1800, 1900, 2000, 2100, 800, 30, 2200, 2000, 2150],  # built-up
        [1400, 1100, 900, 600, 550, 520, 510, 500, 500, 15, 500, 500, 500],  # water
    ],
    dtype=np.float32,
)
#: Abundance bias of each surface (water is rarer).
_SURFACE_BIAS = np.array([0.5, 0.0, -0.3, -1.5], dtype=np.float32)
# What a changed rectangle becomes. None looks like cloud to s2cloudless (probability
# under 0.07; a brighter roof, flat at 3,000 to 3,800, scores 0.84 and is masked as cloud).
_NEW_SURFACES = np.array(
    [
        [1900, 2000, 2100, 2200, 2300, 2350, 2400, 2450, 900, 20, 2600, 2400, 2500],  # concrete
        [900, 800, 800, 850, 900, 950, 1000, 1050, 600, 20, 1200, 1100, 1080],  # asphalt
        [1500, 1400, 1600, 1900, 2200, 2400, 2600, 2700, 900, 25, 3300, 2700, 2900],  # soil
        [1400, 1100, 900, 600, 550, 520, 510, 500, 500, 15, 500, 500, 500],  # water
    ],
    dtype=np.float32,
)
#: Sensor noise (DN, one standard deviation) of each band of BANDS.
_NOISE = np.array([20, 15, 15, 15, 18, 18, 18, 15, 20, 2, 20, 20, 18], dtype=np.float32)
#: Relative texture (common to both dates) and brightness amplitudes.
_TEXTURE = 0.03
_BRIGHTNESS = 0.08
_HAZE = 0.015
_SMOOTH_CELL_M = 600.0
_PARCEL_CELL_M = 120.0


@dataclass(frozen=True)
class Params:
    """What determines a generated pair (the stamp's content)."""

    size: int = FULL_SIZE
    seed: int = 0
    changes: int = 200
    compress: str = "zstd"
    version: int = FORMAT_VERSION


@dataclass(frozen=True)
class FullTilePair:
    """A generated pair on disk.

    Attributes:
        root: The folder holding everything.
        before: The BEFORE band folder (``imgs_1``).
        after: The AFTER band folder (``imgs_2``).
        mask: The uint8 change mask on BEFORE's 10 m grid.
        params: What it was generated with.
        reused: True if an existing pair was found and kept.
        seconds: Time taken to generate (0 if reused... the stamp's figure then).
        disk_bytes: Bytes of every file under ``root``.
    """

    root: Path
    before: Path
    after: Path
    mask: Path
    params: Params
    reused: bool
    seconds: float
    disk_bytes: int


def band_names(stem: str) -> list[str]:
    """The band file names of one date, ``<stem>_B01.tif`` ... (B10 and B8A included)."""
    return [f"{stem}_{band}.tif" for band, _ in BANDS]


def stem_of(date: str) -> str:
    """The file-name stem of a date: an L1C-like ``T31UDQ_<date>T105031``."""
    return f"{TILE_ID}_{date}T{SENSING_TIME}"


def grid_size(size: int, resolution: int) -> int:
    """Pixels a side of the ``resolution`` m grid of a ``size``-pixel (10 m) tile."""
    return size * 10 // resolution


def disk_usage(root: Path) -> int:
    """Bytes of the files under ``root``."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _compression() -> str:
    """``zstd`` where this GDAL writes it, else ``deflate``."""
    from rasterio.enums import Compression

    return "zstd" if "zstd" in {c.name for c in Compression} else "deflate"


def _creation_options(compress: str, threads: int) -> dict[str, Any]:
    options: dict[str, Any] = {
        "driver": "GTiff",
        "tiled": True,
        "blockxsize": BLOCK,
        "blockysize": BLOCK,
        "compress": compress,
        "predictor": 2,
        "num_threads": str(max(1, threads)),
        "bigtiff": "if_safer",
    }
    options["zstd_level" if compress == "zstd" else "zlevel"] = 1
    return options


# -- the scene --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _World:
    """The random fields and rectangles a pair is drawn from (small: KB to a few MB)."""

    smooth: npt.NDArray[np.float32]  # (surfaces + 2, cells, cells): abundances, brightness, haze
    parcels: npt.NDArray[np.float32]  # (surfaces, cells, cells)
    rectangles: npt.NDArray[np.int64]  # (n, 4): row0, row1, col0, col1 at 10 m, half-open
    new_surface: npt.NDArray[np.float32]  # (n, bands): each rectangle's spectrum in AFTER
    gain: npt.NDArray[np.float32]  # (bands,)
    offset: npt.NDArray[np.float32]  # (bands,)


def _world(params: Params) -> _World:
    rng = np.random.default_rng([params.seed, 0])
    extent = params.size * PIXEL_M
    n_smooth = int(np.ceil(extent / _SMOOTH_CELL_M)) + 2
    n_parcel = int(np.ceil(extent / _PARCEL_CELL_M)) + 1
    surfaces = len(_SURFACES)
    smooth = rng.standard_normal((surfaces + 2, n_smooth, n_smooth), dtype=np.float32)
    parcels = rng.standard_normal((surfaces, n_parcel, n_parcel), dtype=np.float32)
    n = params.changes
    sides = rng.integers(5, 51, size=(n, 2))
    sides = np.minimum(sides, params.size)
    row0 = rng.integers(0, params.size - sides[:, 0] + 1)
    col0 = rng.integers(0, params.size - sides[:, 1] + 1)
    rectangles = np.stack([row0, row0 + sides[:, 0], col0, col0 + sides[:, 1]], axis=1)
    kinds = rng.integers(0, len(_NEW_SURFACES), size=n)
    scale = rng.uniform(0.9, 1.1, size=(n, 1)).astype(np.float32)
    new_surface = _NEW_SURFACES[kinds] * scale
    gain = (1.0 + rng.uniform(-0.03, 0.03, size=len(BANDS))).astype(np.float32)
    offset = rng.uniform(-30, 30, size=len(BANDS)).astype(np.float32)
    return _World(smooth, parcels, rectangles.astype(np.int64), new_surface, gain, offset)


def _bilinear(
    field: npt.NDArray[np.float32], rows: npt.NDArray[np.floating], cols: npt.NDArray[np.floating]
) -> npt.NDArray[np.float32]:
    """``field`` (k, n, n) at fractional cell coordinates ``rows`` x ``cols`` -> (k, r, c).

    ``cols`` must be increasing: the columns are interpolated cell by cell, with
    broadcasting (a fancy-index gather of the whole strip is several times slower).
    """
    r0 = np.floor(rows).astype(np.int64)
    fr = (rows - r0).astype(np.float32)[None, :, None]
    by_row = field[:, r0] * (1 - fr) + field[:, r0 + 1] * fr  # (k, r, n)
    c0 = np.floor(cols).astype(np.int64)
    fc = (cols - c0).astype(np.float32)
    out = np.empty((field.shape[0], len(rows), len(cols)), dtype=np.float32)
    bounds = np.flatnonzero(np.diff(c0)) + 1
    for start, stop in zip(
        np.concatenate([[0], bounds]), np.concatenate([bounds, [len(cols)]]), strict=True
    ):
        cell = c0[start]
        left = by_row[:, :, cell : cell + 1]
        step = by_row[:, :, cell + 1 : cell + 2] - left
        np.multiply(step, fc[start:stop], out=out[:, :, start:stop])
        out[:, :, start:stop] += left
    return out


def _nearest_cells(
    field: npt.NDArray[np.float32], rows: npt.NDArray[np.int64], cols: npt.NDArray[np.int64]
) -> npt.NDArray[np.float32]:
    """``field`` (k, n, n) at cell indices ``rows`` x ``cols`` (``cols`` sorted) -> (k, r, c)."""
    picked = field[:, rows, cols[0] : cols[-1] + 1]
    counts = np.bincount(cols - cols[0], minlength=picked.shape[2])
    out: npt.NDArray[np.float32] = np.repeat(picked, counts, axis=2)
    return out


def _coverage(
    start: int, stop: int, factor: int, lo: npt.NDArray[np.int64], hi: npt.NDArray[np.int64]
) -> npt.NDArray[np.float32]:
    """Fraction of each coarse pixel ``start..stop`` (``factor`` 10 m pixels a side) that
    ``[lo, hi)`` (10 m pixels) covers, one row per interval: (n, stop - start)."""
    edges = np.arange(start, stop + 1, dtype=np.int64) * factor
    overlap = np.minimum(hi[:, None], edges[None, 1:]) - np.maximum(lo[:, None], edges[None, :-1])
    out: npt.NDArray[np.float32] = (np.clip(overlap, 0, None) / factor).astype(np.float32)
    return out


def _strip(
    world: _World, params: Params, resolution: int, strip: int, bands: Sequence[int]
) -> tuple[npt.NDArray[np.uint16], npt.NDArray[np.uint16], npt.NDArray[np.uint8] | None]:
    """One strip of the ``resolution`` m grid: (bands, rows, width) uint16 BEFORE and AFTER,
    and (rows, width) uint8 change mask at 10 m."""
    width = grid_size(params.size, resolution)
    row_start = strip * STRIP_ROWS
    row_stop = min(row_start + STRIP_ROWS, width)
    rows = row_stop - row_start
    rng = np.random.default_rng([params.seed, 1, resolution, strip])
    centre_r = (np.arange(row_start, row_stop) + 0.5) * resolution
    centre_c = (np.arange(width) + 0.5) * resolution

    smooth = _bilinear(world.smooth, centre_r / _SMOOTH_CELL_M, centre_c / _SMOOTH_CELL_M)
    p_r = (centre_r // _PARCEL_CELL_M).astype(np.int64)
    p_c = (centre_c // _PARCEL_CELL_M).astype(np.int64)
    surfaces = len(_SURFACES)
    # Softmax abundances, surface by surface (reductions along the first axis are slow).
    abundance = smooth[:surfaces]  # (surfaces, rows, width), overwritten in place
    abundance *= np.float32(1.6)
    parcels = _nearest_cells(world.parcels, p_r, p_c)
    for k in range(surfaces):
        parcels[k] *= np.float32(1.2)
        parcels[k] += _SURFACE_BIAS[k]
    abundance += parcels
    top = np.maximum.reduce(list(abundance))
    total = np.zeros((rows, width), dtype=np.float32)
    for k in range(surfaces):
        abundance[k] -= top
        np.exp(abundance[k], out=abundance[k])
        total += abundance[k]
    abundance /= total
    del top, total, parcels
    noise = np.empty((rows, width), dtype=np.float32)
    shade = 1.0 + _BRIGHTNESS * smooth[surfaces]
    rng.standard_normal(dtype=np.float32, out=noise)
    noise *= np.float32(_TEXTURE)
    shade += noise
    haze = 1.0 + _HAZE * smooth[surfaces + 1]

    # The rectangles that reach this strip, and the part of each coarse pixel they cover.
    factor = resolution // 10
    rect = world.rectangles
    hit = np.flatnonzero((rect[:, 0] < row_stop * factor) & (rect[:, 1] > row_start * factor))
    cover_r = _coverage(row_start, row_stop, factor, rect[hit, 0], rect[hit, 1])
    cover_c = _coverage(0, width, factor, rect[hit, 2], rect[hit, 3])

    mask = None
    if resolution == 10:
        mask = np.zeros((rows, width), dtype=np.uint8)
        for i in range(len(hit)):
            mask[np.ix_(cover_r[i] > 0, cover_c[i] > 0)] = 1

    before = np.empty((len(bands), rows, width), dtype=np.uint16)
    after = np.empty((len(bands), rows, width), dtype=np.uint16)
    for out_i, band in enumerate(bands):
        # A sum of products in place: tensordot would copy the abundances.
        clean = abundance[0] * _SURFACES[0, band]
        for k in range(1, surfaces):
            clean += abundance[k] * _SURFACES[k, band]
        clean *= shade
        changed = clean.copy()
        for i, rect_i in enumerate(hit):
            rs = np.flatnonzero(cover_r[i])
            cs = np.flatnonzero(cover_c[i])
            frac = cover_r[i, rs][:, None] * cover_c[i, cs][None, :]
            block = changed[rs[0] : rs[-1] + 1, cs[0] : cs[-1] + 1]
            new = world.new_surface[rect_i, band] * shade[rs[0] : rs[-1] + 1, cs[0] : cs[-1] + 1]
            block += frac * (new - block)
        changed *= haze * world.gain[band]
        changed += world.offset[band]
        for values, out in ((clean, before), (changed, after)):
            rng.standard_normal(dtype=np.float32, out=noise)
            noise *= _NOISE[band]
            values += noise
            np.clip(values, 1, 65535, out=values)
            np.rint(values, out=values)
            out[out_i] = values
    return before, after, mask


# -- writing ----------------------------------------------------------------------------------


def _read_stamp(root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((root / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _complete(root: Path) -> bool:
    files = [root / MASK, root / "dates.txt"]
    for n, date in enumerate(DATES, 1):
        files += [root / f"imgs_{n}" / name for name in band_names(stem_of(date))]
    return all(f.is_file() for f in files)


def _open_outputs(
    root: Path, resolution: int, params: Params, threads: int
) -> Iterator[tuple[int, Any, Any]]:
    """(band index, BEFORE dataset, AFTER dataset) of each band of one grid, opened for writing
    under a temporary name (``.part``; renamed when complete)."""
    side = grid_size(params.size, resolution)
    transform = Affine(resolution, 0.0, ORIGIN[0], 0.0, -resolution, ORIGIN[1])
    options = _creation_options(params.compress, threads)
    for index, (band, res) in enumerate(BANDS):
        if res != resolution:
            continue
        opened = []
        for n, date in enumerate(DATES, 1):
            path = root / f"imgs_{n}" / f"{stem_of(date)}_{band}.tif.part"
            ds = rasterio.open(
                path,
                "w",
                width=side,
                height=side,
                count=1,
                dtype="uint16",
                crs=CRS,
                transform=transform,
                nodata=0,
                **options,
            )
            ds.set_band_description(1, band)
            ds.update_tags(ACQUISITIONDATE=f"{date[:4]}-{date[4:6]}-{date[6:]}T10:50:31Z")
            opened.append(ds)
        yield index, opened[0], opened[1]


def _publish(path: Path) -> None:
    """``X.tif.part`` -> ``X.tif``."""
    os.replace(path, path.with_suffix(""))


def generate_pair(
    root: Path,
    *,
    size: int = FULL_SIZE,
    seed: int = 0,
    changes: int = 200,
    threads: int = 2,
    force: bool = False,
    progress: bool = False,
) -> FullTilePair:
    """Generate (or reuse) a product pair under ``root``; see the module docstring.

    Args:
        root: The folder to write; created if missing. An existing pair with
            the same parameters (its ``fulltile.json``) is kept.
        size: Pixels a side at 10 m (10,980 for a whole tile); a multiple of 6
            so the 20 m and 60 m grids cover the same extent.
        seed: Seed of everything random.
        changes: Changed rectangles in AFTER.
        threads: Compression threads per file (GDAL ``NUM_THREADS``).
        force: Regenerate even if a matching pair exists.
        progress: Print a line per grid.

    Returns:
        Where the pair is, and what it cost.

    Raises:
        ValueError: ``size`` is not a positive multiple of 6 or ``changes`` is negative.
    """
    if size < 6 or size % 6:
        raise ValueError(f"size must be a positive multiple of 6, got {size}")
    if changes < 0:
        raise ValueError(f"changes must be at least 0, got {changes}")
    params = Params(size=size, seed=seed, changes=changes, compress=_compression())
    root = Path(root).expanduser().absolute()
    before, after, mask_path = root / "imgs_1", root / "imgs_2", root / MASK
    stamp = _read_stamp(root)
    if not force and stamp and stamp.get("params") == asdict(params) and _complete(root):
        return FullTilePair(
            root,
            before,
            after,
            mask_path,
            params,
            reused=True,
            seconds=float(stamp.get("seconds", 0.0)),
            disk_bytes=disk_usage(root),
        )
    started = time.perf_counter()
    (root / STAMP).unlink(missing_ok=True)
    for folder in (before, after):
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    mask_path.unlink(missing_ok=True)
    world = _world(params)
    # A small block cache: strips are written whole, so GDAL needs no more than a strip.
    with rasterio.Env(GDAL_CACHEMAX=256):
        for resolution in RESOLUTIONS:
            t0 = time.perf_counter()
            outputs = list(_open_outputs(root, resolution, params, threads))
            bands = [index for index, _, _ in outputs]
            side = grid_size(size, resolution)
            mask_ds = None
            if resolution == 10:
                mask_ds = rasterio.open(
                    root / (MASK + ".part"),
                    "w",
                    width=side,
                    height=side,
                    count=1,
                    dtype="uint8",
                    crs=CRS,
                    transform=Affine(10.0, 0.0, ORIGIN[0], 0.0, -10.0, ORIGIN[1]),
                    **_creation_options(params.compress, threads),
                )
                mask_ds.set_band_description(1, "change")
            try:
                for strip in range(-(-side // STRIP_ROWS)):
                    b, a, m = _strip(world, params, resolution, strip, bands)
                    window = Window(0, strip * STRIP_ROWS, side, b.shape[1])
                    for i, (_, ds_before, ds_after) in enumerate(outputs):
                        ds_before.write(b[i], 1, window=window)
                        ds_after.write(a[i], 1, window=window)
                    if mask_ds is not None and m is not None:
                        mask_ds.write(m, 1, window=window)
            finally:
                for _, ds_before, ds_after in outputs:
                    ds_before.close()
                    ds_after.close()
                if mask_ds is not None:
                    mask_ds.close()
            for _, ds_before, ds_after in outputs:
                _publish(Path(ds_before.name))
                _publish(Path(ds_after.name))
            if mask_ds is not None:
                _publish(root / (MASK + ".part"))
            if progress:
                print(
                    f"fulltile: {len(bands)} bands at {resolution} m ({side} px) x 2 dates"
                    f" in {time.perf_counter() - t0:.1f} s",
                    flush=True,
                )
    (root / "dates.txt").write_text(
        "".join(f"date_{n}: {date}\n" for n, date in enumerate(DATES, 1)), encoding="utf-8"
    )
    seconds = time.perf_counter() - started
    stamp_tmp = root / (STAMP + ".part")
    stamp_tmp.write_text(
        json.dumps({"params": asdict(params), "seconds": round(seconds, 1)}, indent=2) + "\n",
        encoding="utf-8",
    )
    os.replace(stamp_tmp, root / STAMP)
    return FullTilePair(
        root,
        before,
        after,
        mask_path,
        params,
        reused=False,
        seconds=seconds,
        disk_bytes=disk_usage(root),
    )


def default_root(size: int) -> Path:
    """Where the benches keep a pair of ``size`` by default: ``/var/tmp/revisit-fulltile-SIZE``."""
    return Path("/var/tmp") / f"revisit-fulltile-{size}"


def describe(pair: FullTilePair) -> str:
    """A few lines: where, how big, how long, how much disk."""
    size = pair.params.size
    km2 = size * size * PIXEL_M * PIXEL_M / 1e6
    how = "reused" if pair.reused else "generated"
    return (
        f"fulltile: {how} {pair.root}\n"
        f"  BEFORE {pair.before}\n  AFTER  {pair.after}\n  mask   {pair.mask}\n"
        f"  {size} x {size} px at 10 m ({km2:,.0f} km²), {len(BANDS)} bands x 2 dates,"
        f" {pair.params.changes} changed rectangles, seed {pair.params.seed},"
        f" {pair.params.compress}\n"
        f"  generation {pair.seconds:.1f} s, disk {pair.disk_bytes / 2**30:.2f} GiB"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder (default /var/tmp/revisit-fulltile-SIZE)")
    parser.add_argument("--size", type=int, default=FULL_SIZE, help="pixels a side at 10 m")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--changes", type=int, default=200, help="changed rectangles")
    parser.add_argument("--threads", type=int, default=2, help="compression threads per file")
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = parser.parse_args(argv)
    try:
        pair = generate_pair(
            args.out or default_root(args.size),
            size=args.size,
            seed=args.seed,
            changes=args.changes,
            threads=args.threads,
            force=args.force,
            progress=True,
        )
    except ValueError as exc:
        raise SystemExit(f"fulltile: {exc}") from None
    print(describe(pair))
    if not pair.reused:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        print(f"  generator peak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    main()
