"""The ONNX models of a trained checkpoint: what they compute, their export, metadata and parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
import torch

from revisit.errors import ExportError, ParityError
from revisit.export.onnx import (
    METADATA_KEYS,
    EmbeddingModel,
    FeatureModel,
    export_model,
    model_metadata,
    parity_check,
    read_metadata,
)
from revisit.export.publish import load_model
from revisit.ingest.chips import ChipStore
from revisit.learner.encoder import scale_dn
from revisit.learner.heads import ContrastiveModel
from revisit.types import CANONICAL_BANDS
from tests.export.conftest import TrainedWorld
from tests.learner.conftest import LearnWorld

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model(trained_world: TrainedWorld) -> ContrastiveModel:
    return load_model(trained_world.data_dir, trained_world.versions[0])


@pytest.fixture(scope="module")
def chips(learn_world: LearnWorld) -> npt.NDArray[np.uint16]:
    """16 real chips of the ingested world, clouds and gaps included."""
    store = ChipStore(learn_world.chips)
    return store.get_many(sorted(store.keys())[:16])


@pytest.fixture(scope="module")
def exported(
    model: ContrastiveModel, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, EmbeddingModel, dict[str, str]]:
    """The embedding model exported once for the module, with its metadata."""
    module = EmbeddingModel(model)
    metadata = model_metadata(
        module, method="caco", step=2, model_version=1, patch_size=64, opset=18, version="v-test"
    )
    path = tmp_path_factory.mktemp("onnx") / "embedding.onnx"
    export_model(module, path, metadata=metadata, opset=18, patch_size=64)
    return path, module, metadata


def _run(path: Path, reflectance: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"reflectance": reflectance})
    return np.asarray(out)


def test_modules_are_the_query_features_and_the_key_embedding_of_head_0(
    model: ContrastiveModel, chips: npt.NDArray[np.uint16]
) -> None:
    x = scale_dn(torch.from_numpy(chips[:4]))
    model.train()
    features, embedding = FeatureModel(model), EmbeddingModel(model)
    last = FeatureModel(model, pooling="last")
    assert model.training, "building the modules must not change the model's mode"
    model.eval()
    with torch.no_grad():
        levels = features(x)
        assert levels.shape == (4, 1024) and features.output_dim == 1024
        # The last 512 of the levels are layer4's pooled features: what `last` gives.
        torch.testing.assert_close(last(x), model.features(x), rtol=0, atol=0)
        torch.testing.assert_close(levels[:, -512:], model.features(x), rtol=0, atol=1e-6)
        assert last(x).shape == (4, 512) and last.output_dim == 512
        torch.testing.assert_close(embedding(x), model.key(x)[0], rtol=0, atol=0)
        norms = embedding(x).norm(dim=1)
    with pytest.raises(ValueError, match="'levels' or 'last'"):
        FeatureModel(model, pooling="mean")  # type: ignore[arg-type]
    torch.testing.assert_close(norms, torch.ones(4), rtol=0, atol=1e-5)
    assert not any(p.requires_grad for p in embedding.parameters())


def test_metadata_round_trips(exported: tuple[Path, EmbeddingModel, dict[str, str]]) -> None:
    path, _, metadata = exported
    read = read_metadata(path)
    assert read == metadata
    assert tuple(read) == METADATA_KEYS
    assert read["bands"].split(",") == list(CANONICAL_BANDS)
    assert float(read["scale"]) == 1e-4 and read["scale"] == "0.0001"
    assert read["output"] == "embedding" and read["encoder"] == "key" and read["head"] == "0"
    assert read["created_at"].endswith("Z")


def test_graph_has_named_input_and_dynamic_dims(
    exported: tuple[Path, EmbeddingModel, dict[str, str]],
) -> None:
    path, _, _ = exported
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    (inp,) = proto.graph.input
    (out,) = proto.graph.output

    def dims(value: onnx.ValueInfoProto) -> list[str | int]:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert inp.name == "reflectance" and dims(inp) == ["batch", 12, "height", "width"]
    assert out.name == "embedding" and dims(out) == ["batch", 128]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_parity_on_real_chips(
    exported: tuple[Path, EmbeddingModel, dict[str, str]],
    model: ContrastiveModel,
    trained_world: TrainedWorld,
    chips: npt.NDArray[np.uint16],
) -> None:
    path, module, _ = exported
    assert parity_check(path, module, chips, tolerance=TOLERANCE) <= TOLERANCE
    features_file = trained_world.published.paths["features"]
    meta = read_metadata(features_file)
    assert (meta["features_pooling"], meta["output_dim"]) == ("levels", "1024")
    assert parity_check(features_file, FeatureModel(model), chips) <= TOLERANCE


def test_batch_and_chip_size_are_dynamic(
    exported: tuple[Path, EmbeddingModel, dict[str, str]], chips: npt.NDArray[np.uint16]
) -> None:
    path, module, _ = exported
    for batch in (chips[:1], chips[:5], chips[:3, :, :48, :40], chips[:2, :, :32, :64]):
        x = batch.astype(np.float32) * np.float32(1e-4)
        with torch.no_grad():
            expected = module(torch.from_numpy(x)).numpy()
        got = _run(path, x)
        assert got.shape == expected.shape == (batch.shape[0], 128)
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE)


def test_a_model_that_differs_fails_parity_with_the_figure(
    exported: tuple[Path, EmbeddingModel, dict[str, str]],
    model: ContrastiveModel,
    chips: npt.NDArray[np.uint16],
) -> None:
    path, _, _ = exported
    perturbed = EmbeddingModel(model)
    with torch.no_grad():
        perturbed.head.net[0].bias.add_(0.5)
    figure = r"differs from PyTorch by \d[\d.e+-]* \(max abs\)"
    with pytest.raises(ParityError, match=figure) as info:
        parity_check(path, perturbed, chips)
    assert isinstance(info.value, ExportError) and isinstance(info.value, ValueError)
    assert "tolerance 0.0001" in str(info.value) and "16 chips" in str(info.value)


def test_parity_check_wants_digital_numbers(
    exported: tuple[Path, EmbeddingModel, dict[str, str]], chips: npt.NDArray[np.uint16]
) -> None:
    path, module, _ = exported
    with pytest.raises(ValueError, match="uint16"):
        parity_check(path, module, chips.astype(np.float32) * np.float32(1e-4))  # type: ignore[arg-type]


def test_reading_metadata_of_something_else_is_a_clear_error(tmp_path: Path) -> None:
    bogus = tmp_path / "model.onnx"
    bogus.write_bytes(b"not a model")
    with pytest.raises(ExportError, match="cannot read ONNX model"):
        read_metadata(bogus)
    with pytest.raises(ExportError, match="cannot read ONNX model"):
        read_metadata(tmp_path / "missing.onnx")


def test_the_graph_standardises_with_the_statistics_its_metadata_records(
    model: ContrastiveModel,
    exported: tuple[Path, EmbeddingModel, dict[str, str]],
    chips: npt.NDArray[np.uint16],
) -> None:
    path, module, _ = exported
    read = read_metadata(path)
    mean = [float(v) for v in read["band_mean"].split(",")]
    std = [float(v) for v in read["band_std"].split(",")]
    assert len(mean) == len(std) == len(CANONICAL_BANDS)
    # The trained world's model estimated them on its first chips: not the identity.
    assert not model.key_encoder.normalize.is_identity
    np.testing.assert_allclose(mean, model.key_encoder.normalize.mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(std, model.key_encoder.normalize.std.numpy(), rtol=1e-6)
    # A consumer feeds DN * scale and nothing else: the graph does the standardisation.
    reflectance = chips.astype(np.float32) * np.float32(float(read["scale"]))
    with torch.inference_mode():
        expected = module(torch.from_numpy(reflectance)).numpy()
    np.testing.assert_allclose(_run(path, reflectance), expected, atol=TOLERANCE)
