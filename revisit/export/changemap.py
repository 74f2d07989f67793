"""Change maps (DESIGN §5): the change estimates of a bbox or an AOI as files.

Three formats, each written to a temporary name in the target directory,
fsynced and renamed into place:

- GeoJSON (RFC 7946): one Feature per location, its chip footprint in lon/lat
  with counter-clockwise exterior rings, at most 7 decimals, no ``crs``;
- a Cloud-Optimized GeoTIFF of r (``ratio_ema``), float32 on a regular
  EPSG:4326 grid, NaN where no location has an estimate (see :func:`grid_change`
  for how the grid is chosen), checked with ``rio_cogeo.cogeo.cog_validate``
  before it is published;
- a PNG quicklook of the same grid with a labelled colour bar.

:func:`export_change_map` ties them to the database: it reads the rows in one
read-only transaction, writes the file and records an ``artifact`` row.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from datetime import date as Date
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

import matplotlib
import numpy as np
import numpy.typing as npt
import rasterio
import rasterio.errors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rasterio.io import MemoryFile
from rasterio.transform import Affine
from rio_cogeo.cogeo import cog_translate, cog_validate
from rio_cogeo.profiles import cog_profiles

from revisit.config import Settings
from revisit.db.artifacts import insert_artifact
from revisit.db.changemaps import BBox, ChangeMapRows, change_map_rows, validate_bbox
from revisit.errors import ExportError
from revisit.fsutil import fsync_dir, temp_name

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)

Format = Literal["geojson", "cog", "png"]
FORMATS: tuple[Format, ...] = ("geojson", "cog", "png")
ARTIFACT_KIND: dict[Format, str] = {
    "geojson": "changemap-geojson",
    "cog": "changemap-cog",
    "png": "quicklook",
}

NODATA = float("nan")
"""The COG's nodata value: cells where no location has an estimate are NaN."""

MAX_GRID_CELLS = 25_000_000
"""A grid larger than this is refused (100 MB of float32): ask for a coarser resolution."""

BAND_DESCRIPTION = "ratio_ema"
VALUES_MEANING = (
    "r (ratio_ema): the moving average of the change ratio R = |f(q) - f(k_lt)| /"
    " (|f(q) - f(k+)| + 1e-4) of revisit's learner; dimensionless, higher means more change"
    " between the long-term and the recent images. Each cell holds the mean r of the"
    " locations whose centre lies in it; NaN (nodata) where no location has an estimate."
)
_TMP_SUFFIX = ".tmp"


@dataclass(frozen=True, eq=False)
class ChangeGrid:
    """r on a regular lon/lat grid, north up.

    Attributes:
        values: (height, width) float32, the mean r of the locations in each
            cell; NaN where there is none.
        counts: (height, width) how many locations each cell holds.
        west, north: The grid's top-left corner, degrees.
        xres, yres: Cell width and height, degrees.
    """

    values: npt.NDArray[np.float32]
    counts: npt.NDArray[np.int64]
    west: float
    north: float
    xres: float
    yres: float

    @property
    def height(self) -> int:
        return int(self.values.shape[0])

    @property
    def width(self) -> int:
        return int(self.values.shape[1])

    @property
    def bounds(self) -> BBox:
        """(west, south, east, north) of the whole grid."""
        return (
            self.west,
            self.north - self.height * self.yres,
            self.west + self.width * self.xres,
            self.north,
        )

    @property
    def transform(self) -> Affine:
        return Affine(self.xres, 0.0, self.west, 0.0, -self.yres, self.north)

    @property
    def cells_with_data(self) -> int:
        return int(np.count_nonzero(self.counts))


@dataclass(frozen=True)
class WrittenFile:
    """A file a writer published."""

    path: Path
    sha256: str
    size_bytes: int
    grid: ChangeGrid | None = None


@dataclass(frozen=True)
class ExportedMap:
    """A published change map and its ``artifact`` row.

    Attributes:
        path: The file.
        kind: The artifact kind (``changemap-geojson``, ``changemap-cog``, ``quicklook``).
        sha256: Its hex digest.
        size_bytes: Its size.
        artifact_id: The ``artifact`` row recorded for it.
        model_version_id: The newest model version among the estimates, if any.
        bbox: The area selected: the bbox, or the AOI's bounds.
        counts: ``locations`` and ``changed``; for a grid also ``cells`` and
            ``cells_with_data``.
    """

    path: Path
    kind: str
    sha256: str
    size_bytes: int
    artifact_id: int
    model_version_id: int | None
    bbox: BBox
    counts: dict[str, int] = field(default_factory=dict)


# -- atomic files -----------------------------------------------------------------------------


def _publish(tmp: Path, path: Path) -> WrittenFile:
    """Flush ``tmp`` to disk, hash it and rename it to ``path``."""
    digest = hashlib.sha256()
    size = 0
    with tmp.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
        os.fsync(f.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)
    return WrittenFile(path=path, sha256=digest.hexdigest(), size_bytes=size)


@contextlib.contextmanager
def _temporary(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path``, removed if the block fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _write_atomically(path: Path, write: Callable[[IO[bytes]], object]) -> WrittenFile:
    """Call ``write(binary_file)`` on a temporary file, then publish it as ``path``."""
    try:
        with _temporary(path) as tmp:
            with tmp.open("wb") as f:
                write(f)
            return _publish(tmp, path)
    except OSError as exc:
        raise ExportError(f"could not write {path}: {exc}") from exc


# -- labels -----------------------------------------------------------------------------------


def _utc_iso(moment: datetime) -> str:
    """ISO 8601 in UTC with a ``Z``; a naive time is taken to be UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _model_label(rows: ChangeMapRows, model_version: str | None) -> str:
    if model_version is not None:
        return model_version
    newest = rows.newest_model_version
    return newest.label if newest is not None else "none"


def _where(rows: ChangeMapRows) -> str:
    if rows.aoi is not None:
        return f"AOI {rows.aoi!r}"
    return "bbox " + ",".join(f"{v:g}" for v in rows.area)


def _require_rows(rows: ChangeMapRows, what: str) -> None:
    if len(rows) == 0:
        raise ExportError(
            f"no location with a change estimate in {_where(rows)}: nothing to put in {what}"
        )


# -- GeoJSON ----------------------------------------------------------------------------------


def write_geojson(
    rows: ChangeMapRows,
    path: Path,
    *,
    model_version: str | None = None,
    created_at: datetime | None = None,
    include_bbox: bool = True,
) -> WrittenFile:
    """Write the rows as an RFC 7946 FeatureCollection.

    Each Feature has the location id as ``id``, its chip footprint (its centre
    where it has none) as geometry, and the properties ``location_id``,
    ``ratio_ema``, ``ratio_last``, ``changed``, ``updates`` and ``updated_at``
    (ISO 8601, UTC). The collection carries a ``bbox`` of every geometry (unless
    ``include_bbox`` is false or there are none) and, as a foreign member,
    ``revisit``: the model version, creation time and selection.

    Args:
        rows: From :func:`revisit.db.changemaps.change_map_rows`.
        path: Where to write; replaced atomically.
        model_version: How to name the model; the newest among the rows by default.
        created_at: When the map was made; now by default.
        include_bbox: Whether to write the top-level ``bbox``.

    Returns:
        The published file.

    Raises:
        ValueError: The rows were fetched without footprints.
        ExportError: The file could not be written.
    """
    footprint = rows.footprint
    if footprint is None:
        raise ValueError("GeoJSON needs the footprints: fetch the rows with footprints=True")
    created = created_at or datetime.now(UTC)
    newest = rows.newest_model_version
    about = {
        "model_version": _model_label(rows, model_version),
        "model_version_id": None if newest is None else newest.id,
        "method": None if newest is None else newest.method,
        "created_at": _utc_iso(created),
        "aoi": rows.aoi,
        "selection_bbox": list(rows.area),
        "locations": len(rows),
        "changed": rows.changed_count,
        "values": VALUES_MEANING,
    }
    head: dict[str, Any] = {"type": "FeatureCollection"}
    if include_bbox and rows.extent is not None:
        head["bbox"] = [round(v, 7) for v in rows.extent]
    head["revisit"] = about

    def write(f: IO[bytes]) -> None:
        # The geometries come from PostGIS as GeoJSON text: spliced in, not re-parsed.
        f.write(json.dumps(head)[:-1].encode() + b', "features": [')
        for i in range(len(rows)):
            properties = {
                "location_id": int(rows.location_id[i]),
                "ratio_ema": float(rows.ratio_ema[i]),
                "ratio_last": float(rows.ratio_last[i]),
                "changed": bool(rows.changed[i]),
                "updates": int(rows.updates[i]),
                "updated_at": _utc_iso(rows.updated_at[i]),
            }
            feature = (
                f'{"," if i else ""}\n{{"type": "Feature", "id": {properties["location_id"]},'
                f' "geometry": {footprint[i]}, "properties": {json.dumps(properties)}}}'
            )
            f.write(feature.encode())
        f.write(b"\n]}\n")

    return _write_atomically(path, write)


# -- the grid ---------------------------------------------------------------------------------


def cell_size(
    rows: ChangeMapRows, *, bbox: BBox, resolution_deg: float | None = None
) -> tuple[float, float]:
    """The (width, height) of a grid cell in degrees.

    With ``resolution_deg`` the cells are that many degrees on each side.
    Otherwise they follow the locations: the median distance from each
    location to its nearest neighbour, measured on the ground (longitudes
    scaled by the cosine of the mean latitude) in degrees of latitude, is the
    cell height, and the width is that divided by the cosine, so that a cell is
    about square on the ground and a regular layout of locations puts about one
    in each cell. With fewer than two distinct locations, the footprint
    extent's height is used, or 1/256 of the bbox's height.

    Raises:
        ValueError: ``resolution_deg`` is not a positive number.
    """
    if resolution_deg is not None:
        if not (math.isfinite(resolution_deg) and resolution_deg > 0):
            raise ValueError(f"resolution_deg must be a positive number, not {resolution_deg}")
        return float(resolution_deg), float(resolution_deg)
    lat0 = float(np.mean(rows.lat)) if len(rows) else (bbox[1] + bbox[3]) / 2
    shrink = max(math.cos(math.radians(lat0)), 0.01)
    points = np.unique(np.column_stack([rows.lon * shrink, rows.lat]), axis=0)
    if len(points) >= 2:
        # Imported here: scikit-learn costs a second or two to import, and pair maps (which
        # import this module for its COG writer) never come this way.
        from sklearn.neighbors import NearestNeighbors

        distances, _ = NearestNeighbors(n_neighbors=2).fit(points).kneighbors(points)
        spacing = float(np.median(distances[:, 1]))
    elif rows.extent is not None and rows.extent[3] > rows.extent[1]:
        spacing = rows.extent[3] - rows.extent[1]
    else:
        spacing = (bbox[3] - bbox[1]) / 256
    return spacing / shrink, spacing


def grid_change(
    rows: ChangeMapRows, *, bbox: BBox, resolution_deg: float | None = None
) -> ChangeGrid:
    """Put r on a regular lon/lat grid covering ``bbox``.

    The grid starts at the bbox's north-west corner and has as many cells of
    :func:`cell_size` as it takes to cover the bbox (so its east and south
    edges may lie up to one cell beyond). Each cell holds the mean r of the
    locations whose centre falls in it (a centre on an edge between cells goes
    east and south, except on the grid's own east and south edges), NaN where
    there is none; locations outside the bbox are left out.

    Raises:
        ValueError: An invalid bbox or resolution.
        ExportError: The grid would have more than :data:`MAX_GRID_CELLS` cells.
    """
    west, south, east, north = validate_bbox(bbox)
    xres, yres = cell_size(rows, bbox=(west, south, east, north), resolution_deg=resolution_deg)
    # The small tolerance keeps a float rounding error from adding a column of nothing.
    width = max(1, math.ceil((east - west) / xres - 1e-9))
    height = max(1, math.ceil((north - south) / yres - 1e-9))
    if width * height > MAX_GRID_CELLS:
        raise ExportError(
            f"a grid of {width}x{height} cells of {xres:.6g}x{yres:.6g} degrees over"
            f" {_where(rows)} is too large (more than {MAX_GRID_CELLS} cells):"
            " set a coarser resolution (export.cog_resolution_deg)"
        )
    inside = (rows.lon >= west) & (rows.lon <= east) & (rows.lat >= south) & (rows.lat <= north)
    col = np.clip(np.floor((rows.lon[inside] - west) / xres).astype(np.int64), 0, width - 1)
    row = np.clip(np.floor((north - rows.lat[inside]) / yres).astype(np.int64), 0, height - 1)
    flat = row * width + col
    counts = np.bincount(flat, minlength=width * height)
    sums = np.bincount(flat, weights=rows.ratio_ema[inside], minlength=width * height)
    values = np.full(width * height, np.nan, dtype=np.float32)
    has = counts > 0
    values[has] = (sums[has] / counts[has]).astype(np.float32)
    return ChangeGrid(
        values=values.reshape(height, width),
        counts=counts.reshape(height, width).astype(np.int64),
        west=west,
        north=north,
        xres=xres,
        yres=yres,
    )


# -- COG --------------------------------------------------------------------------------------


def translate_to_cog(
    source: Any, target: Path, profile: Mapping[str, Any], *, what: str, **options: Any
) -> None:
    """``rio_cogeo``'s ``cog_translate`` of an open dataset to ``target``, then validated.

    Args:
        source: An open rasterio dataset.
        target: The file to write (a temporary name; the caller publishes it).
        profile: The COG creation profile.
        what: How to name the file in the error.
        options: More ``cog_translate`` arguments (``overview_resampling``,
            ``in_memory``, ``nodata``, ...); ``forward_band_tags`` is always on.

    Raises:
        ExportError: The result is not a valid COG.
    """
    cog_translate(source, str(target), dict(profile), forward_band_tags=True, quiet=True, **options)
    valid, errors, _warnings = cog_validate(str(target), quiet=True)
    if not valid:
        raise ExportError(f"{what} is not a valid COG: {'; '.join(errors)}")


def write_float_cog(
    values: npt.NDArray[np.float32],
    path: Path,
    *,
    crs: Any,
    transform: Any,
    description: str,
    units: str,
    tags: Mapping[str, str],
) -> WrittenFile:
    """Write one float32 band (NaN nodata) as a deflate COG, validated, atomically.

    Raises:
        ExportError: The file could not be written or is not a valid COG.
    """
    height, width = values.shape
    source_profile = {
        "driver": "GTiff",
        "dtype": "float32",
        "count": 1,
        "width": width,
        "height": height,
        "crs": crs,
        "transform": transform,
        "nodata": NODATA,
    }
    cog_profile: dict[str, Any] = dict(cog_profiles["deflate"])
    cog_profile.update(predictor=3)  # floating-point predictor: the values are smooth
    try:
        with _temporary(path) as tmp:
            with MemoryFile() as memory:
                with memory.open(**source_profile) as dataset:
                    dataset.write(values, 1)
                    dataset.set_band_description(1, description)
                    dataset.update_tags(**tags)
                    dataset.update_tags(1, name=description, units=units)
                with memory.open() as dataset:
                    translate_to_cog(
                        dataset,
                        tmp,
                        cog_profile,
                        what=str(path),
                        overview_resampling="average",
                        in_memory=True,
                    )
            return _publish(tmp, path)
    except (OSError, rasterio.errors.RasterioError) as exc:
        raise ExportError(f"could not write the COG {path}: {exc}") from exc


def write_cog(
    rows: ChangeMapRows,
    path: Path,
    *,
    bbox: BBox,
    resolution_deg: float | None = None,
    model_version: str | None = None,
    method: str | None = None,
    created_at: datetime | None = None,
) -> WrittenFile:
    """Write r as a float32 Cloud-Optimized GeoTIFF (EPSG:4326, deflate, NaN nodata).

    The grid is :func:`grid_change`'s. The band is described ``ratio_ema``;
    the dataset's tags say what the values mean (``values``), the model
    version, its method, when the map was made and what was selected.

    Args:
        rows: From :func:`revisit.db.changemaps.change_map_rows`.
        path: Where to write; replaced atomically.
        bbox: (west, south, east, north) the grid covers.
        resolution_deg: Cell size in degrees; the locations' spacing by default.
        model_version: How to name the model; the newest among the rows by default.
        method: The learner's method; the newest model version's by default.
        created_at: When the map was made; now by default.

    Returns:
        The published file, with its grid.

    Raises:
        ExportError: No rows, a grid too large, or the file could not be
            written or is not a valid COG.
    """
    _require_rows(rows, "a COG")
    grid = grid_change(rows, bbox=bbox, resolution_deg=resolution_deg)
    newest = rows.newest_model_version
    tags = {
        "values": VALUES_MEANING,
        "model_version": _model_label(rows, model_version),
        "model_version_id": "" if newest is None else str(newest.id),
        "method": method or (newest.method if newest is not None else "unknown"),
        "created_at": _utc_iso(created_at or datetime.now(UTC)),
        "selection": _where(rows),
        "locations": str(len(rows)),
        "changed": str(rows.changed_count),
        "nodata": "NaN: no location with an estimate in the cell",
    }
    written = write_float_cog(
        grid.values,
        path,
        crs="EPSG:4326",
        transform=grid.transform,
        description=BAND_DESCRIPTION,
        units="dimensionless ratio",
        tags=tags,
    )
    return WrittenFile(written.path, written.sha256, written.size_bytes, grid)


# -- PNG quicklook ----------------------------------------------------------------------------


def write_quicklook(
    rows: ChangeMapRows,
    path: Path,
    *,
    bbox: BBox | None = None,
    resolution_deg: float | None = None,
    title: str | None = None,
    model_version: str | None = None,
    date: Date | None = None,
    dpi: int = 120,
) -> WrittenFile:
    """Draw r on its grid as a PNG, with a labelled colour bar, the model and the date.

    Cells without an estimate are light grey; changed locations are circled in
    red. The figure is a :class:`matplotlib.figure.Figure` on the Agg canvas:
    no pyplot, no global state.

    Args:
        rows: From :func:`revisit.db.changemaps.change_map_rows`.
        path: Where to write; replaced atomically.
        bbox: The area drawn; the selection's by default.
        resolution_deg: Cell size in degrees; the locations' spacing by default.
        title: The title; names the AOI or bbox by default.
        model_version: How to name the model; the newest among the rows by default.
        date: The date shown; today (UTC) by default.
        dpi: Resolution of the PNG.

    Returns:
        The published file, with its grid.

    Raises:
        ExportError: No rows, a grid too large, or the file could not be written.
    """
    _require_rows(rows, "a quicklook")
    grid = grid_change(rows, bbox=bbox or rows.area, resolution_deg=resolution_deg)
    west, south, east, north = grid.bounds
    shown = date or datetime.now(UTC).date()
    finite = grid.values[np.isfinite(grid.values)]
    if finite.size == 0:
        raise ExportError(f"no location of {_where(rows)} lies inside the bbox {grid.bounds}")
    vmin, vmax = (float(v) for v in np.percentile(finite, [2, 98]))
    if vmax <= vmin:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    aspect = 1 / max(math.cos(math.radians((south + north) / 2)), 0.01)
    ground_ratio = (north - south) * aspect / (east - west)
    map_width_in = 6.5  # the colour bar and labels take the rest of the 8 inches
    height_in = min(max(map_width_in * ground_ratio, 2.5), 14.0) + 1.3

    figure = Figure(figsize=(8.0, height_in), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")
    image = ax.imshow(
        np.ma.masked_invalid(grid.values),
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        extent=(west, east, south, north),
        origin="upper",
        interpolation="nearest",
    )
    ax.set_aspect(aspect)
    changed = rows.changed
    if 0 < int(np.count_nonzero(changed)) <= 5000:
        ax.scatter(
            rows.lon[changed],
            rows.lat[changed],
            s=14,
            facecolors="none",
            edgecolors="red",
            linewidths=0.8,
            label="changed",
        )
        ax.legend(loc="lower right", fontsize="small")
    ax.set_xlim(west, east)
    ax.set_ylim(south, north)
    ax.set_xlabel("longitude (°)")
    ax.set_ylabel("latitude (°)")
    # Arrows on the colour bar where the 2-98 % stretch clips values.
    low, high = bool(finite.min() < vmin), bool(finite.max() > vmax)
    extend: Literal["neither", "both", "min", "max"] = (
        "both" if low and high else "min" if low else "max" if high else "neither"
    )
    figure.colorbar(
        image, ax=ax, shrink=0.9, extend=extend, label="r = ratio_ema (higher: more change)"
    )
    ax.set_title(title or f"Change map: {_where(rows)}")
    figure.suptitle(
        f"model {_model_label(rows, model_version)}  ·  {shown.isoformat()}  ·"
        f"  {len(rows)} locations, {rows.changed_count} changed  ·  grey: no estimate",
        fontsize="small",
    )
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    data = buffer.getvalue()
    written = _write_atomically(path, lambda f: f.write(data))
    return WrittenFile(written.path, written.sha256, written.size_bytes, grid)


# -- export -----------------------------------------------------------------------------------


def _artifact_path(path: Path, data_dir: Path) -> str:
    """Data-dir relative where the file is inside the data directory, else absolute."""
    absolute = path.absolute()
    try:
        return absolute.relative_to(data_dir.absolute()).as_posix()
    except ValueError:
        return str(absolute)


def export_change_map(
    *,
    engine: Engine,
    settings: Settings,
    fmt: Format,
    out: Path,
    bbox: tuple[float, float, float, float] | None = None,
    aoi: str | None = None,
) -> ExportedMap:
    """Export the change estimates of a bbox or an AOI as a file, and record it.

    The rows are read in one read-only REPEATABLE READ transaction; the file
    is written atomically; then an ``artifact`` row is added (kind
    ``changemap-geojson``, ``changemap-cog`` or ``quicklook``) with the file's
    sha256 and size, the selected area as bbox, the newest model version among
    the estimates, and the format, AOI and counts as metadata. If the row
    cannot be added the file is removed again.

    Args:
        engine: The database.
        settings: ``export.cog_resolution_deg`` sets the grid of COGs and
            quicklooks; ``data_dir`` makes artifact paths relative.
        fmt: ``geojson``, ``cog`` or ``png``.
        out: The file to write.
        bbox: (west, south, east, north) in degrees.
        aoi: The name of an AOI.

    Returns:
        The file, its hash, its artifact row and its counts.

    Raises:
        ValueError: An unknown format, an invalid bbox, or both or neither of
            bbox and aoi.
        AoiNotFoundError: No AOI has that name.
        ExportError: No location with an estimate in the selection, or the
            file could not be written.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
    with engine.connect() as conn:
        conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        with conn.begin():
            rows = change_map_rows(conn, bbox=bbox, aoi=aoi, footprints=fmt == "geojson")
    _require_rows(rows, f"a {fmt} change map")
    created = datetime.now(UTC)
    newest = rows.newest_model_version
    resolution = settings.export.cog_resolution_deg
    if fmt == "geojson":
        written = write_geojson(rows, out, created_at=created)
    elif fmt == "cog":
        written = write_cog(
            rows, out, bbox=rows.area, resolution_deg=resolution, created_at=created
        )
    else:
        written = write_quicklook(rows, out, resolution_deg=resolution, date=created.date())
    counts = {"locations": len(rows), "changed": rows.changed_count}
    metadata: dict[str, Any] = {
        "format": fmt,
        "aoi": rows.aoi,
        "selection_bbox": list(rows.area),
        "created_at": _utc_iso(created),
        "model_versions": sorted(rows.model_versions),
        "method": None if newest is None else newest.method,
    }
    if written.grid is not None:
        grid = written.grid
        counts.update(cells=grid.width * grid.height, cells_with_data=grid.cells_with_data)
        metadata.update(
            width=grid.width,
            height=grid.height,
            resolution_deg=[grid.xres, grid.yres],
            grid_bounds=list(grid.bounds),
        )
    metadata["counts"] = counts
    kind = ARTIFACT_KIND[fmt]
    try:
        with engine.begin() as conn:
            artifact_id = insert_artifact(
                conn,
                kind=kind,
                path=_artifact_path(written.path, settings.data_dir),
                sha256=written.sha256,
                size_bytes=written.size_bytes,
                model_version_id=None if newest is None else newest.id,
                bbox=rows.area,
                metadata=metadata,
            )
    except BaseException:
        with contextlib.suppress(OSError):
            written.path.unlink()
        raise
    log.info(
        "exported change map",
        extra={
            "artifact_id": artifact_id,
            "kind": kind,
            "path": str(written.path),
            "locations": counts["locations"],
            "selection": _where(rows),
        },
    )
    return ExportedMap(
        path=written.path,
        kind=kind,
        sha256=written.sha256,
        size_bytes=written.size_bytes,
        artifact_id=artifact_id,
        model_version_id=None if newest is None else newest.id,
        bbox=rows.area,
        counts=counts,
    )
