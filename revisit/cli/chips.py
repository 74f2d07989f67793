"""``revisit chips``: the chip store, pixels on disk named by their sha256."""

from __future__ import annotations

from typing import Annotated

import typer

from revisit.cli._common import EXIT_ERROR, get_settings, parse_duration, stdout

chips_app = typer.Typer(help="The chip store: pixels on disk, named by their sha256.")


@chips_app.command("gc")
def chips_gc(
    ctx: typer.Context,
    min_age: Annotated[
        str,
        typer.Option(
            help="Only files older than this (an ingest in flight is younger); 0s: every "
            "unreferenced file, safe only while nothing ingests."
        ),
    ] = "1h",
) -> None:
    """Remove chip files no observation names, and temporaries a crash left behind."""
    from revisit.db.engine import Database
    from revisit.db.scenes import referenced_chip_keys
    from revisit.ingest.chips import ChipStore

    seconds = parse_duration(min_age, allow_zero=True)
    settings = get_settings(ctx)
    with Database(settings) as db, db.engine.connect() as conn:
        referenced = referenced_chip_keys(conn)
    report = ChipStore(settings.data_dir / "chips").collect_garbage(referenced, min_age_s=seconds)
    stdout.print(
        f"removed {report.chips} unreferenced chips and {report.temporaries} temporaries"
        f" ({report.bytes / 1e6:.1f} MB)"
    )


@chips_app.command("verify")
def chips_verify(ctx: typer.Context) -> None:
    """Check that every observation's chip file is there and matches its sha256."""
    from revisit.db.engine import Database
    from revisit.db.scenes import chip_refs
    from revisit.ingest.chips import ChipStore

    settings = get_settings(ctx)
    store = ChipStore(settings.data_dir / "chips")
    with Database(settings) as db, db.engine.connect() as conn:
        checked, bad = store.verify(chip_refs(conn))
    for line in bad:
        stdout.print(line)
    stdout.print(f"checked {checked} chips: {len(bad)} missing or corrupt")
    if bad:
        raise typer.Exit(EXIT_ERROR)
