"""An in-memory SceneSource for testing the pipeline: real arrays, scripted faults.

Each scene covers a lon/lat box; chips are seeded random DN, so the same
(scene, location) always gives the same bytes.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
from shapely.geometry import box
from shapely.geometry.base import BaseGeometry

from revisit.errors import SceneRejectedError, SourceUnavailableError
from revisit.ingest.sources.base import OnRejected, SceneSource
from revisit.types import Chip, LocationRef, Rejection, SceneRef


@dataclass
class MemoryScene:
    product_id: str
    acquired_at: datetime
    bounds: tuple[float, float, float, float] = (0.0, 40.0, 2.0, 42.0)
    reject_locations: dict[int, str] = field(default_factory=dict)  # location id -> reason
    valid_fraction: float = 1.0
    cloud_fraction: float = 0.0
    raise_on_read: Exception | None = None
    fail_after_chips: int | None = None  # raise RuntimeError after this many chips


class MemorySource(SceneSource):
    name = "memory"

    def __init__(self, scenes: Sequence[MemoryScene], *, search_rejects: Sequence[str] = ()):
        self.scenes = list(scenes)
        self.search_rejects = list(search_rejects)
        self.reads: list[tuple[str, list[int]]] = []

    def search(
        self,
        *,
        since: datetime | None,
        until: datetime,
        area: BaseGeometry,
        on_rejected: OnRejected,
    ) -> Iterator[SceneRef]:
        for ref in self.search_rejects:
            on_rejected(ref, "missing-metadata", f"{ref} has no metadata file")
        for scene in sorted(self.scenes, key=lambda s: s.acquired_at):
            if since is not None and scene.acquired_at < since:
                continue
            if scene.acquired_at > until:
                continue
            footprint = box(*scene.bounds)
            if not footprint.intersects(area):
                continue
            yield SceneRef(
                source=self.name,
                product_id=scene.product_id,
                acquired_at=scene.acquired_at,
                footprint=footprint,
                tile_id="T00MEM",
                cloud_cover=scene.cloud_fraction * 100,
                level="L1C",
                extra={"path": f"/memory/{scene.product_id}#{id(scene)}"},
            )

    def read(self, scene: SceneRef, locations: Sequence[LocationRef]) -> Iterator[Chip | Rejection]:
        spec = next(
            s
            for s in self.scenes
            if s.product_id == scene.product_id and f"#{id(s)}" in str(scene.extra["path"])
        )
        self.reads.append((scene.product_id, [loc.id for loc in locations]))
        if spec.raise_on_read is not None:
            raise spec.raise_on_read
        for n, loc in enumerate(locations):
            if spec.fail_after_chips is not None and n >= spec.fail_after_chips:
                raise RuntimeError("the process died here")
            if loc.id in spec.reject_locations:
                reason = spec.reject_locations[loc.id]
                yield Rejection(loc.id, reason, f"{reason} at location {loc.id}")
                continue
            seed = zlib.crc32(f"{scene.product_id}/{loc.id}".encode())
            data = np.random.default_rng(seed).integers(
                0, 10000, (12, loc.grid.size, loc.grid.size), dtype=np.uint16
            )
            yield Chip(loc.id, data, spec.valid_fraction, spec.cloud_fraction, loc.grid)


__all__ = ["MemoryScene", "MemorySource", "SceneRejectedError", "SourceUnavailableError"]
