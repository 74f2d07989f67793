"""Cloud masks from Sentinel-2 classification layers.

Pure: arrays in, arrays out, no I/O. Two layers are understood:

- the Level-2A scene classification (SCL), one class per pixel;
- the Level-1C ``MSK_CLASSI_B00`` mask of processing baseline 04.00 and later,
  whose first band flags opaque clouds and second band cirrus.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

#: SCL classes (Sen2Cor), for reference and for tests.
SCL_NO_DATA = 0
SCL_SATURATED_OR_DEFECTIVE = 1
SCL_DARK_AREA = 2
SCL_CLOUD_SHADOW = 3
SCL_VEGETATION = 4
SCL_NOT_VEGETATED = 5
SCL_WATER = 6
SCL_UNCLASSIFIED = 7
SCL_CLOUD_MEDIUM = 8
SCL_CLOUD_HIGH = 9
SCL_THIN_CIRRUS = 10
SCL_SNOW = 11

#: The SCL classes counted as cloud or cloud shadow.
SCL_CLOUD_CLASSES: tuple[int, ...] = (
    SCL_CLOUD_SHADOW,
    SCL_CLOUD_MEDIUM,
    SCL_CLOUD_HIGH,
    SCL_THIN_CIRRUS,
)

BoolArray = npt.NDArray[np.bool_]


def scl_cloud_mask(scl: npt.NDArray[np.integer]) -> BoolArray:
    """Pixels an SCL layer classes as cloud or cloud shadow (3, 8, 9, 10).

    Args:
        scl: Scene classification, any shape, integer classes 0 to 11.

    Returns:
        A boolean array of the same shape, True where cloud or shadow.

    Raises:
        ValueError: ``scl`` is not an integer array.
    """
    scl = np.asarray(scl)
    if not np.issubdtype(scl.dtype, np.integer):
        raise ValueError(f"SCL must be an integer array, not {scl.dtype}")
    return np.asarray(np.isin(scl, SCL_CLOUD_CLASSES), dtype=np.bool_)


def scl_nodata_mask(scl: npt.NDArray[np.integer]) -> BoolArray:
    """Pixels an SCL layer marks as having no data (class 0).

    Raises:
        ValueError: ``scl`` is not an integer array.
    """
    scl = np.asarray(scl)
    if not np.issubdtype(scl.dtype, np.integer):
        raise ValueError(f"SCL must be an integer array, not {scl.dtype}")
    return np.asarray(scl == SCL_NO_DATA, dtype=np.bool_)


def classi_cloud_mask(
    opaque: npt.NDArray[np.integer], cirrus: npt.NDArray[np.integer]
) -> BoolArray:
    """Cloud pixels of a Level-1C ``MSK_CLASSI_B00`` mask: opaque cloud or cirrus.

    Args:
        opaque: The mask's first band (non-zero: opaque cloud).
        cirrus: The mask's second band (non-zero: cirrus).

    Returns:
        A boolean array, True where either band is set.

    Raises:
        ValueError: The two bands differ in shape.
    """
    opaque = np.asarray(opaque)
    cirrus = np.asarray(cirrus)
    if opaque.shape != cirrus.shape:
        raise ValueError(f"opaque {opaque.shape} and cirrus {cirrus.shape} masks differ in shape")
    return np.asarray((opaque != 0) | (cirrus != 0), dtype=np.bool_)


def valid_fraction(valid: BoolArray) -> float:
    """Share of True pixels in a validity mask (0.0 for an empty one)."""
    valid = np.asarray(valid, dtype=bool)
    if valid.size == 0:
        return 0.0
    return float(np.count_nonzero(valid)) / valid.size


def cloud_fraction(cloud: BoolArray, valid: BoolArray) -> float:
    """Share of the valid pixels that are cloud or shadow.

    Args:
        cloud: True where cloud or cloud shadow.
        valid: True where the pixel has data.

    Returns:
        Between 0 and 1; 0.0 when no pixel is valid.

    Raises:
        ValueError: The masks differ in shape.
    """
    cloud = np.asarray(cloud, dtype=bool)
    valid = np.asarray(valid, dtype=bool)
    if cloud.shape != valid.shape:
        raise ValueError(f"cloud {cloud.shape} and valid {valid.shape} masks differ in shape")
    n_valid = np.count_nonzero(valid)
    if n_valid == 0:
        return 0.0
    return float(np.count_nonzero(cloud & valid)) / float(n_valid)
