"""The Sentinel Hub source: Catalog API to find products, Process API to cut chips.

Products are found with :class:`sentinelhub.SentinelHubCatalog` and read with one
:class:`sentinelhub.SentinelHubRequest` per location, asked for exactly the
location's chip grid (its UTM CRS, bounds and size), so no resampling happens
on this side. The ``sentinelhub`` package builds the requests; the HTTP calls
themselves go through :class:`_PolicyClient`, which applies the one retry policy
of this module (:class:`RetryPolicy`) and fetches the OAuth token with a timeout.

Pixels come back as one multi-band uint16 GeoTIFF per chip: the 12
:data:`~revisit.types.CANONICAL_BANDS` as DN (reflectance x 10000), then a cloud
band (``SCL`` for L2A, the ``CLM`` cloud mask for L1C, which has no SCL), then
``dataMask``. Sentinel Hub harmonizes DN across processing baselines
(``harmonizeValues``, on by default and asked for explicitly here): the +1000
offset of baseline 04.00 and later is already removed, so chips need no
correction.

Error handling follows :mod:`revisit.ingest.sources.base`:

- a catalog feature without a usable date or footprint goes to ``on_rejected``
  as ``bad-reply``; a catalog *page* that is not what it claims (malformed JSON,
  no ``features``/``context``) raises :class:`SourceUnavailableError`, because
  the search cannot go past a page it cannot read and no product can be named;
- a chip reply that is not the GeoTIFF asked for (truncated, wrong band count,
  wrong shape or CRS), or a non-retryable 4xx answer for one chip, is a
  per-location :class:`~revisit.types.Rejection` (``bad-reply``): one bad chip
  says nothing about the others;
- a location whose chip does not touch the product's footprint is rejected as
  ``not-covered`` without a request;
- 429, 5xx, 403 (quota), connection errors and timeouts are retried per
  :class:`RetryPolicy`, then raise :class:`SourceUnavailableError`.

The client secret and access tokens are never logged nor put in error text.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final, cast
from urllib.parse import urlsplit

import numpy as np
import requests
import urllib3
from rasterio.errors import RasterioError
from rasterio.io import MemoryFile
from sentinelhub.api.catalog import SentinelHubCatalog
from sentinelhub.api.process import SentinelHubRequest
from sentinelhub.config import SHConfig
from sentinelhub.constants import CRS, MimeType, MosaickingOrder, SHConstants
from sentinelhub.data_collections import DataCollection
from sentinelhub.download.models import DownloadRequest, DownloadResponse
from sentinelhub.download.sentinelhub_client import SentinelHubDownloadClient
from sentinelhub.exceptions import MissingDataInRequestException
from sentinelhub.geometry import BBox
from shapely.geometry.base import BaseGeometry

from revisit.config import SentinelHubSettings, Settings
from revisit.errors import (
    ConfigError,
    IngestError,
    RevisitError,
    SceneRejectedError,
    SourceUnavailableError,
)
from revisit.grid import ChipGrid
from revisit.ingest import reasons
from revisit.ingest.cloud import cloud_fraction, scl_cloud_mask, valid_fraction
from revisit.ingest.sources.base import OnRejected, SceneSource
from revisit.ingest.sources.features import feature_footprint, short
from revisit.ingest.sources.retry import RetryPolicy
from revisit.types import CANONICAL_BANDS, Chip, Level, LocationRef, Rejection, SceneRef

log = logging.getLogger(__name__)

#: Where the search starts when ``since`` is None: before Sentinel-2A's first image.
MISSION_START: Final = datetime(2015, 6, 1, tzinfo=UTC)
#: Half-width of the Process API time range around a scene's sensing time. One
#: orbit takes about 100 minutes, so this catches the scene's datatake (including
#: a neighbouring tile of the same pass) and no other acquisition.
PROCESS_WINDOW: Final = timedelta(minutes=30)
#: Bands of every chip reply: canonical bands, a cloud band, dataMask.
REPLY_BAND_COUNT: Final = len(CANONICAL_BANDS) + 2

_COLLECTIONS: Final[Mapping[str, tuple[DataCollection, Level, str]]] = {
    "sentinel-2-l2a": (DataCollection.SENTINEL2_L2A, "L2A", "SCL"),
    "sentinel-2-l1c": (DataCollection.SENTINEL2_L1C, "L1C", "CLM"),
}
_TILE_IN_ID = re.compile(r"_(T\d{2}[A-Z]{3})(?:_|$)")
_BASELINE_IN_ID = re.compile(r"_N(\d{2})(\d{2})(?:_|$)")
_SAFETY_MARGIN_S = 60.0  # fetch a new token this long before the old one expires
_MAX_DETAIL = 200
_READ_CHUNK = 64 * 1024

# Context of the HTTP calls in flight, for the retry log lines (product, location).
_log_context: contextvars.ContextVar[Mapping[str, object] | None] = contextvars.ContextVar(
    "revisit_sentinelhub_log_context", default=None
)


def evalscript(cloud_band: str) -> str:
    """The evalscript of a chip: 12 canonical bands, ``cloud_band``, dataMask, as UINT16 DN.

    Args:
        cloud_band: ``SCL`` (L2A) or ``CLM`` (L1C).
    """
    bands = [*CANONICAL_BANDS, cloud_band, "dataMask"]
    names = ", ".join(f'"{b}"' for b in bands)
    values = ", ".join(f"s.{b}" for b in bands)
    return (
        "//VERSION=3\n"
        "function setup() {\n"
        "  return {\n"
        f'    input: [{{bands: [{names}], units: "DN"}}],\n'
        f'    output: {{id: "default", bands: {len(bands)}, sampleType: "UINT16"}}\n'
        "  };\n"
        "}\n"
        "function evaluatePixel(s) {\n"
        f"  return [{values}];\n"
        "}\n"
    )


class _NotRetryableHTTPError(Exception):
    """A 4xx reply the policy does not retry; carries no secret."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class _Transient(Exception):
    """One failed attempt that the policy may retry."""

    def __init__(
        self,
        problem: str,
        *,
        rate_limited: bool = False,
        retry_after: str | None = None,
        unauthorized: bool = False,
    ) -> None:
        super().__init__(problem)
        self.problem = problem
        self.rate_limited = rate_limited
        self.retry_after = retry_after
        self.unauthorized = unauthorized


def _short(text: str) -> str:
    return short(text, _MAX_DETAIL)


def _server_message(response: requests.Response) -> str:
    """A short description of an error reply (Sentinel Hub puts it in ``error.message``)."""
    try:
        body = response.json()
    except ValueError:
        return _short(response.reason or "")
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return _short(error["message"])
        if isinstance(error, str):
            return _short(error)
    return _short(response.reason or "")


class _PolicyClient(SentinelHubDownloadClient):
    """A Sentinel Hub download client that applies :class:`RetryPolicy` and owns its token.

    It replaces the retry decorators of :class:`SentinelHubDownloadClient` (a
    fixed x3 back-off, 429 retried forever unless ``max_retries`` is set, no
    token refresh on 401, no timeout on the token request) by one explicit loop.
    It is used by the catalog iterator through ``_execute_download`` and by the
    source directly through :meth:`execute`.
    """

    def __init__(self, *, settings: SentinelHubSettings, config: SHConfig, policy: RetryPolicy):
        super().__init__(config=config)
        self._client_id = settings.client_id or ""
        secret = settings.client_secret
        self._client_secret = secret.get_secret_value() if secret is not None else ""
        self._token_url = settings.token_url
        self._timeout = settings.timeout_s
        self.policy = policy
        self._http = requests.Session()
        self._token: str | None = None
        self._token_expires_at = 0.0

    def close(self) -> None:
        """Close the HTTP session and forget the token."""
        self._http.close()
        self._token = None

    def _execute_download(self, request: DownloadRequest) -> DownloadResponse:
        response = self.execute(request, _log_context.get() or {})
        return DownloadResponse.from_response(response, request)

    def execute(self, request: DownloadRequest, context: Mapping[str, object]) -> requests.Response:
        """Send ``request`` under the retry policy.

        Args:
            request: A request built by the ``sentinelhub`` package.
            context: Logged with every retry (product id, location id).

        Returns:
            The successful (2xx/3xx) reply.

        Raises:
            SourceUnavailableError: Retries exhausted.
            ConfigError: The token endpoint rejected the credentials.
            _NotRetryableHTTPError: A 4xx reply other than 401, 403 and 429.
        """
        if request.url is None:
            raise ValueError("a download request without a URL")
        path = urlsplit(request.url).path
        retries = 0
        refreshed = False
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._attempt(request)
            except _Transient as failure:
                if failure.unauthorized and not refreshed:
                    refreshed = True
                    self._token = None
                    log.info(
                        "sentinelhub: %s from %s; fetching a new token (attempt %d)",
                        failure.problem,
                        path,
                        attempt,
                        extra={**context, "attempt": attempt, "url_path": path},
                    )
                    continue
                if retries >= self.policy.max_retries:
                    raise SourceUnavailableError(
                        f"Sentinel Hub {path}: {failure.problem} after {attempt} attempts"
                        + "".join(f", {k} {v}" for k, v in context.items())
                    ) from None
                if failure.rate_limited:
                    delay = self.policy.retry_after(failure.retry_after, retries)
                else:
                    delay = self.policy.backoff(retries)
                log.warning(
                    "sentinelhub: %s from %s; retrying in %.3g s (retry %d of %d)",
                    failure.problem,
                    path,
                    delay,
                    retries + 1,
                    self.policy.max_retries,
                    extra={
                        **context,
                        "attempt": attempt,
                        "retry": retries + 1,
                        "delay_s": delay,
                        "url_path": path,
                        "retry_after": failure.retry_after if failure.rate_limited else None,
                    },
                )
                self.policy.sleep(delay)
                retries += 1

    def _attempt(self, request: DownloadRequest) -> requests.Response:
        headers: dict[str, str] = {**SHConstants.HEADERS}
        if request.use_session:
            headers["Authorization"] = f"Bearer {self._access_token()}"
        headers.update(request.headers)
        response = self._send(
            request.request_type.value,
            cast(str, request.url),
            json=request.post_values,
            headers=headers,
        )
        if response.status_code == requests.codes.unauthorized:
            raise _Transient("HTTP 401 (token expired or invalid)", unauthorized=True)
        return response

    def _access_token(self) -> str:
        """The current access token; a new one when it is missing or about to expire."""
        if self._token is not None and time.time() < self._token_expires_at - _SAFETY_MARGIN_S:
            return self._token
        self._token = None
        response = self._send(
            "POST",
            self._token_url,
            data={
                "grant_type": "client_credentials",
                "client_id": self._client_id,
                "client_secret": self._client_secret,
            },
            headers={**SHConstants.HEADERS, "Content-Type": "application/x-www-form-urlencoded"},
        )
        if 400 <= response.status_code < 500:
            raise ConfigError(
                "sentinelhub.client_id / sentinelhub.client_secret / sentinelhub.token_url:"
                f" the token endpoint refused them (HTTP {response.status_code}:"
                f" {_server_message(response)})"
            )
        try:
            body = response.json()
            token = body["access_token"]
            expires_in = float(body.get("expires_in", 300))
        except (ValueError, KeyError, TypeError):
            raise _Transient("a token reply without access_token") from None
        if not isinstance(token, str) or not token:
            raise _Transient("a token reply without access_token")
        self._token = token
        self._token_expires_at = time.time() + expires_in
        return token

    def _send(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        """One HTTP call; transient failures raise :class:`_Transient`, other 4xx are raised.

        ``timeout_s`` bounds the whole call, body included: ``requests`` alone
        bounds each socket read, so a server trickling a few bytes at a time
        could hold a call (and the ingest job) for ever.
        """
        deadline = time.monotonic() + self._timeout
        try:
            response = self._http.request(method, url, timeout=self._timeout, stream=True, **kwargs)
        except requests.Timeout:
            raise _Transient(f"no reply within {self._timeout:g} s") from None
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            raise _Transient(f"connection failed ({type(exc).__name__})") from None
        self._read_body(response, deadline)
        status = response.status_code
        if status < 400 or status == requests.codes.unauthorized:
            return response
        if status == requests.codes.too_many_requests:
            raise _Transient(
                "HTTP 429 (rate limited)",
                rate_limited=True,
                retry_after=response.headers.get("Retry-After"),
            )
        if status >= 500:
            raise _Transient(f"HTTP {status} ({_server_message(response)})")
        if url == self._token_url:
            return response  # the caller turns any other 4xx into a ConfigError
        if status == requests.codes.forbidden:
            raise _Transient(f"HTTP {status} ({_server_message(response)})")
        raise _NotRetryableHTTPError(status, _server_message(response))

    def _read_body(self, response: requests.Response, deadline: float) -> None:
        """Read the body of a streamed reply into ``response.content`` before ``deadline``.

        Raises:
            _Transient: The deadline passed, or the connection broke mid-body
                (a reset, fewer bytes than ``Content-Length``).
        """
        chunks: list[bytes] = []
        whole = False
        try:
            while True:
                if time.monotonic() > deadline:
                    raise _Transient(f"reply not complete within {self._timeout:g} s")
                # read1: at most one socket read, so the deadline is checked between reads
                chunk = response.raw.read1(_READ_CHUNK, decode_content=True)
                if not chunk:
                    break
                chunks.append(chunk)
            whole = True
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            if isinstance(exc, urllib3.exceptions.ReadTimeoutError | TimeoutError):
                raise _Transient(f"no reply within {self._timeout:g} s") from None
            raise _Transient(f"connection failed mid-reply ({type(exc).__name__})") from None
        finally:
            if whole:
                response.raw.release_conn()  # read to the end: kept alive for the next call
            else:
                response.close()  # a connection in an unknown state is not reused
        # What requests itself does once a streamed body is read: .content, .json() use it.
        response._content = b"".join(chunks)
        response._content_consumed = True


def _service_collection(base: DataCollection, base_url: str) -> DataCollection:
    """``base`` bound to the service at ``base_url`` (a collection carries its own service URL)."""
    if base.service_url and base.service_url.rstrip("/") == base_url.rstrip("/"):
        return base
    digest = hashlib.sha1(base_url.rstrip("/").encode()).hexdigest()[:12]
    return base.define_from(f"REVISIT_{base.name}_{digest}", service_url=base_url.rstrip("/"))


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _parse_datetime(raw: object) -> datetime:
    if not isinstance(raw, str) or not raw:
        raise ValueError("no properties.datetime")
    text = raw[:-1] + "+00:00" if raw.endswith(("Z", "z")) else raw
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        raise ValueError(f"properties.datetime {raw!r} has no time zone")
    return parsed.astimezone(UTC)


class SentinelHubSource(SceneSource):
    """Sentinel-2 L1C or L2A from a Sentinel Hub deployment (CDSE by default).

    Args:
        settings: Credentials, endpoints, collection, cloud filter, retry policy.
        chip_size: The chip size the pipeline uses; a location whose grid has
            another size is still read on its own grid, with a warning.
        policy: The retry policy; by default the one of ``settings``.

    Raises:
        ConfigError: ``client_id`` or ``client_secret`` is missing.
    """

    name = "sentinelhub"

    def __init__(
        self,
        settings: SentinelHubSettings,
        *,
        chip_size: int = 64,
        policy: RetryPolicy | None = None,
    ) -> None:
        missing = [
            f"sentinelhub.{key} (REVISIT_SENTINELHUB__{key.upper()})"
            for key, value in (
                ("client_id", settings.client_id),
                ("client_secret", settings.client_secret),
            )
            if value is None or not (value if isinstance(value, str) else value.get_secret_value())
        ]
        if missing:
            raise ConfigError(
                "the sentinelhub source needs OAuth client credentials; set "
                + " and ".join(missing)
            )
        self.settings = settings
        self.chip_size = chip_size
        self.policy = policy or RetryPolicy.from_settings(settings)
        base_collection, self.level, self._cloud_band = _COLLECTIONS[settings.collection]
        self.collection_id: str = settings.collection

        config = SHConfig(use_defaults=True)
        config.sh_client_id = settings.client_id or ""
        config.sh_client_secret = (
            settings.client_secret.get_secret_value() if settings.client_secret else ""
        )
        config.sh_base_url = settings.base_url.rstrip("/")
        config.sh_token_url = settings.token_url
        config.max_download_attempts = 1  # retries are ours (RetryPolicy), not the package's
        config.download_sleep_time = 0.0
        config.download_timeout_seconds = settings.timeout_s
        self._config = config
        self._collection = _service_collection(base_collection, settings.base_url)
        self._client = _PolicyClient(settings=settings, config=config, policy=self.policy)
        self._catalog = SentinelHubCatalog(config=config)
        self._catalog.client = self._client
        self._evalscript = evalscript(self._cloud_band)

    @classmethod
    def from_settings(cls, settings: Settings) -> SentinelHubSource:
        """The source configured by ``settings.sentinelhub`` and ``settings.ingest.chip_size``."""
        return cls(settings.sentinelhub, chip_size=settings.ingest.chip_size)

    def close(self) -> None:
        """Close the HTTP session."""
        self._client.close()

    # -- search ---------------------------------------------------------------------------

    def search(
        self,
        *,
        since: datetime | None,
        until: datetime,
        area: BaseGeometry,
        on_rejected: OnRejected,
    ) -> Iterator[SceneRef]:
        """Catalog products in ``[since, until]`` over ``area`` with less cloud than the limit.

        All pages are fetched first (following ``context.next``), then the scenes
        are yielded by ascending acquisition time; products whose footprint
        misses ``area`` are skipped.

        Raises:
            SourceUnavailableError: The catalog did not answer (after retries) or
                answered a page that cannot be read.
            IngestError: The catalog refused the search (a 4xx other than 401,
                403 and 429: a wrong collection or base URL); retrying will not help.
            ConfigError: The token endpoint refused the credentials.
        """
        start = MISSION_START if since is None else _as_utc(since)
        end = _as_utc(until)
        if area.is_empty:
            return
        bbox = BBox(area.bounds, crs=CRS.WGS84)
        token = _log_context.set({"collection": self.collection_id})
        try:
            features = self._catalog.search(
                self._collection,
                time=(start, end),
                bbox=bbox,
                filter=f"eo:cloud_cover < {self.settings.max_cloud_cover:g}",
            )
            scenes: dict[str, SceneRef] = {}
            iterator = iter(features)
            while True:
                try:
                    feature = next(iterator)
                except StopIteration:
                    break
                except RevisitError:  # ConfigError is a ValueError too
                    raise
                except _NotRetryableHTTPError as exc:
                    raise IngestError(f"Sentinel Hub catalog refused the search: {exc}") from None
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    raise SourceUnavailableError(
                        f"Sentinel Hub catalog: a search page that is not a feature collection"
                        f" ({type(exc).__name__})"
                    ) from None
                except MissingDataInRequestException:
                    raise SourceUnavailableError(
                        "Sentinel Hub catalog: a search page that is not a JSON object"
                    ) from None
                scene = self._scene_of(feature, on_rejected)
                if scene is None or scene.product_id in scenes:
                    continue
                if not (start <= scene.acquired_at <= end):
                    continue
                if not scene.footprint.intersects(area):
                    continue
                scenes[scene.product_id] = scene
        finally:
            _log_context.reset(token)
        yield from sorted(scenes.values(), key=lambda s: (s.acquired_at, s.product_id))

    def _scene_of(self, feature: object, on_rejected: OnRejected) -> SceneRef | None:
        """The SceneRef of one catalog feature, or None after reporting it to ``on_rejected``."""
        if not isinstance(feature, dict) or not isinstance(feature.get("id"), str):
            on_rejected("<no id>", reasons.BAD_REPLY, "a catalog feature without an id")
            return None
        product_id: str = feature["id"]
        properties = feature.get("properties")
        if not isinstance(properties, dict):
            on_rejected(product_id, reasons.BAD_REPLY, f"{product_id}: no properties")
            return None
        try:
            acquired_at = _parse_datetime(properties.get("datetime"))
        except ValueError as exc:
            on_rejected(product_id, reasons.BAD_REPLY, _short(f"{product_id}: {exc}"))
            return None
        footprint = feature_footprint(feature, product_id, on_rejected)
        if footprint is None:
            return None
        cloud_cover = properties.get("eo:cloud_cover")
        tile_id = properties.get("s2:mgrs_tile") or properties.get("grid:code")
        if isinstance(tile_id, str) and tile_id.startswith("MGRS-"):
            tile_id = "T" + tile_id.removeprefix("MGRS-")
        if not isinstance(tile_id, str):
            match = _TILE_IN_ID.search(product_id)
            tile_id = match.group(1) if match else None
        baseline = properties.get("s2:processing_baseline")
        if not isinstance(baseline, str):
            match = _BASELINE_IN_ID.search(product_id)
            baseline = f"{match.group(1)}.{match.group(2)}" if match else None
        return SceneRef(
            source=self.name,
            product_id=product_id,
            acquired_at=acquired_at,
            footprint=footprint,
            tile_id=tile_id,
            cloud_cover=float(cloud_cover) if isinstance(cloud_cover, int | float) else None,
            level=self.level,
            processing_baseline=baseline,
            extra={"collection": self.collection_id, "datetime": properties["datetime"]},
        )

    # -- read -----------------------------------------------------------------------------

    def read(self, scene: SceneRef, locations: Sequence[LocationRef]) -> Iterator[Chip | Rejection]:
        """One Process API request per location, on the location's own grid.

        A location whose chip misses the scene footprint is rejected as
        ``not-covered`` without a request; a chip reply that is not the GeoTIFF
        asked for is a ``bad-reply`` rejection of that location.

        Raises:
            SceneRejectedError: ``scene`` is not a Sentinel Hub product.
            SourceUnavailableError: Sentinel Hub did not answer (after retries).
        """
        if scene.source != self.name:
            raise SceneRejectedError(
                reasons.UNREADABLE, f"{scene.product_id}: a {scene.source} scene, not sentinelhub"
            )
        acquired = _as_utc(scene.acquired_at)
        for location in locations:
            grid = location.grid
            if grid.size != self.chip_size:
                log.warning(
                    "location %d: grid of %d px, the source expects %d",
                    location.id,
                    grid.size,
                    self.chip_size,
                    extra={"product_id": scene.product_id, "location_id": location.id},
                )
            if not grid.footprint_lonlat().intersects(scene.footprint):
                yield Rejection(
                    location.id,
                    reasons.NOT_COVERED,
                    f"{scene.product_id}: footprint misses location {location.id}",
                )
                continue
            request = self._process_request(grid, acquired)
            context = {"product_id": scene.product_id, "location_id": location.id}
            try:
                response = self._client.execute(request, context)
            except _NotRetryableHTTPError as exc:
                yield Rejection(
                    location.id,
                    reasons.BAD_REPLY,
                    _short(f"{scene.product_id}, location {location.id}: {exc}"),
                )
                continue
            yield self._chip_of(response.content, location, scene.product_id)

    def _process_request(self, grid: ChipGrid, acquired: datetime) -> DownloadRequest:
        request = SentinelHubRequest(
            evalscript=self._evalscript,
            input_data=[
                SentinelHubRequest.input_data(
                    self._collection,
                    time_interval=(acquired - PROCESS_WINDOW, acquired + PROCESS_WINDOW),
                    mosaicking_order=MosaickingOrder.MOST_RECENT,
                    other_args={"processing": {"harmonizeValues": True}},
                )
            ],
            responses=[SentinelHubRequest.output_response("default", MimeType.TIFF)],
            bbox=BBox(grid.bounds, crs=CRS(grid.epsg)),
            size=(grid.size, grid.size),
            config=self._config,
        )
        download: DownloadRequest = request.download_list[0]
        return download

    def _chip_of(self, content: bytes, location: LocationRef, product_id: str) -> Chip | Rejection:
        """The chip in a Process API reply, or a ``bad-reply`` rejection."""
        grid = location.grid

        def bad(detail: str) -> Rejection:
            return Rejection(
                location.id,
                reasons.BAD_REPLY,
                _short(f"{product_id}, location {location.id}: {detail}"),
            )

        try:
            with MemoryFile(content) as memfile, memfile.open() as dataset:
                count, height, width = dataset.count, dataset.height, dataset.width
                if count != REPLY_BAND_COUNT:
                    return bad(f"{count} bands in the reply, asked for {REPLY_BAND_COUNT}")
                if (height, width) != (grid.size, grid.size):
                    return bad(
                        f"{width}x{height} px in the reply, asked for {grid.size}x{grid.size}"
                    )
                if dataset.dtypes[0] != "uint16" or len(set(dataset.dtypes)) != 1:
                    return bad(f"{dataset.dtypes[0]} in the reply, asked for uint16")
                if dataset.crs is not None and dataset.crs.to_epsg() != grid.epsg:
                    return bad(f"CRS {dataset.crs} in the reply, asked for EPSG:{grid.epsg}")
                pixels = dataset.read()
        except (RasterioError, ValueError) as exc:
            return bad(f"not a readable GeoTIFF ({type(exc).__name__})")
        valid = pixels[-1] == 1
        data = np.ascontiguousarray(pixels[: len(CANONICAL_BANDS)], dtype=np.uint16)
        # SCL for L2A; Sentinel Hub's CLM (1 = cloud) for L1C, which has no SCL.
        cloudy = scl_cloud_mask(pixels[-2]) if self._cloud_band == "SCL" else pixels[-2] == 1
        return Chip(
            location_id=location.id,
            data=data,
            valid_fraction=valid_fraction(valid),
            cloud_fraction=cloud_fraction(cloudy, valid),
            grid=grid,
        )


__all__ = ["RetryPolicy", "SentinelHubSource", "evalscript"]
