"""Change masks and polygons from a score raster (revisit.export.changemask), on real files."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import rasterio
import rasterio.transform
from affine import Affine
from pyproj import Geod, Transformer
from rio_cogeo.cogeo import cog_validate
from scipy import ndimage
from shapely.geometry import LinearRing, shape
from skimage.morphology import binary_opening, disk

from revisit.errors import ExportError
from revisit.export.changemap import write_float_cog
from revisit.export.changemask import (
    DEFAULT_THRESHOLD_METHOD,
    THRESHOLD_METHODS,
    MaskResult,
    automatic_threshold,
    score_sample,
    write_change_mask,
)

HEIGHT, WIDTH = 160, 200
PIXEL = 10.0
UTM = "EPSG:32631"
#: The top-left corner, EPSG:32631: about 3.0 °E, 45.1 °N.
X0, Y0 = 500_000.0, 5_000_000.0
#: Planted change: (rows, cols) of each blob, all scored well above the background.
BIG = (slice(20, 40), slice(30, 50))  # 400 px = 40,000 m²
MEDIUM = (slice(100, 110), slice(120, 135))  # 150 px
SMALL = (slice(60, 66), slice(150, 156))  # 36 px
RING = (slice(120, 131), slice(20, 31))  # 11 x 11 with a 3 x 3 hole of no change
HOLE = (slice(124, 127), slice(24, 27))
#: Isolated single pixels with a high score: speckle an opening removes.
SPECKLE = [(5, 5), (80, 80), (150, 190), (70, 10)]
#: No data.
NAN_BLOCK = (slice(0, 12), slice(170, 200))
GIVEN = 2.5

Scores = npt.NDArray[np.float32]


def synthetic_scores() -> Scores:
    """A noisy background near 1, blobs near 6, speckle at 9, a NaN corner."""
    rng = np.random.default_rng(7)
    score = (1.0 + 0.15 * rng.standard_normal((HEIGHT, WIDTH))).clip(0.05).astype(np.float32)
    for blob in (BIG, MEDIUM, SMALL, RING):
        score[blob] = 6.0 + 0.5 * rng.random(score[blob].shape)
    score[HOLE] = 1.0
    for row, col in SPECKLE:
        score[row, col] = 9.0
    score[NAN_BLOCK] = np.nan
    return score


def write_scores(
    path: Path,
    score: Scores,
    *,
    crs: str = UTM,
    transform: Affine | None = None,
) -> Path:
    """``score`` as a float32 COG, as ``revisit changemap pair`` writes it."""
    write_float_cog(
        score,
        path,
        crs=crs,
        transform=transform or Affine(PIXEL, 0, X0, 0, -PIXEL, Y0),
        description="feature_distance",
        units="feature distance",
        tags={"scoring": "dense"},
    )
    return path


@pytest.fixture(scope="module")
def scores() -> Scores:
    return synthetic_scores()


@pytest.fixture(scope="module")
def score_file(scores: Scores, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_scores(tmp_path_factory.mktemp("scores") / "score.tif", scores)


def read_mask(path: Path) -> tuple[npt.NDArray[np.uint8], dict[str, Any]]:
    with rasterio.open(path) as ds:
        return ds.read(1), {
            "crs": ds.crs,
            "transform": ds.transform,
            "shape": (ds.height, ds.width),
            "dtype": ds.dtypes[0],
            "nodata": ds.nodata,
            "tags": ds.tags(),
            "count": ds.count,
        }


def regions(binary: npt.NDArray[np.bool_]) -> tuple[npt.NDArray[np.int32], int]:
    labels, count = ndimage.label(binary)  # 4-connected by default
    return labels, int(count)


def run(score_file: Path, tmp_path: Path, **kwargs: Any) -> MaskResult:
    kwargs.setdefault("polygons_path", None)
    kwargs.setdefault("block", 16)
    return write_change_mask(score_file, mask_path=tmp_path / "mask.tif", **kwargs)


# -- the mask ---------------------------------------------------------------------------------


def test_automatic_mask_finds_the_blobs(score_file: Path, scores: Scores, tmp_path: Path) -> None:
    result = run(score_file, tmp_path, tags={"model_version": "v7"})
    mask, meta = read_mask(result.mask_path)

    assert result.method == DEFAULT_THRESHOLD_METHOD
    assert 1.2 < result.threshold < 6.0
    for blob in (BIG, MEDIUM, SMALL):
        assert (mask[blob] == 1).all()
    assert (mask[HOLE] == 0).all()
    background = np.isfinite(scores) & (scores < 2)
    assert np.count_nonzero(mask[background] == 1) / np.count_nonzero(background) < 0.01
    # 255 exactly where the score is NaN.
    np.testing.assert_array_equal(mask == 255, np.isnan(scores))
    assert result.valid_pixels == int(np.isfinite(scores).sum())
    assert result.changed_pixels == int((mask == 1).sum())
    assert result.polygons == 0 and result.polygons_path is None

    assert meta["shape"] == scores.shape
    assert meta["crs"] == rasterio.crs.CRS.from_string(UTM)
    assert meta["transform"] == Affine(PIXEL, 0, X0, 0, -PIXEL, Y0)
    assert (meta["dtype"], meta["nodata"], meta["count"]) == ("uint8", 255, 1)
    valid, errors, _ = cog_validate(str(result.mask_path), quiet=True)
    assert valid, errors
    tags = meta["tags"]
    assert float(tags["threshold"]) == result.threshold
    assert tags["threshold_method"] == DEFAULT_THRESHOLD_METHOD
    assert tags["opening_radius_px"] == "0"
    assert float(tags["min_area_m2"]) == 0.0
    assert tags["score_file"] == str(score_file.absolute())
    assert tags["values"] == "0 no change, 1 change, 255 no data"
    assert tags["model_version"] == "v7"
    assert [p.name for p in tmp_path.iterdir()] == ["mask.tif"]  # no temporary left


def test_given_threshold_is_honoured(score_file: Path, scores: Scores, tmp_path: Path) -> None:
    result = run(score_file, tmp_path, threshold=GIVEN, tags={"threshold": "forged"})
    mask, meta = read_mask(result.mask_path)

    assert result.threshold == GIVEN and result.method == "given"
    assert meta["tags"]["threshold_method"] == "given"
    assert float(meta["tags"]["threshold"]) == GIVEN  # a caller's tag cannot override it
    expected = np.where(np.isnan(scores), 255, scores > GIVEN).astype(np.uint8)
    np.testing.assert_array_equal(mask, expected)
    for row, col in SPECKLE:
        assert mask[row, col] == 1

    high = run(score_file, tmp_path, threshold=100.0)
    mask, _ = read_mask(high.mask_path)
    assert high.changed_pixels == 0 and set(np.unique(mask)) == {0, 255}


@pytest.mark.parametrize("radius", [1, 2])
def test_windowed_opening_equals_one_whole_image_pass(
    score_file: Path, scores: Scores, tmp_path: Path, radius: int
) -> None:
    result = run(score_file, tmp_path, threshold=GIVEN, opening_radius_px=radius, block=8)
    mask, meta = read_mask(result.mask_path)

    with warnings.catch_warnings():  # deprecated since 0.26, the reference all the same
        warnings.simplefilter("ignore", FutureWarning)
        whole = binary_opening(scores > GIVEN, footprint=disk(radius))
    expected = np.where(np.isnan(scores), 255, whole).astype(np.uint8)
    np.testing.assert_array_equal(mask, expected)
    for row, col in SPECKLE:
        assert mask[row, col] == 0
    assert (mask[slice(22, 38), slice(32, 48)] == 1).all()  # the big blob's inside stays
    assert meta["tags"]["opening_radius_px"] == str(radius)


def test_min_area_removes_small_regions_only(
    score_file: Path, scores: Scores, tmp_path: Path
) -> None:
    # 50 px of 100 m²: SMALL (36 px) and the speckle go; MEDIUM (150), RING, BIG stay.
    result = run(score_file, tmp_path, threshold=GIVEN, min_area_m2=5_000.0)
    mask, meta = read_mask(result.mask_path)

    assert (mask[SMALL] == 0).all()
    for row, col in SPECKLE:
        assert mask[row, col] == 0
    for blob in (BIG, MEDIUM):
        assert (mask[blob] == 1).all()
    assert (mask[HOLE] == 0).all()  # a hole is not filled (a sieve would fill it)
    np.testing.assert_array_equal(mask == 255, np.isnan(scores))
    _, count = regions(mask == 1)
    assert count == 3
    assert meta["tags"]["min_area_px"] == "50"
    assert float(meta["tags"]["pixel_area_m2"]) == pytest.approx(100.0)

    # A region exactly the minimum area is kept.
    exact = run(score_file, tmp_path, threshold=GIVEN, min_area_m2=3_600.0)
    mask, _ = read_mask(exact.mask_path)
    assert (mask[SMALL] == 1).all()
    assert mask[SPECKLE[0]] == 0


def test_block_size_does_not_change_the_result(score_file: Path, tmp_path: Path) -> None:
    outputs = []
    for block in (5, 1024):
        out = tmp_path / str(block)
        out.mkdir()
        result = write_change_mask(
            score_file,
            mask_path=out / "mask.tif",
            polygons_path=out / "mask.geojson",
            opening_radius_px=1,
            min_area_m2=1_000.0,
            block=block,
        )
        mask, _ = read_mask(result.mask_path)
        features = json.loads((out / "mask.geojson").read_text())["features"]
        outputs.append((result.threshold, mask, features))
    assert outputs[0][0] == outputs[1][0]
    np.testing.assert_array_equal(outputs[0][1], outputs[1][1])
    assert outputs[0][2] == outputs[1][2]


# -- polygons ---------------------------------------------------------------------------------


def test_polygons(score_file: Path, scores: Scores, tmp_path: Path) -> None:
    polygons_path = tmp_path / "change.geojson"
    result = run(score_file, tmp_path, threshold=GIVEN, polygons_path=polygons_path)
    collection = json.loads(polygons_path.read_text())
    mask, _ = read_mask(result.mask_path)
    labels, count = regions(mask == 1)

    assert collection["type"] == "FeatureCollection"
    assert "crs" not in collection
    about = collection["revisit"]
    assert about["threshold"] == GIVEN and about["threshold_method"] == "given"
    assert about["connectivity"] == 4 and about["polygons"] == count
    features = collection["features"]
    assert result.polygons == len(features) == count == 4 + len(SPECKLE)
    assert len({f["id"] for f in features}) == count
    to_lonlat = Transformer.from_crs(UTM, "EPSG:4326", always_xy=True)
    west, south, east, north = to_lonlat.transform_bounds(
        X0, Y0 - HEIGHT * PIXEL, X0 + WIDTH * PIXEL, Y0
    )
    assert 2.99 < west < east < 3.03 and 45.13 < south < north < 45.16
    geod = Geod(ellps="WGS84")
    total_pixels = 0
    for feature in features:
        props = feature["properties"]
        assert feature["id"] == props["id"]
        geometry = feature["geometry"]
        assert geometry["type"] == "Polygon"
        rings = geometry["coordinates"]
        assert LinearRing(rings[0]).is_ccw
        assert all(not LinearRing(hole).is_ccw for hole in rings[1:])
        for lon, lat in rings[0]:
            assert west <= lon <= east and south <= lat <= north
        polygon = shape(geometry)
        assert polygon.is_valid
        area = abs(geod.geometry_area_perimeter(polygon)[0])
        # area_m2 is of the unrounded ring; the file's coordinates are rounded to ~1 cm.
        assert props["area_m2"] == pytest.approx(area, rel=1e-3)
        # UTM's scale factor near the central meridian: ground area ≈ grid area * 1.0008.
        assert props["area_m2"] == pytest.approx(props["pixels"] * PIXEL**2, rel=2e-3)
        # The region under this polygon: its pixel count and mean score.
        centre = polygon.representative_point()
        region = _region_at(labels, centre.x, centre.y)
        assert props["pixels"] == int(region.sum())
        assert props["mean_score"] == pytest.approx(float(scores[region].mean()), rel=1e-6)
        total_pixels += props["pixels"]
    assert total_pixels == result.changed_pixels
    ring = [f for f in features if f["properties"]["pixels"] == 121 - 9]
    assert len(ring) == 1 and len(ring[0]["geometry"]["coordinates"]) == 2  # a hole


def _region_at(labels: npt.NDArray[np.int32], lon: float, lat: float) -> npt.NDArray[np.bool_]:
    """The labelled region under a lon/lat point of the UTM test grid."""
    x, y = Transformer.from_crs("EPSG:4326", UTM, always_xy=True).transform(lon, lat)
    row, col = rasterio.transform.rowcol(Affine(PIXEL, 0, X0, 0, -PIXEL, Y0), x, y)
    label = labels[row, col]
    assert label > 0
    return labels == label


def test_no_change_writes_an_empty_collection(score_file: Path, tmp_path: Path) -> None:
    polygons_path = tmp_path / "none.geojson"
    result = run(score_file, tmp_path, threshold=1e6, polygons_path=polygons_path)
    collection = json.loads(polygons_path.read_text())
    assert collection["type"] == "FeatureCollection" and collection["features"] == []
    assert result.polygons == 0 and result.changed_pixels == 0
    assert collection["revisit"]["changed_pixels"] == 0


def test_geographic_score_raster(tmp_path: Path) -> None:
    step = 1e-4  # about 7.9 m x 11.1 m at 45 °N
    transform = Affine(step, 0, 3.0, 0, -step, 45.0)
    score = np.ones((60, 80), dtype=np.float32)
    score[10:20, 10:30] = 5.0  # 200 px
    score[40:43, 60:63] = 5.0  # 9 px
    score[50:, :5] = np.nan
    path = write_scores(tmp_path / "geo.tif", score, crs="EPSG:4326", transform=transform)
    polygons_path = tmp_path / "geo.geojson"

    result = write_change_mask(
        path,
        mask_path=tmp_path / "geo-mask.tif",
        polygons_path=polygons_path,
        threshold=2.0,
        min_area_m2=2_000.0,
        block=7,
    )
    mask, meta = read_mask(result.mask_path)
    # The pixel area: geodesic, at the raster's centre.
    lons = [3.0 + 40 * step, 3.0 + 41 * step, 3.0 + 41 * step, 3.0 + 40 * step]
    lats = [45.0 - 30 * step, 45.0 - 30 * step, 45.0 - 31 * step, 45.0 - 31 * step]
    pixel_area = abs(Geod(ellps="WGS84").polygon_area_perimeter(lons, lats)[0])
    assert float(meta["tags"]["pixel_area_m2"]) == pytest.approx(pixel_area, rel=1e-9)
    assert 85 < pixel_area < 90
    assert meta["crs"] == rasterio.crs.CRS.from_epsg(4326)
    assert meta["transform"] == transform
    assert (mask[10:20, 10:30] == 1).all() and (mask[40:43, 60:63] == 0).all()
    assert (mask[50:, :5] == 255).all()

    (feature,) = json.loads(polygons_path.read_text())["features"]
    lon_lat = np.array(feature["geometry"]["coordinates"][0])
    assert lon_lat[:, 0].min() == pytest.approx(3.0 + 10 * step)
    assert lon_lat[:, 0].max() == pytest.approx(3.0 + 30 * step)
    assert lon_lat[:, 1].max() == pytest.approx(45.0 - 10 * step)
    assert lon_lat[:, 1].min() == pytest.approx(45.0 - 20 * step)
    assert LinearRing(lon_lat).is_ccw
    assert feature["properties"]["pixels"] == 200
    assert feature["properties"]["area_m2"] == pytest.approx(200 * pixel_area, rel=2e-3)
    assert feature["properties"]["mean_score"] == pytest.approx(5.0)


def test_a_polygon_across_the_antimeridian_is_cut(tmp_path: Path) -> None:
    # UTM zone 60 at 9 °N: 180° lies near x = 829,886 m.
    transform = Affine(PIXEL, 0, 829_000.0, 0, -PIXEL, 1_000_000.0)
    score = np.ones((30, 200), dtype=np.float32)
    score[10:20, 50:150] = 5.0  # 1,000 px from about 179.99 °E to 179.99 °W
    path = write_scores(tmp_path / "fiji.tif", score, crs="EPSG:32660", transform=transform)
    polygons_path = tmp_path / "fiji.geojson"
    write_change_mask(
        path,
        mask_path=tmp_path / "fiji-mask.tif",
        polygons_path=polygons_path,
        threshold=2.0,
    )
    (feature,) = json.loads(polygons_path.read_text())["features"]
    geometry = feature["geometry"]
    assert geometry["type"] == "MultiPolygon"
    lons = [lon for part in geometry["coordinates"] for lon, _lat in part[0]]
    assert min(lons) >= -180 and max(lons) <= 180
    assert min(lons) < -179.9 and max(lons) > 179.9
    assert all(LinearRing(part[0]).is_ccw for part in geometry["coordinates"])
    assert feature["properties"]["area_m2"] == pytest.approx(
        1_000 * PIXEL**2, rel=5e-3
    )  # UTM scale ~1.001 here


# -- thresholds and the sample ----------------------------------------------------------------


def test_score_sample_is_all_or_evenly_spaced(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    score = rng.random((37, 23)).astype(np.float32)
    score[rng.random(score.shape) < 0.2] = np.nan
    path = write_scores(tmp_path / "s.tif", score)
    finite = score[np.isfinite(score)]

    np.testing.assert_array_equal(score_sample(path, block=5), finite)
    m = 100
    sample = score_sample(path, max_pixels=m, block=5)
    expected = finite[np.arange(m) * finite.size // m]
    np.testing.assert_array_equal(sample, expected)
    np.testing.assert_array_equal(score_sample(path, max_pixels=m, block=1000), expected)

    empty = write_scores(tmp_path / "nan.tif", np.full((8, 8), np.nan, dtype=np.float32))
    assert score_sample(empty).size == 0


def test_automatic_thresholds_on_a_rare_change_sample() -> None:
    rng = np.random.default_rng(0)
    background = rng.lognormal(mean=0.0, sigma=0.4, size=50_000)
    change = rng.lognormal(mean=2.0, sigma=0.2, size=500)  # 1 %
    sample = np.concatenate([background, change, [np.nan, np.inf]])
    for method in THRESHOLD_METHODS:
        threshold = automatic_threshold(sample, method)
        assert np.isfinite(threshold), method
        assert threshold < float(np.median(change)), method
    triangle = automatic_threshold(sample, "triangle")
    assert float(np.mean(background > triangle)) < 0.05
    assert float(np.mean(change > triangle)) > 0.95
    # Nothing to separate: no score exceeds the threshold.
    assert automatic_threshold(np.full(10, 3.0)) == 3.0
    assert automatic_threshold(np.array([0.0, 0.0, 0.0, 2.0]), "mixture") == 2.0


# -- errors -----------------------------------------------------------------------------------


def test_errors(score_file: Path, tmp_path: Path) -> None:
    mask_path = tmp_path / "mask.tif"
    with pytest.raises(ExportError, match="not found"):
        write_change_mask(tmp_path / "missing.tif", mask_path=mask_path, polygons_path=None)
    text = tmp_path / "notes.tif"
    text.write_text("not a raster")
    with pytest.raises(ExportError, match="cannot read the score file"):
        write_change_mask(text, mask_path=mask_path, polygons_path=None)
    two = tmp_path / "two.tif"
    with rasterio.open(
        two, "w", driver="GTiff", width=4, height=4, count=2, dtype="float32", crs=UTM,
        transform=Affine(PIXEL, 0, X0, 0, -PIXEL, Y0),
    ) as ds:  # fmt: skip
        ds.write(np.zeros((2, 4, 4), dtype=np.float32))
    with pytest.raises(ExportError, match="2 bands"):
        write_change_mask(two, mask_path=mask_path, polygons_path=None)
    with pytest.raises(ExportError, match="opening_radius_px"):
        run(score_file, tmp_path, opening_radius_px=-1)
    with pytest.raises(ExportError, match="min_area_m2"):
        run(score_file, tmp_path, min_area_m2=-5.0)
    with pytest.raises(ExportError, match="unknown threshold method"):
        run(score_file, tmp_path, method="kmeans")
    with pytest.raises(ExportError, match="threshold must be a finite"):
        run(score_file, tmp_path, threshold=float("nan"))
    with pytest.raises(ExportError, match="block"):
        run(score_file, tmp_path, block=0)
    with pytest.raises(ExportError, match="overwrite the score file"):
        write_change_mask(score_file, mask_path=score_file, polygons_path=None)
    with pytest.raises(ExportError, match="unknown threshold method"):
        automatic_threshold(np.ones(3), "kmeans")
    with pytest.raises(ExportError, match="no finite value"):
        automatic_threshold(np.array([np.nan, np.inf]))
    with pytest.raises(ExportError, match="no finite value"):
        automatic_threshold(np.empty(0))
    empty = write_scores(tmp_path / "nan.tif", np.full((8, 8), np.nan, dtype=np.float32))
    with pytest.raises(ExportError, match="no finite value"):
        write_change_mask(empty, mask_path=mask_path, polygons_path=None)
    assert not mask_path.exists()


def test_a_failure_leaves_no_partial_file(score_file: Path, tmp_path: Path) -> None:
    mask_path = tmp_path / "mask.tif"
    mask_path.write_bytes(b"the previous mask")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    with pytest.raises(ExportError, match="could not write"):
        run(score_file, tmp_path, threshold=GIVEN, polygons_path=blocker / "change.geojson")
    assert mask_path.read_bytes() == b"the previous mask"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "mask.tif"]
