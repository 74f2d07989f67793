"""``simulated``: the default source, a deterministic synthetic Sentinel-2 world.

No credentials, no network, no state: scenes are tiles of a global grid seen
by Sentinel-2A and -2B on their real 10-day cycles (5 days apart), and every
chip is a pure function of (seed, location, day, satellite) rendered by
:mod:`revisit.ingest.simworld`: land cover, phenology, sun and terrain, haze,
clouds and shadows, misregistration, native band resolutions and noise. About
one location in ten has a planted change event; :meth:`SimulatedSource.ground_truth`
says which, when and how much, for scoring change detection.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any

from shapely.geometry import MultiPoint, Point
from shapely.geometry.base import BaseGeometry
from shapely.prepared import prep

from revisit.errors import SceneRejectedError
from revisit.ingest import reasons
from revisit.ingest.simworld import orbit
from revisit.ingest.simworld.render import render_chip, world_for
from revisit.ingest.sources.base import OnRejected, SceneSource
from revisit.types import Chip, LocationRef, Rejection, SceneRef

if TYPE_CHECKING:
    from revisit.config import Settings


@dataclass(frozen=True)
class SimTruth:
    """What really happened at a location; the learner never sees it.

    Attributes:
        location_id: The location.
        kind: ``construction``, ``clearing`` or ``flooding``; None if it never changes.
        event_date: The first day the change shows; None if it never changes.
        changed_fraction: Share of the chip's pixels the event changed (0 without one).
    """

    location_id: int
    kind: str | None
    event_date: date | None
    changed_fraction: float


class SimulatedSource(SceneSource):
    """A synthetic Sentinel-2 L1C archive that any location on Earth can be read from."""

    name = "simulated"

    def __init__(
        self, *, seed: int = 0, start: date = date(2023, 1, 1), tile_size_deg: float = 1.0
    ) -> None:
        """Create the world.

        Args:
            seed: The world; the same seed gives the same bytes.
            start: The first day with acquisitions; events fall within ~3 years of it.
            tile_size_deg: Side of a scene tile in degrees (0 < s <= 10).

        Raises:
            ValueError: A negative seed or a tile size out of range.
        """
        if seed < 0:
            raise ValueError(f"seed must be >= 0, not {seed}")
        if not 0.0 < tile_size_deg <= 10.0:
            raise ValueError(f"tile_size_deg must be in (0, 10], not {tile_size_deg}")
        self.seed = int(seed)
        self.start = start
        self.tile_size_deg = float(tile_size_deg)

    @classmethod
    def from_settings(cls, settings: Settings) -> SimulatedSource:
        """The source configured by ``settings.simulated``."""
        sim = settings.simulated
        return cls(seed=sim.seed, start=sim.start, tile_size_deg=sim.tile_size_deg)

    def search(
        self,
        *,
        since: datetime | None,
        until: datetime,
        area: BaseGeometry,
        on_rejected: OnRejected,
    ) -> Iterator[SceneRef]:
        """Passes over the tiles that intersect ``area`` in [max(since, start), until].

        Args:
            since: Earliest acquisition time (inclusive, timezone-aware); None: ``start``.
            until: Latest acquisition time (inclusive, timezone-aware).
            area: Lon/lat geometry: an AOI polygon or the locations' points.
            on_rejected: Unused: every simulated product is well formed.

        Yields:
            Scene references in ascending ``acquired_at`` (ties by product id).

        Raises:
            ValueError: ``since`` or ``until`` is a naive datetime.
        """
        for moment in (since, until):
            if moment is not None and moment.utcoffset() is None:
                raise ValueError(f"datetimes must be timezone-aware, not {moment!r}")
        first = datetime.combine(self.start, time(0), tzinfo=UTC)
        lo = first if since is None else max(since, first)
        if lo > until or area.is_empty:
            return
        streams = [self._scenes(tile, lo, until) for tile in self.tiles(area)]
        yield from heapq.merge(*streams, key=lambda s: (s.acquired_at, s.product_id))

    def tiles(self, area: BaseGeometry) -> list[orbit.Tile]:
        """The tiles that intersect ``area`` (for points: the tile holding each point)."""
        size = self.tile_size_deg
        if isinstance(area, Point | MultiPoint):
            points = [area] if isinstance(area, Point) else list(area.geoms)
            found = {orbit.tile_of(p.x, p.y, size) for p in points}
            return sorted(found, key=lambda t: (t.iy, t.ix))
        minx, miny, maxx, maxy = area.bounds
        x0, x1 = orbit.tile_of(max(minx, -180.0), 0, size).ix, orbit.tile_of(maxx, 0, size).ix
        y0, y1 = orbit.tile_of(0, max(miny, -90.0), size).iy, orbit.tile_of(0, maxy, size).iy
        prepared = prep(area)
        out = []
        for iy in range(y0, y1 + 1):
            for ix in range(x0, x1 + 1):
                tile = orbit.Tile(ix, iy, size)
                poly = tile.polygon()
                # Interiors must meet: a tile that only shares an edge with the
                # area (a neighbour of an AOI that ends on a tile line) holds none of it.
                if poly.area > 0 and prepared.intersects(poly) and not poly.touches(area):
                    out.append(tile)
        return out

    def _scenes(self, tile: orbit.Tile, lo: datetime, until: datetime) -> Iterator[SceneRef]:
        footprint = tile.polygon()
        days = orbit.acquisitions(
            tile, lo.date() - timedelta(days=1), until.date() + timedelta(days=1)
        )
        for acq in days:
            if not lo <= acq.acquired_at <= until:
                continue
            weather = orbit.scene_weather(self.seed, tile, acq.day, acq.satellite)
            yield SceneRef(
                source=self.name,
                product_id=f"SIM_{acq.satellite}_{acq.acquired_at:%Y%m%dT%H%M%S}_{tile.name}",
                acquired_at=acq.acquired_at,
                footprint=footprint,
                tile_id=tile.name,
                cloud_cover=weather.cloud_cover,
                level="L1C",
                extra={
                    "satellite": acq.satellite,
                    "tile_x": tile.ix,
                    "tile_y": tile.iy,
                    "tile_size_deg": tile.size_deg,
                    "day": acq.day.isoformat(),
                    "seed": self.seed,
                },
            )

    def read(self, scene: SceneRef, locations: Sequence[LocationRef]) -> Iterator[Chip | Rejection]:
        """One chip per location covered by ``scene``; NOT_COVERED for the others.

        Raises:
            SceneRejectedError: The scene's metadata is missing, malformed or
                from another world (seed).
        """
        tile, day, satellite = self._parse(scene)
        weather = orbit.scene_weather(self.seed, tile, day, satellite)
        footprint = prep(scene.footprint)
        for loc in locations:
            if not footprint.covers(Point(loc.lon, loc.lat)):
                yield Rejection(
                    loc.id,
                    reasons.NOT_COVERED,
                    f"location {loc.id} ({loc.lon:.5f}, {loc.lat:.5f}) lies outside"
                    f" {scene.product_id}",
                )
                continue
            try:
                world = world_for(self.seed, loc.lon, loc.lat, self.start, loc.grid)
                data, cloud_fraction = render_chip(world, day, satellite, weather)
            except ValueError as exc:
                yield Rejection(loc.id, reasons.UNREADABLE, f"location {loc.id}: {exc}")
                continue
            yield Chip(
                location_id=loc.id,
                data=data,
                valid_fraction=1.0,
                cloud_fraction=cloud_fraction,
                grid=loc.grid,
            )

    def _parse(self, scene: SceneRef) -> tuple[orbit.Tile, date, str]:
        extra: Any = scene.extra
        try:
            satellite = str(extra["satellite"])
            tile = orbit.Tile(
                int(extra["tile_x"]), int(extra["tile_y"]), float(extra["tile_size_deg"])
            )
            day = date.fromisoformat(str(extra["day"]))
            seed = int(extra["seed"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SceneRejectedError(
                reasons.MISSING_METADATA, f"{scene.product_id}: bad simulated metadata ({exc})"
            ) from None
        if satellite not in orbit.SATELLITES:
            raise SceneRejectedError(
                reasons.MISSING_METADATA, f"{scene.product_id}: unknown satellite {satellite!r}"
            )
        if seed != self.seed:
            raise SceneRejectedError(
                reasons.UNREADABLE,
                f"{scene.product_id} belongs to the world of seed {seed}, not {self.seed}",
            )
        return tile, day, satellite

    def ground_truth(self, locations: Sequence[LocationRef]) -> list[SimTruth]:
        """The planted change of each location, in the order given.

        Args:
            locations: Locations, each with its chip grid.

        Returns:
            One :class:`SimTruth` per location.
        """
        out = []
        for loc in locations:
            world = world_for(self.seed, loc.lon, loc.lat, self.start, loc.grid)
            event = world.profile.event
            out.append(
                SimTruth(
                    location_id=loc.id,
                    kind=None if event is None else event.kind,
                    event_date=None if event is None else event.day,
                    changed_fraction=0.0 if event is None else world.layout.changed_fraction,
                )
            )
        return out
