"""A fake STAC API and COG file server on 127.0.0.1, built from real Sentinel-2 data, with faults.

A real HTTP server (``ThreadingHTTPServer`` on an ephemeral port, in a daemon
thread, HTTP/1.1 keep-alive) so that the source under test goes through
``pystac-client``/``requests`` and GDAL's ``/vsicurl/`` (libcurl), sockets and
all. Use the ``fake_stac`` fixture; import it into a test module with
``from tests.ingest.fake_stac import fake_stac_fixture  # noqa: F401``. The COGs
are built once per test run by :func:`build_cogs` into pytest's temporary folder
(shared by the xdist workers under a file lock; 5-10 s on two cores, nearly all of
it decoding the L2A JP2s); the server is started afresh for every test, with
fresh counters, faults and a private copy of the items.

The data (``../shared/data`` next to the repository; tests skip when it is
absent):

- Collection ``oscd-l1c`` (Earth Search v1 ``sentinel-2-l1c`` style): one item
  per OSCD city and date (``paris`` and ``rennes`` by default), one COG per band
  of the city's ``imgs_1``/``imgs_2`` GeoTIFFs: EPSG:4326, native 10/20/60 m
  grids, DN unchanged, nodata 0, DEFLATE (predictor 2), 128 px internal tiles, no
  overviews.
  Asset keys ``coastal blue green red rededge1 rededge2 rededge3 nir nir08 nir09
  cirrus swir16 swir22`` (B01 … B12, B8A), each ``image/tiff;
  application=geotiff; profile=cloud-optimized``, roles ``["data",
  "reflectance"]``, with ``eo:bands`` (``name`` = the key, ``common_name``,
  ``center_wavelength`` …), ``raster:bands`` (nodata 0, uint16, scale 0.0001,
  offset 0), ``gsd``, ``proj:shape`` and ``proj:transform``. Non-image assets a
  consumer must ignore: ``thumbnail`` (png), ``granule_metadata`` (xml) and one
  ``<key>-jp2`` duplicate per band (``image/jp2``, roles ``["data"]``); their
  hrefs answer 404. Properties: ``datetime`` (the date of ``dates.txt`` at the
  time of day in the city's ``imgs_2`` file names), ``platform`` (``S2A``/``S2B``
  from the file name, else ``sentinel-2a``: a guess), ``constellation``,
  ``instruments``, ``eo:cloud_cover`` (:data:`OSCD_CLOUD_COVER`; Rennes' second
  date is 86.5, above the usual 80 % filter), ``s2:processing_baseline``
  ``"02.06"``, ``s2:product_type`` ``"S2MSI1C"``, ``proj:epsg`` 4326,
  ``mgrs:utm_zone``/``mgrs:latitude_band``/``mgrs:grid_square`` and
  ``s2:mgrs_tile`` from the tile in the file names, ``oscd:city``. Item ids:
  :func:`oscd_item_id` (e.g. ``S2A_31UDQ_20161130_0_L1C-paris``).
- Collection ``s2-l2a-pc`` (Planetary Computer ``sentinel-2-l2a`` style): the
  L2A SAFE ``S2A_MSIL2A_20221005T115411_N0400_R023_T29UNU_20221005T164454``,
  item :data:`PC_ITEM_ID`, asset keys ``B01`` … ``B12`` (no ``B10``), ``B8A``,
  ``SCL``, roles ``["data"]``, ``eo:bands`` names ``"B01"`` …; no
  ``raster:bands`` (Planetary Computer writes none). Only the 60 m JP2s are in
  the data, so every COG is the 60 m grid (EPSG:32629, 1830 x 1830), and there
  is no B08: **the B8A COG is also served as the ``B08`` asset** (same href).
  DN are kept as they are, with the +1000 offset of baseline 04.00 (0 stays
  nodata). Properties: ``s2:processing_baseline`` ``"04.00"``,
  ``s2:product_type`` ``"S2MSI2A"``, ``eo:cloud_cover`` =
  ``CLOUDY_PIXEL_PERCENTAGE`` of ``MTD_TL.xml`` (59.77), ``datetime`` =
  ``PRODUCT_START_TIME``, ``platform`` ``Sentinel-2A``, ``s2:mgrs_tile``,
  ``sat:relative_orbit`` … Non-image assets: ``preview`` (png, 404),
  ``granule-metadata`` and ``product-metadata`` (the real XML files, served).
- Collection ``s2-l2a-es`` (Earth Search ``sentinel-2-l2a`` style): the same
  product as item :data:`ES_ITEM_ID`, keys ``coastal`` … ``swir22`` and ``scl``
  (no ``cirrus``; ``nir`` is again the B8A COG), properties as above plus
  ``earthsearch:boa_offset_applied: true``, and COGs whose DN have the 1000
  already subtracted (clipped at 1, 0 kept as nodata; SCL unchanged):
  ``raster:bands`` say scale 0.0001, offset 0. A reader that honours the flag
  gets the same DN from both L2A items. The item's footprint is the whole tile
  (40 % of it is nodata).

Endpoints (``FakeStac.url`` is the API root):

- ``GET /``: landing page (``conformsTo`` core, collections, item-search,
  item-search#query; links ``self``, ``root``, ``conformance``, ``data``,
  ``search`` for GET and for POST, a ``child`` per collection).
- ``GET /conformance``, ``GET /collections``, ``GET /collections/{id}``,
  ``GET /collections/{id}/items/{item_id}``.
- ``GET``/``POST /search``: ``collections``, ``ids``, ``bbox``, ``intersects``,
  ``datetime`` (an instant, or an interval closed or open with ``..`` or
  nothing), ``query`` (``eq neq lt lte gt gte in``; an item lacking the property
  does not match), ``limit`` (default 10); items sorted by datetime then id; a
  page holds ``min(limit, page_size)`` features at most and, when more match, a
  ``rel=next`` link: for POST ``method: POST``, ``body: {"token": "next:<n>"}``
  and ``merge: true``; for GET the same query string plus ``token=next:<n>``.
  Items whose datetime or geometry cannot be read pass every filter on it (as
  a lax server would): that is how :meth:`FakeStac.add_item_without_datetime`
  items reach the client. Counted in :attr:`FakeStac.search_requests`.
- ``GET``/``HEAD /files/<path>``: the COGs (and metadata XML). ``Range: bytes=a-b``,
  ``a-`` and ``-n`` answer 206 with ``Content-Range``; several ranges answer 206
  ``multipart/byteranges``; a range wholly past the end answers 416 (with
  ``Content-Range: bytes */size``); an unparsable ``Range`` is ignored (200,
  whole file). ``Accept-Ranges: bytes``, ``Content-Length``, ``ETag`` and
  ``Last-Modified`` on every answer; 404 for missing files. Requests and body
  bytes sent are counted per URL path (:meth:`FakeStac.bytes_served`,
  :meth:`FakeStac.request_count`, :meth:`FakeStac.total_bytes_served`).

Faults (:meth:`FakeStac.inject`) apply to the next ``times`` requests (any
method) whose URL path matches a glob (``fnmatch``: ``*`` matches ``/`` too),
e.g. ``/files/paris/2/*B04*`` or ``/search``; the first matching pattern with
faults left, in the order injected, serves one:

- ``Fault.status(code, retry_after=...)``: answer ``code`` (503, 429, 500 …) with
  a JSON error body and ``Retry-After`` when given (seconds, as a string).
- ``Fault.reset()``: read the request, then reset the connection (TCP RST via
  ``SO_LINGER`` 0, no reply).
- ``Fault.slow(seconds)``: sleep, then answer normally.
- ``Fault.truncated()``: not queued but permanent: every file matching the
  pattern is served from now on as if it were only its first half (size and
  content), so its header reads but its later tiles cannot
  (:meth:`FakeStac.truncate` does the same).

Bad items (each server has its own copy of the catalog): :meth:`FakeStac.drop_asset`,
:meth:`FakeStac.add_item_without_datetime`, :meth:`FakeStac.add_raw_item` (served
verbatim), :meth:`FakeStac.update_properties`.

What GDAL's ``/vsicurl/`` sends, and how it takes the faults: :data:`GDAL_NOTES`.
**Read with** ``GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR``: without it GDAL probes
side-car files while rasterio holds the GIL, and the in-process server deadlocks.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import fnmatch
import json
import os
import re
import shutil
import socket
import struct
import threading
import time
import uuid
import warnings
import xml.etree.ElementTree as ET
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import numpy as np
import pytest
import rasterio
from rasterio.io import MemoryFile
from rasterio.warp import transform_geom
from rio_cogeo.cogeo import cog_translate
from shapely.geometry import box, mapping, shape

from tests.ingest.fake_sentinelhub import OSCD_IMAGES, SHARED_DATA

L2A_FOLDER = SHARED_DATA / "s2_l2a_safe_T29UNU"
L2A_PRODUCT = "S2A_MSIL2A_20221005T115411_N0400_R023_T29UNU_20221005T164454"
L2A_SAFE = L2A_FOLDER / f"{L2A_PRODUCT}.SAFE"

OSCD_COLLECTION = "oscd-l1c"
PC_COLLECTION = "s2-l2a-pc"
ES_COLLECTION = "s2-l2a-es"
COLLECTION_IDS = (OSCD_COLLECTION, PC_COLLECTION, ES_COLLECTION)
#: The L2A product's item in ``s2-l2a-pc`` (Planetary Computer drops the N0400 part).
PC_ITEM_ID = "S2A_MSIL2A_20221005T115411_R023_T29UNU_20221005T164454"
#: The L2A product's item in ``s2-l2a-es`` (offset already subtracted).
ES_ITEM_ID = "S2A_29UNU_20221005_0_L2A"

DEFAULT_CITIES = ("paris", "rennes")
#: ``eo:cloud_cover`` of the OSCD items, by (city, date 1 or 2); others get 10.0.
OSCD_CLOUD_COVER: dict[tuple[str, int], float] = {
    ("paris", 1): 4.2,
    ("paris", 2): 11.7,
    ("rennes", 1): 0.9,
    ("rennes", 2): 86.5,
    ("bercy", 1): 4.2,
    ("bercy", 2): 23.0,
    ("aguasclaras", 1): 31.0,
    ("aguasclaras", 2): 2.5,
}
COG_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"
COG_BLOCK = 128
CONFORMS_TO = [
    "https://api.stacspec.org/v1.0.0/core",
    "https://api.stacspec.org/v1.0.0/collections",
    "https://api.stacspec.org/v1.0.0/item-search",
    "https://api.stacspec.org/v1.0.0/item-search#query",
]
EXTENSIONS = [
    "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
    "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
    "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
    "https://stac-extensions.github.io/mgrs/v1.0.0/schema.json",
]

#: What GDAL 3.10's ``/vsicurl/`` sends to this server (measured with rasterio 1.4).
GDAL_NOTES = """\
Opening a COG: one HEAD (the size; CPL_VSIL_CURL_USE_HEAD=NO makes it a plain GET
that GDAL abandons after the headers, but this server counts the whole body as sent),
then GET Range: bytes=0-16383 (the header and tile index).
Reading tiles: single-range GETs (bytes=a-b), one per run of adjacent tiles, rounded
up to 16 KiB chunks (CPL_VSIL_CURL_CHUNK_SIZE), issued in parallel: the default
GDAL_HTTP_MULTIRANGE (PARALLEL; YES does the same). GDAL_HTTP_MULTIRANGE=SINGLE_GET
sends one multi-range GET (bytes=a-b,c-d,...), answered 206 multipart/byteranges.
A 64x64 window: HEAD + 16 KiB + one 32-48 KiB range (of a 3.3 MB 60 m L2A COG, or of
a 0.2 MB 10 m OSCD one).
Without GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR GDAL also GETs the folder (a listing)
and HEADs side-car files (.aux.xml, .aux, .xml, .msk, .ovr): with this server in the
same process that DEADLOCKS, because rasterio holds the GIL while GDAL probes them
(the server's threads cannot answer). Always set EMPTY_DIR (it saves requests anyway).
Errors: 503/500/429 fail the open (RasterioIOError "HTTP response code: 503") unless
GDAL_HTTP_MAX_RETRY > 0 (GDAL_HTTP_RETRY_DELAY; Retry-After is not waited for); and
GDAL caches the failure: opening the same URL again fails without a request until
GDAL's curl cache is cleared. A connection reset on a request is retried by curl once
on its own. A truncated file opens; reading a tile past its end raises RasterioIOError.
"""

# name, Earth Search key, common name, description, centre and width (µm), nominal gsd
BANDS: tuple[tuple[str, str, str, str, float, float, int], ...] = (
    ("B01", "coastal", "coastal", "Coastal aerosol", 0.443, 0.027, 60),
    ("B02", "blue", "blue", "Blue", 0.49, 0.098, 10),
    ("B03", "green", "green", "Green", 0.56, 0.045, 10),
    ("B04", "red", "red", "Red", 0.665, 0.038, 10),
    ("B05", "rededge1", "rededge", "Red edge 1", 0.704, 0.019, 20),
    ("B06", "rededge2", "rededge", "Red edge 2", 0.74, 0.018, 20),
    ("B07", "rededge3", "rededge", "Red edge 3", 0.783, 0.028, 20),
    ("B08", "nir", "nir", "NIR 1", 0.842, 0.145, 10),
    ("B8A", "nir08", "nir08", "NIR 2", 0.865, 0.033, 20),
    ("B09", "nir09", "nir09", "NIR 3", 0.945, 0.026, 60),
    ("B10", "cirrus", "cirrus", "SWIR - Cirrus", 1.3735, 0.075, 60),
    ("B11", "swir16", "swir16", "SWIR 1", 1.61, 0.143, 20),
    ("B12", "swir22", "swir22", "SWIR 2", 2.19, 0.242, 20),
)
BAND_INFO = {b[0]: b for b in BANDS}
#: Earth Search asset key of each band (B01 -> coastal …).
ES_KEYS = {b[0]: b[1] for b in BANDS}
#: The L2A product's bands (no B08: the data lacks it; no B10 in L2A).
L2A_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B8A", "B09", "B11", "B12")


def require_data(cities: Sequence[str] = DEFAULT_CITIES, *, with_l2a: bool = True) -> None:
    """Skip the test (with the reason) unless the shared data the fake is built from is there."""
    for city in cities:
        folder = OSCD_IMAGES / city
        if not (folder / "imgs_1").is_dir() or not (folder / "imgs_2").is_dir():
            pytest.skip(f"OSCD data not found at {folder} (../shared/data is absent)")
    if with_l2a and not L2A_SAFE.is_dir():
        pytest.skip(f"L2A SAFE not found at {L2A_SAFE} (../shared/data is absent)")


def oscd_item_id(city: str, date: int, tile: str = "", day: str = "", sat: str = "S2A") -> str:
    """The id of an OSCD item: Earth Search style, with the city (crops of one tile share dates).

    ``tile`` and ``day`` default to what the city's files say; without the data (the
    tests skip then) the id is a placeholder, ``oscd-<city>-<date>``, so that calling
    this where tests are collected does not fail.
    """
    if not tile or not day:
        try:
            info = _oscd_date_info(city, date)
        except (OSError, KeyError, StopIteration):
            return f"oscd-{city}-{date}"
        tile, day, sat = info["tile"], info["day"], info["sat"]
    return f"{sat}_{tile}_{day}_0_L1C-{city}"


@dataclass(frozen=True)
class Fault:
    """One misbehaviour of the fake for one request; build with the class methods."""

    kind: str
    status_code: int = 500
    retry_after: str | None = None
    delay_s: float = 0.0

    @classmethod
    def status(cls, code: int, *, retry_after: str | None = None) -> Fault:
        """Answer HTTP ``code`` (with ``Retry-After: retry_after`` when given)."""
        return cls("status", status_code=code, retry_after=retry_after)

    @classmethod
    def reset(cls) -> Fault:
        """Read the request, then reset the connection (TCP RST, no reply)."""
        return cls("reset")

    @classmethod
    def slow(cls, seconds: float) -> Fault:
        """Sleep ``seconds`` before answering normally."""
        return cls("slow", delay_s=seconds)

    @classmethod
    def truncated(cls) -> Fault:
        """Serve matching files from now on as if they were only their first half."""
        return cls("truncated")


@dataclass
class Hit:
    """One request the fake received, and what it answered (status 0: reset)."""

    method: str
    path: str
    range: str | None
    status: int = 0
    body_bytes: int = 0
    at: float = 0.0


@dataclass
class CogCatalog:
    """What :func:`build_cogs` made: the COGs on disk and the STAC JSON describing them.

    Attributes:
        root: The folder served under ``/files/``.
        collections: STAC collections by id (links are added when served).
        items: STAC items; asset hrefs are server-relative (``/files/...``) and are made
            absolute (``http://127.0.0.1:<port>/files/...``) when served.
        local: For each item id, the local file of each asset that exists on disk.
        build_seconds: How long the build took.
    """

    root: Path
    collections: dict[str, dict[str, Any]]
    items: list[dict[str, Any]]
    local: dict[str, dict[str, Path]]
    build_seconds: float = 0.0


# -- building the COGs and the catalog ----------------------------------------------------


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _parse_time(text: str) -> datetime:
    value = datetime.fromisoformat(text.strip().replace("z", "Z").replace("Z", "+00:00"))
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _band_files(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.glob("*.tif")):
        match = re.search(r"_(B\d\d|B8A)\.tif$", path.name)
        if match:
            found[match.group(1)] = path
    return found


def _oscd_date_info(city: str, date: int) -> dict[str, Any]:
    """Tile, day, satellite and acquisition time of one OSCD city date, from its files."""
    folder = OSCD_IMAGES / city
    dates = dict(
        (key.strip(), value.strip())
        for key, value in (
            line.split(":", 1)
            for line in (folder / "dates.txt").read_text().splitlines()
            if ":" in line
        )
    )
    day = dates[f"date_{date}"]
    names = [p.name for p in (folder / f"imgs_{date}").glob("*.tif")]
    tile_match = next((m for n in names if (m := re.search(r"_T(\d\d[A-Z]{3})_", n))), None)
    if tile_match is None:
        tile_match = next(m for n in names if (m := re.search(r"T(\d\d[A-Z]{3})_", n)))
    tile = tile_match.group(1)
    sat = next((n[:3] for n in names if n[:3] in ("S2A", "S2B")), "S2A")
    # The imgs_2 files are named after their sensing time (T31UDQ_20171107T105229_B01.tif);
    # the imgs_1 ones after their processing time: take the time of day from imgs_2.
    clock = "105000"
    for name in sorted(p.name for p in (folder / "imgs_2").glob("*.tif")):
        clock_match = re.match(r"T\d\d[A-Z]{3}_\d{8}T(\d{6})_", name)
        if clock_match:
            clock = clock_match.group(1)
            break
    when = datetime.strptime(day + clock, "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    return {"tile": tile, "day": day, "sat": sat, "when": when}


def _mgrs(tile: str) -> dict[str, Any]:
    return {
        "mgrs:utm_zone": int(tile[:2]),
        "mgrs:latitude_band": tile[2],
        "mgrs:grid_square": tile[3:],
        "s2:mgrs_tile": tile,
    }


#: rio-cogeo options: no overviews, the intermediate copy in memory and uncompressed (faster).
COG_OPTIONS: dict[str, Any] = {
    "overview_level": 0,
    "quiet": True,
    "in_memory": True,
    "temporary_compression": "NONE",
}


def _cog_profile() -> dict[str, Any]:
    profile: dict[str, Any] = {"driver": "GTiff", "interleave": "pixel", "tiled": True}
    profile.update(
        compress="DEFLATE", blockxsize=COG_BLOCK, blockysize=COG_BLOCK, predictor=2, zlevel=1
    )
    return profile


def _translate(source: Path | str, dest: Path) -> None:
    """One band file to a COG: DEFLATE, 128 px tiles, no overviews, nodata 0, values kept."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    cog_translate(str(source), str(dest), _cog_profile(), nodata=0, **COG_OPTIONS)


def _translate_array(array: np.ndarray, profile: dict[str, Any], dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with MemoryFile() as memfile:
        with memfile.open(**profile) as tmp:
            tmp.write(array, 1)
        with memfile.open() as src:
            cog_translate(src, str(dest), _cog_profile(), **COG_OPTIONS)


def _l2a_band(jp2: Path, pc_dest: Path, es_dest: Path | None, *, scl: bool = False) -> None:
    """An L2A JP2 to two COGs: as is (PC) and with the BOA offset subtracted (ES)."""
    with rasterio.open(jp2) as src:
        array = src.read(1)
        # Written from the array: the JP2s carry GCPs that rio-cogeo would warp with.
        profile = {
            "driver": "GTiff",
            "width": src.width,
            "height": src.height,
            "count": 1,
            "dtype": array.dtype,
            "crs": src.crs,
            "transform": src.transform,
            "nodata": 0,
        }
    _translate_array(array, profile, pc_dest)
    if es_dest is not None:
        if not scl:
            shifted = np.clip(array.astype(np.int32) - 1000, 1, None)
            array = np.where(array == 0, 0, shifted).astype(array.dtype)
        _translate_array(array, profile, es_dest)


def _grid(path: Path) -> dict[str, Any]:
    with rasterio.open(path) as src:
        return {
            "shape": [src.height, src.width],
            "transform": [float(v) for v in list(src.transform)[:6]],
            "res": float(src.res[0]),
            "dtype": src.dtypes[0],
            "bounds": tuple(src.bounds),
            "crs": src.crs,
        }


def _eo_band(band: str, name: str, *, pc: bool) -> dict[str, Any]:
    _, _, common, description, centre, width, _ = BAND_INFO[band]
    number = band[1:].lstrip("0")
    return {
        "name": name,
        "common_name": common,
        "description": f"Band {number} - {description}" if pc else f"{description} (band {number})",
        "center_wavelength": centre,
        "full_width_half_max": width,
    }


def _band_asset(
    band: str, name: str, rel: str, grid: dict[str, Any], *, pc: bool, offset: float | None
) -> dict[str, Any]:
    gsd = round(grid["res"]) if grid["crs"].is_projected else BAND_INFO[band][6]
    eo = _eo_band(band, name, pc=pc)
    asset: dict[str, Any] = {
        "href": rel,
        "type": COG_TYPE,
        "title": f"{eo['description']} - {gsd}m",
        "eo:bands": [eo],
        "gsd": gsd,
        "proj:shape": grid["shape"],
        "proj:transform": grid["transform"],
        "roles": ["data"] if pc else ["data", "reflectance"],
    }
    if offset is not None:
        asset["raster:bands"] = [
            {
                "nodata": 0,
                "data_type": grid["dtype"],
                "bits_per_sample": 15,
                "spatial_resolution": gsd,
                "scale": 0.0001,
                "offset": offset,
            }
        ]
    return asset


def _jp2_twin(asset: dict[str, Any], rel: str) -> dict[str, Any]:
    twin = {k: v for k, v in asset.items() if k not in ("proj:shape", "proj:transform")}
    twin.update(href=rel, type="image/jp2", roles=["data"])
    return twin


def _item(
    item_id: str, collection: str, geometry: dict[str, Any], properties: dict[str, Any]
) -> dict[str, Any]:
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": EXTENSIONS,
        "id": item_id,
        "collection": collection,
        "geometry": geometry,
        "bbox": [float(v) for v in shape(geometry).bounds],
        "properties": properties,
        "assets": {},
        "links": [],
    }


def _oscd_items(
    root: Path, city: str, pool: ThreadPoolExecutor
) -> list[tuple[dict[str, Any], dict[str, Path], list[Any]]]:
    out = []
    for date in (1, 2):
        info = _oscd_date_info(city, date)
        files = _band_files(OSCD_IMAGES / city / f"imgs_{date}")
        jobs = []
        local: dict[str, Path] = {}
        for band, source in files.items():
            dest = root / city / str(date) / f"{band}.tif"
            jobs.append(pool.submit(_translate, source, dest))
            local[ES_KEYS[band]] = dest
        with rasterio.open(files["B02"]) as src:
            footprint = mapping(box(*src.bounds))
        item_id = oscd_item_id(city, date, info["tile"], info["day"], info["sat"])
        platform = {"S2A": "sentinel-2a", "S2B": "sentinel-2b"}[info["sat"]]
        properties = {
            "datetime": _iso(info["when"]),
            "platform": platform,
            "constellation": "sentinel-2",
            "instruments": ["msi"],
            "eo:cloud_cover": OSCD_CLOUD_COVER.get((city, date), 10.0),
            "s2:processing_baseline": "02.06",
            "s2:product_type": "S2MSI1C",
            "proj:epsg": 4326,
            **_mgrs(info["tile"]),
            "oscd:city": city,
        }
        out.append((_item(item_id, OSCD_COLLECTION, footprint, properties), local, jobs))
    return out


def _finish_oscd_assets(item: dict[str, Any], local: dict[str, Path]) -> None:
    city, date = item["properties"]["oscd:city"], local["blue"].parent.name
    base = f"/files/{city}/{date}"
    assets: dict[str, Any] = {}
    for band, key, *_ in BANDS:
        if key not in local:
            continue
        grid = _grid(local[key])
        assets[key] = _band_asset(band, key, f"{base}/{band}.tif", grid, pc=False, offset=0.0)
    for band, key, *_ in BANDS:
        if key in assets:
            assets[f"{key}-jp2"] = _jp2_twin(assets[key], f"{base}/{band}.jp2")
    assets["thumbnail"] = {
        "href": f"{base}/preview.png",
        "type": "image/png",
        "title": "Thumbnail image",
        "roles": ["thumbnail"],
    }
    assets["granule_metadata"] = {
        "href": f"{base}/metadata.xml",
        "type": "application/xml",
        "roles": ["metadata"],
    }
    item["assets"] = assets


def _xml_text(path: Path, tag: str) -> str:
    for element in ET.parse(path).iter():
        if element.tag.rsplit("}", 1)[-1] == tag and element.text:
            return element.text.strip()
    raise KeyError(f"{tag} not found in {path}")


def _l2a_items(
    root: Path, pool: ThreadPoolExecutor
) -> tuple[list[tuple[dict[str, Any], dict[str, Path]]], list[Any]]:
    granule = next((L2A_SAFE / "GRANULE").glob("L2A_*"))
    r60 = granule / "IMG_DATA" / "R60m"
    product_mtd, tile_mtd = L2A_SAFE / "MTD_MSIL2A.xml", granule / "MTD_TL.xml"
    meta = root / "l2a"
    meta.mkdir(parents=True, exist_ok=True)
    (meta / "MTD_MSIL2A.xml").write_bytes(product_mtd.read_bytes())
    (meta / "MTD_TL.xml").write_bytes(tile_mtd.read_bytes())

    jobs = []
    pc_local: dict[str, Path] = {}
    es_local: dict[str, Path] = {}
    for band in (*L2A_BANDS, "SCL"):
        jp2 = next(r60.glob(f"*_{band}_60m.jp2"))
        pc_dest, es_dest = root / "l2a" / "pc" / f"{band}.tif", root / "l2a" / "es" / f"{band}.tif"
        jobs.append(pool.submit(_l2a_band, jp2, pc_dest, es_dest, scl=band == "SCL"))
        pc_local[band] = pc_dest
        es_local["scl" if band == "SCL" else ES_KEYS[band]] = es_dest
    pc_local["B08"] = pc_local["B8A"]
    es_local["nir"] = es_local["nir08"]

    with rasterio.open(next(r60.glob("*_B02_60m.jp2"))) as src:
        footprint = transform_geom(src.crs, "EPSG:4326", mapping(box(*src.bounds)), precision=7)
        epsg = src.crs.to_epsg()
    start = _parse_time(_xml_text(product_mtd, "PRODUCT_START_TIME"))
    tile = re.search(r"_T(\d\d[A-Z]{3})_", L2A_PRODUCT)
    assert tile is not None
    common = {
        "datetime": _iso(start),
        "instruments": ["msi"],
        "eo:cloud_cover": float(_xml_text(tile_mtd, "CLOUDY_PIXEL_PERCENTAGE")),
        "s2:processing_baseline": _xml_text(product_mtd, "PROCESSING_BASELINE"),
        "s2:product_type": _xml_text(product_mtd, "PRODUCT_TYPE"),
        "s2:product_uri": _xml_text(product_mtd, "PRODUCT_URI"),
        "s2:generation_time": _xml_text(product_mtd, "GENERATION_TIME"),
        "s2:nodata_pixel_percentage": float(_xml_text(product_mtd, "NODATA_PIXEL_PERCENTAGE")),
        "sat:relative_orbit": int(_xml_text(product_mtd, "SENSING_ORBIT_NUMBER")),
        "sat:orbit_state": _xml_text(product_mtd, "SENSING_ORBIT_DIRECTION").lower(),
        "proj:epsg": epsg,
    }
    spacecraft = _xml_text(product_mtd, "SPACECRAFT_NAME")  # Sentinel-2A
    pc_item = _item(
        PC_ITEM_ID,
        PC_COLLECTION,
        footprint,
        {
            **common,
            "platform": spacecraft,
            "constellation": "Sentinel 2",
            "s2:mgrs_tile": tile.group(1),
        },
    )
    es_item = _item(
        ES_ITEM_ID,
        ES_COLLECTION,
        footprint,
        {
            **common,
            "platform": spacecraft.lower(),
            "constellation": "sentinel-2",
            **_mgrs(tile.group(1)),
            "earthsearch:boa_offset_applied": True,
        },
    )
    return [(pc_item, pc_local), (es_item, es_local)], jobs


def _finish_l2a_assets(pc: dict[str, Any], es: dict[str, Any], root: Path) -> None:
    pc_assets: dict[str, Any] = {}
    es_assets: dict[str, Any] = {}
    for band in (*L2A_BANDS[:7], "B08", *L2A_BANDS[7:]):
        file_band = "B8A" if band == "B08" else band  # no B08 in the data
        grid = _grid(root / "l2a" / "pc" / f"{file_band}.tif")
        pc_assets[band] = _band_asset(
            band, band, f"/files/l2a/pc/{file_band}.tif", grid, pc=True, offset=None
        )
        key = ES_KEYS[band]
        es_assets[key] = _band_asset(
            band, key, f"/files/l2a/es/{file_band}.tif", grid, pc=False, offset=0.0
        )
    grid = _grid(root / "l2a" / "pc" / "SCL.tif")
    scl = {
        "type": COG_TYPE,
        "gsd": round(grid["res"]),
        "proj:shape": grid["shape"],
        "proj:transform": grid["transform"],
        "roles": ["data"],
    }
    pc_assets["SCL"] = {
        "href": "/files/l2a/pc/SCL.tif",
        "title": "Scene classfication map (SCL)",
        **scl,
    }
    es_assets["scl"] = {
        "href": "/files/l2a/es/SCL.tif",
        "title": "Scene classification map (SCL)",
        **scl,
        "raster:bands": [{"nodata": 0, "data_type": grid["dtype"], "spatial_resolution": 60}],
    }
    for band, *_ in BANDS:
        key = ES_KEYS[band]
        if key in es_assets:
            es_assets[f"{key}-jp2"] = _jp2_twin(es_assets[key], f"/files/l2a/es/{band}.jp2")
    xml = "application/xml"
    pc_assets["preview"] = {
        "href": "/files/l2a/pc/preview.png",
        "type": "image/png",
        "title": "Thumbnail",
        "roles": ["thumbnail"],
    }
    pc_assets["granule-metadata"] = {
        "href": "/files/l2a/MTD_TL.xml",
        "type": xml,
        "roles": ["metadata"],
    }
    pc_assets["product-metadata"] = {
        "href": "/files/l2a/MTD_MSIL2A.xml",
        "type": xml,
        "roles": ["metadata"],
    }
    es_assets["thumbnail"] = {
        "href": "/files/l2a/es/thumbnail.png",
        "type": "image/png",
        "roles": ["thumbnail"],
    }
    es_assets["granule_metadata"] = {
        "href": "/files/l2a/MTD_TL.xml",
        "type": xml,
        "roles": ["metadata"],
    }
    pc["assets"], es["assets"] = pc_assets, es_assets


def _collection(
    collection_id: str, title: str, description: str, items: list[dict[str, Any]]
) -> dict[str, Any]:
    boxes = [item["bbox"] for item in items]
    times = sorted(item["properties"]["datetime"] for item in items)
    spatial = (
        [
            min(b[0] for b in boxes),
            min(b[1] for b in boxes),
            max(b[2] for b in boxes),
            max(b[3] for b in boxes),
        ]
        if boxes
        else [-180.0, -90.0, 180.0, 90.0]
    )
    return {
        "type": "Collection",
        "stac_version": "1.0.0",
        "stac_extensions": EXTENSIONS,
        "id": collection_id,
        "title": title,
        "description": description,
        "license": "proprietary",
        "extent": {
            "spatial": {"bbox": [spatial]},
            "temporal": {"interval": [[times[0], times[-1]] if times else [None, None]]},
        },
        "summaries": {"platform": sorted({i["properties"]["platform"] for i in items})},
        "links": [],
    }


def build_cogs(
    dest: Path, cities: Sequence[str] = DEFAULT_CITIES, with_l2a: bool = True
) -> CogCatalog:
    """Convert the OSCD cities' band files (and the L2A SAFE's 60 m JP2s) to COGs under ``dest``.

    Layout: ``<city>/<1|2>/<band>.tif`` (``B01`` … ``B12``, ``B8A``),
    ``l2a/pc/<band>.tif`` (DN as in the product), ``l2a/es/<band>.tif`` (1000
    subtracted), ``l2a/MTD_MSIL2A.xml`` and ``l2a/MTD_TL.xml``. Bands convert in
    parallel threads (GDAL releases the GIL).

    Raises:
        FileNotFoundError: The shared data is not there (:func:`require_data` skips instead).
    """
    started = time.monotonic()
    for city in cities:
        if not (OSCD_IMAGES / city / "imgs_2").is_dir():
            raise FileNotFoundError(f"no OSCD city {city!r} under {OSCD_IMAGES}")
    if with_l2a and not L2A_SAFE.is_dir():
        raise FileNotFoundError(f"no L2A SAFE at {L2A_SAFE}")
    dest.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        dest.chmod(0o755)
    workers = max(2, min(8, os.cpu_count() or 2))
    # rio-cogeo multiplies Affines with `*` (a PendingDeprecationWarning in affine 2.4+).
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=workers) as pool:
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        l2a: list[tuple[dict[str, Any], dict[str, Path]]] = []
        jobs: list[Any] = []
        if with_l2a:  # the slow ones (JP2 decoding) first
            l2a, jobs = _l2a_items(dest, pool)
        oscd = [entry for city in cities for entry in _oscd_items(dest, city, pool)]
        for job in [*jobs, *(j for _, _, js in oscd for j in js)]:
            job.result()
    for item, local, _ in oscd:
        _finish_oscd_assets(item, local)
    if l2a:
        _finish_l2a_assets(l2a[0][0], l2a[1][0], dest)
    for folder in (dest, *(p for p in dest.rglob("*") if p.is_dir())):
        with contextlib.suppress(OSError):
            folder.chmod(0o755)

    oscd_items = [item for item, _, _ in oscd]
    collections = {
        OSCD_COLLECTION: _collection(
            OSCD_COLLECTION,
            "OSCD Sentinel-2 L1C (Earth Search v1 style)",
            "Onera Satellite Change Detection crops as Level-1C COGs, one per band, "
            "with Earth Search v1 asset keys.",
            oscd_items,
        )
    }
    if l2a:
        collections[PC_COLLECTION] = _collection(
            PC_COLLECTION,
            "Sentinel-2 L2A (Planetary Computer style)",
            "One real L2A product, baseline 04.00, 60 m COGs with DN as delivered (+1000).",
            [l2a[0][0]],
        )
        collections[ES_COLLECTION] = _collection(
            ES_COLLECTION,
            "Sentinel-2 L2A (Earth Search style, offset applied)",
            "The same L2A product with the BOA offset already subtracted from the DN.",
            [l2a[1][0]],
        )
    items = [*oscd_items, *(item for item, _ in l2a)]
    files = {item["id"]: loc for item, loc, _ in oscd} | {item["id"]: loc for item, loc in l2a}
    return CogCatalog(dest, collections, items, files, time.monotonic() - started)


# -- the server ---------------------------------------------------------------------------


class BadRequest(ValueError):
    """A search parameter the fake cannot read: answered 400."""


def _parse_interval(text: str) -> tuple[datetime | None, datetime | None]:
    text = text.strip()
    if "/" not in text:
        when = _parse_time(text)
        return when, when
    first, _, second = text.partition("/")
    try:
        start = None if first.strip() in ("", "..") else _parse_time(first)
        end = None if second.strip() in ("", "..") else _parse_time(second)
    except ValueError as exc:
        raise BadRequest(f"bad datetime {text!r}: {exc}") from exc
    return start, end


def _item_interval(item: dict[str, Any]) -> tuple[datetime, datetime] | None:
    try:
        props = item["properties"]
        if props.get("datetime"):
            when = _parse_time(props["datetime"])
            return when, when
        return _parse_time(props["start_datetime"]), _parse_time(props["end_datetime"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


QUERY_OPS = {"eq", "neq", "ne", "lt", "lte", "gt", "gte", "in"}


def _compare(value: Any, op: str, target: Any) -> bool:
    if op == "eq":
        return bool(value == target)
    if op in ("neq", "ne"):
        return bool(value != target)
    if op == "in":
        return value in target
    try:
        if op == "lt":
            return bool(value < target)
        if op == "lte":
            return bool(value <= target)
        if op == "gt":
            return bool(value > target)
        if op == "gte":
            return bool(value >= target)
    except TypeError:
        return False
    raise BadRequest(f"unsupported query operator {op!r}")


def _parse_ranges(header: str | None, size: int) -> list[tuple[int, int]] | None:
    """The byte ranges (inclusive) of a ``Range`` header; None: ignore it; []: unsatisfiable."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or not spec.strip():
        return None
    ranges = []
    for part in spec.split(","):
        first, dash, last = part.strip().partition("-")
        if not dash:
            return None
        try:
            if first == "":
                length = int(last)
                if length <= 0 or size == 0:
                    continue
                ranges.append((max(0, size - length), size - 1))
                continue
            start = int(first)
            end = int(last) if last else None
        except ValueError:
            return None
        if start < 0 or (end is not None and end < start):
            return None
        if start >= size:
            continue
        ranges.append((start, size - 1 if end is None else min(end, size - 1)))
    return ranges


@dataclass
class FakeStac:
    """The fake's state and knobs; the HTTP server reads them on every request.

    Attributes:
        catalog: The session's COGs and STAC JSON (items are copied: edits stay here).
        page_size: Most features per search page, whatever ``limit`` asks.
        url: The API root (``http://127.0.0.1:<port>``) once started.
        search_requests: ``/search`` requests received (every page, faulted ones too).
        search_params: The parameters of each ``/search`` request (GET ones parsed).
        log: Every request in order.
        faults_served: Faults served, by pattern and kind (``status-503``, ``reset`` …).
        bandwidth_bps: When set, bodies go out over one shared link of this many bytes
            a second: each waits until the link has carried those before it (a
            catalog far away; ``bench/stac.py --mbps``).
    """

    catalog: CogCatalog
    page_size: int = 100
    bandwidth_bps: float | None = None
    url: str = ""
    search_requests: int = 0
    search_params: list[dict[str, Any]] = field(default_factory=list)
    log: list[Hit] = field(default_factory=list)
    faults_served: Counter[tuple[str, str]] = field(default_factory=Counter)
    _entries: list[tuple[dict[str, Any], bool]] = field(default_factory=list)
    _local: dict[str, dict[str, Path]] = field(default_factory=dict)
    _faults: list[tuple[str, deque[Fault]]] = field(default_factory=list)
    _truncated: list[str] = field(default_factory=list)
    _requests: Counter[str] = field(default_factory=Counter)
    _bytes: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _link_free_at: float = 0.0
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self._entries = [(copy.deepcopy(item), False) for item in self.catalog.items]
        self._local = {key: dict(value) for key, value in self.catalog.local.items()}

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Listen on 127.0.0.1 on a free port, in a daemon thread."""
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.02,), daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- what is served -------------------------------------------------------------------

    @property
    def collection_ids(self) -> list[str]:
        """The collections served."""
        return list(self.catalog.collections)

    def item_ids(self, collection: str | None = None) -> list[str]:
        """Ids of the items served (in ``collection``), raw ones included, in catalog order."""
        with self._lock:
            return [
                str(item["id"])
                for item, _ in self._entries
                if isinstance(item, dict)
                and "id" in item
                and (collection is None or item.get("collection") == collection)
            ]

    def item(self, item_id: str) -> dict[str, Any]:
        """The item as served (absolute hrefs)."""
        with self._lock:
            for item, raw in self._entries:
                if isinstance(item, dict) and item.get("id") == item_id:
                    return copy.deepcopy(item) if raw else self._render_item(item)
        raise KeyError(item_id)

    def href(self, item_id: str, key: str) -> str:
        """The absolute href of an item's asset."""
        return str(self.item(item_id)["assets"][key]["href"])

    def local_paths(self, item_id: str) -> dict[str, Path]:
        """The local COG of each band asset of an item (SCL included; ``drop_asset`` keeps it)."""
        return dict(self._local[item_id])

    def local_path(self, item_id: str, key: str) -> Path:
        """The local file behind one asset (``nir`` of the L2A items: the B8A COG)."""
        return self._local[item_id][key]

    # -- knobs ----------------------------------------------------------------------------

    def inject(self, pattern: str, fault: Fault, times: int = 1) -> None:
        """Make the next ``times`` requests whose URL path matches ``pattern`` misbehave.

        ``Fault.truncated()`` is not queued: matching files stay truncated (``times`` ignored).
        """
        if fault.kind == "truncated":
            self.truncate(pattern)
            return
        with self._lock:
            for existing, queue in self._faults:
                if existing == pattern:
                    queue.extend([fault] * times)
                    return
            self._faults.append((pattern, deque([fault] * times)))

    def truncate(self, pattern: str) -> None:
        """Serve every file whose URL path matches ``pattern`` as its first half, from now on."""
        with self._lock:
            self._truncated.append(pattern)

    def clear_faults(self) -> None:
        """Drop queued faults and truncations."""
        with self._lock:
            self._faults.clear()
            self._truncated.clear()

    def drop_asset(self, item_id: str, key: str) -> None:
        """Remove one asset from an item (an item lacking a band)."""
        with self._lock:
            item = self._find(item_id)
            del item["assets"][key]

    def update_properties(self, item_id: str, properties: dict[str, Any]) -> None:
        """Set properties of an item (``None`` values are stored as JSON null)."""
        with self._lock:
            self._find(item_id)["properties"].update(properties)

    def add_item_without_datetime(
        self, base_item_id: str | None = None, item_id: str | None = None
    ) -> str:
        """A copy of an item (default: the first) with ``datetime: null`` and no start/end.

        Returns its id (default ``<base>-no-datetime``); its assets are the base item's.
        """
        with self._lock:
            base_id = base_item_id or str(self._entries[0][0]["id"])
            item = copy.deepcopy(self._find(base_id))
            item["id"] = item_id or f"{base_id}-no-datetime"
            item["properties"]["datetime"] = None
            item["properties"].pop("start_datetime", None)
            item["properties"].pop("end_datetime", None)
            self._entries.append((item, False))
            self._local[item["id"]] = dict(self._local.get(base_id, {}))
            return str(item["id"])

    def add_raw_item(self, item: dict[str, Any]) -> None:
        """Serve any JSON object as a feature, verbatim (hrefs are not made absolute)."""
        with self._lock:
            self._entries.append((copy.deepcopy(item), True))

    # -- counters -------------------------------------------------------------------------

    def _path_of(self, ref: str) -> str:
        return urlsplit(ref).path if ref.startswith("http") else ref

    def bytes_served(self, path_suffix: str) -> int:
        """Body bytes sent for URL paths ending with ``path_suffix`` (or an href)."""
        suffix = self._path_of(path_suffix)
        with self._lock:
            return sum(n for path, n in self._bytes.items() if path.endswith(suffix))

    def request_count(self, path_suffix: str) -> int:
        """Requests received for URL paths ending with ``path_suffix`` (or an href)."""
        suffix = self._path_of(path_suffix)
        with self._lock:
            return sum(n for path, n in self._requests.items() if path.endswith(suffix))

    def total_bytes_served(self) -> int:
        """Body bytes sent by ``/files/`` since the start or the last reset."""
        with self._lock:
            return sum(n for path, n in self._bytes.items() if path.startswith("/files/"))

    def file_size(self, path_suffix: str) -> int:
        """The size on disk of the one file whose ``/files/`` URL path ends with ``path_suffix``."""
        suffix = self._path_of(path_suffix)
        root = self.catalog.root
        found = [
            p
            for p in root.rglob("*")
            if p.is_file() and f"/files/{p.relative_to(root)}".endswith(suffix)
        ]
        if len(found) != 1:
            raise KeyError(f"{len(found)} files match {path_suffix!r}")
        return found[0].stat().st_size

    def reset_counters(self) -> None:
        """Zero the request and byte counters, the search count and the log."""
        with self._lock:
            self._requests.clear()
            self._bytes.clear()
            self.log.clear()
            self.search_requests = 0
            self.search_params.clear()

    def ranges_sent(self, path_suffix: str = "/files/") -> list[tuple[str, str | None]]:
        """(method, Range header) of each request to matching paths, in order."""
        suffix = self._path_of(path_suffix)
        with self._lock:
            return [
                (hit.method, hit.range)
                for hit in self.log
                if hit.path.endswith(suffix)
                or (suffix == "/files/" and hit.path.startswith(suffix))
            ]

    # -- request handling (called from the server's threads) --------------------------------

    def _find(self, item_id: str) -> dict[str, Any]:
        for item, _ in self._entries:
            if isinstance(item, dict) and item.get("id") == item_id:
                return item
        raise KeyError(item_id)

    def _record(self, method: str, path: str, range_header: str | None) -> Hit:
        hit = Hit(method, path, range_header, at=time.monotonic())
        with self._lock:
            self._requests[path] += 1
            self.log.append(hit)
            if path.rstrip("/") == "/search":
                self.search_requests += 1
        return hit

    def _link_delay(self, body_bytes: int) -> float:
        """Seconds a body of this size waits for the shared link (0 without a bandwidth)."""
        if not self.bandwidth_bps or body_bytes <= 0:
            return 0.0
        with self._lock:
            now = time.monotonic()
            self._link_free_at = max(now, self._link_free_at) + body_bytes / self.bandwidth_bps
            return self._link_free_at - now

    def _sent(self, hit: Hit, status: int, body_bytes: int) -> None:
        with self._lock:
            hit.status, hit.body_bytes = status, body_bytes
            self._bytes[hit.path] += body_bytes

    def _next_fault(self, path: str) -> Fault | None:
        with self._lock:
            for pattern, queue in self._faults:
                if queue and fnmatch.fnmatchcase(path, pattern):
                    fault = queue.popleft()
                    kind = f"status-{fault.status_code}" if fault.kind == "status" else fault.kind
                    self.faults_served[(pattern, kind)] += 1
                    return fault
        return None

    def _is_truncated(self, path: str) -> bool:
        with self._lock:
            return any(fnmatch.fnmatchcase(path, pattern) for pattern in self._truncated)

    def _file(self, path: str) -> Path | None:
        root = self.catalog.root.resolve()
        candidate = (root / path.removeprefix("/files/")).resolve()
        if not candidate.is_relative_to(root) or not candidate.is_file():
            return None
        return candidate

    def _absolute(self, href: Any) -> Any:
        return self.url + href if isinstance(href, str) and href.startswith("/") else href

    def _render_item(self, item: dict[str, Any]) -> dict[str, Any]:
        out = copy.deepcopy(item)
        for asset in out.get("assets", {}).values():
            asset["href"] = self._absolute(asset.get("href"))
        collection = f"{self.url}/collections/{out.get('collection')}"
        out["links"] = [
            {
                "rel": "self",
                "href": f"{collection}/items/{out['id']}",
                "type": "application/geo+json",
            },
            {"rel": "parent", "href": collection, "type": "application/json"},
            {"rel": "collection", "href": collection, "type": "application/json"},
            {"rel": "root", "href": f"{self.url}/", "type": "application/json"},
        ]
        return out

    def _render_collection(self, collection: dict[str, Any]) -> dict[str, Any]:
        out = copy.deepcopy(collection)
        href = f"{self.url}/collections/{out['id']}"
        out["links"] = [
            {"rel": "self", "href": href, "type": "application/json"},
            {"rel": "parent", "href": f"{self.url}/", "type": "application/json"},
            {"rel": "root", "href": f"{self.url}/", "type": "application/json"},
        ]
        return out

    def landing(self) -> dict[str, Any]:
        """The landing page."""
        root = f"{self.url}/"
        geojson = "application/geo+json"
        links = [
            {"rel": "self", "href": root, "type": "application/json"},
            {"rel": "root", "href": root, "type": "application/json"},
            {"rel": "conformance", "href": f"{self.url}/conformance", "type": "application/json"},
            {"rel": "data", "href": f"{self.url}/collections", "type": "application/json"},
            {"rel": "search", "href": f"{self.url}/search", "type": geojson, "method": "GET"},
            {"rel": "search", "href": f"{self.url}/search", "type": geojson, "method": "POST"},
        ]
        links += [
            {"rel": "child", "href": f"{self.url}/collections/{cid}", "type": "application/json"}
            for cid in self.catalog.collections
        ]
        return {
            "type": "Catalog",
            "stac_version": "1.0.0",
            "id": "revisit-fake-stac",
            "title": "revisit fake STAC API",
            "description": "Real Sentinel-2 COGs served on 127.0.0.1 for tests.",
            "conformsTo": CONFORMS_TO,
            "links": links,
        }

    def _search_get_params(self, query: str) -> dict[str, Any]:
        raw = {key: values[-1] for key, values in parse_qs(query, keep_blank_values=True).items()}
        params: dict[str, Any] = dict(raw)
        try:
            for key in ("collections", "ids"):
                if key in raw:
                    params[key] = [v for v in raw[key].split(",") if v]
            if "bbox" in raw:
                params["bbox"] = [float(v) for v in raw["bbox"].split(",")]
            for key in ("intersects", "query"):
                if key in raw:
                    params[key] = json.loads(raw[key])
        except (ValueError, json.JSONDecodeError) as exc:
            raise BadRequest(f"bad search parameter: {exc}") from exc
        return params

    def _search(self, params: dict[str, Any], method: str) -> dict[str, Any]:
        with self._lock:
            self.search_params.append(copy.deepcopy(params))
            entries = list(self._entries)
        collections = params.get("collections")
        if isinstance(collections, str):
            collections = [collections]
        ids = params.get("ids")
        if isinstance(ids, str):
            ids = [ids]
        area = None
        try:
            if params.get("bbox") is not None:
                b = [float(v) for v in params["bbox"]]
                area = box(b[0], b[1], b[3], b[4]) if len(b) == 6 else box(*b)
            elif params.get("intersects") is not None:
                area = shape(params["intersects"])
            limit = int(params.get("limit", 10))
            token = str(params.get("token") or "next:0")
            offset = int(token.removeprefix("next:"))
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise BadRequest(f"bad search parameter: {exc}") from exc
        if limit < 1:
            raise BadRequest("limit must be positive")
        if params.get("filter") is not None:
            raise BadRequest("filter (CQL2) is not supported here: use query")
        interval = _parse_interval(params["datetime"]) if params.get("datetime") else None
        query = params.get("query") or {}
        if not isinstance(query, dict):
            raise BadRequest("query must be an object")
        for name, ops in query.items():
            if not isinstance(ops, dict) or not set(ops) <= QUERY_OPS:
                raise BadRequest(f"unsupported query of {name!r}: {ops!r}")

        def keep(item: Any) -> bool:
            if not isinstance(item, dict):
                return True
            if collections is not None and item.get("collection") not in collections:
                return False
            if ids is not None and item.get("id") not in ids:
                return False
            if area is not None:
                try:
                    if not shape(item["geometry"]).intersects(area):
                        return False
                except Exception:
                    pass  # malformed: passed on, as a lax server would
            if interval is not None:
                span = _item_interval(item)
                if span is not None:
                    start, end = interval
                    if (start is not None and span[1] < start) or (
                        end is not None and span[0] > end
                    ):
                        return False
            props: dict[str, Any] = item.get("properties") or {}
            if not isinstance(props, dict):
                props = {}
            for name, ops in query.items():
                if name not in props or props[name] is None:
                    return False
                if not all(_compare(props[name], op, target) for op, target in ops.items()):
                    return False
            return True

        matched = [(item, raw) for item, raw in entries if keep(item)]

        def order(entry: tuple[Any, bool]) -> tuple[int, datetime, str]:
            item = entry[0]
            span = _item_interval(item) if isinstance(item, dict) else None
            ident = str(item.get("id", "")) if isinstance(item, dict) else ""
            if span is None:
                return (1, datetime.min.replace(tzinfo=UTC), ident)
            return (0, span[0], ident)

        matched.sort(key=order)
        size = min(limit, self.page_size)
        page = matched[offset : offset + size]
        features = [copy.deepcopy(item) if raw else self._render_item(item) for item, raw in page]
        links: list[dict[str, Any]] = [
            {"rel": "root", "href": f"{self.url}/", "type": "application/json"},
        ]
        following = offset + size
        if following < len(matched):
            token_next = f"next:{following}"
            if method == "POST":
                links.append(
                    {
                        "rel": "next",
                        "href": f"{self.url}/search",
                        "type": "application/geo+json",
                        "method": "POST",
                        "body": {"token": token_next},
                        "merge": True,
                    }
                )
            else:
                query_params = {
                    k: v for k, v in self._get_query_pairs(params).items() if k != "token"
                }
                query_params["token"] = token_next
                links.append(
                    {
                        "rel": "next",
                        "href": f"{self.url}/search?{urlencode(query_params)}",
                        "type": "application/geo+json",
                        "method": "GET",
                    }
                )
        return {
            "type": "FeatureCollection",
            "features": features,
            "links": links,
            "numberMatched": len(matched),
            "numberReturned": len(features),
            "context": {"limit": size, "matched": len(matched), "returned": len(features)},
        }

    @staticmethod
    def _get_query_pairs(params: dict[str, Any]) -> dict[str, str]:
        out: dict[str, str] = {}
        for key, value in params.items():
            if key in ("collections", "ids", "bbox") and isinstance(value, list):
                out[key] = ",".join(map(str, value))
            elif isinstance(value, (dict, list)):
                out[key] = json.dumps(value, separators=(",", ":"))
            else:
                out[key] = str(value)
        return out


def _error(code: str, description: str) -> bytes:
    return json.dumps({"code": code, "description": description}).encode()


class _Handler(BaseHTTPRequestHandler):
    fake: FakeStac
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read ``fake.log`` instead."""

    def _send(
        self,
        hit: Hit,
        status: int,
        body: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
        *,
        head: bool = False,
        length: int | None = None,
    ) -> None:
        self.fake._sent(hit, status, 0 if head else len(body))
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            delay = self.fake._link_delay(len(body))
            if delay > 0:
                time.sleep(delay)
            self.wfile.write(body)

    def _reset(self) -> None:
        """Abort the connection: SO_LINGER 0 makes the close send a TCP RST."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()

    def handle(self) -> None:
        """Serve the connection; a client that resets it (curl does) is not an error."""
        with contextlib.suppress(ConnectionResetError, BrokenPipeError, TimeoutError):
            super().handle()

    def finish(self) -> None:
        """Close the handler's files; a reset connection has nothing left to flush."""
        with contextlib.suppress(OSError):
            super().finish()

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def _handle(self, method: str) -> None:
        split = urlsplit(self.path)
        path = unquote(split.path)
        raw = b""
        if method == "POST":
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        hit = self.fake._record(method, path, self.headers.get("Range"))
        fault = self.fake._next_fault(path)
        # The client may give up (timeout) before the reply.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            if fault is not None and fault.kind == "slow":
                time.sleep(fault.delay_s)
            elif fault is not None and fault.kind == "reset":
                self._reset()
                return
            elif fault is not None and fault.kind == "status":
                headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                body = _error("Injected", f"injected {fault.status_code}")
                self._send(
                    hit, fault.status_code, body, "application/json", headers, head=method == "HEAD"
                )
                return
            if path.startswith("/files/"):
                self._serve_file(hit, method, path)
            else:
                self._serve_api(hit, method, path, split.query, raw)

    def _serve_file(self, hit: Hit, method: str, path: str) -> None:
        head = method == "HEAD"
        if method not in ("GET", "HEAD"):
            self._send(hit, 405, _error("MethodNotAllowed", method), "application/json")
            return
        local = self.fake._file(path)
        if local is None:
            self._send(hit, 404, _error("NotFound", path), "application/json", head=head)
            return
        stat = local.stat()
        size = stat.st_size // 2 if self.fake._is_truncated(path) else stat.st_size
        content_type = {
            ".tif": "image/tiff",
            ".xml": "application/xml",
            ".png": "image/png",
        }.get(local.suffix, "application/octet-stream")
        headers = {
            "Accept-Ranges": "bytes",
            "ETag": f'"{size:x}-{stat.st_mtime_ns:x}"',
            "Last-Modified": formatdate(stat.st_mtime, usegmt=True),
        }
        ranges = None if head else _parse_ranges(self.headers.get("Range"), size)

        def read(start: int, end: int) -> bytes:
            with local.open("rb") as handle:
                handle.seek(start)
                return handle.read(end - start + 1)

        if ranges is None:
            body = b"" if head else read(0, size - 1) if size else b""
            self._send(hit, 200, body, content_type, headers, head=head, length=size)
        elif not ranges:
            headers["Content-Range"] = f"bytes */{size}"
            self._send(hit, 416, b"", content_type, headers)
        elif len(ranges) == 1:
            start, end = ranges[0]
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            self._send(hit, 206, read(start, end), content_type, headers)
        else:
            boundary = uuid.uuid4().hex
            parts = []
            for start, end in ranges:
                parts.append(
                    f"--{boundary}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Range: bytes {start}-{end}/{size}\r\n\r\n".encode()
                )
                parts.append(read(start, end))
                parts.append(b"\r\n")
            parts.append(f"--{boundary}--\r\n".encode())
            self._send(
                hit,
                206,
                b"".join(parts),
                f"multipart/byteranges; boundary={boundary}",
                headers,
            )

    def _serve_api(self, hit: Hit, method: str, path: str, query: str, raw: bytes) -> None:
        fake = self.fake
        route = path.rstrip("/") or "/"
        head = method == "HEAD"
        as_json = "application/json"

        def reply(status: int, payload: Any, content_type: str = as_json) -> None:
            self._send(hit, status, json.dumps(payload).encode(), content_type, head=head)

        if route == "/search":
            if method not in ("GET", "POST"):
                reply(405, {"code": "MethodNotAllowed", "description": method})
                return
            try:
                if method == "POST":
                    params = json.loads(raw or b"{}")
                    if not isinstance(params, dict):
                        raise BadRequest("the body must be a JSON object")
                else:
                    params = fake._search_get_params(query)
                result = fake._search(params, method)
            except (BadRequest, json.JSONDecodeError) as exc:
                reply(400, {"code": "BadRequest", "description": str(exc)})
                return
            reply(200, result, "application/geo+json")
            return
        if method == "POST":
            reply(405, {"code": "MethodNotAllowed", "description": f"POST {path}"})
            return
        parts = [p for p in route.split("/") if p]
        if route == "/":
            reply(200, fake.landing())
        elif route == "/conformance":
            reply(200, {"conformsTo": CONFORMS_TO})
        elif parts == ["collections"]:
            collections = [fake._render_collection(c) for c in fake.catalog.collections.values()]
            links = [
                {"rel": "self", "href": f"{fake.url}/collections", "type": as_json},
                {"rel": "root", "href": f"{fake.url}/", "type": as_json},
            ]
            reply(200, {"collections": collections, "links": links})
        elif len(parts) == 2 and parts[0] == "collections" and parts[1] in fake.catalog.collections:
            reply(200, fake._render_collection(fake.catalog.collections[parts[1]]))
        elif len(parts) == 4 and parts[0] == "collections" and parts[2] == "items":
            try:
                item = fake.item(parts[3])
            except KeyError:
                item = None
            if item is None or item.get("collection") != parts[1]:
                reply(404, {"code": "NotFound", "description": f"no item {parts[3]}"})
            else:
                reply(200, item, "application/geo+json")
        else:
            reply(404, {"code": "NotFound", "description": f"no route {path}"})


_SESSION: dict[str, CogCatalog] = {}
_SESSION_LOCK = threading.Lock()


def save_catalog(catalog: CogCatalog) -> None:
    """Write ``catalog.json`` next to the COGs (read back by :func:`load_catalog`)."""
    data = {
        "collections": catalog.collections,
        "items": catalog.items,
        "local": {
            item: {key: str(path.relative_to(catalog.root)) for key, path in paths.items()}
            for item, paths in catalog.local.items()
        },
        "build_seconds": catalog.build_seconds,
    }
    tmp = catalog.root / "catalog.json.tmp"
    tmp.write_text(json.dumps(data))
    tmp.replace(catalog.root / "catalog.json")


def load_catalog(root: Path) -> CogCatalog:
    """The catalog :func:`save_catalog` wrote under ``root``."""
    data = json.loads((root / "catalog.json").read_text())
    local = {
        item: {key: root / rel for key, rel in paths.items()}
        for item, paths in data["local"].items()
    }
    return CogCatalog(root, data["collections"], data["items"], local, data["build_seconds"])


def session_catalog(tmp_path_factory: pytest.TempPathFactory) -> CogCatalog:
    """The COGs of this test run, built on first use; skips without the data.

    Under pytest-xdist the workers share one build (in the run's common temporary
    folder, under a file lock): the first worker builds, the others wait and load it.
    """
    require_data()
    with _SESSION_LOCK:
        if "catalog" not in _SESSION:
            base = tmp_path_factory.getbasetemp()
            shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
            root = shared / "fake-stac-cogs"
            with (shared / "fake-stac-cogs.lock").open("w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    if (root / "catalog.json").is_file():
                        _SESSION["catalog"] = load_catalog(root)
                    else:
                        shutil.rmtree(root, ignore_errors=True)  # a build cut short
                        catalog = build_cogs(root)
                        save_catalog(catalog)
                        _SESSION["catalog"] = catalog
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        return _SESSION["catalog"]


@pytest.fixture(name="fake_stac_cogs", scope="session")
def fake_stac_cogs_fixture(tmp_path_factory: pytest.TempPathFactory) -> CogCatalog:
    """The session's COGs and STAC JSON (skips when ../shared/data is absent)."""
    return session_catalog(tmp_path_factory)


@pytest.fixture(name="fake_stac")
def fake_stac_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeStac]:
    """A running fake STAC API and COG server on the session's COGs, stopped after the test."""
    fake = FakeStac(session_catalog(tmp_path_factory))
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()
