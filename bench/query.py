"""The documented SQL questions at a million locations: latency with and without indexes.

Loads 1,000,000 locations (clustered around 300 cities, Paris among them), a
change estimate for each and two history events each, 20 AOIs and a user's
table of 200 polygons, all through COPY, into a throwaway PostGIS cluster.
Then runs every query in docs/sql.md's "Asking SQL questions" 50 times and
prints p50 and p95 per query, and, in the same run, the same query with index
and bitmap scans disabled (3 runs: they are slow), with the ratio. The
figure printed last is the worse p50 of the bounding-box and radius queries
(target: at most 20 ms).

    .venv/bin/python bench/query.py [--locations 1000000] [--runs 50]
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from revisit.db.copy import copy_rows
from revisit.db.embedded import EmbeddedPostgres
from revisit.db.migrate import upgrade

REPO = Path(__file__).resolve().parents[1]
SECTION = re.compile(r"^## Asking SQL questions$(.*?)^## ", re.MULTILINE | re.DOTALL)
SQL_BLOCK = re.compile(r"```sql\n(.*?)```", re.DOTALL)


def documented_queries() -> list[str]:
    section = SECTION.search((REPO / "docs" / "sql.md").read_text())
    if section is None:
        raise SystemExit("docs/sql.md has no 'Asking SQL questions' section")
    return [q.strip().rstrip(";") for q in SQL_BLOCK.findall(section.group(1))]


def points(n: int, rng: np.random.Generator) -> np.ndarray:
    """(lon, lat) pairs: 80 % around 300 cities (Gaussian, sigma ~ 50 km), 20 % spread out."""
    cities = np.column_stack([rng.uniform(-10, 30, 300), rng.uniform(36, 60, 300)])
    cities[0] = (2.3522, 48.8566)  # Paris, where the documented queries look
    clustered = int(n * 0.8)
    which = rng.integers(0, len(cities), clustered)
    near = cities[which] + rng.normal(0, 0.45, (clustered, 2)) * [1.0, 0.65]
    spread = np.column_stack(
        [rng.uniform(-10, 30, n - clustered), rng.uniform(36, 60, n - clustered)]
    )
    out = np.concatenate([near, spread])
    out[:, 0] = np.clip(out[:, 0], -179.9, 179.9)
    out[:, 1] = np.clip(out[:, 1], -89.9, 89.9)
    return out


def load(engine: sa.Engine, n: int, rng: np.random.Generator) -> float:
    began = time.perf_counter()
    pts = points(n, rng)
    with engine.begin() as conn:
        copy_rows(
            conn,
            "location",
            ("geom", "origin"),
            ((f"SRID=4326;POINT({x:.6f} {y:.6f})", "manual") for x, y in pts),
        )
        ids = np.array(conn.execute(sa.text("SELECT id FROM location ORDER BY id")).scalars().all())
        ratio = rng.lognormal(0.1, 0.35, n)
        changed = ratio > np.quantile(ratio, 0.9)
        since_days = rng.integers(0, 900, n)

        def estimates() -> Iterator[tuple[object, ...]]:
            for i in range(n):
                since = np.datetime64("2023-01-01") + int(since_days[i])
                yield (
                    int(ids[i]), float(ratio[i]), float(ratio[i] * 1.1), 0.4, 0.3, 5,
                    bool(changed[i]), str(since) if changed[i] else None,
                )  # fmt: skip

        copy_rows(
            conn,
            "change_estimate",
            ("location_id", "ratio_ema", "ratio_last", "long_dist", "short_dist", "updates",
             "changed", "changed_since"),
            estimates(),
        )  # fmt: skip
        copy_rows(
            conn,
            "change_event",
            ("location_id", "step", "ratio", "ratio_ema", "long_dist", "short_dist"),
            (
                (int(ids[i]), step, float(ratio[i]), float(ratio[i]), 0.4, 0.3)
                for step in (100, 200)
                for i in range(n)
            ),
        )
        conn.execute(
            sa.text(
                "INSERT INTO aoi (name, geom) SELECT 'aoi' || i, ST_Multi(ST_Expand("
                " ST_SetSRID(ST_MakePoint(-5 + i * 1.7, 40 + i * 0.8), 4326), 0.2))"
                " FROM generate_series(1, 19) i;"
                " INSERT INTO aoi (name, geom) VALUES"
                " ('paris', ST_Multi(ST_MakeEnvelope(2.25, 48.81, 2.42, 48.90, 4326)));"
                " CREATE TABLE my_fields (name text, geom geometry(Polygon, 4326));"
                " INSERT INTO my_fields SELECT 'field' || i, ST_Expand(ST_SetSRID(ST_MakePoint("
                " 2.2 + (i % 20) * 0.015, 48.78 + (i / 20) * 0.015), 4326), 0.006)"
                " FROM generate_series(0, 199) i;"
                " CREATE INDEX ON my_fields USING gist (geom);"
                " GRANT SELECT ON my_fields TO revisit_reader"
            )
        )
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(sa.text("VACUUM ANALYZE"))
    return time.perf_counter() - began


def timings(conn: sa.Connection, query: str, runs: int, *, warmup: int = 3) -> list[float]:
    for _ in range(warmup):  # warm the cache
        conn.exec_driver_sql(query).all()
    out = []
    for _ in range(runs):
        began = time.perf_counter()
        conn.exec_driver_sql(query).all()
        out.append((time.perf_counter() - began) * 1000)
    return out


def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--locations", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--unindexed-runs", type=int, default=3)
    args = parser.parse_args()
    queries = documented_queries()
    root = Path(tempfile.mkdtemp(prefix="revisit-bench-query-"))
    root.chmod(0o755)
    cluster = EmbeddedPostgres(root / "var")
    results = []
    try:
        cluster.acquire()
        # No server-side prepared statements: each run is planned anew, as a person's
        # ad-hoc query is, and the planner settings below take effect at once.
        engine = sa.create_engine(
            cluster.sqlalchemy_url(),
            connect_args={"prepare_threshold": None},
        )
        upgrade(engine)
        loaded_s = load(engine, args.locations, np.random.default_rng(0))
        print(
            f"loaded {args.locations:,} locations, estimates and 2 events each in {loaded_s:.0f} s"
        )
        with engine.connect() as conn:
            conn.exec_driver_sql("SET ROLE revisit_reader")
            conn.exec_driver_sql("SET jit = off")
            for query in queries:
                rows = len(conn.exec_driver_sql(query).all())
                indexed = timings(conn, query, args.runs)
                conn.exec_driver_sql("SET enable_indexscan = off")
                conn.exec_driver_sql("SET enable_bitmapscan = off")
                conn.exec_driver_sql("SET enable_indexonlyscan = off")
                unindexed = timings(conn, query, args.unindexed_runs, warmup=1)
                conn.exec_driver_sql("RESET enable_indexscan")
                conn.exec_driver_sql("RESET enable_bitmapscan")
                conn.exec_driver_sql("RESET enable_indexonlyscan")
                results.append((query, rows, indexed, unindexed))
        engine.dispose()
    finally:
        cluster.release()
        shutil.rmtree(root, ignore_errors=True)

    header = ("query", "rows", "p50 ms", "p95 ms", "no-index p50", "ratio")
    print(f"{header[0]:62s} " + " ".join(f"{h:>8s}" for h in header[1:]))
    for query, rows, indexed, unindexed in results:
        name = " ".join(query.split())[:60]
        p50, p50_off = statistics.median(indexed), statistics.median(unindexed)
        print(
            f"{name:62s} {rows:8d} {p50:8.2f} {p95(indexed):8.2f} {p50_off:8.2f}"
            f" {p50_off / p50:7.1f}x"
        )
    spatial = [
        statistics.median(indexed)
        for query, _, indexed, _ in results
        if "FROM v_change\nWHERE geom &&" in query or "ST_DWithin" in query
    ]
    print(f"worst p50 of the bbox and radius queries at {args.locations:,} locations: "
          f"{max(spatial):.2f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
