"""Sentinel-2 SAFE folders (``*.SAFE``, Level-1C and Level-2A) as local products.

Everything but the pixels comes from the product's ``MTD_MSIL1C.xml`` or
``MTD_MSIL2A.xml``: sensing time, level, processing baseline, cloud cover,
footprint and the DN offset of baseline 04.00 and later (``RADIO_ADD_OFFSET``
in L1C, ``BOA_ADD_OFFSET`` in L2A), read per band and never assumed. The
granule's ``MTD_TL.xml`` gives the tile's CRS, for JP2s that lack one.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry

from revisit.errors import SceneRejectedError
from revisit.ingest import reasons
from revisit.ingest.sources.rasters import (
    BandFile,
    CloudMask,
    Product,
    canonical_band,
    dataset_footprint,
    open_raster,
    parse_when,
)
from revisit.types import CANONICAL_BANDS, Level

MTD_NAMES = ("MTD_MSIL2A.xml", "MTD_MSIL1C.xml")
#: The spectral band of each ``band_id`` in the metadata, when it has no Spectral_Information.
_BAND_IDS = (
    "B01",
    "B02",
    "B03",
    "B04",
    "B05",
    "B06",
    "B07",
    "B08",
    "B8A",
    "B09",
    "B10",
    "B11",
    "B12",
)
#: ``T29UNU_20221005T115411_B02_10m.jp2`` (L2A), ``T31UDQ_20170829T105019_B02.jp2`` (L1C).
_IMAGE_FILE = re.compile(r"_(B\d{2}|B8A|SCL)(?:_(\d+)m)?\.(?:jp2|tiff?)$", re.IGNORECASE)
_TILE = re.compile(r"_(T\d{2}[A-Z]{3})_")
#: A 60 m-only L2A folder has no B08; the narrow NIR band B8A stands in for it.
_STAND_INS = {"B08": "B8A"}


def safe_product_id(path: Path) -> str:
    """A SAFE's product id: its folder name without ``.SAFE``."""
    name = path.name
    return name[: -len(".SAFE")] if name.upper().endswith(".SAFE") else name


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _iter(root: ET.Element, name: str) -> Iterator[ET.Element]:
    return (el for el in root.iter() if _local(el.tag) == name)


def _text(root: ET.Element, name: str) -> str | None:
    for el in _iter(root, name):
        if el.text and el.text.strip():
            return el.text.strip()
    return None


def _parse_xml(path: Path, product_id: str) -> ET.Element:
    try:
        return ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise SceneRejectedError(
            reasons.MISSING_METADATA, f"{product_id}: {path.name} is not readable XML: {exc}"
        ) from None


def _offsets(root: ET.Element) -> dict[str, int]:
    """DN to add per band: ``BOA_ADD_OFFSET``/``RADIO_ADD_OFFSET`` by ``band_id``."""
    names = dict(enumerate(_BAND_IDS))
    for el in _iter(root, "Spectral_Information"):
        band = canonical_band(el.get("physicalBand"))
        band_id = el.get("bandId")
        if band is not None and band_id is not None and band_id.isdigit():
            names[int(band_id)] = band
    offsets: dict[str, int] = {}
    for tag in ("BOA_ADD_OFFSET", "RADIO_ADD_OFFSET"):
        for el in _iter(root, tag):
            band_id = el.get("band_id", "")
            if band_id.isdigit() and el.text and int(band_id) in names:
                offsets[names[int(band_id)]] = round(float(el.text))
    return offsets


def _footprint(root: ET.Element) -> BaseGeometry | None:
    """``EXT_POS_LIST`` (lat lon lat lon ...) as a lon/lat polygon."""
    text = _text(root, "EXT_POS_LIST")
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split()]
    except ValueError:
        return None
    points = [(values[i + 1], values[i]) for i in range(0, len(values) - 1, 2)]
    if len(points) < 3:
        return None
    polygon = Polygon(points)
    return polygon if polygon.is_valid else polygon.buffer(0)


def _level(root: ET.Element, mtd: Path) -> Level:
    text = (_text(root, "PROCESSING_LEVEL") or "") + (_text(root, "PRODUCT_TYPE") or "")
    if "2A" in text:
        return "L2A"
    if "1C" in text:
        return "L1C"
    return "L2A" if "L2A" in mtd.name else "L1C"


def _tile_georef(granule: Path) -> tuple[str | None, tuple[float, float] | None]:
    mtd_tl = granule / "MTD_TL.xml"
    if not mtd_tl.is_file():
        return None, None
    try:
        root = ET.parse(mtd_tl).getroot()
    except (ET.ParseError, OSError):
        return None, None
    crs = _text(root, "HORIZONTAL_CS_CODE")
    for geo in _iter(root, "Geoposition"):
        ulx, uly = _text(geo, "ULX"), _text(geo, "ULY")
        if ulx and uly:
            return crs, (float(ulx), float(uly))
    return crs, None


def _band_files(granule: Path) -> tuple[dict[str, Path], Path | None]:
    """The finest file of each band in a granule's IMG_DATA, and the finest SCL."""
    found: dict[str, tuple[int, Path]] = {}
    for path in sorted((granule / "IMG_DATA").rglob("*")):
        match = _IMAGE_FILE.search(path.name)
        if match is None or not path.is_file():
            continue
        band = "SCL" if match.group(1).upper() == "SCL" else canonical_band(match.group(1))
        if band is None:
            continue
        resolution = int(match.group(2)) if match.group(2) else 0  # L1C: native
        if band not in found or resolution < found[band][0]:
            found[band] = (resolution, path)
    scl = found.pop("SCL", None)
    return {band: path for band, (_, path) in found.items()}, scl[1] if scl else None


def describe_safe(path: Path) -> Product:
    """Describe a SAFE folder from its metadata, without reading any pixel.

    Args:
        path: The ``*.SAFE`` folder.

    Returns:
        The product, its band files chosen at the finest resolution present.

    Raises:
        SceneRejectedError: ``missing-metadata`` (no or unreadable MTD XML, no
            sensing time), ``wrong-band-count`` (bands missing), ``unreadable``
            (not one granule), ``corrupt-raster``/``missing-crs`` (the footprint
            had to come from a band file that is bad).
    """
    product_id = safe_product_id(path)
    mtd = next((path / n for n in MTD_NAMES if (path / n).is_file()), None)
    if mtd is None:
        raise SceneRejectedError(
            reasons.MISSING_METADATA, f"{product_id}: {path} has no {' or '.join(MTD_NAMES)}"
        )
    root = _parse_xml(mtd, product_id)
    when_text = _text(root, "PRODUCT_START_TIME") or _text(root, "DATATAKE_SENSING_START")
    acquired_at = parse_when(when_text) if when_text else None
    if acquired_at is None:
        raise SceneRejectedError(
            reasons.MISSING_METADATA, f"{product_id}: {mtd.name} gives no sensing time"
        )
    level = _level(root, mtd)
    granules = sorted(p for p in (path / "GRANULE").glob("*") if p.is_dir())
    if len(granules) != 1:
        raise SceneRejectedError(
            reasons.UNREADABLE,
            f"{product_id}: {len(granules)} granules under GRANULE/, expected exactly one",
        )
    files, scl = _band_files(granules[0])
    substitutions = {
        band: stand_in
        for band, stand_in in _STAND_INS.items()
        if level == "L2A" and band not in files and stand_in in files
    }
    missing = [b for b in CANONICAL_BANDS if substitutions.get(b, b) not in files]
    if missing:
        raise SceneRejectedError(
            reasons.WRONG_BAND_COUNT,
            f"{product_id}: no image file for {', '.join(missing)} under {granules[0].name}",
        )
    offsets = _offsets(root)
    sources = {band: substitutions.get(band, band) for band in CANONICAL_BANDS}
    bands = {band: BandFile(files[src], 1, offsets.get(src, 0)) for band, src in sources.items()}
    cloud_mask = None
    if scl is not None:
        cloud_mask = CloudMask("scl", BandFile(scl))
    elif (granules[0] / "QI_DATA" / "MSK_CLASSI_B00.jp2").is_file():
        cloud_mask = CloudMask("classi", BandFile(granules[0] / "QI_DATA" / "MSK_CLASSI_B00.jp2"))
    tile_crs, tile_ul = _tile_georef(granules[0])
    footprint = _footprint(root)
    if footprint is None:
        with open_raster(bands["B02"].path, product_id) as ds:
            footprint = dataset_footprint(ds, product_id)
    tile = _TILE.search(path.name)
    cloud_text = _text(root, "Cloud_Coverage_Assessment")
    return Product(
        kind="safe",
        path=path,
        product_id=product_id,
        acquired_at=acquired_at,
        footprint=footprint,
        bands=bands,
        tile_id=tile.group(1) if tile else None,
        level=level,
        processing_baseline=_text(root, "PROCESSING_BASELINE"),
        cloud_cover=float(cloud_text) if cloud_text else None,
        cloud_mask=cloud_mask,
        substitutions=substitutions,
        tile_crs=tile_crs,
        tile_ul=tile_ul,
    )
