"""Child processes the daemon runs and keeps running: its ingest workers and distributed learner.

:class:`Supervisor` starts each :class:`ChildSpec`, restarts one that exits
(after a back-off that doubles while it keeps dying young), and stops them all
on shutdown: SIGTERM first, so each ends cleanly (an ingest worker finishes its
scene), then SIGKILL for any still there after ``stop_timeout_s``. Children
get the daemon's settings through the environment
(:func:`settings_environment`), share its standard error (their JSON log lines
mix with the daemon's), and are told to stop by themselves should the daemon
die first.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from revisit.config import ENV_PREFIX, Settings

log = logging.getLogger(__name__)

#: A child that lived this long before exiting is restarted at once.
HEALTHY_AFTER_S = 30.0


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, Path | date):
        return str(value) if isinstance(value, Path) else value.isoformat()
    raise TypeError(f"cannot pass a {type(value).__name__} to a child process")


def settings_environment(settings: Settings) -> dict[str, str]:
    """An environment in which ``load_settings()`` builds exactly ``settings``.

    The current environment without its ``REVISIT_*`` variables (and so
    without ``REVISIT_CONFIG``), plus one variable per setting: sections as
    JSON, secrets in clear (the environment of a child is as private as the
    parent's).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, dict):
            text = json.dumps(value, default=_plain)
        else:
            plain = value if isinstance(value, str) else _plain(value)
            text = plain if isinstance(plain, str) else json.dumps(plain)
        env[f"{ENV_PREFIX}{name.upper()}"] = text
    return env


def ingest_worker_specs(settings: Settings) -> list[ChildSpec]:
    """The ``daemon.ingest_workers`` children ``revisit ingest --worker --exit-with-parent``."""
    env = settings_environment(settings)
    argv = [sys.executable, "-m", "revisit.cli", "ingest", "--worker", "--exit-with-parent"]
    return [
        ChildSpec(name=f"ingest-worker-{i + 1}", argv=argv, env=env)
        for i in range(settings.daemon.ingest_workers)
    ]


def learner_spec(settings: Settings) -> ChildSpec:
    """The learner of ``daemon.learner_processes`` > 1: ``revisit learn --nproc N --forever``.

    One child (the launcher), which runs the N ranks under ``torch.distributed.run``
    and stops them, checkpointed, on SIGTERM or when the daemon is gone.
    """
    argv = [
        sys.executable,
        "-m",
        "revisit.cli",
        "learn",
        "--nproc",
        str(settings.daemon.learner_processes),
        "--forever",
        "--exit-with-parent",
    ]
    return ChildSpec(name="learner", argv=argv, env=settings_environment(settings))


@dataclass
class ChildSpec:
    """One child process to keep running.

    Attributes:
        name: For the log.
        argv: Its command line.
        env: Its environment.
    """

    name: str
    argv: list[str]
    env: dict[str, str] = field(repr=False)


@dataclass
class _Child:
    spec: ChildSpec
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    backoff_s: float = 0.0
    restart_at: float = 0.0


class Supervisor:
    """Runs child processes, restarts those that exit, stops them all on :meth:`stop`.

    Args:
        specs: The children.
        stop_timeout_s: How long :meth:`stop` waits after SIGTERM before SIGKILL.
        max_backoff_s: The longest wait before restarting a child that keeps dying.
        poll_s: How often the children are checked.
    """

    def __init__(
        self,
        specs: Sequence[ChildSpec],
        *,
        stop_timeout_s: float = 60.0,
        max_backoff_s: float = 30.0,
        poll_s: float = 0.5,
    ) -> None:
        self.children = [_Child(spec) for spec in specs]
        self.stop_timeout_s = stop_timeout_s
        self.max_backoff_s = max_backoff_s
        self.poll_s = poll_s
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)

    def start(self) -> None:
        """Start every child, and the thread that restarts them."""
        with self._lock:
            for child in self.children:
                self._spawn(child)
        self._thread.start()

    def running(self) -> int:
        """How many children are running now."""
        with self._lock:
            return sum(1 for c in self.children if c.proc is not None and c.proc.poll() is None)

    def pids(self) -> list[int]:
        """The process ids of the children running now."""
        with self._lock:
            return [c.proc.pid for c in self.children if c.proc and c.proc.poll() is None]

    def terminate(self) -> None:
        """Stop restarting and send SIGTERM to every child; returns at once (see :meth:`stop`)."""
        self._stopping.set()
        with self._lock:
            for child in self.children:
                if child.proc is not None and child.proc.poll() is None:
                    child.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM every child, wait up to ``stop_timeout_s``, SIGKILL what is left."""
        self.terminate()
        if self._thread.is_alive():
            self._thread.join()
        deadline = time.monotonic() + self.stop_timeout_s
        for child in self.children:
            proc = child.proc
            if proc is None:
                continue
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning(
                    "%s did not stop within %g s; killing it",
                    child.spec.name,
                    self.stop_timeout_s,
                    extra={"child": child.spec.name, "pid": proc.pid},
                )
                proc.kill()
                proc.wait()
        log.info("child processes stopped", extra={"children": len(self.children)})

    def _spawn(self, child: _Child) -> None:
        child.proc = subprocess.Popen(
            child.spec.argv, env=child.spec.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )
        child.started = time.monotonic()
        log.info(
            "started %s",
            child.spec.name,
            extra={"child": child.spec.name, "pid": child.proc.pid, "restarts": child.restarts},
        )

    def _watch(self) -> None:
        while not self._stopping.wait(self.poll_s):
            with self._lock:
                if self._stopping.is_set():
                    return
                now = time.monotonic()
                for child in self.children:
                    self._check(child, now)

    def _check(self, child: _Child, now: float) -> None:
        proc = child.proc
        if proc is not None:
            code = proc.poll()
            if code is None:
                return
            lived = now - child.started
            child.backoff_s = (
                0.0
                if lived >= HEALTHY_AFTER_S
                else min(max(child.backoff_s * 2, 1.0), self.max_backoff_s)
            )
            child.restart_at = now + child.backoff_s
            child.proc = None
            log.log(
                logging.INFO if code == 0 else logging.ERROR,
                "%s exited with status %d after %.1f s; restarting it in %.0f s",
                child.spec.name,
                code,
                lived,
                child.backoff_s,
                extra={"child": child.spec.name, "pid": proc.pid, "status": code},
            )
        if now >= child.restart_at:
            child.restarts += 1
            try:
                self._spawn(child)
            except OSError as exc:
                child.backoff_s = min(max(child.backoff_s * 2, 1.0), self.max_backoff_s)
                child.restart_at = now + child.backoff_s
                log.error("could not start %s: %s", child.spec.name, exc)
