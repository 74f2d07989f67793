"""Schema migrations through Alembic, driven from Python.

The migration scripts ship inside the package (``revisit/db/migrations``), so
an installed ``revisit`` (``pip install .``, a wheel) can create and upgrade its
schema from any directory. ``alembic.ini`` at the root of a source checkout
points plain ``alembic`` (``alembic revision --autogenerate``) at the same scripts.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

from revisit.errors import MigrationError

#: The Alembic script directory: env.py, script.py.mako and versions/.
SCRIPTS = Path(__file__).resolve().parent / "migrations"


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic Config for revisit's migrations, bound to ``connection`` if given.

    Built in code rather than read from an ini file, so that it works wherever
    the package is installed.

    Raises:
        MigrationError: The migration scripts are missing from the installed package.
    """
    if not (SCRIPTS / "env.py").is_file() or not (SCRIPTS / "versions").is_dir():
        raise MigrationError(
            f"revisit's migration scripts are missing from {SCRIPTS}: the package is "
            "installed incompletely; reinstall it (`pip install --force-reinstall revisit`)"
        )
    config = Config()
    config.set_main_option("script_location", str(SCRIPTS))
    config.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    config.set_main_option("path_separator", "os")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest revision of the migration scripts."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise MigrationError("no migration scripts found")
    return head


def current_revision(conn: Connection) -> str | None:
    """The revision the database is at, or None for an empty database."""
    return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema up to ``revision`` in one transaction."""
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Take the schema down to ``revision`` (``base`` drops everything revisit made)."""
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), revision)
