"""The ``local`` source: Sentinel-2 products in a directory on disk, read with rasterio.

Three kinds of product are recognised anywhere under the root:

- SAFE folders (``*.SAFE``, L1C and L2A; see :mod:`revisit.ingest.sources.safe`);
- band folders, one GeoTIFF per band as in the OSCD data set, and
- multi-band GeoTIFFs/COGs with named bands (both in
  :mod:`revisit.ingest.sources.geotiff`).

Chips are cut by reading, from each band file, only the window that covers the
chip and warping it onto the location's 10 m UTM grid (bilinear for
reflectance, nearest for class layers). Every file of a scene is opened once
per :meth:`LocalSource.read`, for all its locations.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rasterio.errors import RasterioError
from shapely.geometry.base import BaseGeometry
from shapely.ops import unary_union

from revisit.errors import ConfigError, SceneRejectedError, SourceUnavailableError
from revisit.ingest import reasons
from revisit.ingest.sources.base import OnRejected, SceneSource
from revisit.ingest.sources.cutter import ChipCutter, OpenRaster
from revisit.ingest.sources.geotiff import (
    BAND_FILE,
    TIFF_SUFFIXES,
    describe_band_folder,
    describe_multiband,
    group_band_files,
)
from revisit.ingest.sources.rasters import (
    BandFile,
    CloudMask,
    Product,
    gdal_env,
    georef,
    one_line,
    open_raster,
    verify_product,
)
from revisit.ingest.sources.safe import MTD_NAMES, describe_safe, safe_product_id
from revisit.types import CANONICAL_BANDS, Chip, LocationRef, Rejection, SceneRef

if TYPE_CHECKING:
    from revisit.config import Settings

log = logging.getLogger(__name__)


def _is_safe(path: Path) -> bool:
    return path.name.upper().endswith(".SAFE")


def _utc(when: datetime) -> datetime:
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


class LocalSource(SceneSource):
    """Sentinel-2 products under a directory (or one product given directly).

    Args:
        root: The directory to search; a single SAFE folder or GeoTIFF works too.
    """

    name = "local"

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().absolute()

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalSource:
        """The source configured by ``settings.local.path``.

        Raises:
            ConfigError: ``local.path`` is not set.
        """
        if settings.local.path is None:
            raise ConfigError(
                "invalid setting local.path (REVISIT_LOCAL__PATH): not set; the local source"
                " needs a directory of Sentinel-2 products"
            )
        return cls(settings.local.path)

    # -- search ------------------------------------------------------------------------------

    def search(
        self,
        *,
        since: datetime | None,
        until: datetime,
        area: BaseGeometry,
        on_rejected: OnRejected,
    ) -> Iterator[SceneRef]:
        """Products under the root acquired in ``[since, until]`` that intersect ``area``.

        Products are described from their metadata first; only those in range
        have every file opened (and GeoTIFFs their last block read), so a
        corrupt file outside the range goes unreported.

        Raises:
            SourceUnavailableError: The root does not exist (an unmounted disk?).
        """
        if not self.root.exists():
            raise SourceUnavailableError(f"local source: {self.root} does not exist")
        until = _utc(until)
        since = _utc(since) if since is not None else None
        found: list[Product] = []
        for product in self.products(on_rejected):
            acquired_at = product.acquired_at
            if acquired_at > until or (since is not None and acquired_at < since):
                continue
            if not product.footprint.intersects(area):
                continue
            if self._attempt(product.product_id, on_rejected, verify_product, product) is None:
                continue
            found.append(product)
        found.sort(key=lambda p: (p.acquired_at, p.product_id))
        for product in found:
            yield self._scene_ref(product)

    def products(self, on_rejected: OnRejected) -> Iterator[Product]:
        """Every product under the root, described but not verified, in path order.

        Args:
            on_rejected: Called for each product found but unusable.
        """
        root = self.root
        if root.is_file():
            product = self._attempt(self._ref(root), on_rejected, self._describe_file, root)
            if product is not None:
                yield product
            return
        if _is_safe(root):
            yield from self._safe(root, on_rejected)
            return
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            dirnames.sort()
            for name in dirnames:
                if _is_safe(here / name):
                    yield from self._safe(here / name, on_rejected)
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and not _is_safe(here / d)]
            groups = group_band_files(here, filenames)
            for stem, files in groups.items():
                ref = self._ref(here) if len(groups) == 1 else f"{self._ref(here)}/{stem}"
                product = self._attempt(
                    ref, on_rejected, describe_band_folder, here, stem, files, ref
                )
                if product is not None:
                    yield product
            for name in sorted(filenames):
                if name.startswith(".") or BAND_FILE.match(name):
                    continue
                if name.lower().endswith(TIFF_SUFFIXES):
                    ref = self._ref(here / name)
                    product = self._attempt(ref, on_rejected, describe_multiband, here / name, ref)
                    if product is not None:
                        yield product

    def _safe(self, path: Path, on_rejected: OnRejected) -> Iterator[Product]:
        product = self._attempt(safe_product_id(path), on_rejected, describe_safe, path)
        if product is not None:
            yield product

    def _describe_file(self, path: Path) -> Product | None:
        return describe_multiband(path, self._ref(path))

    @staticmethod
    def _attempt(
        ref: str, on_rejected: OnRejected, func: Callable[..., Any], *args: Any
    ) -> Any | None:
        """``func(*args)``, or None after reporting a product problem to ``on_rejected``."""
        try:
            return func(*args)
        except SceneRejectedError as exc:
            reason, detail = exc.reason, exc.detail
        except RasterioError as exc:
            reason, detail = reasons.CORRUPT_RASTER, f"{ref}: {one_line(exc)}"
        except (OSError, ValueError) as exc:
            reason, detail = reasons.UNREADABLE, f"{ref}: {one_line(exc)}"
        log.info("local product rejected", extra={"ref": ref, "reason": reason, "detail": detail})
        on_rejected(ref, reason, detail)
        return None

    def _ref(self, path: Path) -> str:
        """A product's reference: its path relative to the root (the root's name for the root)."""
        rel = path.relative_to(self.root).as_posix()
        return path.name if rel == "." else rel

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _scene_ref(self, product: Product) -> SceneRef:
        def band(file: BandFile) -> dict[str, Any]:
            return {"file": self._rel(file.path), "index": file.index, "offset": file.offset}

        mask = product.cloud_mask
        extra: dict[str, Any] = {
            "kind": product.kind,
            "path": self._rel(product.path),
            "bands": {name: band(file) for name, file in product.bands.items()},
            "cloud_mask": {"kind": mask.kind, **band(mask.file)} if mask else None,
            "substitutions": dict(product.substitutions),
            "tile_crs": product.tile_crs,
            "tile_ul": list(product.tile_ul) if product.tile_ul else None,
        }
        return SceneRef(
            source=self.name,
            product_id=product.product_id,
            acquired_at=product.acquired_at,
            footprint=product.footprint,
            tile_id=product.tile_id,
            cloud_cover=product.cloud_cover,
            level=product.level,
            processing_baseline=product.processing_baseline,
            extra=extra,
        )

    def _product(self, scene: SceneRef) -> Product:
        """The product a scene's ``extra`` describes (paths relative to the root).

        Raises:
            SceneRejectedError: ``unreadable``, the scene was not found by this source.
        """
        extra: Mapping[str, Any] = scene.extra
        try:

            def band(spec: Mapping[str, Any]) -> BandFile:
                return BandFile(
                    self.root / spec["file"], int(spec["index"]), int(spec.get("offset", 0))
                )

            bands = {name: band(extra["bands"][name]) for name in CANONICAL_BANDS}
            mask = extra.get("cloud_mask")
            tile_ul = extra.get("tile_ul")
            return Product(
                kind=extra["kind"],
                path=self.root / extra["path"],
                product_id=scene.product_id,
                acquired_at=scene.acquired_at,
                footprint=scene.footprint,
                bands=bands,
                level=scene.level,
                cloud_mask=CloudMask(mask["kind"], band(mask)) if mask else None,
                tile_crs=extra.get("tile_crs"),
                tile_ul=(float(tile_ul[0]), float(tile_ul[1])) if tile_ul else None,
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise SceneRejectedError(
                reasons.UNREADABLE,
                f"{scene.product_id}: metadata does not describe a local product ({exc!r})",
            ) from None

    # -- read --------------------------------------------------------------------------------

    def read(self, scene: SceneRef, locations: Sequence[LocationRef]) -> Iterator[Chip | Rejection]:
        """The chips of ``locations`` in ``scene``, each warped onto its location's grid.

        Each file is opened once for all locations; per location, only the window
        covering its chip is read, and bands sharing a source grid are warped in
        one call. Chips hold uint16 DN with the product's offset added (clipped
        at 0); a pixel is valid where every band has data (DN neither 0 nor the
        file's nodata) and, with an SCL, where the SCL is not 0. Cloud fraction
        comes from the SCL of an L2A product (classes 3, 8, 9, 10), or from an
        L1C product's ``MSK_CLASSI_B00`` (opaque cloud or cirrus) when it has
        one; products with neither (older L1C SAFEs, whose cloud mask is GML;
        OSCD band folders; GeoTIFFs without an ``SCL`` band) get 0.0.

        Yields:
            A Chip, or a ``not-covered`` Rejection for a location whose chip lies
            outside the product's footprint or raster.

        Raises:
            SceneRejectedError: ``corrupt-raster`` (a file unreadable or truncated),
                ``missing-crs``, or ``unreadable`` (a file gone, or the scene is not
                a local product).
        """
        product = self._product(scene)
        with ExitStack() as stack:
            opened: dict[Path, OpenRaster] = {}
            files = [*product.bands.values()]
            if product.cloud_mask is not None:
                files.append(product.cloud_mask.file)
            for file in files:
                if file.path not in opened:
                    ds = stack.enter_context(open_raster(file.path, product.product_id))
                    crs, transform = georef(ds, product)
                    opened[file.path] = OpenRaster(ds, crs, transform, crs.to_wkt())
            order = sorted(
                locations, key=lambda loc: (loc.grid.epsg, -loc.grid.maxy, loc.grid.minx)
            )
            for location in order:
                try:
                    with gdal_env():
                        item = ChipCutter(product, opened, location).cut()
                except RasterioError as exc:
                    raise SceneRejectedError(
                        reasons.CORRUPT_RASTER, f"{product.product_id}: {one_line(exc)}"
                    ) from None
                yield item


def product_footprint(path: Path) -> BaseGeometry:
    """Where one product on disk has data, lon/lat: for ``revisit aoi add --footprint``.

    Args:
        path: A SAFE folder (or its MTD XML), a band folder (or one of its band
            files), or a multi-band GeoTIFF.

    Raises:
        SceneRejectedError: The product is unusable (a ValueError; reason and detail).
        ValueError: ``path`` is not a Sentinel-2 product.
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_file() and path.name in MTD_NAMES:
        path = path.parent
    if path.is_file() and BAND_FILE.match(path.name):
        path = path.parent
    if _is_safe(path):
        return describe_safe(path).footprint
    if path.is_dir():
        groups = group_band_files(path, os.listdir(path))
        if not groups:
            raise ValueError(f"{path}: neither a SAFE folder nor a folder of band files")
        return unary_union(
            [
                describe_band_folder(path, stem, files, f"{path.name}/{stem}").footprint
                for stem, files in groups.items()
            ]
        )
    product = describe_multiband(path, path.name)
    if product is None:
        raise ValueError(f"{path}: no band named like a Sentinel-2 band; not a product")
    return product.footprint
