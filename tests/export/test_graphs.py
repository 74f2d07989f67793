"""The exported-graph cache: a new checkpoint's export swaps its weights into the kept graph."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from revisit.export import graphs
from revisit.export.onnx import EmbeddingModel, FeatureModel, export_model, model_metadata
from revisit.learner.heads import ContrastiveModel


def _model(seed: int) -> ContrastiveModel:
    torch.manual_seed(seed)
    model = ContrastiveModel(queue_size=8)
    model.set_band_statistics(
        [0.1 + 0.01 * i for i in range(12)], [0.05 + 0.005 * i for i in range(12)]
    )
    # Running statistics other than BatchNorm's initial 0/1, so that folding them matters.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _export(module: FeatureModel, path: Path, cache: Path | None) -> onnx.ModelProto:
    metadata = model_metadata(
        module, method="caco", step=0, model_version=None, patch_size=32, opset=18
    )
    export_model(module, path, metadata=metadata, opset=18, patch_size=32, graph_cache=cache)
    return onnx.load(str(path))


def _max_diff(path: Path, module: FeatureModel) -> float:
    x = np.random.default_rng(0).random((3, 12, 48, 40), dtype=np.float32) * 0.3
    (out,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"reflectance": x}
    )
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    return float(np.abs(out - expected).max())


def test_a_new_checkpoint_takes_the_kept_graph_and_computes_with_its_own_weights(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "graphs"
    first, second = FeatureModel(_model(0)), FeatureModel(_model(1))
    key = graphs.graph_key(first, opset=18, output_names=["features"])
    assert graphs.graph_key(second, opset=18, output_names=["features"]) == key  # weights apart
    assert (
        graphs.graph_key(
            FeatureModel(_model(0), pooling="last"), opset=18, output_names=["features"]
        )
        != key
    )

    with caplog.at_level(logging.INFO, logger="revisit.export.onnx"):
        traced = _export(first, tmp_path / "first.onnx", cache)
        kept = cache / f"{key}.onnx"
        assert kept.is_file()
        # Kept without weights: a fraction of the model's 45 MB.
        assert kept.stat().st_size < 2_000_000
        swapped = _export(second, tmp_path / "second.onnx", cache)
    messages = [r.getMessage() for r in caplog.records if "exported features" in r.getMessage()]
    assert len(messages) == 2
    assert "from the cache" not in messages[0] and messages[1].endswith("from the cache")

    # The same optimised graph as the exporter's (BatchNorms folded), with the new weights.
    assert [n.op_type for n in swapped.graph.node] == [n.op_type for n in traced.graph.node]
    assert "BatchNormalization" not in {n.op_type for n in swapped.graph.node}
    onnx.checker.check_model(swapped, full_check=True)
    assert _max_diff(tmp_path / "second.onnx", second) < 1e-4
    assert _max_diff(tmp_path / "second.onnx", first) > 1e-2  # not the first model's weights


def test_a_damaged_or_unfitting_kept_graph_is_traced_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "graphs"
    cache.mkdir()
    module = FeatureModel(_model(2))
    key = graphs.graph_key(module, opset=18, output_names=["features"])
    (cache / f"{key}.onnx").write_bytes(b"not a protobuf")
    with caplog.at_level(logging.WARNING, logger="revisit.export.graphs"):
        assert graphs.load_graph(cache, key, module, output_names=["features"]) is None
        _export(module, tmp_path / "m.onnx", cache)  # traced, and the file replaced
    assert any("ignoring the cached graph" in r.getMessage() for r in caplog.records)
    assert _max_diff(tmp_path / "m.onnx", module) < 1e-4
    assert graphs.load_graph(cache, key, module, output_names=["features"]) is not None

    # The features graph under the embedding's key: its weights are all in the embedding
    # model (the same encoder's), but it has the wrong output.
    embedding = EmbeddingModel(_model(2))
    other = graphs.graph_key(embedding, opset=18, output_names=["embedding"])
    (cache / f"{other}.onnx").write_bytes((cache / f"{key}.onnx").read_bytes())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="revisit.export.graphs"):
        assert graphs.load_graph(cache, other, embedding, output_names=["embedding"]) is None
    assert any("do not fit the module" in r.getMessage() for r in caplog.records)

    # A weight of another shape (a 13-band stem): the initializer does not fit.
    wide = FeatureModel(_model(2))
    wide.encoder.conv1.weight = torch.nn.Parameter(torch.zeros(64, 13, 7, 7))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="revisit.export.graphs"):
        assert graphs.load_graph(cache, key, wide, output_names=["features"]) is None
    assert any("encoder.conv1.weight does not fit" in r.getMessage() for r in caplog.records)


def test_an_unwritable_cache_only_costs_the_trace(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory would go")
    module = FeatureModel(_model(3))
    _export(module, tmp_path / "m.onnx", blocker / "graphs")
    assert _max_diff(tmp_path / "m.onnx", module) < 1e-4
