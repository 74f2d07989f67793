"""``/healthz``, ``/readyz`` and ``/metrics`` over real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from typing import Any

import pytest

from revisit.daemon.health import HealthServer, HealthServerError
from revisit.daemon.metrics import Metrics


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_health_readiness_and_metrics_are_served_on_the_loopback() -> None:
    state: dict[str, Any] = {"ready": True}

    def readiness() -> tuple[bool, dict[str, Any]]:
        return state["ready"], {"role": "leader", "checks": {"database": "ok"}}

    metrics = Metrics()
    metrics.ingested(source="simulated", scenes=3, chips=40, quarantined={"fully-cloudy": 2})
    metrics.job_ran(job="learn", outcome="ok", seconds=1.5)
    with HealthServer(port=0, metrics=metrics, readiness=readiness) as server:
        assert server.url.startswith("http://127.0.0.1:") and server.port > 0
        assert _get(server.url + "/healthz")[::2] == (200, "ok\n")
        status, kind, body = _get(server.url + "/readyz")
        assert (status, kind) == (200, "application/json")
        assert json.loads(body) == {"ready": True, "role": "leader", "checks": {"database": "ok"}}
        state["ready"] = False
        assert _get(server.url + "/readyz")[0] == 503
        status, kind, text = _get(server.url + "/metrics")
        assert status == 200 and kind.startswith("text/plain")
        assert 'revisit_scenes_ingested_total{source="simulated"} 3.0' in text
        assert 'revisit_quarantined_total{reason="fully-cloudy",source="simulated"} 2.0' in text
        assert 'revisit_job_runs_total{job="learn",outcome="ok"} 1.0' in text
        assert 'revisit_job_duration_seconds_bucket{job="learn",le="2.5"} 1.0' in text
        assert _get(server.url + "/nothing")[0] == 404
        port = server.port
    with pytest.raises(OSError):  # stopped: nothing listens any more
        socket.create_connection(("127.0.0.1", port), timeout=2)


def test_a_readiness_check_that_raises_is_not_ready_rather_than_a_crash() -> None:
    def readiness() -> tuple[bool, dict[str, Any]]:
        raise RuntimeError("database gone")

    with HealthServer(port=0, metrics=Metrics(), readiness=readiness) as server:
        status, _, body = _get(server.url + "/readyz")
    assert status == 503 and "database gone" in json.loads(body)["error"]


def test_a_taken_port_is_one_clear_error() -> None:
    with HealthServer(port=0, metrics=Metrics(), readiness=lambda: (True, {})) as first:
        second = HealthServer(port=first.port, metrics=Metrics(), readiness=lambda: (True, {}))
        with pytest.raises(HealthServerError, match="REVISIT_DAEMON__HTTP_PORT"):
            second.start()
