"""How fast revisit's database comes up: first use against a reused cluster.

First use creates the embedded PostgreSQL cluster (initdb, PostGIS) and
migrates it; every later start reuses both. Both are timed in this process,
several rounds each, and the figure printed last is the median speed-up of a
warm start over a cold one.

    .venv/bin/python bench/startup.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from revisit.config import load_settings
from revisit.db.engine import Database
from revisit.db.migrate import upgrade


def start_and_migrate(data_dir: Path) -> float:
    began = time.perf_counter()
    with Database(load_settings(data_dir=data_dir)) as db:
        upgrade(db.engine)
        elapsed = time.perf_counter() - began
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cold, warm = [], []
    for _ in range(args.rounds):
        root = Path(tempfile.mkdtemp(prefix="revisit-bench-"))
        root.chmod(0o755)
        try:
            cold.append(start_and_migrate(root / "var"))
            warm.append(start_and_migrate(root / "var"))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print(f"cold start (initdb + PostGIS + migrate): median {statistics.median(cold):.2f} s")
    print(f"warm start (reuse cluster, schema at head): median {statistics.median(warm):.2f} s")
    print(f"warm/cold speed-up: {statistics.median(cold) / statistics.median(warm):.1f}x")


if __name__ == "__main__":
    main()
