"""Change alerts: what the alert triggers cost a learner's batch write of change estimates.

Loads ``--locations`` locations inside one AOI (with one webhook, so each flip
also makes a delivery row), writes their first estimates, then times
``write_change_batch`` of every location (the learner's write path: COPY into
a temporary table, one UPDATE … FROM) with the triggers of migration 0008 on
and off: a batch in which no classification flips, and batches in which each
of ``--flip-shares`` of them do (alert rows, delivery rows and a NOTIFY each).
Every timed write is rolled back, so each one starts from the same state.

    .venv/bin/python bench/alerts.py [--locations 100000] [--runs 5] [--flip-shares 0.01,0.1,1]

The figure printed last is the slowdown of a 1e5-row batch without flips.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from revisit.db.aois import create_aoi
from revisit.db.copy import copy_rows
from revisit.db.embedded import EmbeddedPostgres
from revisit.db.learning import EstimateRow, write_change_batch
from revisit.db.migrate import upgrade
from revisit.ingest.areas import parse_bbox

TRIGGERS = ("change_estimate_alert_insert", "change_estimate_alert_update")


def load(engine: sa.Engine, n: int, rng: np.random.Generator) -> None:
    """n locations in one AOI with a webhook, and a first estimate each (none changed)."""
    with engine.begin() as conn:
        aoi = create_aoi(conn, name="bench", geom=parse_bbox("2.0,48.0,3.0,49.0"))
        conn.execute(
            sa.text("INSERT INTO alert_webhook (aoi_id, url) VALUES (:a, 'http://127.0.0.1:9/')"),
            {"a": aoi.id},
        )
        lon = rng.uniform(2.0, 3.0, n)
        lat = rng.uniform(48.0, 49.0, n)
        copy_rows(
            conn,
            "location",
            ("geom", "origin"),
            ((f"SRID=4326;POINT({x} {y})", "manual") for x, y in zip(lon, lat, strict=True)),
        )
        ids = conn.execute(sa.text("SELECT id FROM location ORDER BY id")).scalars().all()
        write_change_batch(
            conn,
            estimates=batch(ids, changed=np.zeros(n, dtype=bool)),
            events=[],
            model_version_id=None,
        )
        conn.exec_driver_sql("ANALYZE")


def batch(ids: list[int], *, changed: np.ndarray) -> list[EstimateRow]:
    return [
        EstimateRow(
            location_id=int(i),
            ratio_ema=1.0,
            ratio_last=1.0,
            long_dist=0.5,
            short_dist=0.5,
            updates=1,
            changed=bool(c),
            change_probability=0.5,
        )
        for i, c in zip(ids, changed.tolist(), strict=True)
    ]


def timed_write(engine: sa.Engine, rows: list[EstimateRow], *, triggers: bool) -> float:
    with engine.connect() as conn:
        if not triggers:
            for name in TRIGGERS:
                conn.exec_driver_sql(f"ALTER TABLE change_estimate DISABLE TRIGGER {name}")
        began = time.perf_counter()
        write_change_batch(conn, estimates=rows, events=[], model_version_id=None)
        seconds = time.perf_counter() - began
        conn.rollback()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--locations", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--flip-shares", default="0.01,0.1,1")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    root = Path(tempfile.mkdtemp(prefix="revisit-bench-alerts-"))
    root.chmod(0o755)
    cluster = EmbeddedPostgres(root / "var")
    results: dict[str, dict[bool, list[float]]] = {}
    try:
        cluster.acquire()
        engine = sa.create_engine(cluster.sqlalchemy_url())
        upgrade(engine)
        load(engine, args.locations, rng)
        with engine.connect() as conn:
            ids = conn.execute(sa.text("SELECT id FROM location ORDER BY id")).scalars().all()
        n = len(ids)
        cases = {"no flip": batch(ids, changed=np.zeros(n, dtype=bool))}
        for share in (float(v) for v in args.flip_shares.split(",")):
            cases[f"{share:.0%} flip"] = batch(ids, changed=rng.random(n) < share)
        for name, rows in cases.items():
            results[name] = {True: [], False: []}
            timed_write(engine, rows, triggers=True)  # warm-up
            for _ in range(args.runs):
                for triggers in (False, True):
                    results[name][triggers].append(timed_write(engine, rows, triggers=triggers))
        engine.dispose()
    finally:
        cluster.release()
        shutil.rmtree(root, ignore_errors=True)

    print(
        f"{'batch of ' + format(args.locations, ','):24s} {'off s':>8s} {'on s':>8s} {'ratio':>7s}"
    )
    for name, by in results.items():
        off, on = statistics.median(by[False]), statistics.median(by[True])
        print(f"{name:24s} {off:8.3f} {on:8.3f} {on / off:6.2f}x")
    off, on = (statistics.median(results["no flip"][t]) for t in (False, True))
    print(f"alert triggers on a batch of {args.locations:,} estimates without flips: "
          f"{(on / off - 1) * 100:+.1f} % ({on - off:+.3f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
