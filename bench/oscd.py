"""OSCD: pair change maps scored as users and papers score them, on the four labeled cities.

For each city of ``../shared/data/oscd`` (aguasclaras, bercy, paris, rennes) and
pooled over all their pixels, every row gets: pixel **AUROC**, the **best F1**
over all thresholds (for reference: no user can pick it), and **F1, precision,
recall and Cohen's kappa at the automatic threshold** -- the mask a user gets.
``labels == 2`` is change (see ../shared/data/README.md).

Baselines, in the same run:

- ``CVA``: change-vector analysis, the norm of the difference of per-image
  standardised bands (:func:`revisit.export.pairmap.cva_map`), thresholded with
  revisit's automatic threshold;
- ``PCA-kmeans``: Celik (IEEE GRSL 2009), "Unsupervised change detection in
  satellite images using principal component analysis and k-means
  clustering", on the CVA magnitude as the difference image: every pixel's
  ``h`` x ``h`` neighbourhood (h = 4) projected on the principal components
  (scikit-learn ``PCA``, fitted on non-overlapping blocks, 90 % of the
  variance), two clusters (``KMeans``); its mask is the cluster with the larger
  mean difference, its score (for AUROC) the distance to the unchanged
  centroid minus the distance to the changed one;
- ``random stem`` / ``random hypercolumn``: a randomly initialised encoder
  (seed 0) exported as revisit exports models.

Learned rows: ``--model NAME=FILE.onnx`` (a ``V.dense.onnx`` or a model with
one beside it) and ``--data-dir NAME=DIR`` (the latest model published under
DIR), each scored ``hypercolumn`` and ``stem``; ``--self-train``: per city, a
model trained with revisit's default settings on that pair only, through the
command line (an AOI over the pair, ``ingest``, ``learn --minutes --new-model``,
``export onnx``; the recipe of docs/change-maps.md); ``--adapt DIR``: the same,
but starting from DIR's newest checkpoint (``learn --new-model --init-from``):
the model of DIR adapted to the city. Both scored ``hypercolumn``.

Every learned row goes through :func:`revisit.export.pairmap.pair_change_map`,
what ``revisit changemap pair`` runs, with its defaults: the score COG and the
mask it writes are what is scored (pixels the map leaves as no data -- cloud,
cloud shadow -- count as "no change" in the mask and are left out of AUROC).
The baselines see every pixel.

    .venv/bin/python bench/oscd.py [--model NAME=FILE ...] [--data-dir NAME=DIR ...]
        [--self-train] [--adapt DIR] [--minutes 2] [--cities ...] [--no-clouds]

The figure printed last: pooled F1 at the automatic threshold of the best
learned row against CVA's best F1, and the mean AUROC of that row.
"""

from __future__ import annotations

import sys
from pathlib import Path

# ``import onnx`` (inside revisit) would import bench/onnx.py with this folder first on the
# path; at the end, it still finds realdata.py.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

import argparse  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402
import rasterio  # noqa: E402
from rasterio.errors import NotGeoreferencedWarning  # noqa: E402
from realdata import Workspace, make_tempdir  # noqa: E402
from sklearn.cluster import KMeans  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    cohen_kappa_score,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
)

from revisit.errors import ExportError  # noqa: E402
from revisit.export.changemask import automatic_threshold  # noqa: E402
from revisit.export.pairmap import (  # noqa: E402
    Scene,
    cva_map,
    pair_change_map,
    read_canonical,
    reproject_onto,
)

CITIES = ("aguasclaras", "bercy", "paris", "rennes")
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "oscd"
#: Celik's block side.
PCA_BLOCK = 4


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


def pca_kmeans(
    difference: npt.NDArray[np.float32], *, block: int = PCA_BLOCK, seed: int = 0
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """Celik's PCA-kmeans on a difference image: (score, mask). NaN pixels: score NaN, no change."""
    height, width = difference.shape
    finite = np.isfinite(difference)
    image = np.where(finite, difference, np.nanmedian(difference)).astype(np.float32)
    pad = np.pad(image, ((0, block - 1), (0, block - 1)), mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(pad, (block, block))[:height, :width]
    vectors = windows.reshape(height * width, block * block)
    blocks = image[: height // block * block, : width // block * block]
    fit = blocks.reshape(height // block, block, width // block, block).transpose(0, 2, 1, 3)
    pca = PCA(n_components=0.9, svd_solver="full", random_state=seed)
    pca.fit(fit.reshape(-1, block * block))
    features = pca.transform(vectors)
    km = KMeans(n_clusters=2, n_init=4, random_state=seed).fit(
        features[:: max(1, len(features) // 200_000)]
    )
    labels = km.predict(features)
    means = [
        float(image.ravel()[labels == k].mean()) if (labels == k).any() else -np.inf for k in (0, 1)
    ]
    changed_k = int(np.argmax(means))
    d = np.linalg.norm(features[:, None, :] - km.cluster_centers_[None], axis=2)
    score = (d[:, 1 - changed_k] - d[:, changed_k]).reshape(height, width).astype(np.float32)
    mask = (labels == changed_k).reshape(height, width) & finite
    score[~finite] = np.nan
    return score, mask


@dataclass
class Scored:
    """One row's outcome on one city: scores (NaN = unscored) and the binary mask."""

    score: npt.NDArray[np.float32]
    mask: npt.NDArray[np.bool_]


def auto_mask(score: npt.NDArray[np.float32]) -> npt.NDArray[np.bool_]:
    finite = score[np.isfinite(score)]
    threshold = automatic_threshold(finite)
    return np.isfinite(score) & (score > threshold)


def metrics(rows: list[tuple[Scored, npt.NDArray[np.bool_]]]) -> dict[str, float]:
    """AUROC, best F1, and F1/precision/recall/kappa of the mask, over the given (row, truth)s."""
    score = np.concatenate([r.score.ravel() for r, _ in rows])
    mask = np.concatenate([r.mask.ravel() for r, _ in rows])
    truth = np.concatenate([t.ravel() for _, t in rows])
    keep = np.isfinite(score)
    precision, recall, _ = precision_recall_curve(truth[keep], score[keep])
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return {
        "auroc": float(roc_auc_score(truth[keep], score[keep])),
        "best_f1": float(f1.max()),
        "f1": float(f1_score(truth, mask, zero_division=0.0)),
        "precision": float(precision_score(truth, mask, zero_division=0.0)),
        "recall": float(recall_score(truth, mask, zero_division=0.0)),
        "kappa": float(cohen_kappa_score(truth, mask)),
        "flagged": float(mask.mean()),
        "unscored": float(1.0 - keep.mean()),
    }


def export_random(folder: Path, patch_size: int = 32) -> Path:
    """A randomly initialised encoder exported as revisit publishes one (embedding + dense)."""
    import torch

    from revisit.export.onnx import DenseModel, EmbeddingModel, export_model, model_metadata
    from revisit.learner.heads import ContrastiveModel

    for cls in (EmbeddingModel, DenseModel):
        torch.manual_seed(0)
        module = cls(ContrastiveModel(queue_size=8))
        metadata = model_metadata(
            module, method="random", step=0, model_version=None, patch_size=patch_size, opset=18
        )
        export_model(
            module,
            folder / f"random.{module.output}.onnx",
            metadata=metadata,
            opset=18,
            patch_size=patch_size,
        )
    return folder / "random.dense.onnx"


def published_model(data_dir: Path) -> Path:
    from revisit.export.publish import export_dir, read_manifest

    manifest = read_manifest(data_dir)
    if manifest is None:
        raise SystemExit(f"nothing published under {data_dir}")
    name = manifest["files"].get("dense")
    if name is None:
        raise SystemExit(f"{data_dir}: the published version has no dense model; export again")
    return export_dir(data_dir) / str(name)


def newest_checkpoint(data_dir: Path) -> Path:
    """The newest checkpoint file under DIR/checkpoints (by step)."""
    found = sorted((data_dir / "checkpoints").glob("*/step-*.pt"), key=lambda p: p.name)
    if not found:
        raise SystemExit(f"no checkpoint under {data_dir / 'checkpoints'}")
    return found[-1]


def city_models(
    data: Path, city: str, *, minutes: float, out: Path, scratch: bool, adapt: Path | None
) -> dict[str, Path]:
    """Models trained on the city's own pair through the CLI, with revisit's defaults.

    In one workspace: an AOI over the pair (inset half a chip), a grid at half a
    chip, both dates ingested; then ``learn --minutes M --new-model`` from
    random weights (``self-trained``) and/or from ``adapt``'s checkpoint
    (``--init-from``: ``adapted``), each published with ``export onnx``.
    """
    root = make_tempdir(f"revisit-oscd-{city}-")
    city_dir = data / "images" / city
    models: dict[str, Path] = {}
    try:
        with Workspace(root / "var", settings={}) as ws:
            ws.upgrade()
            settings = ws.load_settings()
            half_chip_m = settings.ingest.chip_size * 10.0 / 2
            locations = ws.add_area(
                city, city_dir / "imgs_1", spacing_m=half_chip_m, inset_m=half_chip_m
            )
            ingest = ws.ingest(city_dir, since="2015-06-23")
            print(
                f"{city:12s} ingested {ingest.scenes} scenes, {ingest.chips} chips"
                f" ({locations} locations) in {ingest.wall_s:.0f} s",
                flush=True,
            )
            runs: list[tuple[str, list[str]]] = []
            if scratch:
                runs.append(("self-trained", []))
            if adapt is not None:
                runs.append(("adapted", ["--init-from", str(adapt)]))
            for name, extra in runs:
                started = time.perf_counter()
                ws.revisit("learn", "--minutes", f"{minutes:g}", "--new-model", *extra)
                files = ws.export_onnx()
                target = out / f"{name}-{city}.dense.onnx"
                shutil.copyfile(files["dense"], target)
                models[name] = target
                print(
                    f"{city:12s} {name}: {minutes:g} min of learning,"
                    f" {time.perf_counter() - started:.0f} s with the export",
                    flush=True,
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return models


def map_with_cli_defaults(
    data: Path, city: str, model: Path, scoring: str, out: Path, *, clouds: bool
) -> Scored:
    """What ``revisit changemap pair`` writes for the city, read back (score COG and mask)."""
    city_dir = data / "images" / city
    target = out / f"{city}-{model.stem}-{scoring}.tif"
    try:
        result = pair_change_map(
            city_dir / "imgs_1",
            city_dir / "imgs_2",
            model=model,
            out=target,
            scoring=scoring,
            clouds=clouds,
        )
    except ExportError as exc:
        raise SystemExit(f"{city}: {exc}") from exc
    with rasterio.open(result.path) as ds:
        score = ds.read(1)
    assert result.mask_path is not None
    with rasterio.open(result.mask_path) as ds:
        mask = ds.read(1) == 1
    return Scored(score, mask)


def _parse_named(items: list[str], option: str) -> dict[str, Path]:
    named: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{option} takes NAME=PATH, got {item!r}")
        named[name] = Path(path)
    return named


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="the oscd/ folder")
    parser.add_argument("--cities", nargs="+", default=list(CITIES))
    parser.add_argument("--model", action="append", default=[], help="NAME=FILE.onnx")
    parser.add_argument("--data-dir", action="append", default=[], help="NAME=DIR")
    parser.add_argument("--self-train", action="store_true", help="train on each city's pair")
    parser.add_argument(
        "--adapt", type=Path, help="adapt DIR's newest checkpoint to each city (--init-from)"
    )
    parser.add_argument("--minutes", type=float, default=2.0, help="learning per city")
    parser.add_argument("--no-clouds", action="store_true", help="maps without cloud masks")
    parser.add_argument("--no-stem", action="store_true", help="skip the stem rows of models")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"OSCD data not found at {args.data}")
    models = _parse_named(args.model, "--model")
    for name, path in _parse_named(args.data_dir, "--data-dir").items():
        models[name] = published_model(path)

    table: dict[str, dict[str, tuple[Scored, npt.NDArray[np.bool_]]]] = {}
    with tempfile.TemporaryDirectory(prefix="revisit-oscd-") as tmp_name:
        tmp = Path(tmp_name)
        models = {"random": export_random(tmp), **models}
        for city in args.cities:
            started = time.perf_counter()
            first, second, changed = load_city(args.data, city)
            cva = cva_map(first, second)
            table.setdefault("CVA", {})[city] = (Scored(cva, auto_mask(cva)), changed)
            score, mask = pca_kmeans(cva)
            table.setdefault("PCA-kmeans", {})[city] = (Scored(score, mask), changed)
            runs = [
                (name, path, s) for name, path in models.items() for s in ("hypercolumn", "stem")
            ]
            if args.no_stem:
                runs = [r for r in runs if r[2] == "hypercolumn" or r[0] == "random"]
            if args.self_train or args.adapt is not None:
                trained = city_models(
                    args.data,
                    city,
                    minutes=args.minutes,
                    out=tmp,
                    scratch=args.self_train,
                    adapt=None if args.adapt is None else newest_checkpoint(args.adapt),
                )
                runs += [(name, path, "hypercolumn") for name, path in trained.items()]
            for name, path, scoring in runs:
                scored = map_with_cli_defaults(
                    args.data, city, path, scoring, tmp, clouds=not args.no_clouds
                )
                table.setdefault(f"{name} {scoring}", {})[city] = (scored, changed)
            print(
                f"{city:12s} {first.width}x{first.height}, {changed.mean():.2%} changed,"
                f" {time.perf_counter() - started:.0f} s",
                flush=True,
            )

    columns = ("auroc", "best_f1", "f1", "precision", "recall", "kappa", "flagged")
    print()
    print("per city: AUROC / best F1 / F1 at the automatic threshold")
    print(f"{'row':26s}" + "".join(f"{c:>22s}" for c in args.cities) + f"{'mean AUROC':>12s}")
    means: dict[str, float] = {}
    pooled: dict[str, dict[str, float]] = {}
    for name, per_city in table.items():
        cells = [metrics([per_city[c]]) for c in args.cities]
        means[name] = float(np.mean([m["auroc"] for m in cells]))
        pooled[name] = metrics([per_city[c] for c in args.cities])
        print(
            f"{name:26s}"
            + "".join(f"{m['auroc']:8.3f}{m['best_f1']:7.3f}{m['f1']:7.3f}" for m in cells)
            + f"{means[name]:12.3f}"
        )
    print()
    print("pooled pixels of all cities (F1, precision, recall, kappa, flagged: at the threshold)")
    print(f"{'row':26s}" + "".join(f"{c:>10s}" for c in columns) + f"{'unscored':>10s}")
    for name, m in pooled.items():
        print(f"{name:26s}" + "".join(f"{m[c]:10.3f}" for c in columns) + f"{m['unscored']:10.3f}")
    learned = [n for n in pooled if not n.startswith(("CVA", "PCA", "random"))]
    best = max(
        learned or [n for n in pooled if n.startswith("random")], key=lambda n: pooled[n]["f1"]
    )
    print(
        f"{best}: pooled F1 at the automatic threshold {pooled[best]['f1']:.3f}"
        f" (CVA best F1 {pooled['CVA']['best_f1']:.3f}, target +0.10), mean AUROC"
        f" {means[best]:.3f} (CVA {means['CVA']:.3f})"
    )


if __name__ == "__main__":
    main()
