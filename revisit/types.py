"""Frozen value objects that cross layers: sources, the pipeline, the database functions.

Pixels travel as numpy arrays inside :class:`Chip`; geometries as shapely
objects in lon/lat (EPSG:4326) unless a name says otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from shapely.geometry.base import BaseGeometry

from revisit.grid import ChipGrid

#: The 12 bands common to L1C and L2A, in the order every chip stores them (B10 dropped).
CANONICAL_BANDS: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12",
)  # fmt: skip
#: Model input is DN / 10000.
DN_SCALE = 1e-4

Level = Literal["L1C", "L2A"]


@dataclass(frozen=True)
class LocationRef:
    """A location as a source needs it: where it is and on which grid its chip lies."""

    id: int
    lon: float
    lat: float
    grid: ChipGrid


@dataclass(frozen=True)
class SceneRef:
    """One product a source found; enough to store its ``scene`` row and to read it.

    Attributes:
        source: The source's name (``simulated``, ``local``, ``sentinelhub``).
        product_id: Unique within the source (a SAFE name, a Sentinel Hub id, ...).
        acquired_at: Sensing time, timezone-aware UTC.
        footprint: Where the product has data, lon/lat.
        tile_id: MGRS tile (``T31UDQ``) or the source's own tile name.
        cloud_cover: Scene cloud cover in percent, if the source knows it.
        level: ``L1C`` or ``L2A``; None when it does not apply.
        processing_baseline: e.g. ``04.00``; decides the +1000 DN offset of L2A/L1C.
        extra: Whatever the source needs to read it again (a path, a URL); stored
            in ``scene.metadata`` and must be JSON-serialisable.
    """

    source: str
    product_id: str
    acquired_at: datetime
    footprint: BaseGeometry
    tile_id: str | None = None
    cloud_cover: float | None = None
    level: Level | None = None
    processing_baseline: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Chip:
    """The pixels of one location in one scene, on the location's chip grid.

    Attributes:
        location_id: The location.
        data: uint16 DN, shape (12, size, size), canonical band order, any
            processing-baseline offset already removed.
        valid_fraction: Share of pixels with data (not nodata), 0 to 1.
        cloud_fraction: Share of valid pixels that are cloud or cloud shadow, 0 to 1.
        grid: The chip grid the pixels lie on.
    """

    location_id: int
    data: npt.NDArray[np.uint16]
    valid_fraction: float
    cloud_fraction: float
    grid: ChipGrid


@dataclass(frozen=True)
class Rejection:
    """A chip a source could not produce, and why; it goes to ``quarantine``.

    Attributes:
        location_id: The location whose chip was rejected (None: the whole scene).
        reason: A short code from :data:`revisit.ingest.reasons.REASONS`.
        detail: One line for a person: what was wrong, with the ids involved.
    """

    location_id: int | None
    reason: str
    detail: str
