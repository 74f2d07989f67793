"""Soak: ``revisit run`` for 30 minutes on the simulated source, watched from outside.

Every few seconds the test reads the service's resident memory and open file
descriptors from ``/proc/<pid>`` and counts its connections to the database in
``pg_stat_activity``. Every job runs many times meanwhile (ingest, learning
chunks, refits, ONNX exports, change maps, housekeeping). After a warm-up (the
first third), resident memory must grow less than 10 %, and the database
connections and open files must stay flat. ``REVISIT_SOAK_MINUTES`` shortens or
lengthens the run; the figures are printed at the end.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass

import psycopg
import pytest

from revisit.db.embedded import EmbeddedPostgres
from tests.daemon.conftest import Daemon, daemon_env, daemons, data_dir  # noqa: F401

#: The small world of the daemon tests, with the jobs spaced as a service spaces them.
SOAK_ENV = {
    "REVISIT_DAEMON__EXPORT_EVERY_STEPS": "200",
    "REVISIT_DAEMON__EXPORT_EVERY_S": "300",
    "REVISIT_DAEMON__CHANGEMAP_EVERY_S": "60",
    "REVISIT_DAEMON__HOUSEKEEPING_EVERY_S": "120",
    "REVISIT_DAEMON__CHIP_GC_MIN_AGE_S": "60",
    "REVISIT_DAEMON__LEARN_CHUNK_STEPS": "20",
    "REVISIT_LEARNER__CHECKPOINT_EVERY": "50",
    "REVISIT_LEARNER__REFIT_EVERY": "50",
    "REVISIT_LEARNER__REFRESH_EVERY": "50",
}
SAMPLE_EVERY_S = 5.0
MINUTES = float(os.environ.get("REVISIT_SOAK_MINUTES", "30"))
MAX_RSS_GROWTH = 0.10


@dataclass(frozen=True)
class Sample:
    at: float  # seconds since the service started
    rss_kb: int
    fds: int
    connections: int
    threads: int


def _proc(pid: int) -> tuple[int, int, int]:
    """Resident memory (kB), open descriptors and threads of a process."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            fields[key] = value.split()
    return int(fields["VmRSS"][0]), len(os.listdir(f"/proc/{pid}/fd")), int(fields["Threads"][0])


def _connections(conn: psycopg.Connection, pid: int) -> int:
    """The service's connections: every backend of the cluster but this one (and PG's own)."""
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
    ).fetchone()
    return int(row[0]) if row else 0


def _window(samples: list[Sample], start: float, end: float) -> list[Sample]:
    return [s for s in samples if start <= s.at < end]


def test_the_service_holds_steady_for_thirty_minutes(
    daemon_env: dict[str, str],  # noqa: F811
    daemons: list[Daemon],  # noqa: F811
) -> None:
    minutes = MINUTES
    total = minutes * 60
    warmup = total / 3
    daemon = Daemon({**daemon_env, **SOAK_ENV})
    daemons.append(daemon)
    began = time.monotonic()
    daemon.wait_for_message("scheduler started", timeout=180)
    cluster = EmbeddedPostgres(data_dir(daemon_env))
    samples: list[Sample] = []
    with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
        while (now := time.monotonic() - began) < total:
            assert daemon.proc.poll() is None, daemon.log_text()[-6000:]
            rss, fds, threads = _proc(daemon.pid)
            samples.append(Sample(now, rss, fds, _connections(conn, daemon.pid), threads))
            time.sleep(SAMPLE_EVERY_S)
    assert daemon.stop() < 60

    jobs = Counter(
        str(r.get("job"))
        for r in daemon.records()
        if str(r.get("message", "")).startswith("job ") and r.get("outcome") == "ok"
    )
    failed = [r for r in daemon.records() if r.get("outcome") == "failed"]
    settled = _window(samples, warmup, total)
    baseline = _window(samples, warmup, warmup + 60)
    final = _window(samples, total - 60, total)
    rss_base = statistics.median(s.rss_kb for s in baseline)
    rss_final = statistics.median(s.rss_kb for s in final)
    growth = rss_final / rss_base - 1
    peak = max(s.rss_kb for s in settled)
    conn_base = max(s.connections for s in _window(samples, 0, warmup + 60))
    fds_base = statistics.median(s.fds for s in baseline)
    report = (
        f"soak: {minutes:g} min, {len(samples)} samples, warm-up {warmup / 60:g} min; "
        f"jobs ok {dict(sorted(jobs.items()))}, failed {len(failed)}; "
        f"RSS {rss_base / 1024:.0f} -> {rss_final / 1024:.0f} MiB ({growth:+.1%}, peak "
        f"{peak / 1024:.0f} MiB); fds {fds_base:g} -> "
        f"{statistics.median(s.fds for s in final):g} (max {max(s.fds for s in settled)}); "
        f"db connections max {conn_base} in warm-up, "
        f"{min(s.connections for s in settled)}..{max(s.connections for s in settled)} after; "
        f"threads {min(s.threads for s in settled)}..{max(s.threads for s in settled)}"
    )
    by_minute = [
        statistics.median(s.rss_kb for s in window) / 1024
        for m in range(int(total // 60) + 1)
        if (window := _window(samples, m * 60, (m + 1) * 60))
    ]
    print(report)
    print("RSS by minute (MiB): " + " ".join(f"{v:.0f}" for v in by_minute))
    assert growth < MAX_RSS_GROWTH, report
    # Flat: no more at the end than when warm; jobs that overlap may hold one or two more.
    assert statistics.median(s.connections for s in final) <= conn_base, report
    assert max(s.connections for s in settled) <= conn_base + 2, report
    assert statistics.median(s.fds for s in final) <= fds_base + 2, report
    assert max(s.fds for s in settled) <= fds_base + 16, report
    assert jobs["learn"] > 0 and jobs["export:onnx"] >= 2 and jobs["housekeeping"] >= 2, report
    assert not failed, [r.get("message") for r in failed]


pytestmark = [pytest.mark.slow, pytest.mark.timeout(int(MINUTES * 60) + 600)]
