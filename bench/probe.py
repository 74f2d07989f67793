"""Linear probes: how well an exported ``features`` model's 512-d features separate real classes.

The model is run as an outside consumer runs it: onnxruntime alone, fed what
its ONNX metadata asks for (``input_name``; ``bands``, picked by name from the
chips' canonical order; ``scale``: input = DN x scale). It never imports the
network's code.

Probe sets (built by ``bench/probe_data.py`` from ``../shared/data`` and kept
under ``var/probe-cache/`` or ``--cache``, so a second run skips the reading):

- ``scl``: 64 px chips of the Level-2A SAFE (its 60 m bands upsampled to
  10 m, B8A for B08, the +1000 DN offset removed), labeled by the majority
  (>= 70 %) of Sen2Cor's scene classification: vegetation, water, clouds,
  cirrus, shadow, ...; at most 150 chips a class, classes of >= 20;
- ``slovenia``: 32 px chips of eo-learn's 101 x 100 patch on its 5 dates,
  labeled by the land-cover majority; only 9 places (8 forest, 1 grassland),
  so it is shown but left out of the mean (a class seen at fewer places than
  there are folds cannot be probed honestly);
- ``oscd-change``: 32 px chip pairs of the 4 labeled OSCD cities, changed
  when >= 5 % of their pixels changed, balanced per city with unchanged pairs;
  a pair's features are ``|f(t2) - f(t1)|`` (band stats: the same on the
  stats); ``oscd-change-1%`` is the same at 1 %, shown, not in the mean;
- ``simulated``: 64 px chips of revisit's simulated world by land-cover class
  (not real: shown, not in the mean).

Chips never overlap, so no fold shares pixels with another (except
``slovenia``'s dates of one place, see above). Rows, on the same chips:

- ``model``: ``--model FILE.onnx``, or the ``features`` file named by
  ``DIR/exports/onnx/latest.json`` for ``--data-dir DIR`` (sha256 checked);
- ``NAME``: each ``--extra NAME=FILE.onnx`` (to compare, say, augmentation policies);
- ``random``: the same architecture with random weights (seed ``--seed``),
  exported to ONNX in a temporary directory and run the same way; when the
  model's metadata has ``band_mean``/``band_std`` the random encoder gets
  the same input standardisation (``set_band_statistics``, if the encoder has it)
  and pools as the model does (its ``features_pooling``);
- ``band stats``: each band's mean and standard deviation over the chip (24 numbers);
- ``majority``: always the most frequent class of the training fold (chance).

Each cell is the accuracy of ``StandardScaler`` + ``LogisticRegression``
(C = 1, or chosen from 0.01/0.1/1 by an inner 3-fold search with ``--tune-c``),
mean ± std over ``RepeatedStratifiedKFold(5 splits, 3 repeats, seed 0)``. The
solver is ``newton-cg``: the same convex objective as the default ``lbfgs``,
hence the same minimum, in about 20 Newton steps instead of about 500 gradient
steps (some 10x faster on 512-d features, which is what keeps a run to minutes).

    .venv/bin/python bench/probe.py [--model FILE.onnx | --data-dir DIR]
        [--extra NAME=FILE.onnx ...] [--sets scl slovenia oscd simulated]
        [--cache DIR | --no-cache] [--threads 2] [--tune-c]

The figure printed last is the model's mean accuracy over the real sets in the
mean, with those of band stats and random weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

# ``import onnx`` (inside revisit) would import bench/onnx.py with this folder on the path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import hashlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from types import ModuleType  # noqa: E402
from typing import TYPE_CHECKING, Any, cast  # noqa: E402

import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402
import onnxruntime as ort  # noqa: E402
from sklearn.dummy import DummyClassifier  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import (  # noqa: E402
    GridSearchCV,
    RepeatedStratifiedKFold,
    cross_val_score,
)
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from revisit.types import CANONICAL_BANDS  # noqa: E402

if TYPE_CHECKING:
    from revisit.export.onnx import FeaturePooling


def _load_sibling(name: str) -> ModuleType:
    """A module of this folder, by file (the folder is off ``sys.path``, see above)."""
    key = f"_revisit_bench_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, _HERE / f"{name}.py")
    if spec is None or spec.loader is None:  # pragma: no cover - the file is beside this one
        raise ImportError(f"cannot load {name}.py from {_HERE}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


probe_data = _load_sibling("probe_data")

REPO = _HERE.parent
DATA = REPO.parent / "shared" / "data"
CACHE = REPO / "var" / "probe-cache"
SETS = ("scl", "slovenia", "oscd", "simulated")
N_SPLITS = 5
N_REPEATS = 3
C_GRID = (0.01, 0.1, 1.0)
BATCH = 64

F32 = npt.NDArray[np.float32]
Features = Callable[[Any], npt.NDArray[np.floating[Any]]]


class OnnxFeatures:
    """An exported ``features`` model run with onnxruntime from its metadata alone.

    Args:
        path: The ``.onnx`` file.
        threads: onnxruntime's intra-op threads.
        batch: Chips per call.

    Raises:
        SystemExit: The model's metadata lacks what a consumer needs, or asks
            for a band the chips do not have.
    """

    def __init__(self, path: Path, *, threads: int = 2, batch: int = BATCH) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.path = path
        self.batch = batch
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        missing = [k for k in ("input_name", "bands", "scale") if not self.metadata.get(k)]
        if missing:
            raise SystemExit(f"{path.name}: metadata lacks {', '.join(missing)}")
        self.input_name = self.metadata["input_name"]
        self.bands = self.metadata["bands"].split(",")
        self.scale = np.float32(float(self.metadata["scale"]))
        absent = [b for b in self.bands if b not in CANONICAL_BANDS]
        if absent:
            raise SystemExit(f"{path.name} wants bands the chips lack: {', '.join(absent)}")
        self.band_index = [CANONICAL_BANDS.index(b) for b in self.bands]
        self.min_size = int(self.metadata.get("min_size") or 1)

    def __call__(self, chips: npt.NDArray[np.uint16]) -> F32:
        """Features of (N, 12, S, S) DN chips in canonical band order, (N, D) float32."""
        if chips.shape[-1] < self.min_size or chips.shape[-2] < self.min_size:
            raise SystemExit(f"{self.path.name}: chips of {chips.shape[-1]} px < min_size")
        out = []
        for start in range(0, chips.shape[0], self.batch):
            part = chips[start : start + self.batch][:, self.band_index]
            x = np.ascontiguousarray(part.astype(np.float32) * self.scale)
            (y,) = self.session.run(None, {self.input_name: x})
            out.append(np.asarray(y, dtype=np.float32))
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def band_stats(chips: npt.NDArray[np.uint16]) -> F32:
    """Each band's mean and standard deviation over each chip, in reflectance: (N, 24)."""
    x = chips.astype(np.float32) * np.float32(1e-4)
    return np.concatenate([x.mean(axis=(2, 3)), x.std(axis=(2, 3))], axis=1)


def set_features(probe: Any, extract: Callable[[npt.NDArray[np.uint16]], F32]) -> F32:
    """Features of a set's samples: of each chip, or ``|f(t2) - f(t1)|`` of each pair."""
    if not probe.paired:
        return extract(probe.chips)
    n = probe.chips.shape[0]
    both = extract(probe.chips.reshape(n * 2, *probe.chips.shape[2:])).reshape(n, 2, -1)
    return np.abs(both[:, 1] - both[:, 0])


@dataclass(frozen=True)
class Score:
    """Cross-validated accuracy of one row on one set."""

    mean: float
    std: float
    folds: int


def n_splits_for(labels: npt.NDArray[np.int64]) -> int:
    """:data:`N_SPLITS`, or fewer when the smallest class has fewer members."""
    counts = np.bincount(labels)
    return int(min(N_SPLITS, counts[counts > 0].min()))


def probe_score(
    features: npt.NDArray[np.floating[Any]],
    labels: npt.NDArray[np.int64],
    *,
    majority: bool = False,
    tune_c: bool = False,
) -> Score:
    """Accuracy of a linear probe (or of the majority guess) under repeated stratified k-fold.

    Args:
        features: (N, D).
        labels: (N,) classes.
        majority: Score ``DummyClassifier(most_frequent)`` instead.
        tune_c: Choose C from :data:`C_GRID` by an inner 3-fold search.

    Returns:
        Mean and std over the folds; NaN when there are fewer than 2 classes or 2
        members of the smallest.
    """
    if len(np.unique(labels)) < 2 or n_splits_for(labels) < 2:
        return Score(float("nan"), float("nan"), 0)
    splits = n_splits_for(labels)
    cv = RepeatedStratifiedKFold(n_splits=splits, n_repeats=N_REPEATS, random_state=0)
    estimator: Any
    if majority:
        estimator = DummyClassifier(strategy="most_frequent")
    else:
        estimator = make_pipeline(
            StandardScaler(), LogisticRegression(max_iter=2000, solver="newton-cg")
        )
        if tune_c:
            estimator = GridSearchCV(
                estimator, {"logisticregression__C": list(C_GRID)}, cv=min(3, splits)
            )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence notes on random features
        scores = cross_val_score(estimator, features, labels, cv=cv, scoring="accuracy")
    return Score(float(scores.mean()), float(scores.std()), len(scores))


def in_mean(probe: Any) -> tuple[bool, str]:
    """Whether a set enters the mean over real sets, and why not."""
    if not probe.real:
        return False, "not real imagery"
    if not probe.headline:
        return False, "a variant of another set"
    places = probe.groups_per_class()
    few = [f"{name} from {k} place{'s' if k > 1 else ''}" for name, k in places.items() if k < 5]
    if few:
        return False, f"{', '.join(few)}: too few places for {N_SPLITS} honest folds"
    return True, ""


# -- the rows ----------------------------------------------------------------------------------


def parse_floats(text: str | None, count: int) -> list[float] | None:
    """``"0.1,0.2,..."`` with ``count`` values, or None when absent or malformed."""
    if not text:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        return None
    return values if len(values) == count else None


def export_random(
    path: Path,
    *,
    seed: int,
    band_mean: list[float] | None,
    band_std: list[float] | None,
    pooling: FeaturePooling = "levels",
) -> tuple[Path, bool]:
    """A randomly initialised encoder exported to ONNX; True when it got the band statistics.

    ``pooling`` is the model's ``features_pooling`` (``levels`` or ``last``), so that
    the random row pools as the model does.
    """
    import torch

    from revisit.export.onnx import FeatureModel, export_model, model_metadata
    from revisit.learner.heads import ContrastiveModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ContrastiveModel(queue_size=64)
    standardised = False
    if band_mean is not None and band_std is not None:
        model.set_band_statistics(band_mean, band_std)
        standardised = True
    module = FeatureModel(model, pooling=pooling)
    metadata = model_metadata(
        module, method="random", step=0, model_version=None, patch_size=64, opset=18
    )
    export_model(module, path, metadata=metadata, opset=18, patch_size=64)
    return path, standardised


def published_features(data_dir: Path) -> Path:
    """The ``features`` model ``latest.json`` names, its sha256 checked.

    Raises:
        SystemExit: Nothing is published, the file is missing, or it does not
            match its hash.
    """
    from revisit.export.publish import EXPORT_DIR, MANIFEST

    manifest_path = data_dir / EXPORT_DIR / MANIFEST
    if not manifest_path.is_file():
        raise SystemExit(f"nothing published under {data_dir} (no {EXPORT_DIR}/{MANIFEST})")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    path = manifest_path.parent / str(manifest["files"]["features"])
    if not path.is_file():
        raise SystemExit(f"{MANIFEST} names {path.name}, which is not there")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    expected = manifest.get("sha256", {}).get("features")
    if expected and digest != expected:
        raise SystemExit(f"{path.name}: sha256 {digest} does not match {MANIFEST}")
    return path


def parse_extra(items: Sequence[str]) -> dict[str, Path]:
    """``NAME=FILE.onnx`` items as names to paths."""
    extras: dict[str, Path] = {}
    for item in items:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise SystemExit(f"--extra wants NAME=FILE.onnx, not {item!r}")
        if name in ("model", "random", "band stats", "majority") or name in extras:
            raise SystemExit(f"--extra name {name!r} is taken")
        extras[name] = Path(file)
    return extras


# -- the sets ----------------------------------------------------------------------------------


def build_sets(
    names: Sequence[str], *, data: Path, cache: Path | None
) -> tuple[list[Any], list[str]]:
    """The probe sets asked for that have their data, and a note per set skipped."""
    sets: list[Any] = []
    skipped: list[str] = []
    safe = next(iter(sorted((data / "s2_l2a_safe_T29UNU").glob("*.SAFE"))), None)
    sources: dict[str, tuple[Path | None, Callable[[], list[Any]]]] = {
        "scl": (
            safe,
            lambda: probe_data.cached(cache, "scl", probe_data.build_scl, safe=safe),
        ),
        "slovenia": (
            data / "eolearn_slovenia" / "REFERENCE_SCENES.npy",
            lambda: probe_data.cached(
                cache, "slovenia", probe_data.build_slovenia, root=data / "eolearn_slovenia"
            ),
        ),
        "oscd": (
            data / "oscd" / "labels",
            lambda: probe_data.cached(cache, "oscd", probe_data.build_oscd, root=data / "oscd"),
        ),
        "simulated": (
            None,
            lambda: probe_data.cached(cache, "simulated", probe_data.build_simulated),
        ),
    }
    for name in names:
        needed, build = sources[name]
        if name != "simulated" and (needed is None or not needed.exists()):
            skipped.append(f"{name}: skipped, its data is not under {data}")
            continue
        started = time.perf_counter()
        built = build()
        print(f"set {name}: {time.perf_counter() - started:.1f} s")
        sets.extend(built)
    return sets, skipped


# -- the table ---------------------------------------------------------------------------------


def cell(score: Score | None) -> str:
    """``0.812 ± 0.031``, or ``n/a``."""
    if score is None or not np.isfinite(score.mean):
        return "n/a"
    return f"{score.mean:.3f} ± {score.std:.3f}"


def table(
    rows: Sequence[str],
    sets: Sequence[Any],
    scores: dict[tuple[str, str], Score],
    means: dict[str, float],
) -> list[str]:
    """The markdown table: a row per row name, a column per set, and the mean over real sets."""
    headers = []
    for s in sets:
        mark = "" if in_mean(s)[0] else "†"
        headers.append(f"{s.name}{mark} (n={s.n}, {len(s.class_names)} cl.)")
    headers.append("mean (real)")
    lines = [
        "| row | " + " | ".join(headers) + " |",
        "|---|" + "---:|" * len(headers),
    ]
    for row in rows:
        cells = [cell(scores.get((row, s.name))) for s in sets]
        mean = means.get(row, float("nan"))
        cells.append(f"{mean:.3f}" if np.isfinite(mean) else "n/a")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def figure(means: dict[str, float], learned: Sequence[str]) -> str:
    """The last line: the model's mean over real sets against band stats and random."""

    def fmt(name: str) -> str:
        value = means.get(name, float("nan"))
        return f"{value:.2f}" if np.isfinite(value) else "n/a"

    lead = learned[0] if learned else "random"
    others = [n for n in (*learned[1:], "band stats", "random") if n != lead]
    rest = ", ".join(f"{n} {fmt(n)}" for n in others)
    return f"probe: {lead} {fmt(lead)} mean accuracy over real sets ({rest})"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--model", type=Path, help="an exported features .onnx")
    where.add_argument("--data-dir", type=Path, help="use the features model DIR published")
    parser.add_argument(
        "--extra", action="append", default=[], metavar="NAME=FILE", help="another model row"
    )
    parser.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where built sets are kept")
    parser.add_argument("--no-cache", action="store_true", help="build the sets afresh, keep none")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime and torch threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-weights row")
    parser.add_argument("--tune-c", action="store_true", help="choose C by inner 3-fold CV")
    args = parser.parse_args(argv)
    began = time.perf_counter()

    models: dict[str, Path] = {}
    if args.model is not None:
        models["model"] = args.model
    elif args.data_dir is not None:
        models["model"] = published_features(args.data_dir)
    models.update(parse_extra(args.extra))
    for name, path in models.items():
        if not path.is_file():
            raise SystemExit(f"{name}: no such model {path}")

    sets, skipped = build_sets(
        args.sets, data=args.data, cache=None if args.no_cache else args.cache
    )
    if not sets:
        raise SystemExit("no probe set could be built: " + "; ".join(skipped))

    with tempfile.TemporaryDirectory(prefix="revisit-probe-") as tmp:
        encoders = {name: OnnxFeatures(path, threads=args.threads) for name, path in models.items()}
        reference = encoders.get("model")
        meta = reference.metadata if reference is not None else {}
        band_mean = parse_floats(meta.get("band_mean"), len(CANONICAL_BANDS))
        band_std = parse_floats(meta.get("band_std"), len(CANONICAL_BANDS))
        import torch

        torch.set_num_threads(args.threads)
        started = time.perf_counter()
        # A model from before ``features_pooling`` existed pooled layer4 alone.
        pooling = meta.get("features_pooling") or ("last" if meta else "levels")
        if pooling not in ("levels", "last"):
            raise SystemExit(f"the model's features_pooling {pooling!r} is not levels or last")
        random_path, standardised = export_random(
            Path(tmp) / "random.onnx",
            seed=args.seed,
            band_mean=band_mean,
            band_std=band_std,
            pooling=cast("FeaturePooling", pooling),
        )
        note = "with the model's band statistics" if standardised else "no band statistics"
        note += f", {pooling} pooling"
        seconds = time.perf_counter() - started
        print(f"random weights (seed {args.seed}, {note}) exported in {seconds:.1f} s")
        encoders["random"] = OnnxFeatures(random_path, threads=args.threads)

        rows: dict[str, Features] = {
            name: (lambda s, e=enc: set_features(s, e)) for name, enc in encoders.items()
        }
        rows["band stats"] = lambda s: set_features(s, band_stats)
        scores: dict[tuple[str, str], Score] = {}
        for s in sets:
            for row, features_of in rows.items():
                started = time.perf_counter()
                x = features_of(s)
                extracted = time.perf_counter() - started
                scores[(row, s.name)] = probe_score(x, s.labels, tune_c=args.tune_c)
                print(
                    f"{s.name:16s} {row:12s} {x.shape[1]:4d}-d features {extracted:5.1f} s,"
                    f" probe {time.perf_counter() - started - extracted:5.1f} s"
                )
            scores[("majority", s.name)] = probe_score(np.zeros((s.n, 1)), s.labels, majority=True)

    names = [*rows, "majority"]
    headline = [s for s in sets if in_mean(s)[0]]
    means = {
        row: float(np.mean([scores[(row, s.name)].mean for s in headline]))
        if headline
        else float("nan")
        for row in names
    }
    print()
    for s in sets:
        counts = ", ".join(f"{k} {v}" for k, v in s.counts().items())
        ok, why = in_mean(s)
        print(
            f"- {s.name}: n={s.n} ({counts}); {s.note}" + ("" if ok else f"; † not in mean: {why}")
        )
    for line in skipped:
        print(f"- {line}")
    print()
    print(
        f"accuracy, mean ± std over {N_REPEATS}x{N_SPLITS}-fold stratified CV;"
        f" StandardScaler + LogisticRegression ({'C by inner CV' if args.tune_c else 'C=1'})"
    )
    for line in table(names, sets, scores, means):
        print(line)
    print()
    print(f"total {time.perf_counter() - began:.0f} s")
    learned = [n for n in models]
    print(figure(means, learned))


if __name__ == "__main__":
    main()
