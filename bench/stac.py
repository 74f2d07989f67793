"""STAC ingest: chips/s and bytes per chip reading COG windows, against downloading files whole.

A loopback STAC API and COG server (``tests/ingest/fake_stac.py``) serves real
Sentinel-2 data from ``../shared/data`` converted to COGs (DEFLATE, 128 px
tiles), adds ``--latency-ms`` to every file request and sends over one link
of ``--mbps``, as a catalog in another region would. Two data sets:

- **tile**: the L2A product T29UNU (a whole 110 km tile; its 60 m bands, all
  the data holds): an AOI of ``--aoi-km`` with a grid of locations in it, the
  shape of real use (a few chips out of files far larger than the area), and
  locations spread over the whole tile every ``--tile-spacing`` m, where most
  of every file is read;
- **crops**: the OSCD cities' band files (both dates): 6 km crops, where a
  file is barely larger than the header GDAL reads on open.

Three ways to get the same chips, in the same run, all through
:class:`revisit.ingest.sources.stac.StacSource` and checked pixel-equal:

- **ranged** (what ``--source stac`` does): GDAL's ``/vsicurl/`` reads, per
  location, only the tiles under its chip; with no read-ahead, and with
  ``stac.read_threads`` threads fetching the next locations' windows;
- **whole** (the baseline): every band file downloaded whole with
  ``requests``, then the same chips cut from the local copies.

The figure printed last is bytes per chip for the AOI on the tile, ranged /
whole (lower is better: 0.1 means a tenth of the bytes).

    .venv/bin/python bench/stac.py [--latency-ms 20] [--mbps 100] [--read-threads 16]
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import requests
from shapely.geometry import box
from shapely.geometry.base import BaseGeometry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from revisit.config import StacSettings
from revisit.grid import chip_grid_for
from revisit.ingest.sampling import grid_in_polygon
from revisit.ingest.sources.local import product_footprint
from revisit.ingest.sources.stac import StacSource, clear_http_cache
from revisit.types import Chip, LocationRef, SceneRef
from tests.ingest import fake_stac

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def _scenes(source: StacSource, area: BaseGeometry) -> list[SceneRef]:
    return list(source.search(since=None, until=NOW, area=area, on_rejected=lambda *r: None))


def _grid(area: BaseGeometry, spacing_m: float, size: int) -> list[LocationRef]:
    points = grid_in_polygon(area.buffer(-0.003), spacing_m=spacing_m)
    return [LocationRef(i, x, y, chip_grid_for(x, y, size=size)) for i, (x, y) in enumerate(points)]


Work = list[tuple[SceneRef, list[LocationRef]]]


def _ranged(server: fake_stac.FakeStac, work: Work, threads: int) -> tuple[list[Chip], float, int]:
    """Every chip read by ranges, GDAL's cache forgotten first."""
    for scene, _ in work:
        clear_http_cache([f"/vsicurl/{h}" for h in scene.extra["assets"].values()])
        if scene.extra.get("scl"):
            clear_http_cache([f"/vsicurl/{scene.extra['scl']}"])
    server.reset_counters()
    t0 = time.perf_counter()
    chips: list[Chip] = []
    for scene, locations in work:
        stac = StacSource(
            StacSettings(
                api_url=server.url, collection=scene.extra["collection"], read_threads=threads
            )
        )
        chips += [c for c in stac.read(scene, locations) if isinstance(c, Chip)]
    return chips, time.perf_counter() - t0, server.total_bytes_served()


def _whole(server: fake_stac.FakeStac, work: Work, root: Path) -> tuple[list[Chip], float, int]:
    """Every band file downloaded whole, then the same chips cut from the copies."""
    server.reset_counters()
    t0 = time.perf_counter()
    chips: list[Chip] = []
    http = requests.Session()

    def fetch(href: str, target: Path) -> str:
        with http.get(href, timeout=120) as reply:
            reply.raise_for_status()
            target.write_bytes(reply.content)
        return str(target)

    for n, (scene, locations) in enumerate(work):
        folder = root / "whole" / str(n)
        folder.mkdir(parents=True)
        extra = dict(scene.extra)
        extra["assets"] = {
            band: fetch(href, folder / f"{band}.tif")
            for band, href in scene.extra["assets"].items()
        }
        if extra.get("scl"):
            extra["scl"] = fetch(extra["scl"], folder / "SCL.tif")
        copy = SceneRef(**{**scene.__dict__, "extra": extra})
        stac = StacSource(StacSettings(api_url=server.url, collection=extra["collection"]))
        chips += [c for c in stac.read(copy, locations) if isinstance(c, Chip)]
    return chips, time.perf_counter() - t0, server.total_bytes_served()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cities", nargs="+", default=["paris", "rennes", "bercy", "aguasclaras"])
    parser.add_argument(
        "--aoi-km", type=float, default=8.0, help="Side of the AOI on the tile, km."
    )
    parser.add_argument(
        "--aoi-spacing", type=float, default=800.0, help="Grid spacing in the AOI, metres."
    )
    parser.add_argument(
        "--tile-spacing",
        type=float,
        default=12000.0,
        help="Grid spacing of locations spread over the whole tile, metres.",
    )
    parser.add_argument(
        "--crop-spacing", type=float, default=2000.0, help="Grid spacing on the crops, metres."
    )
    parser.add_argument("--chip-size", type=int, default=64)
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=20.0,
        help="Delay the server adds to every file request (a catalog in another region: 20-80).",
    )
    parser.add_argument(
        "--mbps",
        type=float,
        default=100.0,
        help="The link's bandwidth, Mbit/s, shared by all requests (0: loopback speed).",
    )
    parser.add_argument("--read-threads", type=int, default=16, help="stac.read_threads.")
    args = parser.parse_args()
    for city in args.cities:
        if not (fake_stac.OSCD_IMAGES / city / "imgs_1").is_dir():
            raise SystemExit(f"no OSCD city {city} under {fake_stac.OSCD_IMAGES}")
    if not fake_stac.L2A_SAFE.is_dir():
        raise SystemExit(f"no L2A SAFE at {fake_stac.L2A_SAFE}")
    root = Path(tempfile.mkdtemp(prefix="revisit-bench-stac-"))
    try:
        t0 = time.perf_counter()
        catalog = fake_stac.build_cogs(root / "cogs", cities=tuple(args.cities))
        print(f"COGs built in {time.perf_counter() - t0:.1f} s")
        server = fake_stac.FakeStac(catalog)
        server.start()
        results = {}
        try:
            crops: Work = []
            for city in args.cities:
                area = product_footprint(fake_stac.OSCD_IMAGES / city / "imgs_1")
                source = StacSource(
                    StacSettings(
                        api_url=server.url,
                        collection=fake_stac.OSCD_COLLECTION,
                        max_cloud_cover=100,
                    )
                )
                locations = _grid(area, args.crop_spacing, args.chip_size)
                crops += [(s, locations) for s in _scenes(source, area)]
            tile_area = product_footprint(fake_stac.L2A_SAFE)
            source = StacSource(
                StacSettings(
                    api_url=server.url, collection=fake_stac.PC_COLLECTION, max_cloud_cover=100
                )
            )
            (scene,) = _scenes(source, tile_area)
            centre = tile_area.centroid
            half = args.aoi_km / 2 / 111.0  # degrees of latitude; longitude scaled below
            scale = 1 / max(math.cos(math.radians(centre.y)), 0.1)
            aoi = box(
                centre.x - half * scale, centre.y - half, centre.x + half * scale, centre.y + half
            )
            spread: Work = [(scene, _grid(tile_area, args.tile_spacing, args.chip_size))]
            aoi_work: Work = [(scene, _grid(aoi, args.aoi_spacing, args.chip_size))]
            if args.latency_ms > 0:
                server.inject("/files/*", fake_stac.Fault.slow(args.latency_ms / 1e3), 10**6)
            if args.mbps > 0:
                server.bandwidth_bps = args.mbps * 1e6 / 8
            for name, work in (("tile AOI", aoi_work), ("tile spread", spread), ("crops", crops)):
                runs = {
                    "ranged, no read-ahead": _ranged(server, work, 0),
                    f"ranged, {args.read_threads} threads": _ranged(
                        server, work, args.read_threads
                    ),
                    "whole files": _whole(server, work, root / name),
                }
                baseline = runs["whole files"][0]
                for chips, _, _ in runs.values():
                    assert len(chips) == len(baseline) > 0
                    for a, b in zip(chips, baseline, strict=True):
                        np.testing.assert_array_equal(a.data, b.data)
                results[name] = (work, runs)
        finally:
            server.stop()
        link = f"{args.mbps:g} Mbit/s shared" if args.mbps > 0 else "loopback speed"
        print(
            f"{args.chip_size} px chips, the same pixels every way;"
            f" {args.latency_ms:g} ms added to each file request, {link}"
        )
        print(f"{'':44} {'chips':>6} {'seconds':>8} {'chips/s':>8} {'MB':>8} {'kB/chip':>8}")
        for name, (work, runs) in results.items():
            label = f"{name} ({len(work)} scenes)"
            for how, (chips, seconds, sent) in runs.items():
                print(
                    f"{label + ': ' + how:44.44} {len(chips):6d} {seconds:8.2f}"
                    f" {len(chips) / seconds:8.1f} {sent / 1e6:8.2f} {sent / len(chips) / 1e3:8.1f}"
                )
        for name, (_, runs) in results.items():
            ranged = runs[f"ranged, {args.read_threads} threads"]
            whole = runs["whole files"]
            print(
                f"{name}: chips/s ranged / whole {whole[1] / ranged[1]:.2f},"
                f" bytes per chip ranged / whole {ranged[2] / whole[2]:.3f}"
            )
        _, runs = results["tile AOI"]
        ratio = runs[f"ranged, {args.read_threads} threads"][2] / runs["whole files"][2]
        print(f"bytes per chip, an AOI on a tile, ranged / whole: {ratio:.3f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
