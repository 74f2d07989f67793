"""The local source on real Sentinel-2 files: OSCD band folders, an L2A SAFE, GeoTIFFs.

Tests that need ``../shared/data`` skip when it is absent. Bad inputs are made in
``tmp_path`` by copying (or linking) real files and then breaking them.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import rasterio
from pyproj import Transformer
from rasterio.enums import Resampling
from rasterio.warp import reproject
from rasterio.windows import Window
from shapely.geometry import Polygon, box
from shapely.geometry.base import BaseGeometry

from revisit.config import load_settings
from revisit.errors import ConfigError, SceneRejectedError
from revisit.grid import ChipGrid, chip_grid_for
from revisit.ingest import reasons
from revisit.ingest.sources.local import LocalSource, product_footprint
from revisit.types import CANONICAL_BANDS, Chip, LocationRef, Rejection, SceneRef

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
OSCD = SHARED_DATA / "oscd" / "images"
SAFE_NAME = "S2A_MSIL2A_20221005T115411_N0400_R023_T29UNU_20221005T164454"
SAFE = SHARED_DATA / "s2_l2a_safe_T29UNU" / f"{SAFE_NAME}.SAFE"
CITIES = ("aguasclaras", "bercy", "paris", "rennes")
WORLD = box(-180, -90, 180, 90)
NOW = datetime.now(UTC)

needs_oscd = pytest.mark.skipif(not OSCD.is_dir(), reason=f"OSCD data not found at {OSCD}")
needs_safe = pytest.mark.skipif(not SAFE.is_dir(), reason=f"L2A SAFE not found at {SAFE}")

Rejected = list[tuple[str, str, str]]


def search(
    root: Path, area: BaseGeometry = WORLD, since: datetime | None = None
) -> tuple[list[SceneRef], Rejected]:
    rejected: Rejected = []
    scenes = list(
        LocalSource(root).search(
            since=since,
            until=NOW,
            area=area,
            on_rejected=lambda ref, reason, detail: rejected.append((ref, reason, detail)),
        )
    )
    return scenes, rejected


def location(i: int, lon: float, lat: float, size: int = 64) -> LocationRef:
    return LocationRef(id=i, lon=lon, lat=lat, grid=chip_grid_for(lon, lat, size=size))


def read(
    root: Path, scene: SceneRef, locations: list[LocationRef]
) -> dict[int | None, Chip | Rejection]:
    out = {item.location_id: item for item in LocalSource(root).read(scene, locations)}
    assert sorted(i for i in out if i is not None) == sorted(loc.id for loc in locations)
    return out


def chip(item: Chip | Rejection | None) -> Chip:
    assert isinstance(item, Chip), item
    return item


def reasons_of(rejected: Rejected) -> set[str]:
    return {reason for _, reason, _ in rejected}


# -- OSCD band folders -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def oscd() -> dict[str, SceneRef]:
    if not OSCD.is_dir():
        pytest.skip(f"OSCD data not found at {OSCD}")
    scenes, rejected = search(OSCD)
    assert rejected == []
    return {scene.product_id: scene for scene in scenes}


def dates_txt(city: str) -> dict[str, str]:
    lines = (OSCD / city / "dates.txt").read_text().splitlines()
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}


@needs_oscd
def test_oscd_finds_every_city_and_date_in_order(oscd: dict[str, SceneRef]) -> None:
    assert sorted(oscd) == sorted(f"{c}/imgs_{n}" for c in CITIES for n in (1, 2))
    times = [s.acquired_at for s in oscd.values()]
    assert times == sorted(times)
    for city in CITIES:
        dates = dates_txt(city)
        for n in (1, 2):
            scene = oscd[f"{city}/imgs_{n}"]
            assert scene.source == "local"
            assert scene.acquired_at.tzinfo is not None
            assert scene.acquired_at.strftime("%Y%m%d") == dates[f"date_{n}"]
            assert scene.level == "L1C"
            assert scene.tile_id is not None and scene.tile_id.startswith("T")
            b02 = next((OSCD / city / f"imgs_{n}").glob("*_B02.tif"))
            with rasterio.open(b02) as ds:
                assert scene.footprint.equals(box(*ds.bounds))
            assert scene.extra["kind"] == "band-folder"
            assert set(scene.extra["bands"]) == set(CANONICAL_BANDS)


@needs_oscd
def test_oscd_product_ids_are_relative_to_the_root(oscd: dict[str, SceneRef]) -> None:
    scenes, _ = search(OSCD.parent.parent, area=box(2.3, 48.8, 2.4, 48.9))
    assert [s.product_id for s in scenes] == [
        "oscd/images/bercy/imgs_1",
        "oscd/images/paris/imgs_1",
        "oscd/images/bercy/imgs_2",
        "oscd/images/paris/imgs_2",
    ]


@needs_oscd
def test_search_filters_by_time_and_area() -> None:
    scenes, _ = search(
        OSCD, area=box(-1.7, 48.0, -1.6, 48.2), since=datetime(2016, 1, 1, tzinfo=UTC)
    )
    assert [s.product_id for s in scenes] == ["rennes/imgs_2"]
    rejected: Rejected = []
    until = datetime(2016, 11, 30, tzinfo=UTC)  # bercy/paris imgs_1 are dated 00:00 that day
    got = LocalSource(OSCD).search(
        since=None, until=until, area=WORLD, on_rejected=lambda *a: rejected.append(a)
    )
    assert [s.product_id for s in got] == [
        "rennes/imgs_1",
        "aguasclaras/imgs_1",
        "bercy/imgs_1",
        "paris/imgs_1",
    ]


def interior_points(footprint: BaseGeometry) -> list[tuple[float, float]]:
    minx, miny, maxx, maxy = footprint.bounds
    return [
        (minx + (maxx - minx) * fx, miny + (maxy - miny) * fy)
        for fx, fy in ((0.5, 0.5), (0.3, 0.3), (0.7, 0.6))
    ]


@needs_oscd
@pytest.mark.parametrize("city", CITIES)
def test_oscd_chips(oscd: dict[str, SceneRef], city: str) -> None:
    first, second = oscd[f"{city}/imgs_1"], oscd[f"{city}/imgs_2"]
    minx, miny, _, maxy = first.footprint.bounds
    points = interior_points(first.footprint)
    locations = [location(i, lon, lat) for i, (lon, lat) in enumerate(points)]
    edge = location(10, minx, (miny + maxy) / 2)
    outside = location(11, minx - 0.5, (miny + maxy) / 2)
    locations += [edge, outside]
    chips = {n: read(OSCD, scene, locations) for n, scene in ((1, first), (2, second))}
    for n in (1, 2):
        for loc in locations[:3]:
            c = chip(chips[n][loc.id])
            assert c.data.shape == (12, 64, 64)
            assert c.data.dtype == np.uint16
            assert c.grid == loc.grid
            assert c.valid_fraction == 1.0
            assert c.cloud_fraction == 0.0  # OSCD has no cloud mask
            means = c.data.reshape(12, -1).mean(axis=1)
            assert (means > 100).all() and (means < 6000).all(), means
            assert c.data.min() > 0
        edge_chip = chip(chips[n][edge.id])
        assert 0.3 < edge_chip.valid_fraction < 0.7
        assert (edge_chip.data[:, :, 0] == 0).all()  # the western column is off the image
        rejection = chips[n][outside.id]
        assert isinstance(rejection, Rejection)
        assert rejection.reason == reasons.NOT_COVERED
        assert f"{city}/imgs_{n}" in rejection.detail
    # Same grid on both dates, and the same place: the NIR images correlate.
    for loc in locations[:3]:
        a, b = chip(chips[1][loc.id]), chip(chips[2][loc.id])
        assert a.grid == b.grid == loc.grid
        nir = np.corrcoef(a.data[7].ravel().astype(float), b.data[7].ravel().astype(float))[0, 1]
        assert nir > 0.3


@needs_oscd
def test_oscd_ten_metre_band_is_the_source_pixel_resampled(oscd: dict[str, SceneRef]) -> None:
    scene = oscd["bercy/imgs_1"]
    lon, lat = scene.footprint.centroid.x, scene.footprint.centroid.y
    loc = location(0, lon, lat)
    c = chip(read(OSCD, scene, [loc])[0])
    b04 = next((OSCD / "bercy" / "imgs_1").glob("*_B04.tif"))
    with rasterio.open(b04) as ds:
        expected = np.zeros((64, 64), np.float32)
        reproject(
            ds.read(1).astype(np.float32),
            expected,
            src_transform=ds.transform,
            src_crs=ds.crs,
            dst_transform=loc.grid.transform,
            dst_crs=loc.grid.crs,
            resampling=Resampling.bilinear,
        )
    assert np.abs(c.data[3].astype(float) - np.rint(expected)).max() <= 1


# -- the L2A SAFE ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def safe_scene() -> SceneRef:
    if not SAFE.is_dir():
        pytest.skip(f"L2A SAFE not found at {SAFE}")
    scenes, rejected = search(SAFE.parent)
    assert rejected == []
    assert len(scenes) == 1
    return scenes[0]


def safe_band(name: str) -> Path:
    return next(SAFE.glob(f"GRANULE/*/IMG_DATA/R60m/*_{name}_60m.jp2"))


@needs_safe
def test_safe_metadata(safe_scene: SceneRef) -> None:
    assert safe_scene.product_id == SAFE_NAME
    assert safe_scene.level == "L2A"
    assert safe_scene.processing_baseline == "04.00"
    assert safe_scene.tile_id == "T29UNU"
    assert safe_scene.acquired_at == datetime(2022, 10, 5, 11, 54, 11, 24000, tzinfo=UTC)
    assert safe_scene.cloud_cover == pytest.approx(59.769726)
    assert {b["offset"] for b in safe_scene.extra["bands"].values()} == {-1000}
    # Only the 60 m folder is there: every band from R60m, B08 stood in for by B8A.
    assert all("/R60m/" in b["file"] for b in safe_scene.extra["bands"].values())
    assert safe_scene.extra["substitutions"] == {"B08": "B8A"}
    assert safe_scene.extra["cloud_mask"]["file"].endswith("SCL_20m.jp2")
    minx, miny, maxx, maxy = safe_scene.footprint.bounds
    assert (minx, maxx) == pytest.approx((-9.000305, -7.7604675))
    assert (miny, maxy) == pytest.approx((52.25776, 53.24963), abs=1e-4)
    assert product_footprint(SAFE).equals(safe_scene.footprint)


def utm_point(x: float, y: float) -> tuple[float, float]:
    lon, lat = Transformer.from_crs(32629, 4326, always_xy=True).transform(x, y)
    return lon, lat


@needs_safe
def test_safe_offset_is_removed(safe_scene: SceneRef) -> None:
    # A 600 m chip aligned on the 60 m grid: it covers exactly 10 x 10 source pixels.
    col, row = 900, 900
    minx, maxy = 499980 + 60 * col, 5900040 - 60 * row
    grid = ChipGrid(epsg=32629, minx=minx, maxy=maxy, size=60)
    lon, lat = utm_point(minx + 300, maxy - 300)
    c = chip(read(SAFE.parent, safe_scene, [LocationRef(0, lon, lat, grid)])[0])
    assert c.data.shape == (12, 60, 60) and c.grid.resolution == 10
    for i, name in enumerate(CANONICAL_BANDS):
        path = safe_band("B8A" if name == "B08" else name)
        with rasterio.open(path) as ds:
            raw = ds.read(1, window=Window(col - 1, row - 1, 12, 12)).astype(np.float32)
        # Independently: the raw DN, resampled the same way, minus 1000.
        expected = np.zeros((60, 60), np.float32)
        reproject(
            raw,
            expected,
            src_transform=rasterio.Affine(60, 0, minx - 60, 0, -60, maxy + 60),
            src_crs="EPSG:32629",
            dst_transform=grid.transform,
            dst_crs=grid.crs,
            resampling=Resampling.bilinear,
        )
        assert np.abs(c.data[i] - np.clip(np.rint(expected) - 1000, 0, None)).max() <= 1, name
        # And the means agree with the raw pixels minus the offset.
        assert abs(c.data[i].mean() - (raw[1:11, 1:11].mean() - 1000)) < 50, name


@needs_safe
def test_safe_sixty_metre_bands_give_ten_metre_chips(safe_scene: SceneRef) -> None:
    lon, lat = safe_scene.footprint.centroid.x, safe_scene.footprint.centroid.y
    c = chip(read(SAFE.parent, safe_scene, [location(0, lon, lat)])[0])
    assert c.data.shape == (12, 64, 64) and c.grid.resolution == 10.0
    assert (c.data[CANONICAL_BANDS.index("B08")] == c.data[CANONICAL_BANDS.index("B8A")]).all()
    # Bilinear upsampling: values change inside a 60 m pixel, not only at its edges.
    assert len(np.unique(c.data[3, 10:16, 10:16])) > 1


def scl_blocks(classes: set[int]) -> Iterator[tuple[int, int]]:
    """Centres (col, row) in the 60 m SCL of 16 x 16 blocks entirely of ``classes``."""
    with rasterio.open(safe_band("SCL")) as ds:
        scl = ds.read(1)
    n = 16
    for row in range(0, scl.shape[0] - n, n):
        for col in range(0, scl.shape[1] - n, n):
            if np.isin(scl[row : row + n, col : col + n], list(classes)).all():
                yield col + n // 2, row + n // 2


@needs_safe
def test_safe_scl_cloud_fraction(safe_scene: SceneRef) -> None:
    cloudy = next(scl_blocks({8, 9}))
    clear = next(scl_blocks({4, 5}))
    locations = [
        location(i, *utm_point(499980 + 60 * col + 30, 5900040 - 60 * row - 30))
        for i, (col, row) in enumerate((cloudy, clear))
    ]
    chips = read(SAFE.parent, safe_scene, locations)
    assert chip(chips[0]).cloud_fraction > 0.9
    assert chip(chips[1]).cloud_fraction < 0.1
    assert chip(chips[0]).valid_fraction == chip(chips[1]).valid_fraction == 1.0


@needs_safe
def test_safe_location_outside_the_footprint_is_not_covered(safe_scene: SceneRef) -> None:
    out = read(SAFE.parent, safe_scene, [location(0, -6.0, 52.8), location(1, -8.5, 52.8)])
    assert isinstance(out[0], Rejection) and out[0].reason == reasons.NOT_COVERED
    assert SAFE_NAME in out[0].detail
    assert isinstance(out[1], Chip)


# -- a multi-band GeoTIFF --------------------------------------------------------------------


def write_multiband(
    folder: Path,
    target: Path,
    *,
    names: list[str] | None = None,
    crs: bool = True,
    tags: dict[str, str] | None = None,
) -> Path:
    """Stack an OSCD band folder onto its B02 grid as one GeoTIFF with band descriptions."""
    files = {p.name.rsplit("_", 1)[1][:-4]: p for p in folder.glob("*_B*.tif")}
    names = names or ["B1", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8a", "B09",
                      "B10", "B11", "B12"]  # fmt: skip
    with rasterio.open(files["B02"]) as ref:
        profile = ref.profile | {"count": len(names), "tiled": True, "blockxsize": 128,
                                 "blockysize": 128}  # fmt: skip
        shape = ref.shape
        if not crs:
            del profile["crs"], profile["transform"]
    with rasterio.open(target, "w", **profile) as dst:
        for i, name in enumerate(names, 1):
            source = files.get(f"B{name[1:].upper().zfill(2)}") or files["B02"]
            with rasterio.open(source) as ds:
                dst.write(ds.read(1, out_shape=shape, resampling=Resampling.bilinear), i)
            dst.set_band_description(i, name)
        dst.update_tags(**(tags or {}))
    return target


@needs_oscd
def test_multiband_geotiff_reads_like_its_band_folder(
    oscd: dict[str, SceneRef], tmp_path: Path
) -> None:
    write_multiband(
        OSCD / "bercy" / "imgs_1", tmp_path / "bercy.tif", tags={"ACQUISITIONDATE": "2016-11-30"}
    )
    scenes, rejected = search(tmp_path)
    assert rejected == []
    [scene] = scenes
    assert scene.product_id == "bercy.tif"
    assert scene.acquired_at == datetime(2016, 11, 30, tzinfo=UTC)
    assert scene.footprint.equals(oscd["bercy/imgs_1"].footprint)
    assert product_footprint(tmp_path / "bercy.tif").equals(scene.footprint)
    lon, lat = scene.footprint.centroid.x, scene.footprint.centroid.y
    loc = location(0, lon, lat)
    stacked = chip(read(tmp_path, scene, [loc])[0])
    folder = chip(read(OSCD, oscd["bercy/imgs_1"], [loc])[0])
    assert stacked.valid_fraction == 1.0
    for name in ("B02", "B03", "B04", "B08"):  # 10 m bands: the same pixels
        i = CANONICAL_BANDS.index(name)
        assert (stacked.data[i] == folder.data[i]).all(), name
    # Coarser bands went through one more resampling; they stay close.
    diff = np.abs(stacked.data.astype(float) - folder.data.astype(float)).mean(axis=(1, 2))
    assert (diff < 0.1 * folder.data.mean(axis=(1, 2))).all()


@needs_oscd
def test_multiband_date_from_file_name(tmp_path: Path) -> None:
    write_multiband(OSCD / "paris" / "imgs_2", tmp_path / "T31UDQ_20171107T105229_stack.tif")
    [scene], _ = search(tmp_path)
    assert scene.acquired_at == datetime(2017, 11, 7, 10, 52, 29, tzinfo=UTC)
    assert scene.tile_id == "T31UDQ"


# -- bad input -------------------------------------------------------------------------------


def copy_band_folder(city: str, n: int, dest: Path, *, dates: bool = True) -> Path:
    folder = dest / city / f"imgs_{n}"
    shutil.copytree(OSCD / city / f"imgs_{n}", folder)
    for path in folder.iterdir():
        path.chmod(0o644)
    folder.chmod(0o755)
    if dates:
        shutil.copy(OSCD / city / "dates.txt", dest / city / "dates.txt")
    return folder


def truncate(path: Path, fraction: float = 0.5) -> None:
    size = path.stat().st_size
    if path.is_symlink():
        target = path.resolve()
        path.unlink()
        shutil.copy(target, path)
    path.chmod(0o644)
    with path.open("r+b") as f:
        f.truncate(int(size * fraction))


@needs_oscd
def test_truncated_tiff_is_rejected_by_search(tmp_path: Path) -> None:
    folder = copy_band_folder("bercy", 1, tmp_path)
    truncate(next(folder.glob("*_B03.tif")))
    scenes, rejected = search(tmp_path)
    assert scenes == []
    [(ref, reason, detail)] = rejected
    assert (ref, reason) == ("bercy/imgs_1", reasons.CORRUPT_RASTER)
    assert "B03" in detail


@needs_oscd
def test_tiff_truncated_after_search_fails_the_read(tmp_path: Path) -> None:
    folder = copy_band_folder("bercy", 2, tmp_path)
    [scene], _ = search(tmp_path)
    truncate(next(folder.glob("*_B11.tif")), 0.3)
    lon, lat = scene.footprint.centroid.x, scene.footprint.centroid.y
    with pytest.raises(SceneRejectedError) as err:
        list(LocalSource(tmp_path).read(scene, [location(0, lon, lat)]))
    assert err.value.reason == reasons.CORRUPT_RASTER
    assert "bercy/imgs_2" in err.value.detail and "B11" in err.value.detail


@needs_oscd
def test_missing_band_is_wrong_band_count(tmp_path: Path) -> None:
    folder = copy_band_folder("paris", 1, tmp_path)
    next(folder.glob("*_B05.tif")).unlink()
    scenes, rejected = search(tmp_path)
    assert scenes == []
    assert [(r, why) for r, why, _ in rejected] == [("paris/imgs_1", reasons.WRONG_BAND_COUNT)]
    assert "B05" in rejected[0][2]


@needs_oscd
def test_doubled_band_is_wrong_band_count(tmp_path: Path) -> None:
    folder = copy_band_folder("paris", 1, tmp_path)
    b05 = next(folder.glob("*_B05.tif"))
    shutil.copy(b05, b05.with_suffix(".tiff"))
    _, rejected = search(tmp_path)
    assert reasons_of(rejected) == {reasons.WRONG_BAND_COUNT}


@needs_oscd
def test_multiband_with_a_band_missing_or_unknown(tmp_path: Path) -> None:
    names = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11"]
    write_multiband(OSCD / "rennes" / "imgs_1", tmp_path / "a_20150821.tif", names=names)
    write_multiband(
        OSCD / "rennes" / "imgs_1", tmp_path / "b_20150821.tif", names=[*names, "B12", "NDVI"]
    )
    scenes, rejected = search(tmp_path)
    assert scenes == []
    assert sorted((r, why) for r, why, _ in rejected) == [
        ("a_20150821.tif", reasons.WRONG_BAND_COUNT),
        ("b_20150821.tif", reasons.WRONG_BAND_COUNT),
    ]
    assert "B12" in rejected[0][2] and "NDVI" in rejected[1][2]


@needs_oscd
@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_geotiff_without_crs_is_missing_crs(tmp_path: Path) -> None:
    write_multiband(OSCD / "rennes" / "imgs_2", tmp_path / "T30UWU_20170621.tif", crs=False)
    scenes, rejected = search(tmp_path)
    assert scenes == []
    assert [(r, why) for r, why, _ in rejected] == [("T30UWU_20170621.tif", reasons.MISSING_CRS)]


@needs_oscd
def test_product_without_a_date_is_missing_metadata(tmp_path: Path) -> None:
    folder = copy_band_folder("rennes", 1, tmp_path / "undated", dates=False)
    for path in list(folder.iterdir()):
        path.rename(folder / ("scene_" + path.name.rsplit("_", 1)[1]))
    write_multiband(OSCD / "rennes" / "imgs_2", tmp_path / "stack.tif")
    scenes, rejected = search(tmp_path)
    assert scenes == []
    assert sorted((r, why) for r, why, _ in rejected) == [
        ("stack.tif", reasons.MISSING_METADATA),
        ("undated/rennes/imgs_1", reasons.MISSING_METADATA),
    ]


@needs_oscd
def test_rasters_that_are_not_products_are_ignored(tmp_path: Path) -> None:
    labels = OSCD.parent / "labels" / "bercy" / "cm"
    shutil.copy(next(labels.glob("*.tif")), tmp_path / "bercy-cm.tif")
    assert search(tmp_path) == ([], [])
    with pytest.raises(ValueError, match="not a product"):
        product_footprint(tmp_path / "bercy-cm.tif")


def link_safe(dest: Path) -> Path:
    """The shared SAFE, its files linked (not copied) into ``dest``: cheap to break one."""
    target = dest / SAFE.name
    shutil.copytree(SAFE, target, copy_function=os.symlink)
    return target


def replace_with_copy(path: Path) -> None:
    source = path.resolve()
    path.unlink()
    shutil.copy(source, path)
    path.chmod(0o644)


@needs_safe
def test_safe_without_its_mtd_is_missing_metadata(tmp_path: Path) -> None:
    # Only the XML files and one band, as the brief says; then the MTD goes.
    target = tmp_path / SAFE.name
    for xml in SAFE.rglob("*.xml"):
        (target / xml.relative_to(SAFE)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(xml, target / xml.relative_to(SAFE))
    band = safe_band("B04")
    (target / band.relative_to(SAFE)).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(band, target / band.relative_to(SAFE))
    (target / "MTD_MSIL2A.xml").unlink()
    scenes, rejected = search(tmp_path)
    assert scenes == []
    assert [(r, why) for r, why, _ in rejected] == [(SAFE_NAME, reasons.MISSING_METADATA)]
    assert "MTD_MSIL2A.xml" in rejected[0][2]


@needs_safe
def test_safe_with_one_band_is_wrong_band_count(tmp_path: Path) -> None:
    target = link_safe(tmp_path)
    for jp2 in target.glob("GRANULE/*/IMG_DATA/R60m/*_B*_60m.jp2"):
        if "_B04_" not in jp2.name:
            jp2.unlink()
    _, rejected = search(tmp_path)
    assert [(r, why) for r, why, _ in rejected] == [(SAFE_NAME, reasons.WRONG_BAND_COUNT)]


@needs_safe
def test_garbage_jp2_is_corrupt_raster(tmp_path: Path) -> None:
    target = link_safe(tmp_path)
    jp2 = next(target.glob("GRANULE/*/IMG_DATA/R60m/*_B03_60m.jp2"))
    jp2.unlink()
    jp2.write_bytes(np.random.default_rng(0).bytes(64 * 1024))
    scenes, rejected = search(tmp_path)
    assert scenes == []
    assert [(r, why) for r, why, _ in rejected] == [(SAFE_NAME, reasons.CORRUPT_RASTER)]
    assert "B03" in rejected[0][2]


@needs_safe
def test_truncated_jp2_fails_the_read(tmp_path: Path) -> None:
    """A truncated JP2 opens fine; its pixels must fail, not come back as garbage."""
    target = link_safe(tmp_path)
    [scene], _ = search(tmp_path)
    jp2 = next(target.glob("GRANULE/*/IMG_DATA/R60m/*_B05_60m.jp2"))
    replace_with_copy(jp2)
    truncate(jp2, 0.5)
    # The bottom of the tile lies in the lost half of the codestream. The chip straddles
    # the corner of four 192-pixel JP2 tiles: a multi-tile read, which GDAL decodes in
    # worker threads unless told not to, and then returns garbage instead of failing.
    with rasterio.open(jp2) as ds:
        assert ds.block_shapes == [(192, 192)]
    lon, lat = utm_point(499980 + 60 * 192, 5900040 - 60 * 192 * 9)
    assert scene.footprint.contains(box(lon - 0.01, lat - 0.01, lon + 0.01, lat + 0.01))
    with pytest.raises(SceneRejectedError) as err:
        list(LocalSource(tmp_path).read(scene, [location(0, lon, lat)]))
    assert err.value.reason == reasons.CORRUPT_RASTER
    assert SAFE_NAME in err.value.detail and "B05" in err.value.detail


# -- settings and odds and ends --------------------------------------------------------------


def test_from_settings_needs_a_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"local\.path"):
        LocalSource.from_settings(load_settings(data_dir=tmp_path))
    source = LocalSource.from_settings(load_settings(data_dir=tmp_path, local={"path": tmp_path}))
    assert source.root == tmp_path
    assert source.name == "local"


def test_empty_directory_finds_nothing(tmp_path: Path) -> None:
    assert search(tmp_path) == ([], [])


def test_scene_of_another_source_is_unreadable(tmp_path: Path) -> None:
    scene = SceneRef(
        source="simulated",
        product_id="sim-1",
        acquired_at=NOW,
        footprint=Polygon([(0, 0), (1, 0), (1, 1)]),
    )
    with pytest.raises(SceneRejectedError) as err:
        list(LocalSource(tmp_path).read(scene, [location(0, 0.5, 0.2)]))
    assert err.value.reason == reasons.UNREADABLE
    assert "sim-1" in err.value.detail


@needs_oscd
def test_product_footprint_of_a_band_folder_and_a_band_file(oscd: dict[str, SceneRef]) -> None:
    folder = OSCD / "rennes" / "imgs_2"
    assert product_footprint(folder).equals(oscd["rennes/imgs_2"].footprint)
    assert product_footprint(next(folder.glob("*_B8A.tif"))).equals(oscd["rennes/imgs_2"].footprint)
    with pytest.raises(ValueError, match="neither"):
        product_footprint(OSCD / "rennes")


@needs_oscd
def test_reading_is_fast(oscd: dict[str, SceneRef]) -> None:
    """A city's worth of chips, one scene, all band files opened once."""
    scene = oscd["paris/imgs_2"]
    minx, miny, maxx, maxy = scene.footprint.bounds
    locations = [
        location(
            i * 10 + j, minx + (maxx - minx) * (i + 0.5) / 10, miny + (maxy - miny) * (j + 0.5) / 10
        )
        for i in range(10)
        for j in range(10)
    ]
    start = time.perf_counter()
    out = read(OSCD, scene, locations)
    elapsed = time.perf_counter() - start
    assert all(isinstance(item, Chip) for item in out.values())
    assert len(out) / elapsed > 20, f"{len(out) / elapsed:.0f} chips/s"
    assert math.isfinite(elapsed)
