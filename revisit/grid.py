"""Chip grids: the 10 m UTM pixel grid each location's chip lies on.

Pure: coordinates in, coordinates out, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import shapely
from affine import Affine
from pyproj import Transformer
from shapely.geometry import Polygon, box

RESOLUTION_M = 10.0


def utm_epsg(lon: float, lat: float) -> int:
    """EPSG code of the UTM zone of a point (WGS 84; 326xx north, 327xx south).

    Raises:
        ValueError: The point is not a valid longitude/latitude.
    """
    if not (-180.0 <= lon <= 180.0 and -90.0 <= lat <= 90.0):
        raise ValueError(f"not a longitude/latitude: ({lon}, {lat})")
    zone = min(int((lon + 180.0) // 6.0) + 1, 60)
    return (32600 if lat >= 0 else 32700) + zone


@lru_cache(maxsize=256)
def _to_utm(epsg: int) -> Transformer:
    return Transformer.from_crs(4326, epsg, always_xy=True)


@lru_cache(maxsize=256)
def _to_lonlat(epsg: int) -> Transformer:
    return Transformer.from_crs(epsg, 4326, always_xy=True)


@dataclass(frozen=True)
class ChipGrid:
    """A square pixel grid in a UTM CRS.

    Attributes:
        epsg: The UTM zone's EPSG code.
        minx, maxy: The top-left corner in metres (pixel edges, multiples of the resolution).
        size: Pixels per side.
        resolution: Metres per pixel.
    """

    epsg: int
    minx: float
    maxy: float
    size: int
    resolution: float = RESOLUTION_M

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(minx, miny, maxx, maxy) in the grid's CRS."""
        extent = self.size * self.resolution
        return (self.minx, self.maxy - extent, self.minx + extent, self.maxy)

    @property
    def transform(self) -> Affine:
        """The affine transform from pixel (col, row) to the grid's CRS, as rasterio wants it."""
        return Affine(self.resolution, 0.0, self.minx, 0.0, -self.resolution, self.maxy)

    @property
    def crs(self) -> str:
        return f"EPSG:{self.epsg}"

    def footprint_lonlat(self) -> Polygon:
        """The chip's outline in lon/lat (densified edges, counter-clockwise)."""
        outline = box(*self.bounds).segmentize(self.size * self.resolution / 8)
        return shapely.transform(outline, _to_lonlat(self.epsg).transform, interleaved=False)


def chip_grid_for(
    lon: float, lat: float, *, size: int = 64, resolution: float = RESOLUTION_M
) -> ChipGrid:
    """The chip grid centred (to the nearest pixel edge) on a point, in its UTM zone.

    Args:
        lon, lat: The location, degrees.
        size: Pixels per side (64 by default).
        resolution: Metres per pixel (10 by default).

    Raises:
        ValueError: The point is not a valid longitude/latitude, or size < 1.
    """
    if size < 1:
        raise ValueError(f"chip size must be at least 1 pixel, not {size}")
    epsg = utm_epsg(lon, lat)
    x, y = _to_utm(epsg).transform(lon, lat)
    half = size * resolution / 2
    minx = math.floor((x - half) / resolution + 0.5) * resolution
    maxy = math.floor((y + half) / resolution + 0.5) * resolution
    return ChipGrid(epsg=epsg, minx=minx, maxy=maxy, size=size, resolution=resolution)
