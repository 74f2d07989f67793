"""bench/probe.py and bench/probe_data.py: the probe sets' builders and the probe itself.

The probe runs on a tiny hand-built ONNX model (a global average pool and a
matrix product) that carries the ``features`` contract in its metadata, so no
network is exported. Tests of the builders read ``../shared/data`` and skip
when it is absent; the full ``scl`` build reads a whole tile and is ``slow``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from revisit.types import CANONICAL_BANDS
from tests.conftest import load_bench

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
SLOVENIA = SHARED_DATA / "eolearn_slovenia"
OSCD = SHARED_DATA / "oscd"
SAFE_DIR = SHARED_DATA / "s2_l2a_safe_T29UNU"


probe = load_bench("probe")
probe_data = probe.probe_data

WEIGHTS = np.random.default_rng(3).normal(size=(12, 8)).astype(np.float32)
REVERSED = ",".join(reversed(CANONICAL_BANDS))


def tiny_model(path: Path, *, bands: str = REVERSED, scale: str = "0.0001", **extra: str) -> Path:
    """An ONNX ``features`` model: mean of each input band, times a fixed (12, 8) matrix."""
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["pixels"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w"], ["features"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["n", 12, "h", "w"])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", 8])],
        initializer=[numpy_helper.from_array(WEIGHTS, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    meta = {"input_name": "pixels", "bands": bands, "scale": scale, "min_size": "32", **extra}
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


def expected_features(chips: np.ndarray, *, order: list[int], scale: float) -> np.ndarray:
    means = (chips[:, order].astype(np.float32) * np.float32(scale)).mean(axis=(2, 3))
    return means @ WEIGHTS


def synthetic_set(
    name: str = "toy", *, paired: bool = False, real: bool = True, n_per_class: int = 10
) -> object:
    """A small ProbeSet whose two classes differ in brightness."""
    rng = np.random.default_rng(0)
    n = 2 * n_per_class
    labels = np.repeat([0, 1], n_per_class).astype(np.int64)
    shape = (n, 2, 12, 32, 32) if paired else (n, 12, 32, 32)
    chips = rng.integers(500, 1500, size=shape).astype(np.uint16)
    if paired:
        chips[labels == 1, 1] += 2000  # the changed ones brighten on the second date
    else:
        chips[labels == 1] += 2000
    boxes = np.array([(32 * i, 0, 32 * (i + 1), 32) for i in range(n)], dtype=np.float64)
    return probe_data.ProbeSet(
        name=name,
        chips=chips,
        labels=labels,
        class_names=("dark", "bright"),
        groups=np.arange(n, dtype=np.int64),
        frames=np.zeros(n, dtype=np.int64),
        boxes=boxes,
        real=real,
        headline=True,
    )


# -- pure helpers ------------------------------------------------------------------------------


def test_majority_finds_each_blocks_class_and_share() -> None:
    classes = np.zeros((4, 6), dtype=np.uint8)
    classes[:2, :2] = 4
    classes[0, 0] = 9
    classes[2:, 2:4] = 1  # an ignored class: counted in no class
    best, share = probe_data.majority(classes, 2, ignore=(1,))
    assert best.shape == (2, 3)
    assert best[0, 0] == 4 and share[0, 0] == pytest.approx(0.75)
    assert best[0, 1] == 0 and share[0, 1] == pytest.approx(1.0)
    assert share[1, 1] == pytest.approx(0.0)  # all ignored


def test_majority_rejects_a_non_2d_map() -> None:
    with pytest.raises(ValueError, match="2-d"):
        probe_data.majority(np.zeros((2, 2, 2), dtype=np.uint8), 2)


def test_chips_disjoint_sees_an_overlap_but_not_a_repeat_of_one_place() -> None:
    boxes = np.array([(0, 0, 32, 32), (32, 0, 64, 32), (0, 0, 32, 32)], dtype=np.float64)
    frames = np.zeros(3, dtype=np.int64)
    assert probe_data.chips_disjoint(boxes, frames, np.array([0, 1, 0]))  # place 0 twice
    assert not probe_data.chips_disjoint(boxes, frames, np.array([0, 1, 2]))
    assert probe_data.chips_disjoint(boxes, np.array([0, 0, 1]), np.array([0, 1, 2]))


def test_cached_builds_once_and_reads_the_same_arrays_back(tmp_path: Path) -> None:
    calls: list[int] = []

    def build(*, n_per_class: int) -> object:
        calls.append(n_per_class)
        return synthetic_set(n_per_class=n_per_class)

    first = probe_data.cached(tmp_path, "toy", build, n_per_class=4)
    second = probe_data.cached(tmp_path, "toy", build, n_per_class=4)
    assert calls == [4]
    assert len(first) == len(second) == 1
    np.testing.assert_array_equal(first[0].chips, second[0].chips)
    assert second[0].class_names == ("dark", "bright") and second[0].real
    probe_data.cached(tmp_path, "toy", build, n_per_class=5)  # other parameters: another file
    assert calls == [4, 5]


# -- the consumer side -------------------------------------------------------------------------


def test_onnx_features_follows_the_models_band_order_and_scale(tmp_path: Path) -> None:
    path = tiny_model(tmp_path / "tiny.onnx", scale="0.001")
    encoder = probe.OnnxFeatures(path, threads=1, batch=3)
    chips = np.random.default_rng(1).integers(0, 4000, (7, 12, 32, 32)).astype(np.uint16)
    got = encoder(chips)
    order = [CANONICAL_BANDS.index(b) for b in REVERSED.split(",")]
    np.testing.assert_allclose(
        got, expected_features(chips, order=order, scale=1e-3), rtol=1e-4, atol=1e-4
    )


def test_onnx_features_refuses_a_model_without_its_contract(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="scale"):
        probe.OnnxFeatures(tiny_model(tmp_path / "a.onnx", scale=""))
    with pytest.raises(SystemExit, match="B10"):
        probe.OnnxFeatures(tiny_model(tmp_path / "b.onnx", bands="B01,B10"))


def test_pair_features_are_the_absolute_difference_of_the_dates(tmp_path: Path) -> None:
    pairs = synthetic_set(paired=True)
    stats = probe.set_features(pairs, probe.band_stats)
    assert stats.shape == (pairs.n, 24)
    expected = np.abs(probe.band_stats(pairs.chips[:, 1]) - probe.band_stats(pairs.chips[:, 0]))
    np.testing.assert_allclose(stats, expected, rtol=1e-6)
    encoder = probe.OnnxFeatures(tiny_model(tmp_path / "tiny.onnx"), threads=1)
    assert probe.set_features(pairs, encoder).shape == (pairs.n, 8)


def test_probe_scores_separable_classes_high_and_the_majority_guess_at_chance() -> None:
    toy = synthetic_set()
    x = probe.band_stats(toy.chips)
    score = probe.probe_score(x, toy.labels)
    assert score.mean > 0.95 and score.folds == probe.N_SPLITS * probe.N_REPEATS
    guess = probe.probe_score(x, toy.labels, majority=True)
    assert guess.mean < 0.6
    assert np.isnan(probe.probe_score(x, np.zeros(toy.n, dtype=np.int64)).mean)


def test_a_set_enters_the_mean_only_when_real_headline_and_seen_at_enough_places() -> None:
    assert probe.in_mean(synthetic_set()) == (True, "")
    assert not probe.in_mean(synthetic_set(real=False))[0]
    few = synthetic_set()
    few = probe_data.ProbeSet(**{**few.__dict__, "groups": few.labels.copy()})
    ok, why = probe.in_mean(few)
    assert not ok and "1 place" in why


def test_published_features_checks_the_manifests_hash(tmp_path: Path) -> None:
    export = tmp_path / "exports" / "onnx"
    export.mkdir(parents=True)
    model = tiny_model(export / "v.features.onnx")
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    manifest = {"files": {"features": model.name}, "sha256": {"features": digest}}
    (export / "latest.json").write_text(json.dumps(manifest))
    assert probe.published_features(tmp_path) == model
    manifest["sha256"]["features"] = "0" * 64
    (export / "latest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit, match="sha256"):
        probe.published_features(tmp_path)
    with pytest.raises(SystemExit, match="nothing published"):
        probe.published_features(tmp_path / "elsewhere")


def test_the_figure_names_the_model_then_band_stats_and_random() -> None:
    means = {"model": 0.812, "aug": 0.8, "band stats": 0.78, "random": 0.66}
    line = probe.figure(means, ["model", "aug"])
    assert line == (
        "probe: model 0.81 mean accuracy over real sets (aug 0.80, band stats 0.78, random 0.66)"
    )
    assert probe.figure(means, []).startswith("probe: random 0.66 mean accuracy")


# -- the builders on the shared data -----------------------------------------------------------


@pytest.mark.skipif(not SLOVENIA.is_dir(), reason=f"eo-learn data not found at {SLOVENIA}")
def test_slovenia_chips_are_5_dates_of_9_places_labeled_by_land_cover() -> None:
    s = probe_data.build_slovenia(SLOVENIA)
    assert s.chips.shape == (45, 12, 32, 32) and s.chips.dtype == np.uint16
    assert s.counts() == {"forest": 40, "grassland": 5}
    assert len(np.unique(s.groups)) == 9 and np.bincount(s.groups).tolist() == [5] * 9
    assert probe_data.chips_disjoint(s.boxes, s.frames, s.groups)
    assert 100 < np.median(s.chips) < 5000  # DN, not reflectance
    assert not probe.in_mean(s)[0]  # grassland is one place


@pytest.mark.skipif(not (OSCD / "labels").is_dir(), reason=f"OSCD data not found at {OSCD}")
def test_oscd_pairs_are_disjoint_and_balanced_per_city() -> None:
    five, one = probe_data.build_oscd(OSCD)
    assert (five.name, one.name) == ("oscd-change", "oscd-change-1%")
    assert five.headline and not one.headline
    for s in (five, one):
        assert s.paired and s.chips.shape[1:] == (2, 12, 32, 32)
        assert probe_data.chips_disjoint(s.boxes, s.frames, s.groups)
        for frame in np.unique(s.frames):
            labels = s.labels[s.frames == frame]
            assert (labels == 1).sum() == (labels == 0).sum() > 0
    assert one.n > five.n >= 40


def test_simulated_chips_have_distinct_places_and_several_classes() -> None:
    s = probe_data.build_simulated(max_per_class=4, min_class=2, max_locations=150)
    assert s.chips.shape[1:] == (12, 64, 64) and not s.real
    assert len(s.class_names) >= 3 and max(s.counts().values()) <= 4
    assert probe_data.chips_disjoint(s.boxes, s.frames, s.groups)


@pytest.mark.slow
@pytest.mark.skipif(not SAFE_DIR.is_dir(), reason=f"the L2A SAFE not found at {SAFE_DIR}")
def test_scl_chips_are_capped_disjoint_and_carry_no_offset() -> None:
    safe = next(SAFE_DIR.glob("*.SAFE"))
    s = probe_data.build_scl(safe, max_per_class=30, min_class=20)
    assert s.chips.shape[1:] == (12, 64, 64)
    assert max(s.counts().values()) <= 30 and "vegetation" in s.class_names
    assert probe_data.chips_disjoint(s.boxes, s.frames, s.groups)
    vegetation = s.chips[s.labels == s.class_names.index("vegetation")]
    red, nir = np.median(vegetation[:, 3]), np.median(vegetation[:, 8])
    assert red < 800 < nir  # the +1000 offset is gone; B8A stands in for B08


# -- the whole bench, with the tiny model standing in for every network -------------------------


@pytest.mark.skipif(not SLOVENIA.is_dir(), reason=f"eo-learn data not found at {SLOVENIA}")
def test_main_prints_the_table_and_the_figure_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny = tiny_model(tmp_path / "tiny.onnx")
    seen: dict[str, object] = {}

    def fake_random(path: Path, **kwargs: object) -> tuple[Path, bool]:
        seen.update(kwargs)
        return tiny_model(path), False

    monkeypatch.setattr(probe, "export_random", fake_random)
    other = tiny_model(tmp_path / "other.onnx", band_mean=",".join(["0.1"] * 12))
    probe.main(
        [
            "--model",
            str(other),
            "--extra",
            f"aug={tiny}",
            "--sets",
            "slovenia",
            *(["oscd"] if (OSCD / "labels").is_dir() else []),
            "--cache",
            str(tmp_path / "cache"),
        ]
    )
    out = capsys.readouterr().out.strip().splitlines()
    value = r"\d\.\d\d" if (OSCD / "labels").is_dir() else "n/a"  # slovenia alone: no mean
    assert re.fullmatch(
        rf"probe: model {value} mean accuracy over real sets"
        rf" \(aug {value}, band stats {value}, random {value}\)",
        out[-1],
    )
    assert any(line.startswith("| model | ") for line in out)
    assert any(line.startswith("| majority | ") for line in out)
    assert seen["band_mean"] == [0.1] * 12 and seen["band_std"] is None
    assert list((tmp_path / "cache").glob("slovenia-*.npz"))
