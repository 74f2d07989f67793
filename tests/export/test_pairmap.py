"""The dense change map of a pair of images (revisit.export.pairmap)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import rasterio
import torch
from affine import Affine
from rasterio.crs import CRS
from rio_cogeo.cogeo import cog_validate
from scipy import ndimage

from revisit.errors import ExportError
from revisit.export.onnx import DenseModel, EmbeddingModel, export_model, model_metadata
from revisit.export.pairmap import (
    Scene,
    StemEncoder,
    cva_map,
    pair_change_map,
    read_canonical,
    reproject_onto,
    score_dense,
    score_scenes,
    standardized,
)
from revisit.learner.heads import ContrastiveModel
from revisit.types import CANONICAL_BANDS
from tests.conftest import GRAPH_CACHE, SHARED_DATA

SIZE = 96
PIXEL = 10.0
X0, Y0 = 500_000.0, 5_000_000.0
#: The planted change, rows/cols of BEFORE's grid.
SQUARE = slice(36, 68)
OSCD_CITY = SHARED_DATA / "oscd" / "images" / "bercy"


@pytest.fixture(scope="session")
def random_module() -> EmbeddingModel:
    """A randomly initialised encoder (key encoder + head 0), in eval mode."""
    torch.manual_seed(0)
    return EmbeddingModel(ContrastiveModel(queue_size=8))


@pytest.fixture(scope="session")
def random_model(random_module: EmbeddingModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``random_module`` exported to ONNX (patch size 32), its dense model beside it.

    Through the session's graph cache: these tests map pairs; tests/export/test_onnx.py
    and test_graphs.py test the tracing itself.
    """
    folder = tmp_path_factory.mktemp("pairmap-model")
    path = folder / "random.embedding.onnx"
    metadata = model_metadata(
        random_module, method="random", step=0, model_version=None, patch_size=32, opset=18
    )
    export_model(
        random_module, path, metadata=metadata, opset=18, patch_size=32, graph_cache=GRAPH_CACHE
    )
    torch.manual_seed(0)
    dense = DenseModel(ContrastiveModel(queue_size=8))
    metadata = model_metadata(
        dense, method="random", step=0, model_version=None, patch_size=32, opset=18
    )
    export_model(
        dense,
        folder / "random.dense.onnx",
        metadata=metadata,
        opset=18,
        patch_size=32,
        graph_cache=GRAPH_CACHE,
    )
    return path


def _texture(rng: np.random.Generator, shape: tuple[int, int]) -> npt.NDArray[np.float64]:
    """Smooth-ish noise in [0, 1]: random 8x8-pixel blocks plus fine noise."""
    coarse = rng.random((shape[0] // 8 + 1, shape[1] // 8 + 1))
    blocks = np.kron(coarse, np.ones((8, 8)))[: shape[0], : shape[1]]
    return 0.7 * blocks + 0.3 * rng.random(shape)


def _write(path: Path, data: npt.NDArray[np.float64], transform: Affine, offset: int = 0) -> Path:
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=data.shape[2],
        height=data.shape[1],
        count=len(CANONICAL_BANDS),
        dtype="uint16",
        crs="EPSG:32631",
        transform=transform,
        nodata=0,
    ) as ds:
        ds.write(np.clip(np.rint(data), 1, 65535).astype(np.uint16))
        for i, band in enumerate(CANONICAL_BANDS, 1):
            ds.set_band_description(i, band)
        tags = {"ACQUISITIONDATE": "2024-06-01T10:00:00Z"}
        if offset:
            tags["BOA_ADD_OFFSET"] = str(offset)
        ds.update_tags(**tags)
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """BEFORE on a 96x96 10 m UTM grid; AFTER on a grid one pixel right and down, with a
    32x32 square of BEFORE's grid changed to a different surface."""
    rng = np.random.default_rng(7)
    world = SIZE + 2
    spectrum = np.linspace(800, 3000, len(CANONICAL_BANDS))
    base = spectrum[:, None, None] * (0.6 + 0.8 * _texture(rng, (world, world)))[None]
    changed = base.copy()
    roof = np.linspace(4000, 600, len(CANONICAL_BANDS))  # bright visible, dark infrared
    changed[:, SQUARE, SQUARE] = roof[:, None, None] * (0.9 + 0.2 * rng.random((32, 32)))[None]
    # Both dates see the same world, with a little sensor noise.
    after_world = changed + rng.normal(0, 10, changed.shape)
    root = tmp_path_factory.mktemp("pairmap-pair")
    before = _write(
        root / "before_20240601.tif",
        base[:, :SIZE, :SIZE],
        Affine(PIXEL, 0, X0, 0, -PIXEL, Y0),
    )
    after = _write(
        root / "after_20240701.tif",
        after_world[:, 1 : SIZE + 1, 1 : SIZE + 1],
        Affine(PIXEL, 0, X0 + PIXEL, 0, -PIXEL, Y0 - PIXEL),
    )
    return before, after


def test_pair_map_on_befores_grid(
    pair: tuple[Path, Path], random_model: Path, tmp_path: Path
) -> None:
    before, after = pair
    out = tmp_path / "maps" / "pair.tif"
    result = pair_change_map(
        before, after, model=random_model, out=out, scoring="windows", stride=8, batch=16
    )
    assert result.path == out
    assert result.scoring == "windows"
    assert (result.width, result.height) == (SIZE, SIZE)
    assert result.window == 32  # the model's patch size
    assert result.windows == 9 * 9  # offsets 0, 8, ..., 64 on each axis
    assert result.pixels_per_s > 0
    assert not list(out.parent.glob(".*.tmp"))  # published by rename, nothing left over
    valid, errors, _ = cog_validate(str(out), quiet=True)
    assert valid, errors
    with rasterio.open(before) as src, rasterio.open(out) as ds:
        assert ds.crs == src.crs
        assert ds.transform == src.transform
        assert (ds.width, ds.height) == (src.width, src.height)
        assert ds.dtypes == ("float32",)
        assert ds.count == 1
        tags = ds.tags()
        values = ds.read(1)
        assert ds.descriptions == ("cosine_distance",)
    assert tags["scoring"] == "windows"
    assert tags["stride"] == "8"
    assert tags["window"] == "32"
    assert tags["model"] == str(random_model)
    assert len(tags["model_sha256"]) == 64
    assert tags["method"] == "random"
    assert tags["before"] == str(before) and tags["after"] == str(after)
    assert np.isfinite(values).all()  # BEFORE is valid everywhere
    inside = values[SQUARE, SQUARE].mean()
    outside_mask = np.ones_like(values, dtype=bool)
    outside_mask[SQUARE, SQUARE] = False
    assert inside > values[outside_mask].mean()
    # Far from the square (no window covers both), the map is lower still.
    assert inside > values[:4, :4].mean()


def test_reprojection_aligns_after_with_before(pair: tuple[Path, Path]) -> None:
    before, after = pair
    first = read_canonical(before)
    second = reproject_onto(read_canonical(after), first)
    assert second.dn.shape == (len(CANONICAL_BANDS), SIZE, SIZE)
    assert second.transform == first.transform
    # AFTER's grid starts a pixel right and down: BEFORE's first row and column are outside it.
    assert not second.valid[0].any() and not second.valid[:, 0].any()
    assert second.valid[1:, 1:].all()
    # Away from the square, the two dates agree to the sensor noise.
    diff = np.abs(first.dn[:, 2:30, 2:30] - second.dn[:, 2:30, 2:30])
    assert float(np.median(diff)) < 30
    cva = cva_map(first, second)
    assert np.isnan(cva[0]).all()
    assert np.nanmean(cva[SQUARE, SQUARE]) > 3 * np.nanmean(cva[2:30, 2:30])


def test_offset_is_removed(tmp_path: Path) -> None:
    data = np.full((len(CANONICAL_BANDS), 40, 40), 1500.0)
    path = _write(tmp_path / "l2a_20240601.tif", data, Affine(PIXEL, 0, X0, 0, -PIXEL, Y0), -1000)
    scene = read_canonical(path)
    assert scene.dn.dtype == np.float32
    assert np.allclose(scene.dn, 500.0)
    assert scene.valid.all()


def test_missing_input_is_a_clear_error(
    pair: tuple[Path, Path], random_model: Path, tmp_path: Path
) -> None:
    before, _ = pair
    out = tmp_path / "pair.tif"
    with pytest.raises(ExportError, match="no such file"):
        pair_change_map(before, tmp_path / "nope", model=random_model, out=out)
    with pytest.raises(ExportError, match="ONNX model"):
        pair_change_map(before, before, model=tmp_path / "none.onnx", out=out)
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"not a tiff")
    with pytest.raises(ExportError, match="cannot read"):
        read_canonical(junk)
    with pytest.raises(ExportError, match="smaller than the model's minimum"):
        pair_change_map(before, before, model=random_model, out=out, scoring="windows", window=16)
    with pytest.raises(ExportError, match="unknown scoring"):
        pair_change_map(before, before, model=random_model, out=out, scoring="pixels")  # type: ignore[arg-type]
    assert not out.exists()


def test_stem_pair_map_scores_every_pixel(
    pair: tuple[Path, Path], random_model: Path, tmp_path: Path
) -> None:
    before, after = pair
    out = tmp_path / "dense.tif"
    # "dense" is the stem scoring's old name, still accepted.
    result = pair_change_map(before, after, model=random_model, out=out, scoring="dense")
    assert result.scoring == "stem"
    assert (result.window, result.stride, result.windows) == (7, 1, SIZE * SIZE)
    valid, errors, _ = cog_validate(str(out), quiet=True)
    assert valid, errors
    with rasterio.open(before) as src, rasterio.open(out) as ds:
        assert (ds.crs, ds.transform, ds.width, ds.height) == (
            src.crs,
            src.transform,
            src.width,
            src.height,
        )
        assert ds.descriptions == ("feature_distance",)
        tags = ds.tags()
        values = ds.read(1)
    assert tags["scoring"] == "stem"
    assert tags["window"] == "7" and tags["stride"] == "1"
    # AFTER does not cover BEFORE's first row and column: no score there.
    assert np.isnan(values[0]).all() and np.isnan(values[:, 0]).all()
    assert np.isfinite(values[1:, 1:]).all()
    # Per pixel, the planted square stands out: the map ranks its pixels first.
    truth = np.zeros_like(values, dtype=bool)
    truth[SQUARE, SQUARE] = True
    inner = values[1:, 1:]
    changed = truth[1:, 1:]
    threshold = np.quantile(inner, 1 - changed.mean())
    precision = float(changed[inner >= threshold].mean())
    assert precision > 0.9
    # Pixel-sharp: three pixels inside the square's edge already stand out, and three
    # pixels outside it (beyond the 7x7 stem's reach) do not.
    background = float(np.median(inner[~changed]))
    assert values[39, 39] > 3 * background
    assert values[32, 32] < 1.5 * background


def test_hypercolumn_map_writes_scores_mask_and_polygons(
    pair: tuple[Path, Path], random_model: Path, tmp_path: Path
) -> None:
    """The default: hypercolumn scores, the automatic mask and polygons beside them."""
    before, after = pair
    out = tmp_path / "map.tif"
    result = pair_change_map(before, after, model=random_model, out=out)
    assert result.scoring == "hypercolumn"
    assert result.mask_path == tmp_path / "map.mask.tif"
    assert result.polygons_path == tmp_path / "map.geojson"
    for path in (out, result.mask_path):
        valid, errors, _ = cog_validate(str(path), quiet=True)
        assert valid, errors
    with rasterio.open(out) as ds:
        assert ds.descriptions == ("hypercolumn_distance",)
        tags = ds.tags()
        values = ds.read(1)
    assert tags["scoring"] == "hypercolumn"
    assert tags["model"].endswith("random.dense.onnx")
    kept = json.loads(tags["kept_channels"])
    # Half of each level's live channels (a random layer3 has dead ReLUs on a small image).
    assert kept["input"] == 6 and kept["stem"] == 32 and kept["layer1"] == 32
    assert 0 < kept["layer2"] <= 64 and 0 < kept["layer3"] <= 128
    assert np.isnan(values[0]).all() and np.isfinite(values[1:, 1:]).all()
    truth = np.zeros_like(values, dtype=bool)
    truth[SQUARE, SQUARE] = True
    inner, changed = values[1:, 1:], truth[1:, 1:]
    top = inner >= np.quantile(inner, 1 - changed.mean())
    assert float(changed[top].mean()) > 0.8
    with rasterio.open(result.mask_path) as ds:
        mask = ds.read(1)
        assert ds.nodata == 255
        assert float(ds.tags()["threshold"]) == pytest.approx(result.threshold)
    assert (mask[0] == 255).all()
    assert set(np.unique(mask[1:, 1:]).tolist()) <= {0, 1}
    assert float((mask[SQUARE, SQUARE] == 1).mean()) > 0.8  # the square is found
    assert result.changed_pixels == int((mask == 1).sum())
    assert result.polygons_path is not None
    collection = json.loads(result.polygons_path.read_text())
    assert collection["type"] == "FeatureCollection"
    assert len(collection["features"]) == result.polygons >= 1
    biggest = max(collection["features"], key=lambda f: f["properties"]["area_m2"])
    assert biggest["properties"]["area_m2"] > 0.5 * 32 * 32 * PIXEL * PIXEL


def test_hypercolumn_tiles_give_the_whole_image_result(random_model: Path) -> None:
    """Tiles with the deepest layer's halo give what one pass over the image gives."""
    rng = np.random.default_rng(5)
    side = 416  # 3 x 3 tiles of 160: the corner tiles' cuts do not reach the far side
    noise = rng.random((len(CANONICAL_BANDS), side, side))
    dn = (1000 + 2000 * ndimage.uniform_filter(noise, size=(1, 5, 5))).astype(np.float32)
    later = dn.copy()
    later[:, 100:140, 180:230] *= 1.6
    valid = np.ones((side, side), dtype=bool)
    transform = Affine(PIXEL, 0, X0, 0, -PIXEL, Y0)
    crs = CRS.from_epsg(32631)
    a = Scene(dn, crs, transform, side, side, valid)
    b = Scene(later, crs, transform, side, side, valid)
    model = random_model.with_name("random.dense.onnx")
    whole = score_scenes(a, b, model, tile=1024)
    assert np.isfinite(whole).all()
    tiled = score_scenes(a, b, model, tile=160)  # all 9 tiles sampled: the whole image's stats
    assert float(np.max(np.abs(whole - tiled))) < 2e-3 * float(whole.max())


def test_stem_is_the_first_layer_at_every_pixel(
    random_module: EmbeddingModel, random_model: Path
) -> None:
    """onnxruntime's stem equals PyTorch's conv1 + BatchNorm + ReLU evaluated at stride 1."""
    stem = StemEncoder(random_model)
    assert (stem.channels, stem.kernel, stem.halo) == (64, 7, 3)
    encoder = random_module.encoder
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, len(CANONICAL_BANDS), 45, 38)).astype(np.float32)
    with torch.no_grad():
        conv = torch.nn.functional.conv2d(torch.from_numpy(x), encoder.conv1.weight, padding=3)
        expected = encoder.relu(encoder.bn1(conv)).numpy()
    got = stem(x)
    assert got.shape == (2, 64, 45, 38)
    assert float(np.abs(got - expected).max()) < 1e-4


def test_dense_tiles_give_the_whole_image_result(
    pair: tuple[Path, Path], random_model: Path
) -> None:
    before, after = pair
    first = read_canonical(before)
    second = reproject_onto(read_canonical(after), first)
    stem = StemEncoder(random_model)
    whole = score_dense(first, second, stem, tile=4096)
    tiled = score_dense(first, second, stem, tile=17)  # tiles that do not divide 96
    assert np.array_equal(np.isnan(whole), np.isnan(tiled))
    assert np.nanmax(np.abs(whole - tiled)) < 1e-5


def test_standardized_ignores_and_zeroes_invalid_pixels(pair: tuple[Path, Path]) -> None:
    before, after = pair
    first = read_canonical(before)
    second = reproject_onto(read_canonical(after), first)  # first row and column invalid
    out = standardized(second)
    assert (out[:, 0, :] == 0).all() and (out[:, :, 0] == 0).all()
    inside = out[:, second.valid]
    assert np.allclose(inside.mean(axis=1), 0, atol=1e-4)
    assert np.allclose(inside.std(axis=1), 1, atol=1e-3)


def test_a_model_without_a_convolutional_stem_is_refused(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("reflectance", TensorProto.FLOAT, ["n", 12, "h", "w"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 12, "h", "w"])
    graph = helper.make_graph([helper.make_node("Relu", ["reflectance"], ["y"])], "g", [x], [y])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(ExportError, match="no single convolution reads the input"):
        StemEncoder(path)
    path.write_bytes(b"not onnx")
    with pytest.raises(ExportError, match="cannot load ONNX model"):
        StemEncoder(path)


def test_pairmap_does_not_import_torch() -> None:
    code = "import sys, revisit.export.pairmap; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.skipif(
    not OSCD_CITY.is_dir(), reason=f"OSCD data not found at {OSCD_CITY} (../shared/data)"
)
def test_reads_an_oscd_band_folder() -> None:
    first = read_canonical(OSCD_CITY / "imgs_1")
    second = reproject_onto(read_canonical(OSCD_CITY / "imgs_2"), first)
    with rasterio.open(next((OSCD_CITY / "imgs_1").glob("*_B02.tif"))) as ds:
        assert (first.width, first.height) == (ds.width, ds.height)
        assert first.transform == ds.transform
        assert np.allclose(first.dn[1], ds.read(1))  # B02 is read as is
    assert first.dn.shape == (len(CANONICAL_BANDS), first.height, first.width)
    assert first.valid.mean() > 0.99
    assert second.valid.mean() > 0.9


def _write_l2a(path: Path, data: npt.NDArray[np.float64], scl: npt.NDArray[np.uint8]) -> Path:
    """A Level-2A multi-band GeoTIFF: the 12 bands and an SCL band."""
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=scl.shape[1],
        height=scl.shape[0],
        count=len(CANONICAL_BANDS) + 1,
        dtype="uint16",
        crs="EPSG:32631",
        transform=Affine(PIXEL, 0, X0, 0, -PIXEL, Y0),
    ) as ds:
        ds.write(np.clip(np.rint(data), 1, 65535).astype(np.uint16), list(range(1, 13)))
        ds.write(scl, 13)
        for i, band in enumerate((*CANONICAL_BANDS, "SCL"), 1):
            ds.set_band_description(i, band)
        ds.update_tags(ACQUISITIONDATE="2024-06-01T10:00:00Z", PROCESSING_LEVEL="Level-2A")
    return path


def test_cloud_and_shadow_on_either_date_are_no_data_everywhere(
    random_model: Path, tmp_path: Path
) -> None:
    rng = np.random.default_rng(11)
    spectrum = np.linspace(800, 3000, len(CANONICAL_BANDS))
    base = spectrum[:, None, None] * (0.6 + 0.8 * _texture(rng, (SIZE, SIZE)))[None]
    clear = np.full((SIZE, SIZE), 4, dtype=np.uint8)  # vegetation
    cloudy = clear.copy()
    cloudy[10:30, 50:90] = 9  # high-probability cloud on AFTER
    cloudy[60:70, 5:25] = 3  # cloud shadow on AFTER
    first = tmp_path / "a"
    second = tmp_path / "b"
    first.mkdir()
    second.mkdir()
    before = _write_l2a(first / "S2A_MSIL2A_20240601_T31UDQ.tif", base, clear)
    after_data = base + rng.normal(0, 10, base.shape)
    after_data[:, 10:30, 50:90] = 9000  # the cloud itself: bright in every band
    after = _write_l2a(second / "S2A_MSIL2A_20240701_T31UDQ.tif", after_data, cloudy)
    out = tmp_path / "map.tif"
    result = pair_change_map(before, after, model=random_model, out=out, scoring="stem")
    with rasterio.open(out) as ds:
        values = ds.read(1)
        assert ds.tags()["clouds_after"].startswith("scl:")
    masked = cloudy != 4
    assert np.isnan(values[masked]).all() and np.isfinite(values[~masked]).all()
    assert result.mask_path is not None and result.polygons_path is not None
    with rasterio.open(result.mask_path) as ds:
        mask = ds.read(1)
    assert (mask[masked] == 255).all() and (mask[~masked] != 255).all()
    assert result.valid_pixels == int((~masked).sum())
    # The bright cloud would be the strongest "change" if it were not masked.
    unmasked = pair_change_map(
        before, after, model=random_model, out=tmp_path / "raw.tif", scoring="stem", clouds=False
    )
    with rasterio.open(unmasked.path) as ds:
        raw = ds.read(1)
    assert np.isfinite(raw).all()
    assert float(np.median(raw[10:30, 50:90])) > 3 * float(np.median(raw[~masked]))


def test_the_command_line_names_the_mask_and_polygons_and_takes_a_threshold(
    pair: tuple[Path, Path], random_model: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    before, after = pair
    out = tmp_path / "map.tif"
    args = [sys.executable, "-m", "revisit.cli", "changemap", "pair", str(before), str(after)]
    args += ["--out", str(out), "--model", str(random_model), "--scoring", "stem"]
    mask, polygons = tmp_path / "m.tif", tmp_path / "p.geojson"
    options = ["--mask", str(mask), "--polygons", str(polygons), "--threshold", "1.5"]
    options += ["--opening", "1", "--min-area", "500"]
    done = subprocess.run(
        [*args, *options],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert f"wrote {mask}" in done.stdout and "threshold 1.5, given" in done.stdout
    with rasterio.open(mask) as ds:
        tags = ds.tags()
    assert tags["threshold_method"] == "given" and float(tags["threshold"]) == 1.5
    assert tags["opening_radius_px"] == "1" and float(tags["min_area_m2"]) == 500
    features = json.loads(polygons.read_text())["features"]
    assert all(f["properties"]["area_m2"] >= 450 for f in features)  # the mapping unit
    assert not (tmp_path / "map.mask.tif").exists()
    out.unlink()
    done = subprocess.run(
        [*args, "--no-mask"], env=cli_env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert out.is_file() and not (tmp_path / "map.mask.tif").exists()
    assert not (tmp_path / "map.geojson").exists()
    done = subprocess.run(
        [*args[:-2], "--scoring", "pixels"], env=cli_env, capture_output=True, text=True
    )
    assert done.returncode != 0 and "unknown scoring 'pixels'" in done.stderr


def test_a_killed_maps_scratch_file_is_removed_by_the_next(
    pair: tuple[Path, Path], random_model: Path, tmp_path: Path
) -> None:
    before, after = pair
    out = tmp_path / "map.tif"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid no process has any more
    stale = tmp_path / f".map.tif.scores-{dead.pid}-1.tif"
    stale.write_bytes(b"half a GeoTIFF")
    live = tmp_path / f".map.tif.scores-{os.getpid()}-2.tif"  # a live process's: kept
    live.write_bytes(b"in use")
    pair_change_map(before, after, model=random_model, out=out, scoring="stem", write_mask=False)
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "map.tif"])
