"""Publishing ONNX models: files, hashes, rows, latest.json, crashes, retention, refusals."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
import sqlalchemy as sa
import torch

from revisit.config import load_settings
from revisit.db import learning
from revisit.db.artifacts import ArtifactRow, insert_artifact, list_artifacts
from revisit.db.exports import release_export_lock, try_export_lock
from revisit.errors import ExportError, ParityError
from revisit.export import onnx as onnx_export
from revisit.export.onnx import EmbeddingModel, FeatureModel, read_metadata
from revisit.export.publish import (
    MANIFEST,
    export_dir,
    load_model,
    publish_onnx,
    read_manifest,
    version_name,
)
from revisit.ingest.chips import ChipStore
from revisit.learner.encoder import scale_dn
from revisit.types import CANONICAL_BANDS
from tests.conftest import GRAPH_CACHE
from tests.export.conftest import ExportWorld

REPO = Path(__file__).resolve().parents[2]
CONSUMER = Path(__file__).with_name("consumer.py")
TOLERANCE = 1e-4

# Publishes the newest model version, and SIGKILLs itself at the one rename that
# replaces latest.json: the new models are written and their rows committed.
KILL_AT_MANIFEST = """
import os, signal, sys
from pathlib import Path
import sqlalchemy as sa
from revisit.config import load_settings
from revisit.export.publish import publish_onnx

real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if Path(dst).name == "latest.json":
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace

settings = load_settings(
    database_url=sys.argv[1], data_dir=sys.argv[2], export={"dense_model": False}
)
engine = sa.create_engine(sys.argv[1], poolclass=sa.pool.NullPool)
publish_onnx(engine=engine, settings=settings)
print("published without being killed")
"""


def _artifacts(engine: sa.Engine) -> list[ArtifactRow]:
    with engine.connect() as conn:
        return list_artifacts(conn, kind="onnx")


def _listing(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def _chips(world: ExportWorld, n: int) -> npt.NDArray[np.uint16]:
    with world.engine.connect() as conn:
        table = learning.usable_observations(
            conn, min_valid_fraction=0.5, max_cloud_fraction=0.5, limit=n
        )
    return ChipStore(world.data_dir / "chips").get_many(table.chip_key, table.chip_sha256)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REVISIT_")}
    env["REVISIT_EXPORT__GRAPH_CACHE_DIR"] = str(GRAPH_CACHE)  # the session's, as cli_env's
    return env


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_publish_writes_versioned_files_their_hashes_rows_and_latest_json(
    export_world: ExportWorld,
) -> None:
    first = export_world.trained.versions[0]
    published = export_world.trained.published
    directory = export_dir(export_world.data_dir)
    name = version_name(method="caco", step=2, model_version_id=first.id)
    assert published.version == name and not published.reused
    assert (published.model_version_id, published.method, published.step) == (first.id, "caco", 2)
    files = {
        "features": f"{name}.features.onnx",
        "embedding": f"{name}.embedding.onnx",
        "dense": f"{name}.dense.onnx",  # export.dense_model, the default
    }
    assert _listing(directory) == {
        MANIFEST,
        *files.values(),
        *(f"{f}.sha256" for f in files.values()),
    }

    for output, filename in files.items():
        sha256 = _sha256(directory / filename)
        assert published.sha256s[output] == sha256
        assert (directory / f"{filename}.sha256").read_text() == f"{sha256}  {filename}\n"
        assert 0 <= published.max_abs_diff[output] <= TOLERANCE
        meta = read_metadata(directory / filename)
        assert (meta["output"], meta["version"], meta["method"]) == (output, name, "caco")
        assert (meta["step"], meta["model_version"], meta["patch_size"]) == (
            "2",
            str(first.id),
            "64",
        )
        assert meta["checkpoint_sha256"] == first.metrics["sha256"]
    if shutil.which("sha256sum"):
        check = subprocess.run(
            ["sha256sum", "-c", *(f"{f}.sha256" for f in files.values())],
            cwd=directory,
            capture_output=True,
            text=True,
        )
        assert check.returncode == 0, check.stderr

    rows = _artifacts(export_world.engine)
    assert sorted(r.id for r in rows) == sorted(published.artifact_ids.values())
    for row in rows:
        output = row.metadata["output"]
        assert row.path == f"exports/onnx/{files[output]}"
        assert row.sha256 == published.sha256s[output]
        assert row.size_bytes == (directory / files[output]).stat().st_size
        assert row.model_version_id == first.id
        assert row.metadata["encoder"] == {"features": "query"}.get(output, "key")
        assert row.metadata["parity_max_abs_diff"] == published.max_abs_diff[output]
        assert (row.metadata["method"], row.metadata["step"], row.metadata["version"]) == (
            "caco",
            2,
            name,
        )

    manifest = read_manifest(export_world.data_dir)
    assert manifest == {
        "format": 1,
        "version": name,
        "model_version_id": first.id,
        "method": "caco",
        "step": 2,
        "created_at": published.created_at,
        "files": files,
        "sha256": published.sha256s,
        "parity_max_abs_diff": published.max_abs_diff,
        "input": {
            "name": "reflectance",
            "layout": "NCHW",
            "dtype": "float32",
            "bands": list(CANONICAL_BANDS),
            "scale": 0.0001,
            "patch_size": 64,
        },
    }


def test_publishing_a_published_version_again_is_a_no_op(export_world: ExportWorld) -> None:
    before = export_world.trained.published
    directory = export_dir(export_world.data_dir)
    stats = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
    again = publish_onnx(
        engine=export_world.engine,
        settings=export_world.settings(),
        model_version_id=before.model_version_id,
    )
    assert again.reused
    assert (again.version, again.sha256s, again.artifact_ids) == (
        before.version,
        before.sha256s,
        before.artifact_ids,
    )
    assert again.max_abs_diff == before.max_abs_diff
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == stats
    assert len(_artifacts(export_world.engine)) == 3  # features, embedding, dense


def test_a_consumer_without_revisit_gets_what_pytorch_computes(
    export_world: ExportWorld, tmp_path: Path
) -> None:
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(ast.parse(CONSUMER.read_text()))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (
            node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")]
        )
    }
    assert imported <= {
        "__future__",
        "argparse",
        "hashlib",
        "json",
        "sys",
        "pathlib",
        "numpy",
    }.union({"onnxruntime", "onnx"})
    chips = _chips(export_world, 3)
    np.save(tmp_path / "chips.npy", chips)
    np.save(tmp_path / "reversed.npy", chips[:, ::-1])
    model = load_model(export_world.data_dir, export_world.trained.versions[0])
    x = scale_dn(torch.from_numpy(chips))
    with torch.no_grad():
        expected = {"embedding": EmbeddingModel(model)(x), "features": FeatureModel(model)(x)}
    manifest = export_dir(export_world.data_dir) / MANIFEST
    bands = ",".join(reversed(json.loads(manifest.read_text())["input"]["bands"]))
    runs = [
        ("embedding", "chips.npy", []),
        ("features", "chips.npy", []),
        ("embedding", "reversed.npy", ["--chip-bands", bands]),
    ]
    for output, chip, extra in runs:
        command = [sys.executable, str(CONSUMER), str(manifest), str(tmp_path / chip)]
        result = subprocess.run(
            [*command, "--output", output, *extra],
            capture_output=True,
            text=True,
            env=_clean_env(),
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        printed = json.loads(result.stdout)
        assert printed["version"] == export_world.trained.published.version
        assert printed["output"] == output
        assert printed["shape"] == list(expected[output].shape)
        np.testing.assert_allclose(
            np.asarray(printed["values"]), expected[output].numpy(), rtol=0, atol=TOLERANCE
        )


def test_a_kill_before_latest_json_is_replaced_keeps_the_previous_model(
    export_world: ExportWorld,
) -> None:
    directory = export_dir(export_world.data_dir)
    old = export_world.trained.published
    new_row = export_world.trained.versions[1]
    manifest_before = (directory / MANIFEST).read_bytes()

    killed = subprocess.run(
        [sys.executable, "-c", KILL_AT_MANIFEST, export_world.url, str(export_world.data_dir)],
        capture_output=True,
        text=True,
        env=_clean_env(),
        cwd=REPO,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]

    # latest.json is untouched and its model still loads and computes what it did.
    assert (directory / MANIFEST).read_bytes() == manifest_before
    manifest = json.loads(manifest_before)
    embedding_file = directory / manifest["files"]["embedding"]
    assert _sha256(embedding_file) == manifest["sha256"]["embedding"]
    chips = _chips(export_world, 2)
    session = ort.InferenceSession(str(embedding_file), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"reflectance": chips.astype(np.float32) * np.float32(1e-4)})
    with torch.no_grad():
        expected = EmbeddingModel(
            load_model(export_world.data_dir, export_world.trained.versions[0])
        )(scale_dn(torch.from_numpy(chips)))
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=TOLERANCE)
    # The kill left the new models in place, their rows committed, and a temporary manifest.
    new_name = version_name(method="caco", step=3, model_version_id=new_row.id)
    assert {f"{new_name}.features.onnx", f"{new_name}.embedding.onnx"} <= _listing(directory)
    assert {r.metadata["version"] for r in _artifacts(export_world.engine)} == {
        old.version,
        new_name,
    }
    leftovers = {n for n in _listing(directory) if n.startswith(".")}
    assert leftovers and all(n.startswith(".latest.json.") for n in leftovers)
    staging = directory / ".staging-1-1"  # as a publisher killed while exporting leaves it
    staging.mkdir()
    (staging / "x.onnx").write_bytes(b"half")

    again = publish_onnx(
        engine=export_world.engine, settings=export_world.settings(keep_versions=1)
    )
    assert again.version == new_name and again.reused
    assert read_manifest(export_world.data_dir)["version"] == new_name  # type: ignore[index]
    assert not any(n.startswith(".") for n in _listing(directory)), "leftovers stay"
    # keep_versions=1: the old version goes, files and rows.
    assert not any(n.startswith(old.version) for n in _listing(directory))
    assert {r.metadata["version"] for r in _artifacts(export_world.engine)} == {new_name}


def _fake_version(world: ExportWorld, name: str, *, step: int, rows: bool = True) -> None:
    """Files (and rows) of a version as an earlier publish would have left them."""
    directory = export_dir(world.data_dir)
    with world.engine.begin() as conn:
        for output in ("features", "embedding"):
            filename = f"{name}.{output}.onnx"
            (directory / filename).write_bytes(name.encode())
            sha256 = _sha256(directory / filename)
            (directory / f"{filename}.sha256").write_text(f"{sha256}  {filename}\n")
            if rows:
                insert_artifact(
                    conn,
                    kind="onnx",
                    path=f"exports/onnx/{filename}",
                    sha256=sha256,
                    size_bytes=len(name),
                    model_version_id=None,
                    metadata={"version": name, "output": output, "method": "caco", "step": step},
                )


def test_retention_keeps_the_newest_versions_and_the_one_latest_json_names(
    export_world: ExportWorld,
) -> None:
    directory = export_dir(export_world.data_dir)
    current = export_world.trained.published.version  # step 2: latest.json names it
    older = [version_name(method="caco", step=s, model_version_id=90 + s) for s in (0, 1)]
    newer = version_name(method="tp", step=9, model_version_id=99)
    orphan = version_name(method="caco", step=5, model_version_id=95)  # files without rows
    for name, step in ((older[0], 0), (older[1], 1), (newer, 9)):
        _fake_version(export_world, name, step=step)
    _fake_version(export_world, orphan, step=5, rows=False)
    (directory / "NOTES.txt").write_text("not revisit's")

    publish_onnx(
        engine=export_world.engine,
        settings=export_world.settings(keep_versions=1),
        model_version_id=export_world.trained.versions[0].id,
    )
    versions = {r.metadata["version"] for r in _artifacts(export_world.engine)}
    assert versions == {newer, current}
    names = _listing(directory)
    assert {n.split(".")[0] for n in names if n.endswith(".onnx")} == {newer, current}
    # The current version's three models (and hashes), the fake newer one's two.
    assert {MANIFEST, "NOTES.txt"} <= names and len(names) == 2 + 2 * 3 + 2 * 2
    assert read_manifest(export_world.data_dir)["version"] == current  # type: ignore[index]

    publish_onnx(
        engine=export_world.engine,
        settings=export_world.settings(keep_versions=3),
        model_version_id=export_world.trained.versions[0].id,
    )
    assert {r.metadata["version"] for r in _artifacts(export_world.engine)} == {newer, current}


def test_a_parity_failure_publishes_nothing(
    export_world: ExportWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = export_dir(export_world.data_dir)
    listing, rows = _listing(directory), _artifacts(export_world.engine)
    manifest = (directory / MANIFEST).read_bytes()
    real_export = onnx_export.export_model

    def export_then_drift(module: Any, path: Path, **kwargs: Any) -> None:
        real_export(module, path, **kwargs)
        with torch.no_grad():  # the PyTorch side no longer matches the file
            module.encoder.conv1.weight.mul_(1.1)

    # publish_onnx imports it when it exports (the module is imported without PyTorch).
    monkeypatch.setattr(onnx_export, "export_model", export_then_drift)
    with pytest.raises(ParityError, match=r"features\.onnx differs from PyTorch by \d") as info:
        publish_onnx(engine=export_world.engine, settings=export_world.settings())
    figure = float(str(info.value).split(" by ")[1].split()[0])
    assert figure > TOLERANCE
    assert _listing(directory) == listing
    assert _artifacts(export_world.engine) == rows
    assert (directory / MANIFEST).read_bytes() == manifest


def test_without_a_model_export_asks_to_train_first(
    database_url: str, engine: sa.Engine, tmp_path: Path
) -> None:
    settings = load_settings(database_url=database_url, data_dir=tmp_path / "var")
    with pytest.raises(ExportError, match="train first: revisit learn"):
        publish_onnx(engine=engine, settings=settings)
    with engine.begin() as conn:
        version = learning.insert_model_version(
            conn,
            step=7,
            method="caco",
            checkpoint_key="checkpoints/caco/step-0000000007.pt",
            metrics={"sha256": "0" * 64},
        )
    with pytest.raises(ExportError, match=f"model version {version}.*step-0000000007.pt.*missing"):
        publish_onnx(engine=engine, settings=settings)
    with pytest.raises(ExportError, match="no model version 12345"):
        publish_onnx(engine=engine, settings=settings, model_version_id=12345)
    assert not list((tmp_path / "var" / "exports" / "onnx").iterdir())


def test_a_second_publisher_waits_for_the_first(export_world: ExportWorld) -> None:
    with export_world.engine.connect() as holder:
        assert try_export_lock(holder)
        holder.commit()
        with pytest.raises(ExportError, match="another process has been publishing"):
            publish_onnx(
                engine=export_world.engine, settings=export_world.settings(), lock_timeout_s=0.2
            )
        assert release_export_lock(holder)


def test_the_dense_model_is_published_beside_the_others(export_world: ExportWorld) -> None:
    """The session's world was published with the default settings: three models."""
    published = export_world.trained.published
    assert set(published.paths) == {"features", "embedding", "dense"}
    manifest = read_manifest(export_world.data_dir)
    assert manifest is not None
    dense = export_dir(export_world.data_dir) / manifest["files"]["dense"]
    assert dense.name == f"{published.version}.dense.onnx"
    assert manifest["parity_max_abs_diff"]["dense"] <= 1e-4
    meta = read_metadata(dense)
    assert meta["output"] == "dense" and meta["encoder"] == "key"
    assert meta["dense_outputs"] == "stem:1:64,layer1:4:64,layer2:8:128,layer3:16:256"
    assert int(meta["dense_receptive_field"]) == 211
    session = ort.InferenceSession(str(dense), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["stem", "layer1", "layer2", "layer3"]
    x = np.random.default_rng(0).random((2, 12, 40, 33), dtype=np.float32) * 0.3
    shapes = [o.shape for o in session.run(None, {"reflectance": x})]
    assert shapes == [(2, 64, 40, 33), (2, 64, 10, 9), (2, 128, 5, 5), (2, 256, 3, 3)]
    rows = {r.metadata["output"]: r for r in _artifacts(export_world.engine)}
    assert rows["dense"].metadata["encoder"] == "key"
