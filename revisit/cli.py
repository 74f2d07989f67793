"""The ``revisit`` command line.

Settings are built once, here, from ``--config FILE`` (or ``REVISIT_CONFIG``)
and ``REVISIT_*`` environment variables, and passed down. Errors revisit
expects end the program with one line on standard error and a non-zero
status: 2 for a bad setting or usage, 1 for anything else.
"""

from __future__ import annotations

import math
import re
import sys
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table
from typer.exceptions import TyperException

from revisit import __version__
from revisit.config import Settings, load_settings
from revisit.errors import ConfigError, EmbeddedDatabaseError, RevisitError
from revisit.logs import configure_logging

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from revisit.db.embedded import EmbeddedPostgres
    from revisit.db.engine import Database
    from revisit.db.status import DatabaseStatus

EXIT_ERROR = 1
EXIT_USAGE = 2

app = typer.Typer(
    name="revisit",
    help="A service that learns from every Sentinel-2 revisit.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="The database: migrations, its URL, the embedded cluster.")
app.add_typer(db_app, name="db")
aoi_app = typer.Typer(help="Areas of interest: the places you ask revisit to watch.")
app.add_typer(aoi_app, name="aoi")
chips_app = typer.Typer(help="The chip store: pixels on disk, named by their sha256.")
app.add_typer(chips_app, name="chips")
query_app = typer.Typer(help="Ask where things changed, without writing SQL.")
app.add_typer(query_app, name="query")
export_app = typer.Typer(help="Publish the encoder as ONNX and the change estimates as maps.")
app.add_typer(export_app, name="export")
changemap_app = typer.Typer(help="Dense change maps from imagery, with an exported model.")
app.add_typer(changemap_app, name="changemap")

stdout = Console(soft_wrap=True)


@dataclass
class _State:
    config_file: Path | None = None
    settings: Settings | None = field(default=None, repr=False)


def _settings(ctx: typer.Context) -> Settings:
    state: _State = ctx.find_root().obj
    if state.settings is None:
        state.settings = load_settings(state.config_file)
        configure_logging(level=state.settings.log_level, fmt=state.settings.log_format)
    return state.settings


def _version(value: bool) -> None:
    if value:
        stdout.print(f"revisit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            envvar="REVISIT_CONFIG",
            help="TOML file of settings; REVISIT_* environment variables override it.",
            dir_okay=False,
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    ctx.obj = _State(config_file=config)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, *, allow_zero: bool = False) -> float:
    """``90``, ``90s``, ``10m``, ``2h`` or ``1d`` in seconds.

    Args:
        text: The duration.
        allow_zero: Accept ``0`` (``0s``, ...) too.

    Raises:
        typer.BadParameter: The text is not such a duration, or is zero when
            that is not allowed.
    """
    match = _DURATION.match(text)
    if match is None or (float(match.group(1)) <= 0 and not allow_zero):
        raise typer.BadParameter(f"{text!r} is not a duration like 90s, 10m or 2h")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2) or "s"]


@app.command()
def run(
    ctx: typer.Context,
    duration: Annotated[
        str | None,
        typer.Option(
            help="Stop after this long (90s, 10m, 2h); run until SIGINT/SIGTERM if unset."
        ),
    ] = None,
    until_step: Annotated[
        int | None,
        typer.Option(min=1, help="Stop cleanly once the learner has reached this step."),
    ] = None,
) -> None:
    """Start the service: scheduled ingest, learning and exports, until stopped.

    One `revisit run` per database schedules jobs; a second one waits as a
    standby and takes over when the first stops or dies.
    """
    from revisit.daemon.service import run_service

    seconds = parse_duration(duration) if duration is not None else None
    settings = _settings(ctx)
    run_service(settings, duration_s=seconds, until_step=until_step, report=_print_status)


@app.command()
def status(ctx: typer.Context) -> None:
    """Row counts, the latest scene, model and exports, and the service's jobs."""
    from revisit.db.engine import Database
    from revisit.db.status import collect_status

    with Database(_settings(ctx)) as db, db.engine.connect() as conn:
        report = collect_status(conn)
        _print_status(db, report)
        if report.migrated:
            _print_service(conn)


def _when(moment: datetime | None) -> str:
    """A time in UTC, without the year: ``11-30 13:55:24``."""
    return "-" if moment is None else f"{moment.astimezone(UTC):%m-%d %H:%M:%S}"


def _print_service(conn: Connection) -> None:
    """The daemon's part of `revisit status`: leader, learner step, latest exports, jobs."""
    from revisit.db import daemon as daemon_db
    from revisit.db import learning

    # Tables as wide as their rows even when piped (rich assumes 80 columns there).
    wide = Console(soft_wrap=True, width=max(stdout.width, 150))
    leader = daemon_db.current_leader(conn)
    stdout.print(
        "[bold]service[/bold]  "
        + (
            f"running: a `revisit run` leads this database (since {_when(leader.since)} UTC)"
            if leader
            else "not running (no `revisit run` holds the leader lock)"
        )
    )
    latest = learning.latest_model_version(conn)
    stdout.print(
        "[bold]learner step[/bold]  "
        + (f"{latest.step} (last checkpoint, {latest.method})" if latest else "0 (not started)")
    )
    artifacts = daemon_db.latest_artifacts(conn)
    if artifacts:
        table = Table("latest export", "created (UTC)", "path", show_edge=False)
        for art in artifacts:
            table.add_row(
                art["kind"] + (f" ({art['aoi']})" if art["aoi"] else ""),
                _when(art["created_at"]),
                art["path"],
            )
        wide.print(table)
    else:
        stdout.print("[bold]latest exports[/bold]  none yet")
    runs = daemon_db.job_runs(conn)
    if runs:
        table = Table(
            "job", "last run", "outcome", "s", "next run", "runs", "failed", show_edge=False
        )
        for run in runs:
            table.add_row(
                run.job_id,
                _when(run.last_started_at),
                run.last_outcome or "-",
                "-" if run.last_duration_s is None else f"{run.last_duration_s:.1f}",
                _when(run.next_run_at),
                str(run.runs),
                str(run.failures),
            )
        wide.print(table)
        for run in runs:
            if run.last_detail:
                stdout.print(f"  {run.job_id}: {run.last_detail}", highlight=False)
    else:
        stdout.print("[bold]jobs[/bold]  none yet: `revisit run` schedules them")


def _print_status(db: Database, report: DatabaseStatus) -> None:
    stdout.print(f"[bold]database[/bold]  {db.display_url()}")
    if report.revision is None:
        schema = "[yellow]empty: run `revisit db upgrade`[/yellow]"
    elif report.migrated:
        schema = f"{report.revision} (head)"
    else:
        schema = f"[yellow]{report.revision}, head is {report.head}: run `revisit db upgrade`[/]"
    stdout.print(f"[bold]schema[/bold]    {schema}")
    scene = report.latest_scene
    stdout.print(
        "[bold]latest scene[/bold]  "
        + (
            f"{scene.source}:{scene.product_id} acquired {scene.acquired_at:%Y-%m-%d %H:%M} UTC"
            f" ({scene.status})"
            if scene
            else "none yet"
        )
    )
    model = report.latest_model
    stdout.print(
        "[bold]latest model[/bold]  "
        + (
            f"#{model.id} {model.method} step {model.step} ({model.created_at:%Y-%m-%d %H:%M})"
            if model
            else "none yet"
        )
    )
    if report.tables:
        table = Table("table", "rows", title=None, show_edge=False)
        for count in report.tables:
            table.add_row(count.table, f"{count.rows:,}" if count.exact else f"~{count.rows:,}")
        stdout.print(table)


# -- locations, AOIs, ingest -------------------------------------------------------------


def _bbox_option(text: str) -> tuple[float, float, float, float]:
    """(west, south, east, north) of a ``--bbox`` value; a usage error if it is not one."""
    from revisit.ingest.areas import parse_bbox

    try:
        west, south, east, north = parse_bbox(text).bounds
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--bbox") from None
    return (west, south, east, north)


def _parse_date(text: str | None, *, end_of_day: bool = False) -> datetime | None:
    """``2024-05-01`` or an ISO timestamp, as UTC."""
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a date like 2024-05-01") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
        if end_of_day and len(text) == 10:
            value += timedelta(days=1) - timedelta(microseconds=1)
    return value.astimezone(UTC)


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
    with Database(_settings(ctx)) as db, db.engine.begin() as conn:
        aoi = create_aoi(conn, name=name, geom=geom)
    minx, miny, maxx, maxy = geom.bounds
    stdout.print(f"AOI {aoi.name} (#{aoi.id}): {minx:.4f},{miny:.4f},{maxx:.4f},{maxy:.4f}")


@aoi_app.command("list")
def aoi_list(ctx: typer.Context) -> None:
    """List the AOIs with their bounds and how many locations lie in each."""
    from revisit.db.aois import list_aois
    from revisit.db.engine import Database
    from revisit.db.locations import count_locations

    with Database(_settings(ctx)) as db, db.engine.connect() as conn:
        table = Table("name", "id", "bounds (lon/lat)", "locations", show_edge=False)
        for aoi in list_aois(conn):
            minx, miny, maxx, maxy = aoi.geom.bounds
            count = count_locations(conn, aoi_id=aoi.id)
            table.add_row(
                aoi.name, str(aoi.id), f"{minx:.4f},{miny:.4f},{maxx:.4f},{maxy:.4f}", str(count)
            )
    stdout.print(table)


@app.command()
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
    settings = _settings(ctx)
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


@app.command()
def ingest(
    ctx: typer.Context,
    source: Annotated[
        str | None,
        typer.Option(
            help="simulated, local or sentinelhub (default: simulated; for --worker: every"
            " source in daemon.sources)."
        ),
    ] = None,
    path: Annotated[
        Path | None, typer.Option(help="For --source local: the directory of products.")
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

    settings = _settings(ctx)
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
    start, end = _parse_date(since), _parse_date(until, end_of_day=True)
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


DEFAULT_LEARN_STEPS = 1000


def _positive_minutes(value: float | None) -> float | None:
    """``--minutes``: a finite number of minutes above zero, or unset."""
    if value is not None and not (0 < value < math.inf):
        raise typer.BadParameter(f"{value:g} is not a number of minutes above 0")
    return value


@app.command()
def learn(
    ctx: typer.Context,
    steps: Annotated[
        int | None,
        typer.Option(
            min=0,
            help=f"How many steps to take (default {DEFAULT_LEARN_STEPS}; with --minutes, "
            "no limit but the time).",
        ),
    ] = None,
    minutes: Annotated[
        float | None,
        typer.Option(
            callback=_positive_minutes,
            help="Train for this many minutes of wall-clock time (0.5, 15, 90); with --steps, "
            "whichever comes first.",
        ),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(help="moco, tp, geo-tp, seco, teco or caco (default: learner.method)."),
    ] = None,
    new_model: Annotated[
        bool,
        typer.Option(
            "--new-model",
            help="Start a fresh model even if the database holds a checkpoint; "
            "the step counter and the change estimates carry on.",
        ),
    ] = False,
    init_from: Annotated[
        Path | None,
        typer.Option(
            help="With --new-model: start from this checkpoint's weights (a .pt file of"
            " another data directory's checkpoints/), to adapt a model to these places.",
        ),
    ] = None,
    nproc: Annotated[
        int,
        typer.Option(
            min=1,
            max=256,
            help="Train one model with this many processes on this machine (torch.distributed"
            " DDP: gloo on CPU, NCCL with one GPU each); each takes learner.batch_size"
            " locations a step. Across machines, run `torchrun ... -m revisit learn` instead.",
        ),
    ] = 1,
    forever: Annotated[
        bool,
        typer.Option(
            "--forever",
            help="Train until stopped (Ctrl-C, SIGTERM), checkpointing every"
            " learner.checkpoint_every steps: how `revisit run` runs a learner of"
            " daemon.learner_processes > 1.",
        ),
    ] = False,
    exit_with_parent: Annotated[
        bool,
        typer.Option(
            "--exit-with-parent",
            help="Stop (checkpointing) when the process that started it exits (for supervisors).",
        ),
    ] = False,
) -> None:
    """Train the encoder on the ingested observations and update every location's r.

    Resumes from the newest checkpoint; Ctrl-C (or SIGTERM) ends the step in
    progress, checkpoints and exits, and so does the end of --minutes. With
    --nproc N (or as a rank of torchrun) N processes train one model; rank 0
    writes to the database and prints the summary.
    """
    import signal
    import threading

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from revisit.db.engine import Database
    from revisit.db.migrate import upgrade
    from revisit.learner.distributed import Distributed, launched
    from revisit.learner.online import OnlineLearner, StepReport
    from revisit.learner.trainer import METHODS

    settings = _settings(ctx)
    if method is not None and method not in METHODS:
        raise typer.BadParameter(f"must be one of {', '.join(METHODS)}", param_hint="--method")
    if init_from is not None and not new_model:
        raise typer.BadParameter("needs --new-model", param_hint="--init-from")
    if forever and (steps is not None or minutes is not None):
        raise typer.BadParameter("--forever goes without --steps and --minutes")
    if forever:
        steps = sys.maxsize
    if nproc > 1 and not launched():
        args = [*(["--steps", str(steps)] if steps is not None else [])]
        args += ["--minutes", f"{minutes!r}"] if minutes is not None else []
        args += ["--method", method] if method is not None else []
        args += ["--new-model"] if new_model else []
        args += ["--init-from", str(init_from.resolve())] if init_from is not None else []
        state: _State = ctx.find_root().obj
        raise typer.Exit(
            _launch_learners(
                settings, nproc, args, config=state.config_file, exit_with_parent=exit_with_parent
            )
        )
    if steps is None and minutes is None:
        steps = DEFAULT_LEARN_STEPS
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop.set()

    dist = Distributed.from_environment(settings.learner.device) if launched() else None
    main_rank = dist is None or dist.is_main
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    if exit_with_parent:
        _stop_with_parent(stop)
    try:
        with Database(settings) as db:
            if main_rank:
                upgrade(db.engine)
            if dist is not None:
                dist.barrier()  # the others wait for rank 0's migrations
            with (
                OnlineLearner(
                    settings=settings,
                    engine=db.engine,
                    method=method,
                    new_model=new_model,
                    init_from=init_from,
                    dist=dist,
                ) as learner,
                Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    TextColumn("{task.fields[stats]}"),
                    console=Console(stderr=True),
                    transient=True,
                    disable=not main_rank,
                ) as bar,
            ):
                budget = f", {minutes:g} min" if minutes is not None else ""
                task = bar.add_task(
                    f"{learner.method} from step {learner.step}{budget}",
                    total=steps,  # None: a pulsing bar, "n/?" steps
                    stats="",
                )

                def progress(report: StepReport) -> None:
                    bar.update(
                        task,
                        advance=1,
                        stats=f"step {report.step}  loss {report.loss:.3f}  "
                        f"{report.steps_per_s:.2f} steps/s  "
                        f"changed {report.changed_fraction:.1%} of {report.measured}",
                    )

                summary = learner.run(
                    sys.maxsize if steps is None else steps,
                    stop=stop,
                    max_seconds=None if minutes is None else minutes * 60.0,
                    on_step=progress,
                )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if dist is not None:
            dist.close()
    if not main_rank:
        return
    # Seven columns: the table fits 80 characters, the width when not on a terminal.
    table = Table(
        "method",
        "steps",
        "last step",
        "mean loss",
        "steps/s",
        "images/s",
        "changed",
        show_edge=False,
    )
    rate = summary.steps / summary.seconds if summary.seconds > 0 else 0.0
    # The global batch; fewer per step only with fewer locations than this.
    batch = settings.learner.batch_size * (dist.world_size if dist is not None else 1)
    table.add_row(
        summary.method,
        str(summary.steps),
        str(summary.last_step),
        f"{summary.mean_loss:.4f}",
        f"{rate:.2f}",
        f"{rate * batch:.1f}",
        f"{summary.changed_fraction:.1%} of {summary.measured}",
    )
    stdout.print(table)
    processes = f" on {dist.world_size} processes" if dist is not None else ""
    stdout.print(
        f"{summary.steps} steps of {batch} locations{processes} in {summary.seconds:.1f} s"
    )
    if stop.is_set():
        stdout.print(
            f"[yellow]stopped at step {summary.last_step}; checkpointed, the next run resumes[/]"
        )
    elif summary.stopped and minutes is not None:
        stdout.print(
            f"time budget of {minutes:g} min reached at step {summary.last_step}; checkpointed"
        )


def _stop_with_parent(stop: threading.Event, *, poll_s: float = 1.0) -> None:
    """Set ``stop`` once the process that started this one has exited (a thread watches)."""
    import os

    parent = os.getppid()

    def watch() -> None:
        while not stop.wait(poll_s):
            if os.getppid() != parent:
                stop.set()

    threading.Thread(target=watch, name="revisit-parent-watch", daemon=True).start()


def _launch_learners(
    settings: Settings,
    nproc: int,
    args: list[str],
    *,
    config: Path | None,
    exit_with_parent: bool = False,
) -> int:
    """``revisit learn --nproc N``: N ranks of ``revisit learn`` under ``torch.distributed.run``.

    The database is opened (the embedded cluster started) and migrated here
    first, so the ranks find it up; SIGINT and SIGTERM go on to the launcher,
    whose ranks checkpoint and stop together (and so does the exit of this
    process's parent, with ``exit_with_parent``).

    Returns:
        The launcher's exit status.
    """
    import signal
    import subprocess

    from revisit.db.engine import Database
    from revisit.db.migrate import upgrade

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={nproc}",
        "-m",
        "revisit",
        *(["--config", str(config.resolve())] if config is not None else []),
        "learn",
        *args,
    ]
    with Database(settings) as db:
        upgrade(db.engine)
        child = subprocess.Popen(command)

        def forward(signum: int, frame: object) -> None:
            child.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        orphaned = threading.Event()
        if exit_with_parent:
            _stop_with_parent(orphaned)
        try:
            while True:
                try:
                    return child.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    if orphaned.is_set():
                        orphaned.clear()
                        child.send_signal(signal.SIGTERM)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


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
    settings = _settings(ctx)
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

    settings = _settings(ctx)
    store = ChipStore(settings.data_dir / "chips")
    with Database(settings) as db, db.engine.connect() as conn:
        checked, bad = store.verify(chip_refs(conn))
    for line in bad:
        stdout.print(line)
    stdout.print(f"checked {checked} chips: {len(bad)} missing or corrupt")
    if bad:
        raise typer.Exit(EXIT_ERROR)


# -- export -------------------------------------------------------------------------------


@export_app.command("onnx")
def export_onnx(
    ctx: typer.Context,
    model_version: Annotated[
        int | None, typer.Option(help="The model_version id to publish (default: the newest).")
    ] = None,
) -> None:
    """Publish a checkpoint as two ONNX models (features, embedding) after a parity check."""
    from revisit.db.engine import Database
    from revisit.db.migrate import upgrade
    from revisit.export.publish import publish_onnx

    settings = _settings(ctx)
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

    settings = _settings(ctx)
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
        box = _bbox_option(bbox)
    settings = _settings(ctx)
    with Database(settings) as db:
        upgrade(db.engine)
        exported = export_change_map(
            engine=db.engine, settings=settings, fmt=output, out=out, bbox=box, aoi=aoi
        )
    stdout.print(
        f"wrote {exported.path} ({exported.kind}, {exported.size_bytes} bytes, "
        f"sha256 {exported.sha256[:12]}…), artifact {exported.artifact_id}"
    )


# -- query ------------------------------------------------------------------------------


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
        box = _bbox_option(bbox)
    with Database(_settings(ctx)) as db, db.engine.connect() as conn:
        aoi_id = get_aoi(conn, aoi).id if aoi is not None else None
        rows = changed_locations(
            conn,
            bbox=box,
            aoi_id=aoi_id,
            min_ratio=min_ratio,
            since=_parse_date(since),
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


# -- db ---------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(
    ctx: typer.Context,
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Apply migrations up to REVISION (default: the newest)."""
    from revisit.db.engine import Database
    from revisit.db.migrate import current_revision, upgrade

    with Database(_settings(ctx)) as db:
        upgrade(db.engine, revision)
        with db.engine.connect() as conn:
            stdout.print(f"schema at {current_revision(conn)}")


@db_app.command("downgrade")
def db_downgrade(
    ctx: typer.Context,
    revision: Annotated[
        str, typer.Argument(help="Target revision: an id, -1 for one step, base for nothing.")
    ],
) -> None:
    """Revert migrations down to REVISION. `base` drops every table revisit made."""
    from revisit.db.engine import Database
    from revisit.db.migrate import current_revision, downgrade

    with Database(_settings(ctx)) as db:
        downgrade(db.engine, revision)
        with db.engine.connect() as conn:
            stdout.print(f"schema at {current_revision(conn) or 'base (empty)'}")


@db_app.command("current")
def db_current(ctx: typer.Context) -> None:
    """Print the schema revision of the database and whether it is the newest."""
    from revisit.db.engine import Database
    from revisit.db.migrate import current_revision, head_revision

    with Database(_settings(ctx)) as db, db.engine.connect() as conn:
        revision = current_revision(conn)
    head = head_revision()
    if revision is None:
        stdout.print(f"base (empty); head is {head}")
    else:
        stdout.print(f"{revision} (head)" if revision == head else f"{revision}; head is {head}")


@db_app.command("url")
def db_url(ctx: typer.Context) -> None:
    """Print a libpq URL of the database, for `psql "$(revisit db url)"`.

    The embedded cluster is started if it is not running and left running until
    `revisit db stop`. The password of an external URL is masked.
    """
    from revisit.db.engine import Database

    db = Database(_settings(ctx))
    if db.embedded is not None:
        db.embedded.pin()
        with db.embedded:
            pass
        print("revisit: the embedded database stays up until `revisit db stop`", file=sys.stderr)
    print(db.libpq_url())


@db_app.command("grant-reader")
def db_grant_reader(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The login to create (lower-case, digits, _).")],
) -> None:
    """Create a login in revisit_reader; its password is read from standard input.

    At a terminal the password is asked for twice, unechoed; otherwise the first
    line of standard input is the password (`printf '%s\\n' "$PW" | revisit db
    grant-reader analyst`). It never comes from the command line. Run again to
    change the password.
    """
    import getpass

    from revisit.db.engine import Database
    from revisit.db.roles import grant_reader, validate_role_name

    validate_role_name(name)
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {name}: ")
        if getpass.getpass("again: ") != password:
            raise typer.BadParameter("the two passwords differ")
    else:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    with Database(_settings(ctx)) as db, db.engine.begin() as conn:
        created = grant_reader(conn, name=name, password=password)
    stdout.print(f"{'created' if created else 'updated'} login {name} in revisit_reader")


@db_app.command("start")
def db_start(ctx: typer.Context) -> None:
    """Start the embedded cluster and keep it running until `revisit db stop`."""
    embedded = _embedded(ctx)
    embedded.pin()
    with embedded:
        pass
    stdout.print(f"embedded database running in {embedded.pgdata}")


@db_app.command("stop")
def db_stop(ctx: typer.Context) -> None:
    """Stop the embedded cluster, unless a running revisit service still uses it."""
    embedded = _embedded(ctx)
    embedded.shutdown()
    stdout.print("embedded database stopped")


def _embedded(ctx: typer.Context) -> EmbeddedPostgres:
    from revisit.db.engine import Database

    db = Database(_settings(ctx))
    if db.embedded is None:
        raise EmbeddedDatabaseError(
            "REVISIT_DATABASE_URL is set: revisit does not start or stop that server"
        )
    return db.embedded


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``revisit`` console script; returns the exit status."""
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="revisit", standalone_mode=False)
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.Abort:
        print("revisit: aborted", file=sys.stderr)
        return EXIT_ERROR
    except TyperException as exc:  # typer's click: usage errors, bad parameters
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            print(f"revisit: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", EXIT_USAGE))
    except ConfigError as exc:
        print(f"revisit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RevisitError as exc:
        print(f"revisit: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("revisit: interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
