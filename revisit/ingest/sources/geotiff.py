"""GeoTIFF products: folders of per-band files (the OSCD layout) and multi-band files.

A *band folder* holds one file per band, named ``<stem>_B01.tif`` ...
``<stem>_B12.tif`` (B10 ignored; ``_B02_10m.jp2``-style names are understood
too). Files sharing a stem make one product. Its date comes from a
``dates.txt`` next to the folder (``date_1: 20170402`` for ``imgs_1``), else
from the file names.

A *multi-band file* is one GeoTIFF/COG whose band descriptions name the bands
(``B01`` ... ``B12``, ``B1`` too; an ``SCL`` band gives the cloud mask). Its
date comes from a tag (``ACQUISITIONDATE``, ``datetime``) or the file name; a
``BOA_ADD_OFFSET``/``RADIO_ADD_OFFSET`` tag gives the DN offset of every band.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

from revisit.errors import SceneRejectedError
from revisit.ingest import reasons
from revisit.ingest.sources.rasters import (
    BandFile,
    CloudMask,
    Product,
    at_midnight,
    canonical_band,
    compact_datetime,
    dataset_footprint,
    open_raster,
    parse_when,
)
from revisit.types import CANONICAL_BANDS, Level

#: ``<stem>_B02.tif``, ``<stem>_B8A.tif``, ``<stem>_B02_10m.jp2``.
BAND_FILE = re.compile(
    r"^(?P<stem>.+?)_(?P<band>B(?:0[1-9]|1[0-2]|8A))(?:_(?P<res>\d+)m)?\.(?:tiff?|jp2)$",
    re.IGNORECASE,
)
TIFF_SUFFIXES = (".tif", ".tiff")
#: The L1C/L2A band file name: ``T31UDQ_20170829T105019_...``; its time is the sensing time.
_SENSING_NAME = re.compile(r"(?:^|_)T\d{2}[A-Z]{3}_(\d{8})T(\d{6})(?:_|$)")
#: A SAFE-style product name: ``S2A_MSIL1C_20170829T105019_...``.
_PRODUCT_NAME = re.compile(r"MSIL(?:1C|2A)_(\d{8})T(\d{6})")
_ANY_DATE = re.compile(r"(?<!\d)((?:19|20)\d{6})(?!\d)")
_TILE = re.compile(r"(?:^|_)(T\d{2}[A-Z]{3})(?:_|$)")
_DATE_TAGS = ("acquisitiondate", "acquisition_date", "datetime", "sensing_time", "start_datetime")
_OFFSET_TAGS = ("boa_add_offset", "radio_add_offset")


def group_band_files(folder: Path, names: list[str]) -> dict[str, dict[str, list[Path]]]:
    """Band files in ``folder`` by stem, then by canonical band (B10 dropped)."""
    groups: dict[str, dict[str, list[Path]]] = {}
    for name in sorted(names):
        match = BAND_FILE.match(name)
        if match is None:
            continue
        band = canonical_band(match.group("band"))
        bands = groups.setdefault(match.group("stem"), {})
        if band is not None and band != "B10":
            bands.setdefault(band, []).append(folder / name)
    return groups


def date_from_name(name: str) -> datetime | None:
    """The acquisition time a file or folder name gives, if any.

    A band-file or SAFE-style name gives its sensing time; otherwise the first
    ``YYYYMMDD`` in the name gives a date (at 00:00 UTC). Names of the older
    ``S2A_OPER_MSI_L1C_TL_...`` kind carry a processing time, not a sensing time:
    prefer ``dates.txt`` for those.
    """
    for pattern in (_SENSING_NAME, _PRODUCT_NAME):
        match = pattern.search(name)
        if match and (when := compact_datetime(match.group(1), match.group(2))):
            return when
    for match in _ANY_DATE.finditer(name):
        if when := compact_datetime(match.group(1)):
            return when
    return None


def date_from_dates_txt(folder: Path) -> datetime | None:
    """The date ``dates.txt`` gives a folder ``..._N``: its ``date_N`` line (00:00 UTC).

    ``dates.txt`` is looked for in the folder and in its parent.
    """
    number = re.search(r"_(\d+)$", folder.name)
    if number is None:
        return None
    key = f"date_{number.group(1)}"
    for candidate in (folder / "dates.txt", folder.parent / "dates.txt"):
        if not candidate.is_file():
            continue
        try:
            lines = candidate.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            name, sep, value = line.partition(":")
            if sep and name.strip().lower() == key:
                when = parse_when(value)
                return at_midnight(when.date()) if when else None
    return None


def _level_from_names(names: list[str]) -> Level | None:
    joined = " ".join(names).upper()
    if "L2A" in joined or re.search(r"_B\w\w_\d+M\.", joined):
        return "L2A"
    if "L1C" in joined or any(_SENSING_NAME.search(n.upper()) for n in names):
        return "L1C"
    return None


def describe_band_folder(
    folder: Path, stem: str, files: Mapping[str, list[Path]], product_id: str
) -> Product:
    """Describe one product of a band folder (the files sharing ``stem``).

    Args:
        folder: The folder.
        stem: The file-name stem the product's files share.
        files: Its band files by canonical band, from :func:`group_band_files`.
        product_id: The id to give it.

    Raises:
        SceneRejectedError: ``wrong-band-count`` (bands missing or doubled),
            ``missing-metadata`` (no date), ``corrupt-raster``/``missing-crs``
            (the reference band cannot give the footprint).
    """
    missing = [b for b in CANONICAL_BANDS if b not in files]
    if missing:
        raise SceneRejectedError(
            reasons.WRONG_BAND_COUNT, f"{product_id}: no file for {', '.join(missing)} in {folder}"
        )
    bands: dict[str, BandFile] = {}
    for band in CANONICAL_BANDS:
        paths = sorted(files[band], key=_resolution)
        if len(paths) > 1 and _resolution(paths[0]) == _resolution(paths[1]):
            raise SceneRejectedError(
                reasons.WRONG_BAND_COUNT,
                f"{product_id}: {len(paths)} files for {band}: {', '.join(p.name for p in paths)}",
            )
        bands[band] = BandFile(paths[0])
    names = [f.path.name for f in bands.values()]
    acquired_at = _dated(folder, stem)
    if acquired_at is None:
        raise SceneRejectedError(
            reasons.MISSING_METADATA,
            f"{product_id}: no acquisition date (no dates.txt entry, no YYYYMMDD in {stem})",
        )
    with open_raster(bands["B02"].path, product_id) as ds:
        footprint = dataset_footprint(ds, product_id)
    tile = _TILE.search(stem)
    return Product(
        kind="band-folder",
        path=folder,
        product_id=product_id,
        acquired_at=acquired_at,
        footprint=footprint,
        bands=bands,
        tile_id=tile.group(1) if tile else None,
        level=_level_from_names(names),
    )


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _resolution(path: Path) -> int:
    match = BAND_FILE.match(path.name)
    return int(match.group("res")) if match and match.group("res") else 0


def _dated(folder: Path, stem: str) -> datetime | None:
    listed = date_from_dates_txt(folder)
    named = date_from_name(stem)
    if listed is None:
        return named
    # dates.txt gives the day; a band-file name may give the time of that same day.
    if named is not None and named.date() == listed.date():
        return named
    return listed


def describe_multiband(path: Path, product_id: str) -> Product | None:
    """Describe a multi-band GeoTIFF, or None if it does not look like a Sentinel-2 product.

    A file is taken for a product when a band description names a band, or
    when it has 12 bands or more; other rasters (masks, labels) are not products.

    Raises:
        SceneRejectedError: ``corrupt-raster``, ``missing-crs``, ``wrong-band-count``
            (bands unnamed, missing, doubled or unknown), ``missing-metadata`` (no date).
    """
    with open_raster(path, product_id) as ds:
        descriptions = [d.strip() if d else "" for d in ds.descriptions]
        named = [canonical_band(d) or ("SCL" if d.upper() == "SCL" else None) for d in descriptions]
        if not any(named) and ds.count < len(CANONICAL_BANDS):
            return None
        tags = {k.lower(): v for k, v in ds.tags().items()}
        footprint = dataset_footprint(ds, product_id)
    unknown = [
        d or f"band {i}"
        for i, (d, n) in enumerate(zip(descriptions, named, strict=True), 1)
        if not n
    ]
    if unknown:
        raise SceneRejectedError(
            reasons.WRONG_BAND_COUNT,
            f"{product_id}: {len(unknown)} of {len(named)} bands not named as Sentinel-2 bands"
            f" ({', '.join(unknown[:4])})",
        )
    doubled = sorted({n for n in named if n and named.count(n) > 1})
    if doubled:
        raise SceneRejectedError(
            reasons.WRONG_BAND_COUNT, f"{product_id}: bands named twice: {', '.join(doubled)}"
        )
    missing = [b for b in CANONICAL_BANDS if b not in named]
    if missing:
        raise SceneRejectedError(
            reasons.WRONG_BAND_COUNT, f"{product_id}: no band {', '.join(missing)} in {path.name}"
        )
    acquired_at = next(
        (when for k in _DATE_TAGS if k in tags and (when := parse_when(tags[k]))), None
    ) or date_from_name(path.stem)
    if acquired_at is None:
        raise SceneRejectedError(
            reasons.MISSING_METADATA,
            f"{product_id}: no acquisition date (no ACQUISITIONDATE/datetime tag,"
            f" no YYYYMMDD in {path.name})",
        )
    offset = next((int(v) for k in _OFFSET_TAGS if (v := _number(tags.get(k))) is not None), 0)
    index = {n: i for i, n in enumerate(named, 1) if n}
    level_tag = (tags.get("processing_level", "") + tags.get("level", "")).upper()
    level: Level | None = (
        "L2A"
        if "2A" in level_tag
        else "L1C"
        if "1C" in level_tag
        else _level_from_names([path.name])
    )
    tile = _TILE.search(path.stem)
    return Product(
        kind="multiband",
        path=path,
        product_id=product_id,
        acquired_at=acquired_at,
        footprint=footprint,
        bands={b: BandFile(path, index[b], offset) for b in CANONICAL_BANDS},
        tile_id=tags.get("tile_id") or (tile.group(1) if tile else None),
        level=level,
        processing_baseline=tags.get("processing_baseline"),
        cloud_mask=CloudMask("scl", BandFile(path, index["SCL"])) if "SCL" in index else None,
    )
