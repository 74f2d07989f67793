"""Surface reflectance spectra (endmembers) over the 12 canonical Sentinel-2 bands.

Values are surface reflectance (0-1) at the band centres of B01 B02 B03 B04 B05
B06 B07 B08 B8A B09 B11 B12; the atmosphere module turns them into top-of-
atmosphere reflectance, and L1C DN is TOA reflectance x 10000. Every pixel is a
linear mixture of these endmembers, so mixed pixels (a field half green, a
suburb of roofs and gardens) come out as they do in real imagery.

Sources for the shapes: USGS splib07 and ECOSTRESS library spectra convolved
to Sentinel-2 spectral responses, rounded; the point is plausibility, not a
particular sample.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]

#: Band centre wavelengths in nm, canonical order.
WAVELENGTH_NM: Final = np.array(
    [443, 490, 560, 665, 705, 740, 783, 842, 865, 945, 1610, 2190], dtype=np.float32
)
N_BANDS: Final = 12
#: Native resolution of each band in metres (10, 20 or 60).
NATIVE_RES_M: Final = (60, 10, 10, 10, 20, 20, 20, 10, 20, 60, 20, 20)
B02, B03, B04, B08, B11 = 1, 2, 3, 7, 10

# Endmember indices.
GREEN_LEAF = 0  # full green herbaceous canopy (crop, grass at peak)
CONIFER = 1  # needleleaf canopy, dark in the visible, moderate NIR
BROADLEAF = 2  # broadleaf canopy in leaf
DRY_VEG = 3  # senescent leaves, stubble, straw, litter
LEAF_OFF = 4  # deciduous stand without leaves: branches, litter, shadow
SOIL_BRIGHT = 5  # dry loam or sand
SOIL_DARK = 6  # moist, freshly tilled soil
WATER_CLEAR = 7
WATER_TURBID = 8  # sediment-laden
CONCRETE = 9
ASPHALT = 10
RED_ROOF = 11  # clay tiles
METAL_ROOF = 12
SNOW = 13  # fresh snow: bright visible, dark SWIR
ICE = 14  # glacier ice, old firn
N_ENDMEMBERS: Final = 15

# fmt: off
_TABLE = [
    # B01    B02    B03    B04    B05    B06    B07    B08    B8A    B09    B11    B12
    [0.030, 0.034, 0.078, 0.034, 0.125, 0.310, 0.405, 0.430, 0.445, 0.440, 0.245, 0.115],
    [0.020, 0.022, 0.045, 0.020, 0.072, 0.185, 0.240, 0.262, 0.270, 0.268, 0.128, 0.054],
    [0.026, 0.030, 0.068, 0.028, 0.110, 0.295, 0.375, 0.400, 0.415, 0.412, 0.200, 0.086],
    [0.062, 0.072, 0.098, 0.125, 0.155, 0.192, 0.220, 0.240, 0.258, 0.268, 0.338, 0.248],
    [0.036, 0.041, 0.056, 0.066, 0.086, 0.112, 0.130, 0.145, 0.155, 0.160, 0.198, 0.140],
    [0.098, 0.110, 0.152, 0.205, 0.232, 0.252, 0.270, 0.286, 0.298, 0.310, 0.385, 0.335],
    [0.048, 0.055, 0.074, 0.098, 0.114, 0.130, 0.144, 0.155, 0.164, 0.175, 0.232, 0.192],
    [0.048, 0.042, 0.036, 0.018, 0.013, 0.009, 0.008, 0.006, 0.005, 0.004, 0.002, 0.001],
    [0.056, 0.062, 0.085, 0.066, 0.055, 0.028, 0.022, 0.019, 0.016, 0.011, 0.004, 0.002],
    [0.168, 0.180, 0.200, 0.212, 0.220, 0.226, 0.232, 0.238, 0.242, 0.246, 0.262, 0.232],
    [0.058, 0.064, 0.074, 0.084, 0.090, 0.095, 0.100, 0.105, 0.108, 0.110, 0.130, 0.120],
    [0.068, 0.074, 0.094, 0.198, 0.258, 0.288, 0.306, 0.318, 0.326, 0.330, 0.382, 0.302],
    [0.222, 0.240, 0.258, 0.268, 0.274, 0.280, 0.284, 0.288, 0.290, 0.290, 0.262, 0.220],
    [0.930, 0.935, 0.925, 0.895, 0.872, 0.852, 0.830, 0.800, 0.782, 0.700, 0.080, 0.050],
    [0.700, 0.720, 0.700, 0.632, 0.600, 0.552, 0.502, 0.452, 0.430, 0.380, 0.040, 0.030],
]
# fmt: on

#: Endmember spectra, shape (N_ENDMEMBERS, 12), surface reflectance.
ENDMEMBERS: Final[F32] = np.array(_TABLE, dtype=np.float32)

#: Top-of-atmosphere reflectance of a thick water cloud: flat and bright in the
#: visible and NIR, still bright at 1.6 um (unlike snow), lower at 2.2 um, and
#: brighter than the ground at B09 because it sits above most of the water vapour.
CLOUD_TOA: Final[F32] = np.array(
    [0.720, 0.705, 0.700, 0.695, 0.692, 0.690, 0.688, 0.684, 0.680, 0.560, 0.480, 0.330],
    dtype=np.float32,
)

#: Share of the irradiance that is diffuse skylight, per band: what a cloud
#: shadow still receives (skylight is blue-rich, so shadows darken least in blue).
DIFFUSE_SHARE: Final[F32] = np.array(
    [0.52, 0.46, 0.36, 0.28, 0.25, 0.23, 0.21, 0.19, 0.19, 0.19, 0.12, 0.10], dtype=np.float32
)

#: Small per-band radiometric differences between the two MSI instruments.
SATELLITE_GAIN: Final[dict[str, F32]] = {
    "S2A": np.ones(N_BANDS, dtype=np.float32),
    "S2B": np.array(
        [1.012, 0.995, 1.003, 1.006, 0.992, 1.000, 1.002, 1.010, 0.996, 1.004, 0.986, 1.008],
        dtype=np.float32,
    ),
}

#: Sensor noise: a floor in reflectance and a share of the signal, per band.
NOISE_FLOOR: Final[F32] = np.array(
    [
        0.0012,
        0.0014,
        0.0011,
        0.0011,
        0.0009,
        0.0009,
        0.0009,
        0.0014,
        0.0009,
        0.0016,
        0.0008,
        0.0008,
    ],
    dtype=np.float32,
)
NOISE_GAIN: Final = np.float32(0.004)


def endmember_spectra(weights: F32) -> F32:
    """Mix endmembers: ``weights`` (n, N_ENDMEMBERS) -> reflectance (n, 12).

    Args:
        weights: Areal fractions of each endmember per row; rows need not sum to 1
            (canopy shading and gaps make them a little less).

    Raises:
        ValueError: ``weights`` is not (n, N_ENDMEMBERS).
    """
    if weights.ndim != 2 or weights.shape[1] != N_ENDMEMBERS:
        raise ValueError(f"weights must be (n, {N_ENDMEMBERS}), not {weights.shape}")
    return (weights @ ENDMEMBERS).astype(np.float32, copy=False)
