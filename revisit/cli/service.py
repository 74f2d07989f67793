"""``revisit run`` and ``revisit status``: the service, and what it has done so far."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from revisit.cli._common import get_settings, parse_duration, stdout

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from revisit.db.engine import Database
    from revisit.db.status import DatabaseStatus


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
    settings = get_settings(ctx)
    run_service(settings, duration_s=seconds, until_step=until_step, report=_print_status)


def status(ctx: typer.Context) -> None:
    """Row counts, the latest scene, model and exports, and the service's jobs."""
    from revisit.db.engine import Database
    from revisit.db.status import collect_status

    with Database(get_settings(ctx)) as db, db.engine.connect() as conn:
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
