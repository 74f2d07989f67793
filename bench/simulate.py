"""How fast the simulated source makes chips: 12 x 64 x 64 L1C chips per second, one core.

Fifty locations in one 1-degree tile are read from every pass over a year (73
scenes, 3650 chips). Each location's static world is built first (cached for
later passes, as during an ingest run), and timed apart. A trivial baseline (a
random uint16 array of the same shape per chip) is timed in the same run. The
figure printed last is the simulated source's chips per second.

    .venv/bin/python bench/simulate.py [--locations 50] [--days 365]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import time  # noqa: E402
from datetime import UTC, datetime, timedelta  # noqa: E402

import numpy as np  # noqa: E402
from shapely.geometry import MultiPoint  # noqa: E402

from revisit.grid import chip_grid_for  # noqa: E402
from revisit.ingest.sources.simulated import SimulatedSource  # noqa: E402
from revisit.types import Chip, LocationRef  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--locations", type=int, default=50)
    parser.add_argument("--days", type=int, default=365)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    lons, lats = rng.uniform(5.02, 5.98, args.locations), rng.uniform(45.02, 45.98, args.locations)
    locs = [
        LocationRef(id=i, lon=float(x), lat=float(y), grid=chip_grid_for(float(x), float(y)))
        for i, (x, y) in enumerate(zip(lons, lats, strict=True))
    ]
    source = SimulatedSource(seed=0)
    start = datetime(2023, 1, 1, tzinfo=UTC)
    scenes = list(
        source.search(
            since=start,
            until=start + timedelta(days=args.days),
            area=MultiPoint([(p.lon, p.lat) for p in locs]),
            on_rejected=lambda *_: None,
        )
    )

    began = time.perf_counter()
    source.ground_truth(locs)  # builds and caches every location's static world
    build_s = time.perf_counter() - began

    count, cloudy = 0, 0
    began = time.perf_counter()
    for scene in scenes:
        for chip in source.read(scene, locs):
            if isinstance(chip, Chip):
                count += 1
                cloudy += chip.cloud_fraction > 0
    sim_s = time.perf_counter() - began

    began = time.perf_counter()
    gen = np.random.default_rng(1)
    for _ in range(count):
        gen.integers(0, 10000, size=(12, 64, 64), dtype=np.uint16)
    base_s = time.perf_counter() - began

    sim_rate, base_rate = count / sim_s, count / base_s
    print(f"scenes: {len(scenes)}, locations: {len(locs)}, chips: {count} ({cloudy} with cloud)")
    print(f"static worlds: {build_s / len(locs) * 1e3:.1f} ms per location (once, cached)")
    print(f"baseline (random uint16 12x64x64) chips/s: {base_rate:.1f}")
    print(f"simulated / baseline: {sim_rate / base_rate:.3f}")
    print(f"chips/s: {sim_rate:.1f}")


if __name__ == "__main__":
    main()
