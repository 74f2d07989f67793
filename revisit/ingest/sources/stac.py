"""The STAC source: Sentinel-2 COGs from a public STAC API, each chip read by HTTP ranges.

Products are found with :mod:`pystac_client` (an ``/search`` by the area's bbox,
the time range and ``eo:cloud_cover``, following the API's paging) and read
with rasterio through GDAL's ``/vsicurl/``: per location only the window of
each band's COG that covers its chip, as stackstac and odc-stac do, then the
same warp onto the location's 10 m UTM grid as the ``local`` source
(:class:`~revisit.ingest.sources.cutter.ChipCutter`).

Which asset holds which band: an asset whose ``eo:bands`` name or key is a
Sentinel-2 band name (``B02``, Planetary Computer's keys), else an Earth
Search key (``blue``, ``nir08``, ``swir16``, …; see :data:`EARTH_SEARCH_KEYS`).
Only GeoTIFF assets with the ``data`` role (or no roles) count: thumbnails,
metadata and Earth Search's ``*-jp2`` duplicates are ignored. ``scl`` / ``SCL``
gives the cloud and no-data masks; without it the cloud fraction is 0.

The +1000 DN offset of processing baseline 04.00 and later is removed only
where the item says it is there (:func:`dn_offset`): not when
``earthsearch:boa_offset_applied`` is true (Earth Search removed it already),
else when ``s2:processing_baseline`` is 04.00 or later, else, for an item with
no baseline, what its ``raster:bands`` offset says.

Errors, as :mod:`revisit.ingest.sources.base` asks:

- an item without a date goes to ``on_rejected`` as ``missing-metadata``, one
  lacking a band asset as ``wrong-band-count``, one without a usable footprint
  as ``bad-reply``: each is quarantined, the search goes on;
- a band file the server says is not there (404, 410) makes the scene
  ``unreadable``; one that is served but whose header or tiles cannot be read
  (truncated, not a TIFF) ``corrupt-raster``. GDAL reports a short read and a
  failed range request alike, so the file's length is asked (``HEAD``) and
  compared with where its tiles end before a read failure is called corrupt;
- 429, 5xx, resets, refused connections and timeouts, of the search and of
  the reads, are retried under the one :class:`~revisit.ingest.sources.retry.RetryPolicy`
  of revisit's HTTP sources, then raise :class:`SourceUnavailableError`. GDAL
  remembers a failed URL, so before each retry its cache of the scene's URLs is
  cleared (``VSICurlPartialClearCache``).

URL signing is an adapter (:class:`Signer`): :class:`PlanetaryComputerSigner`
appends a SAS token fetched from Planetary Computer's token endpoint.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar
from urllib.parse import unquote, urlsplit

import numpy.typing as npt
import rasterio
import requests
from pystac_client import Client, ConformanceClasses
from pystac_client.exceptions import APIError
from pystac_client.stac_api_io import StacApiIO
from rasterio.errors import RasterioError
from rasterio.windows import Window
from shapely.geometry.base import BaseGeometry

from revisit.config import Settings, StacSettings
from revisit.errors import IngestError, SceneRejectedError, SourceUnavailableError
from revisit.ingest import reasons
from revisit.ingest.sources.base import OnRejected, SceneSource
from revisit.ingest.sources.cutter import ChipCutter, OpenRaster, ReadFailedError
from revisit.ingest.sources.features import feature_footprint, short
from revisit.ingest.sources.rasters import BandFile, CloudMask, Product, canonical_band, one_line
from revisit.ingest.sources.retry import RetryPolicy
from revisit.types import CANONICAL_BANDS, Chip, Level, LocationRef, Rejection, SceneRef

log = logging.getLogger(__name__)

#: Where the search starts when ``since`` is None: before Sentinel-2A's first image.
MISSION_START: Final = datetime(2015, 6, 1, tzinfo=UTC)

#: Earth Search v1 asset keys (``sentinel-2-l2a``, ``sentinel-2-c1-l2a``) -> band.
EARTH_SEARCH_KEYS: Final[Mapping[str, str]] = {
    "coastal": "B01",
    "blue": "B02",
    "green": "B03",
    "red": "B04",
    "rededge1": "B05",
    "rededge2": "B06",
    "rededge3": "B07",
    "nir": "B08",
    "nir08": "B8A",
    "nir09": "B09",
    "swir16": "B11",
    "swir22": "B12",
}
#: The DN offset of processing baseline 04.00 and later (BOA_ADD_OFFSET, RADIO_ADD_OFFSET).
BASELINE_OFFSET: Final = -1000
#: Flags by which a catalog says it has removed the offset from its COGs already.
OFFSET_APPLIED_FLAGS: Final = ("earthsearch:boa_offset_applied", "sentinel:boa_offset_applied")
#: Reflectance per DN in Sentinel-2 products (QUANTIFICATION_VALUE 10000).
_DN_SCALE = 1e-4
_BASELINE = re.compile(r"^(\d{1,2})\.(\d{2})$")
_BASELINE_IN_ID = re.compile(r"_N(\d{2})(\d{2})(?:_|$)")
_TILE_IN_ID = re.compile(r"_(T\d{2}[A-Z]{3})(?:_|$)")
_HTTP_CODE = re.compile(r"HTTP response code: (\d{3})")
_NETWORK_WORDS = (
    "connection reset",
    "connection refused",
    "couldn't connect",
    "could not connect",
    "recv failure",
    "send failure",
    "empty reply",
    "timed out",
    "timeout",
    "curl error",
    "ssl",
    "http response code: 0",
    "transfer closed",
)
_MAX_DETAIL = 240


def _short(text: str) -> str:
    return short(text, _MAX_DETAIL)


def gdal_options(settings: StacSettings) -> dict[str, str | int]:
    """GDAL's configuration for reading COG windows over HTTP.

    No directory listing on open, the header read in one request, consecutive
    ranges merged, a block cache and a cache of ranges already fetched; no
    retries of GDAL's own (revisit's policy retries, see the module doc).
    """
    return {
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
        "GDAL_INGESTED_BYTES_AT_OPEN": "32768",
        "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
        "GDAL_HTTP_MULTIPLEX": "YES",
        "GDAL_HTTP_VERSION": "2",
        "GDAL_HTTP_MAX_RETRY": "0",
        "GDAL_HTTP_TIMEOUT": str(max(1, math.ceil(settings.timeout_s))),
        "GDAL_HTTP_CONNECTTIMEOUT": str(max(1, math.ceil(min(settings.timeout_s, 30.0)))),
        # rasterio sets this one through GDALSetCacheMax64: an int, in bytes.
        "GDAL_CACHEMAX": settings.gdal_cache_mb * 1024 * 1024,
        "CPL_VSIL_CURL_CACHE_SIZE": str(settings.http_cache_mb * 1024 * 1024),
        "VSI_CACHE": "TRUE",
        "VSI_CACHE_SIZE": str(min(settings.http_cache_mb, 64) * 1024 * 1024),
        # Single-threaded decoding, as the local source reads (see rasters.gdal_env).
        "GDAL_NUM_THREADS": "1",
    }


@functools.cache
def _gdal_library() -> Any | None:
    """The GDAL that rasterio uses, for the one call rasterio does not wrap; None if not found."""
    import rasterio as rio

    here = Path(rio.__file__).parent
    candidates = sorted(glob.glob(str(here.parent / "rasterio.libs" / "libgdal*.so*")))
    found = ctypes.util.find_library("gdal")
    for path in [*candidates, *([found] if found else [])]:
        try:
            library = ctypes.CDLL(path)
            function = library.VSICurlPartialClearCache
        except (OSError, AttributeError):
            continue
        function.argtypes = [ctypes.c_char_p]
        function.restype = None
        return library
    return None


def clear_http_cache(urls: Sequence[str]) -> None:
    """Make GDAL forget what it knows of ``urls`` (``/vsicurl/`` paths).

    GDAL's ``/vsicurl/`` remembers that a URL failed and answers the next open
    from memory without a request, so a retry would fail again. rasterio has no
    binding for ``VSICurlPartialClearCache`` (GDAL's own API for this), hence
    the ctypes call into the GDAL rasterio loaded.
    """
    library = _gdal_library()
    if library is None:
        log.warning("stac: cannot clear GDAL's HTTP cache (GDAL library not found)")
        return
    for url in urls:
        library.VSICurlPartialClearCache(url.encode())


# -- URL signing --------------------------------------------------------------------------


class Signer(Protocol):
    """Turns an asset's href into the URL to read it by (e.g. with a SAS token)."""

    def __call__(self, href: str) -> str: ...

    def refresh(self) -> None:
        """Forget any cached credential (after the server refused it)."""


class NoSigning:
    """Public assets: hrefs are read as they are."""

    def __call__(self, href: str) -> str:
        return href

    def refresh(self) -> None:
        """Nothing to forget."""


class PlanetaryComputerSigner:
    """Planetary Computer's signing: a SAS token per collection, appended to blob URLs.

    The token comes from ``{token_url}/{collection}`` (JSON with ``token`` and
    ``msft:expiry``) and is reused until five minutes before it expires. Only
    hrefs on ``*.blob.core.windows.net`` without a signature are signed.

    Args:
        token_url: The SAS token endpoint.
        collection: The collection whose token is asked for.
        policy: Retries of the token request.
        timeout_s: Per request.
    """

    def __init__(
        self, token_url: str, collection: str, *, policy: RetryPolicy, timeout_s: float
    ) -> None:
        self.token_url = token_url.rstrip("/")
        self.collection = collection
        self.policy = policy
        self.timeout_s = timeout_s
        self._token: str | None = None
        self._expires = 0.0
        self._lock = threading.Lock()
        self._http = requests.Session()

    def __call__(self, href: str) -> str:
        parts = urlsplit(href)
        if not (parts.hostname or "").endswith(".blob.core.windows.net"):
            return href
        if "sig=" in parts.query:
            return href
        token = self._current()
        return f"{href}{'&' if parts.query else '?'}{token}"

    def refresh(self) -> None:
        """Fetch a new token at the next signing."""
        with self._lock:
            self._token = None

    def _current(self) -> str:
        with self._lock:
            if self._token is not None and time.time() < self._expires - 300:
                return self._token
            url = f"{self.token_url}/{self.collection}"

            def fetch() -> requests.Response:
                response = self._http.get(url, timeout=self.timeout_s)
                if response.status_code == 429 or response.status_code >= 500:
                    raise _Transient(f"HTTP {response.status_code}")
                return response

            response = with_retries(self.policy, f"Planetary Computer token {url}", fetch)
            if response.status_code != 200:
                raise IngestError(
                    f"Planetary Computer's token endpoint {url} answered HTTP"
                    f" {response.status_code}; check stac.sas_token_url and stac.collection"
                )
            try:
                body = response.json()
                token = str(body["token"])
                expiry = _parse_datetime(body.get("msft:expiry"))
            except (ValueError, KeyError, TypeError):
                raise SourceUnavailableError(
                    f"Planetary Computer's token endpoint {url}: a reply without a token"
                ) from None
            self._token = token.lstrip("?")
            self._expires = expiry.timestamp()
            return self._token


def build_signer(settings: StacSettings, policy: RetryPolicy) -> Signer:
    """The signer ``settings`` ask for (``stac.signing``, or the preset's)."""
    _, collection, signing = settings.resolved()
    if signing == "planetary-computer":
        return PlanetaryComputerSigner(
            settings.sas_token_url, collection, policy=policy, timeout_s=settings.timeout_s
        )
    return NoSigning()


# -- retries ------------------------------------------------------------------------------


class _Transient(Exception):
    """One failed attempt the policy may retry; a 429 may say how long to wait."""

    def __init__(self, problem: str, *, retry_after: str | None = None) -> None:
        super().__init__(problem)
        self.retry_after = retry_after


T = TypeVar("T")


def with_retries(
    policy: RetryPolicy,
    what: str,
    attempt: Callable[[], T],
    *,
    before_retry: Callable[[], None] | None = None,
    context: Mapping[str, object] | None = None,
) -> T:
    """``attempt()`` until it does not raise :class:`_Transient`, under ``policy``.

    Raises:
        SourceUnavailableError: Still failing after ``policy.max_retries`` retries.
    """
    retries = 0
    while True:
        try:
            return attempt()
        except _Transient as failure:
            if retries >= policy.max_retries:
                raise SourceUnavailableError(
                    f"STAC {what}: {failure} after {retries + 1} attempts"
                ) from None
            delay = (
                policy.retry_after(failure.retry_after, retries)
                if failure.retry_after is not None
                else policy.backoff(retries)
            )
            log.warning(
                "stac: %s: %s; retrying in %.3g s (retry %d of %d)",
                what,
                failure,
                delay,
                retries + 1,
                policy.max_retries,
                extra={**(context or {}), "retry": retries + 1, "delay_s": delay},
            )
            policy.sleep(delay)
            retries += 1
            if before_retry is not None:
                before_retry()


def _messages(exc: BaseException) -> list[str]:
    """The messages of an exception and of those it was raised from (GDAL's error stack)."""
    seen: list[str] = []
    current: BaseException | None = exc
    while current is not None and len(seen) < 16:
        seen.append(str(current))
        current = current.__cause__ or current.__context__
    return seen


def http_status(exc: BaseException) -> int | None:
    """The HTTP status GDAL reported in ``exc``'s chain, if any."""
    for message in _messages(exc):
        match = _HTTP_CODE.search(message)
        if match and match.group(1) != "000":
            code = int(match.group(1))
            if code:
                return code
    return None


def _may_pass(exc: BaseException) -> bool:
    """Whether a GDAL failure looks transient: 429, 5xx, or the network."""
    status = http_status(exc)
    return (status is not None and (status == 429 or status >= 500)) or (
        status is None and is_network_failure(exc)
    )


def is_network_failure(exc: BaseException) -> bool:
    """Whether ``exc`` reads like a failure of the connection rather than of the file."""
    text = " ".join(_messages(exc)).lower()
    return any(word in text for word in _NETWORK_WORDS)


# -- items --------------------------------------------------------------------------------


def _parse_datetime(raw: object) -> datetime:
    if not isinstance(raw, str) or not raw:
        raise ValueError("no datetime")
    text = raw[:-1] + "+00:00" if raw.endswith(("Z", "z")) else raw
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def item_datetime(properties: Mapping[str, Any]) -> datetime:
    """An item's acquisition time: ``datetime``, else the middle of ``start/end_datetime``.

    Raises:
        ValueError: The item has neither.
    """
    if properties.get("datetime"):
        return _parse_datetime(properties["datetime"])
    start, end = properties.get("start_datetime"), properties.get("end_datetime")
    if start and end:
        first, last = _parse_datetime(start), _parse_datetime(end)
        return first + (last - first) / 2
    raise ValueError("no datetime (nor start_datetime and end_datetime)")


def processing_baseline(item: Mapping[str, Any]) -> str | None:
    """``04.00`` from ``s2:processing_baseline`` (or the product name's ``_N0400_``)."""
    properties = item.get("properties") or {}
    for key in ("s2:processing_baseline", "sentinel:processing_baseline"):
        value = properties.get(key)
        if isinstance(value, str) and _BASELINE.match(value.strip()):
            major, minor = _BASELINE.match(value.strip()).groups()  # type: ignore[union-attr]
            return f"{int(major):02d}.{minor}"
        if isinstance(value, int | float) and not isinstance(value, bool):
            return f"{float(value):05.2f}"
    for key in ("s2:product_uri", "s2:granule_id"):
        value = properties.get(key)
        if isinstance(value, str):
            match = _BASELINE_IN_ID.search(value.removesuffix(".SAFE"))
            if match:
                return f"{match.group(1)}.{match.group(2)}"
    match = _BASELINE_IN_ID.search(str(item.get("id", "")))
    return f"{match.group(1)}.{match.group(2)}" if match else None


def dn_offset(item: Mapping[str, Any], band_asset: Mapping[str, Any] | None = None) -> int:
    """The DN to add to an item's pixels: -1000 where its files carry the offset, else 0.

    In this order: a catalog flag that the offset was removed already
    (:data:`OFFSET_APPLIED_FLAGS`) -> 0; a processing baseline -> -1000 from
    04.00 on, 0 before; an item without one -> the ``raster:bands`` offset of
    ``band_asset`` in DN (offset / scale), 0 without it.
    """
    properties = item.get("properties") or {}
    if any(properties.get(flag) is True for flag in OFFSET_APPLIED_FLAGS):
        return 0
    baseline = processing_baseline(item)
    if baseline is not None:
        return BASELINE_OFFSET if float(baseline) >= 4.0 else 0
    raster_bands = (band_asset or {}).get("raster:bands")
    if isinstance(raster_bands, list) and raster_bands and isinstance(raster_bands[0], dict):
        offset = raster_bands[0].get("offset")
        scale = raster_bands[0].get("scale", _DN_SCALE)
        if isinstance(offset, int | float) and isinstance(scale, int | float) and scale:
            return round(offset / scale)
    return 0


def _is_geotiff(asset: Mapping[str, Any]) -> bool:
    media = str(asset.get("type") or "").lower()
    href = str(asset.get("href") or "")
    path = urlsplit(href).path.lower()
    if media:
        return "image/tiff" in media or "geotiff" in media
    return path.endswith((".tif", ".tiff"))


def _is_data(asset: Mapping[str, Any]) -> bool:
    roles = asset.get("roles")
    return not roles or "data" in roles or "reflectance" in roles


def _asset_band(key: str, asset: Mapping[str, Any]) -> str | None:
    """The canonical band (or ``SCL``) an asset holds, or None."""
    names: list[str] = []
    eo_bands = asset.get("eo:bands") or asset.get("bands")
    if isinstance(eo_bands, list) and len(eo_bands) == 1 and isinstance(eo_bands[0], dict):
        name = eo_bands[0].get("name")
        if isinstance(name, str):
            names.append(name)
    names.append(key)
    for name in names:
        if name.upper() == "SCL":
            return "SCL"
        band = canonical_band(name)
        if band is not None and band in CANONICAL_BANDS:
            return band
    for name in names:
        band = EARTH_SEARCH_KEYS.get(name.lower())
        if band is not None:
            return band
    return None


def band_assets(item: Mapping[str, Any]) -> dict[str, tuple[str, Mapping[str, Any]]]:
    """Canonical band (and ``SCL``) -> (asset key, asset) of an item's GeoTIFF data assets."""
    found: dict[str, tuple[str, Mapping[str, Any]]] = {}
    assets = item.get("assets") or {}
    if not isinstance(assets, dict):
        return found
    for key in sorted(assets):
        asset = assets[key]
        if not isinstance(asset, dict) or not isinstance(asset.get("href"), str):
            continue
        if key.lower().endswith("-jp2") or not _is_geotiff(asset) or not _is_data(asset):
            continue
        band = _asset_band(key, asset)
        if band is None:
            continue
        previous = found.get(band)
        # Earth Search's own key (e.g. "red") wins over an alias that maps to the same band.
        if previous is None or key.lower() in EARTH_SEARCH_KEYS or key.upper() == band:
            found[band] = (key, asset)
    return found


def item_level(item: Mapping[str, Any], collection: str) -> Level | None:
    """``L1C`` or ``L2A`` from ``s2:product_type``/``processing:level``, else the collection."""
    properties = item.get("properties") or {}
    for key in ("s2:product_type", "processing:level", "sentinel:product_type"):
        value = str(properties.get(key) or "").upper()
        if "2A" in value:
            return "L2A"
        if "1C" in value:
            return "L1C"
    name = collection.lower()
    if "l2a" in name:
        return "L2A"
    if "l1c" in name:
        return "L1C"
    return None


def gdal_path(href: str) -> str:
    """What GDAL opens for an href: ``/vsicurl/`` for HTTP(S), the path for a local file.

    Static catalogs on disk (and the whole-file baseline of ``bench/stac.py``)
    have ``file://`` or plain paths as hrefs.
    """
    if href.startswith(("http://", "https://")):
        return f"/vsicurl/{href}"
    if href.startswith("file://"):
        return unquote(urlsplit(href).path)
    return href


class StacSource(SceneSource):
    """Sentinel-2 COGs from a STAC API: Earth Search, Planetary Computer, or any by URL.

    Args:
        settings: API, collection, signing, cloud filter, retries, GDAL caches.
        policy: The retry policy; by default the one of ``settings``.
        signer: How hrefs are signed; by default the one ``settings`` ask for.
    """

    name = "stac"

    def __init__(
        self,
        settings: StacSettings,
        *,
        policy: RetryPolicy | None = None,
        signer: Signer | None = None,
    ) -> None:
        self.settings = settings
        self.api_url, self.collection, _ = settings.resolved()
        # RFC 9110's Retry-After is in seconds (Sentinel Hub's, in milliseconds, is not).
        self.policy = policy or replace(RetryPolicy.from_settings(settings), retry_after_unit_s=1.0)
        self.signer = signer or build_signer(settings, self.policy)
        self.gdal = gdal_options(settings)
        self._http = requests.Session()

    @classmethod
    def from_settings(cls, settings: Settings) -> StacSource:
        """The source configured by ``settings.stac``."""
        return cls(settings.stac)

    def close(self) -> None:
        """Close the HTTP session used for length probes."""
        self._http.close()

    # -- search ---------------------------------------------------------------------------

    def search(
        self,
        *,
        since: datetime | None,
        until: datetime,
        area: BaseGeometry,
        on_rejected: OnRejected,
    ) -> Iterator[SceneRef]:
        """Items of the collection in ``[since, until]`` over ``area`` under the cloud limit.

        Every page is fetched first (a failure on any page retries the search),
        then scenes are yielded by acquisition time; items whose footprint misses
        ``area`` are skipped.

        Raises:
            SourceUnavailableError: The API did not answer (after retries).
            IngestError: The API refused the search (a 4xx: a wrong URL or collection).
        """
        start = MISSION_START if since is None else _as_utc(since)
        end = _as_utc(until)
        if area.is_empty:
            return
        items = with_retries(
            self.policy,
            f"search {self.api_url}",
            lambda: self._search_once(start, end, area),
            context={"collection": self.collection},
        )
        scenes: dict[str, SceneRef] = {}
        cloud_limit = self.settings.max_cloud_cover
        for item in items:
            scene = self._scene_of(item, on_rejected)
            if scene is None or scene.product_id in scenes:
                continue
            if not (start <= scene.acquired_at <= end):
                continue
            if not scene.footprint.intersects(area):
                continue
            if scene.cloud_cover is not None and scene.cloud_cover >= cloud_limit:
                continue
            scenes[scene.product_id] = scene
        yield from sorted(scenes.values(), key=lambda s: (s.acquired_at, s.product_id))

    def _search_once(
        self, start: datetime, end: datetime, area: BaseGeometry
    ) -> list[dict[str, Any]]:
        io = StacApiIO(timeout=self.settings.timeout_s, max_retries=None)
        # pystac-client's APIError carries no headers: a response hook keeps a 429's
        # Retry-After for the policy.
        retry_after: list[str | None] = [None]

        def remember(response: requests.Response, *args: object, **kwargs: object) -> None:
            retry_after[0] = response.headers.get("Retry-After")

        io.session.hooks["response"].append(remember)
        try:
            client = Client.open(self.api_url, stac_io=io)
            # The cloud filter goes to an API that has the query extension; the items
            # are filtered here as well (see search), so one without it works too.
            query: dict[str, Any] | None = (
                {"eo:cloud_cover": {"lt": self.settings.max_cloud_cover}}
                if client.conforms_to(ConformanceClasses.QUERY)
                else None
            )
            search = client.search(
                collections=[self.collection],
                bbox=area.bounds,
                datetime=(start, end),
                query=query,
                limit=self.settings.page_size,
            )
            return [dict(item) for item in search.items_as_dicts()]
        except APIError as exc:
            status = getattr(exc, "status_code", None)
            if status is None or status == 429 or status >= 500:
                raise _Transient(
                    f"HTTP {status}" if status else _short(str(exc) or "no reply"),
                    retry_after=retry_after[0] if status == 429 else None,
                ) from None
            raise IngestError(
                f"the STAC API {self.api_url} refused the search of {self.collection!r}:"
                f" HTTP {status}: {_short(str(exc))}"
            ) from None
        except (requests.RequestException, OSError) as exc:
            raise _Transient(_short(f"{type(exc).__name__}: {exc}")) from None
        except (ValueError, KeyError, TypeError) as exc:
            # pystac/pystac-client on a reply that is not STAC (a proxy's HTML page, cut JSON).
            raise _Transient(_short(f"a reply that is not STAC ({type(exc).__name__})")) from None
        finally:
            io.session.close()

    def _scene_of(self, item: Mapping[str, Any], on_rejected: OnRejected) -> SceneRef | None:
        """The SceneRef of one item, or None after reporting it to ``on_rejected``."""
        item_id = item.get("id")
        if not isinstance(item_id, str) or not item_id:
            on_rejected("<no id>", reasons.BAD_REPLY, "a STAC item without an id")
            return None
        ref = f"{self.collection}/{item_id}"
        properties = item.get("properties")
        if not isinstance(properties, dict):
            on_rejected(ref, reasons.MISSING_METADATA, f"{ref}: no properties")
            return None
        try:
            acquired_at = item_datetime(properties)
        except ValueError as exc:
            on_rejected(ref, reasons.MISSING_METADATA, _short(f"{ref}: {exc}"))
            return None
        footprint = feature_footprint(item, ref, on_rejected)
        if footprint is None:
            return None
        assets = band_assets(item)
        missing = [band for band in CANONICAL_BANDS if band not in assets]
        if missing:
            on_rejected(
                ref,
                reasons.WRONG_BAND_COUNT,
                _short(f"{ref}: no GeoTIFF asset for band {', '.join(missing)}"),
            )
            return None
        offset = dn_offset(item, assets["B04"][1])
        scl = assets.get("SCL")
        cloud_cover = properties.get("eo:cloud_cover")
        tile = properties.get("s2:mgrs_tile") or properties.get("grid:code")
        if isinstance(tile, str) and tile.startswith("MGRS-"):
            tile = "T" + tile.removeprefix("MGRS-")
        elif isinstance(tile, str) and not tile.startswith("T"):
            tile = "T" + tile
        if not isinstance(tile, str):
            match = _TILE_IN_ID.search(item_id)
            tile = match.group(1) if match else None
        return SceneRef(
            source=self.name,
            product_id=ref,
            acquired_at=acquired_at,
            footprint=footprint,
            tile_id=tile,
            cloud_cover=float(cloud_cover)
            if isinstance(cloud_cover, int | float) and not isinstance(cloud_cover, bool)
            else None,
            level=item_level(item, self.collection),
            processing_baseline=processing_baseline(item),
            extra={
                "api_url": self.api_url,
                "collection": self.collection,
                "item_id": item_id,
                "offset": offset,
                "assets": {band: assets[band][1]["href"] for band in CANONICAL_BANDS},
                "asset_keys": {band: assets[band][0] for band in CANONICAL_BANDS},
                "scl": scl[1]["href"] if scl is not None else None,
            },
        )

    # -- read -----------------------------------------------------------------------------

    def read(self, scene: SceneRef, locations: Sequence[LocationRef]) -> Iterator[Chip | Rejection]:
        """Each location's window of each band's COG, warped onto the location's grid.

        Every COG of the scene is opened once (its header: one range request);
        per location, only the tiles that cover its chip are fetched.

        Raises:
            SceneRejectedError: ``unreadable`` (not a STAC scene, a band file
                missing on the server), ``corrupt-raster`` (a COG that cannot be read).
            SourceUnavailableError: The server did not answer (after retries).
        """
        if scene.source != self.name:
            raise SceneRejectedError(
                reasons.UNREADABLE, f"{scene.product_id}: a {scene.source} scene, not stac"
            )
        try:
            hrefs: dict[str, str] = {b: str(scene.extra["assets"][b]) for b in CANONICAL_BANDS}
            keys: dict[str, str] = dict(scene.extra.get("asset_keys") or {})
            scl = scene.extra.get("scl")
            offset = int(scene.extra.get("offset", 0))
        except (KeyError, TypeError, ValueError) as exc:
            raise SceneRejectedError(
                reasons.UNREADABLE,
                f"{scene.product_id}: metadata does not describe a STAC item ({exc!r})",
            ) from None
        # One key per file; the cutter knows files by path, so an asset's key stands in.
        files = {band: Path(keys.get(band) or band) for band in CANONICAL_BANDS}
        urls = {files[band]: hrefs[band] for band in CANONICAL_BANDS}
        mask = None
        if isinstance(scl, str):
            mask_path = Path("scl")
            urls[mask_path] = scl
            mask = CloudMask("scl", BandFile(mask_path))
        product = Product(
            kind="stac",
            path=Path(scene.product_id),
            product_id=scene.product_id,
            acquired_at=scene.acquired_at,
            footprint=scene.footprint,
            bands={band: BandFile(files[band], 1, offset) for band in CANONICAL_BANDS},
            level=scene.level,
            cloud_mask=mask,
        )
        order = sorted(locations, key=lambda loc: (loc.grid.epsg, -loc.grid.maxy, loc.grid.minx))
        ahead = max(1, math.ceil(2 * self.settings.read_threads / len(urls)))
        with _SceneReader(self, product, urls) as reader:
            pending: dict[int, _Reads] = {}
            for i, location in enumerate(order):
                for j in range(i, min(i + ahead + 1, len(order))):
                    if j not in pending:
                        pending[j] = reader.prefetch(order[j])
                yield reader.cut(location, pending.pop(i))

    def content_length(self, url: str) -> int | None:
        """The length of the file at ``url`` by a HEAD request (or on disk); None if unknown.

        Raises:
            _Transient: The server did not answer, or answered 429/5xx.
        """
        if not url.startswith(("http://", "https://")):
            local = Path(gdal_path(url))
            return local.stat().st_size if local.is_file() else None
        try:
            response = self._http.head(url, timeout=self.settings.timeout_s, allow_redirects=True)
        except requests.RequestException as exc:
            raise _Transient(_short(f"{type(exc).__name__}: {exc}")) from None
        if response.status_code == 429 or response.status_code >= 500:
            raise _Transient(f"HTTP {response.status_code}")
        length = response.headers.get("Content-Length")
        return int(length) if response.ok and length and length.isdigit() else None


#: Windows being read ahead: (file, band index, window) -> its pixels.
_Reads = dict[tuple[Path, int, tuple[int, int, int, int]], "Future[npt.NDArray[Any]]"]


class _Cutter(ChipCutter):
    """The local source's cutter, taking the windows read ahead where there are some."""

    def __init__(
        self,
        product: Product,
        opened: Mapping[Path, OpenRaster],
        location: LocationRef,
        reads: _Reads,
    ) -> None:
        super().__init__(product, opened, location)
        self.reads = reads

    def read_raw(self, path: Path, index: int, window: Window) -> npt.NDArray[Any]:
        future = self.reads.pop((path, index, window.flatten()), None)
        if future is None:
            return super().read_raw(path, index, window)
        return future.result()


class _SceneReader:
    """The open COGs of one scene, reopened after a transient failure.

    With ``stac.read_threads`` > 0 the windows of a location are read in
    threads, one per file (up to that many), each with a handle of its own (a
    GDAL dataset is not shared between threads), and those of the next
    locations are started before the current one is cut: a catalog far away
    then costs about one round trip per location, not one per file and tile.
    (Reading ahead into GDAL's cache instead does not work: GTiff keeps what
    it fetched by parallel ranges in the dataset handle, not in ``/vsicurl/``'s
    cache.)
    """

    def __init__(self, source: StacSource, product: Product, urls: Mapping[Path, str]) -> None:
        self.source = source
        self.product = product
        self.urls = dict(urls)
        self.opened: dict[Path, OpenRaster] = {}
        self._stack = ExitStack()
        self._signed: dict[Path, str] = {}
        # One lane (a thread) per file, so that a file is always read through the
        # same handle and neighbouring chips find its tiles in GDAL's block cache.
        lanes = min(source.settings.read_threads, len(self.urls))
        self._lanes = [
            ThreadPoolExecutor(1, thread_name_prefix=f"revisit-stac-{n}") for n in range(lanes)
        ]
        self._lane_of = {path: n % lanes for n, path in enumerate(self.urls)} if lanes else {}
        self._local = threading.local()
        self._handles: list[Any] = []
        self._handles_lock = threading.Lock()

    def __enter__(self) -> _SceneReader:
        return self

    def __exit__(self, *exc: object) -> None:
        for lane in self._lanes:
            lane.shutdown(wait=True, cancel_futures=True)
        with self._handles_lock:
            for handle in self._handles:
                handle.close()
            self._handles.clear()
        self._close()

    def prefetch(self, location: LocationRef) -> _Reads:
        """Start reading ``location``'s window of every file; {} without read threads."""
        if not self._lanes:
            return {}
        try:
            with rasterio.Env(**self.source.gdal):
                self._open_all()
        except (SceneRejectedError, _Transient, RasterioError):
            return {}  # the cut meets the same failure and reports it
        cutter = ChipCutter(self.product, self.opened, location)
        reads: _Reads = {}
        for path in self.urls:
            window = cutter.window(path)
            if window is not None:
                key = (path, 1, window.flatten())
                lane = self._lanes[self._lane_of[path]]
                reads[key] = lane.submit(self._read, self._signed[path], window)
        return reads

    def _read(self, url: str, window: Window) -> npt.NDArray[Any]:
        """Band 1's ``window`` of ``url``, on this thread's own handle."""
        with rasterio.Env(**self.source.gdal):
            handles: dict[str, Any] = self._local.__dict__.setdefault("handles", {})
            ds = handles.get(url)
            if ds is None:
                ds = rasterio.open(gdal_path(url))
                handles[url] = ds
                with self._handles_lock:
                    self._handles.append(ds)
            return ds.read(1, window=window)  # type: ignore[no-any-return]

    def _close(self) -> None:
        self._stack.close()
        self._stack = ExitStack()
        self.opened.clear()

    def _forget(self) -> None:
        """Close every file and clear GDAL's memory of their URLs, before a retry."""
        self._close()
        # The read threads keep their handles: a failed read raises in its future,
        # and the retried cut reads afresh on the handles opened again here.
        clear_http_cache(
            [gdal_path(url) for url in self._signed.values() if url.startswith("http")]
        )

    def _open_all(self) -> None:
        """Open every file of the scene, in the read threads at once when there are some."""
        if self.opened:
            return
        for path, href in self.urls.items():
            self._signed[path] = self.source.signer(href)
        gdal = self.source.gdal

        def open_one(url: str) -> Any:
            with rasterio.Env(**gdal):
                return rasterio.open(gdal_path(url))

        futures = {
            path: self._lanes[self._lane_of[path]].submit(open_one, url) if self._lanes else None
            for path, url in self._signed.items()
        }
        opened: dict[Path, Any] = {}
        failures: list[tuple[Path, RasterioError]] = []
        for path, future in futures.items():
            try:
                url = self._signed[path]
                opened[path] = future.result() if future is not None else open_one(url)
            except RasterioError as exc:
                failures.append((path, exc))
        for ds in opened.values():
            self._stack.callback(ds.close)
        try:
            # A failure that may pass decides: the scene is retried, not rejected.
            failures.sort(key=lambda f: not (_may_pass(f[1])))
            if failures:
                self._raise_for(*failures[0], opening=True)
            for path, ds in opened.items():
                if ds.crs is None:
                    raise SceneRejectedError(
                        reasons.MISSING_CRS, f"{self.product.product_id}: {path.name}: no CRS"
                    )
                self.opened[path] = OpenRaster(ds, ds.crs, ds.transform, ds.crs.to_wkt())
        except BaseException:
            self._close()  # all or nothing: never a scene half open
            raise

    def cut(self, location: LocationRef, reads: _Reads | None = None) -> Chip | Rejection:
        """One location's chip, retried under the policy on transient failures.

        Args:
            location: Where.
            reads: Windows :meth:`prefetch` started; a retry reads afresh.
        """
        first = [reads or {}]

        def attempt() -> Chip | Rejection:
            ready, first[0] = first[0], {}
            with rasterio.Env(**self.source.gdal):
                self._open_all()
                try:
                    return _Cutter(self.product, self.opened, location, ready).cut()
                except ReadFailedError as exc:
                    # The cutter calls any failed read corrupt; the server may say otherwise.
                    self._raise_for(exc.path, exc.cause, opening=False)
                    raise
                finally:
                    for future in ready.values():
                        future.cancel()

        return with_retries(
            self.source.policy,
            f"{self.product.product_id}, location {location.id}",
            attempt,
            before_retry=self._forget,
            context={"product_id": self.product.product_id, "location_id": location.id},
        )

    def _raise_for(self, path: Path, exc: RasterioError, *, opening: bool) -> None:
        """Turn a GDAL failure on ``path`` into a rejection, or a retry if it may pass.

        Raises:
            _Transient: A 429/5xx, a network failure, or a short read of a file the
                server says is long enough.
            SceneRejectedError: 404/410 (``unreadable``), a file that is not a
                readable TIFF or is shorter than its tiles need (``corrupt-raster``).
        """
        pid, name = self.product.product_id, path.name
        status = http_status(exc)
        if status is not None:
            if status == 429 or status >= 500:
                raise _Transient(f"{name}: HTTP {status}")
            if status in (401, 403):
                self.source.signer.refresh()
            raise SceneRejectedError(
                reasons.UNREADABLE, _short(f"{pid}: band file {name}: HTTP {status}")
            )
        if is_network_failure(exc):
            raise _Transient(_short(f"{name}: {one_line(exc)}"))
        # GDAL says the same of a failed request and of a bad file: a server that
        # does not answer a HEAD either (raises _Transient) is the likelier cause.
        url = self._signed.get(path) or self.source.signer(self.urls[path])
        length = self.source.content_length(url)
        if opening:
            raise SceneRejectedError(
                reasons.CORRUPT_RASTER,
                _short(f"{pid}: band file {name} is not a readable GeoTIFF: {one_line(exc)}"),
            )
        ds = self.opened.get(path)
        needed = _tiles_end(ds.ds) if ds is not None else None
        if length is not None and needed is not None and length < needed:
            raise SceneRejectedError(
                reasons.CORRUPT_RASTER,
                f"{pid}: band file {name} is truncated: {length} bytes, its tiles end at {needed}",
            )
        if length is None:
            raise _Transient(_short(f"{name}: {one_line(exc)}"))
        raise SceneRejectedError(
            reasons.CORRUPT_RASTER, _short(f"{pid}: band file {name}: {one_line(exc)}")
        )


def _tiles_end(ds: Any) -> int | None:
    """Where the last tile (or strip) of band 1 ends in the file, from the TIFF tags."""
    try:
        block_h, block_w = ds.block_shapes[0]
        rows = -(-ds.height // block_h)
        cols = -(-ds.width // block_w)
        end = 0
        for y in range(rows):
            for x in range(cols):
                offset = ds.get_tag_item(f"BLOCK_OFFSET_{x}_{y}", "TIFF", bidx=1)
                size = ds.get_tag_item(f"BLOCK_SIZE_{x}_{y}", "TIFF", bidx=1)
                if offset is None or size is None:
                    continue
                end = max(end, int(offset) + int(size))
        return end or None
    except (RasterioError, ValueError, TypeError):
        return None


__all__ = [
    "EARTH_SEARCH_KEYS",
    "NoSigning",
    "PlanetaryComputerSigner",
    "Signer",
    "StacSource",
    "band_assets",
    "clear_http_cache",
    "dn_offset",
    "gdal_options",
    "item_datetime",
    "processing_baseline",
]
