"""The ``revisit`` command line.

Settings are built once, here, from ``--config FILE`` (or ``REVISIT_CONFIG``)
and ``REVISIT_*`` environment variables, and passed down. Errors revisit
expects end the program with one line on standard error and a non-zero
status: 2 for a bad setting or usage, 1 for anything else.

This module assembles the root ``app`` from one module per command group
(``db``, ``aoi``, ``alerts``, ``chips``, ``query``, ``export``, ``changemap``)
and the root's own commands (``service``: run, status; ``ingest``: sample,
ingest; ``learn``). Each command imports what it needs when it runs, so that
``revisit --help`` loads neither torch nor the database drivers.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.exceptions import TyperException

from revisit import __version__
from revisit.cli import (
    alerts,
    aoi,
    changemap,
    chips,
    db,
    export,
    ingest,
    learn,
    query,
    service,
)
from revisit.cli._common import EXIT_ERROR, EXIT_USAGE, State, stdout
from revisit.errors import ConfigError, RevisitError

__all__ = ["app", "main"]

app = typer.Typer(
    name="revisit",
    help="A service that learns from every Sentinel-2 revisit.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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
    ctx.obj = State(config_file=config)


# The order here is the order of `revisit --help`.
app.command()(service.run)
app.command()(service.status)
app.command()(ingest.sample)
app.command()(ingest.ingest)
app.command()(learn.learn)
app.add_typer(db.db_app, name="db")
app.add_typer(aoi.aoi_app, name="aoi")
app.add_typer(alerts.alerts_app, name="alerts")
app.add_typer(chips.chips_app, name="chips")
app.add_typer(query.query_app, name="query")
app.add_typer(export.export_app, name="export")
app.add_typer(changemap.changemap_app, name="changemap")


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
