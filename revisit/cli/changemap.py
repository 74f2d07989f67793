"""``revisit changemap``: dense change maps from a pair of images, with an exported model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from revisit.cli._common import get_settings, stdout

changemap_app = typer.Typer(help="Dense change maps from imagery, with an exported model.")


@changemap_app.command("pair")
def changemap_pair(
    ctx: typer.Context,
    before: Annotated[Path, typer.Argument(help="The older image: OSCD folder, SAFE, GeoTIFF.")],
    after: Annotated[Path, typer.Argument(help="The newer image, any format the first takes.")],
    out: Annotated[Path, typer.Option(help="The float32 score COG to write (BEFORE's grid).")],
    model: Annotated[
        Path | None,
        typer.Option(
            help="An ONNX model: V.dense.onnx for hypercolumn (or a model published beside one),"
            " an embedding model for stem and windows (default: the latest published)."
        ),
    ] = None,
    scoring: Annotated[
        str | None,
        typer.Option(
            help="hypercolumn: deep change vector analysis on the dense model's feature maps;"
            " stem: the encoder's first layer at every pixel; windows: embeddings of sliding"
            " windows (default: export.pair_scoring)."
        ),
    ] = None,
    mask: Annotated[
        Path | None,
        typer.Option(help="The change mask COG (default: OUT's name with .mask.tif)."),
    ] = None,
    polygons: Annotated[
        Path | None,
        typer.Option(help="The GeoJSON change polygons (default: OUT's name with .geojson)."),
    ] = None,
    no_mask: Annotated[bool, typer.Option("--no-mask", help="Write the score COG only.")] = False,
    threshold: Annotated[
        float | None,
        typer.Option(help="The score above which a pixel is change (default: automatic)."),
    ] = None,
    threshold_method: Annotated[
        str | None,
        typer.Option(help="How the automatic threshold is found (default: export settings)."),
    ] = None,
    opening: Annotated[
        int | None,
        typer.Option(min=0, help="Morphological opening radius of the mask, in pixels."),
    ] = None,
    min_area: Annotated[
        float | None,
        typer.Option(min=0, help="Minimum mapping unit in m²: smaller change regions dropped."),
    ] = None,
    no_clouds: Annotated[
        bool,
        typer.Option("--no-clouds", help="Do not mask cloud and cloud shadow."),
    ] = False,
    stride: Annotated[
        int | None,
        typer.Option(
            min=1, help="Pixels between windows, for windows (default: export.pair_stride)."
        ),
    ] = None,
    window: Annotated[
        int | None,
        typer.Option(min=1, help="Window side, for windows (default: the model's patch_size)."),
    ] = None,
) -> None:
    """Map change between two images pixel by pixel: a score COG, a change mask and polygons."""
    from revisit.errors import ExportError
    from revisit.export.pairmap import SCORINGS, pair_change_map
    from revisit.export.publish import export_dir, read_manifest

    settings = get_settings(ctx)
    chosen = scoring or settings.export.pair_scoring
    if chosen not in (*SCORINGS, "dense"):
        raise ExportError(f"unknown scoring {chosen!r}; expected one of {', '.join(SCORINGS)}")
    if model is None:
        manifest = read_manifest(settings.data_dir)
        if manifest is None:
            raise ExportError(
                f"no published model under {export_dir(settings.data_dir)}: run "
                "`revisit export onnx` first, or pass --model FILE.onnx"
            )
        files = manifest["files"]
        name = files.get("dense") if chosen == "hypercolumn" else files["embedding"]
        if name is None:
            raise ExportError(
                f"the published version {manifest.get('version')} has no dense model: run"
                " `revisit export onnx` again, or use --scoring stem"
            )
        model = export_dir(settings.data_dir) / name
    export = settings.export
    result = pair_change_map(
        before,
        after,
        model=model,
        out=out,
        scoring=chosen,
        stride=stride or export.pair_stride,
        window=window,
        batch=export.pair_batch,
        keep=export.pair_keep,
        clouds=not no_clouds,
        mask=mask,
        polygons=polygons,
        write_mask=not no_mask,
        threshold=threshold,
        threshold_method=threshold_method or export.pair_threshold_method or None,
        opening_radius_px=export.pair_opening_px if opening is None else opening,
        min_area_m2=export.pair_min_area_m2 if min_area is None else min_area,
    )
    how = {
        "hypercolumn": "every pixel, stem + layer1-3 feature maps",
        "stem": f"every pixel, {result.window}x{result.window} stem",
        "windows": f"{result.windows} windows",
    }[result.scoring]
    stdout.print(
        f"wrote {result.path} ({result.width} x {result.height} px, {result.scoring}: {how}, "
        f"{result.pixels_per_s:,.0f} px/s)"
    )
    if result.mask_path is not None:
        share = result.changed_pixels / result.valid_pixels if result.valid_pixels else 0.0
        stdout.print(
            f"wrote {result.mask_path} (threshold {result.threshold:.4g},"
            f" {result.threshold_method}; {result.changed_pixels:,} change pixels,"
            f" {share:.2%} of {result.valid_pixels:,})"
        )
    if result.polygons_path is not None:
        stdout.print(f"wrote {result.polygons_path} ({result.polygons:,} polygons)")
