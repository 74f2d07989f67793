"""The web map's HTTP surface: the page, its files and three read-only JSON endpoints.

- ``/`` (and ``/index.html``): the page; ``/static/...``: its files;
- ``/api/changes``: locations with a change estimate as a GeoJSON
  FeatureCollection of points, in pages, through the same query as
  ``revisit query changed`` (:func:`revisit.db.queries.changed_locations`);
- ``/api/aois``: the AOI polygons, with counts of their locations;
- ``/api/locations/{id}/history``: one location's estimate and every
  measurement of R and r behind it (``change_event``).

Every database read runs in a read-only transaction with a statement timeout.
A bad parameter is a 400 whose JSON body says which and why, an unknown id or
path a 404, a missing or unreachable database a 503. :class:`WebApp` knows
nothing of sockets: ``revisit.daemon.health`` serves it.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from revisit.db.aois import AoiNotFoundError, get_aoi
from revisit.db.changemaps import validate_bbox
from revisit.db.queries import (
    ChangedLocation,
    aoi_outlines,
    changed_locations,
    location_extent,
    location_history,
)
from revisit.errors import RevisitError
from revisit.web.static import read_static

log = logging.getLogger(__name__)

#: Rows of /api/changes when no ``limit`` is given, and the most one page may hold.
DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000
#: A web query that runs longer is cancelled: the map must never hold up the service.
STATEMENT_TIMEOUT_MS = 15_000
#: At most this many web requests use the database at once (the service's pool is small).
MAX_CONCURRENT_QUERIES = 3
#: How long a request waits for one of those before it is answered 503.
QUERY_WAIT_S = 10.0
#: Host names a browser may use for the map: anything else is a DNS-rebinding attempt.
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]", "::1"})

GEOJSON = "application/geo+json"
JSON = "application/json"
#: The page loads only what the package ships; OpenStreetMap tiles only if the user turns them on.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self';"
    " img-src 'self' https://tile.openstreetmap.org; object-src 'none'; base-uri 'none';"
    " frame-ancestors 'none'; form-action 'none'"
)
_BIGINT_MAX = 2**63 - 1
_HISTORY = re.compile(r"/api/locations/([^/]*)/history")
_TRUE = {"true": True, "1": True, "false": False, "0": False}


class BadRequestError(RevisitError, ValueError):
    """A request parameter is malformed, out of range or unknown (HTTP 400)."""


class NotFoundError(RevisitError, LookupError):
    """Nothing is at that path, or no location has that id (HTTP 404)."""


class ServiceUnavailableError(RevisitError, ConnectionError):
    """No database to answer from, or it did not answer (HTTP 503)."""


@dataclass(frozen=True)
class Response:
    """What to send back: status, body, content type and any further headers."""

    status: int
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()


def json_response(status: int, value: object, *, content_type: str = JSON) -> Response:
    """``value`` as JSON; NaN and infinities become null (JSON has neither)."""
    body = json.dumps(_finite(value), allow_nan=False, separators=(",", ":")).encode()
    return Response(status, body + b"\n", content_type, (("Cache-Control", "no-store"),))


def error_response(status: int, message: str) -> Response:
    return json_response(status, {"error": message})


class WebApp:
    """The map's paths, answered from the database behind ``engine``.

    Args:
        engine: The service's engine; None answers every ``/api`` path with 503
            (the page itself is still served).
        default_limit: Rows of ``/api/changes`` without a ``limit``.
        max_limit: The largest ``limit`` accepted.
    """

    def __init__(
        self,
        *,
        engine: Engine | None = None,
        default_limit: int = DEFAULT_LIMIT,
        max_limit: int = MAX_LIMIT,
    ) -> None:
        if not 1 <= default_limit <= max_limit:
            raise ValueError(
                f"need 1 <= default_limit <= max_limit, got {default_limit}, {max_limit}"
            )
        self.engine = engine
        self.default_limit = default_limit
        self.max_limit = max_limit
        self._slots = threading.BoundedSemaphore(MAX_CONCURRENT_QUERIES)

    @staticmethod
    def handles(path: str) -> bool:
        """Whether ``path`` (without its query) is one of the map's."""
        return path in ("/", "/index.html") or path.startswith(("/static/", "/api/"))

    def respond(self, *, path: str, query: str, host: str | None) -> Response:
        """The answer to a GET of ``path?query``, never an exception.

        Args:
            path: The path, not percent-decoded.
            query: The query string (after ``?``), possibly empty.
            host: The request's ``Host`` header: only a loopback name is served.
        """
        if not _is_local(host):
            return error_response(
                403,
                f"the map answers only to a loopback host name (127.0.0.1 or localhost), "
                f"not {(host or '')[:100]!r}",
            )
        try:
            return self._route(path, query)
        except BadRequestError as exc:
            return error_response(400, str(exc))
        except NotFoundError as exc:
            return error_response(404, str(exc))
        except ServiceUnavailableError as exc:
            return error_response(503, str(exc))
        except sa.exc.OperationalError as exc:
            reason = str(exc.orig or exc).strip().splitlines()[:1]
            log.warning("web map: the database failed: %s", reason[0] if reason else exc)
            return error_response(
                503, f"the database did not answer: {reason[0] if reason else type(exc).__name__}"
            )
        except Exception:
            log.exception("web map: %s failed", path[:200])
            return error_response(500, f"internal error answering {path[:200]}; see the log")

    def _route(self, path: str, query: str) -> Response:
        if path in ("/", "/index.html"):
            _only_params(_params(query), ())
            return self._static("index.html", csp=True)
        if path.startswith("/static/"):
            return self._static(path[len("/static/") :], csp=False)
        params = _params(query)
        if path == "/api/changes":
            return self._changes(params)
        if path == "/api/aois":
            _only_params(params, ())
            return self._aois()
        match = _HISTORY.fullmatch(path)
        if match:
            _only_params(params, ())
            return self._history(_location_id(match.group(1)))
        raise NotFoundError(
            f"no such path {path[:200]!r}: try /api/changes, /api/aois or "
            "/api/locations/{id}/history"
        )

    def _static(self, relative: str, *, csp: bool) -> Response:
        found = read_static(relative)
        if found is None:
            raise NotFoundError(f"no static file {relative[:200]!r}")
        headers = [("Cache-Control", "no-cache"), ("X-Content-Type-Options", "nosniff")]
        if csp:
            headers.append(("Content-Security-Policy", PAGE_CSP))
        return Response(200, found.body, found.content_type, tuple(headers))

    def _changes(self, params: Mapping[str, str]) -> Response:
        _only_params(
            params, ("bbox", "aoi", "changed_only", "min_ratio", "since", "limit", "offset")
        )
        bbox = _bbox(params["bbox"]) if "bbox" in params else None
        changed_only = _boolean(params, "changed_only", default=False)
        min_ratio = _number(params, "min_ratio")
        if min_ratio is not None and min_ratio < 0:
            raise BadRequestError(f"min_ratio must be at least 0, not {min_ratio:g}")
        since = _since(params.get("since"))
        limit = _integer(params, "limit", default=self.default_limit, low=1, high=self.max_limit)
        offset = _integer(params, "offset", default=0, low=0, high=_BIGINT_MAX)
        with self.reading() as conn:
            aoi_id = None
            if "aoi" in params:
                try:
                    aoi_id = get_aoi(conn, params["aoi"]).id
                except AoiNotFoundError as exc:
                    raise BadRequestError(str(exc)) from None
            # One row more than asked says whether there is a next page.
            rows = changed_locations(
                conn,
                bbox=bbox,
                aoi_id=aoi_id,
                min_ratio=min_ratio,
                since=since,
                changed_only=changed_only,
                limit=limit + 1,
                offset=offset,
            )
        more = len(rows) > limit
        rows = rows[:limit]
        next_offset = offset + limit if more else None
        next_url = None
        if next_offset is not None:
            next_url = "/api/changes?" + urlencode({**params, "offset": str(next_offset)})
        return json_response(
            200,
            {
                "type": "FeatureCollection",
                "features": [_feature(r) for r in rows],
                "limit": limit,
                "offset": offset,
                "returned": len(rows),
                "next_offset": next_offset,
                "next": next_url,
            },
            content_type=GEOJSON,
        )

    def _aois(self) -> Response:
        with self.reading() as conn:
            outlines = aoi_outlines(conn)
            extent = location_extent(conn)
        features = [
            {
                "type": "Feature",
                "id": a.aoi_id,
                "geometry": json.loads(a.geojson),
                "properties": {
                    "aoi_id": a.aoi_id,
                    "name": a.name,
                    "locations": a.locations,
                    "changed": a.changed,
                    "mean_ratio": a.mean_ratio,
                    "updated_at": _iso(a.updated_at),
                },
            }
            for a in outlines
        ]
        return json_response(
            200,
            {"type": "FeatureCollection", "features": features, "locations_bbox": extent},
            content_type=GEOJSON,
        )

    def _history(self, location_id: int) -> Response:
        with self.reading() as conn:
            found = location_history(conn, location_id)
        if found is None:
            raise NotFoundError(f"no location with id {location_id}")
        return json_response(
            200,
            {
                "location_id": found.location_id,
                "lon": found.lon,
                "lat": found.lat,
                "aoi_name": found.aoi_name,
                "measured": found.estimate is not None,
                "unmeasured_reason": found.unmeasured_reason,
                "estimate": None if found.estimate is None else _properties(found.estimate),
                "history": [
                    {k: _iso(v) if isinstance(v, datetime) else v for k, v in asdict(e).items()}
                    for e in found.events
                ],
            },
        )

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        """A connection in a read-only transaction with a statement timeout.

        Raises:
            ServiceUnavailableError: There is no database, or too many web
                requests are using it already.
        """
        if self.engine is None:
            raise ServiceUnavailableError(
                "no database is available to this server: the map's data comes from "
                "`revisit run`, which serves it once its database is open"
            )
        if not self._slots.acquire(timeout=QUERY_WAIT_S):
            raise ServiceUnavailableError(
                f"busy: {MAX_CONCURRENT_QUERIES} map requests are reading the database; "
                "try again shortly"
            )
        try:
            with self.engine.connect() as conn, conn.begin():
                conn.exec_driver_sql("SET TRANSACTION READ ONLY")
                conn.exec_driver_sql(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS:d}")
                yield conn
        finally:
            self._slots.release()


# -- parameters -----------------------------------------------------------------------------


def _params(query: str) -> dict[str, str]:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False, errors="strict")
    except UnicodeDecodeError:
        raise BadRequestError("the query string is not valid UTF-8") from None
    params: dict[str, str] = {}
    for key, value in pairs:
        if key in params:
            raise BadRequestError(f"parameter {key!r} is given more than once")
        params[key] = value
    return params


def _only_params(params: Mapping[str, str], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        known = ", ".join(allowed) if allowed else "none"
        names = ", ".join(repr(k[:50]) for k in unknown)
        raise BadRequestError(f"unknown parameter {names} (this path takes: {known})")


def _bbox(text: str) -> tuple[float, float, float, float]:
    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip() for p in parts):
        raise BadRequestError(
            f"bbox must be four numbers minlon,minlat,maxlon,maxlat, not {text[:100]!r}"
        )
    try:
        return validate_bbox(parts)
    except ValueError as exc:
        raise BadRequestError(str(exc)) from None


def _boolean(params: Mapping[str, str], name: str, *, default: bool) -> bool:
    if name not in params:
        return default
    value = _TRUE.get(params[name].strip().lower())
    if value is None:
        raise BadRequestError(f"{name} must be true, false, 1 or 0, not {params[name][:50]!r}")
    return value


def _number(params: Mapping[str, str], name: str) -> float | None:
    if name not in params:
        return None
    try:
        value = float(params[name])
    except ValueError:
        raise BadRequestError(f"{name} must be a number, not {params[name][:50]!r}") from None
    if not math.isfinite(value):
        raise BadRequestError(f"{name} must be a finite number, not {params[name][:50]!r}")
    return value


def _integer(params: Mapping[str, str], name: str, *, default: int, low: int, high: int) -> int:
    if name not in params:
        return default
    text = params[name].strip()
    if not re.fullmatch(r"[+-]?[0-9]{1,19}", text):
        raise BadRequestError(f"{name} must be a whole number, not {params[name][:50]!r}")
    value = int(text)
    if value < low:
        raise BadRequestError(f"{name} must be at least {low}, not {value}")
    if value > high:
        raise BadRequestError(f"{name} must be at most {high}, not {value}")
    return value


def _since(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise BadRequestError(
            f"since must be a date like 2024-05-01 or an ISO timestamp, not {text[:50]!r}"
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _location_id(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,19}", text) or not 1 <= int(text) <= _BIGINT_MAX:
        raise BadRequestError(f"a location id is a positive whole number, not {text[:50]!r}")
    return int(text)


def _is_local(host: str | None) -> bool:
    if not host:
        return False
    name = host.strip().lower()
    if name.startswith("["):
        name = name[: name.find("]") + 1] if "]" in name else name
    else:
        name = name.rsplit(":", 1)[0] if name.count(":") == 1 else name
    return name in LOCAL_HOSTS


# -- encoding -------------------------------------------------------------------------------


def _properties(row: ChangedLocation) -> dict[str, Any]:
    """A location's properties, named as in ``v_change`` (r = ratio_ema, R = ratio_last)."""
    return {
        "location_id": row.location_id,
        "ratio_ema": row.ratio_ema,
        "ratio_last": row.ratio_last,
        "updates": row.updates,
        "changed": row.changed,
        "change_probability": row.change_probability,
        "changed_since": _iso(row.changed_since),
        "updated_at": _iso(row.updated_at),
        "aoi_name": row.aoi_name,
    }


def _feature(row: ChangedLocation) -> dict[str, Any]:
    return {
        "type": "Feature",
        "id": row.location_id,
        "geometry": {"type": "Point", "coordinates": [row.lon, row.lat]},
        "properties": _properties(row),
    }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _finite(value: object) -> object:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
