"""One chip of one location on one pass: the world's pure function of its inputs.

:func:`world_for` builds (and caches) what never changes about a location: its
profile and layout. :func:`render_chip` then composes the day: segment spectra
from phenology, per-pixel texture and green jitter, snow, sun and terrain,
cloud shadows, atmosphere, clouds, and the sensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from revisit.grid import ChipGrid
from revisit.ingest.simworld import atmosphere as atm
from revisit.ingest.simworld import landcover as lc
from revisit.ingest.simworld import layout as lay
from revisit.ingest.simworld import phenology as ph
from revisit.ingest.simworld import sensor
from revisit.ingest.simworld import spectra as sp
from revisit.ingest.simworld.orbit import SceneWeather
from revisit.ingest.simworld.seeding import rng_for
from revisit.ingest.simworld.texture import lattice_sample

F32 = npt.NDArray[np.float32]

#: Locations whose layout stays in memory (about 0.2 MB each at 64 px).
WORLD_CACHE_SIZE = 1024
#: Opacity or shadow strength from which a pixel counts as cloud or shadow.
CLOUD_MASK_LEVEL = 0.1


@dataclass(frozen=True, eq=False)
class LocationWorld:
    """What never changes about a location: its profile, layout and grid placement.

    Attributes:
        seed: The world's seed.
        profile: Climate, elevation, class mix, event.
        layout: Segments of the canvas.
        size: Chip side in pixels.
        origin: Global (row, col) pixel index of the chip's top-left pixel.
        resolution_m: Metres per pixel.
    """

    seed: int
    profile: lc.LocationProfile
    layout: lay.Layout
    size: int
    origin: tuple[int, int]
    resolution_m: float

    def land_cover(self, day: date) -> npt.NDArray[np.int8]:
        """Area class of every chip pixel on ``day`` (the event applied), without snow.

        Returns:
            (size, size) int8 of ``landcover.WATER`` ... ``landcover.SNOW``.
        """
        ev = self.profile.event
        full = lay.classes(self.layout, after=ev is not None and day >= ev.day)
        m = self.layout.margin
        return full[m : m + self.size, m : m + self.size]


@lru_cache(maxsize=WORLD_CACHE_SIZE)
def world_for(seed: int, lon: float, lat: float, start: date, grid: ChipGrid) -> LocationWorld:
    """The static world of a location (cached; a pure function of its arguments).

    Args:
        seed: The world's seed.
        lon, lat: The location, degrees.
        start: The world's first day.
        grid: The location's chip grid.

    Raises:
        ValueError: Invalid coordinates or grid.
    """
    if grid.size < 1 or grid.resolution <= 0:
        raise ValueError(f"invalid chip grid: {grid}")
    profile = lc.draw_profile(seed, lon, lat, start)
    margin = sensor.margin_for(grid.resolution)
    layout = lay.build_layout(seed, profile, grid.size, margin)
    origin = (round(-grid.maxy / grid.resolution), round(grid.minx / grid.resolution))
    return LocationWorld(seed, profile, layout, grid.size, origin, grid.resolution)


def _chip_cloud_fraction(rng: np.random.Generator, scene_cover: float) -> float:
    """This chip's cloud share, scattered around the scene's cover."""
    if scene_cover <= 2.0:
        return 0.0
    p = min(max(scene_cover / 100.0, 1e-3), 1.0 - 1e-3)
    local = 1.0 / (1.0 + math.exp(-(math.log(p / (1.0 - p)) + rng.normal(0.0, 1.3))))
    return 0.0 if local < 0.01 else min(local, 1.0)


def render_chip(
    world: LocationWorld, day: date, satellite: str, weather: SceneWeather
) -> tuple[npt.NDArray[np.uint16], float]:
    """The chip of ``world`` seen by ``satellite`` on ``day`` under ``weather``.

    Args:
        world: The location.
        day: The acquisition's local date.
        satellite: ``S2A`` or ``S2B``.
        weather: The pass's scene-wide weather.

    Returns:
        (12, size, size) uint16 L1C DN, and the share of pixels under cloud or shadow.

    Raises:
        ValueError: Unknown satellite.
    """
    if satellite not in sp.SATELLITE_GAIN:
        raise ValueError(f"unknown satellite {satellite!r}")
    prof, layout = world.profile, world.layout
    rng = rng_for("chip", world.seed, prof.lon, prof.lat, day, satellite)
    season = ph.season_at(prof, day, weather=float(rng.normal(0.0, 2.5)))
    after = season.days_since_event is not None and layout.seg_after is not None
    seg = layout.seg_after if after and layout.seg_after is not None else layout.seg
    bright = layout.bright_after if after else layout.bright
    kinds = layout.kinds

    # Ground: segment spectra on this day, shaded by the sun's height over 3-D surfaces.
    weights, jitter = ph.segment_weights(kinds, layout.params, season)
    cos_sz, sun_az = atm.solar_geometry(prof.lat, day.timetuple().tm_yday)
    mu = max(cos_sz, 0.08)
    vapour = (0.4 + 3.6 * float(ph.smoothstep((season.temp + 5.0) / 35.0))) * weather.vapour_scale
    air = atm.atmosphere(cos_sz, weather.aod550, vapour, prof.elevation_m)
    gain = sp.SATELLITE_GAIN[satellite]
    # Per-band factors of the surface signal: terrain, two-way transmittance, sensor gain.
    surface = atm.terrain_factor(cos_sz, sun_az, prof.slope_deg, prof.aspect_deg)
    surface = surface * air.transmittance * gain
    shade = (1.0 - ph.ROUGHNESS[kinds] * np.float32(0.9 * (1.0 - mu)))[:, None]
    base = (sp.endmember_spectra(weights) * shade * surface).T
    vary = (sp.endmember_spectra(jitter) * shade * surface).T
    refl = np.take(base, seg, axis=1)
    refl += np.take(vary, seg, axis=1) * layout.green_jitter
    refl *= bright
    if season.snow > 0.0:
        vis = ph.snow_visibility(kinds, season)[seg]
        cover = np.clip((np.float32(season.snow) - layout.snow_rank) * 8.0, 0.0, 1.0) * vis
        if cover.any():
            snow = (sp.ENDMEMBERS[sp.SNOW] * surface)[:, None] * (0.94 + 0.06 * bright)
            refl += cover * (snow - refl)

    # Cloud shadows (only skylight reaches the ground), haze, then the clouds on top.
    fraction = _chip_cloud_fraction(rng, weather.cloud_cover)
    shift = atm.shadow_shift(cos_sz, sun_az, weather.cloud_height_km, world.resolution_m)
    clouds = atm.cloud_layer(rng, layout.canvas, fraction, shift, thin=weather.thin_clouds)
    if fraction > 0.0:
        refl *= 1.0 - clouds.shadow * (1.0 - sp.DIFFUSE_SHARE)[:, None]
    haze = 1.0 + 0.25 * _haze_field(rng, layout.canvas)
    refl += (air.path_rayleigh * gain)[:, None]
    refl += (air.path_aerosol * gain)[:, None] * haze
    if fraction > 0.0:
        thick = 0.8 + 0.25 * clouds.opacity
        refl += clouds.opacity * ((sp.CLOUD_TOA * gain)[:, None] * thick - refl)
    toa = refl

    jitter_px = rng.normal(0.0, 0.05, 2)
    dy = float(np.clip(weather.shift_px[0] + jitter_px[0], -1.4, 1.4))
    dx = float(np.clip(weather.shift_px[1] + jitter_px[1], -1.4, 1.4))
    c = layout.canvas
    data = sensor.acquire(
        rng,
        toa.reshape(sp.N_BANDS, c, c).astype(np.float32, copy=False),
        size=world.size,
        shift=(dy, dx),
        origin=world.origin,
        resolution_m=world.resolution_m,
    )
    cloud_fraction = 0.0
    if fraction > 0.0:
        mask = (clouds.opacity >= CLOUD_MASK_LEVEL) | (clouds.shadow >= CLOUD_MASK_LEVEL)
        r0 = layout.margin + round(dy)
        c0 = layout.margin + round(dx)
        window = mask.reshape(c, c)[r0 : r0 + world.size, c0 : c0 + world.size]
        cloud_fraction = float(window.mean())
    return data, cloud_fraction


def _haze_field(rng: np.random.Generator, canvas: int) -> F32:
    """A gentle, smooth variation of aerosol across the canvas (flattened, about +-1)."""
    cell = float(canvas)
    lattice = rng.standard_normal((3, 3)).astype(np.float32)
    coords = np.arange(canvas, dtype=np.float32) + np.float32(0.5)
    return lattice_sample(lattice, cell, (0, 0), coords, coords).ravel()
