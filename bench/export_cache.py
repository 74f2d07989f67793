"""ONNX export time: tracing each model against swapping new weights into a kept graph.

For each of the three published models (``features``, ``embedding``, ``dense``)
of revisit's encoder with random weights, in this one process:

- ``trace``: :func:`revisit.export.onnx.export_model` without a graph cache, so
  ``torch.onnx.export(..., dynamo=True)`` traces the module (what every export
  did before the cache);
- ``cached``: the same export of a *second* model (other weights) with a cache
  that the first model's export filled, so its graph comes from the cache and
  only the weights and the optimiser run.

Each export's output is checked against PyTorch under onnxruntime (the parity
check publishing runs). Peak RSS is reported, but it is only the most this
process held at any time (the tracing rows come first). The figure printed last
is the trace time ÷ the cached time, summed over the three models.

    .venv/bin/python bench/export_cache.py [--threads 2] [--repeats 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/onnx.py would shadow the onnx package with this folder first on the path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import logging  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from revisit.export.onnx import (  # noqa: E402
    DenseModel,
    EmbeddingModel,
    Exportable,
    FeatureModel,
    export_model,
    model_metadata,
    parity_check,
)
from revisit.learner.heads import ContrastiveModel  # noqa: E402

WRAPPERS: tuple[type[FeatureModel | EmbeddingModel | DenseModel], ...] = (
    FeatureModel,
    EmbeddingModel,
    DenseModel,
)


def _model(seed: int) -> ContrastiveModel:
    torch.manual_seed(seed)
    model = ContrastiveModel(queue_size=64)
    model.set_band_statistics([0.1] * 12, [0.05] * 12)
    return model.eval()


def _export(module: Exportable, path: Path, cache: Path | None) -> float:
    metadata = model_metadata(
        module, method="caco", step=0, model_version=None, patch_size=64, opset=18
    )
    started = time.perf_counter()
    export_model(module, path, metadata=metadata, opset=18, patch_size=64, graph_cache=cache)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--repeats", type=int, default=2, help="exports of each kind, median")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    chips = (np.random.default_rng(0).random((4, 12, 64, 64)) * 3000).astype(np.uint16)
    totals = {"trace": 0.0, "cached": 0.0}
    with tempfile.TemporaryDirectory(prefix="revisit-export-bench-") as tmp:
        root = Path(tmp)
        print(f"{'model':10s} {'trace s':>8s} {'cached s':>9s} {'ratio':>6s}  parity (cached)")
        for wrapper in WRAPPERS:
            times: dict[str, list[float]] = {"trace": [], "cached": []}
            worst = 0.0
            for r in range(args.repeats):
                cache = root / f"cache-{wrapper.__name__}-{r}"
                first, second = wrapper(_model(2 * r)), wrapper(_model(2 * r + 1))
                times["trace"].append(_export(first, root / "a.onnx", cache))  # fills the cache
                times["cached"].append(_export(second, root / "b.onnx", cache))
                worst = max(worst, parity_check(root / "b.onnx", second, chips))
            trace, cached = statistics.median(times["trace"]), statistics.median(times["cached"])
            totals["trace"] += trace
            totals["cached"] += cached
            print(
                f"{wrapper.output:10s} {trace:8.2f} {cached:9.2f} {trace / cached:6.1f}"
                f"  max |onnx - torch| {worst:.1e}"
            )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(f"peak RSS of this process {peak:.2f} GB (the tracing rows included)")
    ratio = totals["trace"] / totals["cached"]
    print(
        f"export_cache: {ratio:.1f}x faster from the cache"
        f" ({totals['cached']:.1f} s against {totals['trace']:.1f} s for the three models)"
    )


if __name__ == "__main__":
    main()
