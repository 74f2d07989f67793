"""Speed and peak memory of ``revisit changemap pair`` on a generated full-size product pair.

Generates (or reuses) a pair of ``--size`` pixels a side with :mod:`fulltile`
(10,980: a whole Sentinel-2 tile, 13 bands x 2 dates at native resolution,
1.74 GiB on disk, about 45 s to generate), exports a randomly initialised
encoder to ONNX as ``bench/oscd.py`` does (``random.embedding.onnx`` and the
``random.dense.onnx`` that ``hypercolumn`` scoring looks for beside it; about
20 s), then runs, as a child process::

    python -m revisit.cli changemap pair WORK/pair/imgs_1 WORK/pair/imgs_2 \\
        --out WORK/map.tif --model WORK/random.embedding.onnx [--scoring S] [EXTRA...]

with ``REVISIT_DATA_DIR=WORK/var`` (nothing is written there when ``--model``
is given). It measures the command's wall time and its peak resident memory
(``ru_maxrss`` of ``os.wait4``: the child's high-water mark, which covers any
process it waits for), and, as a sanity figure, the pixel AUROC of the map
against the generated change mask (every changed pixel and up to 2 million
unchanged ones drawn at random, read strip by strip).

A watchdog samples the child's resident memory every 0.2 s and kills it above
``--kill-above`` GiB (default 8), so a whole-scene reader does not drive a
shared machine into swap or the OOM killer; the run is then reported killed.

Output: the product size, wall time, km² per second (``size² x 100 m²``),
peak RSS, and last a line such as::

    pairmap: 812.3 km²/s, peak RSS 1.42 GiB (limit 2.0 GiB)

    .venv/bin/python bench/pairmap.py [--size 10980] [--work DIR] [--scoring stem]
        [--extra "--stride 16"] [--kill-above 8] [--timeout S] [--keep]

The pair stays under ``WORK/pair`` for the next run (its ``fulltile.json``
stamp); the map (and files beside it such as ``map.mask.tif``) and the
model are removed unless ``--keep``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# ``import onnx`` (inside revisit) would import bench/onnx.py with this folder first on the
# path; at the end, it still finds fulltile.py.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

import argparse  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import rasterio  # noqa: E402
from fulltile import FULL_SIZE, PIXEL_M, describe, generate_pair  # noqa: E402
from rasterio.windows import Window  # noqa: E402

#: The memory the full-tile pair map must stay within.
LIMIT_GIB = 2.0
REVISIT = [sys.executable, "-m", "revisit.cli"]
_SAMPLE_S = 0.2


@dataclass(frozen=True)
class ChildRun:
    """A finished child process.

    Attributes:
        returncode: Its exit status (negative: the signal that ended it).
        wall_s: Seconds from start to exit.
        peak_rss_bytes: Its peak resident set (``ru_maxrss``).
        killed: True if the watchdog killed it for using too much memory.
        timed_out: True if the watchdog killed it for running too long.
        output: Its standard output and error, interleaved.
    """

    returncode: int
    wall_s: float
    peak_rss_bytes: int
    killed: bool
    timed_out: bool
    output: str


def default_work(size: int) -> Path:
    """``/var/tmp/revisit-pairmap-SIZE``."""
    return Path("/var/tmp") / f"revisit-pairmap-{size}"


def export_random(directory: Path, patch_size: int = 32) -> Path:
    """A randomly initialised encoder (seed 0) exported as ``bench/oscd.py`` does, twice.

    ``directory/random.embedding.onnx`` and, beside it, ``random.dense.onnx``
    (its feature maps), named as ``revisit export onnx`` publishes them, so the
    pair map finds the dense model for ``hypercolumn`` scoring from the
    embedding one. Torch is needed here, not in the command measured.

    Returns:
        The embedding model's path (the one to pass as ``--model``).
    """
    import torch

    from revisit.export.onnx import DenseModel, EmbeddingModel, export_model, model_metadata
    from revisit.learner.heads import ContrastiveModel

    torch.manual_seed(0)
    model = ContrastiveModel(queue_size=8)
    paths = []
    for module in (EmbeddingModel(model), DenseModel(model)):
        path = directory / f"random.{module.output}.onnx"
        metadata = model_metadata(
            module, method="random", step=0, model_version=None, patch_size=patch_size, opset=18
        )
        export_model(module, path, metadata=metadata, opset=18, patch_size=patch_size)
        paths.append(path)
    return paths[0]


def _rss_bytes(pid: int) -> int | None:
    """The current resident set of ``pid`` (``VmRSS``), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def run_measured(
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    kill_above_bytes: int | None = None,
    timeout_s: float | None = None,
    echo: bool = True,
) -> ChildRun:
    """Run ``argv``; return its status, wall time and peak RSS (from ``os.wait4``).

    Args:
        argv: The command.
        env: Its environment (this process's by default).
        kill_above_bytes: Kill it (SIGKILL) when its resident set exceeds this.
        timeout_s: Kill it when it has run this long.
        echo: Copy its output to this process's standard output as it comes.
    """
    started = time.perf_counter()
    proc = subprocess.Popen(
        list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    killed = threading.Event()
    timed_out = threading.Event()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(_SAMPLE_S):
            rss = _rss_bytes(proc.pid)
            if rss is None:
                return
            late = timeout_s is not None and time.perf_counter() - started > timeout_s
            if late or (kill_above_bytes is not None and rss > kill_above_bytes):
                (timed_out if late else killed).set()
                os.kill(proc.pid, signal.SIGKILL)
                return

    watchdog = threading.Thread(target=watch, daemon=True)
    watchdog.start()
    lines: list[str] = []
    try:
        for line in proc.stdout or ():
            lines.append(line)
            if echo:
                print(f"  | {line}", end="", flush=True)
        # Wait without reaping, so the watchdog never signals a reused pid; then reap with
        # wait4 rather than proc.wait(): it gives the child's rusage.
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        wall_s = time.perf_counter() - started
        done.set()
        watchdog.join()
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        done.set()
        if proc.returncode is None:
            proc.kill()
            proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.stdout is not None:
        proc.stdout.close()
    return ChildRun(
        returncode=proc.returncode,
        wall_s=wall_s,
        peak_rss_bytes=usage.ru_maxrss * 1024,  # KiB on Linux
        killed=killed.is_set(),
        timed_out=timed_out.is_set(),
        output="".join(lines),
    )


def pixel_auroc(
    change_map: Path, mask: Path, *, negatives: int = 2_000_000, seed: int = 0
) -> tuple[float, float]:
    """Pixel AUROC of ``change_map`` against ``mask`` (1 = changed), and the finite fraction.

    Every changed pixel is used, and unchanged ones drawn at random (about
    ``negatives``): AUROC does not depend on the classes' proportions. Read
    512 rows at a time. NaN pixels are left out.

    Returns:
        (AUROC, fraction of the map's pixels that are finite); AUROC is NaN if
        either class is empty.
    """
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    scores: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    finite = 0
    with rasterio.open(change_map) as ds_map, rasterio.open(mask) as ds_mask:
        if (ds_map.width, ds_map.height) != (ds_mask.width, ds_mask.height):
            raise ValueError(
                f"{change_map} is {ds_map.width}x{ds_map.height}, the mask"
                f" {ds_mask.width}x{ds_mask.height}"
            )
        total = ds_map.width * ds_map.height
        keep = min(1.0, negatives / total)
        for row in range(0, ds_map.height, 512):
            window = Window(0, row, ds_map.width, min(512, ds_map.height - row))
            values = ds_map.read(1, window=window).ravel()
            truth = ds_mask.read(1, window=window).ravel() > 0
            ok = np.isfinite(values)
            finite += int(ok.sum())
            chosen = ok & (truth | (rng.random(values.size) < keep))
            scores.append(values[chosen])
            labels.append(truth[chosen])
    y = np.concatenate(labels)
    s = np.concatenate(scores)
    if y.all() or not y.any():
        return float("nan"), finite / total
    return float(roc_auc_score(y, s)), finite / total


def pair_command(
    before: Path, after: Path, *, out: Path, model: Path, extra: list[str] | None = None
) -> list[str]:
    """``revisit changemap pair BEFORE AFTER --out OUT --model MODEL [EXTRA...]`` as argv."""
    return [
        *REVISIT,
        "changemap",
        "pair",
        str(before),
        str(after),
        "--out",
        str(out),
        "--model",
        str(model),
        *(extra or []),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=FULL_SIZE, help="pixels a side at 10 m")
    parser.add_argument("--work", type=Path, help="folder (default /var/tmp/revisit-pairmap-SIZE)")
    parser.add_argument("--scoring", help="passed on as --scoring (hypercolumn, stem, windows)")
    parser.add_argument("--extra", default="", help='more CLI arguments, e.g. "--stride 16"')
    parser.add_argument("--changes", type=int, default=200, help="changed rectangles")
    parser.add_argument(
        "--kill-above", type=float, default=8.0, help="GiB of RSS at which the child is killed"
    )
    parser.add_argument("--timeout", type=float, help="seconds after which the child is killed")
    parser.add_argument("--keep", action="store_true", help="keep the map and the model")
    args = parser.parse_args(argv)
    # A SIGTERM (``timeout``, a CI runner) unwinds run_measured, which kills the child.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    work = (args.work or default_work(args.size)).expanduser().absolute()
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)
    pair = generate_pair(work / "pair", size=args.size, changes=args.changes, progress=True)
    print(describe(pair), flush=True)

    t0 = time.perf_counter()
    model = export_random(work)
    print(f"pairmap: random ONNX models {model} (+ dense) in {time.perf_counter() - t0:.1f} s")

    out = work / "map.tif"
    for path in work.glob(f"{out.stem}.*"):
        path.unlink()
    extra = shlex.split(args.extra)
    if args.scoring:
        extra = ["--scoring", args.scoring, *extra]
    command = pair_command(pair.before, pair.after, out=out, model=model, extra=extra)
    env = dict(os.environ, REVISIT_DATA_DIR=str(work / "var"), COLUMNS="200")
    print(f"$ revisit {shlex.join(command[len(REVISIT) :])}", flush=True)
    run = run_measured(
        command, env=env, kill_above_bytes=int(args.kill_above * 2**30), timeout_s=args.timeout
    )

    size = args.size
    km2 = size * size * PIXEL_M * PIXEL_M / 1e6
    peak_gib = run.peak_rss_bytes / 2**30
    print(f"product: {size} x {size} px at 10 m, {km2:,.0f} km², 13 bands x 2 dates")
    print(f"wall: {run.wall_s:.1f} s, exit status {run.returncode}")
    print(f"peak RSS: {peak_gib:.2f} GiB ({run.peak_rss_bytes:,} bytes)")
    ok = run.returncode == 0 and out.is_file()
    if ok:
        with rasterio.open(out) as ds, rasterio.open(pair.mask) as ds_mask:
            grid_ok = (ds.width, ds.height, ds.crs, ds.transform) == (
                ds_mask.width,
                ds_mask.height,
                ds_mask.crs,
                ds_mask.transform,
            )
            print(f"map: {out} {ds.width} x {ds.height}, on BEFORE's grid: {grid_ok}")
        auroc, finite = pixel_auroc(out, pair.mask)
        print(f"pixel AUROC vs the generated mask: {auroc:.3f} ({finite:.1%} of pixels finite)")
    if not args.keep:
        # The map and what the command writes beside it (``map.mask.tif``...).
        for path in [out, *work.glob(f"{out.stem}.*"), *work.glob("random.*.onnx")]:
            path.unlink(missing_ok=True)
    if run.killed:
        print(
            f"pairmap: KILLED above {args.kill_above:g} GiB after {run.wall_s:.0f} s,"
            f" peak RSS {peak_gib:.2f} GiB (limit {LIMIT_GIB} GiB)"
        )
        return 1
    if run.timed_out:
        print(
            f"pairmap: TIMED OUT after {run.wall_s:.0f} s,"
            f" peak RSS {peak_gib:.2f} GiB (limit {LIMIT_GIB} GiB)"
        )
        return 1
    if not ok:
        print(
            f"pairmap: FAILED (exit status {run.returncode}) after {run.wall_s:.0f} s,"
            f" peak RSS {peak_gib:.2f} GiB (limit {LIMIT_GIB} GiB)"
        )
        return 1
    print(
        f"pairmap: {km2 / run.wall_s:,.1f} km²/s, peak RSS {peak_gib:.2f} GiB"
        f" (limit {LIMIT_GIB} GiB)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
