"""The static layout of a location: which patch of ground each pixel belongs to.

A location's canvas (its chip plus a margin, so that misregistration and 60 m
band blocks have real ground to draw from) is divided into *segments*: forest
stands, crop fields, buildings, streets, a river, a lake. Each segment has a
kind (``landcover.SEG_*``) and four parameters (crop type, density, roof
material...), which :mod:`phenology` turns into spectra on a given day.

The layout realises the location's class mix: natural cover (forest, bare
ground, glacier) in irregular noise-shaped regions; managed land in rotated
rectangular parcels with staggered boundaries, urban parcels clustered and cut
into blocks and streets; a few straight roads along parcel edges; a meandering
river and a lake shaped by noise. A planted event gives a second layout, with
its region replaced, used from the event day on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from revisit.ingest.simworld import landcover as lc
from revisit.ingest.simworld import texture as tx
from revisit.ingest.simworld.events import CLEARING, CONSTRUCTION, event_region
from revisit.ingest.simworld.seeding import rng_for

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]
Mask = npt.NDArray[np.bool_]

_KEY = 1_000_000  # segment key = kind * _KEY + sub-id
#: Per-pixel brightness variation inside a segment, per kind (tree crowns, roofs).
_GRAIN = np.array(
    [0.015, 0.13, 0.12, 0.03, 0.05, 0.14, 0.05, 0.05, 0.03, 0.12, 0.10, 0.015], dtype=np.float32
)


@dataclass(frozen=True, eq=False)
class Layout:
    """The segments of a location's canvas.

    Attributes:
        canvas: Canvas side in pixels (chip size + 2 * margin).
        margin: Pixels around the chip on each side.
        kinds: Kind of each segment, (n,).
        params: Parameters of each segment, (n, 4).
        seg: Segment index of each canvas pixel, flattened (canvas**2,).
        seg_after: The same after the event (None without one).
        region: Canvas pixels the event changes (None without one).
        changed_fraction: Share of the chip's own pixels in ``region``.
        bright, bright_after: Per-pixel brightness factor before/after the event.
        green_jitter: Per-pixel within-segment greenness anomaly (std ~1), flattened.
        snow_rank: Per-pixel order in which snow covers the ground (0-1), flattened.
    """

    canvas: int
    margin: int
    kinds: npt.NDArray[np.int8]
    params: F32
    seg: I32
    seg_after: I32 | None
    region: Mask | None
    changed_fraction: float
    bright: F32
    bright_after: F32
    green_jitter: F32
    snow_rank: F32


def _quantile_mask(field: F32, share: float, where: Mask | None = None) -> Mask:
    """The ``share`` of pixels (among ``where``) where ``field`` is highest."""
    if share <= 0.0:
        return np.zeros(field.shape, dtype=bool)
    values = field[where] if where is not None else field.ravel()
    if values.size == 0:
        return np.zeros(field.shape, dtype=bool)
    thr = np.quantile(values, max(0.0, 1.0 - share))
    mask: Mask = field >= thr
    return mask if where is None else mask & where


def _natural(rng: np.random.Generator, mix: F32, size: int, keys: I64) -> Mask:
    """Forest, bare ground and glacier in irregular regions; returns the natural mask."""
    share = float(mix[lc.FOREST] + mix[lc.BARE] + mix[lc.SNOW])
    zone = tx.smooth_noise(rng, size, cell=size / 2.0, octaves=3)
    natural = _quantile_mask(zone, share)
    split = tx.smooth_noise(rng, size, cell=size / 2.5, octaves=2)
    stands, _, _ = tx.parcels(rng, *tx.rotated_coords(size, rng.uniform(0, np.pi)), 22.0, 16.0)
    if share > 0:
        glacier = _quantile_mask(split, float(mix[lc.SNOW]) / share, natural)
        rest = natural & ~glacier
        bare = _quantile_mask(split, float(mix[lc.BARE]) / share, rest) if rest.any() else rest
        forest = rest & ~bare
        keys[glacier] = lc.SEG_GLACIER * _KEY
        keys[bare] = lc.SEG_BARE * _KEY + stands[bare]
        keys[forest] = lc.SEG_DECIDUOUS * _KEY + stands[forest]  # kind settled per stand later
    return natural


def _blocks(rng: np.random.Generator, u: F32, v: F32, spacing: float) -> tuple[Mask, I32]:
    """A street grid (1 px streets every ``spacing`` px) and the block id of every pixel."""
    su, sv = spacing * rng.uniform(0.9, 1.4), spacing * rng.uniform(0.8, 1.1)
    pu, pv = rng.uniform(0, su), rng.uniform(0, sv)
    street = (np.mod(u + pu, su) < 1.0) | (np.mod(v + pv, sv) < 1.0)
    block = (np.floor((u + pu) / su) * 1000 + np.floor((v + pv) / sv)).astype(np.int64)
    _, inverse = np.unique(block, return_inverse=True)
    return street, inverse.reshape(u.shape).astype(np.int32)


def _managed(
    rng: np.random.Generator, prof: lc.LocationProfile, mix: F32, size: int, keys: I64, free: Mask
) -> None:
    """Fields, pastures and built-up parcels on the ``free`` pixels; major roads over them."""
    u, v = tx.rotated_coords(size, prof.orientation_rad)
    parcel, cuts_u, cuts_v = tx.parcels(rng, u, v, *prof.field_len_px)
    crop, grass, urban = float(mix[lc.CROPLAND]), float(mix[lc.GRASSLAND]), float(mix[lc.URBAN])
    total = crop + grass + urban
    if free.any() and total > 0:
        n_parcels = int(parcel.max()) + 1
        zurb = tx.smooth_noise(rng, size, cell=size / 1.5, octaves=2)
        area = np.bincount(parcel[free], minlength=n_parcels).astype(np.float64)
        score = np.bincount(parcel[free], weights=zurb[free], minlength=n_parcels)
        score = np.where(area > 0, score / np.maximum(area, 1.0), -np.inf)
        order = np.argsort(-score, kind="stable")
        cum = np.cumsum(area[order]) / max(area.sum(), 1.0)
        is_urban = np.zeros(n_parcels, dtype=bool)
        first = cum - area[order] / max(area.sum(), 1.0)  # share of area before each parcel
        is_urban[order] = (first < urban / total) & (urban > 0)
        is_crop = rng.random(n_parcels) < (crop / max(crop + grass, 1e-9))
        kind = np.where(is_urban, lc.SEG_BUILDING, np.where(is_crop, lc.SEG_CROP, lc.SEG_GRASS))
        pix_kind = kind[parcel]
        keys[free] = pix_kind[free] * _KEY + parcel[free]
        town = free & (pix_kind == lc.SEG_BUILDING)
        if town.any():
            street, block = _blocks(rng, u, v, prof.block_px)
            park = rng.random(int(block.max()) + 1) < 0.12
            keys[town] = lc.SEG_BUILDING * _KEY + block[town]
            parks = town & park[block]
            keys[parks] = lc.SEG_DECIDUOUS * _KEY + 900_000 + block[parks]
            keys[town & street] = lc.SEG_ROAD * _KEY + 1
    n_roads = min(int(rng.poisson(0.4 + 2.5 * (urban + crop))), 3)
    if n_roads:
        inside_u = cuts_u[(cuts_u > u.min()) & (cuts_u < u.max())]
        inside_v = cuts_v[(cuts_v > v.min()) & (cuts_v < v.max())]
        pool = [("u", c) for c in inside_u] + [("v", c) for c in inside_v]
        if pool:
            picks = rng.choice(len(pool), size=min(n_roads, len(pool)), replace=False)
            width = rng.uniform(1.0, 1.6)
            for i in picks:
                axis, at = pool[int(i)]
                road = tx.line_mask(u if axis == "u" else v, np.array([at], np.float32), width)
                keys[road & ~(keys // _KEY == lc.SEG_GLACIER)] = lc.SEG_ROAD * _KEY


def _water(rng: np.random.Generator, share: float, size: int, keys: I64) -> None:
    """A meandering river and/or a noise-shaped lake covering about ``share`` of the canvas."""
    if share <= 0.0:
        return
    left = share
    if rng.random() < 0.65:
        width = float(np.clip(share * size * 0.7, 1.5, 0.3 * size))
        river = tx.meander_distance(rng, size) < width / 2.0
        keys[river] = lc.SEG_WATER * _KEY
        left = share - float(river.mean())
    if left > 0.02:
        lake = _quantile_mask(tx.smooth_noise(rng, size, cell=size / 2.5, octaves=3), left)
        keys[lake] = lc.SEG_WATER * _KEY + 1


def _after_event(
    seed: int, prof: lc.LocationProfile, size: int, margin: int, keys: I64
) -> tuple[I64, Mask]:
    """The keys after the location's event, and the region it changed."""
    event = prof.event
    if event is None:
        raise ValueError("the profile has no event")
    rng = rng_for("region", seed, prof.lon, prof.lat, size)
    kind = keys // _KEY
    water = (kind == lc.SEG_WATER) | (kind == lc.SEG_GLACIER)
    if event.kind == CLEARING:
        candidates = (kind == lc.SEG_DECIDUOUS) | (kind == lc.SEG_EVERGREEN)
    elif event.kind == CONSTRUCTION:
        candidates = (kind == lc.SEG_CROP) | (kind == lc.SEG_GRASS)
    else:
        candidates = ~water
    region = event_region(rng, event, candidates & ~water, margin)
    if event.kind != "flooding":
        region &= ~water
    after = keys.copy()
    if event.kind == CONSTRUCTION:
        u, v = tx.rotated_coords(size, prof.orientation_rad)
        street, block = _blocks(rng, u, v, prof.block_px)
        after[region] = lc.SEG_SITE * _KEY + 1 + block[region]
        after[region & street] = lc.SEG_SITE * _KEY
    elif event.kind == CLEARING:
        stands, _, _ = tx.parcels(rng, *tx.rotated_coords(size, rng.uniform(0, np.pi)), 14.0, 9.0)
        after[region] = lc.SEG_CLEARED * _KEY + stands[region]
    else:
        after[region] = lc.SEG_FLOOD * _KEY
    return after, region


def _params(
    rng: np.random.Generator, prof: lc.LocationProfile, keys: I64
) -> tuple[npt.NDArray[np.int8], F32]:
    """Kinds and parameters of the segments with these sorted unique ``keys``."""
    n = keys.size
    kinds = (keys // _KEY).astype(np.int8)
    sub = keys % _KEY
    p = np.zeros((n, 4), dtype=np.float32)
    r = rng.random((n, 4)).astype(np.float32)
    # Forest stands: evergreen or deciduous (parks are always deciduous).
    forest = (kinds == lc.SEG_DECIDUOUS) & (sub < 900_000)
    kinds[forest & (r[:, 3] < prof.evergreen_share)] = lc.SEG_EVERGREEN
    soil = rng.uniform(0.2, 0.8)
    roof = np.searchsorted(np.array([0.45, 0.70, 0.85]), r[:, 0]).astype(np.float32)
    delay = prof.event.build_delay_days if prof.event is not None else 0
    table: dict[int, F32] = {
        lc.SEG_WATER: np.stack(
            [np.where(sub == 0, 0.25 + 0.45 * r[:, 0], 0.25 * r[:, 0]), 0 * r[:, 1]], axis=1
        ),
        lc.SEG_EVERGREEN: np.stack(
            [0.7 + 0.27 * r[:, 0], np.full(n, float(prof.broadleaf_evergreen))], axis=1
        ),
        lc.SEG_DECIDUOUS: np.stack([0.65 + 0.3 * r[:, 0], 0 * r[:, 1]], axis=1),
        lc.SEG_CROP: np.stack(
            [
                (r[:, 0] < 0.4).astype(np.float32),
                -12.0 + 37.0 * r[:, 1],
                0.8 + 0.2 * r[:, 2],
                np.clip(soil + 0.3 * (r[:, 3] - 0.5), 0, 1),
            ],
            axis=1,
        ),
        lc.SEG_GRASS: np.stack([0.55 + 0.4 * r[:, 0], 0 * r[:, 1]], axis=1),
        lc.SEG_BUILDING: np.stack([roof, 0.25 * r[:, 1]], axis=1),
        lc.SEG_BARE: np.stack([0.3 + 0.7 * r[:, 0], 0.2 * r[:, 1]], axis=1),
        lc.SEG_GLACIER: np.stack([0.2 + 0.5 * r[:, 0], 0 * r[:, 1]], axis=1),
        lc.SEG_SITE: np.stack(
            [np.where(sub == 0, 3.0, roof), 0.12 * r[:, 1], delay + 40.0 * r[:, 2]], axis=1
        ),
        lc.SEG_CLEARED: np.stack([0.2 + 0.3 * r[:, 0], 0 * r[:, 1]], axis=1),
        lc.SEG_FLOOD: np.stack([0.4 + 0.5 * r[:, 0], 0 * r[:, 1]], axis=1),
    }
    for kind, values in table.items():
        m = kinds == kind
        p[m, : values.shape[1]] = values[m]
    return kinds, p


def _grain(rng: np.random.Generator, size: int) -> tuple[F32, F32]:
    """Smooth and white per-pixel brightness noise shared by the before and after layouts."""
    smooth = tx.smooth_noise(rng, size, cell=10.0, octaves=2)
    white = rng.standard_normal((size, size)).astype(np.float32)
    return smooth, white


def build_layout(seed: int, prof: lc.LocationProfile, size: int, margin: int) -> Layout:
    """The segments of a location's canvas of ``size + 2 * margin`` pixels.

    Args:
        seed: The world's seed.
        prof: The location's profile.
        size: Chip side in pixels.
        margin: Extra pixels on each side.

    Raises:
        ValueError: ``size`` < 1 or ``margin`` < 0.
    """
    if size < 1 or margin < 0:
        raise ValueError(f"need size >= 1 and margin >= 0, not {size}, {margin}")
    canvas = size + 2 * margin
    rng = rng_for("layout", seed, prof.lon, prof.lat, size)
    mix = np.asarray(prof.mix, dtype=np.float32)
    keys = np.full((canvas, canvas), lc.SEG_GRASS * _KEY, dtype=np.int64)
    natural = _natural(rng, mix, canvas, keys)
    _managed(rng, prof, mix, canvas, keys, ~natural)
    _water(rng, float(mix[lc.WATER]), canvas, keys)
    after, region = (
        _after_event(seed, prof, canvas, margin, keys) if prof.event is not None else (None, None)
    )
    every = keys.ravel() if after is None else np.concatenate([keys.ravel(), after.ravel()])
    unique, inverse = np.unique(every, return_inverse=True)
    kinds, params = _params(rng, prof, unique)
    seg = inverse[: canvas * canvas].astype(np.int32)
    seg_after = None if after is None else inverse[canvas * canvas :].astype(np.int32)
    smooth, white = _grain(rng, canvas)
    base = 1.0 + 0.035 * smooth.ravel()
    bright = (base + _GRAIN[kinds[seg]] * white.ravel()).clip(0.6, 1.4).astype(np.float32)
    bright_after = bright
    if seg_after is not None:
        bright_after = (base + _GRAIN[kinds[seg_after]] * white.ravel()).clip(0.6, 1.4)
        bright_after = bright_after.astype(np.float32)
    changed = 0.0
    if region is not None:
        changed = float(region[margin : margin + size, margin : margin + size].mean())
    jitter = (tx.smooth_noise(rng, canvas, cell=6.0, octaves=2).ravel() * 0.35).astype(np.float32)
    snow = tx.rank_uniform(tx.smooth_noise(rng, canvas, cell=12.0, octaves=3)).ravel()
    arrays = (params, seg, seg_after, region, bright, bright_after, jitter, snow, kinds)
    for array in arrays:  # shared through the world cache: nobody may write to them
        if array is not None:
            array.flags.writeable = False
    return Layout(
        canvas=canvas,
        margin=margin,
        kinds=kinds,
        params=params,
        seg=seg,
        seg_after=seg_after,
        region=region,
        changed_fraction=changed,
        bright=bright,
        bright_after=bright_after,
        green_jitter=jitter,
        snow_rank=snow,
    )


def classes(layout: Layout, after: bool) -> npt.NDArray[np.int8]:
    """The area class (``landcover.WATER`` ...) of every canvas pixel, (canvas, canvas)."""
    seg = layout.seg_after if after and layout.seg_after is not None else layout.seg
    out: npt.NDArray[np.int8] = lc.SEG_CLASS[layout.kinds[seg]].reshape(
        layout.canvas, layout.canvas
    )
    return out
