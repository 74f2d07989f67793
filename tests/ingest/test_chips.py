"""The chip store: content-addressed, whole or absent, checked on read, garbage-collected."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from revisit.errors import ChipStoreError
from revisit.ingest.chips import ChipStore


def _chip(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 10000, (12, 64, 64), dtype=np.uint16)


def test_round_trip_and_content_addressing(tmp_path: Path) -> None:
    store = ChipStore(tmp_path / "chips")
    chip = _chip()
    stored = store.put(chip)
    assert stored.key == f"{stored.sha256[:2]}/{stored.sha256[2:4]}/{stored.sha256}.npy"
    np.testing.assert_array_equal(store.get(stored.key, stored.sha256), chip)
    assert store.put(chip.copy()) == stored  # same pixels, same file
    assert list(store.keys()) == [stored.key]
    batch = store.get_many([stored.key, store.put(_chip(1)).key])
    assert batch.shape == (2, 12, 64, 64)


def test_corruption_and_loss_are_reported(tmp_path: Path) -> None:
    store = ChipStore(tmp_path / "chips")
    stored = store.put(_chip())
    path = store.path(stored.key)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ChipStoreError, match="fails its hash"):
        store.get(stored.key, stored.sha256)
    path.unlink()
    with pytest.raises(ChipStoreError, match="missing"):
        store.get(stored.key, stored.sha256)


@pytest.mark.parametrize("key", ["../../etc/passwd", "ab/cd/../x.npy", "/abs/ab/x.npy", "ab/x.npy"])
def test_keys_cannot_leave_the_store(tmp_path: Path, key: str) -> None:
    with pytest.raises(ChipStoreError, match="not a chip key"):
        ChipStore(tmp_path).get(key)


def test_wrong_arrays_are_refused(tmp_path: Path) -> None:
    store = ChipStore(tmp_path)
    with pytest.raises(ChipStoreError, match="uint16"):
        store.put(np.zeros((12, 8, 8), dtype=np.float32))  # type: ignore[arg-type]
    with pytest.raises(ChipStoreError, match="uint16"):
        store.put(np.zeros((8, 8), dtype=np.uint16))


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "chips"
    root.mkdir()
    chip = _chip()
    # The chip's directory cannot be made: a file sits where it should be.
    sha_dir = ChipStore(root, fsync=False).put(chip).key.split("/")[0]
    for entry in sorted((root / sha_dir).rglob("*"), reverse=True):
        entry.unlink() if entry.is_file() else entry.rmdir()
    (root / sha_dir).rmdir()
    (root / sha_dir).write_text("in the way")
    with pytest.raises(ChipStoreError, match="could not write"):
        ChipStore(root).put(chip)
    assert [p.name for p in root.iterdir()] == [sha_dir]


def test_garbage_collection_keeps_referenced_and_young_files(tmp_path: Path) -> None:
    store = ChipStore(tmp_path)
    kept, orphan, young = store.put(_chip(1)), store.put(_chip(2)), store.put(_chip(3))
    temporary = store.path(kept.key).parent / ".deadbeef.123.456.tmp"
    temporary.write_bytes(b"half a chip")
    old = time.time() - 7200
    for path in (store.path(kept.key), store.path(orphan.key), temporary):
        os.utime(path, (old, old))
    report = store.collect_garbage({kept.key}, min_age_s=3600)
    assert (report.chips, report.temporaries) == (1, 1)
    assert set(store.keys()) == {kept.key, young.key}
    assert not temporary.exists()


def test_storing_an_existing_chip_again_makes_it_young(tmp_path: Path) -> None:
    """A chip a killed run left unreferenced, stored again by the re-ingest, survives gc
    running before the re-ingest's rows commit."""
    store = ChipStore(tmp_path)
    left = store.put(_chip(4))
    old = time.time() - 7200
    os.utime(store.path(left.key), (old, old))
    again = store.put(_chip(4))
    assert again == left
    report = store.collect_garbage(set(), min_age_s=3600)  # no row names it yet
    assert report.chips == 0
    assert store.get(left.key, left.sha256).shape == _chip(4).shape
