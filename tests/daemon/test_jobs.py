"""The scheduler on a real database: fixed ids in a persistent store, failing jobs, job records."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from revisit.config import Settings, load_settings
from revisit.daemon import jobs
from revisit.daemon.jobs import JobContext, JobResult, run_job
from revisit.daemon.metrics import Metrics
from revisit.daemon.scheduler import DaemonScheduler
from revisit.db import daemon as daemon_db
from revisit.db.aois import create_aoi
from revisit.db.locations import insert_locations
from revisit.ingest.areas import parse_bbox
from revisit.ingest.chips import ChipStore


def _settings(url: str, data_dir: Path, local: Path | None = None, **daemon: object) -> Settings:
    base: dict[str, object] = {"bootstrap_aoi": None, "sources": []}
    base.update(daemon)
    return load_settings(database_url=url, data_dir=data_dir, daemon=base, local={"path": local})


def _context(settings: Settings, engine: sa.Engine) -> JobContext:
    return JobContext(
        settings=settings,
        engine=engine,
        store=ChipStore(settings.data_dir / "chips"),
        metrics=Metrics(),
        stop=threading.Event(),
        runner="test:1",
    )


@pytest.fixture
def scheduled() -> Iterator[list[DaemonScheduler]]:
    """Schedulers a test starts; shut down at the end whatever happens."""
    started: list[DaemonScheduler] = []
    yield started
    for scheduler in started:
        scheduler.ctx.stop.set()
        scheduler.shutdown()
        scheduler.ctx.learner.close()


def _start(ctx: JobContext, started: list[DaemonScheduler]) -> DaemonScheduler:
    scheduler = DaemonScheduler(ctx)
    started.append(scheduler)
    scheduler.start()
    return scheduler


def _job_run(engine: sa.Engine, job_id: str) -> daemon_db.JobRunRow | None:
    with engine.connect() as conn:
        return next((r for r in daemon_db.job_runs(conn) if r.job_id == job_id), None)


def _wait(what: str, check: object, timeout: float = 30) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    pytest.fail(f"no {what} within {timeout} s")


def _stored_ids(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.execute(sa.text("SELECT id FROM scheduler_job")).scalars())


def test_jobs_have_fixed_ids_a_restart_replaces_them_and_an_aoi_brings_its_own(
    engine: sa.Engine, database_url: str, tmp_path: Path, scheduled: list[DaemonScheduler]
) -> None:
    settings = _settings(database_url, tmp_path / "var", sources=["simulated"])
    first = _start(_context(settings, engine), scheduled)
    expected = [
        "alerts:deliver",
        "aoi-sync",
        "export:onnx",
        "housekeeping",
        "ingest:simulated",
        "learn",
        "refit",
    ]
    assert _stored_ids(engine) == expected
    # On an empty database the learn job waits for data, without failing.
    _wait("skipped learn run", lambda: (r := _job_run(engine, "learn")) and r.runs >= 1)
    learn = _job_run(engine, "learn")
    assert learn is not None and learn.last_outcome == "skipped"
    assert "waiting for usable observations" in (learn.last_detail or "")
    first.ctx.stop.set()
    first.shutdown()

    # A second start (a restart, or a standby taking over) replaces the same jobs.
    with engine.begin() as conn:
        create_aoi(conn, name="zurich", geom=parse_bbox("8.50,47.36,8.56,47.40"))
    second = _start(_context(settings, engine), scheduled)
    assert _stored_ids(engine) == sorted(
        [*expected, "ingest:simulated:zurich", "export:changemap:zurich"]
    )
    # And an AOI added while it runs gets its jobs at the next sync.
    with engine.begin() as conn:
        create_aoi(conn, name="bern", geom=parse_bbox("7.40,46.93,7.47,46.97"))
    assert sorted(second.sync()) == ["export:changemap:bern", "ingest:simulated:bern"]
    assert "export:changemap:bern" in _stored_ids(engine)
    with engine.connect() as conn:
        recorded = {r.job_id for r in daemon_db.job_runs(conn)}
    assert recorded == set(_stored_ids(engine))  # `revisit status` lists every job


def test_a_failing_job_is_logged_counted_recorded_and_runs_again(
    engine: sa.Engine,
    database_url: str,
    tmp_path: Path,
    scheduled: list[DaemonScheduler],
    caplog: pytest.LogCaptureFixture,
) -> None:
    products = tmp_path / "products"
    products.mkdir()
    settings = _settings(
        database_url,
        tmp_path / "var",
        local=products,
        sources=["local"],
        ingest_every_s=0.3,
        learn_every_s=60,
    )
    with engine.begin() as conn:
        insert_locations(conn, [(8.53, 47.38), (8.54, 47.38)], origin="manual")
    shutil.rmtree(products)  # every ingest run now fails: its directory is gone
    ctx = _context(settings, engine)
    caplog.set_level(logging.INFO, logger="revisit.daemon")
    scheduler = _start(ctx, scheduled)
    _wait("two failed runs", lambda: (r := _job_run(engine, "ingest:local")) and r.failures >= 2)
    assert scheduler.running  # a failing job never stops the service
    run = _job_run(engine, "ingest:local")
    assert run is not None and run.last_outcome == "failed"
    assert "does not exist" in (run.last_detail or "")
    assert run.next_run_at is not None  # and it is scheduled again
    failed = [r for r in caplog.records if "failed; it runs again" in r.getMessage()]
    assert failed and all(getattr(r, "job", None) == "ingest:local" for r in failed)
    assert failed[0].exc_info is not None  # with its traceback
    sample = ctx.metrics.registry.get_sample_value(
        "revisit_job_runs_total", {"job": "ingest:local", "outcome": "failed"}
    )
    assert sample is not None and sample >= 2


def test_run_job_records_each_outcome_and_counts_runs(
    engine: sa.Engine, database_url: str, tmp_path: Path
) -> None:
    ctx = _context(_settings(database_url, tmp_path / "var"), engine)

    def ok(*, ctx: JobContext | None = None) -> JobResult:
        return JobResult("ok", "did it")

    def broken(*, ctx: JobContext | None = None) -> JobResult:
        raise RuntimeError("disk on fire")

    assert run_job(ctx, "demo", ok).outcome == "ok"
    result = run_job(ctx, "demo", broken)
    assert result == JobResult("failed", "RuntimeError: disk on fire")
    row = _job_run(engine, "demo")
    assert row is not None
    assert (row.runs, row.failures, row.last_outcome) == (2, 1, "failed")
    assert row.runner == "test:1" and row.last_duration_s is not None
    seconds = ctx.metrics.registry.get_sample_value(
        "revisit_job_duration_seconds_count", {"job": "demo"}
    )
    assert seconds == 2
    # Called outside the daemon, a job says what it needs.
    with pytest.raises(TypeError, match="ctx="):
        jobs.learn()


def test_bootstrap_gives_an_empty_database_an_aoi_and_locations_once(
    engine: sa.Engine, database_url: str, tmp_path: Path
) -> None:
    settings = load_settings(
        database_url=database_url,
        data_dir=tmp_path / "var",
        daemon={"bootstrap_bbox": (2.30, 48.80, 2.36, 48.84), "bootstrap_spacing_m": 2000},
    )
    assert jobs.bootstrap(settings, engine) == 4
    assert jobs.bootstrap(settings, engine) == 0  # not twice
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT name FROM aoi")).scalars().all() == ["demo"]


def test_a_shutdown_with_jobs_due_starts_none_and_logs_no_error(
    engine: sa.Engine,
    database_url: str,
    tmp_path: Path,
    scheduled: list[DaemonScheduler],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Jobs fall due every 0.1 s: while shutdown waits, some always are. APScheduler's
    # thread looks at them once more after its pools have stopped (agronholm/apscheduler#985).
    settings = _settings(
        database_url, tmp_path / "var", sources=["simulated"], ingest_every_s=0.1,
        learn_every_s=0.1, export_every_s=0.1, refit_every_s=0.1,
    )  # fmt: skip
    caplog.set_level(logging.DEBUG)
    scheduler = _start(_context(settings, engine), scheduled)
    _wait("a learn run", lambda: (r := _job_run(engine, "learn")) and r.runs >= 1)
    scheduler.ctx.stop.set()
    scheduler.shutdown()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    assert any("not started: the scheduler is shutting down" in r.getMessage()
               for r in caplog.records)  # fmt: skip
