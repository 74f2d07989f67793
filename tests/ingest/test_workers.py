"""Ingest workers: real `revisit ingest --worker` processes on one real PostGIS.

What one process writes is the reference: several workers must end with the
same rows, each scene claimed once; a worker killed with SIGKILL in the middle
of a scene leaves a lease that runs out, and another worker finishes the scene;
the cursor never passes a scene that is not finished. The in-process tests
cover the paths that need a scripted source (a scene that keeps failing, an
outage, a lost lease).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from shapely.geometry import box

from revisit.config import IngestSettings
from revisit.db import aois, cursors, ingest_tasks
from revisit.db.embedded import EmbeddedPostgres
from revisit.db.locations import insert_locations
from revisit.errors import SourceUnavailableError
from revisit.ingest import reasons
from revisit.ingest.chips import ChipStore
from revisit.ingest.pipeline import IngestPipeline
from revisit.ingest.sources.base import OnRejected, SceneSource
from revisit.ingest.sources.simulated import SimulatedSource
from revisit.ingest.workers import IngestWorker
from revisit.types import Chip, LocationRef, Rejection, SceneRef
from tests.conftest import migrated_database
from tests.daemon.conftest import REVISIT, SMALL_WORLD
from tests.ingest.memory_source import MemoryScene, MemorySource

START = date(2023, 6, 1)
SINCE = datetime(2023, 6, 1, tzinfo=UTC)
UNTIL = datetime(2023, 7, 10, 23, 59, 59, tzinfo=UTC)
CHIP_SIZE = 16
# Three locations in the tile at 8°E 47°N (two of them in the AOI "lake"), one at 9°E.
POINTS = [(8.51, 47.31), (8.52, 47.305), (8.80, 47.60), (9.30, 47.50)]
LAKE = box(8.50, 47.30, 8.53, 47.32)
SETTINGS = IngestSettings(chip_size=CHIP_SIZE)


# -- the world, the reference, the comparison ---------------------------------------------------


def _world(engine: sa.Engine) -> None:
    """The locations and the AOI, inserted in the same order (so with the same ids) everywhere."""
    with engine.begin() as conn:
        insert_locations(conn, POINTS, origin="manual", chip_size=CHIP_SIZE)
        aois.create_aoi(conn, name="lake", geom=LAKE)


def _pipeline(engine: sa.Engine, store: ChipStore) -> IngestPipeline:
    return IngestPipeline(engine, store, SimulatedSource(start=START), settings=SETTINGS)


def _reference(cluster: EmbeddedPostgres, tmp_path: Path, *, aoi: bool) -> dict[str, Any]:
    """What one process writes: every location, then (with ``aoi``) the AOI's own cursor."""
    with migrated_database(cluster) as url:
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        try:
            _world(engine)
            pipeline = _pipeline(engine, ChipStore(tmp_path / "reference" / "chips"))
            pipeline.run(since=SINCE, until=UNTIL)
            if aoi:
                pipeline.run(aoi="lake", since=SINCE, until=UNTIL)
            return _content(engine)
        finally:
            engine.dispose()


def _content(engine: sa.Engine) -> dict[str, Any]:
    """Everything ingest writes, without the ids and times that depend on who wrote first."""
    queries = {
        "observation": (
            "SELECT s.product_id, o.location_id, o.acquired_at, o.valid_fraction,"
            " o.cloud_fraction, o.chip_key, o.chip_sha256, o.epsg, o.bounds"
            " FROM observation o JOIN scene s ON s.id = o.scene_id ORDER BY 1, 2"
        ),
        "scene": (
            "SELECT source, product_id, tile_id, acquired_at, cloud_cover,"
            " ST_AsText(footprint), level, processing_baseline, status, error, metadata"
            " FROM scene ORDER BY product_id"
        ),
        "quarantine": (
            "SELECT source, ref, location_id, reason, detail, payload FROM quarantine"
            " ORDER BY ref, location_id"
        ),
        "sim_truth": (
            "SELECT location_id, seed, kind, event_date, changed_fraction FROM sim_truth"
            " ORDER BY location_id"
        ),
        "cursor": (
            "SELECT c.source, a.name, c.last_acquired_at FROM ingest_cursor c"
            " LEFT JOIN aoi a ON a.id = c.aoi_id ORDER BY 1, 2"
        ),
    }
    with engine.connect() as conn:
        return {
            name: [tuple(row) for row in conn.execute(sa.text(query))]
            for name, query in queries.items()
        }


def _assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert want["observation"], "the reference ingested nothing: the test world is wrong"
    for table in want:
        assert got[table] == want[table], f"{table} differs from what one process writes"


def _tasks(engine: sa.Engine) -> list[sa.Row[Any]]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.text(
                    "SELECT id, aoi_id, product_id, acquired_at, state, attempts, lease_owner,"
                    " last_error FROM ingest_task ORDER BY acquired_at, product_id, aoi_id"
                )
            )
        )


# -- worker processes -----------------------------------------------------------------------


@dataclass
class Worker:
    """A `revisit ingest --worker` process, its log in a file."""

    proc: subprocess.Popen[str]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def records(self) -> list[dict[str, Any]]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [json.loads(line) for line in lines if line.startswith("{")]

    def messages(self, text: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("message") == text]

    def wait(self, timeout: float = 90) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"worker {self.pid} did not end within {timeout:g} s:\n{self.tail()}")
        return code

    def tail(self) -> str:
        return self.log.read_text()[-4000:] if self.log.exists() else "(no log)"


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Start `revisit ingest --worker ARGS` processes; any left running are killed at the end."""
    started: list[Worker] = []

    def start(env: dict[str, str], *args: str) -> Worker:
        log = tmp_path / f"worker-{len(started) + 1}.log"
        with log.open("w") as err:
            proc = subprocess.Popen(
                [*REVISIT, "ingest", "--worker", *args],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
                text=True,
            )
        worker = Worker(proc, log)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait(timeout=30)


def _env(cli_env: dict[str, str], database_url: str, **extra: str) -> dict[str, str]:
    return {
        **cli_env,
        "REVISIT_DATABASE_URL": database_url,
        "REVISIT_INGEST__CHIP_SIZE": str(CHIP_SIZE),
        "REVISIT_SIMULATED__START": START.isoformat(),
        "REVISIT_INGEST__WORKER_POLL_S": "0.2",
        **extra,
    }


def _until(
    what: str, check: Callable[[], Any], *, timeout: float, workers: Sequence[Worker]
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        for worker in workers:
            if worker.proc.poll() is not None:
                pytest.fail(f"worker {worker.pid} exited before {what}:\n{worker.tail()}")
        time.sleep(0.1)
    pytest.fail(f"no {what} within {timeout:g} s:\n" + "\n".join(w.tail() for w in workers))


def _waiting(engine: sa.Engine) -> bool:
    """Whether a session of this database waits for an advisory lock (a worker mid-scene)."""
    with engine.connect() as conn:
        waiting = conn.execute(
            sa.text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
        ).scalar_one()
    return int(waiting) > 0


# -- several workers ------------------------------------------------------------------------


def test_three_workers_write_exactly_what_one_process_writes(
    pg_cluster: EmbeddedPostgres,
    cli_env: dict[str, str],
    database_url: str,
    engine: sa.Engine,
    tmp_path: Path,
    start_worker: Callable[..., Worker],
) -> None:
    _world(engine)
    env = _env(cli_env, database_url)
    # The command plans every location's cursor; the AOI's cursor queues the same products
    # again, so two tasks of one scene meet (the scene lock and the re-read keep them apart).
    planned = subprocess.run(
        [*REVISIT, "ingest", "--plan", "--since", "2023-06-01", "--until", "2023-07-10"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert planned.returncode == 0, planned.stderr
    assert "queued" in planned.stdout
    _pipeline(engine, ChipStore(tmp_path / "unused")).plan(aoi="lake", since=SINCE, until=UNTIL)
    tasks = _tasks(engine)
    n = len(tasks)
    assert n >= 18 and {t.state for t in tasks} == {"queued"}
    with engine.connect() as conn:  # planning moves no cursor
        assert cursors.get_cursor(conn, source="simulated", aoi_id=None) is None

    # Each worker takes at most a third: all three must take part, whatever their speeds.
    share = -(-n // 3)
    workers = [start_worker(env, "--drain", "--max-scenes", str(share)) for _ in range(3)]
    codes = [w.wait() for w in workers]
    assert codes == [0, 0, 0], "\n".join(w.tail() for w in workers)

    tasks = _tasks(engine)
    assert {t.state for t in tasks} == {"done"}
    assert all(t.attempts == 1 for t in tasks), "a task was claimed twice"
    claims = [r["task"] for w in workers for r in w.messages("scene claimed")]
    assert sorted(claims) == sorted(t.id for t in tasks)  # each task once, by one worker
    assert all(n - 2 * share <= len(w.messages("scene claimed")) <= share for w in workers)
    got = _content(engine)
    # No chip was written twice: the chips the workers committed are the rows there are.
    committed = sum(r["chips"] for w in workers for r in w.messages("scene done"))
    assert committed == len(got["observation"])
    _assert_same(got, _reference(pg_cluster, tmp_path, aoi=True))


def test_a_killed_worker_s_scene_is_finished_by_another_and_the_cursor_waits(
    pg_cluster: EmbeddedPostgres,
    cli_env: dict[str, str],
    database_url: str,
    engine: sa.Engine,
    tmp_path: Path,
    start_worker: Callable[..., Worker],
) -> None:
    _world(engine)
    _pipeline(engine, ChipStore(tmp_path / "unused")).plan(since=SINCE, until=UNTIL)
    first, *rest = _tasks(engine)
    key = ingest_tasks.scene_lock_key("simulated", first.product_id)
    lease = {"REVISIT_INGEST__LEASE_S": "6"}

    # The test holds the first scene's lock: its worker reads the chips, writes the files,
    # then waits at the start of the scene's transaction, deterministically mid-scene.
    with engine.connect() as hold:
        hold.execute(sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"), {"k": key})
        doomed = start_worker(_env(cli_env, database_url, **lease))

        _until(
            "the worker waiting mid-scene", lambda: _waiting(engine), timeout=60, workers=[doomed]
        )
        (task,) = [t for t in _tasks(engine) if t.id == first.id]
        assert task.state == "claimed" and f":{doomed.pid}:" in str(task.lease_owner)

        # Another worker does every other scene; the cursor stays before the unfinished first.
        other = start_worker(_env(cli_env, database_url), "--max-scenes", str(len(rest)))
        assert other.wait() == 0, other.tail()
        states = {t.id: t.state for t in _tasks(engine)}
        assert states.pop(first.id) == "claimed" and set(states.values()) == {"done"}
        with engine.connect() as conn:
            assert cursors.get_cursor(conn, source="simulated", aoi_id=None) is None

        doomed.proc.send_signal(signal.SIGKILL)
        assert doomed.wait() == -signal.SIGKILL
        hold.rollback()  # the kill left the lease; the lock goes with the test's transaction

    # The lease runs out (in at most lease_s) and a third worker finishes the scene.
    began = time.monotonic()
    rescuer = start_worker(_env(cli_env, database_url), "--drain")
    assert rescuer.wait() == 0, rescuer.tail()
    assert time.monotonic() - began < 60
    (task,) = [t for t in _tasks(engine) if t.id == first.id]
    assert (task.state, task.attempts) == ("done", 2)
    assert f":{rescuer.pid}:" in str(task.lease_owner)
    assert [r["attempt"] for r in rescuer.messages("scene claimed")] == [2]
    with engine.connect() as conn:
        assert cursors.get_cursor(conn, source="simulated", aoi_id=None) == rest[-1].acquired_at
    _assert_same(_content(engine), _reference(pg_cluster, tmp_path, aoi=False))


def test_a_second_sigterm_gives_the_scene_in_progress_back(
    cli_env: dict[str, str],
    database_url: str,
    engine: sa.Engine,
    tmp_path: Path,
    start_worker: Callable[..., Worker],
) -> None:
    _world(engine)
    _pipeline(engine, ChipStore(tmp_path / "unused")).plan(since=SINCE, until=UNTIL)
    first = _tasks(engine)[0]
    key = ingest_tasks.scene_lock_key("simulated", first.product_id)
    with engine.connect() as hold:
        hold.execute(sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"), {"k": key})
        worker = start_worker(_env(cli_env, database_url))
        _until(
            "the worker waiting mid-scene", lambda: _waiting(engine), timeout=60, workers=[worker]
        )
        worker.proc.send_signal(signal.SIGTERM)  # the first lets the scene finish: it waits on
        _until(
            "the first SIGTERM seen",
            lambda: any(
                "stopping after the scene" in str(r.get("message")) for r in worker.records()
            ),
            timeout=30,
            workers=[worker],
        )
        worker.proc.send_signal(signal.SIGTERM)  # the second gives it back
        assert worker.wait(timeout=30) == 130, worker.tail()
        hold.rollback()
    (task,) = [t for t in _tasks(engine) if t.id == first.id]
    assert (task.state, task.attempts) == ("queued", 0)  # at once, uncounted: no lease to wait for
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM observation")).scalar_one() == 0


# -- in-process: the paths a scripted source reaches ------------------------------------------

T0 = datetime(2024, 5, 1, 10, 30, tzinfo=UTC)
MEMORY_POINTS = [(0.5, 40.5), (1.0, 41.0)]


@pytest.fixture
def located(engine: sa.Engine) -> sa.Engine:
    with engine.begin() as conn:
        insert_locations(conn, MEMORY_POINTS, origin="manual", chip_size=CHIP_SIZE)
    return engine


def _memory_worker(
    engine: sa.Engine, store: ChipStore, source: SceneSource, **settings: Any
) -> IngestWorker:
    config = IngestSettings(chip_size=CHIP_SIZE, worker_poll_s=0.05, **settings)
    return IngestWorker(engine, store, {source.name: source}, settings=config)


def _plan(engine: sa.Engine, store: ChipStore, source: SceneSource) -> None:
    now = T0 + timedelta(days=30)
    IngestPipeline(engine, store, source, settings=SETTINGS, clock=lambda: now).plan(until=now)


def _memory_tasks(engine: sa.Engine) -> dict[str, sa.Row[Any]]:
    return {t.product_id: t for t in _tasks(engine)}


def test_a_scene_that_keeps_failing_is_quarantined_and_the_cursor_goes_past_it(
    located: sa.Engine, tmp_path: Path
) -> None:
    store = ChipStore(tmp_path / "chips")
    source = MemorySource(
        [
            MemoryScene("OK1", T0),
            MemoryScene("BOOM", T0 + timedelta(days=1), raise_on_read=RuntimeError("no good")),
            MemoryScene("OK2", T0 + timedelta(days=2)),
        ]
    )
    _plan(located, store, source)
    summary = _memory_worker(located, store, source, max_attempts=2).run(drain=True)
    assert (summary.tasks, summary.failed, summary.released) == (2, 1, 1)
    tasks = _memory_tasks(located)
    assert (tasks["BOOM"].state, tasks["BOOM"].attempts) == ("failed", 2)
    assert "RuntimeError: no good" in tasks["BOOM"].last_error
    assert [t.state for t in (tasks["OK1"], tasks["OK2"])] == ["done", "done"]
    with located.connect() as conn:
        reason, detail = conn.execute(
            sa.text("SELECT reason, detail FROM quarantine WHERE ref = 'BOOM'")
        ).one()
        assert cursors.get_cursor(conn, source="memory", aoi_id=None) == T0 + timedelta(days=2)
        assert conn.execute(sa.text("SELECT count(*) FROM observation")).scalar_one() == 4
    assert reason == reasons.INGEST_FAILED and "no good" in detail


def test_an_outage_gives_the_scene_back_uncounted(located: sa.Engine, tmp_path: Path) -> None:
    store = ChipStore(tmp_path / "chips")
    outage = SourceUnavailableError("memory: 503 Service Unavailable")
    source = MemorySource([MemoryScene("DOWN", T0, raise_on_read=outage)])
    _plan(located, store, source)
    summary = _memory_worker(located, store, source, max_attempts=1).run(max_tasks=3)
    assert (summary.tasks, summary.failed, summary.released) == (0, 0, 3)
    task = _memory_tasks(located)["DOWN"]
    assert (task.state, task.attempts) == ("queued", 0)  # never failed, however often
    assert "503" in task.last_error
    with located.connect() as conn:
        assert cursors.get_cursor(conn, source="memory", aoi_id=None) is None


class _Thief(SceneSource):
    """A source whose read lets another worker take the scene over, as if the lease ran out."""

    name = "memory"

    def __init__(self, inner: MemorySource, engine: sa.Engine) -> None:
        self.inner = inner
        self.engine = engine

    def search(
        self, *, since: datetime | None, until: datetime, area: Any, on_rejected: OnRejected
    ) -> Iterator[SceneRef]:
        return self.inner.search(since=since, until=until, area=area, on_rejected=on_rejected)

    def read(self, scene: SceneRef, locations: Sequence[LocationRef]) -> Iterator[Chip | Rejection]:
        with self.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "UPDATE ingest_task SET lease_owner = 'thief', attempts = attempts + 1"
                    " WHERE product_id = :p"
                ),
                {"p": scene.product_id},
            )
        return self.inner.read(scene, locations)


def test_a_worker_that_lost_its_lease_commits_nothing(located: sa.Engine, tmp_path: Path) -> None:
    store = ChipStore(tmp_path / "chips")
    source = _Thief(MemorySource([MemoryScene("P0", T0)]), located)
    _plan(located, store, source)
    summary = _memory_worker(located, store, source).run(max_tasks=1)
    assert (summary.tasks, summary.lost, summary.chips) == (0, 1, 0)
    task = _memory_tasks(located)["P0"]
    assert (task.state, task.lease_owner) == ("claimed", "thief")  # the thief's to finish
    with located.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM observation")).scalar_one() == 0
        assert conn.execute(sa.text("SELECT count(*) FROM scene")).scalar_one() == 0


def test_planning_twice_queues_nothing_twice_and_a_backfill_requeues(
    located: sa.Engine, tmp_path: Path
) -> None:
    store = ChipStore(tmp_path / "chips")
    source = MemorySource([MemoryScene(f"P{i}", T0 + timedelta(days=5 * i)) for i in range(3)])
    _plan(located, store, source)
    _plan(located, store, source)
    assert sorted(_memory_tasks(located)) == ["P0", "P1", "P2"]
    _memory_worker(located, store, source).run(drain=True)
    with located.begin() as conn:  # a new location: a backfill gives it the known scenes' chips
        insert_locations(conn, [(0.25, 40.25)], origin="manual", chip_size=CHIP_SIZE)
    now = T0 + timedelta(days=30)
    pipeline = IngestPipeline(located, store, source, settings=SETTINGS, clock=lambda: now)
    assert pipeline.plan(until=now).queued == 0
    assert pipeline.plan(since=T0, until=now).queued == 3
    summary = _memory_worker(located, store, source).run(drain=True)
    assert (summary.tasks, summary.chips) == (3, 3)
    with located.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM observation")).scalar_one() == 9


# -- the daemon ---------------------------------------------------------------------------------


def test_the_daemon_plans_and_supervises_its_ingest_workers(
    cli_env: dict[str, str], database_url: str, engine: sa.Engine, tmp_path: Path
) -> None:
    from tests.daemon.conftest import Daemon

    start = (datetime.now(UTC) - timedelta(days=40)).date()
    env = {
        **cli_env,
        **SMALL_WORLD,
        "REVISIT_DATABASE_URL": database_url,
        "REVISIT_SIMULATED__START": start.isoformat(),
        "REVISIT_INGEST__CHIP_SIZE": str(CHIP_SIZE),
        "REVISIT_INGEST__WORKER_POLL_S": "0.2",
        "REVISIT_DAEMON__INGEST_WORKERS": "2",
        "REVISIT_DAEMON__INGEST_EVERY_S": "2",
        # This test is about ingest: the learner's first chunk (at start) finds no data, and
        # the next one would be an hour later.
        "REVISIT_DAEMON__LEARN_EVERY_S": "3600",
    }
    daemon = Daemon(env)
    try:
        started = daemon.wait_for(
            "two workers",
            lambda: (
                [r for r in daemon.records() if r.get("message") == "started ingest-worker-2"]
                and [r for r in daemon.records() if r.get("message") == "started ingest-worker-1"]
            ),
            timeout=60,
        )
        first_pid = int(started[0]["pid"])

        def all_ingested() -> bool:
            tasks = _tasks(engine)
            return bool(tasks) and all(t.state == "done" for t in tasks)

        daemon.wait_for("the planned scenes ingested", all_ingested, timeout=60)
        owners = {str(t.lease_owner).split(":")[1] for t in _tasks(engine)}
        assert owners <= {str(r["pid"]) for r in daemon.records() if "child" in r}
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM observation")).scalar_one() > 0
            assert cursors.get_cursor(conn, source="simulated", aoi_id=None) is not None

        # A worker that dies is started again.
        os.kill(first_pid, signal.SIGKILL)
        daemon.wait_for(
            "the worker restarted",
            lambda: (
                sum(1 for r in daemon.records() if r.get("message") == "started ingest-worker-1")
                >= 2
            ),
            timeout=30,
        )
        assert daemon.stop(timeout=60) < 60
        assert daemon.proc.returncode == 0, daemon.log_text()[-4000:]
        pids = [
            int(r["pid"])
            for r in daemon.records()
            if str(r.get("message")).startswith("started ingest-worker")
        ]
        for pid in pids:  # every worker ended with the daemon
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        daemon.kill()
