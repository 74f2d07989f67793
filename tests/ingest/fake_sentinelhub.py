"""A fake Sentinel Hub on 127.0.0.1: OAuth token, Catalog search and Process API, with faults.

A real HTTP server (``ThreadingHTTPServer`` on an ephemeral port, in a daemon
thread) so that the source under test goes through ``requests``, sockets,
timeouts and all. Use the ``fake_sh`` fixture; import it into a test module
with ``from tests.ingest.fake_sentinelhub import fake_sh_fixture  # noqa: F401``.

Endpoints:

- ``POST /oauth/token``: client-credentials grant; answers a JWT-shaped access
  token (header.payload.signature, base64url, ``azp``/``exp`` claims, as
  ``sentinelhub.SentinelHubSession.info`` would decode it) with ``expires_in``.
- ``POST /api/v1/catalog/1.0.0/search``: a STAC FeatureCollection of the scenes
  added with :meth:`FakeSentinelHub.add_scene`, filtered by ``datetime``,
  ``bbox`` and an ``eo:cloud_cover < N`` CQL2 filter, paged by ``next`` (an
  offset) in ``context`` and ``links``, ``page_size`` per page at most.
- ``POST /api/v1/process``: a multi-band uint16 GeoTIFF in the requested CRS,
  bbox and size. Bands are the evalscript's input bands in order: Sentinel-2
  bands are cut (nearest neighbour) from the OSCD city rasters under
  ``../shared/data/oscd/images/<city>/imgs_1``; ``dataMask`` is 1 where that
  raster has data; ``SCL`` and ``CLM`` are synthetic: the top ``cloud_rows``
  share of rows is cloud (SCL classes 3, 8, 9, 10 in turn, CLM 1), the rest
  clear (SCL 2, 4, 5, 6, 7, 11 in turn, CLM 0). No scene in the request's time
  range: every band is 0, as Sentinel Hub answers.

Faults (:meth:`FakeSentinelHub.inject`) apply to the next requests of one
endpoint (``token``, ``catalog``, ``process``) in order:

- ``Fault.status(code, retry_after=...)``: answer ``code`` with a Sentinel Hub
  error body. ``Retry-After`` is sent as given: Sentinel Hub's unit is
  milliseconds (RFC 9110 says integer seconds); tests send small values such
  as ``"20"`` (20 ms), ``"0"`` or fractions such as ``"0.5"``.
- ``Fault.slow(seconds)``: sleep before answering (beyond the client timeout).
- ``Fault.malformed_json()``: 200 with a cut-off JSON body.
- ``Fault.truncated_tiff()``: 200 with the first half of the GeoTIFF.
- ``Fault.wrong_band_count()``: 200 with a GeoTIFF lacking its last band.
- ``Fault.reset()``: read the request, then reset the connection (TCP RST, no
  reply); ``Fault.reset(partial=True)``: send the headers and half the body,
  then reset.
- ``Fault.trickle(seconds)``: send the headers at once and the body in ten
  pieces spread over ``seconds``: every gap is shorter than a per-read timeout,
  the whole reply longer than the client's deadline.
- ``Fault.expire_token()``: every token issued so far becomes invalid just as
  this request arrives (it gets 401): a token expiring mid-run.

:meth:`FakeSentinelHub.expire_tokens` invalidates every token issued so far:
API calls answer 401 until a new token is fetched. :meth:`FakeSentinelHub.chaos`
draws faults at random (seeded) for requests with no fault queued.
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
import re
import socket
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import numpy as np
import pytest
import rasterio
from affine import Affine
from pydantic import SecretStr
from rasterio.io import MemoryFile
from rasterio.warp import Resampling, reproject
from shapely.geometry import box, mapping, shape
from shapely.geometry.base import BaseGeometry

from revisit.config import SentinelHubSettings
from revisit.types import CANONICAL_BANDS

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
OSCD_IMAGES = SHARED_DATA / "oscd" / "images"

CLIENT_ID = "revisit-test-client"
CLIENT_SECRET = "s3cr3t-do-not-log-7f1c9a"
TOKEN_PATH = "/oauth/token"
CATALOG_PATH = "/api/v1/catalog/1.0.0/search"
PROCESS_PATH = "/api/v1/process"
ENDPOINTS = {TOKEN_PATH: "token", CATALOG_PATH: "catalog", PROCESS_PATH: "process"}

#: When the OSCD Paris ``imgs_1`` scene was taken (2016-11-30, tile T31UDQ), and
#: roughly that tile's footprint: scenes added with these cover the Paris crop.
PARIS_ACQUIRED = datetime(2016, 11, 30, 10, 57, 2, tzinfo=UTC)
PARIS_TILE = box(1.6, 48.6, 3.1, 49.6)

SCL_CLOUD = (3, 8, 9, 10)
SCL_CLEAR = (2, 4, 5, 6, 7, 11)


def require_oscd(city: str = "paris") -> Path:
    """The ``imgs_1`` folder of an OSCD city, or skip the test with the reason."""
    folder = OSCD_IMAGES / city / "imgs_1"
    if not folder.is_dir():
        pytest.skip(f"OSCD data not found at {folder} (../shared/data is absent)")
    return folder


def band_file(folder: Path, band: str) -> Path:
    """The OSCD GeoTIFF of ``band`` (``B8A`` included) in an ``imgs_1`` folder."""
    matches = sorted(folder.glob(f"*_{band}.tif"))
    if not matches:
        raise FileNotFoundError(f"no {band} raster in {folder}")
    return matches[0]


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
    def slow(cls, seconds: float) -> Fault:
        """Sleep ``seconds`` before answering normally."""
        return cls("slow", delay_s=seconds)

    @classmethod
    def malformed_json(cls) -> Fault:
        """Answer 200 with a JSON body cut in the middle."""
        return cls("malformed-json")

    @classmethod
    def truncated_tiff(cls) -> Fault:
        """Answer 200 with half a GeoTIFF."""
        return cls("truncated-tiff")

    @classmethod
    def wrong_band_count(cls) -> Fault:
        """Answer 200 with a GeoTIFF one band short."""
        return cls("wrong-band-count")

    @classmethod
    def reset(cls, *, partial: bool = False) -> Fault:
        """Reset the connection: before any reply, or (``partial``) halfway through the body."""
        return cls("reset-partial" if partial else "reset")

    @classmethod
    def trickle(cls, seconds: float) -> Fault:
        """Answer normally, but spread the body over ``seconds``."""
        return cls("trickle", delay_s=seconds)

    @classmethod
    def expire_token(cls) -> Fault:
        """Invalidate every token issued so far as this request arrives."""
        return cls("expire-token")


class Sleeps:
    """A RetryPolicy sleep that records every delay and waits it for real (they are tiny)."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if seconds > 0:
            time.sleep(seconds)


@dataclass
class Hit:
    """One request the fake received: which endpoint, what it answered, when (monotonic)."""

    endpoint: str
    status: int
    at: float
    client_port: int = 0


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(client_id: str, expires_in: int, serial: int) -> str:
    """A JWT-shaped (unsigned) token with the claims sentinelhub reads."""
    now = int(time.time())
    header = {"alg": "none", "typ": "JWT"}
    payload = {"azp": client_id, "sub": client_id, "iat": now, "exp": now + expires_in, "n": serial}
    return ".".join(
        (_b64url(json.dumps(header).encode()), _b64url(json.dumps(payload).encode()), "sig")
    )


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


@dataclass
class FakeSentinelHub:
    """The fake's state and knobs; the HTTP server reads them on every request.

    Attributes:
        url: The base URL (``http://127.0.0.1:<port>``) once started.
        city: The OSCD city whose ``imgs_1`` rasters the Process API cuts from.
        cloud_rows: Share of the rows of every chip that is cloud (SCL/CLM).
        page_size: Most features per catalog page, whatever ``limit`` asks.
        token_expires_in: ``expires_in`` of issued tokens, seconds.
        hits: Requests per endpoint.
        log: Every request in order.
        process_bodies: The JSON bodies of Process API requests.
        catalog_bodies: The JSON bodies of Catalog search requests.
        tokens_issued: How many tokens were handed out.
    """

    city: str = "paris"
    cloud_rows: float = 0.25
    page_size: int = 2
    token_expires_in: int = 3600
    url: str = ""
    hits: Counter[str] = field(default_factory=Counter)
    log: list[Hit] = field(default_factory=list)
    process_bodies: list[dict[str, Any]] = field(default_factory=list)
    catalog_bodies: list[dict[str, Any]] = field(default_factory=list)
    tokens_issued: int = 0
    _features: list[dict[str, Any]] = field(default_factory=list)
    _faults: dict[str, deque[Fault]] = field(default_factory=dict)
    _valid_tokens: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _rasters: dict[str, tuple[np.ndarray, Any, Any]] = field(default_factory=dict)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _chaos: tuple[random.Random, float, int, dict[str, list[Fault]]] | None = None
    _chaos_turns: dict[str, list[Fault]] = field(default_factory=dict)
    #: Faults served, by endpoint and kind (``status-429``, ``reset``, ...).
    faults_served: Counter[tuple[str, str]] = field(default_factory=Counter)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Listen on 127.0.0.1 on a free port, in a daemon thread."""
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.02,), daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def token_url(self) -> str:
        """The OAuth token endpoint."""
        return self.url + TOKEN_PATH

    def settings(self, **overrides: Any) -> SentinelHubSettings:
        """Settings pointing at this fake, with tiny timeouts and back-off delays."""
        values: dict[str, Any] = {
            "client_id": CLIENT_ID,
            "client_secret": SecretStr(CLIENT_SECRET),
            "base_url": self.url,
            "token_url": self.token_url,
            "timeout_s": 2.0,
            "max_retries": 3,
            "backoff_s": 0.001,
            "max_backoff_s": 0.05,
            **overrides,
        }
        return SentinelHubSettings(**values)

    # -- knobs ----------------------------------------------------------------------------

    def add_scene(
        self,
        product_id: str,
        when: datetime,
        footprint: BaseGeometry | dict[str, Any] | None,
        *,
        cloud_cover: float = 10.0,
        **properties: Any,
    ) -> None:
        """Put a feature in the catalog (in insertion order, not sorted)."""
        props: dict[str, Any] = {
            "datetime": when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            if isinstance(when, datetime)
            else when,
            "eo:cloud_cover": cloud_cover,
            "platform": "sentinel-2a",
            **properties,
        }
        if isinstance(footprint, BaseGeometry):
            geometry: Any = mapping(footprint)
        else:
            geometry = footprint
        with self._lock:
            self._features.append(
                {
                    "stac_version": "1.0.0",
                    "type": "Feature",
                    "id": product_id,
                    "geometry": geometry,
                    "bbox": list(shape(geometry).bounds) if isinstance(geometry, dict) else None,
                    "properties": props,
                    "assets": {},
                    "links": [],
                }
            )

    def add_raw_feature(self, feature: dict[str, Any]) -> None:
        """Put any JSON object in the catalog's feature list (for malformed features)."""
        with self._lock:
            self._features.append(feature)

    def inject(self, endpoint: str, fault: Fault, times: int = 1) -> None:
        """Make the next ``times`` requests to ``endpoint`` misbehave as ``fault``."""
        if endpoint not in ENDPOINTS.values():
            raise ValueError(f"unknown endpoint {endpoint!r}")
        with self._lock:
            self._faults.setdefault(endpoint, deque()).extend([fault] * times)

    def chaos(
        self,
        seed: int,
        *,
        rate: float,
        faults: dict[str, list[Fault]],
        max_burst: int = 1,
    ) -> None:
        """Misbehave at random: a request with no fault queued draws one with chance ``rate``.

        Faults are drawn in turn from a seeded shuffle of an endpoint's list, so
        each comes once before any comes again. A drawn fault lasts a burst of 1
        to ``max_burst`` requests in a row (a 429 storm, an outage).

        Args:
            seed: Seeds the draws; the same seed and requests give the same faults.
            rate: Chance that a request starts a burst.
            faults: The faults to draw from, per endpoint (``token``, ``catalog``, ``process``).
            max_burst: Longest burst.
        """
        unknown = set(faults) - set(ENDPOINTS.values())
        if unknown:
            raise ValueError(f"unknown endpoints {sorted(unknown)}")
        with self._lock:
            self._chaos = (random.Random(seed), rate, max_burst, faults)
            self._chaos_turns.clear()

    def expire_tokens(self) -> None:
        """Invalidate every token issued so far: API calls get 401 until a new one is fetched."""
        with self._lock:
            self._valid_tokens.clear()

    def times(self, endpoint: str) -> list[float]:
        """When each request to ``endpoint`` arrived (monotonic seconds)."""
        return [hit.at for hit in self.log if hit.endpoint == endpoint]

    # -- request handling (called from the server's threads) --------------------------------

    def _next_fault(self, endpoint: str) -> Fault | None:
        with self._lock:
            queue = self._faults.setdefault(endpoint, deque())
            if not queue and self._chaos is not None:
                rng, rate, max_burst, faults = self._chaos
                choices = faults.get(endpoint)
                if choices and rng.random() < rate:
                    turn = self._chaos_turns.setdefault(endpoint, [])
                    if not turn:  # every fault once, in a seeded order, before any repeats
                        turn.extend(rng.sample(choices, len(choices)))
                    queue.extend([turn.pop()] * rng.randint(1, max_burst))
            if not queue:
                return None
            fault = queue.popleft()
            kind = f"status-{fault.status_code}" if fault.kind == "status" else fault.kind
            self.faults_served[(endpoint, kind)] += 1
            return fault

    def _record(self, endpoint: str, client_port: int = 0) -> Hit:
        """Count a request on arrival; its status is filled in before the reply is sent."""
        hit = Hit(endpoint, 0, time.monotonic(), client_port)
        with self._lock:
            self.hits[endpoint] += 1
            self.log.append(hit)
        return hit

    def _issue_token(self, form: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        if form.get("grant_type") != ["client_credentials"]:
            return 400, {"error": "unsupported_grant_type"}
        if form.get("client_id") != [CLIENT_ID] or form.get("client_secret") != [CLIENT_SECRET]:
            return 401, {"error": "invalid_client", "error_description": "Invalid client"}
        with self._lock:
            self.tokens_issued += 1
            token = make_jwt(CLIENT_ID, self.token_expires_in, self.tokens_issued)
            self._valid_tokens.add(token)
        body = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": self.token_expires_in,
            "refresh_expires_in": 0,
            "not-before-policy": 0,
            "scope": "email profile",
        }
        return 200, body

    def _authorized(self, header: str | None) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        with self._lock:
            return header.removeprefix("Bearer ") in self._valid_tokens

    def _search(self, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.catalog_bodies.append(body)
            features = list(self._features)
        start, end = (_parse_time(t) for t in body["datetime"].split("/"))
        area = box(*body["bbox"]) if body.get("bbox") else None
        match = re.search(r"eo:cloud_cover\s*<\s*([0-9.]+)", body.get("filter") or "")
        max_cloud = float(match.group(1)) if match else None

        def keep(feature: dict[str, Any]) -> bool:
            try:
                when = _parse_time(feature["properties"]["datetime"])
                geometry = shape(feature["geometry"])
                cloud = float(feature["properties"]["eo:cloud_cover"])
            except Exception:
                return True  # malformed features are passed on, as a buggy server would
            if not start <= when <= end:
                return False
            if area is not None and not geometry.intersects(area):
                return False
            return max_cloud is None or cloud < max_cloud

        selected = [f for f in features if keep(f)]
        offset = int(body.get("next") or 0)
        limit = min(int(body.get("limit", 100)), self.page_size)
        page = selected[offset : offset + limit]
        following = offset + limit if offset + limit < len(selected) else None
        context: dict[str, Any] = {"limit": limit, "returned": len(page)}
        links: list[dict[str, Any]] = []
        if following is not None:
            context["next"] = following
            links.append(
                {
                    "rel": "next",
                    "href": self.url + CATALOG_PATH,
                    "method": "POST",
                    "body": {**body, "next": following},
                    "merge": False,
                }
            )
        return {"type": "FeatureCollection", "features": page, "links": links, "context": context}

    def _raster(self, band: str) -> tuple[np.ndarray, Any, Any]:
        with self._lock:
            if band not in self._rasters:
                with rasterio.open(band_file(OSCD_IMAGES / self.city / "imgs_1", band)) as src:
                    self._rasters[band] = (src.read(1), src.transform, src.crs)
            return self._rasters[band]

    def _process(self, body: dict[str, Any], fault: Fault | None) -> tuple[int, bytes, str]:
        """The GeoTIFF of a Process API request, or an error (status, body, content type)."""
        with self._lock:
            self.process_bodies.append(body)
        try:
            bounds = body["input"]["bounds"]
            epsg = int(str(bounds["properties"]["crs"]).rstrip("/").split("/")[-1])
            minx, miny, maxx, maxy = (float(v) for v in bounds["bbox"])
            width, height = int(body["output"]["width"]), int(body["output"]["height"])
            data = body["input"]["data"][0]
            time_range = data["dataFilter"]["timeRange"]
            start, end = _parse_time(time_range["from"]), _parse_time(time_range["to"])
            script = body["evalscript"]
            bands_text = re.search(r"bands:\s*\[([^\]]*)\]", script)
            if bands_text is None or 'sampleType: "UINT16"' not in script:
                raise ValueError("the evalscript must list input bands and ask for UINT16")
            bands = re.findall(r'"(\w+)"', bands_text.group(1))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            return 400, _error_body(400, f"bad request: {exc}"), "application/json"
        known = {*CANONICAL_BANDS, "SCL", "CLM", "dataMask"}
        unknown = [b for b in bands if b not in known]
        if unknown:
            return 400, _error_body(400, f"unknown bands {unknown}"), "application/json"

        with self._lock:
            dated = [f["properties"].get("datetime") for f in self._features]
        covered = False
        for text in dated:
            try:
                covered = covered or start <= _parse_time(text) <= end
            except (TypeError, ValueError):
                continue

        transform = Affine((maxx - minx) / width, 0.0, minx, 0.0, -(maxy - miny) / height, maxy)
        crs = rasterio.crs.CRS.from_epsg(epsg)

        def cut(source: np.ndarray, src_transform: Any, src_crs: Any) -> np.ndarray:
            out = np.zeros((height, width), dtype=np.uint16)
            reproject(
                source=source,
                destination=out,
                src_transform=src_transform,
                src_crs=src_crs,
                src_nodata=None,
                dst_transform=transform,
                dst_crs=crs,
                dst_nodata=0,
                resampling=Resampling.nearest,
            )
            return out

        b02, b02_transform, b02_crs = self._raster("B02")
        mask = cut(np.ones_like(b02, dtype=np.uint16), b02_transform, b02_crs)
        if not covered:
            mask[:] = 0
        cloudy_rows = round(self.cloud_rows * height)
        rows = np.arange(height)[:, None]
        cols = np.arange(width)[None, :]
        scl = np.where(
            rows < cloudy_rows,
            np.array(SCL_CLOUD, dtype=np.uint16)[rows % len(SCL_CLOUD)],
            np.array(SCL_CLEAR, dtype=np.uint16)[cols % len(SCL_CLEAR)],
        ).astype(np.uint16)
        clm = np.where(rows < cloudy_rows, 1, 0).astype(np.uint16) * np.ones_like(scl)

        planes = []
        for band in bands:
            if band == "dataMask":
                plane = mask.copy()
            elif band == "SCL":
                plane = scl
            elif band == "CLM":
                plane = clm
            else:
                plane = cut(*self._raster(band))
            planes.append(np.where(mask == 1, plane, 0).astype(np.uint16))

        if fault is not None and fault.kind == "wrong-band-count":
            planes = planes[:-1]
        with MemoryFile() as memfile:
            with memfile.open(
                driver="GTiff",
                width=width,
                height=height,
                count=len(planes),
                dtype="uint16",
                crs=crs,
                transform=transform,
            ) as dst:
                dst.write(np.stack(planes))
            content = bytes(memfile.read())
        if fault is not None and fault.kind == "truncated-tiff":
            content = content[: len(content) // 2]
        return 200, content, "image/tiff"


def _error_body(status: int, message: str) -> bytes:
    return json.dumps(
        {"error": {"status": status, "reason": "Fake error", "message": message, "code": "FAKE"}}
    ).encode()


class _Handler(BaseHTTPRequestHandler):
    fake: FakeSentinelHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read ``fake.log`` instead."""

    #: How the next reply misbehaves on the wire: ``reset-partial`` or ``trickle``.
    wire_fault: Fault | None = None

    def _reply(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        hit: Hit | None = getattr(self, "hit", None)
        wire, self.wire_fault = self.wire_fault, None
        if hit is not None:
            # before the client can see the reply; a reply cut short counts as 0
            hit.status = 0 if wire is not None and wire.kind == "reset-partial" else status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if wire is not None and wire.kind == "reset-partial":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            time.sleep(0.01)  # let the client read what was sent before the reset
            self._reset()
        elif wire is not None and wire.kind == "trickle":
            pieces = 10
            step = -(-len(body) // pieces)
            for start in range(0, len(body), step):
                self.wfile.write(body[start : start + step])
                self.wfile.flush()
                time.sleep(wire.delay_s / pieces)
        else:
            self.wfile.write(body)

    def _reset(self) -> None:
        """Abort the connection: SO_LINGER 0 makes the close send a TCP RST."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()  # the descriptor closes with the handler's files, in finish()

    def finish(self) -> None:
        """Close the handler's files; a reset connection has nothing left to flush."""
        with contextlib.suppress(OSError):
            super().finish()

    def do_GET(self) -> None:
        self.hit = self.fake._record("unknown")
        self._reply(404, _error_body(404, "not found"), "application/json")

    def do_POST(self) -> None:
        endpoint = ENDPOINTS.get(self.path.split("?")[0])
        self.hit = self.fake._record(endpoint or "unknown", self.client_address[1])
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if endpoint is None:
            self._reply(404, _error_body(404, "not found"), "application/json")
            return
        fault = self.fake._next_fault(endpoint)
        # The client may give up (timeout) before the reply.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._answer(endpoint, raw, fault)

    def _answer(self, endpoint: str, raw: bytes, fault: Fault | None) -> None:
        if fault is not None and fault.kind == "slow":
            time.sleep(fault.delay_s)
            fault = None
        if fault is not None and fault.kind == "reset":
            self.hit.status = 0
            self._reset()
            return
        if fault is not None and fault.kind in ("reset-partial", "trickle"):
            self.wire_fault, fault = fault, None
        if fault is not None and fault.kind == "expire-token":
            self.fake.expire_tokens()
            fault = None
        if fault is not None and fault.kind == "status":
            status = fault.status_code
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            self._reply(status, _error_body(status, "injected"), "application/json", headers)
            return
        if endpoint == "token":
            status, payload = self.fake._issue_token(parse_qs(raw.decode()))
            self._reply(status, json.dumps(payload).encode(), "application/json")
            return
        if not self.fake._authorized(self.headers.get("Authorization")):
            self._reply(401, _error_body(401, "token expired or invalid"), "application/json")
            return
        body = json.loads(raw or b"{}")
        if endpoint == "catalog":
            text = json.dumps(self.fake._search(body))
            if fault is not None and fault.kind == "malformed-json":
                text = text[: len(text) // 2]
            self._reply(200, text.encode(), "application/geo+json")
            return
        status, content, content_type = self.fake._process(body, fault)
        self._reply(status, content, content_type)


@pytest.fixture(name="fake_sh")
def fake_sh_fixture() -> Iterator[FakeSentinelHub]:
    """A running fake Sentinel Hub, stopped after the test."""
    fake = FakeSentinelHub()
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()
