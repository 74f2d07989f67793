"""``revisit alerts``: change alerts, and the webhooks of each AOI that receive them.

An alert is raised by the database whenever a location's classification flips
(docs/alerts.md); these commands list them and manage the webhooks the daemon
delivers them to.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.table import Table

from revisit.cli._common import get_settings, stdout

alerts_app = typer.Typer(
    help="Change alerts: when a location turns changed (or back), and webhooks that receive them."
)

_FORMATS = ("table", "json")


def _format(value: str) -> str:
    if value not in _FORMATS:
        raise typer.BadParameter(f"--format must be table or json, not {value!r}")
    return value


def _when(value: datetime | None) -> str:
    return "" if value is None else f"{value:%Y-%m-%d %H:%M:%S}"


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


@alerts_app.command("add")
def alerts_add(
    ctx: typer.Context,
    aoi: Annotated[str, typer.Argument(help="The AOI whose alerts the URL receives.")],
    url: Annotated[str, typer.Option(help="An http:// or https:// URL to POST each alert to.")],
) -> None:
    """Add a webhook: the daemon POSTs each new alert of the AOI to URL, signed."""
    from revisit.daemon.alerts import validate_webhook_url
    from revisit.db.alerts import create_webhook
    from revisit.db.aois import get_aoi
    from revisit.db.engine import Database

    try:
        url = validate_webhook_url(url)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--url") from None
    settings = get_settings(ctx)
    with Database(settings) as db, db.engine.begin() as conn:
        found = get_aoi(conn, aoi)
        webhook_id = create_webhook(conn, aoi_id=found.id, url=url)
    stdout.print(f"webhook #{webhook_id} for AOI {found.name}: {url}")
    if settings.alerts.webhook_secret is None:
        print(
            "revisit: warning: alerts.webhook_secret is not set, so nothing is sent to this"
            " webhook until it is (set REVISIT_ALERTS__WEBHOOK_SECRET, e.g. to the output of"
            " `openssl rand -hex 32`); the alerts wait meanwhile",
            file=sys.stderr,
        )


@alerts_app.command("list")
def alerts_list(
    ctx: typer.Context,
    aoi: Annotated[str | None, typer.Option(help="Only this AOI's webhooks.")] = None,
) -> None:
    """List the webhooks: their AOI, URL, state and deliveries."""
    from revisit.config import redact_url
    from revisit.db.alerts import list_webhooks
    from revisit.db.aois import get_aoi
    from revisit.db.engine import Database

    with Database(get_settings(ctx)) as db, db.engine.connect() as conn:
        aoi_id = get_aoi(conn, aoi).id if aoi is not None else None
        hooks = list_webhooks(conn, aoi_id=aoi_id)
    table = Table(
        "id", "aoi", "url", "state", "pending", "delivered", "failed", "last error",
        show_edge=False,
    )  # fmt: skip
    for w in hooks:
        if not w.active:
            state = "paused"
        elif w.consecutive_failures:
            retry = f", next try {_when(w.retry_at)}" if w.retry_at is not None else ""
            state = f"failing ({w.consecutive_failures} in a row{retry})"
        else:
            state = "active"
        table.add_row(
            str(w.id), w.aoi_name, redact_url(w.url), state, str(w.pending), str(w.delivered),
            str(w.failed), (w.last_error or "")[:80],
        )  # fmt: skip
    stdout.print(table)
    stdout.print(f"{len(hooks)} webhooks")


@alerts_app.command("remove")
def alerts_remove(
    ctx: typer.Context,
    webhook_id: Annotated[int, typer.Argument(help="The webhook's id (see `alerts list`).")],
) -> None:
    """Remove a webhook and its deliveries (the alerts stay)."""
    from revisit.db.alerts import remove_webhook
    from revisit.db.engine import Database

    with Database(get_settings(ctx)) as db, db.engine.begin() as conn:
        remove_webhook(conn, webhook_id)
    stdout.print(f"webhook #{webhook_id} removed")


@alerts_app.command("pause")
def alerts_pause(
    ctx: typer.Context,
    webhook_id: Annotated[int, typer.Argument(help="The webhook's id (see `alerts list`).")],
) -> None:
    """Stop sending to a webhook; its alerts wait (up to alerts.max_age_s)."""
    from revisit.db.alerts import set_webhook_active
    from revisit.db.engine import Database

    with Database(get_settings(ctx)) as db, db.engine.begin() as conn:
        set_webhook_active(conn, webhook_id, active=False)
    stdout.print(f"webhook #{webhook_id} paused")


@alerts_app.command("resume")
def alerts_resume(
    ctx: typer.Context,
    webhook_id: Annotated[int, typer.Argument(help="The webhook's id (see `alerts list`).")],
) -> None:
    """Send to a paused (or backing-off) webhook again, from its oldest waiting alert."""
    from revisit.db.alerts import set_webhook_active
    from revisit.db.engine import Database

    with Database(get_settings(ctx)) as db, db.engine.begin() as conn:
        set_webhook_active(conn, webhook_id, active=True)
    stdout.print(f"webhook #{webhook_id} resumed")


def _alert_json(alert: Any) -> dict[str, Any]:
    return {
        "alert_id": alert.id,
        "location_id": alert.location_id,
        "lon": alert.lon,
        "lat": alert.lat,
        "aois": [{"id": i, "name": n} for i, n in zip(alert.aoi_ids, alert.aoi_names, strict=True)],
        "changed": alert.changed,
        "r": alert.ratio_ema,
        "change_probability": alert.change_probability,
        "model_version_id": alert.model_version_id,
        "created_at": _iso(alert.created_at),
    }


@alerts_app.command("recent")
def alerts_recent(
    ctx: typer.Context,
    aoi: Annotated[str | None, typer.Option(help="Only alerts raised in this AOI.")] = None,
    location: Annotated[int | None, typer.Option(help="Only this location's alerts.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many.")] = 20,
    output: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """The latest alerts, newest first: which location flipped, which way, and its r."""
    from revisit.db.alerts import recent_alerts
    from revisit.db.aois import get_aoi
    from revisit.db.engine import Database

    output = _format(output)
    with Database(get_settings(ctx)) as db, db.engine.connect() as conn:
        aoi_id = get_aoi(conn, aoi).id if aoi is not None else None
        rows = recent_alerts(conn, limit=limit, aoi_id=aoi_id, location_id=location)
    if output == "json":
        print(json.dumps([_alert_json(a) for a in rows]))
        return
    table = Table("id", "raised", "location", "lon", "lat", "turned", "r", "p", "aois",
                  show_edge=False)  # fmt: skip
    for a in rows:
        table.add_row(
            str(a.id), _when(a.created_at), str(a.location_id), f"{a.lon:.5f}", f"{a.lat:.5f}",
            "changed" if a.changed else "unchanged", f"{a.ratio_ema:.3f}",
            "" if a.change_probability is None else f"{a.change_probability:.3f}",
            ", ".join(a.aoi_names),
        )  # fmt: skip
    stdout.print(table)
    stdout.print(f"{len(rows)} alerts")


@alerts_app.command("show")
def alerts_show(
    ctx: typer.Context,
    alert_id: Annotated[int, typer.Argument(help="The alert's id (see `alerts recent`).")],
    output: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """One alert, and its delivery to each webhook (status, attempts, last error)."""
    from revisit.daemon.alerts import idempotency_key
    from revisit.db.alerts import deliveries_of, get_alert
    from revisit.db.engine import Database
    from revisit.errors import RevisitError

    output = _format(output)
    with Database(get_settings(ctx)) as db, db.engine.connect() as conn:
        alert = get_alert(conn, alert_id)
        if alert is None:
            raise RevisitError(f"no alert #{alert_id} (see `revisit alerts recent`)")
        deliveries = deliveries_of(conn, alert_id)
    if output == "json":
        out = _alert_json(alert)
        out["deliveries"] = [
            {
                "webhook_id": d.webhook_id,
                "idempotency_key": idempotency_key(d.alert_id, d.webhook_id),
                "status": d.status,
                "attempts": d.attempts,
                "last_error": d.last_error,
                "delivered_at": _iso(d.delivered_at),
            }
            for d in deliveries
        ]
        print(json.dumps(out))
        return
    turned = "changed" if alert.changed else "unchanged"
    prob = "" if alert.change_probability is None else f", p {alert.change_probability:.3f}"
    stdout.print(
        f"alert #{alert.id}, {_when(alert.created_at)}: location {alert.location_id}"
        f" ({alert.lon:.5f}, {alert.lat:.5f}) turned {turned}, r {alert.ratio_ema:.3f}{prob};"
        f" AOIs: {', '.join(alert.aoi_names) or 'none'}"
    )
    table = Table("webhook", "idempotency key", "status", "attempts", "delivered", "last error",
                  show_edge=False)  # fmt: skip
    for d in deliveries:
        table.add_row(
            str(d.webhook_id), idempotency_key(d.alert_id, d.webhook_id), d.status,
            str(d.attempts), _when(d.delivered_at), (d.last_error or "")[:80],
        )  # fmt: skip
    stdout.print(table)


@alerts_app.command("deliver")
def alerts_deliver(ctx: typer.Context) -> None:
    """Send the due webhook deliveries now, and exit (what `revisit run` does every few seconds)."""
    from revisit.daemon.alerts import deliver_due
    from revisit.db.engine import Database
    from revisit.errors import ConfigError

    settings = get_settings(ctx)
    if settings.alerts.webhook_secret is None:
        raise ConfigError(
            "alerts.webhook_secret (REVISIT_ALERTS__WEBHOOK_SECRET) is not set:"
            " revisit sends no unsigned webhook"
        )
    with Database(settings) as db:
        report = deliver_due(db.engine, settings.alerts)
    stdout.print(report.line())
