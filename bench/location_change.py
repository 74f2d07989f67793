"""Per-location change estimates on real imagery: OSCD cities through revisit's command line.

What a SQL user of ``v_change`` gets, scored against the OSCD change labels:

1. In ``--data-dir`` (kept; ``--skip-ingest`` reuses it), the bench runs, each in
   its own process, the commands a user types (see :mod:`realdata`)::

       revisit --config DIR/revisit.toml db upgrade
       revisit --config DIR/revisit.toml aoi add CITY --geojson FOOTPRINT   (x 14)
       revisit --config DIR/revisit.toml sample --aoi CITY --grid            (x 14)
       revisit --config DIR/revisit.toml ingest --source local --path .../oscd --since 2015-06-23
       revisit --config DIR/revisit.toml ingest --source local --path .../oscd_unlabeled \
           --since 2015-06-23
       revisit --config DIR/revisit.toml learn --minutes M --new-model

   over the 4 labeled cities (aguasclaras, bercy, paris, rennes) and, for
   training only, the 10 unlabeled ones; each AOI is the older image's footprint
   shrunk by half a chip, with a grid at one chip's spacing. The learner runs
   with revisit's **default settings** (mining windows included: the OSCD dates
   are 9 to 25 months apart, most outside the default day-of-year window, so
   this is what a newcomer gets), ``--config FILE`` merged on top.

2. Each location of a labeled city is given the share of its footprint's pixels
   that the city's change mask labels changed (the mask is pixel-aligned to the
   10 m grid of ``imgs_1``; footprints are rasterised onto it with
   ``rasterio.features.geometry_mask``). A location is *changed* when that share
   is ≥ 1 % (the headline) or ≥ 5 %.

3. Rows, all on the same locations and in this one run:

   - the stored estimate, as ``v_change`` gives it: ``ratio_ema`` (r),
     ``ratio_last`` (R), ``long_dist`` and ``change_probability``;
   - ``model long_dist``: the distance between the two dates' embeddings (head 0)
     under the newest checkpoint's key encoder, measured again now: what r was
     made of with ``learner.change_distance = "embedding"`` (CACo's);
   - ``model dense ÷ city median``: the learner's dense distance (the default
     ``change_distance``, :func:`revisit.learner.change.dense_distance`) of the
     two dates under the same encoder, over its city's median (the ``date-pair``
     calibration): what r is made of, without the history of the run;
   - baselines: ``random long_dist`` and ``random dense ÷ city median``, the same
     with a randomly initialised model (seed 0, the same input standardisation),
     and ``CVA chip mean``, the mean
     over the chip of the change-vector magnitude (bands standardised per city
     and date over all its chips, as the data README's CVA), also divided by its
     city's median (the calibration R's ``date-pair`` denominator makes).

   For each: AUROC at 1 % and 5 % (``sklearn.metrics.roc_auc_score``). For the
   ``changed`` flag: the share flagged, the true base rate, precision and recall.
   Coverage: measured locations / locations, per city and over all 14, and the
   reasons ``v_change`` gives for the rest.

    .venv/bin/python bench/location_change.py [--minutes 8 | --steps N]
        [--data-dir var/location-change] [--config FILE] [--skip-ingest] [--keep-model]

``--skip-ingest`` with a new model keeps the estimates of the last run
(``--new-model`` carries them on), so a fresh directory is the clean protocol.

The figure printed last: the AUROC at 1 % of the stored estimate (r) against the
CVA chip mean's, and the flag's precision.
"""

from __future__ import annotations

import sys
from pathlib import Path

# ``import onnx`` (inside revisit) would import bench/onnx.py with this folder first on the
# path; at the end, it still finds realdata.py.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

import argparse  # noqa: E402
import json  # noqa: E402
import warnings  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402
from realdata import (  # noqa: E402
    SHARED_DATA,
    Workspace,
    drop_revisit_environment,
    merge_settings,
    read_toml,
    sigterm_as_exit,
)

LABELED = ("aguasclaras", "bercy", "paris", "rennes")
THRESHOLDS = (0.01, 0.05)
#: Chip side of the bench (revisit's default ingest chip size).
CHIP_PX = 64
#: Sentinel-2A's launch: ``--since`` this takes every product, whatever the cursor says.
SENTINEL2_START = "2015-06-23"


@dataclass
class Place:
    """One location of a labeled city: its label share and what each row says of it."""

    location_id: int
    city: str
    changed_share: float
    scores: dict[str, float] = field(default_factory=dict)
    flag: bool | None = None
    reason: str | None = None


def _areas(data: Path) -> list[tuple[str, Path]]:
    found = []
    for collection in ("oscd", "oscd_unlabeled"):
        images = data / collection / "images"
        if not images.is_dir():
            raise SystemExit(f"{images}: not found (see {data / 'README.md'})")
        for city in sorted(p for p in images.iterdir() if (p / "imgs_1").is_dir()):
            found.append((city.name, city / "imgs_1"))
    return found


def prepare(ws: Workspace, data: Path) -> None:
    """AOIs, grids and both dates of every city, through the CLI."""
    half_chip_m = CHIP_PX * 10.0 / 2
    for name, product in _areas(data):
        ws.add_area(name, product, inset_m=half_chip_m)
    for collection in ("oscd", "oscd_unlabeled"):
        # --since: the source's cursor moved past the older dates with the first folder.
        got = ws.ingest(data / collection / "images", since=SENTINEL2_START)
        print(
            f"ingest {collection}: {got.scenes} scenes, {got.chips} chips, "
            f"{got.quarantined} quarantined in {got.wall_s:.0f} s"
        )


# -- labels ----------------------------------------------------------------------------------


def label_shares(
    ws: Workspace, data: Path, cities: tuple[str, ...] = LABELED
) -> dict[int, tuple[str, float]]:
    """Each labeled city's location: (city, share of its footprint's pixels labeled changed)."""
    import rasterio
    import sqlalchemy as sa
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.features import geometry_mask

    out: dict[int, tuple[str, float]] = {}
    for city in cities:
        band = sorted((data / "oscd" / "images" / city / "imgs_1").glob("*B02.tif"))
        if not band:
            raise SystemExit(f"{city}: no B02 in imgs_1")
        with rasterio.open(band[0]) as ds:
            transform, shape = ds.transform, (ds.height, ds.width)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(data / "oscd" / "labels" / city / "cm" / f"{city}-cm.tif") as ds:
                changed = ds.read(1) == 2
        if changed.shape != shape:
            raise SystemExit(f"{city}: label {changed.shape} is not on imgs_1's grid {shape}")
        query = sa.text(
            "SELECT l.id, ST_AsGeoJSON(l.footprint) FROM location l JOIN aoi a ON a.id = l.aoi_id"
            " WHERE a.name = :city AND l.footprint IS NOT NULL ORDER BY l.id"
        )
        with ws.engine.connect() as conn:
            rows = conn.execute(query, {"city": city}).all()
        for loc, geojson in rows:
            inside = ~geometry_mask(
                [json.loads(geojson)], out_shape=shape, transform=transform, all_touched=False
            )
            if inside.sum() == 0:
                continue
            out[int(loc)] = (city, float(changed[inside].mean()))
    return out


# -- what v_change says -------------------------------------------------------------------------


def stored(ws: Workspace) -> dict[int, dict[str, Any]]:
    """Every location's row of ``v_change`` (measured or not), by location id."""
    import sqlalchemy as sa

    with ws.engine.connect() as conn:
        columns = [
            str(r[0])
            for r in conn.execute(
                sa.text(
                    "SELECT column_name FROM information_schema.columns"
                    " WHERE table_name = 'v_change'"
                )
            )
        ]
        wanted = [
            c
            for c in (
                "ratio_ema",
                "ratio_last",
                "long_dist",
                "short_dist",
                "change_probability",
                "changed",
                "unmeasured_reason",
                "season_gap_days",
            )
            if c in columns
        ]
        rows = conn.execute(
            sa.text(f"SELECT location_id, {', '.join(wanted)} FROM v_change")
        ).mappings()
        return {int(r["location_id"]): dict(r) for r in rows}


# -- chips and embeddings -----------------------------------------------------------------------


def location_pairs(
    ws: Workspace,
) -> tuple[dict[int, tuple[npt.NDArray[np.uint16], npt.NDArray[np.uint16]]], dict[int, str]]:
    """The oldest and newest chip of every location with two dates, and each location's AOI."""
    import sqlalchemy as sa

    from revisit.ingest.chips import ChipStore

    store = ChipStore(ws.data_dir / "chips")
    query = sa.text(
        "SELECT o.location_id, a.name, o.acquired_at, o.chip_key, o.chip_sha256"
        " FROM observation o JOIN location l ON l.id = o.location_id"
        " JOIN aoi a ON a.id = l.aoi_id ORDER BY o.location_id, o.acquired_at"
    )
    by_loc: dict[int, list[tuple[str, str]]] = defaultdict(list)
    city_of: dict[int, str] = {}
    with ws.engine.connect() as conn:
        for loc, city, _, key, sha in conn.execute(query):
            by_loc[int(loc)].append((str(key), str(sha)))
            city_of[int(loc)] = str(city)
    pairs = {}
    for loc, chips in by_loc.items():
        if len(chips) >= 2:
            pairs[loc] = (store.get(*chips[0]), store.get(*chips[-1]))
    return pairs, city_of


def cva_chip_mean(
    pairs: dict[int, tuple[npt.NDArray[np.uint16], npt.NDArray[np.uint16]]], city_of: dict[int, str]
) -> dict[int, float]:
    """Mean change-vector magnitude per chip, bands standardised per city and date."""
    out: dict[int, float] = {}
    by_city: dict[str, list[int]] = defaultdict(list)
    for loc in pairs:
        by_city[city_of[loc]].append(loc)
    for locs in by_city.values():
        older = np.stack([pairs[loc][0] for loc in locs]).astype(np.float64)
        newer = np.stack([pairs[loc][1] for loc in locs]).astype(np.float64)
        valid = (older > 0).all(axis=1) & (newer > 0).all(axis=1)  # (N, H, W)
        z = []
        for stack in (older, newer):
            pixels = np.moveaxis(stack, 1, -1)[valid]  # (P, C)
            mean, std = pixels.mean(axis=0), pixels.std(axis=0) + 1e-9
            z.append((stack - mean[None, :, None, None]) / std[None, :, None, None])
        magnitude = np.linalg.norm(z[1] - z[0], axis=1)  # (N, H, W)
        for i, loc in enumerate(locs):
            if valid[i].any():
                out[loc] = float(magnitude[i][valid[i]].mean())
    return out


def per_city_calibrated(values: dict[int, float], city_of: dict[int, str]) -> dict[int, float]:
    """Each value over its city's median: the baseline with the date-pair calibration of R."""
    by_city: dict[str, list[float]] = defaultdict(list)
    for loc, v in values.items():
        by_city[city_of[loc]].append(v)
    median = {city: float(np.median(v)) for city, v in by_city.items()}
    return {loc: v / median[city_of[loc]] for loc, v in values.items()}


def _key_view(chips: npt.NDArray[np.uint16], crop: int) -> Any:
    """Chips as the learner's key side sees them: reflectance, resized to the crop size."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(chips.astype(np.float32) * 1e-4)
    if crop and tuple(x.shape[-2:]) != (crop, crop):
        x = F.interpolate(x, size=(crop, crop), mode="bilinear", antialias=True)
    return x


def _pair_distances(
    model: Any,
    pairs: dict[int, tuple[npt.NDArray[np.uint16], npt.NDArray[np.uint16]]],
    crop: int,
    distance: Callable[[Any, Any], npt.NDArray[np.float64]],
) -> dict[int, float]:
    """``distance(older, newer)`` of each location's two key views, in eval mode, 128 at a time.

    In eval mode batch-norm uses its running statistics, so a row's distance does
    not depend on which rows share its batch.
    """
    model.eval()
    locs = sorted(pairs)
    out: dict[int, float] = {}
    for start in range(0, len(locs), 128):
        part = locs[start : start + 128]
        older = _key_view(np.stack([pairs[loc][0] for loc in part]), crop)
        newer = _key_view(np.stack([pairs[loc][1] for loc in part]), crop)
        out.update(zip(part, distance(older, newer).tolist(), strict=True))
    return out


def embedding_distances(
    model: Any,
    pairs: dict[int, tuple[npt.NDArray[np.uint16], npt.NDArray[np.uint16]]],
    crop: int,
) -> dict[int, float]:
    """‖f(newer) - f(older)‖ with the key encoder and head 0."""

    def distance(older: Any, newer: Any) -> npt.NDArray[np.float64]:
        diff = (model.key(newer)[0] - model.key(older)[0]).double().numpy()
        out: npt.NDArray[np.float64] = np.linalg.norm(diff, axis=1)
        return out

    return _pair_distances(model, pairs, crop, distance)


def dense_distances(
    model: Any,
    pairs: dict[int, tuple[npt.NDArray[np.uint16], npt.NDArray[np.uint16]]],
    crop: int,
) -> dict[int, float]:
    """The learner's dense distance (``learner.change_distance = "dense"``) of the two dates."""
    from revisit.learner.change import DEFAULT_DENSE_DEPTH, dense_distance

    def distance(older: Any, newer: Any) -> npt.NDArray[np.float64]:
        _, before = model.key_with_maps(older, DEFAULT_DENSE_DEPTH)
        _, after = model.key_with_maps(newer, DEFAULT_DENSE_DEPTH)
        return dense_distance(before, after)

    return _pair_distances(model, pairs, crop, distance)


def latest_model(ws: Workspace) -> Any:
    from revisit.db import learning
    from revisit.export.publish import load_model

    with ws.engine.connect() as conn:
        version = learning.latest_model_version(conn)
    if version is None:
        raise SystemExit("no model version: did revisit learn run?")
    return load_model(ws.data_dir, version)


def random_model(reference: Any) -> Any:
    """A randomly initialised model (seed 0) with ``reference``'s input standardisation."""
    import torch

    from revisit.learner.heads import ContrastiveModel

    torch.manual_seed(0)
    model = ContrastiveModel(queue_size=16)
    norm = reference.encoder.normalize
    model.set_band_statistics(norm.mean.flatten().tolist(), norm.std.flatten().tolist())
    return model


# -- scoring -------------------------------------------------------------------------------------


def auroc(places: list[Place], row: str, threshold: float) -> tuple[float, int]:
    from sklearn.metrics import roc_auc_score

    have = [p for p in places if np.isfinite(p.scores.get(row, np.nan))]
    y = np.array([p.changed_share >= threshold for p in have])
    if len(have) < 2 or y.all() or not y.any():
        return float("nan"), len(have)
    return float(roc_auc_score(y, [p.scores[row] for p in have])), len(have)


def flag_figures(places: list[Place], threshold: float) -> tuple[float, float, float, float]:
    """(share flagged, base rate, precision, recall) of the stored flag over measured places."""
    have = [p for p in places if p.flag is not None]
    if not have:
        return (float("nan"),) * 4
    flag = np.array([bool(p.flag) for p in have])
    truth = np.array([p.changed_share >= threshold for p in have])
    tp = float((flag & truth).sum())
    precision = tp / flag.sum() if flag.any() else float("nan")
    recall = tp / truth.sum() if truth.any() else float("nan")
    return float(flag.mean()), float(truth.mean()), precision, recall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="the shared data folder")
    parser.add_argument("--data-dir", type=Path, default=Path("var/location-change"))
    parser.add_argument("--minutes", type=float, default=8.0, help="learning budget")
    parser.add_argument(
        "--steps",
        type=int,
        help="learn this many steps instead (the same figures on a busy machine)",
    )
    parser.add_argument("--config", type=Path, help="TOML settings merged on the defaults")
    parser.add_argument("--skip-ingest", action="store_true", help="reuse DIR's database and chips")
    parser.add_argument(
        "--keep-model",
        action="store_true",
        help="do not learn: score what DIR holds (with --skip-ingest)",
    )
    args = parser.parse_args()
    sigterm_as_exit()
    dropped = drop_revisit_environment()
    if dropped:
        print(f"ignoring {', '.join(dropped)}: the bench's TOML file rules")
    extra = read_toml(args.config) if args.config is not None else {}
    settings = merge_settings({"learner": {"threads": 2}}, extra)
    header = "Written by bench/location_change.py: revisit's defaults, --config merged on top."
    with Workspace(args.data_dir, settings=settings, header=header) as ws:
        ws.upgrade()
        if not args.skip_ingest:
            prepare(ws, args.data)
        if not args.keep_model:
            if args.steps is not None:
                got = ws.learn(steps=args.steps, new_model=True)
            else:
                got = ws.learn(minutes=args.minutes, new_model=True)
            print(
                f"learn: {got.steps} steps in {got.seconds:.0f} s, {got.images_per_s:.0f} images/s"
            )
        report(ws, args.data)


def report(ws: Workspace, data: Path) -> None:
    """Score v_change and the baselines on the labeled cities; print the table."""
    shares = label_shares(ws, data)
    rows = stored(ws)
    pairs, city_of = location_pairs(ws)
    crop = ws.load_settings().learner.crop_size
    model = latest_model(ws)
    trained = embedding_distances(model, pairs, crop)
    trained_dense = dense_distances(model, pairs, crop)
    untrained = random_model(model)
    rand = embedding_distances(untrained, pairs, crop)
    rand_dense = dense_distances(untrained, pairs, crop)
    cva = cva_chip_mean(pairs, city_of)
    cva_calibrated = per_city_calibrated(cva, city_of)

    places = []
    for loc, (city, share) in sorted(shares.items()):
        row = rows.get(loc, {})
        place = Place(loc, city, share, reason=row.get("unmeasured_reason"))
        for name in ("ratio_ema", "ratio_last", "long_dist", "change_probability"):
            value = row.get(name)
            if value is not None:
                place.scores[f"stored {name}"] = float(value)
        if row.get("ratio_ema") is not None:
            place.flag = bool(row.get("changed"))
        for name, values in (
            ("model long_dist", trained),
            ("model dense ÷ city median", per_city_calibrated(trained_dense, city_of)),
            ("random long_dist", rand),
            ("random dense ÷ city median", per_city_calibrated(rand_dense, city_of)),
            ("CVA chip mean", cva),
            ("CVA chip mean ÷ city median", cva_calibrated),
        ):
            if loc in values:
                place.scores[name] = values[loc]
        places.append(place)

    measured = sum(1 for p in places if p.flag is not None)
    all_rows = len(rows)
    all_measured = sum(1 for r in rows.values() if r.get("ratio_ema") is not None)
    print()
    print(f"labeled cities: {len(places)} locations, {measured} measured")
    for city in LABELED:
        mine = [p for p in places if p.city == city]
        n_meas = sum(1 for p in mine if p.flag is not None)
        rates = ", ".join(
            f"≥{t:.0%}: {np.mean([p.changed_share >= t for p in mine]):.2f}" for t in THRESHOLDS
        )
        print(f"  {city:12s} {n_meas:4d} / {len(mine):4d} measured; changed {rates}")
    print(f"all cities: {all_measured} / {all_rows} locations measured")
    reasons = Counter(
        str(r.get("unmeasured_reason")) for r in rows.values() if r.get("ratio_ema") is None
    )
    for reason, n in reasons.most_common():
        print(f"  unmeasured, {reason}: {n}")

    names = [
        "stored ratio_ema",
        "stored ratio_last",
        "stored long_dist",
        "stored change_probability",
        "model long_dist",
        "model dense ÷ city median",
        "random long_dist",
        "random dense ÷ city median",
        "CVA chip mean",
        "CVA chip mean ÷ city median",
    ]
    print()
    print(f"{'row':30s} {'n':>5s} {'AUROC ≥1%':>10s} {'AUROC ≥5%':>10s}")
    results: dict[str, float] = {}
    for name in names:
        a1, n = auroc(places, name, THRESHOLDS[0])
        a5, _ = auroc(places, name, THRESHOLDS[1])
        results[name] = a1
        print(f"{name:30s} {n:5d} {a1:10.3f} {a5:10.3f}")
    print()
    print(
        f"{'changed flag':14s} {'flagged':>8s} {'base rate':>10s} {'precision':>10s} {'recall':>8s}"
    )
    precision_1 = float("nan")
    for t in THRESHOLDS:
        share, base, precision, recall = flag_figures(places, t)
        if t == THRESHOLDS[0]:
            precision_1 = precision
        print(f"≥{t:<13.0%} {share:8.3f} {base:10.3f} {precision:10.3f} {recall:8.3f}")
    print()
    print(
        f"location change: stored r AUROC@1% {results['stored ratio_ema']:.3f} vs CVA chip mean "
        f"{results['CVA chip mean']:.3f}, flag precision {precision_1:.3f}, "
        f"{measured}/{len(places)} measured"
    )


if __name__ == "__main__":
    main()
