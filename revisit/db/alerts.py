"""Change alerts, the webhooks that receive them, and their deliveries (DESIGN §5).

An alert is raised by the database itself: triggers on ``change_estimate``
(migration 0008) insert a ``change_alert`` row whenever a location's
classification flips, one ``alert_delivery`` row for each webhook of the AOIs
holding the location, and send ``NOTIFY revisit_change`` with the alert as JSON,
all inside the transaction that wrote the estimate, whoever wrote it. (Row
triggers with a ``WHEN`` clause rather than statement triggers with transition
tables: a batch without flips, the usual one, then costs nothing; the
migration's docstring has the measurements.) This module reads them, manages
the webhooks, and gives the delivery job (:mod:`revisit.daemon.alerts`) its
claims and records.

Back-off belongs to the webhook, not to each delivery (``alert_webhook.retry_at``,
``consecutive_failures``): a receiver that is down gets one probe per back-off
interval instead of one request per waiting alert, each doubling on its own,
and the first 2xx after an outage makes its whole backlog due at once instead
of each delivery waiting out its own back-off. A claim
is a lease (``next_attempt_at`` moved forward, committed) taken with
``FOR UPDATE SKIP LOCKED``, so two delivery processes never send the same
delivery at once, and a process killed mid-delivery leaves it to be sent again
once the lease ends. Every function runs inside the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from revisit.errors import RevisitError

#: The channel of the NOTIFY sent for every alert.
CHANNEL = "revisit_change"


class WebhookNotFoundError(RevisitError, LookupError):
    """No webhook has the given id."""


class WebhookExistsError(RevisitError, ValueError):
    """The AOI has a webhook with that URL already."""


@dataclass(frozen=True)
class AlertRow:
    """One flip of a location's classification (a ``change_alert`` row)."""

    id: int
    location_id: int
    lon: float
    lat: float
    aoi_ids: list[int]
    aoi_names: list[str]
    #: The new classification: True when the location turned changed, False when back.
    changed: bool
    ratio_ema: float
    change_probability: float | None
    model_version_id: int | None
    created_at: datetime


@dataclass(frozen=True)
class WebhookRow:
    """One webhook with its delivery counts."""

    id: int
    aoi_id: int
    aoi_name: str
    url: str
    active: bool
    consecutive_failures: int
    retry_at: datetime | None
    last_error: str | None
    last_delivered_at: datetime | None
    created_at: datetime
    pending: int
    delivered: int
    failed: int


@dataclass(frozen=True)
class DeliveryRow:
    """One alert for one webhook (an ``alert_delivery`` row)."""

    alert_id: int
    webhook_id: int
    url: str
    status: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    delivered_at: datetime | None


@dataclass(frozen=True)
class ClaimedDelivery:
    """A delivery this process holds a lease on, with what it sends."""

    alert: AlertRow
    webhook_id: int
    url: str
    #: POSTs before this one.
    attempts: int


_ALERT_COLUMNS = (
    "c.id, c.location_id, ST_X(l.geom) AS lon, ST_Y(l.geom) AS lat, c.aoi_ids, c.aoi_names,"
    " c.changed, c.ratio_ema, c.change_probability, c.model_version_id, c.created_at"
)


def _alert(row: Any) -> AlertRow:
    return AlertRow(
        id=int(row.id),
        location_id=int(row.location_id),
        lon=float(row.lon),
        lat=float(row.lat),
        aoi_ids=[int(i) for i in row.aoi_ids],
        aoi_names=[str(n) for n in row.aoi_names],
        changed=bool(row.changed),
        ratio_ema=float(row.ratio_ema),
        change_probability=None
        if row.change_probability is None
        else float(row.change_probability),
        model_version_id=None if row.model_version_id is None else int(row.model_version_id),
        created_at=row.created_at,
    )


def recent_alerts(
    conn: Connection,
    *,
    limit: int = 20,
    aoi_id: int | None = None,
    location_id: int | None = None,
) -> list[AlertRow]:
    """The newest alerts, newest first.

    Args:
        conn: A connection inside the caller's transaction.
        limit: At most this many.
        aoi_id: Only the alerts raised in this AOI.
        location_id: Only this location's alerts.

    Returns:
        The alerts.

    Raises:
        ValueError: ``limit`` is below 1.
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1, not {limit}")
    rows = conn.execute(
        sa.text(
            f"SELECT {_ALERT_COLUMNS} FROM change_alert c JOIN location l ON l.id = c.location_id"
            " WHERE (CAST(:aoi AS bigint) IS NULL OR c.aoi_ids @> ARRAY[CAST(:aoi AS bigint)])"
            " AND (CAST(:loc AS bigint) IS NULL OR c.location_id = CAST(:loc AS bigint))"
            " ORDER BY c.id DESC LIMIT :limit"
        ),
        {"aoi": aoi_id, "loc": location_id, "limit": int(limit)},
    )
    return [_alert(row) for row in rows]


def get_alert(conn: Connection, alert_id: int) -> AlertRow | None:
    """The alert with this id, or None."""
    row = conn.execute(
        sa.text(
            f"SELECT {_ALERT_COLUMNS} FROM change_alert c JOIN location l ON l.id = c.location_id"
            " WHERE c.id = :id"
        ),
        {"id": int(alert_id)},
    ).first()
    return None if row is None else _alert(row)


def deliveries_of(conn: Connection, alert_id: int) -> list[DeliveryRow]:
    """The deliveries of one alert, by webhook id."""
    rows = conn.execute(
        sa.text(
            "SELECT d.alert_id, d.webhook_id, w.url, d.status, d.attempts, d.next_attempt_at,"
            " d.last_error, d.delivered_at FROM alert_delivery d"
            " JOIN alert_webhook w ON w.id = d.webhook_id"
            " WHERE d.alert_id = :id ORDER BY d.webhook_id"
        ),
        {"id": int(alert_id)},
    )
    return [
        DeliveryRow(
            alert_id=int(r.alert_id),
            webhook_id=int(r.webhook_id),
            url=str(r.url),
            status=str(r.status),
            attempts=int(r.attempts),
            next_attempt_at=r.next_attempt_at,
            last_error=r.last_error,
            delivered_at=r.delivered_at,
        )
        for r in rows
    ]


# -- webhooks ---------------------------------------------------------------------------------


def create_webhook(conn: Connection, *, aoi_id: int, url: str) -> int:
    """Add a webhook for an AOI's alerts from now on (earlier alerts are not sent to it).

    Args:
        conn: A connection inside the caller's transaction.
        aoi_id: The AOI.
        url: An http:// or https:// URL (validated by the caller).

    Returns:
        The webhook's id.

    Raises:
        WebhookExistsError: The AOI has a webhook with this URL already.
    """
    row = conn.execute(
        sa.text(
            "INSERT INTO alert_webhook (aoi_id, url) VALUES (:aoi, :url)"
            " ON CONFLICT (aoi_id, url) DO NOTHING RETURNING id"
        ),
        {"aoi": int(aoi_id), "url": url},
    ).first()
    if row is None:
        existing = conn.execute(
            sa.text("SELECT id FROM alert_webhook WHERE aoi_id = :aoi AND url = :url"),
            {"aoi": int(aoi_id), "url": url},
        ).scalar_one()
        raise WebhookExistsError(f"the AOI has this webhook already (#{existing})")
    return int(row[0])


def list_webhooks(conn: Connection, *, aoi_id: int | None = None) -> list[WebhookRow]:
    """The webhooks (of one AOI, or all), by id, with their deliveries counted by status."""
    rows = conn.execute(
        sa.text(
            "SELECT w.id, w.aoi_id, a.name AS aoi_name, w.url, w.active, w.consecutive_failures,"
            " w.retry_at, w.last_error, w.last_delivered_at, w.created_at,"
            " count(d.alert_id) FILTER (WHERE d.status = 'pending') AS pending,"
            " count(d.alert_id) FILTER (WHERE d.status = 'delivered') AS delivered,"
            " count(d.alert_id) FILTER (WHERE d.status = 'failed') AS failed"
            " FROM alert_webhook w JOIN aoi a ON a.id = w.aoi_id"
            " LEFT JOIN alert_delivery d ON d.webhook_id = w.id"
            " WHERE CAST(:aoi AS bigint) IS NULL OR w.aoi_id = CAST(:aoi AS bigint)"
            " GROUP BY w.id, a.name ORDER BY w.id"
        ),
        {"aoi": aoi_id},
    )
    return [
        WebhookRow(
            id=int(r.id),
            aoi_id=int(r.aoi_id),
            aoi_name=str(r.aoi_name),
            url=str(r.url),
            active=bool(r.active),
            consecutive_failures=int(r.consecutive_failures),
            retry_at=r.retry_at,
            last_error=r.last_error,
            last_delivered_at=r.last_delivered_at,
            created_at=r.created_at,
            pending=int(r.pending),
            delivered=int(r.delivered),
            failed=int(r.failed),
        )
        for r in rows
    ]


def get_webhook(conn: Connection, webhook_id: int) -> WebhookRow:
    """The webhook with this id.

    Raises:
        WebhookNotFoundError: There is none.
    """
    found = next((w for w in list_webhooks(conn) if w.id == webhook_id), None)
    if found is None:
        raise WebhookNotFoundError(f"no webhook #{webhook_id} (see `revisit alerts list`)")
    return found


def remove_webhook(conn: Connection, webhook_id: int) -> None:
    """Delete a webhook and its deliveries (the alerts stay).

    Raises:
        WebhookNotFoundError: There is none.
    """
    deleted = conn.execute(
        sa.text("DELETE FROM alert_webhook WHERE id = :id"), {"id": int(webhook_id)}
    ).rowcount
    if not deleted:
        raise WebhookNotFoundError(f"no webhook #{webhook_id} (see `revisit alerts list`)")


def set_webhook_active(conn: Connection, webhook_id: int, *, active: bool) -> None:
    """Pause a webhook (its deliveries wait, and age) or resume it (at once, back-off reset).

    Raises:
        WebhookNotFoundError: There is none.
    """
    updated = conn.execute(
        sa.text(
            "UPDATE alert_webhook SET active = :active,"
            " retry_at = CASE WHEN :active THEN NULL ELSE retry_at END,"
            " consecutive_failures = CASE WHEN :active THEN 0 ELSE consecutive_failures END"
            " WHERE id = :id"
        ),
        {"id": int(webhook_id), "active": active},
    ).rowcount
    if not updated:
        raise WebhookNotFoundError(f"no webhook #{webhook_id} (see `revisit alerts list`)")


# -- deliveries -------------------------------------------------------------------------------


def claim_delivery(
    conn: Connection, *, lease_s: float, skip_webhooks: Sequence[int] = ()
) -> ClaimedDelivery | None:
    """Take the lease on the next due delivery, if any; the caller commits at once.

    Due: pending, not leased, of an active webhook that is not backing off. The
    webhooks take turns, the one served least recently first, so one with a big
    backlog does not starve the others. To a healthy webhook the oldest alert
    goes first, so a receiver gets each location's flips in order; to a failing
    one, the delivery tried least often (then the oldest), so one delivery the
    receiver keeps refusing does not hold back the others: once a probe gets
    through, the backlog follows oldest first. Each step is an index scan of one
    webhook's pending deliveries, whatever the backlog.

    Args:
        conn: A connection inside the caller's transaction.
        lease_s: No other claim takes it for this long.
        skip_webhooks: Webhooks not to send to now (they failed in this run).

    Returns:
        The delivery with its alert and URL, or None when nothing is due.
    """
    webhooks = conn.execute(
        sa.text(
            "SELECT id, consecutive_failures > 0 AS failing FROM alert_webhook"
            " WHERE active AND (retry_at IS NULL OR retry_at <= now())"
            " AND id <> ALL(CAST(:skip AS bigint[]))"
            " ORDER BY last_delivered_at NULLS FIRST, id"
        ),
        {"skip": [int(w) for w in skip_webhooks]},
    ).all()
    claimed = None
    for webhook_id, failing in webhooks:
        order = "attempts, alert_id" if failing else "alert_id"
        claimed = conn.execute(
            sa.text(
                "WITH due AS (SELECT alert_id, webhook_id FROM alert_delivery"
                " WHERE webhook_id = :w AND status = 'pending' AND next_attempt_at <= now()"
                f" ORDER BY {order} LIMIT 1 FOR UPDATE SKIP LOCKED)"
                " UPDATE alert_delivery d"
                " SET next_attempt_at = now() + make_interval(secs => :lease)"
                " FROM due WHERE d.alert_id = due.alert_id AND d.webhook_id = due.webhook_id"
                " RETURNING d.alert_id, d.webhook_id, d.attempts"
            ),
            {"w": int(webhook_id), "lease": float(lease_s)},
        ).first()
        if claimed is not None:
            break
    if claimed is None:
        return None
    alert = get_alert(conn, int(claimed.alert_id))
    url = conn.execute(
        sa.text("SELECT url FROM alert_webhook WHERE id = :id"), {"id": claimed.webhook_id}
    ).scalar_one()
    if alert is None:  # cannot be: the delivery row references it
        raise LookupError(f"alert {claimed.alert_id} of a claimed delivery is gone")
    return ClaimedDelivery(
        alert=alert,
        webhook_id=int(claimed.webhook_id),
        url=str(url),
        attempts=int(claimed.attempts),
    )


def record_delivered(conn: Connection, *, alert_id: int, webhook_id: int) -> None:
    """The receiver answered 2xx: the delivery is done, and the webhook's backlog is due now."""
    params = {"a": int(alert_id), "w": int(webhook_id)}
    conn.execute(
        sa.text(
            "UPDATE alert_delivery SET status = 'delivered', attempts = attempts + 1,"
            " delivered_at = now(), last_error = NULL"
            " WHERE alert_id = :a AND webhook_id = :w AND status = 'pending'"
        ),
        params,
    )
    conn.execute(
        sa.text(
            "UPDATE alert_webhook SET consecutive_failures = 0, retry_at = NULL,"
            " last_error = NULL, last_delivered_at = now() WHERE id = :w"
        ),
        params,
    )


@dataclass(frozen=True)
class FailedAttempt:
    """What one failed attempt led to."""

    #: The delivery is given up (``failed``): its alert is older than the maximum age.
    gave_up: bool
    #: Failed attempts to the webhook in a row, this one included.
    consecutive_failures: int
    #: Seconds until the webhook is tried again.
    retry_in_s: float


def record_failed_attempt(
    conn: Connection,
    *,
    alert_id: int,
    webhook_id: int,
    error: str,
    backoff_s: float,
    max_backoff_s: float,
    max_age_s: float,
    retry_after_s: float | None = None,
) -> FailedAttempt:
    """The receiver refused, failed or did not answer: back the webhook off.

    The webhook waits ``backoff_s`` after its first failure in a row, doubling up
    to ``max_backoff_s`` (at least ``retry_after_s`` when the receiver asked for
    it, within the same cap). The delivery stays pending (its lease ends now),
    or is failed when its alert is older than ``max_age_s``.

    Returns:
        Whether the delivery was given up, and the webhook's new back-off.
    """
    params = {
        "a": int(alert_id),
        "w": int(webhook_id),
        "error": error[:1000],
        "age": float(max_age_s),
        "backoff": float(backoff_s),
        "cap": float(max_backoff_s),
        "after": float(retry_after_s or 0.0),
    }
    status = conn.execute(
        sa.text(
            "UPDATE alert_delivery d SET attempts = d.attempts + 1, last_error = :error,"
            " next_attempt_at = now(),"
            " status = CASE WHEN c.created_at < now() - make_interval(secs => :age)"
            " THEN 'failed' ELSE 'pending' END"
            " FROM change_alert c WHERE c.id = d.alert_id"
            " AND d.alert_id = :a AND d.webhook_id = :w AND d.status = 'pending'"
            " RETURNING d.status"
        ),
        params,
    ).scalar_one_or_none()
    backoff = conn.execute(
        sa.text(
            "WITH delay AS (SELECT least(:cap, greatest(:after,"
            " :backoff * power(2, least(w.consecutive_failures, 60)))) AS s"
            " FROM alert_webhook w WHERE w.id = :w)"
            " UPDATE alert_webhook w SET consecutive_failures = w.consecutive_failures + 1,"
            " last_error = :error, retry_at = now() + make_interval(secs => delay.s)"
            " FROM delay WHERE w.id = :w RETURNING w.consecutive_failures, delay.s"
        ),
        params,
    ).first()
    if backoff is None:  # the webhook was removed meanwhile, its deliveries with it
        return FailedAttempt(gave_up=False, consecutive_failures=0, retry_in_s=0.0)
    return FailedAttempt(
        gave_up=status == "failed",
        consecutive_failures=int(backoff[0]),
        retry_in_s=float(backoff[1]),
    )


def give_up_expired(conn: Connection, *, max_age_s: float) -> int:
    """Fail the pending deliveries whose alert is older than ``max_age_s`` (not leased ones).

    These are deliveries of a webhook that is paused, or backing off past their
    age; ``last_error`` keeps the reason of their last attempt.

    Returns:
        How many were given up.
    """
    return int(
        conn.execute(
            sa.text(
                "UPDATE alert_delivery d SET status = 'failed',"
                " last_error = COALESCE(d.last_error, 'never attempted')"
                " FROM change_alert c WHERE c.id = d.alert_id AND d.status = 'pending'"
                " AND d.next_attempt_at <= now()"
                " AND c.created_at < now() - make_interval(secs => :age)"
            ),
            {"age": float(max_age_s)},
        ).rowcount
    )


def pending_deliveries(conn: Connection) -> int:
    """How many deliveries are pending (due now, leased, or waiting on a back-off)."""
    return int(
        conn.execute(
            sa.text("SELECT count(*) FROM alert_delivery WHERE status = 'pending'")
        ).scalar_one()
    )
