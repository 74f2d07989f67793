"""Cloud masks from SCL and MSK_CLASSI arrays: hand-made arrays, no I/O."""

from __future__ import annotations

import numpy as np
import pytest

from revisit.ingest import cloud


def test_scl_cloud_classes_are_shadow_medium_high_and_cirrus() -> None:
    scl = np.arange(12, dtype=np.uint8)
    mask = cloud.scl_cloud_mask(scl)
    assert mask.dtype == np.bool_
    assert np.flatnonzero(mask).tolist() == [3, 8, 9, 10]


def test_scl_cloud_mask_keeps_shape() -> None:
    scl = np.array([[4, 9], [3, 0]], dtype=np.uint8)
    assert cloud.scl_cloud_mask(scl).tolist() == [[False, True], [True, False]]


def test_snow_water_dark_area_and_unclassified_are_not_cloud() -> None:
    scl = np.array(
        [cloud.SCL_SNOW, cloud.SCL_WATER, cloud.SCL_DARK_AREA, cloud.SCL_UNCLASSIFIED],
        dtype=np.uint8,
    )
    assert not cloud.scl_cloud_mask(scl).any()


def test_scl_nodata_is_class_zero() -> None:
    scl = np.array([0, 1, 4, 0], dtype=np.uint8)
    assert cloud.scl_nodata_mask(scl).tolist() == [True, False, False, True]


def test_scl_must_be_integer() -> None:
    with pytest.raises(ValueError, match="integer"):
        cloud.scl_cloud_mask(np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match="integer"):
        cloud.scl_nodata_mask(np.zeros(3, dtype=np.float32))


def test_classi_mask_flags_opaque_or_cirrus() -> None:
    opaque = np.array([[1, 0], [0, 0]], dtype=np.uint8)
    cirrus = np.array([[0, 1], [0, 255]], dtype=np.uint8)
    assert cloud.classi_cloud_mask(opaque, cirrus).tolist() == [[True, True], [False, True]]


def test_classi_shapes_must_match() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        cloud.classi_cloud_mask(np.zeros((2, 2), np.uint8), np.zeros((3, 3), np.uint8))


def test_cloud_fraction_counts_only_valid_pixels() -> None:
    # 4x4: left half cloud; top row nodata.
    scl = np.full((4, 4), cloud.SCL_VEGETATION, dtype=np.uint8)
    scl[:, :2] = cloud.SCL_CLOUD_HIGH
    scl[0, :] = cloud.SCL_NO_DATA
    valid = ~cloud.scl_nodata_mask(scl)
    assert cloud.valid_fraction(valid) == pytest.approx(12 / 16)
    assert cloud.cloud_fraction(cloud.scl_cloud_mask(scl), valid) == pytest.approx(6 / 12)


def test_cloud_outside_valid_pixels_does_not_count() -> None:
    cloudy = np.ones((2, 2), dtype=bool)
    valid = np.array([[True, False], [False, False]])
    assert cloud.cloud_fraction(cloudy, valid) == 1.0
    assert cloud.cloud_fraction(np.zeros((2, 2), bool), valid) == 0.0


def test_no_valid_pixel_means_no_cloud() -> None:
    assert cloud.cloud_fraction(np.ones((3, 3), bool), np.zeros((3, 3), bool)) == 0.0
    assert cloud.valid_fraction(np.zeros((3, 3), bool)) == 0.0
    assert cloud.valid_fraction(np.zeros((0,), bool)) == 0.0


def test_cloud_fraction_shapes_must_match() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        cloud.cloud_fraction(np.zeros((2, 2), bool), np.zeros((2, 3), bool))
