"""Land-cover classes and the per-location profile: climate, elevation, class mix, event.

A location's profile is drawn from a hash of (seed, lon, lat): no state, so any
point on Earth gets a plausible landscape. Climate follows latitude and the
drawn elevation (a lapse rate of 6 K/km); the mix of classes follows a drawn
landscape type (agricultural, forested, urban, ...) adjusted by that climate:
no crops where summers are too short, little forest where it is too dry,
glaciers above the snow line, and a forest for every clearing event to clear.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Final

import numpy as np

from revisit.ingest.simworld.events import CLEARING, CONSTRUCTION, ChangeEvent, draw_event
from revisit.ingest.simworld.seeding import rng_for

# Area classes: what a pixel *is*, as a person would label it.
WATER, FOREST, CROPLAND, GRASSLAND, URBAN, BARE, SNOW = range(7)
CLASS_NAMES: Final = ("water", "forest", "cropland", "grassland", "urban", "bare", "snow")
N_CLASSES: Final = 7

# Segment kinds: how a patch of pixels behaves over time (its spectra and phenology).
SEG_WATER = 0
SEG_EVERGREEN = 1
SEG_DECIDUOUS = 2
SEG_CROP = 3
SEG_GRASS = 4
SEG_BUILDING = 5
SEG_ROAD = 6
SEG_BARE = 7
SEG_GLACIER = 8
SEG_SITE = 9  # construction after an event: bare soil, then buildings
SEG_CLEARED = 10  # forest cut by an event: slash and soil, slow regrowth
SEG_FLOOD = 11  # land flooded by an event
N_SEG_KINDS: Final = 12

#: The area class of each segment kind.
SEG_CLASS: Final = np.array(
    [WATER, FOREST, FOREST, CROPLAND, GRASSLAND, URBAN, URBAN, BARE, SNOW, URBAN, BARE, WATER],
    dtype=np.int8,
)

# Landscape types: base shares of (water, forest, cropland, grassland, urban, bare, snow).
_LANDSCAPES: Final = np.array(
    [
        [0.03, 0.12, 0.65, 0.12, 0.05, 0.03, 0.0],  # agricultural
        [0.03, 0.75, 0.06, 0.10, 0.02, 0.04, 0.0],  # forested
        [0.03, 0.06, 0.06, 0.15, 0.67, 0.03, 0.0],  # urban
        [0.03, 0.10, 0.30, 0.20, 0.32, 0.05, 0.0],  # peri-urban
        [0.03, 0.12, 0.08, 0.67, 0.03, 0.07, 0.0],  # pasture
        [0.01, 0.02, 0.06, 0.20, 0.03, 0.68, 0.0],  # arid
        [0.40, 0.20, 0.12, 0.20, 0.05, 0.03, 0.0],  # lakeside
        [0.03, 0.35, 0.02, 0.30, 0.01, 0.29, 0.0],  # mountain
    ]
)
_LANDSCAPE_P: Final = np.array([0.28, 0.18, 0.12, 0.12, 0.12, 0.06, 0.06, 0.06])
_ARID, _MOUNTAIN = 5, 7


@dataclass(frozen=True)
class LocationProfile:
    """Everything about a location that does not change with the date (except its event).

    Attributes:
        lon, lat: Degrees.
        elevation_m: Drawn elevation.
        slope_deg, aspect_deg: Mean terrain slope and its facing (0 = north, clockwise).
        t_mean, t_amp: Mean annual temperature and its seasonal half-range (deg C).
        aridity: 0 (humid) to 1 (desert); browns grass in the dry season.
        wet_season_day: In the tropics, the season day when rains start.
        mix: Shares of the seven area classes (sum 1).
        evergreen_share: Share of forest stands that keep their leaves.
        broadleaf_evergreen: Whether evergreen stands are broadleaf (tropics) or conifer.
        field_len_px: Mean field length and width in pixels.
        orientation_rad: Direction of the field and street pattern.
        block_px: Urban block spacing in pixels.
        event: The planted change, if any.
    """

    lon: float
    lat: float
    elevation_m: float
    slope_deg: float
    aspect_deg: float
    t_mean: float
    t_amp: float
    aridity: float
    wet_season_day: float
    mix: tuple[float, ...]
    evergreen_share: float
    broadleaf_evergreen: bool
    field_len_px: tuple[float, float]
    orientation_rad: float
    block_px: float
    event: ChangeEvent | None

    @property
    def snowline_m(self) -> float:
        """Elevation of the permanent snow line at this latitude."""
        return 5200.0 - 75.0 * max(abs(self.lat) - 15.0, 0.0)


def _climate(rng: np.random.Generator, lat: float, elevation_m: float) -> tuple[float, float]:
    alat = abs(lat)
    t_mean = 27.0 - 0.42 * max(alat - 12.0, 0.0) - 6.0 * elevation_m / 1000.0
    t_amp = (1.5 + 0.22 * max(alat - 8.0, 0.0)) * rng.uniform(0.6, 1.3)
    return float(t_mean + rng.normal(0.0, 1.0)), float(t_amp)


def draw_profile(seed: int, lon: float, lat: float, start: date) -> LocationProfile:
    """The profile of the location at (lon, lat) in the world of ``seed``.

    Args:
        seed: The world's seed.
        lon, lat: Degrees.
        start: The world's first day (dates the planted event).

    Raises:
        ValueError: (lon, lat) is not a valid coordinate.
    """
    if not (-180.0 <= lon <= 180.0 and -90.0 <= lat <= 90.0):
        raise ValueError(f"not a longitude/latitude: ({lon}, {lat})")
    rng = rng_for("profile", seed, lon, lat)
    event = draw_event(seed, lon, lat, start)
    alat = abs(lat)
    if rng.random() < 0.85:
        elevation = float(rng.exponential(220.0))
    else:
        elevation = float(min(300.0 + rng.exponential(900.0), 5500.0))
    slope = float(np.clip(rng.normal(elevation / 150.0, 4.0), 0.0, 38.0))
    aspect = float(rng.uniform(0.0, 360.0))
    t_mean, t_amp = _climate(rng, lat, elevation)
    belt = float(np.exp(-(((alat - 27.0) / 10.0) ** 2)))
    aridity = float(np.clip(rng.normal(0.2 + 0.5 * belt, 0.2), 0.0, 1.0))

    weights = _LANDSCAPE_P.copy()
    weights[_ARID] *= 1.0 + 6.0 * aridity**2
    if elevation > 1500.0:
        weights[_MOUNTAIN] *= 8.0
    weights /= weights.sum()
    kind = int(rng.choice(len(weights), p=weights))
    mix = rng.dirichlet(_LANDSCAPES[kind] * 14.0 + 0.05)
    summer = t_mean + t_amp
    if summer < 13.0:  # too short a season for crops
        mix[GRASSLAND] += mix[CROPLAND]
        mix[CROPLAND] = 0.0
    if summer < 8.0:  # tundra: no trees
        mix[GRASSLAND] += mix[FOREST]
        mix[FOREST] = 0.0
    if aridity > 0.75:
        moved = 0.8 * mix[FOREST]
        mix[FOREST] -= moved
        mix[BARE] += moved
    snowline = 5200.0 - 75.0 * max(alat - 15.0, 0.0)
    if elevation > snowline:
        mix[SNOW] = min((elevation - snowline) / 900.0, 0.85)
        mix[CROPLAND] = mix[URBAN] = 0.0
    mix = _condition_on_event(mix, event)
    mix[mix < 0.015] = 0.0
    mix /= mix.sum()

    smallholder = rng.random() < 0.25
    field_len = (
        (float(rng.uniform(5.0, 12.0)), float(rng.uniform(3.0, 8.0)))
        if smallholder
        else (float(rng.uniform(16.0, 45.0)), float(rng.uniform(8.0, 24.0)))
    )
    if alat > 55.0:
        evergreen = 0.8
    elif alat < 20.0:
        evergreen = 0.95
    else:
        evergreen = float(rng.uniform(0.15, 0.6))
    return LocationProfile(
        lon=lon,
        lat=lat,
        elevation_m=elevation,
        slope_deg=slope,
        aspect_deg=aspect,
        t_mean=t_mean,
        t_amp=t_amp,
        aridity=aridity,
        wet_season_day=float(rng.uniform(0.0, 365.0)),
        mix=tuple(float(x) for x in mix),
        evergreen_share=evergreen,
        broadleaf_evergreen=alat < 25.0,
        field_len_px=field_len,
        orientation_rad=float(rng.uniform(0.0, np.pi / 2)),
        block_px=float(rng.uniform(5.0, 10.0)),
        event=event,
    )


def _condition_on_event(mix: np.ndarray, event: ChangeEvent | None) -> np.ndarray:
    """Make sure the event has something to change: forest to clear, vegetation to build on."""
    if event is None:
        return mix
    mix = mix.copy()
    if event.kind == CLEARING and mix[FOREST] < 0.6:
        mix *= 0.4 / max(1.0 - mix[FOREST], 1e-9)
        mix[FOREST] = 0.6
        mix[SNOW] = 0.0
    elif event.kind == CONSTRUCTION and mix[CROPLAND] + mix[GRASSLAND] < 0.4:
        mix[GRASSLAND] += 0.4
        mix[SNOW] = 0.0
    else:
        mix[SNOW] = 0.0
    return mix
