"""The web map's JSON endpoints over real HTTP on 127.0.0.1, against a real PostGIS database."""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest
import sqlalchemy as sa

from revisit.daemon.health import HealthServer
from revisit.daemon.metrics import Metrics
from revisit.db.queries import changed_locations
from revisit.web.api import MAX_LIMIT, WebApp, json_response
from tests.web.conftest import AOI_BOX, OUTSIDE, World, request


def _pages(url: str, first: str) -> list[dict[str, Any]]:
    pages = []
    path: str | None = first
    while path is not None:
        reply = request(url, path)
        assert reply.status == 200, reply.body
        assert reply.content_type == "application/geo+json"
        page = reply.json()
        pages.append(page)
        path = page["next"]
        assert len(pages) < 100, "the pages never end"
    return pages


def _ids(pages: list[dict[str, Any]]) -> list[int]:
    return [f["properties"]["location_id"] for p in pages for f in p["features"]]


def test_paging_returns_every_location_exactly_once_most_changed_first(
    server: HealthServer, world: World
) -> None:
    pages = _pages(server.url, "/api/changes?limit=7")
    ids = _ids(pages)
    assert len(ids) == len(set(ids)) == len(world.places) == 31
    assert set(ids) == set(world.places)
    assert [len(p["features"]) for p in pages] == [7, 7, 7, 7, 3]
    assert [p["offset"] for p in pages] == [0, 7, 14, 21, 28]
    assert [p["next_offset"] for p in pages] == [7, 14, 21, 28, None]
    ratios = [world.places[i].ratio_ema for i in ids]
    assert ratios == sorted(ratios, reverse=True)
    # The same rows, in the same order, as `revisit query changed --all`.
    with world.engine.connect() as conn:
        assert ids == [r.location_id for r in changed_locations(conn, changed_only=False)]
    # A page size that divides the total leaves no empty last page.
    assert [len(p["features"]) for p in _pages(server.url, "/api/changes?limit=31")] == [31]


def test_a_feature_carries_the_estimate(server: HealthServer, world: World) -> None:
    page = request(server.url, "/api/changes?changed_only=1&limit=1").json()
    (feature,) = page["features"]
    place = world.places[feature["id"]]
    assert feature["geometry"] == {"type": "Point", "coordinates": [place.lon, place.lat]}
    props = feature["properties"]
    assert set(props) == {
        "location_id", "ratio_ema", "ratio_last", "updates", "changed",
        "change_probability", "changed_since", "updated_at", "aoi_name",
    }  # fmt: skip
    assert props["ratio_ema"] == pytest.approx(place.ratio_ema)
    assert props["changed"] is True and props["changed_since"] is not None
    assert props["updates"] == place.steps and props["aoi_name"] == "geneva-shore"
    assert props["change_probability"] == pytest.approx(0.9)


@pytest.mark.parametrize(("flag", "changed"), [("true", True), ("1", True), ("false", False),
                                               ("0", False), (None, False)])  # fmt: skip
def test_changed_only_filters_and_defaults_to_every_location(
    server: HealthServer, world: World, flag: str | None, changed: bool
) -> None:
    query = "" if flag is None else f"&changed_only={flag}"
    ids = _ids(_pages(server.url, f"/api/changes?limit=5{query}"))
    expected = {i for i, p in world.places.items() if p.changed or not changed}
    assert set(ids) == expected and len(ids) == len(expected)
    assert changed or len(ids) == 31


def test_bbox_and_min_ratio_filter(server: HealthServer, world: World) -> None:
    west, south, east, north = AOI_BOX
    middle = (south + north) / 2
    path = f"/api/changes?bbox={west},{south},{east},{middle}&limit=4"
    ids = _ids(_pages(server.url, path))
    inside = {i for i, p in world.places.items() if p.lat <= middle and p.lon <= east}
    assert inside and set(ids) == inside and len(ids) == len(inside)
    # The location east of the AOI is there only when the box reaches it.
    lon, lat = OUTSIDE
    only = _ids(_pages(server.url, f"/api/changes?bbox={lon - 0.01},{lat - 0.01},180,90"))
    assert [world.places[i].lon for i in only] == [lon]
    strong = _ids(_pages(server.url, "/api/changes?min_ratio=1.5"))
    assert set(strong) == {i for i, p in world.places.items() if p.ratio_ema >= 1.5}
    assert request(server.url, "/api/changes?aoi=geneva-shore").json()["returned"] == 30
    assert request(server.url, "/api/changes?since=2000-01-01").json()["returned"] == 7


def test_the_next_link_keeps_the_filters(server: HealthServer) -> None:
    page = request(server.url, "/api/changes?bbox=6,46,7,47&min_ratio=0.5&limit=3").json()
    query = parse_qs(urlsplit(page["next"]).query)
    assert query == {
        "bbox": ["6,46,7,47"], "min_ratio": ["0.5"], "limit": ["3"], "offset": ["3"],
    }  # fmt: skip


BAD_REQUESTS = [
    ("/api/changes?bbox=1,2,3", "bbox must be four numbers"),
    ("/api/changes?bbox=1,2,3,4,5", "bbox must be four numbers"),
    ("/api/changes?bbox=a,b,c,d", "bbox must be four numbers"),
    ("/api/changes?bbox=", "bbox must be four numbers"),
    ("/api/changes?bbox=7,46,6,47", "west < east"),
    ("/api/changes?bbox=6,46,6,47", "west < east"),
    ("/api/changes?bbox=6,-91,7,47", "latitudes must be within [-90, 90]"),
    ("/api/changes?bbox=6,46,7,95", "latitudes must be within [-90, 90]"),
    ("/api/changes?bbox=-181,46,7,47", "longitudes must be within [-180, 180]"),
    ("/api/changes?bbox=6,46,nan,47", "finite"),
    ("/api/changes?offset=-1", "offset must be at least 0, not -1"),
    ("/api/changes?offset=two", "offset must be a whole number"),
    ("/api/changes?limit=0", "limit must be at least 1"),
    (f"/api/changes?limit={MAX_LIMIT + 1}", f"limit must be at most {MAX_LIMIT}"),
    ("/api/changes?limit=1.5", "limit must be a whole number"),
    ("/api/changes?min_ratio=-1", "min_ratio must be at least 0"),
    ("/api/changes?min_ratio=lots", "min_ratio must be a number"),
    ("/api/changes?min_ratio=inf", "min_ratio must be a finite number"),
    ("/api/changes?changed_only=maybe", "changed_only must be true, false, 1 or 0"),
    ("/api/changes?since=yesterday", "since must be a date"),
    ("/api/changes?aoi=atlantis", "no AOI named 'atlantis'"),
    ("/api/changes?colour=red", "unknown parameter 'colour'"),
    ("/api/changes?limit=5&limit=6", "'limit' is given more than once"),
    ("/api/changes?bbox=%ff,1,2,3", "not valid UTF-8"),
    ("/api/aois?bbox=1,2,3,4", "unknown parameter 'bbox' (this path takes: none)"),
    ("/api/locations/abc/history", "a location id is a positive whole number, not 'abc'"),
    ("/api/locations/-3/history", "a location id is a positive whole number"),
    ("/api/locations/0/history", "a location id is a positive whole number"),
    ("/api/locations/99999999999999999999/history", "a location id is a positive whole"),
    ("/api/locations/1/history?full=1", "unknown parameter 'full'"),
]


@pytest.mark.parametrize(("path", "message"), BAD_REQUESTS, ids=[p for p, _ in BAD_REQUESTS])
def test_a_bad_parameter_is_a_400_that_says_which(
    server: HealthServer, path: str, message: str
) -> None:
    reply = request(server.url, path)
    assert reply.status == 400 and reply.content_type == "application/json"
    error = reply.json()["error"]
    assert message in error, error


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/api/nothing", "no such path '/api/nothing'"),
        ("/api/locations/1", "no such path"),
        ("/api/locations/987654321/history", "no location with id 987654321"),
    ],
)
def test_unknown_paths_and_ids_are_404(server: HealthServer, path: str, message: str) -> None:
    reply = request(server.url, path)
    assert reply.status == 404 and message in reply.json()["error"]


def test_other_unknown_paths_are_404_and_only_get_and_head_are_answered(
    server: HealthServer,
) -> None:
    assert request(server.url, "/nothing").status == 404
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        reply = request(server.url, "/api/changes", method=method)
        assert reply.status == 405 and reply.headers["allow"] == "GET, HEAD"
    get = request(server.url, "/api/changes?limit=2")
    head = request(server.url, "/api/changes?limit=2", method="HEAD")
    assert head.status == 200 and head.body == b""
    assert head.headers["content-length"] == get.headers["content-length"] != "0"


def test_history_matches_the_change_events(server: HealthServer, world: World) -> None:
    location = next(i for i, p in world.places.items() if p.changed and p.steps > 1)
    reply = request(server.url, f"/api/locations/{location}/history")
    assert reply.status == 200 and reply.content_type == "application/json"
    body = reply.json()
    with world.engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT step, ratio, ratio_ema, created_at FROM change_event"
                " WHERE location_id = :id ORDER BY step"
            ),
            {"id": location},
        ).all()
    assert len(rows) == world.places[location].steps
    assert [(h["step"], h["ratio"], h["ratio_ema"], h["created_at"]) for h in body["history"]] == [
        (r.step, r.ratio, r.ratio_ema, r.created_at.isoformat()) for r in rows
    ]
    assert body["measured"] is True and body["unmeasured_reason"] is None
    assert body["estimate"]["ratio_ema"] == pytest.approx(rows[-1].ratio_ema)
    assert body["estimate"]["ratio_last"] == pytest.approx(rows[-1].ratio)
    assert body["estimate"]["changed"] is True
    assert (body["lon"], body["lat"]) == (world.places[location].lon, world.places[location].lat)


def test_history_of_a_location_without_an_estimate_says_why(
    server: HealthServer, world: World
) -> None:
    body = request(server.url, f"/api/locations/{world.unmeasured_id}/history").json()
    assert body["measured"] is False and body["estimate"] is None and body["history"] == []
    assert body["unmeasured_reason"] == "no observation"


def test_aois_are_geojson_polygons_with_counts(server: HealthServer, world: World) -> None:
    reply = request(server.url, "/api/aois")
    assert reply.status == 200 and reply.content_type == "application/geo+json"
    body = reply.json()
    (aoi,) = body["features"]
    assert aoi["geometry"]["type"] == "MultiPolygon"
    ring = aoi["geometry"]["coordinates"][0][0]
    west, south, east, north = AOI_BOX
    assert {tuple(c) for c in ring} == {(west, south), (east, south), (east, north), (west, north)}
    assert aoi["properties"]["name"] == "geneva-shore"
    assert aoi["properties"]["locations"] == 30
    assert aoi["properties"]["changed"] == sum(
        p.changed for p in world.places.values() if p.lon <= east
    )
    lons = [p.lon for p in world.places.values()]
    lats = [p.lat for p in world.places.values()]
    assert body["locations_bbox"] == pytest.approx([min(lons), min(lats), max(lons), max(lats)])


def test_without_a_database_the_api_is_503_and_the_page_still_loads() -> None:
    with HealthServer(port=0, metrics=Metrics(), readiness=lambda: (True, {})) as server:
        for path in ("/api/changes", "/api/aois", "/api/locations/1/history"):
            reply = request(server.url, path)
            assert reply.status == 503, path
            assert "no database is available" in reply.json()["error"]
        assert request(server.url, "/").status == 200


def test_a_database_that_does_not_answer_is_503() -> None:
    # Nothing listens on port 9 of the loopback: the connection is refused at once.
    gone = sa.create_engine(
        "postgresql+psycopg://revisit@127.0.0.1:9/revisit",
        poolclass=sa.pool.NullPool,
        connect_args={"connect_timeout": 2},
    )
    with HealthServer(
        port=0, metrics=Metrics(), readiness=lambda: (True, {}), engine=gone
    ) as server:
        reply = request(server.url, "/api/changes")
    assert reply.status == 503
    assert reply.json()["error"].startswith("the database did not answer")


def test_only_loopback_host_names_are_served(server: HealthServer) -> None:
    port = server.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
        assert request(server.url, "/api/aois", headers={"Host": host}).status == 200, host
    # A page on another site that resolves its own name to 127.0.0.1 (DNS rebinding).
    reply = request(server.url, "/api/aois", headers={"Host": f"evil.example:{port}"})
    assert reply.status == 403 and "loopback host name" in reply.json()["error"]
    assert request(server.url, "/healthz", headers={"Host": "evil.example"}).status == 200


def test_the_api_reads_in_a_read_only_transaction(world: World) -> None:
    app = WebApp(engine=world.engine)
    with app.reading() as conn, pytest.raises(sa.exc.InternalError) as caught:
        conn.execute(sa.text("DELETE FROM change_estimate"))
    assert isinstance(caught.value.orig, psycopg.errors.ReadOnlySqlTransaction)
    with world.engine.connect() as conn:
        count = conn.execute(sa.text("SELECT count(*) FROM change_estimate")).scalar_one()
    assert count == len(world.places)


def test_json_has_no_nan() -> None:
    reply = json_response(200, {"r": math.nan, "R": [math.inf, 1.5], "ok": True})
    assert reply.body == b'{"r":null,"R":[null,1.5],"ok":true}\n'
