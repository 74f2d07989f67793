"""Webhook delivery of change alerts: signed JSON POSTs, at least once, with an idempotency key.

The database raises the alerts and queues one delivery per alert and webhook
(:mod:`revisit.db.alerts`); :func:`deliver_due` sends what is due. It is the
daemon's ``alerts:deliver`` job (leader only, every ``alerts.deliver_every_s``)
and ``revisit alerts deliver``. For each delivery, in three steps:

1. claim it (a lease, committed: ``FOR UPDATE SKIP LOCKED``, so concurrent
   senders never take the same one);
2. POST its JSON with the headers ``Idempotency-Key: revisit-<alert>-<webhook>``
   (the same on every attempt), ``X-Revisit-Timestamp`` and
   ``X-Revisit-Signature: sha256=<hex HMAC-SHA256 of the raw body>`` under
   ``alerts.webhook_secret``;
3. record the outcome, committed: a 2xx is delivered; anything else (another
   status, a redirect, a timeout, a refused connection) backs the webhook off.

A sender killed between 2 and 3 leaves the delivery leased; once the lease
(``alerts.lease_s``) ends it is sent again with the same key. Delivery is
therefore at least once, and exactly once for a receiver that drops a key it
has already seen. Without a secret nothing is sent: an unsigned alert could be
forged by anyone who can reach the receiver, and a receiver cannot tell.
The secret never appears in a log line, an error or a payload.
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import json
import logging
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import requests
from sqlalchemy.engine import Engine

from revisit import __version__
from revisit.config import AlertSettings
from revisit.db import alerts as alerts_db
from revisit.db.alerts import AlertRow, ClaimedDelivery
from revisit.errors import ConfigError

log = logging.getLogger(__name__)

KEY_HEADER = "Idempotency-Key"
SIGNATURE_HEADER = "X-Revisit-Signature"
TIMESTAMP_HEADER = "X-Revisit-Timestamp"
#: The ``type`` of every alert payload.
PAYLOAD_TYPE = "revisit.change_alert"


def idempotency_key(alert_id: int, webhook_id: int) -> str:
    """The key of one alert for one webhook: the same on every attempt."""
    return f"revisit-{alert_id}-{webhook_id}"


def sign(body: bytes, secret: str) -> str:
    """The ``X-Revisit-Signature`` of a body: ``sha256=`` and the hex HMAC-SHA256."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def verify(body: bytes, signature: str, secret: str) -> bool:
    """Whether ``signature`` is the body's under ``secret`` (constant-time compare)."""
    return hmac.compare_digest(sign(body, secret), signature)


def validate_webhook_url(url: str) -> str:
    """A webhook URL revisit will POST to: http(s), with a host, no spaces.

    Raises:
        ValueError: It is not one; the message says why.
    """
    if len(url) > 2048:
        raise ValueError("the URL is longer than 2048 characters")
    if any(ch.isspace() for ch in url):
        raise ValueError("the URL holds white space")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"the URL must start with http:// or https://, not {url[:40]!r}")
    if not parts.hostname:
        raise ValueError("the URL has no host")
    try:
        parts.port  # noqa: B018  (a bad port raises here)
    except ValueError as exc:
        raise ValueError(f"the URL's port is not valid: {exc}") from None
    return url


def describe_url(url: str) -> str:
    """``scheme://host[:port]`` of a URL: what logs show (paths and queries may hold tokens)."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"


def payload(alert: AlertRow, *, webhook_id: int, attempt: int, sent_at: datetime) -> dict[str, Any]:
    """The JSON object POSTed for one alert to one webhook (docs/alerts.md).

    Args:
        alert: The alert.
        webhook_id: The webhook it goes to.
        attempt: 1 for the first POST, 2 for the first retry, ...
        sent_at: When this attempt is made (UTC).
    """
    return {
        "type": PAYLOAD_TYPE,
        "idempotency_key": idempotency_key(alert.id, webhook_id),
        "alert_id": alert.id,
        "location_id": alert.location_id,
        "lon": alert.lon,
        "lat": alert.lat,
        "aois": [
            {"id": aoi_id, "name": name}
            for aoi_id, name in zip(alert.aoi_ids, alert.aoi_names, strict=True)
        ],
        "changed": alert.changed,
        "r": _finite(alert.ratio_ema),
        "change_probability": _finite(alert.change_probability),
        "model_version_id": alert.model_version_id,
        "created_at": _iso(alert.created_at),
        "attempt": attempt,
        "sent_at": _iso(sent_at),
    }


def _finite(value: float | None) -> float | None:
    """JSON has no NaN or infinity: None for those (and None)."""
    return value if value is not None and math.isfinite(value) else None


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Response:
    """What a receiver answered."""

    status: int
    #: The first 200 characters of the body (for ``last_error``).
    text: str
    #: Seconds asked for by a ``Retry-After`` header, if any.
    retry_after_s: float | None = None


class Transport(Protocol):
    """How a POST reaches a receiver (the one HTTP boundary of alert delivery)."""

    def post(
        self, url: str, *, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> Response:
        """POST ``body``; raise ``OSError`` (``requests`` errors are) when there is no answer."""


class RequestsTransport:
    """:class:`Transport` over a ``requests`` session; redirects are not followed.

    (A redirect would carry a signed body to a URL nobody registered.)
    """

    def __init__(self) -> None:
        self._session = requests.Session()
        self._session.headers["User-Agent"] = f"revisit/{__version__}"

    def post(
        self, url: str, *, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> Response:
        reply = self._session.post(
            url,
            data=body,
            headers=dict(headers),
            timeout=(timeout_s, timeout_s),
            allow_redirects=False,
        )
        with reply:
            text = reply.text[:200]
            return Response(reply.status_code, text, _retry_after(reply.headers.get("Retry-After")))

    def close(self) -> None:
        self._session.close()


def _retry_after(value: str | None) -> float | None:
    """Seconds of a ``Retry-After`` header: a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


@dataclass(frozen=True)
class DeliveryReport:
    """What one delivery run did.

    Attributes:
        delivered: Deliveries answered 2xx.
        failed_attempts: POSTs that failed (each backs its webhook off).
        gave_up: Deliveries failed for good (their alert outlived ``alerts.max_age_s``).
        pending: Deliveries still pending after the run.
        failing_webhooks: Webhooks that failed in this run.
    """

    delivered: int
    failed_attempts: int
    gave_up: int
    pending: int
    failing_webhooks: tuple[int, ...] = ()

    @property
    def attempts(self) -> int:
        """POSTs made."""
        return self.delivered + self.failed_attempts

    def line(self) -> str:
        """One line for a person."""
        failing = (
            f" (failing: webhook {', '.join(f'#{w}' for w in self.failing_webhooks)})"
            if self.failing_webhooks
            else ""
        )
        return (
            f"{self.delivered} delivered, {self.failed_attempts} failed attempts{failing}, "
            f"{self.gave_up} given up, {self.pending} pending"
        )


def deliver_due(
    engine: Engine,
    settings: AlertSettings,
    *,
    stop: threading.Event | None = None,
    transport: Transport | None = None,
    max_seconds: float | None = None,
) -> DeliveryReport:
    """Send every due delivery (up to ``alerts.max_per_run``), one at a time.

    A webhook that fails is not sent to again in this run, and waits its
    back-off; a 2xx makes its waiting deliveries due at once.

    Args:
        engine: The database.
        settings: ``alerts`` settings; ``webhook_secret`` must be set.
        stop: Set to end the run between two POSTs.
        transport: How POSTs are sent; a ``requests`` session by default.
        max_seconds: End the run after this long (between two POSTs).

    Returns:
        Counts of what the run did.

    Raises:
        ConfigError: ``alerts.webhook_secret`` is not set.
    """
    if settings.webhook_secret is None:
        raise ConfigError(
            "alerts.webhook_secret (REVISIT_ALERTS__WEBHOOK_SECRET) is not set:"
            " revisit sends no unsigned webhook"
        )
    secret = settings.webhook_secret.get_secret_value()
    own = transport is None
    sender: Transport = RequestsTransport() if transport is None else transport
    began = time.monotonic()
    delivered = failed = 0
    failing: set[int] = set()
    try:
        with engine.begin() as conn:
            gave_up = alerts_db.give_up_expired(conn, max_age_s=settings.max_age_s)
        if gave_up:
            log.warning(
                "gave up %d webhook deliveries older than alerts.max_age_s (%g s)",
                gave_up,
                settings.max_age_s,
                extra={"deliveries": gave_up},
            )
        while delivered + failed < settings.max_per_run:
            if stop is not None and stop.is_set():
                break
            if max_seconds is not None and time.monotonic() - began >= max_seconds:
                break
            with engine.begin() as conn:
                claimed = alerts_db.claim_delivery(
                    conn, lease_s=settings.lease_s, skip_webhooks=sorted(failing)
                )
            if claimed is None:
                break
            ok, abandoned = _deliver_one(engine, settings, sender, claimed, secret=secret)
            if ok:
                delivered += 1
            else:
                failed += 1
                gave_up += abandoned
                failing.add(claimed.webhook_id)
    finally:
        if own and isinstance(sender, RequestsTransport):
            sender.close()
    with engine.connect() as conn:
        pending = alerts_db.pending_deliveries(conn)
    return DeliveryReport(
        delivered=delivered,
        failed_attempts=failed,
        gave_up=gave_up,
        pending=pending,
        failing_webhooks=tuple(sorted(failing)),
    )


def _deliver_one(
    engine: Engine,
    settings: AlertSettings,
    sender: Transport,
    claimed: ClaimedDelivery,
    *,
    secret: str,
) -> tuple[bool, int]:
    """POST one claimed delivery and record the outcome; (delivered, given up 0/1)."""
    alert, webhook_id = claimed.alert, claimed.webhook_id
    sent_at = datetime.now(UTC)
    body = json.dumps(
        payload(alert, webhook_id=webhook_id, attempt=claimed.attempts + 1, sent_at=sent_at),
        separators=(",", ":"),
        allow_nan=False,
    ).encode("utf-8")
    key = idempotency_key(alert.id, webhook_id)
    headers = {
        "Content-Type": "application/json",
        KEY_HEADER: key,
        TIMESTAMP_HEADER: str(int(sent_at.timestamp())),
        SIGNATURE_HEADER: sign(body, secret),
    }
    where = describe_url(claimed.url)
    context = {"alert": alert.id, "webhook": webhook_id, "location": alert.location_id}
    retry_after: float | None = None
    try:
        reply = sender.post(claimed.url, body=body, headers=headers, timeout_s=settings.timeout_s)
    except (OSError, requests.RequestException) as exc:
        error = f"{type(exc).__name__}: {_short(str(exc), claimed.url)}"
    else:
        if 200 <= reply.status < 300:
            with engine.begin() as conn:
                alerts_db.record_delivered(conn, alert_id=alert.id, webhook_id=webhook_id)
            log.debug(
                "alert %d delivered to webhook #%d (%s), HTTP %d",
                alert.id,
                webhook_id,
                where,
                reply.status,
                extra={**context, "status": reply.status},
            )
            return True, 0
        error = f"HTTP {reply.status}" + (f": {reply.text.strip()}" if reply.text.strip() else "")
        retry_after = reply.retry_after_s
    with engine.begin() as conn:
        outcome = alerts_db.record_failed_attempt(
            conn,
            alert_id=alert.id,
            webhook_id=webhook_id,
            error=error,
            backoff_s=settings.backoff_s,
            max_backoff_s=settings.max_backoff_s,
            max_age_s=settings.max_age_s,
            retry_after_s=retry_after,
        )
    then = (
        "gave the delivery up (older than alerts.max_age_s)"
        if outcome.gave_up
        else f"retrying the webhook in {outcome.retry_in_s:.0f} s"
    )
    log.warning(
        "webhook #%d (%s) failed on alert %d (failure %d in a row): %s; %s",
        webhook_id,
        where,
        alert.id,
        outcome.consecutive_failures,
        error,
        then,
        extra={**context, "failures": outcome.consecutive_failures},
    )
    return False, int(outcome.gave_up)


def _short(text: str, url: str) -> str:
    """An error message without the URL's path and query (they may hold tokens), one line."""
    parts = urlsplit(url)
    text = text.replace(url, describe_url(url))
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    if path not in ("", "/"):
        text = text.replace(path, "/…")
    return " ".join(text.split())[:300]
