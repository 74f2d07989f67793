"""Schema migrations through Alembic, driven from Python.

The migration scripts live in ``alembic/`` at the root of the source tree
(revisit runs from a checkout, installed with ``pip install -e .``).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

from revisit.errors import MigrationError

ROOT = Path(__file__).resolve().parents[2]


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic Config for revisit's migrations, bound to ``connection`` if given.

    Raises:
        MigrationError: The migration scripts are not where a source checkout has them.
    """
    ini = ROOT / "alembic.ini"
    if not ini.is_file() or not (ROOT / "alembic" / "env.py").is_file():
        raise MigrationError(
            f"migration scripts not found next to the package ({ROOT}/alembic): "
            "install revisit from its source tree with `pip install -e .`"
        )
    config = Config(str(ini))
    config.set_main_option("script_location", str(ROOT / "alembic"))
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
