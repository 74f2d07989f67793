"""Kill -9 trials: SIGKILL ``revisit run`` at seeded moments, restart it, check what it left.

:class:`KillHarness` starts the real service (simulated source, embedded
PostgreSQL in the test's data directory, health port 0), waits for a phase of
its work to begin (read from its JSON log on standard error), sleeps a seeded
random delay, records the state that must never go back, and sends SIGKILL to
the service process alone (the embedded cluster, started by ``pg_ctl`` in a
session of its own, lives on, as after a crash of the service). With the
service dead it runs ``revisit chips gc --min-age 1s`` (zero is refused) (the housekeeping of
the chip store) and checks the invariants; the next trial's restart is checked
for resuming the learner from its last committed checkpoint.

A last, clean run (SIGTERM after a publish and a housekeeping run) checks that
no temporary file of any kind is left anywhere in the data directory.
"""

from __future__ import annotations

import random
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort
import sqlalchemy as sa

from revisit.db.embedded import EmbeddedPostgres
from revisit.db.scenes import chip_refs
from revisit.export.publish import export_dir, read_manifest
from revisit.fsutil import TMP_SUFFIX, sha256_file
from revisit.ingest.chips import ChipStore
from tests.daemon.conftest import REVISIT, Daemon

#: Where a kill lands: the phase whose start triggers it.
PHASES = ("ingest", "learn", "export", "random")
# `revisit chips gc --min-age` between trials: the shortest it accepts.
GC_MIN_AGE_S = 1

#: The uniqueness the schema defines (revisit/db/models.py), as SQL that lists violations.
UNIQUE_KEYS = {
    "scene": "source, product_id",
    "observation": "location_id, scene_id",
    "change_event": "location_id, step",
}

#: The default test world, with ingest spread over a few runs (so that later trials can kill
#: one in the middle), exports every 5 steps and housekeeping every few seconds.
TRIAL_ENV = {
    "REVISIT_DAEMON__INGEST_MAX_SCENES": "30",
    "REVISIT_DAEMON__INGEST_EVERY_S": "3",
    "REVISIT_DAEMON__HOUSEKEEPING_EVERY_S": "4",
    "REVISIT_DAEMON__CHIP_GC_MIN_AGE_S": "2",
    "REVISIT_DAEMON__EXPORT_EVERY_STEPS": "5",
    "REVISIT_EXPORT__DENSE_MODEL": "false",
}
#: The last, clean run publishes the newest checkpoint the trials left as soon as its
#: scheduler starts (not after five more steps), and learns one chunk only meanwhile (then
#: pauses), so that the export child has the cores to itself: the run is an ONNX export
#: long, not an export under a learner taking every core.
FINAL_ENV = {
    "REVISIT_DAEMON__EXPORT_EVERY_S": "2",
    "REVISIT_DAEMON__LEARN_EVERY_S": "600",
}


def _is_phase(phase: str) -> Callable[[dict[str, Any]], bool]:
    if phase == "ingest":
        return lambda r: (
            str(r.get("job", "")).startswith("ingest:") and (r.get("message") == "ingest starts")
        )
    if phase == "learn":
        return lambda r: r.get("job") == "learn" and r.get("logger") == "revisit.learner.online"
    if phase == "export":
        return lambda r: r.get("job") == "export:onnx"
    raise ValueError(f"no trigger for phase {phase!r}")


@dataclass
class Snapshot:
    """What must never go back: change-estimate updates per location, the committed step."""

    updates: dict[int, int]
    step: int


@dataclass
class Trial:
    """One kill and what the checks after it found."""

    index: int
    phase: str
    delay_s: float
    alive_s: float = 0.0
    triggered: bool = True
    checks: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def line(self) -> str:
        how = self.phase if self.triggered else f"{self.phase} (never seen; killed on timeout)"
        state = "ok" if not self.failures else f"FAILED: {'; '.join(self.failures)}"
        return (
            f"trial {self.index:2d}: kill -9 at {self.alive_s:5.1f} s, {how} + "
            f"{self.delay_s:.1f} s; {len(self.checks)} checks {state}"
        )


@dataclass
class KillReport:
    """The trials run and every invariant checked."""

    seed: int
    trials: list[Trial] = field(default_factory=list)
    final: Trial | None = None

    @property
    def all(self) -> list[Trial]:
        return self.trials + ([self.final] if self.final else [])

    @property
    def checks(self) -> int:
        return sum(len(t.checks) for t in self.all)

    @property
    def failures(self) -> list[str]:
        return [f"trial {t.index}: {f}" for t in self.all for f in t.failures]

    def render(self) -> str:
        lines = [f"kill -9 trials (seed {self.seed}):"]
        lines += [t.line() for t in self.trials]
        if self.final is not None:
            lines.append(
                f"final clean run: {len(self.final.checks)} checks "
                + ("ok" if not self.final.failures else "FAILED: " + "; ".join(self.final.failures))
            )
        lines.append(
            f"{len(self.trials)} trials, {self.checks} invariants checked, "
            f"{len(self.failures)} failures"
        )
        return "\n".join(lines)


class KillHarness:
    """Seeded kill -9 trials against ``revisit run`` on one data directory.

    Args:
        env: The service's environment (its data directory, a small world).
        seed: Seeds the phases and delays.
        trials: How many kills.
        phase_timeout_s: How long to wait for a phase before killing anyway.
    """

    def __init__(
        self, env: dict[str, str], *, seed: int, trials: int, phase_timeout_s: float = 60.0
    ) -> None:
        self.env = {**env, **TRIAL_ENV}
        self.data_dir = Path(env["REVISIT_DATA_DIR"])
        self.rng = random.Random(seed)
        self.report = KillReport(seed=seed)
        self.n_trials = trials
        self.phase_timeout_s = phase_timeout_s
        self.last: Snapshot | None = None
        self.daemons: list[Daemon] = []

    # -- the trials ----------------------------------------------------------------------

    def run(self) -> KillReport:
        """Run every trial, then the final clean run; returns the report."""
        phases = list(PHASES)
        for index in range(1, self.n_trials + 1):
            # The first few cover every phase once; the rest are drawn.
            phase = phases[index - 1] if index <= len(phases) else self.rng.choice(phases)
            self._trial(index, phase)
        self._final()
        return self.report

    def _start(self, env: dict[str, str] | None = None) -> Daemon:
        daemon = Daemon(env or self.env)
        self.daemons.append(daemon)
        return daemon

    def _trial(self, index: int, phase: str) -> None:
        if phase == "random":
            delay = self.rng.uniform(2.0, 30.0)
        elif phase == "export":
            delay = self.rng.uniform(0.0, 6.0)
        else:
            delay = self.rng.uniform(0.0, 2.5)
        trial = Trial(index=index, phase=phase, delay_s=delay)
        daemon = self._start()
        began = time.monotonic()
        if phase != "random":
            seen = _is_phase(phase)
            deadline = began + self.phase_timeout_s
            while not any(seen(r) for r in daemon.records()):
                if daemon.proc.poll() is not None:
                    raise AssertionError(
                        f"revisit run exited ({daemon.proc.returncode}) in trial {index}:\n"
                        + daemon.log_text()[-4000:]
                    )
                if time.monotonic() > deadline:
                    trial.triggered = False
                    break
                time.sleep(0.05)
        kill_at = time.monotonic() + delay
        before = self._snapshot(daemon) if daemon.proc.poll() is None else None
        time.sleep(max(0.0, kill_at - time.monotonic()))
        trial.alive_s = time.monotonic() - began
        if daemon.proc.poll() is not None:
            trial.failures.append(f"revisit run exited by itself ({daemon.proc.returncode})")
        daemon.proc.kill()  # SIGKILL to the service alone
        killed = time.monotonic()
        daemon.wait(timeout=30)
        self._check_resumed(trial, daemon)
        # gc keeps files younger than its --min-age (1 s): a temporary the kill cut
        # off mid-write must be older than that before gc can be asked to remove it.
        time.sleep(max(0.0, killed + GC_MIN_AGE_S + 0.5 - time.monotonic()))
        self._gc()
        self._check(trial, before)
        self.report.trials.append(trial)

    def _final(self) -> None:
        """A clean run after the kills: publish, housekeep, stop; then nothing temporary stays."""
        trial = Trial(index=self.n_trials + 1, phase="final", delay_s=0.0)
        daemon = self._start({**self.env, **FINAL_ENV})
        daemon.wait_for(
            "an ONNX publish and a housekeeping run",
            lambda: (
                any(m.startswith("job export:onnx ") for m in daemon.messages())
                and any(m.startswith("job housekeeping done") for m in daemon.messages())
            ),
            timeout=120,
        )
        before = self._snapshot(daemon)
        seconds = daemon.stop()
        trial.alive_s = seconds
        trial.checks.append("clean exit")
        if daemon.proc.returncode != 0:
            trial.failures.append(f"SIGTERM exit status {daemon.proc.returncode}")
        self._check_resumed(trial, daemon)
        self._gc()
        self._check(trial, before)
        trial.checks.append("no temporaries anywhere")
        left = self._temporaries(self.data_dir, skip=self.data_dir / "postgres")
        if left:
            trial.failures.append(f"temporaries left after housekeeping: {left[:5]}")
        self.report.final = trial

    # -- state ---------------------------------------------------------------------------

    def _engine(self) -> sa.Engine:
        cluster = EmbeddedPostgres(self.data_dir)
        return sa.create_engine(cluster.sqlalchemy_url(), poolclass=sa.pool.NullPool)

    def _query(self, work: Callable[[sa.Connection], Any]) -> Any:
        # As one more user of the cluster: it starts when the service is not running.
        with EmbeddedPostgres(self.data_dir):
            engine = self._engine()
            try:
                with engine.connect() as conn:
                    return work(conn)
            finally:
                engine.dispose()

    @staticmethod
    def _read_snapshot(conn: sa.Connection) -> Snapshot:
        rows = conn.execute(sa.text("SELECT location_id, updates FROM change_estimate")).all()
        updates = {row[0]: row[1] for row in rows}
        step = conn.execute(sa.text("SELECT coalesce(max(step), 0) FROM model_version")).scalar()
        return Snapshot(updates={int(k): int(v) for k, v in updates.items()}, step=int(step or 0))

    def _snapshot(self, daemon: Daemon) -> Snapshot | None:
        try:
            snapshot: Snapshot = self._query(self._read_snapshot)
        except Exception:  # the cluster may still be starting: the check after the kill covers it
            return None
        return snapshot

    def _gc(self) -> None:
        result = subprocess.run(
            [*REVISIT, "chips", "gc", "--min-age", f"{GC_MIN_AGE_S}s"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(f"revisit chips gc failed:\n{result.stdout}\n{result.stderr}")

    @staticmethod
    def _temporaries(root: Path, *, skip: Path | None = None) -> list[str]:
        if not root.is_dir():
            return []
        found: list[str] = []
        for path in root.rglob("*"):
            if skip is not None and (path == skip or skip in path.parents):
                continue
            name = path.name
            if (name.startswith(".") and name.endswith(TMP_SUFFIX)) or name.startswith(".staging-"):
                found.append(str(path.relative_to(root)))
        return sorted(found)

    # -- invariants ----------------------------------------------------------------------

    def _check_resumed(self, trial: Trial, daemon: Daemon) -> None:
        """The run just ended opened its learner at (or past) the last committed step."""
        if self.last is None:
            return
        opened = [
            r for r in daemon.records() if str(r.get("message", "")).startswith("learner open:")
        ]
        if not opened:
            return  # killed before it opened the learner: nothing to check
        trial.checks.append("learner resumed from its last checkpoint")
        step = int(opened[0].get("step", -1))
        if step < self.last.step:
            trial.failures.append(
                f"learner opened at step {step}, before the last committed step {self.last.step}"
            )

    def _check(self, trial: Trial, before: Snapshot | None) -> None:
        store = ChipStore(self.data_dir / "chips")

        def work(conn: sa.Connection) -> tuple[Snapshot, list[str], int, dict[str, int]]:
            checked, bad = store.verify(chip_refs(conn))
            dupes = {
                table: len(
                    conn.execute(
                        sa.text(f"SELECT {cols} FROM {table} GROUP BY {cols} HAVING count(*) > 1")
                    ).all()
                )
                for table, cols in UNIQUE_KEYS.items()
            }
            return self._read_snapshot(conn), bad, checked, dupes

        now, bad, checked, dupes = self._query(work)
        trial.checks.append(f"{checked} chips on disk with their sha256")
        if bad:
            trial.failures.append(f"{len(bad)} observations without their chip: {bad[:3]}")
        for table, count in dupes.items():
            trial.checks.append(f"no duplicate {table}")
            if count:
                trial.failures.append(f"{count} duplicate keys in {table}")

        for label, earlier in (("before the kill", before), ("after the last trial", self.last)):
            if earlier is None:
                continue
            trial.checks.append(f"updates and step never decrease ({label})")
            went_back = {
                loc: (n, now.updates.get(loc, 0))
                for loc, n in earlier.updates.items()
                if now.updates.get(loc, 0) < n
            }
            if went_back:
                trial.failures.append(f"change_estimate.updates went back {label}: {went_back}")
            if now.step < earlier.step:
                trial.failures.append(
                    f"committed step went back {label}: {earlier.step} -> {now.step}"
                )
        self.last = now

        trial.checks.append("latest.json names whole models that load")
        trial.failures += self._check_manifest()

        trial.checks.append("no chip temporaries after `revisit chips gc`")
        left = self._temporaries(self.data_dir / "chips")
        if left:
            trial.failures.append(f"chip temporaries after gc: {left[:5]}")

    def _check_manifest(self) -> list[str]:
        try:
            manifest = read_manifest(self.data_dir)
        except Exception as exc:
            return [f"latest.json unreadable: {exc}"]
        if manifest is None:
            return []
        problems: list[str] = []
        directory = export_dir(self.data_dir)
        for kind, name in manifest["files"].items():
            path = directory / name
            if not path.is_file():
                problems.append(f"latest.json names {name}, which is missing")
                continue
            if sha256_file(path) != manifest["sha256"][kind]:
                problems.append(f"{name} does not match its sha256 in latest.json")
                continue
            try:
                ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            except Exception as exc:
                problems.append(f"{name} does not load in onnxruntime: {exc}")
        return problems

    def kill_all(self) -> None:
        """Kill any service still running (a failed test's cleanup)."""
        for daemon in self.daemons:
            daemon.kill()
