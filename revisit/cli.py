"""The ``revisit`` command line.

Settings are built once, here, from ``--config FILE`` (or ``REVISIT_CONFIG``)
and ``REVISIT_*`` environment variables, and passed down. Errors revisit
expects end the program with one line on standard error and a non-zero
status: 2 for a bad setting or usage, 1 for anything else.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import click
import typer
from rich.console import Console
from rich.table import Table

from revisit import __version__
from revisit.config import Settings, load_settings
from revisit.errors import ConfigError, EmbeddedDatabaseError, RevisitError
from revisit.logs import configure_logging

if TYPE_CHECKING:
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


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``10m``, ``2h`` or ``1d`` in seconds.

    Raises:
        typer.BadParameter: The text is not such a duration, or is zero.
    """
    match = _DURATION.match(text)
    if match is None or float(match.group(1)) <= 0:
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
) -> None:
    """Start the service: the database up and migrated, then serve until stopped."""
    from revisit.daemon.service import run_service

    seconds = parse_duration(duration) if duration is not None else None
    settings = _settings(ctx)
    run_service(settings, duration_s=seconds, report=_print_status)


@app.command()
def status(ctx: typer.Context) -> None:
    """Row counts per table, the latest scene and model version, and where the database is."""
    from revisit.db.engine import Database
    from revisit.db.status import collect_status

    with Database(_settings(ctx)) as db, db.engine.connect() as conn:
        _print_status(db, collect_status(conn))


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
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        print("revisit: aborted", file=sys.stderr)
        return EXIT_ERROR
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
