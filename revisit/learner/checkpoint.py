"""Checkpoint files: written atomically, found through ``model_version``, pruned by age.

A checkpoint is one ``torch.save`` file under ``<data_dir>/checkpoints/<method>/``
named by its step. It is written to a temporary name in the same directory,
flushed to disk (``fsync``), renamed into place and the directory flushed, so a
kill at any moment leaves either the whole file or none under its name. The
file becomes *the* checkpoint only when its ``model_version`` row commits,
together with the change estimates and events of the steps it covers; a file
with no row (a kill between the rename and the commit) is an orphan that the
next prune removes, and a resumed learner never sees it.

Files hold only tensors, numbers, strings, lists and dicts, and are read back
with ``torch.load(weights_only=True)``: loading a checkpoint never runs code.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from revisit.errors import LearnerError
from revisit.fsutil import TMP_SUFFIX, fsync_dir, sha256_file, temp_name

#: Version of the file layout; a file of another version is refused with a clear error.
CHECKPOINT_FORMAT = 1
CHECKPOINT_DIR = "checkpoints"
SUFFIX = ".pt"


class CheckpointError(LearnerError):
    """A checkpoint is missing, damaged, or of another format or method."""


def checkpoint_key(method: str, step: int) -> str:
    """The data-dir-relative name of a checkpoint, e.g. ``checkpoints/caco/step-0000000100.pt``."""
    if step < 0:
        raise ValueError(f"step must be ≥ 0, got {step}")
    return f"{CHECKPOINT_DIR}/{method}/step-{step:010d}{SUFFIX}"


def _path(data_dir: Path, key: str) -> Path:
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != CHECKPOINT_DIR or any(p in ("", ".", "..") for p in parts):
        raise CheckpointError(f"not a checkpoint key: {key!r}")
    return data_dir / key


def save_checkpoint(data_dir: Path, key: str, payload: Mapping[str, Any]) -> tuple[str, int]:
    """Write a checkpoint atomically.

    Args:
        data_dir: The data directory.
        key: From :func:`checkpoint_key`.
        payload: What to save; ``format`` is added.

    Returns:
        (sha256 of the file, its size in bytes).

    Raises:
        CheckpointError: The write failed (a full disk, say); no partial file is
            left under the checkpoint's name.
    """
    target = _path(data_dir, key)
    tmp = temp_name(target)
    out: _HashingWriter | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as f:
            out = _HashingWriter(f)
            # A file-like object with write and flush is all torch.save asks of one.
            torch.save({"format": CHECKPOINT_FORMAT, **payload}, out)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        # torch.save reports a failed write as an unrelated RuntimeError of its zip writer:
        # the write's own error is the one to give.
        cause = out.error if out is not None and out.error is not None else exc
        if isinstance(cause, OSError):
            raise CheckpointError(f"could not write checkpoint {key}: {cause}") from cause
        raise
    return out.digest.hexdigest(), out.size


class _HashingWriter:
    """A file that hashes and counts what is written through it.

    ``torch.save`` writes its zip archive front to back, so the file's sha256 is
    known once it is written, without a second read and without the checkpoint
    held in memory as bytes (a ``BytesIO`` and its value were two copies of it:
    the daemon's peak at every checkpoint).
    """

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.digest = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: bytes | memoryview) -> int:
        try:
            written = self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise
        self.digest.update(data)
        self.size += len(data) if isinstance(data, bytes) else data.nbytes
        return written

    def flush(self) -> None:
        self._f.flush()


def load_checkpoint(data_dir: Path, key: str, *, sha256: str | None = None) -> dict[str, Any]:
    """Read a checkpoint, checking its hash when one is given.

    Raises:
        CheckpointError: The file is missing, fails its hash, cannot be read, or
            is of another format.
    """
    path = _path(data_dir, key)
    if sha256 is not None:
        try:
            actual = sha256_file(path)
        except OSError as exc:
            raise CheckpointError(f"checkpoint {key} is missing or unreadable: {exc}") from exc
        if actual != sha256:
            raise CheckpointError(
                f"checkpoint {key} fails its hash: sha256 {actual}, expected {sha256}"
            )
    return _load(path, key)


def load_checkpoint_file(path: Path) -> dict[str, Any]:
    """Read a checkpoint file by its path (another data directory's, say).

    Raises:
        CheckpointError: The file is missing, cannot be read, or is of another format.
    """
    path = Path(path)
    return _load(path, str(path))


def _load(path: Path, label: str) -> dict[str, Any]:
    """``torch.load`` of a checkpoint, memory-mapped, its format checked.

    Memory-mapped (``mmap=True``): a tensor's pages are read from the file when
    they are used, so what a reader leaves alone (the export leaves the
    optimiser's state) never takes memory, and the file is never also held as
    bytes beside the tensors made from it.
    """
    if not path.is_file():
        raise CheckpointError(f"checkpoint {label} is missing or unreadable: no such file {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises several kinds for a damaged file
        raise CheckpointError(f"checkpoint {label} cannot be read: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"checkpoint {label} has format {found!r};"
            f" this revisit reads format {CHECKPOINT_FORMAT}"
        )
    return payload


def prune_checkpoints(data_dir: Path, *, keep: Iterable[str]) -> list[str]:
    """Remove checkpoint files not in ``keep`` and leftover temporary files.

    Args:
        data_dir: The data directory.
        keep: Keys to keep (the newest committed checkpoints).

    Returns:
        The data-dir-relative names removed.
    """
    root = data_dir / CHECKPOINT_DIR
    keep_paths = {_path(data_dir, key) for key in keep}
    removed: list[str] = []
    if not root.is_dir():
        return removed
    for path in sorted(root.glob("*/*")):
        if not path.is_file() or path in keep_paths:
            continue
        if path.name.endswith(SUFFIX) or path.name.endswith(TMP_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            removed.append(path.relative_to(data_dir).as_posix())
    return removed
