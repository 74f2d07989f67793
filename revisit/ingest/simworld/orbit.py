"""Where and when the simulated satellites look: tiles, acquisition times, scene weather.

Scenes are tiles of ``tile_size_deg`` squared on a global grid (tile (ix, iy)
spans lon [ix*s, (ix+1)*s), lat [iy*s, (iy+1)*s)). Sentinel-2A and -2B each
repeat their ground track every 10 days, 5 days apart, so a tile is seen every
5 days; the day within the cycle depends on the tile's relative orbit, which
here is a fixed hash of its column (tiles in one column share a track). The
descending node crosses at 10:30 local solar time, reaching higher latitudes a
little earlier. No acquisition is made when the sun at the tile centre is
within 5 degrees of the horizon (polar winter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Final

from shapely.geometry import Polygon, box

from revisit.ingest.simworld.atmosphere import LOCAL_TIME_H, TRACK_S_PER_DEG, solar_geometry
from revisit.ingest.simworld.seeding import rng_for, stable_seed

SATELLITES: Final = ("S2A", "S2B")
CYCLE_DAYS: Final = 10
#: S2A's first day of its 10-day cycle; S2B flies 5 days behind.
EPOCH: Final = date(2015, 6, 23)
_MIN_COS_SZ: Final = math.cos(math.radians(85.0))


@dataclass(frozen=True)
class Tile:
    """One scene tile of the global grid."""

    ix: int
    iy: int
    size_deg: float

    @property
    def name(self) -> str:
        """e.g. ``X+0045_Y+0007``."""
        return f"X{self.ix:+05d}_Y{self.iy:+05d}"

    @property
    def centre(self) -> tuple[float, float]:
        """(lon, lat) of the tile centre, clamped to the globe."""
        lon = min(max((self.ix + 0.5) * self.size_deg, -180.0), 180.0)
        lat = min(max((self.iy + 0.5) * self.size_deg, -90.0), 90.0)
        return lon, lat

    def polygon(self) -> Polygon:
        """The tile's footprint in lon/lat, clipped to the globe."""
        s = self.size_deg
        return box(
            max(self.ix * s, -180.0),
            max(self.iy * s, -90.0),
            min((self.ix + 1) * s, 180.0),
            min((self.iy + 1) * s, 90.0),
        )

    def orbit_offset(self) -> int:
        """Day of the 10-day cycle on which S2A sees this tile (0-9)."""
        return stable_seed("orbit", self.ix, self.size_deg) % CYCLE_DAYS


def tile_of(lon: float, lat: float, size_deg: float) -> Tile:
    """The tile that holds (lon, lat)."""
    return Tile(math.floor(lon / size_deg), math.floor(lat / size_deg), size_deg)


@dataclass(frozen=True)
class Acquisition:
    """One pass over one tile."""

    tile: Tile
    satellite: str
    day: date  # local solar date
    acquired_at: datetime


def acquisitions(tile: Tile, first: date, last: date) -> list[Acquisition]:
    """The passes over ``tile`` whose local date lies in [first, last], oldest first."""
    lon, lat = tile.centre
    out: list[Acquisition] = []
    offset = tile.orbit_offset()
    lead = (first - EPOCH).days - offset
    day = first + timedelta(days=(-lead) % 5)
    seconds = round((LOCAL_TIME_H - lon / 15.0) * 3600.0 - lat * TRACK_S_PER_DEG)
    while day <= last:
        sat = SATELLITES[((day - EPOCH).days - offset) // 5 % 2]
        cos_sz, _ = solar_geometry(lat, day.timetuple().tm_yday)
        if cos_sz >= _MIN_COS_SZ:
            at = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(seconds=seconds)
            out.append(Acquisition(tile, sat, day, at))
        day += timedelta(days=5)
    return out


@dataclass(frozen=True)
class SceneWeather:
    """Scene-wide conditions of one pass.

    Attributes:
        cloud_cover: Cloud cover of the scene in percent.
        aod550: Aerosol optical depth at 550 nm.
        vapour_scale: Multiplier on the climatological water vapour.
        shift_px: Geolocation error of the scene (rows, cols) in pixels.
        cloud_height_km: Height of the cloud layer (sets shadow offsets).
        thin_clouds: Whether the scene's clouds are thin (cirrus) rather than cumulus.
    """

    cloud_cover: float
    aod550: float
    vapour_scale: float
    shift_px: tuple[float, float]
    cloud_height_km: float
    thin_clouds: bool


def scene_weather(seed: int, tile: Tile, day: date, satellite: str) -> SceneWeather:
    """The weather of one pass; the same in ``search`` and ``read``."""
    rng = rng_for("scene", seed, tile.ix, tile.iy, tile.size_deg, day, satellite)
    clear = rng.random() < 0.4
    cover = float(rng.uniform(0.0, 2.0)) if clear else float(100.0 * rng.beta(0.7, 1.0))
    shift = rng.normal(0.0, 0.3, 2).clip(-1.2, 1.2)
    return SceneWeather(
        cloud_cover=round(cover, 2),
        aod550=float(min(max(rng.lognormal(math.log(0.12), 0.55), 0.02), 1.2)),
        vapour_scale=float(rng.lognormal(0.0, 0.3)),
        shift_px=(float(shift[0]), float(shift[1])),
        cloud_height_km=float(rng.uniform(0.6, 3.0)),
        thin_clouds=bool(rng.random() < 0.15),
    )
