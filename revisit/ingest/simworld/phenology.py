"""Seasons: temperature, green-up, harvest, leaf-off and snow, by latitude and hemisphere.

A location's day is turned into a *season day* (day of year, shifted by half a
year south of the equator) and a temperature from a sinusoidal climate (mean
and half-range from :mod:`landcover`). Everything seasonal follows from it:

- crops follow a calendar anchored at spring onset (the day the mean crosses
  8 deg C): summer crops emerge, peak, senesce (green -> straw) and are
  harvested to stubble then tilled soil; winter crops overwinter thin, green up
  early and are harvested in early summer; frost-free climates crop twice, timed
  by the wet season;
- deciduous forest leafs out between 5 and 13 deg C, browns in autumn;
- grass greens with warmth and browns in the dry season where the climate is arid;
- snow lies where the day's temperature is below freezing; lakes freeze.

None of this is change: it repeats every year.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date
from typing import Final

import numpy as np
import numpy.typing as npt

from revisit.ingest.simworld import landcover as lc
from revisit.ingest.simworld import spectra as sp

F32 = npt.NDArray[np.float32]

#: How much a segment's brightness drops as the sun gets lower (3-D canopy and
#: building shadows; 0 for flat surfaces).
ROUGHNESS: Final = np.array(
    [0.0, 0.55, 0.45, 0.12, 0.06, 0.40, 0.02, 0.08, 0.03, 0.25, 0.15, 0.0], dtype=np.float32
)
#: How much of a snow cover shows from above (a conifer canopy hides most of it).
SNOW_VISIBILITY: Final = np.array(
    [1.0, 0.3, 0.6, 1.0, 1.0, 0.7, 0.45, 1.0, 1.0, 0.85, 0.95, 1.0], dtype=np.float32
)
_ROOFS: Final = np.array([sp.CONCRETE, sp.RED_ROOF, sp.METAL_ROOF, sp.ASPHALT], dtype=np.int64)


def smoothstep(x: float | F32) -> F32:
    """0 below 0, 1 above 1, a smooth cubic between."""
    t = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)


def _sigmoid(x: F32) -> F32:
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


@dataclass(frozen=True)
class Season:
    """The state of a location's climate on one day.

    Attributes:
        season_day: Day of year, shifted by 182 south of the equator (0-365).
        temp: Climatological mean temperature of the day (deg C).
        cooling: Whether temperatures are falling (autumn).
        snow: Share of snow-prone ground under snow on this day (0-1).
        frozen: How frozen open water is (0-1).
        thermal: Warmth for growth, 0 (dormant) to 1.
        moisture: Rainy-season wetness, 1 outside arid climates.
        frost_free: Whether the climate never drops below 8 deg C (crops twice a year).
        onset: Season day of spring onset (or of the rains where frost-free).
        length: Growing season length in days.
        days_since_event: Days since the location's event, None before it or without one.
    """

    season_day: float
    temp: float
    cooling: bool
    snow: float
    frozen: float
    thermal: float
    moisture: float
    frost_free: bool
    onset: float
    length: float
    days_since_event: int | None


def season_at(profile: lc.LocationProfile, day: date, weather: float = 0.0) -> Season:
    """The location's season on ``day``.

    Args:
        profile: The location.
        day: The acquisition day.
        weather: The day's temperature anomaly in deg C (moves the snow line
            from one acquisition to the next; phenology ignores it).
    """
    doy = day.timetuple().tm_yday
    sday = float((doy + (182 if profile.lat < 0 else 0)) % 365)
    phase = 2.0 * math.pi * (sday - 20.0) / 365.0
    temp = profile.t_mean - profile.t_amp * math.cos(phase)
    ratio = (profile.t_mean - 8.0) / max(profile.t_amp, 1e-6)
    frost_free = ratio >= 1.0
    if frost_free:
        onset, length = profile.wet_season_day, 365.0
    else:
        x = math.acos(min(max(ratio, -1.0), 1.0))
        onset = 20.0 + 365.0 * x / (2.0 * math.pi)
        length = 365.0 - 2.0 * (onset - 20.0)
    wet = 0.5 * (1.0 + math.cos(2.0 * math.pi * (sday - profile.wet_season_day - 75.0) / 365.0))
    moisture = 1.0 - profile.aridity * (1.0 - wet) if frost_free else 1.0
    if not frost_free:
        heat = float(smoothstep((temp - 18.0) / 8.0))
        moisture = 1.0 - 0.85 * profile.aridity * heat
    today = temp + weather
    ev = profile.event
    since = (day - ev.day).days if ev is not None and day >= ev.day else None
    return Season(
        season_day=sday,
        temp=temp,
        cooling=math.sin(phase) < 0.0,
        snow=float(smoothstep((-1.0 - today) / 4.0)),
        frozen=float(smoothstep((-1.0 - temp) / 5.0)),
        thermal=float(smoothstep((temp - 3.0) / 10.0)),
        moisture=moisture,
        frost_free=frost_free,
        onset=onset,
        length=length,
        days_since_event=since,
    )


def _crop_cover(season: Season, p: F32) -> tuple[F32, F32, F32]:
    """Canopy cover, green share of the canopy and days since harvest of crop segments.

    ``p`` columns: crop type (0 summer, 1 winter), calendar offset (days), peak
    greenness, soil brightness.
    """
    offset = p[:, 1]
    winter = (p[:, 0] > 0.5) & (not season.frost_free)
    period = 182.5 if season.frost_free else 365.0
    d = np.mod(season.season_day - season.onset - offset, period).astype(np.float32)
    senesce = np.float32(min(max(season.length - 40.0, 60.0), 110.0))
    harvest = senesce + np.float32(25.0)
    sow = np.float32(max(season.length - 15.0, float(harvest) + 30.0))
    # Summer crop: bare until emergence ~3 weeks after onset.
    cover = _sigmoid((d - 20.0) / 6.0) * (d < harvest)
    green = 1.0 - _sigmoid((d - senesce) / 7.0)
    since = np.where(d >= harvest, d - harvest, 400.0)
    # Winter crop: thin overwintering cover, early green-up and harvest, sown in autumn.
    w_harvest = np.float32(95.0)
    w_cover = np.where(
        d < w_harvest,
        0.3 + 0.7 * _sigmoid((d - 15.0) / 7.0),
        0.3 * _sigmoid((d - sow - 20.0) / 8.0),
    )
    w_green = 1.0 - _sigmoid((d - 70.0) / 6.0) * (d < w_harvest)
    w_since = np.where((d >= w_harvest) & (d < sow), d - w_harvest, 400.0)
    cover = np.where(winter, w_cover, cover).astype(np.float32)
    green = np.where(winter, w_green, green).astype(np.float32)
    since = np.where(winter, w_since, since).astype(np.float32)
    return cover, green, since


def segment_weights(kinds: npt.NDArray[np.int8], params: F32, season: Season) -> tuple[F32, F32]:
    """Endmember fractions of every segment on one day, and their green-jitter direction.

    Args:
        kinds: Segment kind per segment (``landcover.SEG_*``), shape (n,).
        params: Four kind-specific parameters per segment, shape (n, 4).
        season: The day's season.

    Returns:
        (weights, jitter), each (n, N_ENDMEMBERS): the fractions, and the change
        in fractions per unit of within-field greenness variation.

    Raises:
        ValueError: ``params`` does not have one row of four per segment.
    """
    n = kinds.shape[0]
    if params.shape != (n, 4):
        raise ValueError(f"params must be ({n}, 4), not {params.shape}")
    w = np.zeros((n, sp.N_ENDMEMBERS), dtype=np.float32)
    jit = np.zeros_like(w)
    p0, p1, p2, p3 = params[:, 0], params[:, 1], params[:, 2], params[:, 3]
    thermal, moist = np.float32(season.thermal), np.float32(season.moisture)
    since = season.days_since_event

    m = kinds == lc.SEG_WATER
    turbid = np.clip(p0[m] + 0.15 * thermal * (1.0 - thermal) * 4.0, 0.0, 1.0)
    w[m, sp.WATER_TURBID] = turbid
    w[m, sp.WATER_CLEAR] = 1.0 - turbid

    m = kinds == lc.SEG_EVERGREEN
    canopy = p0[m] * (0.9 + 0.1 * thermal)
    broad = p1[m]
    w[m, sp.CONIFER] = canopy * (1.0 - broad)
    w[m, sp.BROADLEAF] = canopy * broad
    w[m, sp.GREEN_LEAF] = (1.0 - p0[m]) * thermal * moist * 0.6
    w[m, sp.DRY_VEG] = (1.0 - p0[m]) * (1.0 - thermal * moist * 0.6)
    jit[m, sp.CONIFER] = 0.25 * (1.0 - broad)
    jit[m, sp.BROADLEAF] = 0.25 * broad
    jit[m, sp.DRY_VEG] = -0.25

    m = kinds == lc.SEG_DECIDUOUS
    if season.frost_free:
        leaf = float(1.0 - 0.6 * (1.0 - moist))
    else:
        leaf = float(smoothstep((season.temp - 5.0) / 8.0))
    autumn = 4.0 * leaf * (1.0 - leaf) if season.cooling else 0.0
    w[m, sp.BROADLEAF] = p0[m] * leaf * (1.0 - 0.6 * autumn)
    w[m, sp.DRY_VEG] = p0[m] * leaf * 0.6 * autumn + (1.0 - p0[m]) * (1.0 - thermal * 0.7)
    w[m, sp.LEAF_OFF] = p0[m] * (1.0 - leaf)
    w[m, sp.GREEN_LEAF] = (1.0 - p0[m]) * thermal * 0.7
    jit[m, sp.BROADLEAF] = 0.2 + 0.3 * leaf * (1.0 - leaf) * 4.0
    jit[m, sp.LEAF_OFF] = -(0.2 + 0.3 * leaf * (1.0 - leaf) * 4.0)

    m = kinds == lc.SEG_CROP
    if m.any():
        cover, green, after = _crop_cover(season, params[m])
        peak = p2[m]
        soil = p3[m]
        stubble = np.where(after < 45.0, 0.65, 0.0).astype(np.float32)
        bare = 1.0 - cover
        w[m, sp.GREEN_LEAF] = cover * green * peak
        w[m, sp.DRY_VEG] = cover * (1.0 - green * peak) + bare * stubble
        w[m, sp.SOIL_BRIGHT] = bare * (1.0 - stubble) * soil
        w[m, sp.SOIL_DARK] = bare * (1.0 - stubble) * (1.0 - soil)
        edge = 0.08 + 0.5 * cover * (1.0 - cover) * 4.0
        jit[m, sp.GREEN_LEAF] = edge * green
        jit[m, sp.SOIL_DARK] = -edge * green

    m = kinds == lc.SEG_GRASS
    g = p0[m] * thermal * moist
    w[m, sp.GREEN_LEAF] = g
    w[m, sp.DRY_VEG] = (1.0 - g) * 0.75
    w[m, sp.SOIL_BRIGHT] = (1.0 - g) * 0.25
    jit[m, sp.GREEN_LEAF] = 0.3
    jit[m, sp.DRY_VEG] = -0.3

    for kind in (lc.SEG_BUILDING, lc.SEG_SITE):
        m = kinds == kind
        if not m.any():
            continue
        idx = np.flatnonzero(m)
        veg = p1[m]
        built = 1.0 - veg
        if kind == lc.SEG_SITE:
            site = np.ones(idx.size, dtype=bool) if since is None else p2[m] > since
            veg = np.where(site, 0.0, veg).astype(np.float32)
            built = np.where(site, 0.0, 1.0 - veg).astype(np.float32)
            w[idx, sp.SOIL_BRIGHT] = np.where(site, 0.8, 0.0)
            w[idx, sp.DRY_VEG] = np.where(site, 0.2, 0.0)
        # A 10 m pixel of a block mixes roofs, yards, paving and shade: a dominant
        # roof material over a concrete and asphalt background.
        roof = _ROOFS[np.clip(p0[m].astype(np.int64), 0, 3)]
        w[idx, roof] += built * 0.45
        w[idx, sp.CONCRETE] += built * 0.3
        w[idx, sp.ASPHALT] += built * 0.25
        w[idx, sp.BROADLEAF] += veg * thermal * 0.7
        w[idx, sp.LEAF_OFF] += veg * (1.0 - thermal * 0.7)
        jit[idx, sp.CONCRETE] = 0.2
        jit[idx, sp.ASPHALT] = -0.2

    m = kinds == lc.SEG_ROAD
    w[m, sp.ASPHALT] = 0.72
    w[m, sp.CONCRETE] = 0.12
    w[m, sp.GREEN_LEAF] = 0.16 * thermal
    w[m, sp.DRY_VEG] = 0.16 * (1.0 - thermal)

    m = kinds == lc.SEG_BARE
    sparse = p1[m]
    w[m, sp.SOIL_BRIGHT] = p0[m] * (1.0 - sparse)
    w[m, sp.SOIL_DARK] = (1.0 - p0[m]) * (1.0 - sparse)
    w[m, sp.GREEN_LEAF] = sparse * thermal * moist
    w[m, sp.DRY_VEG] = sparse * (1.0 - thermal * moist)
    jit[m, sp.SOIL_BRIGHT] = 0.15
    jit[m, sp.SOIL_DARK] = -0.15

    m = kinds == lc.SEG_GLACIER
    w[m, sp.ICE] = p0[m]
    w[m, sp.SNOW] = 1.0 - p0[m]

    m = kinds == lc.SEG_CLEARED
    if m.any():
        age = float(since if since is not None else 0)
        regrowth = min(age / 900.0, 1.0) * 0.45
        slash = p0[m] * np.float32(math.exp(-age / 400.0))
        w[m, sp.DRY_VEG] = slash + regrowth * (1.0 - thermal)
        w[m, sp.GREEN_LEAF] = regrowth * thermal
        w[m, sp.SOIL_BRIGHT] = (1.0 - slash - regrowth) * 0.6
        w[m, sp.SOIL_DARK] = (1.0 - slash - regrowth) * 0.4
        jit[m, sp.DRY_VEG] = 0.2
        jit[m, sp.SOIL_DARK] = -0.2

    m = kinds == lc.SEG_FLOOD
    if m.any():
        age = float(since if since is not None else 0)
        turbid = np.clip(p0[m] * np.float32(math.exp(-age / 150.0)) + 0.1, 0.0, 1.0)
        w[m, sp.WATER_TURBID] = turbid
        w[m, sp.WATER_CLEAR] = 1.0 - turbid
    return w, jit


def snow_visibility(kinds: npt.NDArray[np.int8], season: Season) -> F32:
    """How much of the day's snow shows on each segment (frozen water included)."""
    vis = SNOW_VISIBILITY[kinds].copy()
    water = (kinds == lc.SEG_WATER) | (kinds == lc.SEG_FLOOD)
    vis[water] = season.frozen
    return vis
