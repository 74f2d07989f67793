"""Self-tests of the fake STAC API and COG server (``tests/ingest/fake_stac.py``)."""

from __future__ import annotations

import http.client
import json
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
import rasterio
import requests
from pystac_client import Client
from pystac_client.exceptions import APIError
from rasterio.errors import RasterioError
from rasterio.windows import Window

from tests.ingest.fake_stac import (
    COLLECTION_IDS,
    ES_COLLECTION,
    ES_ITEM_ID,
    OSCD_COLLECTION,
    PC_COLLECTION,
    PC_ITEM_ID,
    FakeStac,
    Fault,
    fake_stac_fixture,  # noqa: F401
    oscd_item_id,
)

#: In-process, GDAL must not probe side-car files: rasterio holds the GIL meanwhile.
GDAL = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}
WIDE = (-10.0, 40.0, 10.0, 60.0)  # Paris, Rennes and the Irish L2A tile


def _expected_clear(fake: FakeStac, collections: list[str]) -> list[str]:
    items = [fake.item(i) for i in fake.item_ids()]
    chosen = [
        i
        for i in items
        if i["collection"] in collections and i["properties"]["eo:cloud_cover"] < 80
    ]
    return [i["id"] for i in sorted(chosen, key=lambda i: (i["properties"]["datetime"], i["id"]))]


def _window(path_or_url: str, window: Window, **env: str) -> np.ndarray:
    with rasterio.Env(**GDAL, **env), rasterio.open(path_or_url) as src:
        return np.asarray(src.read(1, window=window))


@pytest.mark.parametrize("method", ["POST", "GET"])
def test_pystac_client_pages_through_a_filtered_search(fake_stac: FakeStac, method: str) -> None:
    client = Client.open(fake_stac.url)
    collections = [OSCD_COLLECTION, PC_COLLECTION]
    search = client.search(
        collections=collections,
        bbox=WIDE,
        datetime="2015-01-01/2023-12-31",
        query={"eo:cloud_cover": {"lt": 80}},
        limit=1,
        method=method,
    )
    ids = [item.id for item in search.items()]
    expected = _expected_clear(fake_stac, collections)
    assert ids == expected and len(ids) == 4
    assert oscd_item_id("rennes", 2) not in ids  # 86.5 % cloud
    assert fake_stac.search_requests == len(ids) > 1
    assert [p.get("token") for p in fake_stac.search_params] == [None, "next:1", "next:2", "next:3"]
    assert all(p["collections"] == collections for p in fake_stac.search_params)


def test_the_next_links_are_what_pystac_client_follows(fake_stac: FakeStac) -> None:
    body: dict[str, Any] = {"collections": [OSCD_COLLECTION], "limit": 2}
    page = requests.post(f"{fake_stac.url}/search", json=body, timeout=5).json()
    (link,) = [link for link in page["links"] if link["rel"] == "next"]
    assert (
        link["method"] == "POST" and link["merge"] is True and link["body"] == {"token": "next:2"}
    )
    assert page["numberMatched"] == 4 and page["numberReturned"] == 2
    got = requests.get(f"{fake_stac.url}/search?collections={OSCD_COLLECTION}&limit=3", timeout=5)
    (link,) = [link for link in got.json()["links"] if link["rel"] == "next"]
    assert "token=next%3A3" in link["href"] and "collections=oscd-l1c" in link["href"]
    last = requests.get(link["href"], timeout=5).json()
    assert len(last["features"]) == 1 and not [x for x in last["links"] if x["rel"] == "next"]
    fake_stac.page_size = 1
    page = requests.post(f"{fake_stac.url}/search", json=body, timeout=5).json()
    assert page["numberReturned"] == 1  # min(limit, page_size)


def test_search_filters(fake_stac: FakeStac) -> None:
    def ids(**params: Any) -> list[str]:
        reply = requests.post(f"{fake_stac.url}/search", json=params, timeout=5)
        assert reply.status_code == 200, reply.text
        return [f["id"] for f in reply.json()["features"]]

    paris1, paris2 = oscd_item_id("paris", 1), oscd_item_id("paris", 2)
    rennes1, rennes2 = oscd_item_id("rennes", 1), oscd_item_id("rennes", 2)
    assert ids(collections=[OSCD_COLLECTION], datetime="../2016-12-31T00:00:00Z") == [
        rennes1,
        paris1,
    ]
    assert ids(collections=[OSCD_COLLECTION], datetime="2017-01-01T00:00:00Z/..") == [
        rennes2,
        paris2,
    ]
    assert ids(datetime="2016-11-30T00:00:00Z/2016-11-30T23:59:59Z") == [paris1]
    point = {"type": "Point", "coordinates": [2.33, 48.82]}
    assert ids(intersects=point) == [paris1, paris2]
    assert ids(bbox=[-1.66, 48.1, -1.65, 48.11], query={"eo:cloud_cover": {"gte": 80}}) == [rennes2]
    assert ids(query={"s2:processing_baseline": {"eq": "04.00"}}) == [ES_ITEM_ID, PC_ITEM_ID]
    assert ids(collections=[ES_COLLECTION]) == [ES_ITEM_ID]
    assert ids(ids=[paris2, rennes1]) == [rennes1, paris2]
    bad = requests.post(f"{fake_stac.url}/search", json={"query": {"x": {"like": 1}}}, timeout=5)
    assert bad.status_code == 400


def test_landing_conformance_and_collections(fake_stac: FakeStac) -> None:
    landing = requests.get(fake_stac.url + "/", timeout=5).json()
    assert "https://api.stacspec.org/v1.0.0/item-search#query" in landing["conformsTo"]
    rels = {(link["rel"], link.get("method")) for link in landing["links"]}
    assert {("self", None), ("conformance", None), ("data", None)} <= rels
    assert {("search", "GET"), ("search", "POST")} <= rels
    conformance = requests.get(fake_stac.url + "/conformance", timeout=5).json()
    assert conformance["conformsTo"] == landing["conformsTo"]
    listed = requests.get(fake_stac.url + "/collections", timeout=5).json()
    assert [c["id"] for c in listed["collections"]] == list(COLLECTION_IDS)
    assert fake_stac.collection_ids == list(COLLECTION_IDS)
    client = Client.open(fake_stac.url)
    assert {c.id for c in client.get_collections()} == set(COLLECTION_IDS)
    one = requests.get(f"{fake_stac.url}/collections/{PC_COLLECTION}", timeout=5).json()
    assert one["id"] == PC_COLLECTION and one["extent"]["temporal"]["interval"][0][0].startswith(
        "2022-10-05"
    )
    missing = requests.get(f"{fake_stac.url}/collections/nope", timeout=5)
    assert missing.status_code == 404
    item = requests.get(
        f"{fake_stac.url}/collections/{OSCD_COLLECTION}/items/{oscd_item_id('paris', 1)}",
        timeout=5,
    ).json()
    assert item["assets"]["red"]["href"].startswith(fake_stac.url + "/files/")


def test_items_look_like_earth_search_and_planetary_computer(fake_stac: FakeStac) -> None:
    l1c = fake_stac.item(oscd_item_id("paris", 1))
    props = l1c["properties"]
    assert props["s2:processing_baseline"] == "02.06" and props["s2:product_type"] == "S2MSI1C"
    assert props["s2:mgrs_tile"] == "31UDQ" and props["mgrs:utm_zone"] == 31
    assert props["datetime"].startswith("2016-11-30T10:52")
    red = l1c["assets"]["red"]
    assert red["type"].endswith("profile=cloud-optimized") and "data" in red["roles"]
    assert red["eo:bands"][0]["name"] == "red" and red["raster:bands"][0]["nodata"] == 0
    assert l1c["assets"]["red-jp2"]["type"] == "image/jp2"
    assert {"thumbnail", "granule_metadata"} <= set(l1c["assets"])
    assert requests.head(l1c["assets"]["red-jp2"]["href"], timeout=5).status_code == 404

    pc, es = fake_stac.item(PC_ITEM_ID), fake_stac.item(ES_ITEM_ID)
    assert pc["properties"]["eo:cloud_cover"] == pytest.approx(59.769726)
    assert pc["properties"]["s2:processing_baseline"] == "04.00"
    assert es["properties"]["earthsearch:boa_offset_applied"] is True
    assert "earthsearch:boa_offset_applied" not in pc["properties"]
    assert pc["assets"]["B08"]["href"] == pc["assets"]["B8A"]["href"]  # no B08 in the data
    assert es["assets"]["nir"]["href"] == es["assets"]["nir08"]["href"]
    assert pc["assets"]["B04"]["eo:bands"][0]["name"] == "B04"
    assert "B10" not in pc["assets"] and "cirrus" not in es["assets"]
    assert requests.get(pc["assets"]["product-metadata"]["href"], timeout=5).status_code == 200

    # A reader that honours the flag gets the same DN from both items.
    window = Window(800, 800, 64, 64)
    raw = _window(str(fake_stac.local_path(PC_ITEM_ID, "B04")), window).astype(np.int32)
    shifted = _window(str(fake_stac.local_path(ES_ITEM_ID, "red")), window).astype(np.int32)
    assert (raw > 0).any()
    np.testing.assert_array_equal(np.where(raw > 0, np.maximum(raw - 1000, 1), 0), shifted)
    scl_pc = _window(str(fake_stac.local_path(PC_ITEM_ID, "SCL")), window)
    np.testing.assert_array_equal(
        scl_pc, _window(str(fake_stac.local_path(ES_ITEM_ID, "scl")), window)
    )


@pytest.mark.parametrize(
    ("item_id", "key", "col", "row"),
    [(PC_ITEM_ID, "B04", 900, 900), (oscd_item_id("paris", 1), "red", 130, 140)],
)
def test_vsicurl_reads_a_window_with_a_few_ranges(
    fake_stac: FakeStac, item_id: str, key: str, col: int, row: int
) -> None:
    href = fake_stac.href(item_id, key)
    window = Window(col, row, 64, 64)
    remote = _window(f"/vsicurl/{href}", window)
    np.testing.assert_array_equal(remote, _window(str(fake_stac.local_path(item_id, key)), window))
    served, size = fake_stac.bytes_served(href), fake_stac.file_size(href)
    assert 0 < served < size / 3, (served, size)
    assert fake_stac.total_bytes_served() == served
    sent = fake_stac.ranges_sent()
    assert sent[0] == ("HEAD", None) and sent[1] == ("GET", "bytes=0-16383"), sent
    assert all(method == "GET" and r and "," not in r for method, r in sent[1:]), sent


def test_a_multi_range_request_is_answered_multipart(fake_stac: FakeStac) -> None:
    href = fake_stac.href(PC_ITEM_ID, "B03")
    window = Window(100, 100, 400, 300)
    remote = _window(f"/vsicurl/{href}", window, GDAL_HTTP_MULTIRANGE="SINGLE_GET")
    np.testing.assert_array_equal(
        remote, _window(str(fake_stac.local_path(PC_ITEM_ID, "B03")), window)
    )
    assert any(r and "," in r for _, r in fake_stac.ranges_sent()), fake_stac.ranges_sent()


def test_range_head_404_and_416(fake_stac: FakeStac) -> None:
    href = fake_stac.href(oscd_item_id("rennes", 1), "blue")
    path = urlsplit(href).path
    data = fake_stac.local_path(oscd_item_id("rennes", 1), "blue").read_bytes()
    size = len(data)
    conn = http.client.HTTPConnection("127.0.0.1", urlsplit(fake_stac.url).port, timeout=5)

    def ask(method: str, target: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
        conn.request(method, target, headers=headers)
        reply = conn.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()

    status, headers, body = ask("HEAD", path)
    assert status == 200 and headers["content-length"] == str(size) and body == b""
    assert headers["accept-ranges"] == "bytes"
    status, headers, body = ask("GET", path, Range="bytes=10-19")
    assert (status, body, headers["content-range"]) == (206, data[10:20], f"bytes 10-19/{size}")
    assert ask("GET", path, Range=f"bytes={size - 5}-")[2] == data[-5:]
    assert ask("GET", path, Range="bytes=-7")[2] == data[-7:]
    status, headers, body = ask("GET", path, Range="bytes=0-3,100-103")
    assert status == 206 and headers["content-type"].startswith("multipart/byteranges")
    assert data[:4] in body and data[100:104] in body
    status, headers, _ = ask("GET", path, Range=f"bytes={size}-")
    assert status == 416 and headers["content-range"] == f"bytes */{size}"
    assert ask("GET", path)[2] == data
    assert ask("GET", "/files/paris/1/nothing.tif")[0] == 404
    assert ask("GET", "/files/../../etc/passwd")[0] == 404
    conn.close()
    assert fake_stac.request_count(path) == 7  # the 404s are other paths
    logged = [h.body_bytes for h in fake_stac.log if h.path == path]
    assert logged[:4] == [0, 10, 5, 7] and logged[5:] == [0, size]
    assert fake_stac.bytes_served(path) == sum(logged)
    # The total counts every body sent under /files/, the 404s' JSON too.
    assert fake_stac.total_bytes_served() == sum(h.body_bytes for h in fake_stac.log)
    fake_stac.reset_counters()
    assert fake_stac.total_bytes_served() == 0 and fake_stac.log == []


def test_faults_then_success(fake_stac: FakeStac) -> None:
    client = Client.open(fake_stac.url)
    fake_stac.inject("/search", Fault.status(503, retry_after="1"))
    with pytest.raises(APIError):
        list(client.search(collections=[ES_COLLECTION]).items())
    assert [i.id for i in client.search(collections=[ES_COLLECTION]).items()] == [ES_ITEM_ID]
    fake_stac.inject("/search", Fault.reset())
    with pytest.raises(requests.ConnectionError):
        requests.post(f"{fake_stac.url}/search", json={}, timeout=5)
    assert requests.post(f"{fake_stac.url}/search", json={}, timeout=5).status_code == 200
    fake_stac.inject("/search", Fault.status(429, retry_after="2"))
    reply = requests.get(f"{fake_stac.url}/search", timeout=5)
    assert reply.status_code == 429 and reply.headers["Retry-After"] == "2"
    assert fake_stac.faults_served[("/search", "status-503")] == 1

    # A file: the first request fails with 503, GDAL retries and reads.
    item = oscd_item_id("paris", 2)
    href = fake_stac.href(item, "red")
    fake_stac.inject("/files/paris/2/*B04*", Fault.status(503))
    window = Window(0, 0, 64, 64)
    retrying = {"GDAL_HTTP_MAX_RETRY": "2", "GDAL_HTTP_RETRY_DELAY": "0.01"}
    remote = _window(f"/vsicurl/{href}", window, **retrying)
    np.testing.assert_array_equal(remote, _window(str(fake_stac.local_path(item, "red")), window))
    statuses = [h.status for h in fake_stac.log if h.path.endswith("/paris/2/B04.tif")]
    assert statuses[0] == 503 and statuses[1] == 200 and set(statuses[2:]) == {206}


def test_a_truncated_file_reads_its_header_but_not_its_last_tile(fake_stac: FakeStac) -> None:
    href = fake_stac.href(PC_ITEM_ID, "B05")
    fake_stac.inject("/files/l2a/pc/B05.tif", Fault.truncated())
    head = requests.head(href, timeout=5)
    assert int(head.headers["Content-Length"]) == fake_stac.file_size(href) // 2
    with rasterio.Env(**GDAL), rasterio.open(f"/vsicurl/{href}") as src:
        assert src.read(1, window=Window(0, 0, 64, 64)).shape == (64, 64)
        with pytest.raises(RasterioError):
            src.read(1, window=Window(src.width - 64, src.height - 64, 64, 64))


def test_bad_items(fake_stac: FakeStac) -> None:
    paris1 = oscd_item_id("paris", 1)
    fake_stac.drop_asset(paris1, "red")
    undated = fake_stac.add_item_without_datetime(paris1)
    fake_stac.add_raw_item({"type": "Feature", "id": "raw", "collection": OSCD_COLLECTION})
    fake_stac.update_properties(oscd_item_id("paris", 2), {"eo:cloud_cover": 99.0})
    reply = requests.post(
        f"{fake_stac.url}/search",
        json={"collections": [OSCD_COLLECTION], "datetime": "2016-01-01T00:00:00Z/..", "limit": 50},
        timeout=5,
    )
    features = {f["id"]: f for f in reply.json()["features"]}
    assert "red" not in features[paris1]["assets"]
    assert features[undated]["properties"]["datetime"] is None
    assert features["raw"] == {"type": "Feature", "id": "raw", "collection": OSCD_COLLECTION}
    assert features[oscd_item_id("paris", 2)]["properties"]["eo:cloud_cover"] == 99.0
    assert list(features)[-2:] == [undated, "raw"]  # the undatable ones last
    assert fake_stac.local_paths(undated) == fake_stac.local_paths(paris1)
    # Each server has its own copy of the catalog.
    assert "red" in fake_stac.catalog.items[0]["assets"]
    assert json.loads(json.dumps(fake_stac.item(paris1)))["id"] == paris1
