"""How fast the chip store feeds the learner: checked batch reads, in chips per second.

Writes N chips (12 x 64 x 64 uint16) to a store in a temporary directory, then
reads them back in batches with ``ChipStore.get_many`` (sha256 checked, the
way the learner reads). The baseline, in the same run, reads the same files'
bytes with no decoding or checking; the ratio says what the checks cost. The
figure printed last is checked chips per second.

    .venv/bin/python bench/chips.py [--chips 2000] [--batch 256]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from revisit.ingest.chips import ChipStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chips", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="revisit-bench-chips-"))
    try:
        store = ChipStore(root)
        rng = np.random.default_rng(0)
        began = time.perf_counter()
        stored = [
            store.put(rng.integers(0, 10000, (12, args.size, args.size), dtype=np.uint16))
            for _ in range(args.chips)
        ]
        write_s = time.perf_counter() - began
        keys = [s.key for s in stored]
        shas = [s.sha256 for s in stored]

        began = time.perf_counter()
        for i in range(0, len(keys), args.batch):
            for key in keys[i : i + args.batch]:
                store.path(key).read_bytes()
        raw_s = time.perf_counter() - began

        began = time.perf_counter()
        for i in range(0, len(keys), args.batch):
            batch = store.get_many(keys[i : i + args.batch], shas[i : i + args.batch])
            assert batch.shape[1:] == (12, args.size, args.size)
        checked_s = time.perf_counter() - began
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"written (fsynced): {args.chips / write_s:.0f} chips/s")
    print(f"raw file reads (baseline): {args.chips / raw_s:.0f} chips/s")
    print(f"checked/raw ratio: {raw_s / checked_s:.2f}")
    print(f"checked batch reads: {args.chips / checked_s:.0f} chips/s")


if __name__ == "__main__":
    main()
