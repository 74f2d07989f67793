"""OSCD: pixel AUROC of dense pair change maps on the four real Onera cities.

For each city of ``../shared/data/oscd`` (aguasclaras, bercy, paris, rennes),
``imgs_1`` is read on its own 10 m grid and ``imgs_2`` warped onto it
(:func:`revisit.export.pairmap.read_canonical` / ``reproject_onto``); each row
scores every pixel and is ranked against the label mask (``labels == 2`` is
change) with ``sklearn.metrics.roc_auc_score``. Rows:

- ``CVA``: change-vector analysis (per-image standardised bands, norm of the
  difference); the data README gives 0.755 / 0.787 / 0.943 / 0.949;
- ``random ONNX``: a randomly initialised encoder (key encoder + head 0,
  seed 0) exported to ONNX;
- ``model``: ``--model FILE.onnx``, or the ``embedding`` file of
  ``--data-dir``'s ``latest.json``, if given;
- ``self-trained`` (``--self-train``): for each city, a model trained with the
  online learner on the imagery of that pair only, through the revisit command
  line (:class:`realdata.Workspace`). In a temporary data directory, with its
  embedded PostGIS held up until the city is done: ``revisit db upgrade``; an AOI
  of the footprint of ``imgs_1`` shrunk by half a chip, so chips lie inside the
  image (``revisit aoi add --geojson``); a grid of chip centres at half a chip's
  spacing (``revisit sample --aoi --grid --spacing``); both dates ingested
  (``revisit ingest --source local --path CITY``); ``revisit learn --steps`` on
  the CPU; ``revisit export onnx``, whose ``embedding`` model scores the city.

Each model is scored both ways :func:`revisit.export.pairmap.pair_change_map`
knows: ``dense`` (:func:`~revisit.export.pairmap.score_dense`: the stem at every
pixel on standardised bands) and ``windows``
(:func:`~revisit.export.pairmap.score_pair`: the mean cosine distance of the
``--window`` windows covering a pixel, every ``--stride`` pixels; the
self-trained model's windows are ``--chip-size``).

  Learner settings (method ``caco``): ``batch_size`` min(32, locations),
  ``queue_size`` 1024, ``warmup_steps`` steps // 4, ``refit_every``
  max(1, steps // 10), ``checkpoint_every`` steps, ``threads`` 2. The two OSCD
  dates are 9 to 25 months apart, so no k+ lies in the 14 to 120 day window and k+
  falls back to a second (augmented) view of q; for k_lt the older date must be
  admissible for the newer, hence ``long_min_days`` 30 and ``doy_window_days``
  182 (about any day of year; 183, which LearnerSettings accepts, fails
  MiningPolicy's half-year check).

    .venv/bin/python bench/oscd.py [--window 32] [--stride 8] [--model FILE.onnx | --data-dir DIR]
        [--self-train [--steps 200] [--chip-size 32]]

The figure printed last is the mean AUROC of the best learned row (``model`` or
``self-trained``, either scoring; the random rows when neither is run) against
CVA's.
"""

from __future__ import annotations

import sys
from pathlib import Path

# ``import onnx`` (inside revisit) would import bench/onnx.py with this folder first on the
# path; at the end, it still finds realdata.py.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402
import rasterio  # noqa: E402
from rasterio.errors import NotGeoreferencedWarning  # noqa: E402
from realdata import TWO_DATE_LEARNER, Workspace, make_tempdir  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from revisit.errors import ExportError  # noqa: E402
from revisit.export.pairmap import (  # noqa: E402
    OnnxEncoder,
    Scene,
    StemEncoder,
    cva_map,
    read_canonical,
    reproject_onto,
    score_dense,
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


def _self_train(data: Path, city: str, *, steps: int, chip_size: int, out: Path) -> Path:
    """Train on the city's own pair (see the module docstring) and return its embedding ONNX."""
    import shutil

    root = make_tempdir(f"revisit-oscd-{city}-")
    city_dir = data / "images" / city
    ingest_settings = {"chip_size": chip_size}
    try:
        with Workspace(root / "var", settings={"ingest": ingest_settings}) as ws:
            ws.upgrade()
            half_chip_m = chip_size * 10.0 / 2
            locations = ws.add_area(
                city, city_dir / "imgs_1", spacing_m=half_chip_m, inset_m=half_chip_m
            )
            ingest = ws.ingest(city_dir)
            print(
                f"{city:12s} ingested {ingest.scenes} scenes, {ingest.chips} chips"
                f" ({locations} locations) in {ingest.wall_s:.0f} s"
            )
            learner = {
                "method": "caco",
                "batch_size": max(2, min(32, locations)),
                "queue_size": 1024,
                "warmup_steps": steps // 4,
                "refit_every": max(1, steps // 10),
                "checkpoint_every": max(1, steps),
                **TWO_DATE_LEARNER,
                "threads": 2,
                "seed": 0,
            }
            ws.configure({"ingest": ingest_settings, "learner": learner})
            result = ws.learn(steps=steps, method="caco")
            print(
                f"{city:12s} trained {result.steps} steps in {result.seconds:.0f} s,"
                f" mean loss {result.mean_loss:.3f}"
            )
            target = out / f"self-{city}.onnx"
            shutil.copyfile(ws.export_onnx()["embedding"], target)
            return target
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="the oscd/ folder")
    parser.add_argument("--cities", nargs="+", default=list(CITIES))
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--model", type=Path, help="an exported .onnx model to add as a row")
    parser.add_argument("--data-dir", type=Path, help="add the latest published model of DIR")
    parser.add_argument(
        "--self-train",
        action="store_true",
        help="add a row for a model trained with the online learner on each city's own pair",
    )
    parser.add_argument("--steps", type=int, default=200, help="learner steps per city")
    parser.add_argument("--chip-size", type=int, default=32, help="chip side of --self-train")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"OSCD data not found at {args.data}")

    with tempfile.TemporaryDirectory(prefix="revisit-oscd-") as tmp:
        models: dict[str, Path] = {"random": export_random(Path(tmp) / "random.onnx", args.window)}
        if args.model is not None:
            models["model"] = args.model
        elif args.data_dir is not None:
            models["model"] = published_model(args.data_dir)

        table: dict[str, dict[str, float]] = {"CVA": {}}
        for city in args.cities:
            first, second, changed = load_city(args.data, city)
            table["CVA"][city] = auroc(cva_map(first, second), changed)
            scorers = [(name, path, args.window) for name, path in models.items()]
            if args.self_train:
                path = _self_train(
                    args.data, city, steps=args.steps, chip_size=args.chip_size, out=Path(tmp)
                )
                scorers.append(("self-trained", path, args.chip_size))
            for name, path, window in scorers:
                for scoring in ("dense", "windows"):
                    started = time.perf_counter()
                    try:
                        if scoring == "dense":
                            score = score_dense(first, second, StemEncoder(path))
                        else:
                            score, _ = score_pair(
                                first,
                                second,
                                OnnxEncoder(path),
                                window=window,
                                stride=args.stride,
                                batch=args.batch,
                            )
                    except ExportError as exc:
                        raise SystemExit(f"{city}: {exc}") from exc
                    seconds = time.perf_counter() - started
                    row = f"{name} {scoring}"
                    table.setdefault(row, {})[city] = auroc(score, changed)
                    print(
                        f"{city:12s} {row:22s} {first.width}x{first.height}"
                        f" {seconds:.1f} s ({first.width * first.height / seconds:,.0f} px/s)"
                    )

    print()
    print(f"pixel AUROC; windows: window {args.window}, stride {args.stride}")
    header = f"{'row':22s}" + "".join(f"{c:>13s}" for c in args.cities) + f"{'mean':>9s}"
    print(header)
    readme = [README_CVA.get(c, float("nan")) for c in args.cities]
    print(
        f"{'CVA (README)':22s}"
        + "".join(f"{v:13.3f}" for v in readme)
        + f"{float(np.mean(readme)):9.3f}"
    )
    means: dict[str, float] = {}
    for name, row in table.items():
        values = [row[c] for c in args.cities]
        means[name] = float(np.mean(values))
        print(f"{name:22s}" + "".join(f"{v:13.3f}" for v in values) + f"{means[name]:9.3f}")
    learned = [n for n in means if n.startswith(("model", "self-trained"))]
    best = max(learned or [n for n in means if n != "CVA"], key=lambda n: means[n])
    print(f"{best} mean AUROC: {means[best]:.3f} (CVA: {means['CVA']:.3f})")


if __name__ == "__main__":
    main()
