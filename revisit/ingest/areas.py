"""Areas of interest as users give them: a bounding box, a GeoJSON file, a name.

Everything here is input validation. Each function turns text from outside
(a command line, a file) into a lon/lat ``MultiPolygon`` or a safe name, or
raises :class:`ValueError` with a message that says what is wrong; nothing else
escapes, whatever the input.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import shapely
import shapely.errors
from shapely.geometry import MultiPolygon, Polygon, box
from shapely.geometry.base import BaseGeometry

MAX_GEOJSON_BYTES = 64 * 1024 * 1024
"""The largest GeoJSON file read as an area."""

LONLAT_CRS_NAMES = frozenset(
    {
        "urn:ogc:def:crs:ogc:1.3:crs84",
        "urn:ogc:def:crs:ogc::crs84",
        "urn:ogc:def:crs:epsg::4326",
        "urn:ogc:def:crs:epsg:4326",
        "http://www.opengis.net/def/crs/ogc/1.3/crs84",
        "https://www.opengis.net/def/crs/ogc/1.3/crs84",
        "http://www.opengis.net/def/crs/epsg/0/4326",
        "https://www.opengis.net/def/crs/epsg/0/4326",
        "ogc:crs84",
        "crs84",
        "epsg:4326",
    }
)
"""``crs`` names (lower case) accepted as RFC 7946 lon/lat (old GeoJSON files carry one)."""

COORDINATE_DECIMALS = 9
"""GeoJSON coordinates are rounded to this many decimals of a degree."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_SEPARATOR = re.compile(r"\s*,\s*|\s+")
_MAX_BBOX_CHARS = 200
_POLYGONAL = ("Polygon", "MultiPolygon")


def _show(text: str, limit: int = 40) -> str:
    """A short, quoted, printable rendering of untrusted text for an error message."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def parse_bbox(text: str) -> MultiPolygon:
    """Parse "minlon,minlat,maxlon,maxlat" (commas and/or spaces) into an area.

    Args:
        text: Four decimal numbers in degrees: west, south, east, north.

    Returns:
        The box as a one-part lon/lat ``MultiPolygon``.

    Raises:
        ValueError: The text is not four finite numbers, a coordinate is out of
            range, a minimum is not below its maximum (boxes across the
            antimeridian are not accepted: split them in two), or the box is so
            small that its area is 0 in double precision.
    """
    if not isinstance(text, str):
        raise ValueError(f"a bbox must be text, not {type(text).__name__}")
    stripped = text.strip()
    if not stripped:
        raise ValueError("empty bbox: expected minlon,minlat,maxlon,maxlat")
    if len(stripped) > _MAX_BBOX_CHARS:
        raise ValueError(f"bbox too long ({len(stripped)} characters): {_show(stripped)}")
    parts = _SEPARATOR.split(stripped)
    if any(not part for part in parts):
        raise ValueError(f"bbox has an empty value between separators: {_show(stripped)}")
    if len(parts) != 4:
        raise ValueError(
            f"bbox must be 4 numbers minlon,minlat,maxlon,maxlat, got {len(parts)}: "
            f"{_show(stripped)}"
        )
    names = ("minlon", "minlat", "maxlon", "maxlat")
    values: list[float] = []
    for name, part in zip(names, parts, strict=True):
        if not _NUMBER.fullmatch(part):
            raise ValueError(f"bbox {name} is not a decimal number: {_show(part)}")
        value = float(part)
        if not math.isfinite(value):
            raise ValueError(f"bbox {name} is not finite: {_show(part)}")
        values.append(value)
    minlon, minlat, maxlon, maxlat = values
    for name, value in (("minlon", minlon), ("maxlon", maxlon)):
        if not -180.0 <= value <= 180.0:
            raise ValueError(f"bbox {name} {value} is outside [-180, 180]")
    for name, value in (("minlat", minlat), ("maxlat", maxlat)):
        if not -90.0 <= value <= 90.0:
            raise ValueError(f"bbox {name} {value} is outside [-90, 90]")
    if not minlon < maxlon:
        raise ValueError(
            f"bbox minlon {minlon} is not below maxlon {maxlon} "
            "(boxes across the antimeridian must be split in two)"
        )
    if not minlat < maxlat:
        raise ValueError(f"bbox minlat {minlat} is not below maxlat {maxlat}")
    area = MultiPolygon([box(minlon, minlat, maxlon, maxlat)])
    if not area.area > 0:  # sides so small that their product underflows to zero
        raise ValueError(f"bbox {_show(stripped)} is too small: its area is 0 square degrees")
    return area


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number GeoJSON allows")


def _check_crs(obj: dict[str, Any], where: str) -> None:
    """Accept no ``crs`` member, a null one, or one naming lon/lat WGS 84."""
    if "crs" not in obj or obj["crs"] is None:
        return
    crs = obj["crs"]
    name = None
    if isinstance(crs, dict) and crs.get("type") == "name":
        properties = crs.get("properties")
        if isinstance(properties, dict) and isinstance(properties.get("name"), str):
            name = properties["name"]
    if name is None:
        raise ValueError(f"{where} has a crs member that names no CRS; expected CRS84/EPSG:4326")
    if name.strip().lower() not in LONLAT_CRS_NAMES:
        raise ValueError(
            f"{where} is in CRS {_show(name, 80)}; areas must be lon/lat (CRS84/EPSG:4326)"
        )


def _position(value: Any, where: str) -> tuple[float, float]:
    if not isinstance(value, list) or len(value) < 2:
        raise ValueError(f"{where}: a position must be a list of 2 or 3 numbers")
    lon, lat = value[0], value[1]
    for v in (lon, lat):
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"{where}: a coordinate is not a number: {_show(repr(v))}")
    lon, lat = float(lon), float(lat)
    if not (math.isfinite(lon) and math.isfinite(lat)):
        raise ValueError(f"{where}: a coordinate is not finite")
    if not (-180.0 <= lon <= 180.0 and -90.0 <= lat <= 90.0):
        raise ValueError(f"{where}: ({lon}, {lat}) is not a longitude/latitude")
    # 1e-9 degrees is a tenth of a millimetre; finer digits only feed GEOS's overlay
    # numbers it can fail on (subnormals, say).
    return round(lon, COORDINATE_DECIMALS), round(lat, COORDINATE_DECIMALS)


def _ring(value: Any, where: str) -> list[tuple[float, float]]:
    if not isinstance(value, list):
        raise ValueError(f"{where}: a linear ring must be a list of positions")
    ring = [_position(p, where) for p in value]
    if len(ring) < 4:
        raise ValueError(f"{where}: a linear ring needs at least 4 positions, not {len(ring)}")
    if ring[0] != ring[-1]:
        raise ValueError(f"{where}: a linear ring must end where it starts")
    return ring


def _polygon(value: Any, where: str) -> Polygon:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: a polygon must be a non-empty list of linear rings")
    rings = [_ring(r, where) for r in value]
    return Polygon(rings[0], rings[1:])


def _geometry(obj: Any, where: str) -> list[Polygon]:
    """The polygons of a GeoJSON geometry object; an error for anything not polygonal."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: a geometry must be a JSON object")
    _check_crs(obj, where)
    kind = obj.get("type")
    if kind not in _POLYGONAL:
        shown = _show(kind) if isinstance(kind, str) else repr(type(kind).__name__)
        raise ValueError(
            f"{where} is a {shown} geometry; an area must be a Polygon or MultiPolygon"
        )
    coordinates = obj.get("coordinates")
    if kind == "Polygon":
        return [_polygon(coordinates, where)]
    if not isinstance(coordinates, list):
        raise ValueError(f"{where}: MultiPolygon coordinates must be a list of polygons")
    return [_polygon(p, f"{where}, polygon {i}") for i, p in enumerate(coordinates)]


def _feature(obj: Any, where: str) -> list[Polygon]:
    if not isinstance(obj, dict) or obj.get("type") != "Feature":
        raise ValueError(f"{where} is not a GeoJSON Feature")
    _check_crs(obj, where)
    if "geometry" not in obj:
        raise ValueError(f"{where} has no geometry member")
    if obj["geometry"] is None:
        return []  # an unlocated feature adds nothing to the area
    return _geometry(obj["geometry"], f"{where}, geometry")


def _polygonal_part(geometry: BaseGeometry) -> BaseGeometry:
    """The union of the polygonal parts of a geometry (make_valid can return lines too)."""
    parts = shapely.get_parts(geometry)
    polygons = [p for p in parts.tolist() if isinstance(p, Polygon | MultiPolygon)]
    nested = [p for p in parts.tolist() if p.geom_type == "GeometryCollection"]
    polygons.extend(_polygonal_part(p) for p in nested)
    return shapely.union_all(polygons) if polygons else Polygon()


def _as_multipolygon(polygons: list[Polygon], where: str) -> MultiPolygon:
    try:
        fixed = [p if p.is_valid else _polygonal_part(shapely.make_valid(p)) for p in polygons]
        area = _polygonal_part(shapely.union_all([p for p in fixed if not p.is_empty]))
    except shapely.errors.GEOSException as exc:
        raise ValueError(f"{where} could not be made into a valid area: {exc}") from None
    if area.is_empty or area.area <= 0:
        raise ValueError(f"{where} has no area")
    if isinstance(area, Polygon):
        area = MultiPolygon([area])
    if not isinstance(area, MultiPolygon) or not area.is_valid:
        raise ValueError(f"{where} could not be made into a valid area")
    return area


def read_geojson_area(path: Path) -> MultiPolygon:
    """Read an area from a GeoJSON file (RFC 7946, lon/lat).

    The file holds a Polygon or MultiPolygon geometry, a Feature of one, or a
    FeatureCollection of them; the area is the union of its polygons. Features
    without a geometry are skipped. An invalid polygon (self-intersecting, say)
    is repaired with ``shapely.make_valid``, keeping only its polygonal parts.

    Args:
        path: The GeoJSON file.

    Returns:
        The area as a valid lon/lat ``MultiPolygon``.

    Raises:
        ValueError: The file is missing, unreadable, too large, not UTF-8 JSON,
            not GeoJSON, holds a geometry other than a (multi)polygon, is in a
            CRS other than CRS84/EPSG:4326, has coordinates out of range, or has
            no area.
    """
    path = Path(path)
    where = f"GeoJSON {str(path)!r}"
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ValueError(f"{where} is not a file")
        if size > MAX_GEOJSON_BYTES:
            raise ValueError(f"{where} is {size:,} bytes, more than {MAX_GEOJSON_BYTES:,}")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{where} does not exist") from None
    except OSError as exc:
        raise ValueError(f"{where} cannot be read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where} is not UTF-8 text (byte {exc.start})") from None
    try:
        document = json.loads(
            text, parse_constant=lambda name: _reject_constant(f"{where}: {name}")
        )
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{where} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except RecursionError:
        raise ValueError(f"{where} is nested too deeply") from None

    if not isinstance(document, dict):
        raise ValueError(f"{where} is not a GeoJSON object")
    _check_crs(document, where)
    kind = document.get("type")
    if kind == "FeatureCollection":
        features = document.get("features")
        if not isinstance(features, list):
            raise ValueError(f"{where}: a FeatureCollection needs a list of features")
        if not features:
            raise ValueError(f"{where} is a FeatureCollection with no features")
        polygons = [p for i, f in enumerate(features) for p in _feature(f, f"{where}, feature {i}")]
    elif kind == "Feature":
        polygons = _feature(document, where)
    else:
        polygons = _geometry(document, where)
    if not polygons:
        raise ValueError(f"{where} holds no polygon")
    return _as_multipolygon(polygons, where)


def validate_name(name: str) -> str:
    """Check the name of an area of interest, which ends up in file paths and logs.

    Args:
        name: 1 to 64 characters of ASCII letters, digits, ``_``, ``-`` and ``.``,
            starting with a letter or digit.

    Returns:
        The name, unchanged.

    Raises:
        ValueError: The name breaks the rule above.
    """
    if not isinstance(name, str):
        raise ValueError(f"an area name must be text, not {type(name).__name__}")
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"bad area name {_show(name)}: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )
    return name
