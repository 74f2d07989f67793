"""``revisit export``: the encoder as ONNX, the change estimates as maps."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from revisit.cli._common import bbox_option, get_settings, stdout

export_app = typer.Typer(help="Publish the encoder as ONNX and the change estimates as maps.")


@export_app.command("onnx")
def export_onnx(
    ctx: typer.Context,
    model_version: Annotated[
        int | None, typer.Option(help="The model_version id to publish (default: the newest).")
    ] = None,
) -> None:
    """Publish a checkpoint as ONNX models (features, embedding; dense unless
    export.dense_model is false) after a parity check."""
    from revisit.db.engine import Database
    from revisit.db.migrate import upgrade
    from revisit.export.publish import publish_onnx

    settings = get_settings(ctx)
    with Database(settings) as db:
        upgrade(db.engine)
        published = publish_onnx(
            engine=db.engine, settings=settings, model_version_id=model_version
        )
    what = "already published" if published.reused else "published"
    stdout.print(
        f"{what} {published.version} ({published.method}, step {published.step}, "
        f"model version {published.model_version_id})"
    )
    for output, path in published.paths.items():
        stdout.print(
            f"  {output}: {path}  sha256 {published.sha256s[output][:12]}…  "
            f"parity max |onnx - torch| = {published.max_abs_diff[output]:.2e}"
        )


@export_app.command("changemap")
def export_changemap(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="The file to write.")],
    bbox: Annotated[
        str | None, typer.Option(help="minlon,minlat,maxlon,maxlat in degrees.")
    ] = None,
    aoi: Annotated[str | None, typer.Option(help="The locations of this AOI.")] = None,
    output: Annotated[
        str,
        typer.Option(
            "--format", help="geojson (RFC 7946), cog (Cloud-Optimized GeoTIFF of r) or png."
        ),
    ] = "geojson",
) -> None:
    """Write the change estimates of a bbox or an AOI as GeoJSON, a COG or a PNG quicklook."""
    from revisit.db.engine import Database
    from revisit.db.migrate import upgrade
    from revisit.export.changemap import FORMATS, export_change_map

    if (bbox is None) == (aoi is None):
        raise typer.BadParameter("give exactly one of --bbox or --aoi")
    if output not in FORMATS:
        raise typer.BadParameter(f"--format must be one of {', '.join(FORMATS)}, not {output!r}")
    box = None
    if bbox is not None:
        box = bbox_option(bbox)
    settings = get_settings(ctx)
    with Database(settings) as db:
        upgrade(db.engine)
        exported = export_change_map(
            engine=db.engine, settings=settings, fmt=output, out=out, bbox=box, aoi=aoi
        )
    stdout.print(
        f"wrote {exported.path} ({exported.kind}, {exported.size_bytes} bytes, "
        f"sha256 {exported.sha256[:12]}…), artifact {exported.artifact_id}"
    )
