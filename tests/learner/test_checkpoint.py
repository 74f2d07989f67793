"""Checkpoint files: atomic writes, hash checks, format checks, pruning."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from revisit.fsutil import sha256_file
from revisit.learner.checkpoint import (
    CheckpointError,
    checkpoint_key,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)


def test_round_trip_with_hash(tmp_path: Path) -> None:
    key = checkpoint_key("caco", 12)
    assert key == "checkpoints/caco/step-0000000012.pt"
    sha, size = save_checkpoint(tmp_path, key, {"step": 12, "w": torch.arange(4.0)})
    assert size == (tmp_path / key).stat().st_size
    loaded = load_checkpoint(tmp_path, key, sha256=sha)
    assert loaded["step"] == 12 and torch.equal(loaded["w"], torch.arange(4.0))
    assert [p.name for p in (tmp_path / "checkpoints" / "caco").iterdir()] == [
        "step-0000000012.pt"
    ]  # no temporary file left


def test_missing_damaged_and_foreign_files_are_clear_errors(tmp_path: Path) -> None:
    key = checkpoint_key("tp", 3)
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path, key)
    sha, _ = save_checkpoint(tmp_path, key, {"step": 3})
    (tmp_path / key).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="fails its hash"):
        load_checkpoint(tmp_path, key, sha256=sha)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path, key)
    buffer = io.BytesIO()
    torch.save({"format": 99}, buffer)
    (tmp_path / key).write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(tmp_path, key)
    with pytest.raises(CheckpointError, match="not a checkpoint key"):
        load_checkpoint(tmp_path, "checkpoints/../../etc/passwd")


def test_a_failed_write_leaves_nothing_under_the_name(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").write_text("a file where the directory should be")
    with pytest.raises(CheckpointError, match="could not write"):
        save_checkpoint(tmp_path, checkpoint_key("caco", 1), {"step": 1})


def test_a_write_that_fails_midway_names_its_cause_and_leaves_no_file(tmp_path: Path) -> None:
    # A real failing write: the process may not write files beyond 64 KiB (RLIMIT_FSIZE), so
    # the checkpoint's write fails with EFBIG halfway, as on a disk that fills.
    script = f"""
import resource, signal, torch
from pathlib import Path
from revisit.learner.checkpoint import CheckpointError, checkpoint_key, save_checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
try:
    payload = {{"w": torch.ones(1 << 16)}}
    save_checkpoint(Path({str(tmp_path)!r}), checkpoint_key("caco", 1), payload)
except CheckpointError as exc:
    print(exc)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.startswith("could not write checkpoint checkpoints/caco/step-0000000001.pt:")
    assert "File too large" in done.stdout, done.stdout
    assert list((tmp_path / "checkpoints" / "caco").iterdir()) == []


def test_the_hash_is_that_of_the_file_written(tmp_path: Path) -> None:
    key = checkpoint_key("caco", 5)
    sha, size = save_checkpoint(tmp_path, key, {"w": torch.randn(300, 300), "step": 5})
    assert sha == sha256_file(tmp_path / key) and size == (tmp_path / key).stat().st_size


def test_prune_keeps_the_named_and_removes_orphans_and_temporaries(tmp_path: Path) -> None:
    keys = [checkpoint_key("caco", s) for s in (1, 2, 3)]
    for key in keys:
        save_checkpoint(tmp_path, key, {"step": 0})
    tmp = tmp_path / "checkpoints" / "caco" / ".step-0000000004.pt.123.456.tmp"
    tmp.write_bytes(b"half")
    removed = prune_checkpoints(tmp_path, keep=keys[1:])
    assert sorted(removed) == sorted([keys[0], tmp.relative_to(tmp_path).as_posix()])
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "caco").iterdir()) == [
        "step-0000000002.pt",
        "step-0000000003.pt",
    ]
    assert prune_checkpoints(tmp_path / "elsewhere", keep=[]) == []
