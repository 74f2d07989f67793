"""ONNX inference speed: onnxruntime against PyTorch eager on the same encoder and batch.

The encoder is revisit's ResNet-18 (12-band stem, pooled features of every depth) with random
weights, exported by :func:`revisit.export.onnx.export_model` exactly as
``publish_onnx`` exports it. Both runtimes run in this one process on the CPU
with the same number of threads, on the same float32 batch, one after the other
in alternation (so a neighbour's load hits both alike); the median latency of
each is reported. It then times the dense pair change map on a synthetic
``--pair-size`` square pair (both scorings of
:mod:`revisit.export.pairmap`: ``dense``, the stem at every pixel, and
``windows`` of ``--size`` pixels every 16, on the same exported model) and
prints pixels per second. The
figure printed last is torch time ÷ onnxruntime time (target ≥ 1.2).

    .venv/bin/python bench/onnx.py [--batch 64] [--size 64] [--threads N] [--runs 10]
        [--pair-size 1024]
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named onnx.py: keep its directory off the import path, or
# ``import onnx`` (here and inside revisit) would import this script.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from affine import Affine  # noqa: E402
from rasterio.crs import CRS  # noqa: E402

from revisit.export.onnx import FeatureModel, export_model, model_metadata  # noqa: E402
from revisit.export.pairmap import (  # noqa: E402
    OnnxEncoder,
    Scene,
    StemEncoder,
    score_dense,
    score_pair,
)
from revisit.learner.heads import ContrastiveModel  # noqa: E402


def pair_map_speed(path: Path, *, side: int, window: int) -> tuple[float, float]:
    """Pixels per second of the dense and the windows pair map on a synthetic pair."""
    rng = np.random.default_rng(1)
    scenes = []
    for _ in range(2):
        dn = rng.uniform(200, 4000, (12, side, side)).astype(np.float32)
        valid = np.ones((side, side), dtype=bool)
        transform = Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 5_000_000.0)
        scenes.append(Scene(dn, CRS.from_epsg(32631), transform, side, side, valid))
    started = time.perf_counter()
    score_dense(scenes[0], scenes[1], StemEncoder(path))
    dense = side * side / (time.perf_counter() - started)
    started = time.perf_counter()
    score_pair(scenes[0], scenes[1], OnnxEncoder(path), window=window, stride=16, batch=64)
    windows = side * side / (time.perf_counter() - started)
    return dense, windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=64, help="chip side in pixels")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--pair-size", type=int, default=1024, help="side of the pair map")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    module = FeatureModel(ContrastiveModel(queue_size=64))
    reflectance = np.random.default_rng(0).uniform(0, 0.5, (args.batch, 12, args.size, args.size))
    x_np = reflectance.astype(np.float32)
    x_torch = torch.from_numpy(x_np)

    with tempfile.TemporaryDirectory(prefix="revisit-bench-onnx-") as tmp:
        path = Path(tmp) / "features.onnx"
        metadata = model_metadata(
            module,
            method="caco",
            step=0,
            model_version=None,
            patch_size=args.size,
            opset=args.opset,
        )
        started = time.perf_counter()
        export_model(module, path, metadata=metadata, opset=args.opset, patch_size=args.size)
        export_s = time.perf_counter() - started
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        dense_px_s, windows_px_s = pair_map_speed(path, side=args.pair_size, window=args.size)

    def run_torch() -> np.ndarray:
        with torch.inference_mode():
            return module(x_torch).numpy()

    def run_onnx() -> np.ndarray:
        return np.asarray(session.run(None, {"reflectance": x_np})[0])

    diff = float(np.max(np.abs(run_torch() - run_onnx())))
    for _ in range(args.warmup):
        run_torch()
        run_onnx()
    torch_s: list[float] = []
    onnx_s: list[float] = []
    for _ in range(args.runs):
        for fn, times in ((run_torch, torch_s), (run_onnx, onnx_s)):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)

    t_torch, t_onnx = statistics.median(torch_s), statistics.median(onnx_s)
    shape = f"{args.batch}x12x{args.size}x{args.size}"
    print(f"batch {shape} float32, {args.threads} threads, median of {args.runs} runs")
    print(f"export (dynamo, optimised, checked): {export_s:.1f} s; max |onnx - torch| {diff:.2g}")
    print(f"torch eager:  {t_torch * 1e3:8.1f} ms  ({args.batch / t_torch:8.1f} chips/s)")
    print(f"onnxruntime:  {t_onnx * 1e3:8.1f} ms  ({args.batch / t_onnx:8.1f} chips/s)")
    print(
        f"pair change map {args.pair_size}x{args.pair_size}: dense {dense_px_s:,.0f} px/s,"
        f" windows ({args.size} px every 16) {windows_px_s:,.0f} px/s"
    )
    print(f"onnxruntime / torch speed-up: {t_torch / t_onnx:.2f}")


if __name__ == "__main__":
    main()
