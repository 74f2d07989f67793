"""Quarantine: input that was rejected, with its reason. Nothing rejected is lost."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection


def quarantine(
    conn: Connection,
    *,
    source: str,
    ref: str,
    reason: str,
    detail: str,
    location_id: int | None = None,
    payload: Mapping[str, Any] | None = None,
) -> None:
    """Record a rejected product (``location_id`` None) or one location's chip of it.

    The same thing rejected again updates its row rather than adding one.
    """
    conn.execute(
        sa.text(
            """
            INSERT INTO quarantine (source, ref, location_id, reason, detail, payload)
            VALUES (:source, :ref, :location_id, :reason, :detail, CAST(:payload AS jsonb))
            ON CONFLICT (source, ref, location_id) DO UPDATE
            SET reason = EXCLUDED.reason, detail = EXCLUDED.detail,
                payload = EXCLUDED.payload, created_at = now()
            """
        ),
        {
            "source": source,
            "ref": ref,
            "location_id": location_id,
            "reason": reason,
            "detail": detail,
            "payload": json.dumps(dict(payload or {}), default=str),
        },
    )


def count_by_reason(conn: Connection, *, source: str | None = None) -> dict[str, int]:
    query = "SELECT reason, count(*) FROM quarantine"
    params: dict[str, object] = {}
    if source is not None:
        query += " WHERE source = :source"
        params["source"] = source
    query += " GROUP BY reason ORDER BY reason"
    return {str(r): int(n) for r, n in conn.execute(sa.text(query), params)}
