"""Logins for people who read the change estimates: members of revisit_reader."""

from __future__ import annotations

import re

import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.engine import Connection

from revisit.db.copy import driver_connection
from revisit.db.models import READER_ROLE
from revisit.errors import RevisitError

_ROLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_RESERVED = {"revisit", READER_ROLE, "postgres", "public"}


class RoleError(RevisitError, ValueError):
    """A login cannot be made or changed as asked."""


def validate_role_name(name: str) -> str:
    """A PostgreSQL role name revisit will create: lower-case letters, digits, ``_``.

    Raises:
        RoleError: The name is malformed or reserved.
    """
    if not _ROLE_NAME.fullmatch(name) or name.startswith("pg_"):
        raise RoleError(
            f"bad role name {name[:80]!r}: use 1-63 lower-case letters, digits or '_', "
            "starting with a letter or '_', not 'pg_'"
        )
    if name in _RESERVED:
        raise RoleError(f"role name {name!r} is reserved")
    return name


def grant_reader(conn: Connection, *, name: str, password: str) -> bool:
    """Create a login in ``revisit_reader``, or reset an existing reader's password.

    The password is turned into a SCRAM-SHA-256 verifier on the client
    (libpq's PQencryptPasswordConn): the server, its logs included, never sees it.

    Returns:
        True if the login was created, False if an existing one was updated.

    Raises:
        RoleError: A bad name, an empty password, or a role that is more than a
            plain login (a superuser, one that can create roles or databases).
    """
    validate_role_name(name)
    if not password:
        raise RoleError("the password is empty")
    if "\n" in password or "\x00" in password:
        raise RoleError("the password holds a newline or NUL")
    existing = conn.execute(
        sa.text(
            "SELECT rolsuper OR rolcreaterole OR rolcreatedb OR rolreplication OR rolbypassrls"
            " FROM pg_roles WHERE rolname = :n"
        ),
        {"n": name},
    ).first()
    if existing is not None and existing[0]:
        raise RoleError(f"role {name!r} exists and has powers beyond reading; left alone")
    raw = driver_connection(conn)
    verifier = raw.pgconn.encrypt_password(
        password.encode(), name.encode(), b"scram-sha-256"
    ).decode()
    statement = (
        "ALTER ROLE {name} WITH LOGIN PASSWORD {verifier}"
        if existing is not None
        else "CREATE ROLE {name} WITH LOGIN PASSWORD {verifier}"
    )
    with raw.cursor() as cursor:
        cursor.execute(
            sql.SQL(statement).format(name=sql.Identifier(name), verifier=sql.Literal(verifier))
        )
        cursor.execute(
            sql.SQL("GRANT {} TO {}").format(sql.Identifier(READER_ROLE), sql.Identifier(name))
        )
    return existing is None
