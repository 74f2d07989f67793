"""How the STAC source reads an item: which asset is which band, the date, the DN offset.

Pure functions on item dictionaries shaped as Earth Search v1 and Planetary
Computer write them; the HTTP and GDAL side is in ``test_stac.py``.
"""

from __future__ import annotations

from typing import Any

import pytest

from revisit.config import Settings, StacSettings, load_settings
from revisit.errors import ConfigError
from revisit.ingest.sources import build_source
from revisit.ingest.sources.stac import (
    EARTH_SEARCH_KEYS,
    NoSigning,
    PlanetaryComputerSigner,
    StacSource,
    band_assets,
    dn_offset,
    gdal_options,
    item_datetime,
    item_level,
    processing_baseline,
)
from revisit.types import CANONICAL_BANDS

COG = "image/tiff; application=geotiff; profile=cloud-optimized"


def _earth_search_item(**properties: Any) -> dict[str, Any]:
    assets: dict[str, Any] = {
        key: {
            "href": f"https://example.test/S2B_31UDQ/{band}.tif",
            "type": COG,
            "roles": ["data", "reflectance"],
            "eo:bands": [{"name": key, "common_name": key}],
            "raster:bands": [{"nodata": 0, "scale": 0.0001, "offset": -0.1}],
        }
        for key, band in EARTH_SEARCH_KEYS.items()
    }
    for key in EARTH_SEARCH_KEYS:
        assets[f"{key}-jp2"] = {
            "href": f"s3://bucket/{key}.jp2",
            "type": "image/jp2",
            "roles": ["data"],
        }
    assets["scl"] = {
        "href": "https://example.test/S2B_31UDQ/SCL.tif",
        "type": COG,
        "roles": ["data"],
    }
    assets["thumbnail"] = {"href": "https://example.test/t.jpg", "type": "image/jpeg"}
    assets["visual"] = {"href": "https://example.test/TCI.tif", "type": COG, "roles": ["visual"]}
    return {
        "type": "Feature",
        "id": "S2B_31UDQ_20220611_0_L2A",
        "properties": {"datetime": "2022-06-11T10:56:21.025000Z", **properties},
        "assets": assets,
    }


def _planetary_item(**properties: Any) -> dict[str, Any]:
    assets = {
        band: {
            "href": f"https://acct.blob.core.windows.net/c/{band}.tif",
            "type": COG,
            "roles": ["data"],
            "eo:bands": [{"name": band, "common_name": "x"}],
        }
        for band in (*CANONICAL_BANDS, "B10")
    }
    assets["SCL"] = {"href": "https://acct.blob.core.windows.net/c/SCL.tif", "type": COG}
    return {
        "id": "S2A_MSIL2A_20221005T115411_R023_T29UNU",
        "properties": properties,
        "assets": assets,
    }


def test_earth_search_keys_map_to_the_canonical_bands_and_jp2s_are_ignored() -> None:
    found = band_assets(_earth_search_item())
    assert set(found) == {*CANONICAL_BANDS, "SCL"}
    assert found["B8A"][0] == "nir08" and found["B08"][0] == "nir"
    assert all(asset["href"].endswith(".tif") for _, asset in found.values())
    assert found["SCL"][0] == "scl"


def test_planetary_computer_keys_and_eo_bands_names() -> None:
    found = band_assets(_planetary_item())
    assert set(found) == {*CANONICAL_BANDS, "SCL"}  # B10 is not one of the 12
    assert found["B02"][0] == "B02"


def test_an_asset_named_only_by_eo_bands_is_found() -> None:
    item = {
        "id": "x",
        "assets": {
            f"band{i}": {"href": f"https://e.test/{i}.tif", "eo:bands": [{"name": band}]}
            for i, band in enumerate(CANONICAL_BANDS)
        },
    }
    assert set(band_assets(item)) == set(CANONICAL_BANDS)


@pytest.mark.parametrize(
    ("properties", "expected"),
    [
        ({"s2:processing_baseline": "04.00"}, -1000),
        ({"s2:processing_baseline": "05.10"}, -1000),
        ({"s2:processing_baseline": "02.09"}, 0),
        ({"s2:processing_baseline": "4.00"}, -1000),
        # Earth Search removed the offset from these COGs itself.
        ({"s2:processing_baseline": "04.00", "earthsearch:boa_offset_applied": True}, 0),
        ({"s2:processing_baseline": "04.00", "earthsearch:boa_offset_applied": False}, -1000),
        ({"sentinel:processing_baseline": "04.00", "sentinel:boa_offset_applied": True}, 0),
        (
            {"s2:product_uri": "S2A_MSIL2A_20221005T115411_N0400_R023_T29UNU_20221005T164454.SAFE"},
            -1000,
        ),
        (
            {"s2:product_uri": "S2A_MSIL1C_20180101T105441_N0206_R051_T31UDQ_20180101T125028.SAFE"},
            0,
        ),
    ],
)
def test_the_offset_is_removed_only_where_the_item_says_it_is_there(
    properties: dict[str, Any], expected: int
) -> None:
    assert dn_offset({"id": "x", "properties": properties}) == expected


def test_without_a_baseline_raster_bands_decides() -> None:
    item = {"id": "x", "properties": {}}
    assert dn_offset(item, {"raster:bands": [{"scale": 0.0001, "offset": -0.1}]}) == -1000
    assert dn_offset(item, {"raster:bands": [{"scale": 0.0001}]}) == 0
    assert dn_offset(item, None) == 0


def test_baseline_from_properties_and_from_the_id() -> None:
    assert processing_baseline({"properties": {"s2:processing_baseline": "04.00"}}) == "04.00"
    assert (
        processing_baseline({"id": "S2A_MSIL2A_20221005T115411_N0509_R023", "properties": {}})
        == "05.09"
    )
    assert processing_baseline({"id": "S2B_31UDQ_20220611_0_L2A", "properties": {}}) is None


def test_item_dates() -> None:
    assert (
        item_datetime({"datetime": "2022-06-11T10:56:21Z"}).isoformat()
        == "2022-06-11T10:56:21+00:00"
    )
    middle = item_datetime(
        {
            "datetime": None,
            "start_datetime": "2022-06-11T10:00:00Z",
            "end_datetime": "2022-06-11T12:00:00Z",
        }
    )
    assert middle.hour == 11
    with pytest.raises(ValueError, match="no datetime"):
        item_datetime({"datetime": None})


def test_level_from_product_type_or_collection() -> None:
    assert item_level({"properties": {"s2:product_type": "S2MSI1C"}}, "whatever") == "L1C"
    assert item_level({"properties": {}}, "sentinel-2-c1-l2a") == "L2A"
    assert item_level({"properties": {}}, "my-mosaic") is None


def test_presets_and_overrides() -> None:
    assert StacSettings().resolved() == (
        "https://earth-search.aws.element84.com/v1",
        "sentinel-2-c1-l2a",
        "none",
    )
    assert StacSource(StacSettings()).policy.retry_after_unit_s == 1.0  # RFC 9110 seconds
    pc = StacSettings(preset="planetary-computer")
    assert pc.resolved()[2] == "planetary-computer"
    source = StacSource(pc)
    assert isinstance(source.signer, PlanetaryComputerSigner)
    assert source.collection == "sentinel-2-l2a"
    own = StacSource(StacSettings(api_url="http://127.0.0.1:9/stac", collection="mine"))
    assert (own.api_url, own.collection) == ("http://127.0.0.1:9/stac", "mine")
    assert isinstance(own.signer, NoSigning)
    built = build_source("stac", Settings(stac=StacSettings(preset="earth-search")))
    assert isinstance(built, StacSource) and built.collection == "sentinel-2-l2a"
    with pytest.raises(ConfigError, match=r"stac\.api_url"):
        load_settings(stac={"api_url": "ftp://nope"})


def test_gdal_is_set_for_range_reads() -> None:
    options = gdal_options(StacSettings(http_cache_mb=32, gdal_cache_mb=64))
    assert options["GDAL_DISABLE_READDIR_ON_OPEN"] == "EMPTY_DIR"
    assert options["GDAL_HTTP_MAX_RETRY"] == "0"  # revisit's policy retries
    assert options["CPL_VSIL_CURL_CACHE_SIZE"] == str(32 * 1024 * 1024)
    assert options["GDAL_CACHEMAX"] == 64 * 1024 * 1024
