"""Alembic environment: the URL comes from revisit's Settings, the metadata from its models.

Called from revisit (``revisit db upgrade``), the connection is handed in
through ``config.attributes["connection"]``. Called as plain ``alembic``, it
builds Settings (``REVISIT_CONFIG`` names an optional TOML file) and opens the
database itself, starting the embedded cluster when no URL is set.
"""

from __future__ import annotations

import os
from pathlib import Path

from alembic import context
from geoalchemy2 import alembic_helpers
from sqlalchemy.engine import Connection

from revisit.db.models import Base

# Two revisit processes upgrading at once must not interleave; this key is
# arbitrary but fixed ("revisit" in ASCII).
MIGRATION_LOCK_KEY = 0x72657669736974

target_metadata = Base.metadata


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        include_object=alembic_helpers.include_object,
        process_revision_directives=alembic_helpers.writer,
        render_item=alembic_helpers.render_item,
        compare_type=True,
        transaction_per_migration=False,
    )


def _run(connection: Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from revisit.config import load_settings
    from revisit.db.engine import Database

    config_file = os.environ.get("REVISIT_CONFIG")
    settings = load_settings(Path(config_file) if config_file else None)
    with Database(settings) as db, db.engine.connect() as conn:
        _run(conn)
        conn.commit()


if context.is_offline_mode():
    raise SystemExit("revisit's migrations run online only: they need the PostGIS server")
run_migrations_online()
