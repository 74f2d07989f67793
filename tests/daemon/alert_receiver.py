"""A webhook receiver on loopback for the alert tests: real HTTP, every POST recorded.

It answers each POST with the next status of :attr:`Receiver.statuses` (200
when none is queued), can be taken down and brought back on the same port, and
can hold a POST unanswered (:meth:`Receiver.hold_next`) so a test can kill the
sender after the receiver has the alert but before the sender has its answer.
"""

from __future__ import annotations

import json
import socket
import threading
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Post:
    """One POST the receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def key(self) -> str:
        return self.headers["Idempotency-Key"]

    @property
    def json(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.body)
        return value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Receiver:
    """A threaded HTTP server on 127.0.0.1 that records POSTs.

    Args:
        port: The port; a free one when 0.
    """

    def __init__(self, port: int = 0) -> None:
        self.port = port or free_port()
        self.posts: list[Post] = []
        self.statuses: deque[int] = deque()
        self.retry_after: str | None = None
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._hold: threading.Event | None = None
        self.held = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def keys(self) -> list[str]:
        with self._lock:
            return [p.key for p in self.posts]

    def hold_next(self) -> threading.Event:
        """Hold the next POST unanswered (recorded first) until the returned event is set."""
        release = threading.Event()
        self.held.clear()
        self._hold = release
        return release

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    receiver.posts.append(Post(self.path, dict(self.headers.items()), body))
                    status = receiver.statuses.popleft() if receiver.statuses else 200
                    hold, receiver._hold = receiver._hold, None
                if hold is not None:
                    receiver.held.set()
                    hold.wait(timeout=30)
                try:
                    self.send_response(status)
                    if status >= 300 and receiver.retry_after is not None:
                        self.send_header("Retry-After", receiver.retry_after)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok" if status < 300 else b"no")
                except OSError:  # the sender is gone (killed)
                    pass

            def log_message(self, format: str, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Take it down: connections to the port are refused until :meth:`start`."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


SECRET = "test-secret-0123456789abcdef"


def watched_area(engine: Any, *, url: str, locations: int) -> tuple[int, list[int]]:
    """An AOI ``watched`` with a webhook to ``url`` and ``locations`` locations in it.

    Returns:
        The webhook's id and the locations' ids.
    """
    import sqlalchemy as sa

    from revisit.db.alerts import create_webhook
    from revisit.db.aois import create_aoi
    from revisit.ingest.areas import parse_bbox

    with engine.begin() as conn:
        aoi = create_aoi(conn, name="watched", geom=parse_bbox("2.0,48.0,3.0,49.0"))
        webhook = create_webhook(conn, aoi_id=aoi.id, url=url)
        ids = [
            int(
                conn.execute(
                    sa.text(
                        "INSERT INTO location (geom, origin) VALUES"
                        " (ST_SetSRID(ST_MakePoint(:x, 48.5), 4326), 'aoi-grid') RETURNING id"
                    ),
                    {"x": 2.05 + 0.9 * i / max(1, locations)},
                ).scalar_one()
            )
            for i in range(locations)
        ]
    return webhook, ids


def flip(engine: Any, ids: list[int], *, changed: bool, updates: int) -> None:
    """Write the learner's way an estimate of each location with this classification."""
    from revisit.db.learning import EstimateRow, write_change_batch

    rows = [
        EstimateRow(
            location_id=i,
            ratio_ema=2.0 if changed else 0.8,
            ratio_last=2.0 if changed else 0.8,
            long_dist=0.5,
            short_dist=0.3,
            updates=updates,
            changed=changed,
            change_probability=0.95 if changed else 0.05,
        )
        for i in ids
    ]
    with engine.begin() as conn:
        write_change_batch(conn, estimates=rows, events=[], model_version_id=None)
