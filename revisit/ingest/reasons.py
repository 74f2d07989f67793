"""The reasons input lands in ``quarantine``: one short code each, for SQL and metrics."""

from __future__ import annotations

CORRUPT_RASTER = "corrupt-raster"  # a truncated or unreadable TIFF/JP2
WRONG_BAND_COUNT = "wrong-band-count"  # bands missing, extra, or unnamed
MISSING_CRS = "missing-crs"  # a raster without a coordinate reference system
NOT_COVERED = "not-covered"  # the product's footprint does not cover the location
ALL_NODATA = "all-nodata"  # the chip holds no valid pixel (or too few)
FULLY_CLOUDY = "fully-cloudy"  # every valid pixel is cloud or shadow
DUPLICATE_PRODUCT = "duplicate-product"  # a second, different product with a known id
FUTURE_DATE = "future-date"  # acquired after now
MISSING_METADATA = "missing-metadata"  # a SAFE without its MTD_MSI*.xml, a product without a date
BAD_REPLY = "bad-reply"  # a server reply that is not what it claims (JSON, TIFF, shape)
UNREADABLE = "unreadable"  # anything else a reader could not make sense of
INGEST_FAILED = "ingest-failed"  # ingest.max_attempts tries of an ingest worker failed

REASONS: frozenset[str] = frozenset(
    {
        CORRUPT_RASTER,
        WRONG_BAND_COUNT,
        MISSING_CRS,
        NOT_COVERED,
        ALL_NODATA,
        FULLY_CLOUDY,
        DUPLICATE_PRODUCT,
        FUTURE_DATE,
        MISSING_METADATA,
        BAD_REPLY,
        UNREADABLE,
        INGEST_FAILED,
    }
)
