"""Automatic change thresholds on the four labelled OSCD cities: F1 at the threshold chosen.

For each city of ``../shared/data/oscd`` (loaded as ``bench/oscd.py`` does:
``imgs_2`` warped onto ``imgs_1``'s 10 m grid, ``labels == 2`` is change) and
each score map -- ``CVA`` (:func:`revisit.export.pairmap.cva_map`) and, unless
``--no-dense``, ``dense`` (:func:`~revisit.export.pairmap.score_dense`, the
stem of a random encoder exported as in ``bench/oscd.py``) -- the score is
written as a float32 COG on the city's grid, and
:func:`revisit.export.changemask.write_change_mask` makes the mask with each
automatic method of :data:`~revisit.export.changemask.THRESHOLD_METHODS`
(the real code path: sample, threshold, COG). The mask is compared with the
labels on the valid pixels: precision, recall and F1 per city and pooled (the
counts of the four cities summed), and the share of pixels flagged. The
``best F1`` row is the reference: for each city the threshold that maximises
its F1 (``sklearn.metrics.precision_recall_curve``), an oracle no automatic
method can beat per city.

Then a stress test of each method on the same scores, through
:func:`~revisit.export.changemask.automatic_threshold` on the arrays: ten
pixels set to 100x the maximum (extreme values: clouds, saturation), one pixel
at 10x, and ten pixels at 1e-6 times the minimum (near-zero scores).

``--opening R`` and ``--min-area M`` add rows for the default method with
that clean-up (a binary opening of radius R pixels; regions under M m² removed).
Rows marked ``*`` are ablations of ``triangle`` that revisit does not offer
(on the raw scores; on the log of all positive scores, not only the upper
half), computed on the arrays.

    .venv/bin/python bench/threshold.py [--no-dense] [--opening 1] [--min-area 300]

The figure printed last is the pooled F1 of the default method on CVA, with
the pooled best F1.
"""

from __future__ import annotations

import sys
from pathlib import Path

# ``import onnx`` (inside revisit) would import bench/onnx.py with this folder first on the
# path; at the end, it still finds oscd.py.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402
import rasterio  # noqa: E402
from oscd import CITIES, DATA, export_random, load_city  # noqa: E402
from skimage.filters import threshold_triangle  # noqa: E402
from sklearn.metrics import precision_recall_curve  # noqa: E402

from revisit.export.changemap import write_float_cog  # noqa: E402
from revisit.export.changemask import (  # noqa: E402
    DEFAULT_THRESHOLD_METHOD,
    THRESHOLD_METHODS,
    automatic_threshold,
    write_change_mask,
)
from revisit.export.pairmap import StemEncoder, cva_map, score_dense  # noqa: E402

Bool = npt.NDArray[np.bool_]
Scores = npt.NDArray[np.float32]


@dataclass
class Counts:
    """Confusion counts over valid pixels, summed over cities."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    valid: int = 0

    def add(self, predicted: Bool, truth: Bool) -> Counts:
        self.tp += int(np.count_nonzero(predicted & truth))
        self.fp += int(np.count_nonzero(predicted & ~truth))
        self.fn += int(np.count_nonzero(~predicted & truth))
        self.valid += int(predicted.size)
        return self

    @property
    def precision(self) -> float:
        return self.tp / max(self.tp + self.fp, 1)

    @property
    def recall(self) -> float:
        return self.tp / max(self.tp + self.fn, 1)

    @property
    def f1(self) -> float:
        return 2 * self.tp / max(2 * self.tp + self.fp + self.fn, 1)

    @property
    def flagged(self) -> float:
        return (self.tp + self.fp) / max(self.valid, 1)


@dataclass
class Row:
    name: str
    pooled: Counts = field(default_factory=Counts)
    cities: dict[str, Counts] = field(default_factory=dict)
    seconds: float = 0.0


def best_f1_prediction(score: Scores, truth: Bool) -> Bool:
    """The prediction at the threshold that maximises this city's F1 (the oracle)."""
    precision, recall, thresholds = precision_recall_curve(truth, score)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1]))
    return score >= thresholds[best]


def _log_positive(values: Scores) -> npt.NDArray[np.float64]:
    return np.log(values[values > 0].astype(np.float64))


#: Ablations of ``triangle``, not offered by revisit: what its two choices buy.
ABLATIONS: dict[str, Callable[[Scores], float]] = {
    "triangle on raw scores*": lambda v: float(threshold_triangle(v)),
    "triangle, all log*": lambda v: float(np.exp(threshold_triangle(_log_positive(v)))),
}


def threshold_of(method: str, values: Scores) -> float:
    if method in ABLATIONS:
        return ABLATIONS[method](values)
    return automatic_threshold(values, method)


def stressed(kind: str, score: Scores) -> Scores:
    out = score.copy()
    if kind == "10 at 100x max":
        out[:10] = score.max() * 100
    elif kind == "1 at 10x max":
        out[:1] = score.max() * 10
    elif kind == "10 near zero":
        out[:10] = score.min() * 1e-6
    return out


def score_maps(args: argparse.Namespace, tmp: Path) -> dict[str, Callable[..., Scores]]:
    maps: dict[str, Callable[..., Scores]] = {"CVA": cva_map}
    if not args.no_dense:
        folder = tmp / "random"
        folder.mkdir()
        export_random(folder, 32)  # the embedding and dense models of a random encoder
        stem = StemEncoder(folder / "random.embedding.onnx")
        maps["dense"] = lambda first, second: score_dense(first, second, stem)
    return maps


def print_table(title: str, rows: list[Row], cities: list[str]) -> None:
    print()
    print(title)
    width = max(24, *(len(row.name) + 1 for row in rows))
    head = f"{'method':{width}s}{'F1':>7s}{'P':>7s}{'R':>7s}{'flag%':>7s}"
    print(head + "".join(f"{c[:11]:>19s}" for c in cities))
    for row in rows:
        p = row.pooled
        line = (
            f"{row.name:{width}s}{p.f1:7.3f}{p.precision:7.3f}{p.recall:7.3f}{p.flagged * 100:7.2f}"
        )
        for c in cities:
            city = row.cities[c]
            line += f"{city.f1:11.3f} ({city.flagged * 100:4.1f}%)"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="the oscd/ folder")
    parser.add_argument("--cities", nargs="+", default=list(CITIES))
    parser.add_argument("--no-dense", action="store_true", help="CVA only")
    parser.add_argument("--opening", type=int, default=0, help="add a row with this opening")
    parser.add_argument("--min-area", type=float, default=0.0, help="add a row with this MMU")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"OSCD data not found at {args.data}")

    results: dict[str, list[Row]] = {}
    stress: dict[str, list[Row]] = {}
    stresses = ("10 at 100x max", "1 at 10x max", "10 near zero")
    with tempfile.TemporaryDirectory(prefix="revisit-threshold-") as name:
        tmp = Path(name)
        maps = score_maps(args, tmp)
        cities = {city: load_city(args.data, city) for city in args.cities}
        for map_name, scorer in maps.items():
            variants: list[tuple[str, str, int, float]] = [
                (m, m, 0, 0.0) for m in THRESHOLD_METHODS
            ]
            if args.opening:
                variants.append(
                    (
                        f"{DEFAULT_THRESHOLD_METHOD} open {args.opening}",
                        DEFAULT_THRESHOLD_METHOD,
                        args.opening,
                        0.0,
                    )
                )
            if args.min_area:
                variants.append(
                    (
                        f"{DEFAULT_THRESHOLD_METHOD} mmu {args.min_area:g} m2",
                        DEFAULT_THRESHOLD_METHOD,
                        0,
                        args.min_area,
                    )
                )
            rows = [Row(label) for label, *_ in variants]
            ablations = [Row(name) for name in ABLATIONS]
            best = Row("best F1 (oracle)")
            stress_rows = [
                Row(f"{m}: {s}") for m in (*THRESHOLD_METHODS, *ABLATIONS) for s in stresses
            ]
            for city, (first, second, changed) in cities.items():
                score = scorer(first, second)
                score_path = tmp / f"{map_name}-{city}.tif"
                write_float_cog(
                    score,
                    score_path,
                    crs=first.crs,
                    transform=first.transform,
                    description=map_name,
                    units="score",
                    tags={},
                )
                for row, (_label, method, opening, min_area) in zip(rows, variants, strict=True):
                    started = time.perf_counter()
                    result = write_change_mask(
                        score_path,
                        mask_path=tmp / "mask.tif",
                        polygons_path=None,
                        method=method,
                        opening_radius_px=opening,
                        min_area_m2=min_area,
                    )
                    row.seconds += time.perf_counter() - started
                    with rasterio.open(result.mask_path) as ds:
                        mask = ds.read(1)
                    valid = mask != 255
                    predicted, truth = mask[valid] == 1, changed[valid]
                    row.cities[city] = Counts().add(predicted, truth)
                    row.pooled.add(predicted, truth)
                finite = np.isfinite(score)
                values, truth = score[finite], changed[finite]
                for row in ablations:
                    predicted = values > threshold_of(row.name, values)
                    row.cities[city] = Counts().add(predicted, truth)
                    row.pooled.add(predicted, truth)
                predicted = best_f1_prediction(values, truth)
                best.cities[city] = Counts().add(predicted, truth)
                best.pooled.add(predicted, truth)
                for row in stress_rows:
                    method, kind = row.name.split(": ")
                    threshold = threshold_of(method, stressed(kind, values))
                    row.cities[city] = Counts().add(values > threshold, truth)
                    row.pooled.add(values > threshold, truth)
                print(f"{map_name:6s} {city:12s} {first.width}x{first.height} done")
            results[map_name] = [*rows, *ablations, best]
            stress[map_name] = stress_rows

    names = list(args.cities)
    for map_name, rows in results.items():
        print_table(
            f"{map_name}: F1 / precision / recall pooled, then F1 (flagged) per city", rows, names
        )
        print(
            "seconds per city (write_change_mask): "
            + ", ".join(f"{r.name} {r.seconds / len(names):.2f}" for r in rows if r.seconds)
        )
    for map_name, rows in stress.items():
        print_table(f"{map_name}, stressed scores (automatic_threshold on the arrays)", rows, names)
    default = next(r for r in results["CVA"] if r.name == DEFAULT_THRESHOLD_METHOD)
    best = results["CVA"][-1]
    print()
    print(
        f"pooled F1 at the automatic threshold ({DEFAULT_THRESHOLD_METHOD}, CVA):"
        f" {default.pooled.f1:.3f} (best-F1 {best.pooled.f1:.3f})"
    )


if __name__ == "__main__":
    main()
