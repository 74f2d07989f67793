"""Cutting one location's chip out of a product's open files: the heart of ``read``.

Per location: the chip's bounds in each source CRS, the window of each file
that covers them, one warp per group of bands sharing a source grid, then the
validity and cloud masks. Runs under :func:`~revisit.ingest.sources.rasters.gdal_env`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import RasterioError
from rasterio.windows import Window

from revisit.errors import SceneRejectedError
from revisit.ingest import reasons
from revisit.ingest.cloud import (
    classi_cloud_mask,
    cloud_fraction,
    scl_cloud_mask,
    scl_nodata_mask,
    valid_fraction,
)
from revisit.ingest.sources.rasters import (
    Product,
    chip_bounds,
    chip_window,
    dn_of,
    one_line,
    read_window,
    to_dn,
    warp_class_array,
    warp_dn,
)
from revisit.types import CANONICAL_BANDS, Chip, LocationRef, Rejection


class ReadFailedError(SceneRejectedError):
    """A read of one of the product's files failed: ``corrupt-raster``, naming the file.

    Attributes:
        path: The file (as the product names it).
        cause: GDAL's error, for a source that can tell a bad file from a failed
            request (the STAC source asks the server).
    """

    def __init__(self, detail: str, *, path: Path, cause: RasterioError) -> None:
        super().__init__(reasons.CORRUPT_RASTER, detail)
        self.path = path
        self.cause = cause


class OpenRaster(NamedTuple):
    """An open file of a product, with the CRS and transform to read it by."""

    ds: Any
    crs: CRS
    transform: Affine
    crs_key: str


class ChipCutter:
    """Cuts one location's chip out of a product's open files."""

    def __init__(
        self, product: Product, opened: Mapping[Path, OpenRaster], location: LocationRef
    ) -> None:
        self.product = product
        self.opened = opened
        self.location = location
        self.grid = location.grid
        self._bounds: dict[str, tuple[float, float, float, float]] = {}
        self._windows: dict[Path, Window | None] = {}

    def window(self, path: Path) -> Window | None:
        """The window of ``path`` that covers the chip (None: the chip is off that raster)."""
        if path not in self._windows:
            ds, crs, transform, key = self.opened[path]
            if key not in self._bounds:
                self._bounds[key] = chip_bounds(crs, self.grid)
            self._windows[path] = chip_window(ds.width, ds.height, transform, self._bounds[key])
        return self._windows[path]

    def read_raw(self, path: Path, index: int, window: Window) -> npt.NDArray[Any]:
        """One band's window as stored; a subclass may have read it ahead of time.

        Raises:
            RasterioError: The read failed.
        """
        return read_window(self.opened[path].ds, index, window)

    def read_dn(self, path: Path, index: int, window: Window) -> npt.NDArray[np.float32]:
        """One band's window as float32 DN, NaN where the file has no data.

        Raises:
            RasterioError: The read failed.
        """
        return dn_of(self.read_raw(path, index, window), self.opened[path].ds.nodata)

    def _fail(self, path: Path, exc: RasterioError) -> ReadFailedError:
        return ReadFailedError(
            f"{self.product.product_id}: {path.name}: {one_line(exc)}", path=path, cause=exc
        )

    def cut(self) -> Chip | Rejection:
        """The chip, or a ``not-covered`` Rejection.

        Raises:
            SceneRejectedError: ``corrupt-raster``, a read failed.
        """
        product, grid, loc = self.product, self.grid, self.location
        where = f"{product.product_id}: location {loc.id} at ({loc.lon:.5f}, {loc.lat:.5f})"
        if not grid.footprint_lonlat().intersects(product.footprint):
            return Rejection(loc.id, reasons.NOT_COVERED, f"{where} is outside its footprint")
        size = grid.size
        data = np.zeros((len(CANONICAL_BANDS), size, size), dtype=np.uint16)
        valid = np.ones((size, size), dtype=bool)
        # Bands on the same source grid (CRS, transform, window) are warped together.
        groups: dict[tuple[Any, ...], tuple[Window, list[int]]] = {}
        for i, name in enumerate(CANONICAL_BANDS):
            path = product.bands[name].path
            win = self.window(path)
            if win is None:
                if i == 0:
                    return Rejection(loc.id, reasons.NOT_COVERED, f"{where} is outside its raster")
                valid[:] = False
                continue
            _, _, transform, key = self.opened[path]
            groups.setdefault((key, tuple(transform), win.flatten()), (win, []))[1].append(i)
        for win, members in groups.values():
            files = [product.bands[CANONICAL_BANDS[i]] for i in members]
            first = self.opened[files[0].path]
            stack = []
            for file in files:
                try:
                    stack.append(self.read_dn(file.path, file.index, win))
                except RasterioError as exc:
                    raise self._fail(file.path, exc) from None
            warped = warp_dn(np.stack(stack), first.crs, first.transform, win, grid)
            for i, file, band in zip(members, files, warped, strict=True):
                valid &= ~np.isnan(band)
                data[i] = to_dn(band, file.offset)
        cloud = self._cloud(valid)
        data[:, ~valid] = 0
        return Chip(
            location_id=loc.id,
            data=data,
            valid_fraction=valid_fraction(valid),
            cloud_fraction=cloud_fraction(cloud, valid),
            grid=grid,
        )

    def _cloud(self, valid: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
        """The chip's cloud mask; narrows ``valid`` where an SCL says no data."""
        mask = self.product.cloud_mask
        win = self.window(mask.file.path) if mask is not None else None
        if mask is None or win is None:
            return np.zeros_like(valid)
        path = mask.file.path
        _, crs, transform, _ = self.opened[path]

        def classes(index: int) -> npt.NDArray[np.uint8]:
            raw = self.read_raw(path, index, win)
            return warp_class_array(raw, crs, transform, win, self.grid)

        try:
            if mask.kind == "scl":
                scl = classes(mask.file.index)
                valid &= ~scl_nodata_mask(scl)
                return scl_cloud_mask(scl)
            opaque, cirrus = classes(1), classes(2)
        except RasterioError as exc:
            raise self._fail(mask.file.path, exc) from None
        return classi_cloud_mask(opaque, cirrus)
