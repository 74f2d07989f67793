"""Memory of ``revisit run`` on the demo: steady and peak resident set size, against the targets.

Starts the real ``revisit run`` (the defaults of ``make run``: the embedded
database, the simulated source, the ``demo`` AOI of 16 locations) on a fresh
data directory and samples, every ``--interval`` seconds for ``--seconds``
seconds, the resident set size (RSS) of the daemon process and of every
process it started (an ONNX export's child included). The embedded PostgreSQL
server's processes are left out of that figure and reported on their own, as
RSS and as PSS (their shared buffers counted once). ONNX exports come every
``--export-every-steps`` learner steps (the demo's default is 100) so that
some fall inside the window; each ``job … done`` line of the daemon's log is
shown with the RSS at that moment.

The figures printed last: steady RSS (the median after ``--warmup`` seconds,
target ≤ 1.0 GB) and peak RSS (target ≤ 1.3 GB) of the daemon and its
children, GB = 10⁹ bytes.

    .venv/bin/python bench/memory.py [--seconds 300] [--warmup 90]
        [--export-every-steps 50] [--set KEY=VALUE ...]

``--set`` adds environment variables for the daemon (``REVISIT_…`` settings,
``MALLOC_ARENA_MAX``) to measure their effect.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from revisit.db.embedded import EmbeddedPostgres

PAGE = os.sysconf("SC_PAGE_SIZE")
GB = 1e9
STEADY_TARGET_GB = 1.0
PEAK_TARGET_GB = 1.3


@dataclass(frozen=True)
class Sample:
    """One look at the processes, ``t`` seconds after the daemon started (bytes)."""

    t: float
    daemon: int
    children: int
    n_children: int
    postgres_rss: int
    postgres_pss: int
    pss: int

    @property
    def total(self) -> int:
        return self.daemon + self.children


def _parents() -> dict[int, int]:
    """pid → parent pid of every process now."""
    out: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields start after the last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(entry)] = int(fields[1])
    return out


def _tree(root: int, parents: dict[int, int]) -> list[int]:
    """``root`` and all its descendants that are alive."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in parents:
            found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return _rss(pid)


def _is_postgres(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() in ("postgres", "postmaster")
    except OSError:
        return False


def sample(daemon_pid: int, cluster: EmbeddedPostgres, began: float) -> Sample:
    """RSS of the daemon, of its (non-PostgreSQL) descendants, and of the PostgreSQL server."""
    parents = _parents()
    postmaster = cluster.postmaster_pid()
    pg = set(_tree(postmaster, parents)) if postmaster is not None else set()
    tree = [pid for pid in _tree(daemon_pid, parents) if pid not in pg and not _is_postgres(pid)]
    children = [pid for pid in tree if pid != daemon_pid]
    return Sample(
        t=time.monotonic() - began,
        daemon=_rss(daemon_pid),
        children=sum(_rss(pid) for pid in children),
        n_children=len(children),
        postgres_rss=sum(_rss(pid) for pid in pg),
        postgres_pss=sum(_pss(pid) for pid in pg),
        pss=sum(_pss(pid) for pid in tree),
    )


class LogReader:
    """Reads the daemon's JSON log lines on a thread, keeping each with its arrival time."""

    def __init__(self, stream: object, began: float, path: Path) -> None:
        self.events: list[tuple[float, str]] = []
        self._stream = stream
        self._began = began
        self._path = path
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with self._path.open("w") as keep:
            for line in self._stream:  # type: ignore[attr-defined]
                keep.write(line)
                if not line.startswith("{"):
                    continue
                try:
                    message = str(json.loads(line).get("message", ""))
                except json.JSONDecodeError:
                    continue
                if message.startswith(("job ", "learner open", "published")):
                    self.events.append((time.monotonic() - self._began, message))

    def join(self) -> None:
        self._thread.join(timeout=10)


def _gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300, help="how long to sample")
    parser.add_argument("--warmup", type=float, default=90, help="left out of the steady figure")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--export-every-steps", type=int, default=50)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="daemon environment"
    )
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="revisit-bench-memory-"))
    root.chmod(0o755)  # the unprivileged postgres user must reach the cluster inside
    data_dir = root / "var"
    env = {k: v for k, v in os.environ.items() if not k.startswith("REVISIT_")}
    env.update(
        {
            "REVISIT_DATA_DIR": str(data_dir),
            "REVISIT_LOG_FORMAT": "json",
            "REVISIT_DAEMON__HTTP_PORT": "0",
            "REVISIT_DAEMON__EXPORT_EVERY_STEPS": str(args.export_every_steps),
        }
    )
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r} is not KEY=VALUE")
        env[key] = value
    cluster = EmbeddedPostgres(data_dir)
    began = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "revisit.cli", "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    log = LogReader(proc.stderr, began, root / "daemon.log")
    samples: list[Sample] = []
    shown = 0
    try:
        while time.monotonic() - began < args.seconds:
            if proc.poll() is not None:
                raise SystemExit(f"revisit run exited ({proc.returncode}); log in {root}")
            s = sample(proc.pid, cluster, began)
            samples.append(s)
            for t, message in log.events[shown:]:
                print(f"{t:6.1f} s  {_gb(s.total):>8}  {message[:110]}", flush=True)
            shown = len(log.events)
            time.sleep(args.interval)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.join()
        if cluster.is_running():
            cluster.stop()
        if args.keep:
            print(f"data directory and daemon.log kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    exports = [t for t, m in log.events if m.startswith("job export:onnx done")]
    steady = [s for s in samples if s.t >= args.warmup]
    if not steady:
        raise SystemExit("no sample after the warm-up: raise --seconds or lower --warmup")
    peak = max(samples, key=lambda s: s.total)
    print(
        f"{len(samples)} samples over {samples[-1].t:.0f} s; {len(exports)} ONNX exports"
        f" (at {', '.join(f'{t:.0f} s' for t in exports) or 'none'})"
    )
    if not exports:
        print("warning: no ONNX export in the window: the peak does not include one")
    pg_rss = statistics.median(s.postgres_rss for s in steady)
    pg_pss = statistics.median(s.postgres_pss for s in steady)
    print(
        f"postgres server (not counted): steady RSS {_gb(pg_rss)}, PSS {_gb(pg_pss)};"
        f" peak RSS {_gb(max(s.postgres_rss for s in samples))}"
    )
    print(
        f"daemon process alone: steady {_gb(statistics.median(s.daemon for s in steady))},"
        f" peak {_gb(max(s.daemon for s in samples))}; children at the peak:"
        f" {peak.n_children} ({_gb(peak.children)}), most children at once:"
        f" {_gb(max(s.children for s in samples))}"
    )
    alone = [s for s in steady if s.n_children == 0]
    if alone:
        print(
            f"steady RSS while no child runs: {_gb(statistics.median(s.total for s in alone))}"
            f" ({len(alone)} of {len(steady)} samples after the warm-up)"
        )
    print(
        f"daemon and children, PSS (shared pages counted once): steady"
        f" {_gb(statistics.median(s.pss for s in steady))}, peak {_gb(max(s.pss for s in samples))}"
    )
    steady_gb = statistics.median(s.total for s in steady) / GB
    peak_gb = peak.total / GB
    verdict = "met" if steady_gb <= STEADY_TARGET_GB and peak_gb <= PEAK_TARGET_GB else "NOT met"
    print(
        f"steady RSS {steady_gb:.2f} GB (target <= {STEADY_TARGET_GB}), peak RSS {peak_gb:.2f} GB"
        f" at {peak.t:.0f} s (target <= {PEAK_TARGET_GB}): targets {verdict}"
    )


if __name__ == "__main__":
    main()
