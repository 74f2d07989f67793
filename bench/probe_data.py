"""Labeled chip sets for the linear probes of ``bench/probe.py``, built from real imagery.

Each builder returns a :class:`ProbeSet`: uint16 DN chips in
:data:`~revisit.types.CANONICAL_BANDS` order (single chips, or pairs of two
dates), one class label per chip, and where each chip lies, so that tests can
check the chips do not overlap (cross-validation folds must not share pixels).

- :func:`build_scl`: the real Level-2A SAFE; chips labeled by their Sen2Cor
  scene-classification (SCL) majority class;
- :func:`build_slovenia`: eo-learn's Slovenian patch, 5 dates, labeled by the
  majority of its land-cover map;
- :func:`build_oscd`: chip pairs of the four labeled OSCD cities, changed or not;
- :func:`build_simulated`: chips of revisit's simulated world, by land-cover class.

Products are read with the package's own readers (the local source's SAFE
description, which substitutes B8A for the missing B08 and knows the +1000 DN
offset; :func:`revisit.export.pairmap.read_canonical`). :func:`cached` keeps a
built set under a cache directory, keyed by the builder's parameters.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import rasterio
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from revisit.export.pairmap import read_canonical, reproject_onto
from revisit.fsutil import write_bytes_atomic
from revisit.grid import ChipGrid, chip_grid_for
from revisit.ingest.simworld import landcover, orbit
from revisit.ingest.simworld.render import render_chip, world_for
from revisit.ingest.sources.rasters import (
    chip_window,
    gdal_env,
    georef,
    open_raster,
    read_dn,
    to_dn,
    warp_dn,
)
from revisit.ingest.sources.safe import describe_safe
from revisit.types import CANONICAL_BANDS

__all__ = [
    "CACHE_VERSION",
    "CHANGE_THRESHOLD",
    "CHANGE_THRESHOLD_LOW",
    "OSCD_CITIES",
    "SCL_NAMES",
    "SLOVENIA_LULC_NAMES",
    "ProbeSet",
    "build_oscd",
    "build_scl",
    "build_simulated",
    "build_slovenia",
    "cached",
    "chips_disjoint",
    "majority",
]

logger = logging.getLogger(__name__)

U16 = npt.NDArray[np.uint16]
I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]

#: Bumped whenever a builder's output changes, so old caches are not reused.
CACHE_VERSION = 1
#: A chip pair is "changed" when at least this share of its pixels changed.
CHANGE_THRESHOLD = 0.05
#: The looser threshold reported beside it.
CHANGE_THRESHOLD_LOW = 0.01
OSCD_CITIES = ("aguasclaras", "bercy", "paris", "rennes")
#: Sen2Cor scene classes; 0 (no data) and 1 (saturated or defective) never label a chip.
SCL_NAMES: dict[int, str] = {
    2: "dark area",
    3: "cloud shadow",
    4: "vegetation",
    5: "not vegetated",
    6: "water",
    7: "unclassified",
    8: "cloud medium",
    9: "cloud high",
    10: "thin cirrus",
    11: "snow",
}
#: eo-learn's LULC classes (0 is no data and never labels a chip).
SLOVENIA_LULC_NAMES: dict[int, str] = {
    1: "cultivated land",
    2: "forest",
    3: "grassland",
    4: "shrubland",
    5: "water",
    6: "wetlands",
    7: "tundra",
    8: "artificial surface",
    9: "bareland",
    10: "snow and ice",
}
#: Index of B10 in the 13 bands of an L1C product (B01..B08, B8A, B09, B10, B11, B12).
_B10 = 10
#: Metres per pixel of the chips.
_RES_M = 10.0


@dataclass(frozen=True)
class ProbeSet:
    """A labeled set of chips (or chip pairs) to probe features with.

    Attributes:
        name: Short name, a column of the table.
        chips: uint16 DN, canonical band order: (N, 12, S, S), or (N, 2, 12, S, S)
            for pairs (older date first).
        labels: (N,) class index into ``class_names``.
        class_names: The classes, in label order.
        groups: (N,) place id: chips of one group show the same ground (the same
            location on other dates); different groups never overlap.
        frames: (N,) id of the coordinate frame ``boxes`` are in (a city, a UTM zone).
        boxes: (N, 4) ``minx, miny, maxx, maxy`` of each chip in its frame.
        real: Real imagery (not simulated).
        headline: Whether the set enters the mean over real sets.
        note: What a reader of the table should know about it.
    """

    name: str
    chips: U16
    labels: I64
    class_names: tuple[str, ...]
    groups: I64
    frames: I64
    boxes: F64
    real: bool
    headline: bool
    note: str = ""

    @property
    def paired(self) -> bool:
        """True when each sample is a pair of two dates."""
        return self.chips.ndim == 5

    @property
    def n(self) -> int:
        """Number of samples."""
        return int(self.labels.shape[0])

    def counts(self) -> dict[str, int]:
        """Samples per class name."""
        values = np.bincount(self.labels, minlength=len(self.class_names))
        return {name: int(v) for name, v in zip(self.class_names, values, strict=True)}

    def groups_per_class(self) -> dict[str, int]:
        """Distinct places per class name."""
        return {
            name: len(np.unique(self.groups[self.labels == i]))
            for i, name in enumerate(self.class_names)
        }


# -- helpers -----------------------------------------------------------------------------------


def majority(
    classes: npt.NDArray[np.integer[Any]], size: int, *, ignore: Sequence[int] = ()
) -> tuple[I64, F64]:
    """The majority class of each non-overlapping ``size`` x ``size`` block, and its share.

    Blocks that do not fit at the right and bottom edges are left out. Pixels
    of an ``ignore`` class count in no class but do count in the share's
    denominator, so a block mostly of them has a small share.

    Args:
        classes: (H, W) integer class map (classes 0 to 255).
        size: Block side in pixels.
        ignore: Classes never to be a majority.

    Returns:
        (H // size, W // size) majority class and its share of the block's pixels.

    Raises:
        ValueError: ``classes`` is not 2-d, or ``size`` < 1.
    """
    if classes.ndim != 2 or size < 1:
        raise ValueError(f"need a 2-d class map and size >= 1, got {classes.shape}, {size}")
    rows, cols = classes.shape[0] // size, classes.shape[1] // size
    blocks = np.asarray(classes[: rows * size, : cols * size]).astype(np.int64)
    blocks = blocks.reshape(rows, size, cols, size)
    present = [int(c) for c in np.unique(blocks) if int(c) not in ignore]
    best = np.zeros((rows, cols), dtype=np.int64)
    share = np.zeros((rows, cols), dtype=np.float64)
    for c in present:
        frac = (blocks == c).mean(axis=(1, 3))
        better = frac > share
        best[better] = c
        share[better] = frac[better]
    return best, share


def _contiguous(raw: I64, names: dict[int, str]) -> tuple[I64, tuple[str, ...]]:
    """Raw class codes -> 0..k-1 in code order, and the names of those k classes."""
    codes = sorted(int(c) for c in np.unique(raw))
    lookup = {c: i for i, c in enumerate(codes)}
    labels = np.array([lookup[int(c)] for c in raw], dtype=np.int64)
    return labels, tuple(names.get(c, str(c)) for c in codes)


def _select(
    raw: I64, *, min_class: int, max_per_class: int, rng: np.random.Generator
) -> npt.NDArray[np.intp]:
    """Indices of ``raw`` kept: classes with >= ``min_class`` members, at most
    ``max_per_class`` of each (a random sample), sorted."""
    keep: list[npt.NDArray[np.intp]] = []
    for c in np.unique(raw):
        members = np.flatnonzero(raw == c)
        if members.size < min_class:
            continue
        if members.size > max_per_class:
            members = rng.choice(members, size=max_per_class, replace=False)
        keep.append(members)
    if not keep:
        return np.zeros(0, dtype=np.intp)
    return np.sort(np.concatenate(keep))


def _dn(values: npt.NDArray[np.floating[Any]]) -> U16:
    """Float DN (no NaN) rounded and clipped to uint16."""
    return np.clip(np.rint(values), 0, 65535).astype(np.uint16)


# -- scl: the Level-2A SAFE --------------------------------------------------------------------


def build_scl(
    safe: Path,
    *,
    size: int = 64,
    min_share: float = 0.7,
    min_class: int = 20,
    max_per_class: int = 150,
    seed: int = 0,
) -> ProbeSet:
    """Chips of a Level-2A SAFE labeled by their SCL majority class.

    The tile is cut into non-overlapping ``size`` x ``size`` chips at 10 m from
    its upper-left corner. Each chip is labeled with the majority SCL class of
    the finest SCL the product has (20 m here), over the chip's footprint; a
    chip is kept when that class covers at least ``min_share`` of it, the SCL
    says it has data everywhere, and every band has data. The kept chips are
    read from the bands at their native resolution (60 m in the shared SAFE),
    whole, once, and warped bilinearly onto each chip's 10 m grid, with the
    product's DN offset added (``-1000`` for baseline 04.00), as the local
    source does when it ingests a chip.

    Args:
        safe: The ``*.SAFE`` folder.
        size: Chip side in 10 m pixels.
        min_share: Smallest share of the majority class.
        min_class: Classes with fewer candidate chips are dropped.
        max_per_class: At most this many chips of a class (a random sample).
        seed: Seed of that sample.

    Returns:
        The set ``scl``.

    Raises:
        ValueError: The product has no SCL, a chip is not a whole number of SCL
            pixels, or its bands lie on different grids.
        revisit.errors.SceneRejectedError: The SAFE cannot be described.
    """
    product = describe_safe(safe)
    if product.cloud_mask is None or product.cloud_mask.kind != "scl":
        raise ValueError(f"{product.product_id} has no SCL layer")
    chip_m = size * _RES_M
    with gdal_env(), open_raster(product.cloud_mask.file.path, product.product_id) as ds:
        crs, scl_transform = georef(ds, product)
        scl = ds.read(1)
    scl_res = abs(scl_transform.a)
    per_chip = chip_m / scl_res
    if not per_chip.is_integer():
        raise ValueError(f"a {chip_m:g} m chip is not a whole number of {scl_res:g} m SCL pixels")
    best, share = majority(scl, int(per_chip), ignore=(0, 1))
    has_data = ~(
        (scl[: best.shape[0] * int(per_chip), : best.shape[1] * int(per_chip)] == 0)
        .reshape(best.shape[0], int(per_chip), best.shape[1], int(per_chip))
        .any(axis=(1, 3))
    )
    candidates = np.flatnonzero((share >= min_share) & has_data & np.isin(best, list(SCL_NAMES)))
    raw = best.ravel()[candidates]
    rng = np.random.default_rng(seed)
    chosen = candidates[_select(raw, min_class=min_class, max_per_class=max_per_class, rng=rng)]
    del scl

    # Every band file, whole, at its native resolution (60 m: 1830 x 1830 floats each).
    arrays: dict[Path, npt.NDArray[np.float32]] = {}
    grids: dict[Path, Any] = {}
    with gdal_env():
        for name in CANONICAL_BANDS:
            file = product.bands[name]
            if file.path in arrays:
                continue
            with open_raster(file.path, product.product_id) as band:
                grids[file.path] = (*georef(band, product), band.width, band.height)
                arrays[file.path] = read_dn(band, file.index, Window(0, 0, band.width, band.height))
    first = product.bands[CANONICAL_BANDS[0]].path
    src_crs, src_transform, width, height = grids[first]
    if any(g[1] != src_transform or g[2:] != (width, height) for g in grids.values()):
        raise ValueError(f"{product.product_id}: bands on different grids; read them separately")
    stack = np.stack([arrays[product.bands[name].path] for name in CANONICAL_BANDS])
    del arrays
    offsets = [product.bands[name].offset for name in CANONICAL_BANDS]

    ulx, uly = scl_transform.c, scl_transform.f
    cols = best.shape[1]
    chips: list[U16] = []
    labels: list[int] = []
    boxes: list[tuple[float, float, float, float]] = []
    for index in chosen:
        row, col = divmod(int(index), cols)
        grid = ChipGrid(
            epsg=int(crs.to_epsg()), minx=ulx + col * chip_m, maxy=uly - row * chip_m, size=size
        )
        win = chip_window(width, height, src_transform, grid.bounds)
        if win is None:
            continue
        r0, c0 = int(win.row_off), int(win.col_off)
        src = stack[:, r0 : r0 + int(win.height), c0 : c0 + int(win.width)]
        warped = warp_dn(np.ascontiguousarray(src), src_crs, src_transform, win, grid)
        if np.isnan(warped).any():
            continue
        chips.append(
            np.stack([to_dn(band, off) for band, off in zip(warped, offsets, strict=True)])
        )
        labels.append(int(best.ravel()[index]))
        boxes.append(grid.bounds)
    raw_labels = np.array(labels, dtype=np.int64)
    # Warping can drop a few chips at the data's edge: filter the classes again.
    keep = _select(raw_labels, min_class=min_class, max_per_class=max_per_class, rng=rng)
    raw_labels = raw_labels[keep]
    y, names = _contiguous(raw_labels, SCL_NAMES)
    n = len(keep)
    return ProbeSet(
        name="scl",
        chips=np.stack([chips[i] for i in keep]) if n else np.zeros((0, 12, size, size), np.uint16),
        labels=y,
        class_names=names,
        groups=np.arange(n, dtype=np.int64),
        frames=np.zeros(n, dtype=np.int64),
        boxes=np.array([boxes[i] for i in keep], dtype=np.float64).reshape(n, 4),
        real=True,
        headline=True,
        note=(
            f"{product.product_id[:38]}: 60 m bands upsampled to 10 m, B8A for B08;"
            f" SCL majority >= {min_share:.0%}"
        ),
    )


# -- slovenia: eo-learn's patch ----------------------------------------------------------------


def build_slovenia(root: Path, *, size: int = 32, min_class: int = 5) -> ProbeSet:
    """Chips of eo-learn's Slovenian patch on its 5 reference dates, by land-cover majority.

    ``REFERENCE_SCENES.npy`` (5, 101, 100, 13) top-of-atmosphere reflectance
    loses B10 and becomes DN (x 10000); the patch is cut into non-overlapping
    ``size`` chips (3 x 3 of 32), each labeled by the majority of
    ``TestEOPatch/mask_timeless/LULC.npy`` over its labelled pixels. The same
    place appears on every date: its 5 chips share a group.

    Args:
        root: The ``eolearn_slovenia`` folder.
        size: Chip side in pixels (>= 32 for the model).
        min_class: Classes with fewer chips are dropped.

    Returns:
        The set ``slovenia``.

    Raises:
        FileNotFoundError: A file is missing.
        ValueError: The scenes and the land-cover map differ in size.
    """
    scenes = np.load(root / "REFERENCE_SCENES.npy", allow_pickle=False)
    lulc = np.load(root / "TestEOPatch" / "mask_timeless" / "LULC.npy", allow_pickle=False)[..., 0]
    if scenes.shape[1:3] != lulc.shape or scenes.shape[3] != len(CANONICAL_BANDS) + 1:
        raise ValueError(f"scenes {scenes.shape} do not match the land-cover map {lulc.shape}")
    dn = _dn(np.delete(scenes, _B10, axis=3) * 10_000.0).transpose(0, 3, 1, 2)
    best, _ = majority(lulc, size, ignore=(0,))
    rows, cols = best.shape
    chips, raw, groups, boxes = [], [], [], []
    for t in range(dn.shape[0]):
        for r in range(rows):
            for c in range(cols):
                chips.append(dn[t, :, r * size : (r + 1) * size, c * size : (c + 1) * size])
                raw.append(int(best[r, c]))
                groups.append(r * cols + c)
                boxes.append((c * size, r * size, (c + 1) * size, (r + 1) * size))
    raw_arr = np.array(raw, dtype=np.int64)
    keep = _select(
        raw_arr, min_class=min_class, max_per_class=len(raw_arr), rng=np.random.default_rng(0)
    )
    y, names = _contiguous(raw_arr[keep], SLOVENIA_LULC_NAMES)
    places = len({groups[i] for i in keep})
    return ProbeSet(
        name="slovenia",
        chips=np.stack([chips[i] for i in keep]),
        labels=y,
        class_names=names,
        groups=np.array(groups, dtype=np.int64)[keep],
        frames=np.zeros(len(keep), dtype=np.int64),
        boxes=np.array(boxes, dtype=np.float64)[keep],
        real=True,
        headline=True,
        note=(
            f"{places} places x {dn.shape[0]} dates; chips of a place are the same ground,"
            " so its folds share it"
        ),
    )


# -- oscd: change pairs ------------------------------------------------------------------------


def _read_city(root: Path, city: str) -> tuple[npt.NDArray[np.float32], Any, Any]:
    """Both dates of a city on the older date's 10 m grid, and its change mask."""
    first = read_canonical(root / "images" / city / "imgs_1")
    second = reproject_onto(read_canonical(root / "images" / city / "imgs_2"), first)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(root / "labels" / city / "cm" / f"{city}-cm.tif") as ds:
            changed = ds.read(1) == 2
    if changed.shape != (first.height, first.width):
        raise ValueError(f"{city}: labels {changed.shape} vs image {(first.height, first.width)}")
    pair = np.stack([first.dn, second.dn])
    return pair, changed, first.valid & second.valid


def build_oscd(
    root: Path,
    *,
    thresholds: Sequence[float] = (CHANGE_THRESHOLD, CHANGE_THRESHOLD_LOW),
    size: int = 32,
    cities: Sequence[str] = OSCD_CITIES,
    seed: int = 0,
) -> list[ProbeSet]:
    """Chip pairs of the labeled OSCD cities: changed (share >= threshold) or not.

    Each city's ``imgs_2`` is warped onto the 10 m grid of its ``imgs_1``
    (:func:`~revisit.export.pairmap.read_canonical`, ``reproject_onto``) and
    both are cut into the same non-overlapping ``size`` chips, kept where both
    dates have data everywhere. A pair is changed when at least ``threshold``
    of its pixels are labeled change. Changed pairs are rare (0.3 to 2.6 % of
    the pixels change), so per city every changed pair is kept with as many
    unchanged pairs of the same city, drawn at random: both classes have the
    same cities (a probe cannot tell them apart by the city's look) and a
    majority guess scores 0.5.

    Args:
        root: The ``oscd`` folder.
        thresholds: One set per threshold; the first is the headline one.
        size: Chip side in pixels.
        cities: The cities.
        seed: Seed of the unchanged draws.

    Returns:
        One set per threshold: ``oscd-change`` for :data:`CHANGE_THRESHOLD`,
        ``oscd-change-1%`` and so on for the others.

    Raises:
        revisit.errors.ExportError: A product cannot be read.
        ValueError: A change mask is not on its city's grid.
    """
    per_city = []
    for frame, city in enumerate(cities):
        pair, changed, valid = _read_city(root, city)
        rows, cols = changed.shape[0] // size, changed.shape[1] // size
        blocks = changed[: rows * size, : cols * size].reshape(rows, size, cols, size)
        share = blocks.mean(axis=(1, 3))
        ok = valid[: rows * size, : cols * size].reshape(rows, size, cols, size).all(axis=(1, 3))
        per_city.append((frame, city, pair, share, ok))
    sets = []
    for k, threshold in enumerate(thresholds):
        rng = np.random.default_rng(seed)
        chips, labels, groups, frames, boxes = [], [], [], [], []
        per_class_cities: list[str] = []
        for frame, city, pair, share, ok in per_city:
            cells = np.flatnonzero(ok.ravel())
            positive = cells[share.ravel()[cells] >= threshold]
            negative = cells[share.ravel()[cells] < threshold]
            if positive.size == 0:
                continue
            count = min(positive.size, negative.size)
            negative = np.sort(rng.choice(negative, size=count, replace=False))
            per_class_cities.append(f"{city} {positive.size}")
            for label, members in ((1, positive), (0, negative)):
                for cell in members:
                    r, c = divmod(int(cell), share.shape[1])
                    window = pair[:, :, r * size : (r + 1) * size, c * size : (c + 1) * size]
                    chips.append(_dn(window))
                    labels.append(label)
                    groups.append(frame * 1_000_000 + int(cell))
                    frames.append(frame)
                    boxes.append((c * size, r * size, (c + 1) * size, (r + 1) * size))
        name = "oscd-change" if k == 0 else f"oscd-change-{threshold:.0%}"
        n = len(labels)
        sets.append(
            ProbeSet(
                name=name,
                chips=np.stack(chips) if n else np.zeros((0, 2, 12, size, size), np.uint16),
                labels=np.array(labels, dtype=np.int64),
                class_names=("unchanged", "changed"),
                groups=np.array(groups, dtype=np.int64),
                frames=np.array(frames, dtype=np.int64),
                boxes=np.array(boxes, dtype=np.float64).reshape(n, 4),
                real=True,
                headline=k == 0,
                note=(
                    f"pairs of {size} px, changed if >= {threshold:.0%} of pixels;"
                    f" changed per city: {', '.join(per_class_cities)}; balanced per city"
                ),
            )
        )
    return sets


# -- simulated ---------------------------------------------------------------------------------


def _clear_day(
    world: Any, tile: orbit.Tile, seed: int, first: date, tries: int
) -> tuple[U16, date] | None:
    """The chip of the first cloud-free pass over ``tile`` from ``first`` on, and its day."""
    for acq in orbit.acquisitions(tile, first, first + timedelta(days=5 * tries))[:tries]:
        weather = orbit.scene_weather(seed, tile, acq.day, acq.satellite)
        data, cloud = render_chip(world, acq.day, acq.satellite, weather)
        if cloud == 0.0:
            return data, acq.day
    return None


def build_simulated(
    *,
    seed: int = 0,
    start: date = date(2023, 1, 1),
    size: int = 64,
    min_share: float = 0.7,
    min_class: int = 20,
    max_per_class: int = 100,
    max_locations: int = 4000,
) -> ProbeSet:
    """Chips of revisit's simulated world, labeled by their majority land-cover class.

    Locations are drawn uniformly in longitude and in latitude 56 S to 70 N
    (seeded); each is rendered as the simulated source renders it
    (:func:`~revisit.ingest.simworld.render.world_for`, ``render_chip``) on its
    first cloud-free pass after a random day of the world's first year, and
    labeled by :meth:`LocationWorld.land_cover` of that day when the majority
    class covers at least ``min_share``. No database is involved. Drawing
    stops when every class has ``max_per_class`` chips or after
    ``max_locations`` locations; classes with fewer than ``min_class`` chips
    are dropped.

    Args:
        seed: The world's seed (and the draws').
        start: The world's first day.
        size: Chip side in pixels.
        min_share: Smallest share of the majority class.
        min_class: Smallest class kept.
        max_per_class: At most this many chips of a class.
        max_locations: At most this many locations drawn.

    Returns:
        The set ``simulated``.
    """
    rng = np.random.default_rng([seed, 7])
    counts = np.zeros(landcover.N_CLASSES, dtype=np.int64)
    chips, raw, frames, boxes = [], [], [], []
    taken: list[tuple[int, tuple[float, float, float, float]]] = []
    build_world = world_for.__wrapped__  # uncached: thousands of one-off locations
    for _ in range(max_locations):
        if (counts >= max_per_class).all():
            break
        lon = float(rng.uniform(-180.0, 180.0))
        lat = float(rng.uniform(-56.0, 70.0))
        first = start + timedelta(days=int(rng.integers(0, 365)))
        grid = chip_grid_for(lon, lat, size=size)
        world = build_world(seed, lon, lat, start, grid)
        best, share = majority(world.land_cover(first), size)
        label = int(best[0, 0])
        if share[0, 0] < min_share or counts[label] >= max_per_class:
            continue
        if any(e == grid.epsg and _overlaps(b, grid.bounds) for e, b in taken):
            continue
        found = _clear_day(world, orbit.tile_of(lon, lat, 1.0), seed, first, tries=12)
        if found is None:
            continue
        data, day = found
        best, share = majority(world.land_cover(day), size)
        if share[0, 0] < min_share or int(best[0, 0]) != label:
            continue
        chips.append(data)
        raw.append(label)
        frames.append(grid.epsg)
        boxes.append(grid.bounds)
        taken.append((grid.epsg, grid.bounds))
        counts[label] += 1
    raw_arr = np.array(raw, dtype=np.int64)
    keep = _select(
        raw_arr, min_class=min_class, max_per_class=max_per_class, rng=np.random.default_rng(0)
    )
    y, names = _contiguous(raw_arr[keep], dict(enumerate(landcover.CLASS_NAMES)))
    return ProbeSet(
        name="simulated",
        chips=np.stack([chips[i] for i in keep]),
        labels=y,
        class_names=names,
        groups=np.arange(len(keep), dtype=np.int64),
        frames=np.array(frames, dtype=np.int64)[keep],
        boxes=np.array(boxes, dtype=np.float64)[keep],
        real=False,
        headline=False,
        note=f"world seed {seed}, cloud-free passes, land-cover majority >= {min_share:.0%}",
    )


def _overlaps(a: Sequence[float], b: Sequence[float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


# -- cache -------------------------------------------------------------------------------------


def _key(name: str, params: dict[str, Any]) -> str:
    text = json.dumps({"v": CACHE_VERSION, "name": name, **params}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _save(path: Path, sets: Sequence[ProbeSet]) -> None:
    arrays: dict[str, Any] = {"count": np.array(len(sets))}
    for i, s in enumerate(sets):
        arrays.update(
            {
                f"{i}_name": np.array(s.name),
                f"{i}_chips": s.chips,
                f"{i}_labels": s.labels,
                f"{i}_class_names": np.array(s.class_names, dtype=str),
                f"{i}_groups": s.groups,
                f"{i}_frames": s.frames,
                f"{i}_boxes": s.boxes,
                f"{i}_real": np.array(s.real),
                f"{i}_headline": np.array(s.headline),
                f"{i}_note": np.array(s.note),
            }
        )
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, buffer.getvalue())


def _load(path: Path) -> list[ProbeSet]:
    with np.load(path, allow_pickle=False) as z:
        return [
            ProbeSet(
                name=str(z[f"{i}_name"]),
                chips=z[f"{i}_chips"],
                labels=z[f"{i}_labels"],
                class_names=tuple(str(c) for c in z[f"{i}_class_names"]),
                groups=z[f"{i}_groups"],
                frames=z[f"{i}_frames"],
                boxes=z[f"{i}_boxes"],
                real=bool(z[f"{i}_real"]),
                headline=bool(z[f"{i}_headline"]),
                note=str(z[f"{i}_note"]),
            )
            for i in range(int(z["count"]))
        ]


def cached(
    cache: Path | None,
    name: str,
    build: Callable[..., ProbeSet | list[ProbeSet]],
    **params: Any,
) -> list[ProbeSet]:
    """``build(**params)``, kept under ``cache`` and read back from it next time.

    Args:
        cache: The cache directory (created when needed); None: no caching.
        name: Names the cache file, with a hash of ``params`` and :data:`CACHE_VERSION`.
        build: A builder of this module.
        params: Its keyword arguments (paths are part of the key as text).

    Returns:
        The built sets (a builder of one set gives a list of one).
    """
    path = None if cache is None else cache / f"{name}-{_key(name, params)}.npz"
    if path is not None and path.is_file():
        try:
            return _load(path)
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("probe cache %s unreadable (%s); rebuilding", path, exc)
    built = build(**params)
    sets = built if isinstance(built, list) else [built]
    if path is not None:
        _save(path, sets)
    return sets


def chips_disjoint(boxes: F64, frames: I64, groups: I64) -> bool:
    """True when no two chips of different groups in the same frame overlap."""
    for frame in np.unique(frames):
        idx = np.flatnonzero(frames == frame)
        b, g = boxes[idx], groups[idx]
        overlap = (
            (b[:, None, 0] < b[None, :, 2])
            & (b[None, :, 0] < b[:, None, 2])
            & (b[:, None, 1] < b[None, :, 3])
            & (b[None, :, 1] < b[:, None, 3])
        )
        if (overlap & (g[:, None] != g[None, :])).any():
            return False
    return True
