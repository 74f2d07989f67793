"""``revisit query``: where things changed, without writing SQL."""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Annotated

import typer
from rich.table import Table

from revisit.cli._common import bbox_option, get_settings, parse_date, stdout

query_app = typer.Typer(help="Ask where things changed, without writing SQL.")


@query_app.command("changed")
def query_changed(
    ctx: typer.Context,
    bbox: Annotated[
        str | None, typer.Option(help="minlon,minlat,maxlon,maxlat in degrees.")
    ] = None,
    aoi: Annotated[str | None, typer.Option(help="Only locations inside this AOI.")] = None,
    min_ratio: Annotated[
        float | None, typer.Option(help="Only locations whose r (ratio_ema) is at least this.")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Only locations that became changed on or after this date.")
    ] = None,
    all_locations: Annotated[
        bool,
        typer.Option("--all", help="Every location with an estimate, changed or not."),
    ] = False,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many rows.")] = None,
    output: Annotated[
        str, typer.Option("--format", help="table, geojson (RFC 7946) or csv.")
    ] = "table",
) -> None:
    """Locations the change mixture calls changed, most changed first (r = ratio_ema)."""
    import csv
    import json

    from revisit.db.aois import get_aoi
    from revisit.db.engine import Database
    from revisit.db.queries import changed_locations

    if (bbox is None) == (aoi is None):
        raise typer.BadParameter("give exactly one of --bbox or --aoi")
    if output not in ("table", "geojson", "csv"):
        raise typer.BadParameter(f"--format must be table, geojson or csv, not {output!r}")
    if min_ratio is not None and not min_ratio >= 0:
        raise typer.BadParameter("--min-ratio must be a number >= 0")
    box = None
    if bbox is not None:
        box = bbox_option(bbox)
    with Database(get_settings(ctx)) as db, db.engine.connect() as conn:
        aoi_id = get_aoi(conn, aoi).id if aoi is not None else None
        rows = changed_locations(
            conn,
            bbox=box,
            aoi_id=aoi_id,
            min_ratio=min_ratio,
            since=parse_date(since),
            changed_only=not all_locations,
            limit=limit,
        )
    columns = ("location_id", "lon", "lat", "ratio_ema", "ratio_last", "updates", "changed",
               "change_probability", "changed_since", "updated_at", "aoi_name")  # fmt: skip

    def values(row: object) -> list[object]:
        return [getattr(row, c) for c in columns]

    if output == "geojson":
        features = [
            {
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": [r.lon, r.lat]},
                "properties": {
                    c: (v.isoformat() if isinstance(v, datetime) else v)
                    for c, v in zip(columns, values(r), strict=True)
                    if c not in ("lon", "lat")
                },
            }
            for r in rows
        ]
        print(json.dumps({"type": "FeatureCollection", "features": features}))
    elif output == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        for r in rows:
            writer.writerow(
                ["" if v is None else (v.isoformat() if isinstance(v, datetime) else v)
                 for v in values(r)]
            )  # fmt: skip
    else:
        table = Table(*columns, show_edge=False)
        for r in rows:
            table.add_row(
                str(r.location_id), f"{r.lon:.5f}", f"{r.lat:.5f}", f"{r.ratio_ema:.3f}",
                f"{r.ratio_last:.3f}", str(r.updates), "yes" if r.changed else "no",
                "" if r.change_probability is None else f"{r.change_probability:.3f}",
                f"{r.changed_since:%Y-%m-%d}" if r.changed_since else "",
                f"{r.updated_at:%Y-%m-%d %H:%M}", r.aoi_name or "",
            )  # fmt: skip
        stdout.print(table)
        stdout.print(f"{len(rows)} locations")
