"""Change quality: how well each location's r finds the simulated world's planted changes.

Ingests a simulated world (N locations on a regular grid over one 1° tile,
``--years`` of Sentinel-2 revisits from 2023-01-01), trains each method for a
bounded number of CPU steps on its own copy of the database, and scores every
measured location by AUROC against the ground truth (``sim_truth``, which the
learner never reads).

Protocol. r describes what changed between a recent image and one a year or
more before it, so a location counts as *changed* when its event falls after
the first ``--lead-days`` (365) of the record, when there is imagery from before
it to compare with; *unchanged* when it has no event; locations whose event
fell in the first year are left out of the score (they changed before the
window r can see). Rows of the table, all on the same locations:

- ``caco r``: the EMA of R from CACo (the system's answer);
- ``caco R last``: the last raw R;
- ``caco long-dist``: ‖f(q) - f(k_lt)‖ of the last measurement alone;
- ``pixel CVA``: the change-vector magnitude between the same image pairs
  (mean over pixels of the 12-band difference), EMA'd over the same events;
- ``teco r``, ``moco r`` (and any other ``--methods``): r from those methods.

    .venv/bin/python bench/change_quality.py [--locations 400] [--years 3] [--steps 2000]
        [--minutes M] [--methods caco,teco,moco] [--one-per-year]

``--one-per-year`` keeps one image a year per location (the first usable one
after 1 June): no short-term revisits, so every R has a calibrated denominator
(docs/change-estimates.md) instead of CACo's real short-term pair.

Every method trains with batch 32, a queue of 4096, lr 0.12 (for 256; 0.015
at batch 32) with its warm-up and a cosine decay over ``--steps``, key momentum
0.99, and query crops of 40-100 % of the 32 px chip (``--set KEY=VALUE`` changes any setting).
About 25 minutes on 2 cores.

The figure printed last is CACo r's AUROC (target ≥ 0.9, and the best row).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import psycopg
import sqlalchemy as sa
from psycopg import sql
from sklearn.metrics import roc_auc_score

from revisit.config import IngestSettings, load_settings
from revisit.db.embedded import EmbeddedPostgres
from revisit.db.locations import insert_locations
from revisit.db.migrate import upgrade
from revisit.ingest.chips import ChipStore
from revisit.ingest.pipeline import IngestPipeline
from revisit.ingest.sources.simulated import SimulatedSource
from revisit.learner.online import OnlineLearner

START = date(2023, 1, 1)


def _create_database(cluster: EmbeddedPostgres, name: str, template: str | None) -> None:
    with psycopg.connect(cluster.conninfo("postgres"), autocommit=True) as conn:
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            query = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        conn.execute(query)
    if template is None:
        with psycopg.connect(cluster.conninfo(name), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION postgis")


def _one_per_year(url: sa.URL) -> None:
    """Leave each location one usable image a year (its first after 1 June): no k+ anywhere."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "DELETE FROM observation WHERE id NOT IN ("
                    " SELECT DISTINCT ON (location_id, extract(year FROM acquired_at)) id"
                    " FROM observation WHERE valid_fraction >= 0.8 AND cloud_fraction <= 0.2"
                    " AND extract(month FROM acquired_at) >= 6"
                    " ORDER BY location_id, extract(year FROM acquired_at), acquired_at)"
                )
            )
    finally:
        engine.dispose()


def _ema(values: list[float], beta: float = 0.8) -> float:
    r = values[0]
    for v in values[1:]:
        r = beta * r + (1 - beta) * v
    return r


def _pixel_cva(engine: sa.Engine, store: ChipStore) -> dict[int, float]:
    """EMA over each location's events of the mean pixel change-vector magnitude of (q, k_lt)."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT e.location_id, q.chip_key, q.chip_sha256, l.chip_key, l.chip_sha256 "
                "FROM change_event e JOIN observation q ON q.id = e.query_observation_id "
                "JOIN observation l ON l.id = e.longterm_observation_id "
                "ORDER BY e.location_id, e.step"
            )
        ).all()
    series: dict[int, list[float]] = {}
    for loc, qk, qs, lk, ls in rows:
        a = store.get(qk, qs).astype(np.float64) / 1e4
        b = store.get(lk, ls).astype(np.float64) / 1e4
        series.setdefault(int(loc), []).append(float(np.sqrt(((a - b) ** 2).sum(axis=0)).mean()))
    return {loc: _ema(v) for loc, v in series.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--locations", type=int, default=400)
    parser.add_argument("--years", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument(
        "--minutes", type=float, default=None, help="also stop each method's training after this"
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--chip-size", type=int, default=32)
    parser.add_argument("--lead-days", type=int, default=365)
    parser.add_argument("--methods", default="caco,teco,moco")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--one-per-year",
        action="store_true",
        help="Keep each location's first usable image after 1 June of each year only: a series "
        "without short-term revisits, so R's denominator is calibrated (docs/change-estimates.md).",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="Keep the ingested world here and reuse it on the next run with the same world "
        "arguments (default: a temporary directory, removed at the end).",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="A learner setting for every method, e.g. --set recency_mix=0 (repeatable).",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    methods = args.methods.split(",")
    if "caco" not in methods:
        methods.insert(0, "caco")

    overrides: dict[str, str] = dict(item.split("=", 1) for item in args.set)
    world_key = f"{args.locations}-{args.years}-{args.chip_size}-{args.seed}"
    if args.workdir is not None:
        root = args.workdir.absolute()
        root.mkdir(parents=True, exist_ok=True)
    else:
        root = Path(tempfile.mkdtemp(prefix="revisit-bench-quality-"))
    root.chmod(0o755)
    reuse = (root / "world.done").is_file() and (root / "world.done").read_text() == world_key
    cluster = EmbeddedPostgres(root / "pg")
    try:
        cluster.acquire()
        if not reuse:
            with psycopg.connect(cluster.conninfo("postgres"), autocommit=True) as conn:
                rows = conn.execute(
                    "SELECT datname FROM pg_database WHERE datname <> 'postgres'"
                    " AND NOT datistemplate"
                ).fetchall()
                for (name,) in rows:
                    conn.execute(
                        sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name))
                    )
            shutil.rmtree(root / "chips", ignore_errors=True)
            _create_database(cluster, "world", None)
        world_url = cluster.sqlalchemy_url("world")
        engine = sa.create_engine(world_url, poolclass=sa.pool.NullPool)
        upgrade(engine)
        side = max(1, round(args.locations**0.5))
        points = [
            (8.03 + 0.94 * (i % side) / side, 47.03 + 0.94 * (i // side) / side)
            for i in range(args.locations)
        ]
        store = ChipStore(root / "chips", fsync=False)
        if not reuse:
            with engine.begin() as conn:
                insert_locations(conn, points, origin="manual", chip_size=args.chip_size)
            start = datetime.combine(START, datetime.min.time(), UTC)
            began = time.perf_counter()
            summary = IngestPipeline(
                engine,
                store,
                SimulatedSource(seed=args.seed, start=START),
                settings=IngestSettings(chip_size=args.chip_size),
            ).run(since=start, until=start + timedelta(days=365 * args.years))
            print(
                f"ingested {summary.scenes} scenes, {summary.chips} chips "
                f"in {time.perf_counter() - began:.0f} s"
            )
            (root / "world.done").write_text(world_key)
        with engine.connect() as conn:
            truth = {
                int(loc): event
                for loc, event in conn.execute(
                    sa.text("SELECT location_id, event_date FROM sim_truth")
                ).all()
            }
        engine.dispose()

        lead = START + timedelta(days=args.lead_days)
        scores: dict[str, dict[int, float]] = {}
        for method in methods:
            name = f"m_{method.replace('-', '_')}"
            with psycopg.connect(cluster.conninfo("postgres"), autocommit=True) as conn:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
            _create_database(cluster, name, "world")
            url = cluster.sqlalchemy_url(name)
            if args.one_per_year:
                _one_per_year(url)
            data_dir = root / f"var-{method}"
            shutil.rmtree(data_dir, ignore_errors=True)
            data_dir.mkdir()
            (data_dir / "chips").symlink_to(root / "chips")
            settings = load_settings(
                database_url=url.render_as_string(hide_password=False),
                data_dir=data_dir,
                learner={
                    "batch_size": args.batch,
                    "queue_size": 4096,
                    "warmup_steps": args.steps // 4,
                    "refit_every": max(1, args.steps // 20),
                    "checkpoint_every": max(1, args.steps // 4),
                    "seed": args.seed,
                    # A bounded CPU run learns faster with a quicker key encoder
                    # and a larger rate than the service's defaults.
                    "lr": 0.12,
                    "momentum": 0.99,
                    # The chips are the crop size (32 px): crops cover 40-100 % of them,
                    # and the cosine decay spans the run.
                    "crop_scale": (0.4, 1.0),
                    "lr_horizon_steps": args.steps,
                    **overrides,
                },
            )
            m_engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
            began = time.perf_counter()
            with OnlineLearner(settings=settings, engine=m_engine, method=method) as learner:
                result = learner.run(
                    args.steps, max_seconds=None if args.minutes is None else 60 * args.minutes
                )
            print(
                f"{method}: {result.steps} steps in {(time.perf_counter() - began) / 60:.1f} min, "
                f"mean loss {result.mean_loss:.3f}, {result.measured} locations measured"
            )
            with m_engine.connect() as conn:
                rows = conn.execute(
                    sa.text(
                        "SELECT location_id, ratio_ema, ratio_last, long_dist FROM change_estimate"
                    )
                ).all()
            scores[f"{method} r"] = {int(r[0]): float(r[1]) for r in rows}
            if method == "caco":
                scores["caco R last"] = {int(r[0]): float(r[2]) for r in rows}
                scores["caco long-dist"] = {int(r[0]): float(r[3]) for r in rows}
                scores["pixel CVA"] = _pixel_cva(m_engine, store)
            m_engine.dispose()

        common = set.intersection(*(set(s) for s in scores.values()))
        labelled = {
            loc: (truth.get(loc) is not None)
            for loc in common
            if truth.get(loc) is None or truth[loc] >= lead
        }
        ids = sorted(labelled)
        y = np.array([labelled[i] for i in ids])
        print(
            f"\nscored {len(ids)} locations: {int(y.sum())} changed after {lead}, "
            f"{int((~y).sum())} unchanged ({len(common) - len(ids)} with earlier events left out)"
        )
        print(f"{'row':<18} AUROC")
        results = {}
        for name, s in scores.items():
            scorable = 0 < y.sum() < len(y)
            auc = float(roc_auc_score(y, [s[i] for i in ids])) if scorable else float("nan")
            results[name] = auc
            print(f"{name:<18} {auc:.3f}")
        best = max(results, key=lambda k: results[k])
        print(f"best row: {best}")
        print(f"caco r AUROC: {results['caco r']:.3f}")
    finally:
        cluster.release()
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
