"""``/healthz``, ``/readyz``, ``/metrics`` and the web map over HTTP on 127.0.0.1.

- ``/healthz``: 200 while the process serves at all (liveness).
- ``/readyz``: 200 when every readiness check passes, 503 otherwise; the body
  is a JSON object with the role (``leader`` or ``standby``) and each check.
- ``/metrics``: the Prometheus text format of the daemon's own registry.
- ``/``, ``/static/...``, ``/api/...``: the web map of the change estimates and
  its read-only JSON endpoints, answered by :class:`revisit.web.api.WebApp`
  from the database behind ``engine`` (503 on ``/api`` without one); see
  docs/web-map.md.

Only GET and HEAD are answered (405 otherwise). The server runs on a daemon
thread and never binds anything but the loopback address.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sqlalchemy.engine import Engine

from revisit.daemon.metrics import Metrics
from revisit.errors import RevisitError
from revisit.web.api import WebApp

log = logging.getLogger(__name__)

HOST = "127.0.0.1"

#: Returns (ready, details): the details become the JSON body of /readyz.
Readiness = Callable[[], tuple[bool, dict[str, Any]]]


class HealthServerError(RevisitError, OSError):
    """The health and metrics server could not listen on its port."""


class HealthServer:
    """A small HTTP server for liveness, readiness and metrics.

    Args:
        port: The TCP port on 127.0.0.1; 0 picks a free one (see :attr:`port`).
        metrics: What ``/metrics`` serves.
        readiness: What ``/readyz`` asks.
        engine: The database the web map reads; None serves the page but
            answers its ``/api`` paths with 503.
    """

    def __init__(
        self,
        *,
        port: int,
        metrics: Metrics,
        readiness: Readiness,
        engine: Engine | None = None,
    ) -> None:
        self._requested_port = port
        self.metrics = metrics
        self.readiness = readiness
        self.web = WebApp(engine=engine)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port it listens on (after :meth:`start`)."""
        if self._server is None:
            raise RuntimeError("the health server is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        """Listen and serve on a background thread.

        Raises:
            HealthServerError: The port is taken (another ``revisit run`` on this
                machine?) or not allowed.
        """
        handler = _handler(self)
        try:
            server = ThreadingHTTPServer((HOST, self._requested_port), handler)
        except OSError as exc:
            raise HealthServerError(
                f"cannot serve health and metrics on {HOST}:{self._requested_port}: "
                f"{exc.strerror or exc}; another `revisit run` on this machine needs another "
                "port (REVISIT_DAEMON__HTTP_PORT, 0 picks a free one)"
            ) from None
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="revisit-health", daemon=True
        )
        self._thread.start()
        log.info("health, metrics and the web map on %s", self.url, extra={"port": self.port})

    def stop(self) -> None:
        """Stop serving and close the socket."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HealthServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _handler(owner: HealthServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "revisit"

        def do_GET(self) -> None:
            self._answer(send_body=True)

        def do_HEAD(self) -> None:
            self._answer(send_body=False)

        def _refuse(self) -> None:
            self._reply(
                405,
                b"only GET and HEAD are answered here\n",
                "text/plain; charset=utf-8",
                headers=(("Allow", "GET, HEAD"),),
            )

        do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse

        def _answer(self, *, send_body: bool) -> None:
            path, _, query = self.path.partition("?")
            if path == "/healthz":
                self._reply(200, b"ok\n", "text/plain; charset=utf-8", send_body=send_body)
            elif path == "/readyz":
                try:
                    ready, details = owner.readiness()
                except Exception as exc:  # a failing check means not ready, never a crash
                    ready, details = False, {"error": f"{type(exc).__name__}: {exc}"}
                body = json.dumps({"ready": ready, **details}, default=str).encode() + b"\n"
                self._reply(200 if ready else 503, body, "application/json", send_body=send_body)
            elif path == "/metrics":
                self._reply(
                    200, owner.metrics.render(), owner.metrics.content_type, send_body=send_body
                )
            elif WebApp.handles(path):
                answer = owner.web.respond(path=path, query=query, host=self.headers.get("Host"))
                self._reply(
                    answer.status,
                    answer.body,
                    answer.content_type,
                    headers=answer.headers,
                    send_body=send_body,
                )
            else:
                self._reply(
                    404,
                    b"not found: try / (the map), /healthz, /readyz or /metrics\n",
                    "text/plain; charset=utf-8",
                    send_body=send_body,
                )

        def _reply(
            self,
            status: int,
            body: bytes,
            content_type: str,
            *,
            headers: tuple[tuple[str, str], ...] = (),
            send_body: bool = True,
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http: " + format, *args)

    return Handler
