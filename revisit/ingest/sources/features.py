"""What the Sentinel Hub and STAC sources share: reading a STAC feature's footprint.

Both catalogs answer STAC items (Sentinel Hub's Catalog API is a STAC API), so
a footprint that is not a polygon is rejected the same way by both.
"""

from __future__ import annotations

from collections.abc import Mapping

from shapely import make_valid
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry

from revisit.ingest import reasons
from revisit.ingest.sources.base import OnRejected

MAX_DETAIL = 200


def short(text: str, limit: int = MAX_DETAIL) -> str:
    """``text`` on one line, cut to ``limit`` characters for a quarantine detail."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def feature_footprint(
    feature: Mapping[str, object], ref: str, on_rejected: OnRejected
) -> BaseGeometry | None:
    """A STAC feature's geometry as a valid (Multi)Polygon, or None after ``on_rejected``."""
    try:
        footprint = shape(feature["geometry"])
    except Exception as exc:  # shapely raises many types for bad GeoJSON
        on_rejected(
            ref,
            reasons.BAD_REPLY,
            short(f"{ref}: geometry is not GeoJSON ({type(exc).__name__})"),
        )
        return None
    if not footprint.is_valid:
        footprint = make_valid(footprint)
    if footprint.is_empty or footprint.geom_type not in ("Polygon", "MultiPolygon"):
        on_rejected(
            ref, reasons.BAD_REPLY, f"{ref}: footprint is not a polygon ({footprint.geom_type})"
        )
        return None
    return footprint
