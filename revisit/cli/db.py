"""``revisit db``: migrations, the database's URL, the embedded cluster, reader logins."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from revisit.cli._common import get_settings, stdout
from revisit.errors import EmbeddedDatabaseError

if TYPE_CHECKING:
    from revisit.db.embedded import EmbeddedPostgres

db_app = typer.Typer(help="The database: migrations, its URL, the embedded cluster.")


@db_app.command("upgrade")
def db_upgrade(
    ctx: typer.Context,
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Apply migrations up to REVISION (default: the newest)."""
    from revisit.db.engine import Database
    from revisit.db.migrate import current_revision, upgrade

    with Database(get_settings(ctx)) as db:
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

    with Database(get_settings(ctx)) as db:
        downgrade(db.engine, revision)
        with db.engine.connect() as conn:
            stdout.print(f"schema at {current_revision(conn) or 'base (empty)'}")


@db_app.command("current")
def db_current(ctx: typer.Context) -> None:
    """Print the schema revision of the database and whether it is the newest."""
    from revisit.db.engine import Database
    from revisit.db.migrate import current_revision, head_revision

    with Database(get_settings(ctx)) as db, db.engine.connect() as conn:
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

    db = Database(get_settings(ctx))
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
    with Database(get_settings(ctx)) as db, db.engine.begin() as conn:
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

    db = Database(get_settings(ctx))
    if db.embedded is None:
        raise EmbeddedDatabaseError(
            "REVISIT_DATABASE_URL is set: revisit does not start or stop that server"
        )
    return db.embedded
