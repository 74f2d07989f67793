"""``revisit run`` in subprocesses, on an embedded cluster of the test's own, with small settings.

:class:`Daemon` starts the real command, reads its JSON log lines on a thread
and answers questions about them (and over HTTP) while it runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest

from revisit.db.embedded import EmbeddedPostgres
from tests.conftest import TORCH_THREADS, make_tempdir

REVISIT = [sys.executable, "-m", "revisit.cli"]

# A simulated world small enough for a test: four locations near Paris, one tile,
# acquisitions over the last 18 months (over a year, so long-term pairs exist). Counted
# back from today, not from a fixed day, so the world (and the time each daemon test
# spends ingesting it) does not grow with every month the suite is run.
SMALL_WORLD = {
    "REVISIT_SIMULATED__START": (date.today() - timedelta(days=550)).isoformat(),
    "REVISIT_DAEMON__BOOTSTRAP_BBOX": "[2.30, 48.80, 2.36, 48.84]",
    "REVISIT_DAEMON__BOOTSTRAP_SPACING_M": "2000",
    "REVISIT_DAEMON__INGEST_MAX_SCENES": "500",
    "REVISIT_DAEMON__LEARN_CHUNK_STEPS": "5",
    "REVISIT_DAEMON__EXPORT_EVERY_STEPS": "10",
    "REVISIT_DAEMON__CHANGEMAP_EVERY_S": "5",
    "REVISIT_DAEMON__CHANGEMAP_FORMATS": '["geojson", "cog"]',
    "REVISIT_LEARNER__BATCH_SIZE": "8",
    "REVISIT_LEARNER__QUEUE_SIZE": "64",
    "REVISIT_LEARNER__WARMUP_STEPS": "4",
    "REVISIT_LEARNER__REFIT_EVERY": "4",
    "REVISIT_LEARNER__CHECKPOINT_EVERY": "5",
    "REVISIT_LEARNER__REFRESH_EVERY": "5",
    "REVISIT_LEARNER__THREADS": TORCH_THREADS,
    "REVISIT_EXPORT__PARITY_CHIPS": "2",
    "REVISIT_EXPORT__DENSE_MODEL": "false",  # the daemon tests need no pair maps
}


@pytest.fixture
def daemon_env(cli_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """An environment whose embedded database and files live in a fresh data directory."""
    root = make_tempdir("revisit-daemon-")
    env = {**cli_env, "REVISIT_DATA_DIR": str(root / "var"), **SMALL_WORLD}
    yield env
    cluster = EmbeddedPostgres(root / "var")
    if cluster.is_running():
        cluster.stop()
    subprocess.run(["rm", "-rf", str(root)], check=False)


class Daemon:
    """A ``revisit run`` subprocess and its parsed log.

    Args:
        env: Its environment.
        args: Arguments after ``revisit run``.
        command: The ``revisit`` command itself (another installation's, say).
        cwd: The working directory it starts in.
    """

    def __init__(
        self,
        env: dict[str, str],
        *args: str,
        command: Sequence[str] = tuple(REVISIT),
        cwd: Path | None = None,
    ) -> None:
        self.proc = subprocess.Popen(
            [*command, "run", *args],
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._lock = threading.Lock()
        self._out: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._out_reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._out_reader.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._out.append(line)

    @property
    def stdout(self) -> str:
        return "".join(self._out)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._lock:
                self.raw.append(line)
                if line.startswith("{"):
                    self.lines.append(json.loads(line))

    def messages(self) -> list[str]:
        with self._lock:
            return [str(line.get("message", "")) for line in self.lines]

    def records(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.lines)

    def log_text(self) -> str:
        with self._lock:
            return "".join(self.raw)

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float) -> Any:
        """Poll ``check`` until it returns something truthy; fail with the log if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            if self.proc.poll() is not None:
                pytest.fail(f"revisit run exited ({self.proc.returncode}) before {what}:\n"
                            + self.log_text()[-6000:])  # fmt: skip
            time.sleep(0.2)
        pytest.fail(f"no {what} within {timeout:g} s:\n" + self.log_text()[-6000:])

    def wait_for_message(self, text: str, timeout: float) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            return next((r for r in self.records() if text in str(r.get("message"))), None)

        found: dict[str, Any] = self.wait_for(repr(text), find, timeout)
        return found

    @property
    def url(self) -> str:
        def find() -> dict[str, Any] | None:
            return next(
                (r for r in self.records() if r.get("logger") == "revisit.daemon.health"), None
            )

        record = self.wait_for("the HTTP server's port", find, timeout=120)
        return f"http://127.0.0.1:{record['port']}"

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 120) -> float:
        """Send ``sig`` and wait for the exit; returns the seconds it took."""
        began = time.monotonic()
        self.proc.send_signal(sig)
        return self.wait(timeout) - began

    def wait(self, timeout: float) -> float:
        """Wait for the process to end by itself; returns when (monotonic)."""
        self.proc.wait(timeout=timeout)
        ended = time.monotonic()
        self._reader.join(timeout=10)
        self._out_reader.join(timeout=10)
        return ended

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Daemons a test starts; any still running at the end are killed."""
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.kill()


def data_dir(env: dict[str, str]) -> Path:
    return Path(env["REVISIT_DATA_DIR"])
