"""OSCD: pixel AUROC of dense pair change maps on the four real Onera cities.

For each city of ``../shared/data/oscd`` (aguasclaras, bercy, paris, rennes),
``imgs_1`` is read on its own 10 m grid and ``imgs_2`` warped onto it
(:func:`revisit.export.pairmap.read_canonical` / ``reproject_onto``); each row
scores every pixel and is ranked against the label mask (``labels == 2`` is
change) with ``sklearn.metrics.roc_auc_score``. Rows:

- ``CVA``: change-vector analysis (per-image standardised bands, norm of the
  difference); the data README gives 0.755 / 0.787 / 0.943 / 0.949;
- ``random ONNX``: a randomly initialised encoder (key encoder + head 0,
  seed 0) exported to ONNX, scored by :func:`revisit.export.pairmap.score_pair`
  (mean cosine distance of the windows covering a pixel);
- ``model``: ``--model FILE.onnx``, or the ``embedding`` file of
  ``--data-dir``'s ``latest.json``, if given.

Not done: a row for an encoder trained on the pair itself.

    .venv/bin/python bench/oscd.py [--window 32] [--stride 8] [--model FILE.onnx | --data-dir DIR]

The figure printed last is the mean AUROC of the best ONNX row.
"""

from __future__ import annotations

import sys
from pathlib import Path

# ``import onnx`` (inside revisit) would import bench/onnx.py with this folder on the path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402
import rasterio  # noqa: E402
from rasterio.errors import NotGeoreferencedWarning  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from revisit.errors import ExportError  # noqa: E402
from revisit.export.pairmap import (  # noqa: E402
    OnnxEncoder,
    Scene,
    cva_map,
    read_canonical,
    reproject_onto,
    score_pair,
)

CITIES = ("aguasclaras", "bercy", "paris", "rennes")
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "oscd"
README_CVA = {"aguasclaras": 0.755, "bercy": 0.787, "paris": 0.943, "rennes": 0.949}


def load_city(root: Path, city: str) -> tuple[Scene, Scene, npt.NDArray[np.bool_]]:
    """BEFORE, AFTER on BEFORE's grid, and the change mask (True = change)."""
    first = read_canonical(root / "images" / city / "imgs_1")
    second = reproject_onto(read_canonical(root / "images" / city / "imgs_2"), first)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(root / "labels" / city / "cm" / f"{city}-cm.tif") as ds:
            labels = ds.read(1)
    if labels.shape != (first.height, first.width):
        raise SystemExit(f"{city}: labels {labels.shape} vs image {(first.height, first.width)}")
    return first, second, labels == 2


def auroc(score: npt.NDArray[np.float32], changed: npt.NDArray[np.bool_]) -> float:
    keep = np.isfinite(score)
    return float(roc_auc_score(changed[keep], score[keep]))


def export_random(path: Path, patch_size: int) -> Path:
    """A randomly initialised encoder as ONNX (torch is needed here, not in pairmap)."""
    import torch

    from revisit.export.onnx import EmbeddingModel, export_model, model_metadata
    from revisit.learner.heads import ContrastiveModel

    torch.manual_seed(0)
    module = EmbeddingModel(ContrastiveModel(queue_size=8))
    metadata = model_metadata(
        module, method="random", step=0, model_version=None, patch_size=patch_size, opset=18
    )
    export_model(module, path, metadata=metadata, opset=18, patch_size=patch_size)
    return path


def published_model(data_dir: Path) -> Path:
    from revisit.export.publish import export_dir, read_manifest

    manifest = read_manifest(data_dir)
    if manifest is None:
        raise SystemExit(f"nothing published under {data_dir}")
    return export_dir(data_dir) / str(manifest["files"]["embedding"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="the oscd/ folder")
    parser.add_argument("--cities", nargs="+", default=list(CITIES))
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--model", type=Path, help="an exported .onnx model to add as a row")
    parser.add_argument("--data-dir", type=Path, help="add the latest published model of DIR")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"OSCD data not found at {args.data}")

    with tempfile.TemporaryDirectory(prefix="revisit-oscd-") as tmp:
        models: dict[str, Path] = {
            "random ONNX": export_random(Path(tmp) / "random.onnx", args.window)
        }
        if args.model is not None:
            models["model"] = args.model
        elif args.data_dir is not None:
            models["model"] = published_model(args.data_dir)
        encoders = {name: OnnxEncoder(path) for name, path in models.items()}

        table: dict[str, dict[str, float]] = {"CVA": {}, **{name: {} for name in encoders}}
        for city in args.cities:
            first, second, changed = load_city(args.data, city)
            table["CVA"][city] = auroc(cva_map(first, second), changed)
            for name, encoder in encoders.items():
                started = time.perf_counter()
                try:
                    score, windows = score_pair(
                        first,
                        second,
                        encoder,
                        window=args.window,
                        stride=args.stride,
                        batch=args.batch,
                    )
                except ExportError as exc:
                    raise SystemExit(f"{city}: {exc}") from exc
                seconds = time.perf_counter() - started
                table[name][city] = auroc(score, changed)
                print(
                    f"{city:12s} {name:12s} {first.width}x{first.height}"
                    f" {windows} windows {seconds:.1f} s"
                    f" ({first.width * first.height / seconds:,.0f} px/s)"
                )

    print()
    print(f"pixel AUROC, window {args.window}, stride {args.stride}")
    header = f"{'row':14s}" + "".join(f"{c:>13s}" for c in args.cities) + f"{'mean':>9s}"
    print(header)
    readme = [README_CVA.get(c, float("nan")) for c in args.cities]
    print(
        f"{'CVA (README)':14s}"
        + "".join(f"{v:13.3f}" for v in readme)
        + f"{float(np.mean(readme)):9.3f}"
    )
    means: dict[str, float] = {}
    for name, row in table.items():
        values = [row[c] for c in args.cities]
        means[name] = float(np.mean(values))
        print(f"{name:14s}" + "".join(f"{v:13.3f}" for v in values) + f"{means[name]:9.3f}")
    best = max((n for n in means if n != "CVA"), key=lambda n: means[n])
    print(f"mean AUROC ({best}): {means[best]:.3f}")


if __name__ == "__main__":
    main()
