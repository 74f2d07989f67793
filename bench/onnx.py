"""ONNX inference speed: onnxruntime against PyTorch eager on the same encoder and batch.

The encoder is revisit's ResNet-18 (12-band stem, 512-d features) with random
weights, exported by :func:`revisit.export.onnx.export_model` exactly as
``publish_onnx`` exports it. Both runtimes run in this one process on the CPU
with the same number of threads, on the same float32 batch, one after the other
in alternation (so a neighbour's load hits both alike); the median latency of
each is reported. The figure printed last is torch time ÷ onnxruntime time
(target ≥ 1.2).

    .venv/bin/python bench/onnx.py [--batch 64] [--size 64] [--threads N] [--runs 10]
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

from revisit.export.onnx import FeatureModel, export_model, model_metadata  # noqa: E402
from revisit.learner.heads import ContrastiveModel  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=64, help="chip side in pixels")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--opset", type=int, default=18)
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
    print(f"onnxruntime / torch speed-up: {t_torch / t_onnx:.2f}")


if __name__ == "__main__":
    main()
