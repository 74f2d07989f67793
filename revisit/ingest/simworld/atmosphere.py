"""Sun and atmosphere: solar geometry, terrain illumination, haze, water vapour, clouds, shadows.

L1C DN is top-of-atmosphere reflectance x 10000, which already divides by the
cosine of the solar zenith, so a flat Lambertian field keeps its DN as the sun
drops. What the sun angle still changes, and what this module models:

- terrain: a slope facing the sun is lit by cos(i) instead of cos(sz), so the
  factor cos(i)/cos(sz) brightens sunny slopes and darkens shaded ones, more so
  in winter (applied to the direct share of the light only);
- 3-D surfaces (canopies, buildings) hide more of themselves in their own
  shadow as the sun drops (``phenology.ROUGHNESS``);
- the atmosphere: Rayleigh and aerosol path reflectance (additive haze,
  strongest in B01/B02, growing with the slant path 1/cos(sz)), two-way
  transmittance, water vapour absorption (deep in B09, slight in B8A/B11/B12)
  and ozone (B03/B04);
- clouds: bright, nearly flat across bands, still bright in SWIR; their shadows
  fall away from the sun by cloud height x tan(sz), where only skylight reaches
  the ground.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from revisit.ingest.simworld import spectra as sp
from revisit.ingest.simworld import texture as tx

F32 = npt.NDArray[np.float32]

_TAU_RAYLEIGH: Final = np.array(
    [0.236, 0.156, 0.090, 0.045, 0.036, 0.029, 0.024, 0.018, 0.016, 0.011, 0.0013, 0.0004],
    dtype=np.float32,
)
_ANGSTROM: Final = np.float32(1.3)
_WATER_VAPOUR_K: Final = np.array(
    [0.0, 0.0, 0.0, 0.002, 0.010, 0.004, 0.003, 0.004, 0.008, 0.32, 0.006, 0.030],
    dtype=np.float32,
)
_OZONE_K: Final = np.array(
    [0.0, 0.003, 0.020, 0.010, 0.004, 0.002, 0.001, 0.001, 0.0, 0.0, 0.0, 0.0], dtype=np.float32
)
#: Mean local solar time of Sentinel-2's descending node.
LOCAL_TIME_H: Final = 10.5
#: Seconds per degree of latitude along the descending track (100.6-min orbit).
TRACK_S_PER_DEG: Final = 100.6 * 60.0 / 360.0


def solar_geometry(
    lat: float, day_of_year: int, local_hour: float = LOCAL_TIME_H
) -> tuple[float, float]:
    """Cosine of the solar zenith and the solar azimuth (radians from north, clockwise).

    Args:
        lat: Latitude in degrees.
        day_of_year: 1-366.
        local_hour: Local solar time in hours.
    """
    decl = math.radians(23.44) * math.sin(2.0 * math.pi * (284 + day_of_year) / 365.0)
    phi = math.radians(lat)
    hour_angle = math.radians(15.0 * (local_hour - 12.0))
    cos_sz = math.sin(phi) * math.sin(decl) + math.cos(phi) * math.cos(decl) * math.cos(hour_angle)
    cos_sz = min(max(cos_sz, -1.0), 1.0)
    sin_sz = math.sqrt(max(1.0 - cos_sz * cos_sz, 1e-12))
    sin_az = -math.sin(hour_angle) * math.cos(decl) / sin_sz
    cos_az = (math.sin(decl) - math.sin(phi) * cos_sz) / (math.cos(phi) * sin_sz + 1e-12)
    return cos_sz, math.atan2(sin_az, cos_az) % (2.0 * math.pi)


def terrain_factor(cos_sz: float, sun_az: float, slope_deg: float, aspect_deg: float) -> F32:
    """Per-band brightness factor of a tilted surface: cos(i)/cos(sz) on the direct light.

    Returns:
        (12,) factors; 1 on flat ground.
    """
    s, a = math.radians(slope_deg), math.radians(aspect_deg)
    sin_sz = math.sqrt(max(1.0 - cos_sz * cos_sz, 0.0))
    cos_i = cos_sz * math.cos(s) + sin_sz * math.sin(s) * math.cos(sun_az - a)
    direct = min(max(cos_i / max(cos_sz, 0.05), 0.0), 2.5)
    return (sp.DIFFUSE_SHARE + (1.0 - sp.DIFFUSE_SHARE) * np.float32(direct)).astype(np.float32)


@dataclass(frozen=True)
class Atmosphere:
    """The atmosphere over one chip on one day.

    Attributes:
        path_rayleigh: (12,) molecular path reflectance.
        path_aerosol: (12,) aerosol path reflectance at the scene's optical depth.
        transmittance: (12,) two-way transmittance, gases included.
    """

    path_rayleigh: F32
    path_aerosol: F32
    transmittance: F32


def atmosphere(
    cos_sz: float, aod550: float, water_vapour_cm: float, elevation_m: float
) -> Atmosphere:
    """Path reflectance and transmittance for a nadir view.

    Args:
        cos_sz: Cosine of the solar zenith (clamped to 0.08 and above).
        aod550: Aerosol optical depth at 550 nm.
        water_vapour_cm: Precipitable water in cm.
        elevation_m: Surface elevation (less air above mountains).

    Raises:
        ValueError: ``aod550`` or ``water_vapour_cm`` is negative.
    """
    if aod550 < 0 or water_vapour_cm < 0:
        raise ValueError(f"need aod550 >= 0 and water vapour >= 0, not {aod550}, {water_vapour_cm}")
    mu = max(cos_sz, 0.08)
    airmass = np.float32(1.0 / mu + 1.0)
    tau_r = _TAU_RAYLEIGH * np.float32(math.exp(-elevation_m / 8000.0))
    tau_a = np.float32(aod550) * (sp.WAVELENGTH_NM / np.float32(550.0)) ** -_ANGSTROM
    path_r = tau_r / np.float32(4.0 * mu) * np.float32(0.9)
    path_a = np.float32(0.12) * tau_a / np.float32(mu)
    gas = np.exp(-(_WATER_VAPOUR_K * np.float32(water_vapour_cm) + _OZONE_K) * airmass)
    # Diffuse transmittance gives back much of what is scattered out of the direct beam.
    trans = np.exp(-(0.3 * tau_r + 0.15 * tau_a) * airmass) * gas
    return Atmosphere(
        path_rayleigh=path_r.astype(np.float32),
        path_aerosol=path_a.astype(np.float32),
        transmittance=trans.astype(np.float32),
    )


@dataclass(frozen=True)
class CloudLayer:
    """Cloud opacity and shadow strength per canvas pixel (flattened), 0 to 1 each."""

    opacity: F32
    shadow: F32


def cloud_layer(
    rng: np.random.Generator,
    canvas: int,
    fraction: float,
    shadow_shift: tuple[float, float],
    *,
    thin: bool = False,
) -> CloudLayer:
    """Clouds covering about ``fraction`` of the canvas, and their shadows.

    The cloud field is value noise on a lattice large enough to be sampled both
    at the canvas and at the canvas shifted back by the shadow displacement, so
    a shadow belongs to a cloud even when that cloud lies outside the chip.

    Args:
        rng: The chip's generator.
        canvas: Canvas side in pixels.
        fraction: Target share of the canvas under cloud, 0-1.
        shadow_shift: (rows, cols) from a cloud to its shadow, in pixels.
        thin: Thin, semi-transparent cloud (cirrus, haze banks) instead of cumulus.

    Raises:
        ValueError: ``fraction`` is outside [0, 1].
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"cloud fraction must be in [0, 1], not {fraction}")
    n = canvas * canvas
    if fraction <= 0.0:
        zeros = np.zeros(n, dtype=np.float32)
        return CloudLayer(opacity=zeros, shadow=zeros)
    dr, dc = shadow_shift
    coarse = float(rng.uniform(14.0, 34.0))
    base = np.arange(canvas, dtype=np.float32) + np.float32(0.5)
    fields = []
    for rows, cols in ((base, base), (base - np.float32(dr), base - np.float32(dc))):
        total = np.zeros((canvas, canvas), dtype=np.float32)
        fields.append((rows, cols, total))
    for cell, amp in ((coarse, 1.0), (coarse / 3.0, 0.45)):
        lo = min(0.0, -dr, -dc) - 2.0 * cell
        hi = canvas + max(0.0, -dr, -dc) + 2.0 * cell
        origin = math.floor(lo / cell)
        nodes = math.ceil(hi / cell) - origin + 2
        lattice = rng.standard_normal((nodes, nodes)).astype(np.float32)
        for rows, cols, total in fields:
            total += np.float32(amp) * tx.lattice_sample(
                lattice, cell, (origin, origin), rows, cols
            )
    cloud, shade = fields[0][2].ravel(), fields[1][2].ravel()
    k = min(int((1.0 - fraction) * n), n - 1)
    thr = np.partition(cloud, k)[k]
    soft = np.float32(max(float(cloud.std()) * 0.45, 1e-3))
    peak = float(rng.uniform(0.15, 0.45)) if thin else float(rng.uniform(0.85, 1.0))
    opacity = np.clip((cloud - thr) / soft, 0.0, 1.0) * np.float32(peak)
    darkness = float(rng.uniform(0.6, 0.9)) * peak
    shadow = np.clip((shade - thr) / soft, 0.0, 1.0) * np.float32(darkness)
    return CloudLayer(opacity=opacity.astype(np.float32), shadow=shadow.astype(np.float32))


def shadow_shift(
    cos_sz: float, sun_az: float, height_km: float, resolution_m: float
) -> tuple[float, float]:
    """(rows, cols) in pixels from a cloud at ``height_km`` to its shadow, away from the sun."""
    sin_sz = math.sqrt(max(1.0 - cos_sz * cos_sz, 0.0))
    length = height_km * 1000.0 * sin_sz / max(cos_sz, 0.1) / resolution_m
    length = min(length, 400.0)
    # Rows grow southwards, columns eastwards; the shadow lies opposite the sun.
    return length * math.cos(sun_az), -length * math.sin(sun_az)
