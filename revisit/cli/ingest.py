"""``revisit sample`` and ``revisit ingest``: locations to watch, and scenes of them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from revisit.cli._common import EXIT_ERROR, get_settings, parse_date, stdout
from revisit.config import Settings


def sample(
    ctx: typer.Context,
    n: Annotated[
        int | None, typer.Option("--n", min=1, help="Locations to draw near cities (CACo).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Same seed, same locations.")] = 0,
    aoi: Annotated[str | None, typer.Option(help="Put a regular grid over this AOI.")] = None,
    grid: Annotated[bool, typer.Option("--grid", help="With --aoi: a regular grid.")] = False,
    spacing: Annotated[
        float | None,
        typer.Option(help="Grid spacing / minimum distance in metres; default one chip width."),
    ] = None,
) -> None:
    """Add locations: --n N near cities (geographic sampling), or --aoi NAME --grid."""
    from revisit.db.aois import get_aoi
    from revisit.db.engine import Database
    from revisit.db.locations import all_points, insert_locations
    from revisit.ingest.sampling import grid_in_polygon, sample_locations

    if (n is None) == (aoi is None) or (aoi is not None and not grid):
        raise typer.BadParameter("give either --n N, or --aoi NAME --grid")
    count = n or 0
    settings = get_settings(ctx)
    size = settings.ingest.chip_size
    spacing_m = spacing if spacing is not None else size * 10.0
    with Database(settings) as db, db.engine.begin() as conn:
        if aoi is not None:
            area = get_aoi(conn, aoi)
            existing = {(round(x, 7), round(y, 7)) for x, y in all_points(conn, aoi_id=area.id)}
            try:
                points = grid_in_polygon(area.geom, spacing_m=spacing_m)
            except ValueError as exc:
                raise typer.BadParameter(str(exc)) from None
            points = [p for p in points if (round(p[0], 7), round(p[1], 7)) not in existing]
            added = insert_locations(
                conn, points, origin="aoi-grid", aoi_id=area.id, chip_size=size
            )
        else:
            points = sample_locations(
                count, seed=seed, min_spacing_m=spacing_m, existing=all_points(conn)
            )
            added = insert_locations(conn, points, origin="urban-gaussian", chip_size=size)
    stdout.print(f"added {added} locations")


def ingest(
    ctx: typer.Context,
    source: Annotated[
        str | None,
        typer.Option(
            help="simulated, local, sentinelhub or stac (default: simulated; for --worker:"
            " every source in daemon.sources)."
        ),
    ] = None,
    path: Annotated[
        Path | None, typer.Option(help="For --source local: the directory of products.")
    ] = None,
    catalog: Annotated[
        str | None,
        typer.Option(
            help="For --source stac: a preset (earth-search, earth-search-c1,"
            " planetary-computer) or a STAC API URL (default: stac.preset)."
        ),
    ] = None,
    collection: Annotated[
        str | None,
        typer.Option(help="For --source stac: the collection (default: the preset's)."),
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="From this date (default: where the last run stopped).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Up to this date (default: now).")] = None,
    aoi: Annotated[str | None, typer.Option(help="Only the locations of this AOI.")] = None,
    plan: Annotated[
        bool,
        typer.Option(
            "--plan",
            help="Only search: queue the scenes found for ingest workers (the cursor then moves"
            " as workers finish them).",
        ),
    ] = False,
    worker: Annotated[
        bool,
        typer.Option(
            "--worker",
            help="Run an ingest worker: claim queued scenes under a lease and ingest them, until"
            " SIGTERM (which lets the scene in progress finish).",
        ),
    ] = False,
    max_scenes: Annotated[
        int | None,
        typer.Option(
            min=1, help="With --plan: queue at most this many; with --worker: stop after this many."
        ),
    ] = None,
    drain: Annotated[
        bool,
        typer.Option("--drain", help="With --worker: stop once no scene is queued or claimed."),
    ] = False,
    exit_with_parent: Annotated[
        bool,
        typer.Option(
            "--exit-with-parent",
            help="With --worker: stop when the process that started it exits (for supervisors).",
        ),
    ] = False,
) -> None:
    """Ingest scenes from a source: chips to the chip store, rows to the database.

    With neither --plan nor --worker, one process searches and ingests. To
    spread the work over processes and machines sharing one database, plan
    with `revisit ingest --plan` (or let `revisit run` with
    daemon.ingest_workers > 0 do it), and run any number of
    `revisit ingest --worker`: planning is never done by workers. Workers on
    other machines need the same database URL and the chip store
    (data_dir/chips) on shared storage.
    """
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from revisit.db.engine import Database
    from revisit.db.migrate import upgrade
    from revisit.ingest.chips import ChipStore
    from revisit.ingest.pipeline import IngestPipeline, IngestSummary, PlanSummary
    from revisit.ingest.sources import build_source
    from revisit.types import SceneRef

    settings = _with_catalog(get_settings(ctx), catalog=catalog, collection=collection)
    if plan and worker:
        raise typer.BadParameter("give --plan or --worker, not both")
    if worker:
        if since is not None or until is not None or aoi is not None:
            raise typer.BadParameter(
                "--worker ingests the scenes a plan queued: --since, --until and --aoi go with"
                " --plan"
            )
        _ingest_worker(
            settings,
            sources=(source,) if source is not None else settings.daemon.sources,
            path=path,
            max_scenes=max_scenes,
            drain=drain,
            exit_with_parent=exit_with_parent,
        )
        return
    if drain or exit_with_parent:
        raise typer.BadParameter("--drain and --exit-with-parent go with --worker")
    if max_scenes is not None and not plan:
        raise typer.BadParameter("--max-scenes goes with --plan or --worker")
    source = "simulated" if source is None else source
    start, end = parse_date(since), parse_date(until, end_of_day=True)
    scene_source = build_source(source, settings, path=path)
    try:
        with Database(settings) as db:
            upgrade(db.engine)
            pipeline = IngestPipeline(
                db.engine,
                ChipStore(settings.data_dir / "chips"),
                scene_source,
                settings=settings.ingest,
            )
            with Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            ) as bar:
                task = bar.add_task(f"ingesting from {source}")

                def progress(scene: SceneRef | None, summary: IngestSummary) -> None:
                    when = f" ({scene.acquired_at:%Y-%m-%d})" if scene else ""
                    done = (
                        f"{summary.queued} queued, {summary.known} known"
                        if isinstance(summary, PlanSummary)
                        else f"{summary.scenes} scenes, {summary.chips} chips, "
                        f"{summary.skipped} skipped"
                    )
                    bar.update(
                        task,
                        description=f"{source}{when}: {done}, {summary.quarantined} quarantined",
                    )

                summary: IngestSummary
                if plan:
                    summary = pipeline.plan(
                        aoi=aoi, since=start, until=end, max_scenes=max_scenes, progress=progress
                    )
                else:
                    summary = pipeline.run(aoi=aoi, since=start, until=end, progress=progress)
    finally:
        scene_source.close()
    if isinstance(summary, PlanSummary):
        table = Table("queued", "known", "quarantined", "seconds", show_edge=False)
        table.add_row(
            str(summary.queued),
            str(summary.known),
            str(summary.quarantined),
            f"{summary.seconds:.1f}",
        )
    else:
        table = Table("scenes", "chips", "skipped", "quarantined", "seconds", show_edge=False)
        table.add_row(
            str(summary.scenes),
            str(summary.chips),
            str(summary.skipped),
            str(summary.quarantined),
            f"{summary.seconds:.1f}",
        )
    stdout.print(table)
    for reason, count in sorted(summary.quarantined_by_reason.items()):
        stdout.print(f"  quarantined {reason}: {count}")
    if summary.interrupted:
        stdout.print(
            f"[yellow]interrupted: {summary.interrupted}; the next run resumes from there[/]"
        )
        raise typer.Exit(EXIT_ERROR)


def _with_catalog(settings: Settings, *, catalog: str | None, collection: str | None) -> Settings:
    """``settings`` with ``--catalog`` and ``--collection`` put into ``stac``."""
    from pydantic import ValidationError

    from revisit.config import STAC_PRESETS, StacSettings

    if catalog is None and collection is None:
        return settings
    update: dict[str, object] = {}
    if catalog is not None:
        if catalog in STAC_PRESETS:
            update.update(preset=catalog, api_url=None)
        else:
            update["api_url"] = catalog
    if collection is not None:
        update["collection"] = collection
    try:
        stac = StacSettings.model_validate({**settings.stac.model_dump(), **update})
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        raise typer.BadParameter(
            f"--catalog {catalog!r}: {where}: {problem['msg']}; give a preset"
            f" ({', '.join(STAC_PRESETS)}) or an http(s):// URL"
        ) from None
    return settings.model_copy(update={"stac": stac})


def _ingest_worker(
    settings: Settings,
    *,
    sources: tuple[str, ...],
    path: Path | None,
    max_scenes: int | None,
    drain: bool,
    exit_with_parent: bool,
) -> None:
    """``revisit ingest --worker``: claim and ingest queued scenes until stopped."""
    import os
    import threading

    from revisit.db.engine import Database
    from revisit.db.migrate import upgrade
    from revisit.ingest.chips import ChipStore
    from revisit.ingest.sources import build_source
    from revisit.ingest.workers import IngestWorker, WorkerInterrupted, stop_on_signals

    if not sources:
        raise typer.BadParameter("daemon.sources is empty: name the worker's source with --source")
    parent = os.getppid() if exit_with_parent else None
    built = {}
    try:
        for name in dict.fromkeys(sources):
            built[name] = build_source(name, settings, path=path)
        stop = threading.Event()
        with stop_on_signals(stop), Database(settings) as db:
            upgrade(db.engine)
            pool = IngestWorker(
                db.engine,
                ChipStore(settings.data_dir / "chips"),
                built,
                settings=settings.ingest,
                stop=stop,
            )
            summary = pool.run(max_tasks=max_scenes, drain=drain, parent_pid=parent)
    except WorkerInterrupted:
        stdout.print("[yellow]interrupted: the scene in progress went back to the queue[/]")
        raise typer.Exit(130) from None
    finally:
        for scene_source in built.values():
            scene_source.close()
    table = Table(
        "scenes", "chips", "skipped", "quarantined", "failed", "given back", "seconds",
        show_edge=False,
    )  # fmt: skip
    table.add_row(
        str(summary.scenes),
        str(summary.chips),
        str(summary.skipped),
        str(summary.quarantined),
        str(summary.failed),
        str(summary.released),
        f"{summary.seconds:.1f}",
    )
    stdout.print(table)
