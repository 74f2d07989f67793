"""Pretraining on every real product in ../shared/data, end to end through the revisit CLI.

The recipe of docs/learning-from-your-imagery.md, command for command, on:

- the 4 labeled OSCD cities (``oscd/images/<city>``) and the 10 unlabeled ones
  (``oscd_unlabeled/images/<city>``), both dates of each: an AOI of the older
  image's footprint and a grid at one chip's spacing (640 m for 64-pixel chips);
- the Level-2A SAFE (``s2_l2a_safe_T29UNU/*.SAFE``, 60 m bands only): an AOI of
  its footprint and a sparser grid, ``--safe-spacing`` (5120 m, 8 chips: about
  280 locations). A one-chip grid would be ~17,500 locations (the footprint is
  about 90 km across): hours of ingest, and single-date chips, each ~11 x 11
  real 60 m pixels warped to 10 m, outnumbering the 14 cities' 10 m chips ten to
  one. The sparse grid still samples the whole tile: coast, farmland, cloud.

In ``--data-dir`` (kept, so ``bench/probe.py --data-dir DIR`` can probe the model)
the bench writes the TOML file it gives every command (``revisit.toml``), holds
the embedded PostGIS up while it runs and stops it at the end, also on an error
or Ctrl-C, and runs::

    revisit --config DIR/revisit.toml db upgrade
    revisit --config DIR/revisit.toml aoi add CITY --footprint .../CITY/imgs_1   (x 14)
    revisit --config DIR/revisit.toml sample --aoi CITY --grid                   (x 14)
    revisit --config DIR/revisit.toml aoi add T29UNU --footprint .../X.SAFE
    revisit --config DIR/revisit.toml sample --aoi T29UNU --grid --spacing 5120
    revisit --config DIR/revisit.toml ingest --source local --path ../shared/data --since 2015-06-23
    revisit --config DIR/revisit.toml learn --minutes M
    revisit --config DIR/revisit.toml export onnx

Settings written: ``[learner]`` method ``caco``, ``long_min_days`` 30 and
``doy_window_days`` 182 (two dates weeks to years apart, as bench/oscd.py), and
``queue_size`` 1024 (fewer keys than locations: a larger queue holds each
location's own keys many times over as negatives), and for a bounded CPU run
``optimizer`` adamw, ``lr`` 0.004, ``weight_decay`` 0.05, ``momentum`` 0.99,
``lr_horizon_steps`` 1500 and ``warmup_steps`` 100 (the settings of the
optimiser table in docs/probes.md); ``--config FILE`` is merged on
top, section by section, so any learner setting (crop size, learning-rate
schedule, augmentation, normalisation, batch size, ...) is passed through, and
wins. ``--skip-ingest`` retrains on what DIR holds (resuming its newest
checkpoint unless ``--new-model``).

    .venv/bin/python bench/pretrain.py [--minutes 15] [--steps N] [--data-dir var/pretrain]
        [--config FILE] [--skip-ingest] [--new-model] [--safe-spacing 5120]

The figure printed last, on one line: ``pretrain: C chips, S steps in M min, R images/s``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# ``import onnx`` (inside revisit) would import bench/onnx.py with this folder first on the
# path; at the end, it still finds realdata.py.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

import argparse  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

from realdata import (  # noqa: E402
    SHARED_DATA,
    TWO_DATE_LEARNER,
    Workspace,
    drop_revisit_environment,
    merge_settings,
    read_toml,
    sigterm_as_exit,
)

#: Sentinel-2A's launch: ``--since`` this looks at every product, whatever the cursor says.
SENTINEL2_START = "2015-06-23"
DEFAULT_SETTINGS: dict[str, Any] = {
    "learner": {
        "method": "caco",
        **TWO_DATE_LEARNER,
        "queue_size": 1024,
        # A bounded CPU run: AdamW, whose steps move the deep layers where SGD's barely
        # do in a thousand steps (docs/probes.md), a quicker key encoder, the rate's
        # cosine decay over about the steps of 12-15 minutes, a short mixture warm-up.
        "optimizer": "adamw",
        "lr": 0.004,
        "weight_decay": 0.05,
        "momentum": 0.99,
        "lr_horizon_steps": 1500,
        "warmup_steps": 100,
    },
}
HEADER = """Written by bench/pretrain.py: every command of its run is `revisit --config THIS ...`.
[learner]: two dates per place, weeks to years apart (docs/learning-from-your-imagery.md),
and the bench's --config FILE merged on top."""


@dataclass(frozen=True)
class Area:
    """One AOI of the recipe: a product's footprint and the spacing of its grid."""

    name: str
    product: Path
    spacing_m: float | None  # None: one chip width


def areas(data: Path, *, safe_spacing_m: float) -> list[Area]:
    """The AOIs over every real product under ``data`` (the shared data folder)."""
    found: list[Area] = []
    for collection in ("oscd", "oscd_unlabeled"):
        images = data / collection / "images"
        if not images.is_dir():
            raise SystemExit(f"{images}: not found (see {data / 'README.md'})")
        for city in sorted(p for p in images.iterdir() if (p / "imgs_1").is_dir()):
            found.append(Area(city.name, city / "imgs_1", None))
    for safe in sorted((data / "s2_l2a_safe_T29UNU").glob("*.SAFE")):
        tile = safe.name.split("_")[5]  # S2A_MSIL2A_<when>_N0400_R023_T29UNU_<when>.SAFE
        found.append(Area(tile, safe, safe_spacing_m))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="the shared data folder")
    parser.add_argument(
        "--data-dir", type=Path, default=Path("var/pretrain"), help="revisit's data dir (kept)"
    )
    parser.add_argument("--minutes", type=float, default=15.0, help="training budget")
    parser.add_argument("--steps", type=int, help="also stop after this many steps")
    parser.add_argument("--config", type=Path, help="a TOML file of settings to merge in")
    parser.add_argument(
        "--skip-ingest", action="store_true", help="train on what --data-dir holds already"
    )
    parser.add_argument("--new-model", action="store_true", help="revisit learn --new-model")
    parser.add_argument(
        "--safe-spacing", type=float, default=5120.0, help="grid spacing over the SAFE, metres"
    )
    args = parser.parse_args()
    if not args.minutes > 0:
        raise SystemExit("--minutes must be above 0")
    sigterm_as_exit()
    dropped = drop_revisit_environment()
    if dropped:
        print(f"ignoring {', '.join(dropped)}: the TOML file in --data-dir is the configuration")
    extra = read_toml(args.config) if args.config is not None else {}
    if "data_dir" in extra:
        print(f"ignoring data_dir of {args.config}: --data-dir is {args.data_dir}")
        del extra["data_dir"]
    settings = merge_settings(DEFAULT_SETTINGS, extra)
    todo = [] if args.skip_ingest else areas(args.data, safe_spacing_m=args.safe_spacing)

    ingest = None
    with Workspace(args.data_dir, settings=settings, header=HEADER) as ws:
        if todo:
            ws.upgrade()
            for area in todo:
                ws.add_area(area.name, area.product, spacing_m=area.spacing_m)
            ingest = ws.ingest(args.data, since=SENTINEL2_START)
        chips = ws.chips_by_product()
        locations = ws.locations()
        if not chips:
            raise SystemExit(f"{args.data_dir} holds no chips: run without --skip-ingest")
        learned = ws.learn(minutes=args.minutes, steps=args.steps, new_model=args.new_model)
        models = ws.export_onnx()
        batch_size = ws.load_settings().learner.batch_size

    total = sum(p.chips for p in chips)
    minable = sum(p.minable for p in chips)
    width = max(len(p.product_id) for p in chips)
    print()
    print("chips per product (minable: within the learner's valid and cloud limits)")
    for p in chips:
        print(f"  {p.product_id:{width}s} {p.chips:6d} chips {p.minable:6d} minable")
    print(f"  {'total':{width}s} {total:6d} chips {minable:6d} minable, {locations} locations")
    if ingest is not None:
        print(
            f"ingest: {ingest.scenes} scenes, {ingest.chips} chips, {ingest.skipped} skipped,"
            f" {ingest.quarantined} quarantined in {ingest.seconds:.1f} s"
            f" ({ingest.wall_s:.1f} s with start-up)"
        )
    minutes = learned.seconds / 60
    print(
        f"learn: {learned.method}, {learned.steps} steps (to step {learned.last_step}) in"
        f" {minutes:.1f} min, batch {batch_size}, {learned.images_per_s:.1f} images/s,"
        f" mean loss {learned.mean_loss:.4f}"
    )
    for output, path in models.items():
        print(f"model {output}: {path}")
    print(f"config: {ws.config}")
    print(
        f"pretrain: {total} chips, {learned.steps} steps in {minutes:.1f} min,"
        f" {learned.images_per_s:.0f} images/s"
    )


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("pretrain: interrupted; database stopped, --data-dir kept") from None
