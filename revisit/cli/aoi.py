"""``revisit aoi``: areas of interest, the places revisit is asked to watch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from revisit.cli._common import get_settings, stdout

aoi_app = typer.Typer(help="Areas of interest: the places you ask revisit to watch.")


@aoi_app.command("add")
def aoi_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A name: letters, digits, _ - . (max 64).")],
    bbox: Annotated[
        str | None, typer.Option(help="minlon,minlat,maxlon,maxlat in degrees.")
    ] = None,
    geojson: Annotated[
        Path | None, typer.Option(help="A GeoJSON file of a polygon, feature or collection.")
    ] = None,
    footprint: Annotated[
        Path | None, typer.Option(help="A Sentinel-2 product (SAFE, band folder, GeoTIFF).")
    ] = None,
) -> None:
    """Add an area of interest from a bbox, a GeoJSON file, or a product's footprint."""
    from revisit.db.aois import create_aoi
    from revisit.db.engine import Database
    from revisit.ingest import areas

    given = [x for x in (bbox, geojson, footprint) if x is not None]
    if len(given) != 1:
        raise typer.BadParameter("give exactly one of --bbox, --geojson, --footprint")
    try:
        name = areas.validate_name(name)
        if bbox is not None:
            geom = areas.parse_bbox(bbox)
        elif geojson is not None:
            geom = areas.read_geojson_area(geojson)
        elif footprint is not None:
            from revisit.ingest.sources.local import product_footprint

            geom = product_footprint(footprint)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    with Database(get_settings(ctx)) as db, db.engine.begin() as conn:
        aoi = create_aoi(conn, name=name, geom=geom)
    minx, miny, maxx, maxy = geom.bounds
    stdout.print(f"AOI {aoi.name} (#{aoi.id}): {minx:.4f},{miny:.4f},{maxx:.4f},{maxy:.4f}")


@aoi_app.command("list")
def aoi_list(ctx: typer.Context) -> None:
    """List the AOIs with their bounds and how many locations lie in each."""
    from revisit.db.aois import list_aois
    from revisit.db.engine import Database
    from revisit.db.locations import count_locations

    with Database(get_settings(ctx)) as db, db.engine.connect() as conn:
        table = Table("name", "id", "bounds (lon/lat)", "locations", show_edge=False)
        for aoi in list_aois(conn):
            minx, miny, maxx, maxy = aoi.geom.bounds
            count = count_locations(conn, aoi_id=aoi.id)
            table.add_row(
                aoi.name, str(aoi.id), f"{minx:.4f},{miny:.4f},{maxx:.4f},{maxy:.4f}", str(count)
            )
    stdout.print(table)
