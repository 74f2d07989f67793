"""Learner speed: training tuples per second, against the pure compute bound in the same run.

The learner run is ``OnlineLearner.run`` on an ingested simulated world: mining,
chip reads with their hash checks, augmentation, the step, the change
bookkeeping, checkpoints and the batched database writes. The compute bound is
the same ``Trainer.train_step`` (forward and backward passes, momentum update,
queues, R) on random tensors of the same shapes, with no data loading and no
database. Both take the same number of steps after the same warm-up. The
figure printed last is learner tuples/s ÷ compute-bound tuples/s (target ≥ 0.85:
loading and writing overlap compute instead of adding to it).

    .venv/bin/python bench/learner.py [--locations 64] [--steps 60] [--batch 32]
        [--crop-size 32] [--nproc N]

With ``--nproc N`` the learner is ``revisit learn --nproc N`` (N real processes,
torch.distributed DDP, gloo on CPU; ``--batch`` locations per process), timed by
its own summary (the steps' seconds, not process start-up), and the figure is
its tuples/s ÷ (N x the compute bound of one process with ``cores / N``
threads and the same per-process batch): 1.0 is a perfect N-fold scale-out of
what one such process computes. On a 2-core machine N = 2 is a correctness
run (two processes of one thread each on two cores), not a speed-up.

The learner's own recipe applies (``learner.crop_size`` 32 px training crops,
channels-last, the ``spectral`` augmentation); ``--crop-size`` measures another
crop size, both rows at the same one.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import sqlalchemy as sa
import torch

from revisit.config import IngestSettings, Settings, load_settings
from revisit.db.embedded import EmbeddedPostgres
from revisit.db.locations import insert_locations
from revisit.db.migrate import upgrade
from revisit.ingest.chips import ChipStore
from revisit.ingest.pipeline import IngestPipeline
from revisit.ingest.sources.simulated import SimulatedSource
from revisit.learner.loader import TrainBatch
from revisit.learner.online import OnlineLearner
from revisit.learner.trainer import Trainer

START = date(2023, 1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--locations", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--chip-size", type=int, default=64)
    parser.add_argument("--method", default="caco")
    parser.add_argument("--crop-size", type=int, default=32, help="learner.crop_size; 0: chip")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--nproc", type=int, default=1, help="learner processes (DDP)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    root = Path(tempfile.mkdtemp(prefix="revisit-bench-learner-"))
    root.chmod(0o755)
    cluster = EmbeddedPostgres(root / "var" / "postgres")
    try:
        cluster.acquire()
        url = cluster.sqlalchemy_url()
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        upgrade(engine)
        side = max(1, round(args.locations**0.5))
        points = [
            (8.05 + 0.9 * (i % side) / side, 47.05 + 0.9 * (i // side) / side)
            for i in range(args.locations)
        ]
        with engine.begin() as conn:
            insert_locations(conn, points, origin="manual", chip_size=args.chip_size)
        start = datetime.combine(START, datetime.min.time(), UTC)
        IngestPipeline(
            engine,
            ChipStore(root / "var" / "chips", fsync=False),
            SimulatedSource(seed=0, start=START),
            settings=IngestSettings(chip_size=args.chip_size),
        ).run(since=start, until=start + timedelta(days=560))
        settings = load_settings(
            database_url=url.render_as_string(hide_password=False),
            data_dir=root / "var",
            learner={
                "method": args.method,
                "batch_size": args.batch,
                "queue_size": 4096,
                "warmup_steps": args.warmup,
                "refit_every": 10,
                "checkpoint_every": args.checkpoint_every,
                "crop_size": args.crop_size,
            },
        )

        if args.nproc > 1:
            _distributed(args, settings, url.render_as_string(hide_password=False), root)
            return
        with OnlineLearner(settings=settings, engine=engine) as learner:
            learner.run(args.warmup)
            began = time.perf_counter()
            tuples = 0

            def count(report: object) -> None:
                nonlocal tuples
                tuples += args.batch

            learner.run(args.steps, on_step=count)
            learner_s = time.perf_counter() - began
            sample = learner._loader.get() if learner._loader is not None else None  # shapes
        if sample is None:
            raise SystemExit("no batch to copy shapes from")
        learner_rate = tuples / learner_s

        compute_rate = _compute_bound(settings, sample, args.steps, args.warmup)
        compute_s = args.steps * len(sample.tuples) / compute_rate

        crop = settings.learner.crop_size or args.chip_size
        print(
            f"method {args.method}, batch {args.batch}, chips {args.chip_size} px,"
            f" training crops {crop} px, channels_last {settings.learner.channels_last},"
            f" augment {settings.learner.augment}"
        )
        n = args.steps
        print(f"learner:       {learner_rate:8.1f} tuples/s ({n} steps, {learner_s:.1f} s)")
        print(f"compute bound: {compute_rate:8.1f} tuples/s ({n} steps, {compute_s:.1f} s)")
        print(f"learner / compute bound: {learner_rate / compute_rate:.3f}")
    finally:
        cluster.release()
        shutil.rmtree(root, ignore_errors=True)


def _compute_bound(settings: Settings, batch: TrainBatch, steps: int, warmup: int) -> float:
    """Tuples/s of ``Trainer.train_step`` alone on random tensors shaped like ``batch``."""
    trainer = Trainer(settings.learner)
    gen = torch.Generator().manual_seed(0)

    def like(t: torch.Tensor) -> torch.Tensor:
        return torch.rand(t.shape, generator=gen) * 0.3

    views = batch.seco_views
    batches = [
        TrainBatch(
            step=i,
            tuples=batch.tuples,
            x_query=like(batch.x_query),
            x_positive=like(batch.x_positive),
            x_longterm=like(batch.x_longterm),
            longterm_valid=batch.longterm_valid,
            query_view=like(batch.query_view),
            seco_views=None if views is None else (like(views[0]), like(views[1]), like(views[2])),
            cluster_id=batch.cluster_id,
        )
        for i in range(warmup + steps)
    ]
    changed = np.zeros(len(batch.tuples), dtype=bool)
    for b in batches[:warmup]:
        trainer.train_step(b, changed=changed)
    began = time.perf_counter()
    for b in batches[warmup:]:
        trainer.train_step(b, changed=changed)
    return steps * len(batch.tuples) / (time.perf_counter() - began)


def _distributed(args: argparse.Namespace, settings: Settings, url: str, root: Path) -> None:
    """``revisit learn --nproc N`` on the ingested world against N x one process's bound."""
    threads = max(1, (os.cpu_count() or 1) // args.nproc)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REVISIT_")}
    env.update(
        {
            "REVISIT_DATABASE_URL": url,
            "REVISIT_DATA_DIR": str(settings.data_dir),
            "REVISIT_LOG_LEVEL": "WARNING",
            "REVISIT_LEARNER": settings.learner.model_copy(
                update={"threads": threads}
            ).model_dump_json(),
        }
    )

    def learn(steps: int) -> float:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "revisit",
                "learn",
                "--nproc",
                str(args.nproc),
                "--steps",
                str(steps),
            ],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"revisit learn --nproc failed:\n{done.stderr[-4000:]}")
        found = re.search(
            r"(\d+) steps of (\d+) locations on \d+ processes in ([\d.]+) s", done.stdout
        )
        if found is None:
            raise SystemExit(f"no summary in the output:\n{done.stdout}")
        return int(found.group(1)) * int(found.group(2)) / float(found.group(3))

    learn(args.warmup)
    rate = learn(args.steps)
    torch.set_num_threads(threads)
    one = settings.model_copy(
        update={"learner": settings.learner.model_copy(update={"threads": threads})}
    )
    # A batch of the per-process size, for the shapes of the compute bound.
    with OnlineLearner(
        settings=one, engine=sa.create_engine(url, poolclass=sa.pool.NullPool)
    ) as lr:
        sample = lr._loader.get() if lr._loader is not None else None
        lr.close(checkpoint=False)
    if sample is None:
        raise SystemExit("no batch to copy shapes from")
    bound = _compute_bound(one, sample, args.steps, args.warmup)
    crop = settings.learner.crop_size or args.chip_size
    print(
        f"method {args.method}, {args.nproc} processes x batch {args.batch} (global"
        f" {args.nproc * args.batch}), {threads} thread(s) each on {os.cpu_count()} cores,"
        f" training crops {crop} px, gloo"
    )
    print(f"revisit learn --nproc {args.nproc}: {rate:8.1f} tuples/s ({args.steps} steps)")
    print(f"one process's compute bound: {bound:8.1f} tuples/s ({threads} thread(s))")
    if (os.cpu_count() or 1) < 2 * args.nproc:
        print("(fewer than 2 cores a process: a correctness run, not a speed-up)")
    print(f"learner / ({args.nproc} x compute bound): {rate / (args.nproc * bound):.3f}")


if __name__ == "__main__":
    main()
