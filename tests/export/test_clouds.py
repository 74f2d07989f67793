"""Cloud masks for pair change maps, on real products and on small GeoTIFFs made here.

Real data (``../shared/data``): the Level-2A SAFE of tile T29UNU (60 m JP2s, a
20 m and a 60 m SCL, an MSK_CLASSI_B00; quite cloudy) and OSCD band folders
(Level-1C, 13 single-band GeoTIFFs, EPSG:4326): rennes ``imgs_1`` is clear,
paris ``imgs_2`` has two small cumulus clouds.
"""

from __future__ import annotations

import itertools
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

from revisit.errors import ExportError
from revisit.export.clouds import CloudDetector, cloud_detector, cloud_mask, find_b10
from revisit.ingest.cloud import (
    SCL_CLOUD_HIGH,
    SCL_CLOUD_SHADOW,
    SCL_VEGETATION,
    classi_cloud_mask,
    scl_cloud_mask,
)
from revisit.ingest.sources.local import LocalSource
from revisit.ingest.sources.rasters import BandFile, CloudMask, Product
from revisit.types import CANONICAL_BANDS
from tests.conftest import SHARED_DATA

SAFE = (
    SHARED_DATA
    / "s2_l2a_safe_T29UNU"
    / "S2A_MSIL2A_20221005T115411_N0400_R023_T29UNU_20221005T164454.SAFE"
)
OSCD = SHARED_DATA / "oscd" / "images"

needs_safe = pytest.mark.skipif(not SAFE.is_dir(), reason=f"no L2A SAFE at {SAFE}")
needs_oscd = pytest.mark.skipif(not OSCD.is_dir(), reason=f"no OSCD data at {OSCD}")

#: Top-of-atmosphere DN of a thick, bright cloud, per band (B10: a high one).
CLOUD_DN = {
    "B01": 5500, "B02": 6000, "B03": 6000, "B04": 6200, "B05": 6200, "B06": 6300, "B07": 6400,
    "B08": 6500, "B8A": 6500, "B09": 2500, "B10": 400, "B11": 5500, "B12": 4500,
}  # fmt: skip


def _product(root: Path) -> Product:
    rejected: list[str] = []
    products = list(LocalSource(root).products(lambda _ref, reason, _d: rejected.append(reason)))
    assert len(products) == 1, (products, rejected)
    return products[0]


def _grid(path: Path) -> tuple[CRS, Affine, int, int]:
    with rasterio.open(path) as ds:
        return ds.crs, ds.transform, ds.width, ds.height


def _whole(product: Product, detector: CloudDetector) -> npt.NDArray[np.bool_]:
    """The mask on the product's own B02 grid, in one window."""
    crs, transform, width, height = _grid(product.bands["B02"].path)
    mask = cloud_mask(product, detector, crs=crs, transform=transform, width=width, height=height)
    assert mask is not None
    assert mask.shape == (height, width)
    assert mask.dtype == np.bool_
    return mask


def _copy_band_folder(city: str, date: str, dest: Path, *, skip: str | None = None) -> Path:
    """A copy of an OSCD band folder (and its dates.txt), without band ``skip``."""
    folder = dest / city / date
    folder.mkdir(parents=True)
    shutil.copy(OSCD / city / "dates.txt", dest / city / "dates.txt")
    for path in (OSCD / city / date).glob("*.tif"):
        if skip is None or not path.name.endswith(f"_{skip}.tif"):
            shutil.copy(path, folder / path.name)
            (folder / path.name).chmod(0o644)
    return folder


# -- SCL and MSK_CLASSI on the real Level-2A SAFE --------------------------------------------


@needs_safe
def test_the_l2a_safe_is_masked_by_its_scl_nearest_neighbour() -> None:
    product = _product(SAFE)
    detector = cloud_detector(product)
    assert detector.kind == "scl"
    assert "SCL classes 3, 8, 9, 10" in detector.detail
    assert product.cloud_mask is not None
    scl_path = product.cloud_mask.file.path
    assert scl_path.name.endswith("_SCL_20m.jp2")  # the finest SCL of the folder
    crs, scl_transform, _, _ = _grid(scl_path)
    # A 10 m window aligned with the 20 m SCL: each SCL pixel is 2 x 2 window pixels.
    col, row = 2000, 1500
    transform = scl_transform @ Affine.translation(col, row) @ Affine.scale(0.5)
    mask = cloud_mask(product, detector, crs=crs, transform=transform, width=512, height=512)
    with rasterio.open(scl_path) as ds:
        scl = ds.read(1, window=Window(col, row, 256, 256))
    expected = np.repeat(np.repeat(scl_cloud_mask(scl), 2, axis=0), 2, axis=1)
    assert mask is not None
    np.testing.assert_array_equal(mask, expected)
    assert mask.mean() > 0.3  # a cloudy product (60 % cloud cover in its metadata)


@needs_safe
def test_a_60m_window_on_the_60m_scl_matches_it_exactly() -> None:
    product = _product(SAFE)
    scl60 = next((SAFE / "GRANULE").glob("*/IMG_DATA/R60m/*_SCL_60m.jp2"))
    product = replace(product, cloud_mask=CloudMask("scl", BandFile(scl60)))
    detector = cloud_detector(product)
    crs, transform60, width, height = _grid(scl60)
    with rasterio.open(scl60) as ds:
        scl = ds.read(1)
    mask = cloud_mask(product, detector, crs=crs, transform=transform60, width=width, height=height)
    assert mask is not None
    np.testing.assert_array_equal(mask, scl_cloud_mask(scl))
    assert 0.4 < mask.mean() < 0.95
    assert (scl == SCL_CLOUD_SHADOW).any() and mask[scl == SCL_CLOUD_SHADOW].all()


@needs_safe
def test_msk_classi_gives_opaque_clouds_and_cirrus_and_says_no_shadows() -> None:
    classi = next((SAFE / "GRANULE").glob("*/QI_DATA/MSK_CLASSI_B00.jp2"))
    product = replace(_product(SAFE), cloud_mask=CloudMask("classi", BandFile(classi)))
    detector = cloud_detector(product)
    assert detector.kind == "classi"
    assert "no cloud shadows" in detector.detail
    crs, transform, _, _ = _grid(classi)
    col, row = 600, 900
    window = transform @ Affine.translation(col, row)
    mask = cloud_mask(product, detector, crs=crs, transform=window, width=300, height=200)
    with rasterio.open(classi) as ds:
        opaque, cirrus = ds.read([1, 2], window=Window(col, row, 300, 200))
    assert mask is not None
    np.testing.assert_array_equal(mask, classi_cloud_mask(opaque, cirrus))
    assert mask.any()


# -- a small multi-band GeoTIFF with an SCL band ---------------------------------------------


def _write_multiband(path: Path, scl: npt.NDArray[np.uint8]) -> tuple[CRS, Affine]:
    crs = CRS.from_epsg(32631)
    transform = Affine(10.0, 0.0, 499_980.0, 0.0, -10.0, 5_400_000.0)
    height, width = scl.shape
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": len(CANONICAL_BANDS) + 1,
        "dtype": "uint16",
        "crs": crs,
        "transform": transform,
    }
    with rasterio.open(path, "w", **profile) as ds:
        for i, band in enumerate((*CANONICAL_BANDS, "SCL"), 1):
            data = scl if band == "SCL" else np.full(scl.shape, 1000)
            ds.write(data.astype(np.uint16), i)
            ds.set_band_description(i, band)
        ds.update_tags(ACQUISITIONDATE="2021-06-01T10:30:00Z", PROCESSING_LEVEL="Level-2A")
    return crs, transform


def test_a_window_partly_outside_the_product_is_clear_outside(tmp_path: Path) -> None:
    scl = np.full((60, 80), SCL_VEGETATION, dtype=np.uint8)
    scl[:, 40:] = SCL_CLOUD_HIGH
    scl[50:, :] = SCL_CLOUD_SHADOW
    crs, transform = _write_multiband(tmp_path / "S2B_MSIL2A_20210601_T31UDQ.tif", scl)
    product = _product(tmp_path)
    assert product.kind == "multiband"
    detector = cloud_detector(product)
    assert detector.kind == "scl"
    # 30 pixels left of and 20 above the product, reaching 10 pixels past its right edge.
    window = transform @ Affine.translation(-30, -20)
    mask = cloud_mask(product, detector, crs=crs, transform=window, width=120, height=100)
    assert mask is not None
    expected = np.zeros((100, 120), dtype=bool)
    expected[20:80, 30:110] = scl_cloud_mask(scl)
    np.testing.assert_array_equal(mask, expected)
    # And a window wholly outside it.
    away = transform @ Affine.translation(500, 500)
    mask = cloud_mask(product, detector, crs=crs, transform=away, width=64, height=64)
    assert mask is not None
    assert not mask.any()


# -- s2cloudless on OSCD band folders ---------------------------------------------------------


@needs_oscd
def test_a_clear_oscd_image_has_almost_no_cloud() -> None:
    product = _product(OSCD / "rennes" / "imgs_1")
    assert product.cloud_mask is None
    detector = cloud_detector(product)
    assert detector.kind == "s2cloudless"
    assert "no cloud shadows" in detector.detail
    assert detector.b10 is not None
    assert detector.b10.path.name.endswith("_B10.tif")
    assert detector.b10 == find_b10(product)
    assert _whole(product, detector).mean() < 0.01


@needs_oscd
def test_the_real_cumulus_clouds_of_paris_are_found() -> None:
    product = _product(OSCD / "paris" / "imgs_2")
    detector = cloud_detector(product)
    mask = _whole(product, detector)
    assert 0.02 < mask.mean() < 0.15
    with rasterio.open(product.bands["B02"].path) as ds:
        blue = ds.read(1)
    assert mask[46, 340]  # the brightest pixel of the upper-right cumulus
    assert mask[blue > 2500].mean() > 0.8  # most very bright pixels are cloud (some are roofs)


@needs_oscd
def test_a_bright_rectangle_pasted_into_a_clear_image_is_detected(tmp_path: Path) -> None:
    folder = _copy_band_folder("rennes", "imgs_1", tmp_path)
    _, _, width, height = _grid(next(folder.glob("*_B02.tif")))
    top, left, bottom, right = 120, 240, 240, 400  # 10 m pixels: 1.2 km x 1.6 km
    for path in folder.glob("*.tif"):
        band = path.name[-7:-4]
        with rasterio.open(path, "r+") as ds:
            data = ds.read(1)
            sy, sx = ds.height / height, ds.width / width
            rows = slice(round(top * sy), round(bottom * sy))
            cols = slice(round(left * sx), round(right * sx))
            data[rows, cols] = CLOUD_DN[band]
            ds.write(data, 1)
    product = _product(folder)
    detector = cloud_detector(product)
    assert detector.kind == "s2cloudless"
    mask = _whole(product, detector)
    assert mask[top:bottom, left:right].mean() > 0.95
    # Averaging and dilation reach a few hundred metres out; beyond them it stays clear.
    outside = np.ones_like(mask)
    outside[top - 60 : bottom + 60, left - 60 : right + 60] = False
    assert mask[outside].mean() < 0.01


@needs_oscd
def test_windows_agree_with_one_pass_over_the_whole_image() -> None:
    product = _product(OSCD / "paris" / "imgs_2")
    detector = cloud_detector(product)
    whole = _whole(product, detector)
    crs, transform, width, height = _grid(product.bands["B02"].path)
    assembled = np.zeros_like(whole)
    rows, cols = (0, 157, height), (0, 201, width)  # not multiples of the 6-pixel blocks
    for r0, r1 in itertools.pairwise(rows):
        for c0, c1 in itertools.pairwise(cols):
            part = cloud_mask(
                product,
                detector,
                crs=crs,
                transform=transform @ Affine.translation(c0, r0),
                width=c1 - c0,
                height=r1 - r0,
            )
            assert part is not None
            assembled[r0:r1, c0:c1] = part
    np.testing.assert_array_equal(assembled, whole)


@needs_oscd
def test_an_s2cloudless_window_partly_outside_is_clear_outside() -> None:
    product = _product(OSCD / "paris" / "imgs_2")
    detector = cloud_detector(product)
    whole = _whole(product, detector)
    crs, transform, width, _ = _grid(product.bands["B02"].path)
    # The upper-right cumulus lies near the top edge: a window reaching 100 pixels beyond it.
    window = transform @ Affine.translation(width - 150, -100)
    mask = cloud_mask(product, detector, crs=crs, transform=window, width=250, height=300)
    assert mask is not None
    assert not mask[:100, :].any()
    assert not mask[:, 150:].any()
    inside = whole[:200, width - 150 :]
    assert inside.any()
    np.testing.assert_array_equal(mask[100:, :150], inside)


@needs_oscd
def test_no_mask_and_no_b10_means_no_detector(tmp_path: Path) -> None:
    product = _product(_copy_band_folder("rennes", "imgs_1", tmp_path, skip="B10"))
    assert find_b10(product) is None
    detector = cloud_detector(product)
    assert detector.kind == "none"
    assert "B10" in detector.detail
    crs, transform, width, height = _grid(product.bands["B02"].path)
    assert (
        cloud_mask(product, detector, crs=crs, transform=transform, width=width, height=height)
        is None
    )


# -- unreadable files -------------------------------------------------------------------------


@needs_safe
def test_an_unreadable_scl_raises_an_export_error(tmp_path: Path) -> None:
    garbage = tmp_path / "T29UNU_20221005T115411_SCL_20m.jp2"
    garbage.write_bytes(b"\x00\x00\x00\x0cjP  " + b"not a codestream" * 8)
    product = replace(_product(SAFE), cloud_mask=CloudMask("scl", BandFile(garbage)))
    with pytest.raises(ExportError, match=r"cannot read the SCL cloud mask .*SCL_20m\.jp2"):
        cloud_detector(product)
    missing = replace(product, cloud_mask=CloudMask("scl", BandFile(tmp_path / "gone.jp2")))
    with pytest.raises(ExportError, match=r"gone\.jp2: no such file"):
        cloud_detector(missing)


@needs_oscd
def test_an_unreadable_b10_raises_an_export_error(tmp_path: Path) -> None:
    folder = _copy_band_folder("rennes", "imgs_1", tmp_path)
    b10 = next(folder.glob("*_B10.tif"))
    b10.write_bytes(b10.read_bytes()[:100])  # truncated
    product = _product(folder)
    with pytest.raises(ExportError, match=r"cannot read the B10 band .*_B10\.tif"):
        cloud_detector(product)
