"""Durable file writes: a temporary name beside the target, fsync, rename, fsync the directory.

Every file revisit publishes (chips, checkpoints, ONNX models, manifests, maps)
goes through these, so a kill at any moment leaves the old file or the whole
new one under its name, never a part.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from pathlib import Path

TMP_SUFFIX = ".tmp"


def temp_name(path: Path) -> Path:
    """A hidden temporary name beside ``path``, unique to this process and moment."""
    return path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}{TMP_SUFFIX}")


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries (a rename into it) to stable storage."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` as ``path`` durably and atomically.

    Raises:
        OSError: The write failed (a full disk, say); the temporary file is
            removed and ``path`` is as it was.
    """
    tmp = temp_name(path)
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
