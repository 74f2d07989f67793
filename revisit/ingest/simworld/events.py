"""Planted change: which locations change, how, when, and where inside the chip.

About one location in ten gets exactly one event at a known day within roughly
three years of the world's start:

- ``construction``: vegetation becomes a building site (bare soil for a few
  months), then buildings and streets;
- ``clearing``: forest is cut to bare soil and slash, with slow regrowth;
- ``flooding``: land becomes water (a new reservoir or a lasting flood), turbid
  at first and clearing over months.

The event covers a contiguous, irregular part of the chip (15 to 80 %). What
the learner sees is only the pixels; the truth stays here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from typing import Final

import numpy as np
import numpy.typing as npt

from revisit.ingest.simworld.seeding import rng_for
from revisit.ingest.simworld.texture import smooth_noise

CONSTRUCTION: Final = "construction"
CLEARING: Final = "clearing"
FLOODING: Final = "flooding"
KINDS: Final = (CONSTRUCTION, CLEARING, FLOODING)

#: Share of locations that get an event.
EVENT_RATE: Final = 0.10
#: Events fall in [start + FIRST_DAY, start + LAST_DAY].
FIRST_DAY: Final = 45
LAST_DAY: Final = 3 * 365 - 45
_KIND_WEIGHTS: Final = (0.45, 0.35, 0.20)


@dataclass(frozen=True)
class ChangeEvent:
    """One planted change.

    Attributes:
        kind: ``construction``, ``clearing`` or ``flooding``.
        day: The first day the change is visible.
        target_fraction: The share of the chip it is drawn to cover.
        build_delay_days: For construction, how long the site stays bare soil.
    """

    kind: str
    day: date
    target_fraction: float
    build_delay_days: int


def draw_event(seed: int, lon: float, lat: float, start: date) -> ChangeEvent | None:
    """The event of a location, or None for the ~90 % that never change.

    Args:
        seed: The world's seed.
        lon, lat: The location, degrees.
        start: The world's first day; events fall within about three years of it.
    """
    rng = rng_for("event", seed, lon, lat)
    if rng.random() >= EVENT_RATE:
        return None
    kind = KINDS[int(rng.choice(len(KINDS), p=_KIND_WEIGHTS))]
    offset = int(rng.integers(FIRST_DAY, LAST_DAY + 1))
    return ChangeEvent(
        kind=kind,
        day=start + timedelta(days=offset),
        target_fraction=float(rng.uniform(0.15, 0.8)),
        build_delay_days=int(rng.integers(45, 180)),
    )


def event_region(
    rng: np.random.Generator,
    event: ChangeEvent,
    candidates: npt.NDArray[np.bool_],
    margin: int,
) -> npt.NDArray[np.bool_]:
    """A contiguous, irregular blob covering ``event.target_fraction`` of the chip.

    Args:
        rng: The location's layout generator.
        event: The event.
        candidates: (C, C) pixels where the event may start (forest for a
            clearing, vegetation for construction); any pixel if none is.
        margin: Canvas pixels around the chip on each side.

    Returns:
        (C, C) boolean mask over the canvas; its share of the chip's own pixels
        is close to the target.
    """
    size = candidates.shape[0]
    inner = np.zeros_like(candidates)
    inner[margin : size - margin, margin : size - margin] = True
    pool = np.flatnonzero(candidates & inner)
    if pool.size == 0:
        pool = np.flatnonzero(inner)
    centre = int(pool[rng.integers(pool.size)])
    cy, cx = divmod(centre, size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0.0, np.pi)
    elong = rng.uniform(1.0, 2.2)
    du = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    dv = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    dist = np.sqrt((du / elong) ** 2 + dv**2)
    wobble = smooth_noise(rng, size, cell=size / 4.0, octaves=2)
    dist = dist + wobble * (0.25 * size / 2.0)
    inner_dist = dist[inner]
    threshold = np.quantile(inner_dist, event.target_fraction)
    region: npt.NDArray[np.bool_] = dist <= threshold
    return region
