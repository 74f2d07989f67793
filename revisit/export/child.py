"""Publishing the ONNX models in a child process, so the service's memory returns after it.

An export imports the ONNX exporter (``torch.export``, onnxscript), loads a
second copy of the model from its checkpoint and traces it: hundreds of
megabytes that a long-running process would keep (modules stay imported, and
the C allocator rarely gives freed memory back). :func:`publish_in_child` runs
:func:`revisit.export.publish.publish_onnx` in ``python -m revisit.export.child``
instead and waits for it; when the child ends, all of that goes back to the
system. The child reads the committed checkpoint from disk, so the learner
need not pause meanwhile.

Where it can, the parent does the part of the export that needs PyTorch
itself (:func:`~revisit.export.publish.prepare_export`: the weights of each
model and PyTorch's outputs on the parity chips, written to files under
``<data_dir>/cache/export-prepared/``) and the child, which then never imports
PyTorch, makes the models from the graph cache, checks them against those
outputs and publishes them: a child of about 0.3 GB instead of 0.9 GB. The
parent prepares only when it has PyTorch loaded already (the daemon does, for
its learner; a process without it would grow by PyTorch's libraries for good)
and the graph cache holds every graph; otherwise, or should preparing fail,
the child does the whole export with PyTorch, as it does the first time an
architecture is exported.

The parent hands the child its settings and database URL (pickled, on the
child's standard input) and reads one JSON object back from a pipe of its own:
the published version, or the child's error message. The child's log lines go
to the standard error it shares with the parent, with the parent's context ids
(the job's id) on them. A child that is killed, or fails, publishes nothing:
publishing is atomic (see :mod:`revisit.export.publish`), and what a killed one
leaves in its staging directory the next publish removes.

This module imports nothing heavy; the child imports the exporter itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from revisit.config import Settings
from revisit.errors import ExportError

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from revisit.export.publish import PreparedExport

__all__ = ["DEFAULT_TIMEOUT_S", "ChildExportError", "ChildPublished", "main", "publish_in_child"]

log = logging.getLogger("revisit.export.child")  # also when run as __main__

#: How long the parent waits for an export before killing the child.
DEFAULT_TIMEOUT_S = 3600.0
#: Where prepared exports lie, relative to the data directory.
PREPARED_DIR = "cache/export-prepared"
_PR_SET_PDEATHSIG = 1


class ChildExportError(ExportError):
    """The export child failed, was killed or timed out; the message is the child's own."""


@dataclass(frozen=True)
class ChildPublished:
    """What the child published (the fields of :class:`~revisit.export.publish.PublishedModel`
    a caller of the parent side needs).

    Attributes:
        version: The version name, e.g. ``step0000000300-mv00000007-caco``.
        model_version_id: The ``model_version`` row it was exported from.
        method: Its learning method.
        step: Its learner step.
        paths: The ``.onnx`` file of each output.
        reused: True when the version had been published before and nothing was exported.
        pid: The child's process id.
        seconds: How long the child ran, start-up included (the parent's
            preparation too).
        torch: Whether the child imported PyTorch (False when it published an
            export the parent prepared, or a version published before).
    """

    version: str
    model_version_id: int
    method: str
    step: int
    paths: dict[str, Path]
    reused: bool
    pid: int
    seconds: float
    torch: bool


def publish_in_child(
    *,
    engine: Engine,
    settings: Settings,
    chip_root: Path | None = None,
    model_version_id: int | None = None,
    log_ids: dict[str, object] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    prepare: bool | None = None,
) -> ChildPublished:
    """Run :func:`~revisit.export.publish.publish_onnx` in a child process and wait for it.

    The parent first prepares the export (see the module's description) when
    ``prepare`` is True, or when it is None and PyTorch is loaded in this process.

    The child ignores SIGINT (a Ctrl-C that stops the service lets a running
    export finish, as the service promises) and gets SIGTERM should the thread
    that started it die first.

    Args:
        engine: The database; the child connects to the same URL.
        settings: The configuration, passed to the child as it is.
        chip_root: The chip store the parity chips are read from;
            ``<data_dir>/chips`` by default.
        model_version_id: Publish this model version instead of the newest.
        log_ids: Context ids for the child's log lines (e.g. ``{"job": "export:onnx"}``).
        timeout_s: Kill the child after this many seconds.
        prepare: Prepare the export here (True), never (False), or when PyTorch
            is loaded already (None).

    Returns:
        What the child published (``reused`` when it had been published before).

    Raises:
        ChildExportError: The child reported an error (its message, which names
            the model version or file at fault), exited without a result, was
            killed by a signal, or ran past ``timeout_s``.
    """
    began = time.monotonic()
    if prepare is None:
        prepare = "torch" in sys.modules
    prepared = (
        _prepare(
            engine=engine,
            settings=settings,
            chip_root=chip_root,
            model_version_id=model_version_id,
            log_ids=log_ids,
        )
        if prepare
        else None
    )
    try:
        return _publish_in_child(
            {
                "settings": settings,
                "database_url": engine.url.render_as_string(hide_password=False),
                "chip_root": str(chip_root) if chip_root is not None else None,
                # The version prepared, should a newer one be committed meanwhile.
                "model_version_id": (
                    prepared.model_version_id if prepared is not None else model_version_id
                ),
                "log_ids": dict(log_ids or {}),
                "prepared": prepared,
            },
            began=began,
            timeout_s=timeout_s,
        )
    finally:
        if prepared is not None:
            shutil.rmtree(prepared.directory, ignore_errors=True)


def _prepare(
    *,
    engine: Engine,
    settings: Settings,
    chip_root: Path | None,
    model_version_id: int | None,
    log_ids: dict[str, object] | None,
) -> PreparedExport | None:
    """The export prepared in this process, or None (the child then exports with PyTorch)."""
    from revisit.export.publish import prepare_export
    from revisit.ingest.chips import ChipStore
    from revisit.logs import log_context
    from revisit.memory import trim_heap

    root = settings.data_dir / PREPARED_DIR
    _remove_abandoned(root)
    try:
        with log_context(**(log_ids or {})):
            return prepare_export(
                engine=engine,
                settings=settings,
                root=root,
                store=ChipStore(chip_root) if chip_root is not None else None,
                model_version_id=model_version_id,
            )
    except Exception as exc:  # the child does it all again, and reports what fails
        log.warning("could not prepare the export here (the child exports with PyTorch): %s", exc)
        return None
    finally:
        trim_heap()


def _remove_abandoned(root: Path) -> None:
    """Remove prepared exports whose process has gone (``<pid>-<ns>`` directories)."""
    if not root.is_dir():
        return
    for path in root.iterdir():
        pid_text = path.name.split("-", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # another user's process: alive
            continue


def _publish_in_child(request: dict[str, Any], *, began: float, timeout_s: float) -> ChildPublished:
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "revisit.export.child", "--result-fd", str(write_fd)],
            stdin=subprocess.PIPE,
            pass_fds=(write_fd,),
        )
    except OSError as exc:
        os.close(read_fd)
        raise ChildExportError(f"could not start the export child: {exc}") from exc
    finally:
        os.close(write_fd)
    log.info("export child started", extra={"pid": proc.pid})
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        with contextlib.suppress(ProcessLookupError):
            proc.kill()

    timer = threading.Timer(timeout_s, kill)
    timer.daemon = True
    timer.start()
    with os.fdopen(read_fd, "rb") as reader:
        try:
            # Writes the request, closes the child's stdin and waits for the child to end;
            # the reply (a few hundred bytes) waits in the pipe meanwhile.
            proc.communicate(pickle.dumps(request))
            reply = reader.read()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
            raise
        finally:
            timer.cancel()
    code = proc.returncode
    return _outcome(
        reply,
        code=code,
        pid=proc.pid,
        seconds=time.monotonic() - began,
        timed_out=timed_out.is_set(),
        timeout_s=timeout_s,
    )


def _outcome(
    reply: bytes, *, code: int, pid: int, seconds: float, timed_out: bool, timeout_s: float
) -> ChildPublished:
    """The child's published version, or its failure as a :class:`ChildExportError`."""
    if timed_out:
        raise ChildExportError(f"the export child (pid {pid}) ran past {timeout_s:g} s; killed it")
    result: dict[str, Any] = {}
    if reply:
        try:
            result = json.loads(reply)
        except json.JSONDecodeError:
            result = {}
    if "error" in result:
        raise ChildExportError(f"{result['error']} (export child, pid {pid})")
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        raise ChildExportError(f"the export child (pid {pid}) was killed by {name}")
    if code != 0 or "published" not in result:
        raise ChildExportError(
            f"the export child (pid {pid}) exited with status {code} without a result;"
            " its log is above"
        )
    done = result["published"]
    return ChildPublished(
        version=str(done["version"]),
        model_version_id=int(done["model_version_id"]),
        method=str(done["method"]),
        step=int(done["step"]),
        paths={output: Path(path) for output, path in done["paths"].items()},
        reused=bool(done["reused"]),
        pid=pid,
        seconds=seconds,
        torch=bool(done.get("torch", True)),
    )


# -- the child ---------------------------------------------------------------------------------


def _exit_with_parent() -> None:
    """Ask Linux for SIGTERM when the parent goes; elsewhere, nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _run(request: dict[str, Any]) -> dict[str, Any]:
    import sqlalchemy as sa

    from revisit.export.publish import publish_onnx
    from revisit.ingest.chips import ChipStore
    from revisit.logs import log_context

    settings: Settings = request["settings"]
    prepared = request.get("prepared")
    if settings.learner.threads and prepared is None:
        import torch

        torch.set_num_threads(settings.learner.threads)
    engine = sa.create_engine(
        request["database_url"],
        poolclass=sa.pool.NullPool,
        connect_args={"connect_timeout": 10, "application_name": "revisit-export"},
    )
    chip_root = request.get("chip_root")
    try:
        with log_context(**request.get("log_ids", {})):
            published = publish_onnx(
                engine=engine,
                settings=settings,
                store=ChipStore(Path(chip_root)) if chip_root else None,
                model_version_id=request.get("model_version_id"),
                prepared=prepared,
            )
    finally:
        engine.dispose()
    return {
        "version": published.version,
        "model_version_id": published.model_version_id,
        "method": published.method,
        "step": published.step,
        "paths": {output: str(path) for output, path in published.paths.items()},
        "reused": published.reused,
        "torch": "torch" in sys.modules,
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m revisit.export.child --result-fd N``: publish, write the outcome to fd N.

    The request (see :func:`publish_in_child`) is read from standard input.

    Returns:
        0 when the models were published, 1 when publishing failed.
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "--result-fd" or not args[1].isdigit():
        sys.stderr.write("usage: python -m revisit.export.child --result-fd N < request\n")
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent()
    with os.fdopen(int(args[1]), "w") as out:
        request: dict[str, Any] = pickle.loads(sys.stdin.buffer.read())  # from our parent
        settings: Settings = request["settings"]
        from revisit.errors import RevisitError
        from revisit.logs import configure_logging

        configure_logging(level=settings.log_level, fmt=settings.log_format)
        try:
            outcome: dict[str, object] = {"published": _run(request)}
        except RevisitError as exc:
            outcome = {"error": f"{type(exc).__name__}: {exc}"}
        except Exception as exc:  # unexpected: the traceback goes to the log
            log.exception("the ONNX export failed")
            outcome = {"error": f"{type(exc).__name__}: {exc}"}
        with contextlib.suppress(BrokenPipeError):
            out.write(json.dumps(outcome))
    return 0 if "published" in outcome else 1


if __name__ == "__main__":
    sys.exit(main())
