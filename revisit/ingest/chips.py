"""The chip store: pixels on disk, named by their content, never half-written.

A chip is a ``.npy`` file (uint16, bands x height x width) under
``<data_dir>/chips/ab/cd/<sha256>.npy``, where the sha256 is of the file's
bytes. A write goes to a temporary name in the same directory, is fsynced and
renamed, and the directory is fsynced: a crash leaves either the whole file or
a temporary that :meth:`ChipStore.collect_garbage` removes. The database is the
source of truth: a file no ``observation`` names is garbage, and a row whose
file is missing or fails its hash is reported as :class:`ChipStoreError`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from revisit.errors import ChipStoreError, ChipStoreFullError
from revisit.fsutil import fsync_dir

SUFFIX = ".npy"
TMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class StoredChip:
    """Where a chip went: its key under the store and the sha256 of its bytes."""

    key: str
    sha256: str
    nbytes: int


@dataclass(frozen=True)
class GarbageReport:
    """What :meth:`ChipStore.collect_garbage` removed."""

    chips: int
    temporaries: int
    bytes: int


def encode(data: npt.NDArray[np.uint16]) -> bytes:
    """The ``.npy`` bytes of a chip (C order, little-endian uint16)."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(data, dtype="<u2"), allow_pickle=False)
    return buffer.getvalue()


def key_for(sha256: str) -> str:
    """The store key of a chip with this hash: ``ab/cd/<sha256>.npy``."""
    return f"{sha256[:2]}/{sha256[2:4]}/{sha256}{SUFFIX}"


class ChipStore:
    """Content-addressed chip files under one directory.

    Args:
        root: The store's directory (``<data_dir>/chips``); created on first write.
        fsync: Flush every file and directory to stable storage before it is
            referenced. Only tests of something else turn it off.
    """

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root
        self.fsync = fsync
        # Fan-out directories known to exist: skips a mkdir system call per chip.
        self._made: set[Path] = set()

    def path(self, key: str) -> Path:
        """The file of a key; rejects keys that would leave the store."""
        parts = key.split("/")
        if (
            len(parts) != 3
            or not parts[2].endswith(SUFFIX)
            or any(p in ("", ".", "..") for p in parts)
        ):
            raise ChipStoreError(f"not a chip key: {key!r}")
        return self.root / key

    def put(self, data: npt.NDArray[np.uint16]) -> StoredChip:
        """Store a chip; storing the same pixels twice writes one file.

        Raises:
            ChipStoreFullError: The filesystem is full; no partial file is left.
            ChipStoreError: The chip is not a 3-D uint16 array, or the write failed
                otherwise; no partial file is left under its name.
        """
        if data.dtype != np.uint16 or data.ndim != 3:
            raise ChipStoreError(
                f"a chip is a (bands, height, width) uint16 array, not {data.dtype} {data.shape}"
            )
        payload = encode(data)
        sha256 = hashlib.sha256(payload).hexdigest()
        key = key_for(sha256)
        target = self.root / key
        if target.exists() and target.stat().st_size == len(payload):
            # Young again: garbage collection spares files younger than its min age, and
            # this one (maybe left unreferenced by a killed run) is about to be named.
            try:
                os.utime(target)
            except FileNotFoundError:  # collected just now: write it afresh below
                pass
            else:
                return StoredChip(key, sha256, len(payload))
        directory = target.parent
        tmp = directory / f".{sha256}.{os.getpid()}.{time.monotonic_ns()}{TMP_SUFFIX}"
        try:
            if directory not in self._made:
                directory.mkdir(parents=True, exist_ok=True)
                self._made.add(directory)
            with tmp.open("wb") as f:
                f.write(payload)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            tmp.replace(target)
            if self.fsync:
                fsync_dir(directory)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ChipStoreFullError(
                    f"no space left for chips under {self.root} ({exc.strerror}) writing "
                    f"chip {key}: free space there"
                ) from exc
            raise ChipStoreError(f"could not write chip {key} under {self.root}: {exc}") from exc
        return StoredChip(key, sha256, len(payload))

    def free_bytes(self) -> int:
        """Free space, in bytes, on the filesystem that holds (or will hold) the store."""
        place = self.root
        while not place.exists() and place != place.parent:
            place = place.parent
        return shutil.disk_usage(place).free

    def get(self, key: str, sha256: str | None = None) -> npt.NDArray[np.uint16]:
        """Read a chip, checking its hash (against ``sha256``, or the one in its name).

        Raises:
            ChipStoreError: The file is missing, unreadable, or fails its hash.
        """
        path = self.path(key)
        try:
            payload = path.read_bytes()
        except OSError as exc:
            raise ChipStoreError(f"chip {key} is missing or unreadable: {exc}") from exc
        expected = sha256 or path.name.removesuffix(SUFFIX)
        actual = hashlib.sha256(payload).hexdigest()
        if actual != expected:
            raise ChipStoreError(f"chip {key} fails its hash: sha256 {actual}, expected {expected}")
        array = np.load(io.BytesIO(payload), allow_pickle=False)
        return np.asarray(array, dtype=np.uint16)

    def verify(self, refs: Iterable[tuple[int, str, str]]) -> tuple[int, list[str]]:
        """Check that each ``(observation_id, key, sha256)`` has its chip, with that hash.

        Returns:
            How many were checked, and one line per missing or corrupt chip.
        """
        checked = 0
        bad: list[str] = []
        for obs_id, key, sha in refs:
            checked += 1
            try:
                self.get(key, sha)
            except ChipStoreError as exc:
                bad.append(f"observation {obs_id}: {exc}")
        return checked, bad

    def get_many(
        self, keys: Sequence[str], sha256s: Sequence[str] | None = None
    ) -> npt.NDArray[np.uint16]:
        """Read chips of one shape into one (n, bands, H, W) array, each checked."""
        if sha256s is not None and len(sha256s) != len(keys):
            raise ValueError("keys and sha256s differ in length")
        if not keys:
            raise ValueError("no chips to read")
        first = self.get(keys[0], sha256s[0] if sha256s else None)
        out = np.empty((len(keys), *first.shape), dtype=np.uint16)
        out[0] = first
        for i in range(1, len(keys)):
            chip = self.get(keys[i], sha256s[i] if sha256s else None)
            if chip.shape != first.shape:
                raise ChipStoreError(f"chip {keys[i]} is {chip.shape}, not {first.shape}")
            out[i] = chip
        return out

    def keys(self) -> Iterator[str]:
        """Every chip key in the store (not temporaries)."""
        if not self.root.is_dir():
            return
        for path in self.root.glob(f"??/??/*{SUFFIX}"):
            yield f"{path.parent.parent.name}/{path.parent.name}/{path.name}"

    def collect_garbage(
        self, referenced: Iterable[str], *, min_age_s: float = 3600.0
    ) -> GarbageReport:
        """Remove chips no row references, and abandoned temporaries.

        Only files older than ``min_age_s`` go: a chip written by an ingest
        whose transaction has not committed yet is young, and must stay.

        Args:
            referenced: Every ``chip_key`` the database holds.
            min_age_s: Minimum age of a file to be removed.
        """
        keep = set(referenced)
        cutoff = time.time() - min_age_s
        chips = temporaries = freed = 0
        if not self.root.is_dir():
            return GarbageReport(0, 0, 0)
        for path in self.root.glob("??/??/*"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if st.st_mtime > cutoff:
                continue
            if path.name.endswith(TMP_SUFFIX):
                temporaries += 1
            elif path.name.endswith(SUFFIX):
                key = f"{path.parent.parent.name}/{path.parent.name}/{path.name}"
                if key in keep:
                    continue
                chips += 1
            else:
                continue
            path.unlink(missing_ok=True)
            freed += st.st_size
        return GarbageReport(chips=chips, temporaries=temporaries, bytes=freed)
