"""Validation of user-given areas: bounding boxes, GeoJSON files and names."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shapely.geometry import MultiPolygon, box

from revisit.ingest.areas import parse_bbox, read_geojson_area, validate_name

# --- bounding boxes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "2.2,48.8,2.5,48.95",
        "2.2, 48.8, 2.5, 48.95",
        "2.2 48.8 2.5 48.95",
        "  2.2,48.8  2.5 ,48.95\n",
        "+2.2,4.88e1,2.5,48.95",
    ],
)
def test_good_bbox(text: str) -> None:
    area = parse_bbox(text)
    assert isinstance(area, MultiPolygon)
    assert area.equals(MultiPolygon([box(2.2, 48.8, 2.5, 48.95)]))
    assert area.is_valid


def test_bbox_extremes() -> None:
    assert parse_bbox("-180,-90,180,90").bounds == (-180.0, -90.0, 180.0, 90.0)
    assert parse_bbox("-.5,-1.,.5,1").bounds == (-0.5, -1.0, 0.5, 1.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty bbox"),
        ("   ", "empty bbox"),
        ("1,2,3", "4 numbers.*got 3"),
        ("1,2,3,4,5", "4 numbers.*got 5"),
        ("1,,2,3,4", "empty value"),
        (",1,2,3,4", "empty value"),
        ("nan,0,1,1", "minlon is not a decimal number"),
        ("0,0,inf,1", "maxlon is not a decimal number"),
        ("0,0,1e999,1", "maxlon is not finite"),
        ("0,0,1_0,1", "not a decimal number"),
        ("0,0,\u0661,1", "not a decimal number"),  # an Arabic-Indic digit, which float() takes
        ("0x10,0,1,1", "not a decimal number"),
        ("1;DROP TABLE aoi;--,0,1,1", "got 6"),
        ("1;--,0,1,1", "minlon is not a decimal number"),
        ("0,0,1,1' OR '1'='1", "got 6"),
        ("0,0,1,1)", "maxlat is not a decimal number"),
        ("-181,0,1,1", r"minlon -181.0 is outside \[-180, 180\]"),
        ("0,-91,1,1", r"minlat -91.0 is outside \[-90, 90\]"),
        ("0,0,1,90.5", "maxlat 90.5 is outside"),
        ("170,0,-170,1", "antimeridian"),
        ("1,0,1,1", "minlon 1.0 is not below maxlon 1.0"),
        ("0,2,1,1", "minlat 2.0 is not below maxlat 1.0"),
        ("-1E-260,-1E-70,0,0", "too small: its area is 0"),
        ("1" * 300, "too long"),
    ],
)
def test_bad_bbox(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_bbox(text)


def test_bbox_not_text() -> None:
    with pytest.raises(ValueError, match="must be text"):
        parse_bbox(None)  # type: ignore[arg-type]


def check_area(area: MultiPolygon) -> None:
    assert isinstance(area, MultiPolygon)
    assert area.is_valid and not area.is_empty and area.area > 0
    minx, miny, maxx, maxy = area.bounds
    assert -180 <= minx < maxx <= 180 and -90 <= miny < maxy <= 90


numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(min_value=-200, max_value=200).map(str),
    st.integers(min_value=-200, max_value=200).map(str),
    st.text(max_size=6),
)


@settings(max_examples=300)
@given(
    st.one_of(
        st.text(max_size=80),
        st.lists(numbers, min_size=0, max_size=6).flatmap(
            lambda parts: st.sampled_from([",", " ", ", ", " ,", "\t", ";"]).map(
                lambda sep: sep.join(parts)
            )
        ),
    )
)
def test_any_text_is_an_area_or_a_value_error(text: str) -> None:
    try:
        area = parse_bbox(text)
    except ValueError:
        return
    check_area(area)


@given(
    west=st.floats(min_value=-180, max_value=179),
    south=st.floats(min_value=-90, max_value=89),
    width=st.floats(min_value=1e-6, max_value=1),
    height=st.floats(min_value=1e-6, max_value=1),
)
def test_bbox_round_trips(west: float, south: float, width: float, height: float) -> None:
    east, north = west + width, south + height
    area = parse_bbox(f"{west!r},{south!r} {east!r} {north!r}")
    assert area.bounds == (west, south, east, north)


# --- GeoJSON --------------------------------------------------------------------------------

SQUARE = [[[2.0, 48.0], [3.0, 48.0], [3.0, 49.0], [2.0, 49.0], [2.0, 48.0]]]
OTHER = [[[4.0, 48.0], [5.0, 48.0], [5.0, 49.0], [4.0, 49.0], [4.0, 48.0]]]
OVERLAPPING = [[[2.5, 48.5], [3.5, 48.5], [3.5, 49.5], [2.5, 49.5], [2.5, 48.5]]]


def polygon(coordinates: Any = SQUARE) -> dict[str, Any]:
    return {"type": "Polygon", "coordinates": coordinates}


def feature(geometry: Any) -> dict[str, Any]:
    return {"type": "Feature", "properties": {"name": "x"}, "geometry": geometry}


def collection(*features: Any) -> dict[str, Any]:
    return {"type": "FeatureCollection", "features": list(features)}


def write(tmp_path: Path, document: Any, name: str = "area.geojson") -> Path:
    path = tmp_path / name
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return path


@pytest.mark.parametrize(
    ("document", "area"),
    [
        (polygon(), 1.0),
        (feature(polygon()), 1.0),
        (collection(feature(polygon())), 1.0),
        ({"type": "MultiPolygon", "coordinates": [SQUARE, OTHER]}, 2.0),
        (collection(feature(polygon()), feature(polygon(OTHER))), 2.0),
        (collection(feature(polygon()), feature(polygon(OVERLAPPING))), 1.75),
        (collection(feature(polygon()), feature(None)), 1.0),
        (feature({"type": "MultiPolygon", "coordinates": [SQUARE]}), 1.0),
        (
            polygon([*SQUARE, [[2.2, 48.2], [2.2, 48.7], [2.7, 48.7], [2.7, 48.2], [2.2, 48.2]]]),
            0.75,
        ),
        (
            {
                **polygon(),
                "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:OGC:1.3:CRS84"}},
            },
            1.0,
        ),
        ({**polygon(), "crs": {"type": "name", "properties": {"name": "EPSG:4326"}}}, 1.0),
        (polygon([[[2.0, 48.0, 35.0], [3.0, 48.0, 36.0], [3.0, 49.0, 1], [2.0, 48.0, 0.0]]]), 0.5),
    ],
)
def test_good_geojson(tmp_path: Path, document: Any, area: float) -> None:
    result = read_geojson_area(write(tmp_path, document))
    check_area(result)
    assert result.area == pytest.approx(area)


def test_geojson_bom_and_str_path(tmp_path: Path) -> None:
    path = tmp_path / "bom.geojson"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(polygon()).encode())
    assert read_geojson_area(path).area == pytest.approx(1.0)


def test_invalid_polygon_is_made_valid(tmp_path: Path) -> None:
    bowtie = [[[0.0, 0.0], [2.0, 2.0], [2.0, 0.0], [0.0, 2.0], [0.0, 0.0]]]
    result = read_geojson_area(write(tmp_path, polygon(bowtie)))
    check_area(result)
    assert result.area == pytest.approx(2.0)
    assert len(result.geoms) == 2


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"type": "Polygon", "coordinates": [[[NaN, 0]]]}', "NaN is not a number"),
        ("[]", "not a GeoJSON object"),
        ('"Polygon"', "not a GeoJSON object"),
        ({"type": "Point", "coordinates": [2.0, 48.0]}, "'Point' geometry"),
        (feature({"type": "LineString", "coordinates": [[2, 48], [3, 49]]}), "'LineString'"),
        (
            collection(feature(polygon()), feature({"type": "Point", "coordinates": [0, 0]})),
            "'Point'",
        ),
        (collection(), "no features"),
        (collection(feature(None)), "holds no polygon"),
        ({"type": "FeatureCollection"}, "needs a list of features"),
        (collection("x"), "feature 0 is not a GeoJSON Feature"),
        ({"type": "Feature", "properties": {}}, "no geometry member"),
        ({"type": "GeometryCollection", "geometries": [polygon()]}, "'GeometryCollection'"),
        ({"type": 3}, "'int' geometry"),
        (polygon([]), "non-empty list of linear rings"),
        (polygon([[[0, 0], [1, 0], [0, 0]]]), "at least 4 positions"),
        (polygon([[[0, 0], [1, 0], [1, 1], [0, 1]]]), "end where it starts"),
        (polygon([[[0, 0], [1, 0], [1, "1"], [0, 0]]]), "not a number"),
        (polygon([[[0, 0], [1, 0], [1, True], [0, 0]]]), "not a number"),
        (polygon([[[0, 0], [1, 0], [1], [0, 0]]]), "list of 2 or 3 numbers"),
        (
            '{"type": "Polygon", "coordinates": [[[0, 0], [1e400, 0], [1, 1], [0, 0]]]}',
            "not finite",
        ),
        (polygon([[[0, 0], [math.inf, 0], [1, 1], [0, 0]]]), "Infinity is not a number"),
        (polygon([[[0, 0], [200, 0], [200, 1], [0, 0]]]), r"\(200.0, 0.0\) is not a longitude"),
        (polygon([[[48, 2], [49, 2], [49, 95], [48, 2]]]), "not a longitude/latitude"),
        (polygon([[[0, 0], [1, 0], [2, 0], [0, 0]]]), "has no area"),
        (
            {**polygon(), "crs": {"type": "name", "properties": {"name": "EPSG:3857"}}},
            "in CRS 'EPSG:3857'",
        ),
        (
            collection(
                {
                    **feature(polygon()),
                    "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32631"}},
                }
            ),
            "feature 0 is in CRS",
        ),
        ({**polygon(), "crs": {"type": "link", "properties": {}}}, "names no CRS"),
        ("[" * 100_000, "nested too deeply|not valid JSON"),
    ],
)
def test_bad_geojson(tmp_path: Path, document: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_geojson_area(write(tmp_path, document))


def test_missing_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        read_geojson_area(tmp_path / "nowhere.geojson")
    with pytest.raises(ValueError, match="is not a file"):
        read_geojson_area(tmp_path)
    path = tmp_path / "latin1.geojson"
    path.write_bytes(b'{"type": "Polygon", "name": "\xe9"}')
    with pytest.raises(ValueError, match="not UTF-8"):
        read_geojson_area(path)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.floats(allow_nan=False)
    | st.integers()
    | st.text(max_size=10)
    | st.sampled_from(["Polygon", "MultiPolygon", "Feature", "FeatureCollection", "Point"]),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(
            st.sampled_from(["type", "coordinates", "features", "geometry", "crs", "properties"]),
            children,
            max_size=4,
        )
    ),
    max_leaves=40,
)
small_rings = st.lists(
    st.tuples(st.floats(-10, 10), st.floats(-10, 10)).map(list), min_size=3, max_size=7
).map(lambda ring: [*ring, ring[0]])
polygons = st.lists(small_rings, min_size=1, max_size=3).map(polygon)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        json_values, polygons, polygons.map(feature), polygons.map(lambda p: collection(feature(p)))
    )
)
def test_any_json_is_an_area_or_a_value_error(tmp_path: Path, document: Any) -> None:
    path = write(tmp_path, document)
    try:
        area = read_geojson_area(path)
    except ValueError:
        return
    check_area(area)


# --- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "paris", "Paris_2024", "x-1.v2", "9lives", "a" * 64, "a.."])
def test_good_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a" * 65,
        ".hidden",
        "-rf",
        "_x",
        "../etc/passwd",
        "a/b",
        "a\\b",
        "a b",
        "a\n",
        "a\x00",
        "café",
        "a;DROP TABLE aoi",
        "$(rm -rf)",
        "名字",
    ],
)
def test_bad_names(name: str) -> None:
    with pytest.raises(ValueError, match="bad area name"):
        validate_name(name)


@given(st.text(max_size=80))
def test_any_name_is_safe_or_refused(name: str) -> None:
    try:
        assert validate_name(name) == name
    except ValueError:
        return
    assert 1 <= len(name) <= 64
    assert name[0].isascii() and name[0].isalnum()
    assert all(c.isascii() and (c.isalnum() or c in "_-.") for c in name)
