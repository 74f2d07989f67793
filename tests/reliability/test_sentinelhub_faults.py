"""Sentinel Hub faults under the whole ingest pipeline: nothing skipped, nothing half-written.

The fake Sentinel Hub on 127.0.0.1 (real HTTP) misbehaves at random, seeded:
storms of 429s (with and without ``Retry-After``), 5xx outages, replies slower
than the timeout, bodies trickled past the deadline, connections reset before
the reply or halfway through the body, and tokens expiring mid-run, on the
token, catalog and Process endpoints alike. Ingest runs again and again, from
its cursor, until a run gets through. After every run:

- every retry waited what :class:`RetryPolicy` says for its cause and number,
  and no call retried more than ``max_retries`` times;
- a scene row exists only with all its observations (one transaction per scene);
- the cursor is at the last whole scene: every scene at or before it is whole,
  none after it is (the next run starts at the first scene it missed);
- every observation's chip is on disk with its sha256, and equals what a run
  without faults reads; no chip temporary is left; nothing is quarantined
  (a transient fault is never a bad product).

In the end every scene is whole, exactly as without faults.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from shapely.geometry import box

from revisit.config import IngestSettings
from revisit.db import aois, cursors
from revisit.db.embedded import EmbeddedPostgres
from revisit.db.locations import insert_locations
from revisit.grid import chip_grid_for
from revisit.ingest.chips import TMP_SUFFIX, ChipStore, encode
from revisit.ingest.pipeline import IngestPipeline
from revisit.ingest.sources.sentinelhub import RetryPolicy, SentinelHubSource
from revisit.types import Chip, LocationRef
from tests.daemon.conftest import Daemon, daemon_env, daemons, data_dir  # noqa: F401
from tests.ingest.fake_sentinelhub import (
    CLIENT_SECRET,
    PARIS_ACQUIRED,
    PARIS_TILE,
    FakeSentinelHub,
    Fault,
    Sleeps,
    fake_sh_fixture,  # noqa: F401 - the fake_sh fixture
    require_oscd,
)

T0, TILE = PARIS_ACQUIRED, PARIS_TILE
INSIDE = [(2.333, 48.821), (2.340, 48.830), (2.350, 48.840), (2.345, 48.825)]
SETTINGS = IngestSettings(chip_size=32)
TIMEOUT_S = 0.4
MAX_RETRIES = 3
LOGGER = "revisit.ingest.sources.sentinelhub"

COMMON = [
    Fault.status(429, retry_after="20"),  # Sentinel Hub's Retry-After is in milliseconds
    Fault.status(429),
    Fault.status(500),
    Fault.status(502),
    Fault.status(503),
    Fault.slow(TIMEOUT_S + 0.3),
    Fault.trickle(2.5 * TIMEOUT_S),
    Fault.reset(),
    Fault.reset(partial=True),
]
FAULTS = {
    "token": [Fault.status(503), Fault.status(429, retry_after="10"), Fault.reset()],
    "catalog": COMMON,
    "process": [*COMMON, Fault.expire_token()],
}


@dataclass
class FaultReport:
    """What a fault campaign did; :meth:`render` is printed by the test."""

    seed: int
    runs: int = 0
    interrupted: int = 0
    checks: int = 0
    retries: int = 0
    failures: list[str] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    requests: int = 0

    def check(self, ok: bool, what: str) -> None:
        self.checks += 1
        if not ok:
            self.failures.append(what)

    def render(self) -> str:
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(self.faults.items()))
        return (
            f"sentinelhub faults (seed {self.seed}): {self.runs} runs ({self.interrupted} "
            f"interrupted), {self.requests} requests, {sum(self.faults.values())} faults "
            f"[{kinds}], {self.retries} retries; invariants checked: {self.checks}, "
            f"failures: {len(self.failures)}"
        )


def _expected_chips(fake: FakeSentinelHub, ids: dict[int, tuple[float, float]]) -> dict:
    """(product, location) -> chip sha256, read from the fake with no fault."""
    source = SentinelHubSource(fake.settings(), chip_size=32)
    try:
        found = list(
            source.search(since=None, until=T0 + timedelta(days=60), area=TILE, on_rejected=_refuse)
        )
        refs = [
            LocationRef(id=i, lon=lon, lat=lat, grid=chip_grid_for(lon, lat, size=32))
            for i, (lon, lat) in ids.items()
        ]
        expected = {}
        for scene in found:
            for chip in source.read(scene, refs):
                assert isinstance(chip, Chip), chip
                expected[(scene.product_id, chip.location_id)] = hashlib.sha256(
                    encode(chip.data)
                ).hexdigest()
        return expected
    finally:
        source.close()


def _refuse(ref: str, reason: str, detail: str) -> None:
    raise AssertionError(f"a clean search rejected {ref}: {reason} {detail}")


def _check_retries(
    report: FaultReport, policy: RetryPolicy, records: list[logging.LogRecord], sleeps: Sleeps
) -> None:
    """Every logged retry waited what the policy says, and the sleeps were those waits."""
    logged = []
    for record in records:
        if record.name != LOGGER or "retrying in" not in record.msg:
            continue
        extra = record.__dict__
        problem = str(record.args[0]) if isinstance(record.args, tuple) else ""
        retry, delay = int(extra["retry"]), float(extra["delay_s"])
        if problem.startswith("HTTP 429"):
            expected = policy.retry_after(extra["retry_after"], retry - 1)
        else:
            expected = policy.backoff(retry - 1)
        report.check(
            1 <= retry <= policy.max_retries and delay == pytest.approx(expected),
            f"retry {retry} after {problem!r} waited {delay} s, the policy says {expected} s",
        )
        logged.append(delay)
    report.check(sleeps.delays == logged, f"slept {sleeps.delays}, logged {logged}")
    report.retries += len(logged)


def _check_state(
    report: FaultReport,
    engine: sa.Engine,
    store: ChipStore,
    aoi_id: int,
    scenes: list[tuple[str, datetime]],
    expected: dict,
) -> int:
    """Check the database and chip store after a run; the number of whole scenes."""
    per_scene = Counter(product for product, _ in expected)
    with engine.connect() as conn:
        cursor = cursors.get_cursor(conn, source="sentinelhub", aoi_id=aoi_id)
        rows = conn.execute(
            sa.text(
                "SELECT s.product_id, o.location_id, o.chip_key, o.chip_sha256, o.id"
                " FROM observation o JOIN scene s ON s.id = o.scene_id"
            )
        ).all()
        scene_rows = {
            product: status
            for product, status in conn.execute(sa.text("SELECT product_id, status FROM scene"))
        }
        quarantined = conn.execute(sa.text("SELECT count(*) FROM quarantine")).scalar_one()
    observed = Counter(r.product_id for r in rows)
    report.check(
        len({(r.product_id, r.location_id) for r in rows}) == len(rows),
        "duplicate observations",
    )
    for product, _ in scenes:
        whole = observed[product] == per_scene[product]
        report.check(
            (product in scene_rows) == whole and observed[product] in (0, per_scene[product]),
            f"{product}: scene row {product in scene_rows}, {observed[product]} of "
            f"{per_scene[product]} observations (half-written)",
        )
        report.check(
            scene_rows.get(product, "ingested") == "ingested", f"{product} is not 'ingested'"
        )
    whole_scenes = [when for product, when in scenes if observed[product] == per_scene[product]]
    last_whole = max(whole_scenes, default=None)
    report.check(cursor == last_whole, f"cursor {cursor}, last whole scene {last_whole}")
    missed = [when for when in (w for _, w in scenes) if when not in whole_scenes]
    report.check(
        not missed or last_whole is None or last_whole < min(missed),
        f"the cursor {cursor} passed scenes not ingested: {missed}",
    )
    for r in rows:
        report.check(
            expected.get((r.product_id, r.location_id)) == r.chip_sha256,
            f"observation {r.id} ({r.product_id}, location {r.location_id}) differs from a "
            "read without faults",
        )
    checked, bad = store.verify((r.id, r.chip_key, r.chip_sha256) for r in rows)
    report.check(not bad and checked == len(rows), f"chips: {bad}")
    temporaries = [p.name for p in store.root.rglob(f"*{TMP_SUFFIX}")]
    report.check(not temporaries, f"chip temporaries left: {temporaries}")
    report.check(quarantined == 0, f"{quarantined} quarantine rows after transient faults")
    return len(whole_scenes)


def campaign(
    fake: FakeSentinelHub,
    engine: sa.Engine,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    *,
    seed: int,
    days: int,
    rate: float,
    max_burst: int,
) -> FaultReport:
    """Ingest ``days`` daily scenes through seeded faults until a run gets through."""
    require_oscd()
    scenes = [
        (
            f"S2A_MSIL2A_{(T0 + timedelta(days=d)):%Y%m%dT%H%M%S}_N0204_R051_T31UDQ",
            T0 + timedelta(days=d),
        )
        for d in range(days)
    ]
    for product, when in scenes:
        fake.add_scene(product, when, TILE)
    with engine.begin() as conn:
        aoi = aois.create_aoi(conn, name="paris", geom=box(2.32, 48.81, 2.36, 48.85))
        insert_locations(conn, INSIDE, origin="manual", aoi_id=aoi.id, chip_size=32)
        ids = conn.execute(
            sa.text("SELECT id, ST_X(geom), ST_Y(geom) FROM location ORDER BY id")
        ).all()
    expected = _expected_chips(fake, {i: (lon, lat) for i, lon, lat in ids})
    assert len(expected) == days * len(INSIDE)

    report = FaultReport(seed=seed)
    before = len(fake.log)
    fake.chaos(seed, rate=rate, faults=FAULTS, max_burst=max_burst)
    store = ChipStore(tmp_path / "chips")
    whole = 0
    caplog.set_level(logging.WARNING, logger=LOGGER)
    for _ in range(150):
        sleeps = Sleeps()
        policy = RetryPolicy(
            max_retries=MAX_RETRIES, backoff_s=0.005, max_backoff_s=0.04, sleep=sleeps
        )
        settings = fake.settings(timeout_s=TIMEOUT_S, max_retries=MAX_RETRIES)
        source = SentinelHubSource(settings, chip_size=32, policy=policy)
        caplog.clear()
        try:
            summary = IngestPipeline(engine, store, source, settings=SETTINGS).run(aoi="paris")
        finally:
            source.close()
        report.runs += 1
        if summary.interrupted:
            report.interrupted += 1
            # every retry spent; a token refresh after a 401 is one attempt more
            attempts = re.search(r"after (\d+) attempts", summary.interrupted)
            report.check(
                attempts is not None
                and int(attempts.group(1)) in (MAX_RETRIES + 1, MAX_RETRIES + 2),
                f"interrupted without exhausting the retries: {summary.interrupted}",
            )
        _check_retries(report, policy, caplog.records, sleeps)
        now_whole = _check_state(report, engine, store, aoi.id, scenes, expected)
        report.check(now_whole >= whole, f"whole scenes went from {whole} to {now_whole}")
        whole = now_whole
        if summary.interrupted is None:
            break
    fake.chaos(seed, rate=0.0, faults={})
    report.check(whole == days, f"{whole} of {days} scenes whole after {report.runs} runs")
    report.requests = len(fake.log) - before
    report.faults = Counter(
        f"{endpoint} {kind}" for (endpoint, kind) in fake.faults_served.elements()
    )
    # What an interrupted run wrote for a scene it did not commit is garbage, and only that.
    with engine.connect() as conn:
        keys = [k for (k,) in conn.execute(sa.text("SELECT chip_key FROM observation"))]
    store.collect_garbage(keys, min_age_s=0)
    report.check(sorted(store.keys()) == sorted(set(keys)), "unreferenced chips after gc")
    print(report.render())
    return report


def test_ingest_rides_out_seeded_sentinelhub_faults(
    fake_sh: FakeSentinelHub, engine: sa.Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    report = campaign(fake_sh, engine, tmp_path, caplog, seed=11, days=6, rate=0.12, max_burst=5)
    assert not report.failures, "\n".join(report.failures)
    assert report.interrupted >= 1  # the seed has a burst that outlasts the retries
    kinds = {kind.split(" ", 1)[1] for kind in report.faults}
    assert {"status-429", "reset", "reset-partial", "trickle", "slow"} <= kinds, kinds


@pytest.mark.slow
@pytest.mark.parametrize("seed", [20261130, 7, 42])
def test_ingest_rides_out_long_sentinelhub_fault_campaigns(
    fake_sh: FakeSentinelHub,
    engine: sa.Engine,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    seed: int,
) -> None:
    report = campaign(fake_sh, engine, tmp_path, caplog, seed=seed, days=15, rate=0.2, max_burst=5)
    assert not report.failures, "\n".join(report.failures)


@pytest.mark.slow
def test_the_service_rides_out_a_rate_limit_storm(
    fake_sh: FakeSentinelHub,
    daemon_env: dict[str, str],  # noqa: F811
    daemons: list[Daemon],  # noqa: F811
) -> None:
    """``revisit run`` with the sentinelhub source: a 429 storm fails one ingest run, not more."""
    require_oscd()
    for day in range(3):
        fake_sh.add_scene(
            f"S2A_MSIL2A_2016113{day}T105412_N0204_R051_T31UDQ", T0 + timedelta(days=day), TILE
        )
    # Longer than one call's retries (1 + 2): the first ingest run gives up, the next gets through.
    fake_sh.inject("process", Fault.status(429, retry_after="50"), times=4)
    env = {
        **daemon_env,
        "REVISIT_DAEMON__SOURCES": '["sentinelhub"]',
        "REVISIT_DAEMON__BOOTSTRAP_BBOX": "[2.325, 48.815, 2.355, 48.845]",
        "REVISIT_DAEMON__BOOTSTRAP_SPACING_M": "1500",
        "REVISIT_DAEMON__INGEST_EVERY_S": "3",
        "REVISIT_INGEST__CHIP_SIZE": "32",
        "REVISIT_SENTINELHUB__CLIENT_ID": fake_sh.settings().client_id or "",
        "REVISIT_SENTINELHUB__CLIENT_SECRET": CLIENT_SECRET,
        "REVISIT_SENTINELHUB__BASE_URL": fake_sh.url,
        "REVISIT_SENTINELHUB__TOKEN_URL": fake_sh.token_url,
        "REVISIT_SENTINELHUB__TIMEOUT_S": "2",
        "REVISIT_SENTINELHUB__MAX_RETRIES": "2",
        "REVISIT_SENTINELHUB__BACKOFF_S": "0.05",
    }
    daemon = Daemon(env)
    daemons.append(daemon)
    failed = daemon.wait_for(
        "a failed ingest run",
        lambda: next((r for r in daemon.records() if r.get("outcome") == "failed"), None),
        timeout=180,
    )
    assert str(failed.get("job", "")).startswith("ingest:sentinelhub")
    assert "HTTP 429" in str(failed["message"]) and "after 3 attempts" in str(failed["message"])
    retries = [r for r in daemon.records() if "retrying in" in str(r.get("message"))]
    assert [r["delay_s"] for r in retries[:2]] == [0.05, 0.05]  # Retry-After: 50 ms

    def whole() -> int | None:
        cluster = EmbeddedPostgres(data_dir(daemon_env))
        with psycopg.connect(cluster.conninfo()) as conn:
            scenes = conn.execute("SELECT count(*) FROM scene").fetchone()
            locations = conn.execute("SELECT count(*) FROM location").fetchone()
            observations = conn.execute("SELECT count(*) FROM observation").fetchone()
        assert scenes and locations and observations
        return scenes[0] if scenes[0] == 3 and observations[0] == 3 * locations[0] else None

    daemon.wait_for("all three scenes whole", whole, timeout=120)
    status, body = daemon.get("/readyz")
    assert status == 200, body
    assert daemon.stop() < 60
    assert daemon.proc.returncode == 0
