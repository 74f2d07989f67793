"""Publishing the ONNX models: versioned files, their hashes, ``artifact`` rows, ``latest.json``.

:func:`publish_onnx` exports the newest ``model_version`` (DESIGN §5) as three
models (see :mod:`revisit.export.onnx`), checks each against PyTorch on real
chips from the database, and only then publishes them, in an order that a kill
at any moment cannot turn into a broken ``latest.json``:

1. the models are exported and parity-checked in a staging directory
   ``<data_dir>/exports/onnx/.staging-<pid>-<ns>/``, each with a ``.sha256``
   file (``sha256sum`` format);
2. the six files are renamed into ``<data_dir>/exports/onnx/`` and the
   directory is fsynced;
3. one transaction adds an ``artifact`` row per model (kind ``onnx``);
4. ``latest.json`` is written to a temporary name, fsynced and renamed over the
   old one.

Until step 4 the previous ``latest.json`` and the files it names stay as they
were. What a crash leaves behind (a staging directory, a temporary manifest,
files with no ``artifact`` row) the next publish removes; a version whose rows
committed but whose manifest was not written is picked up as it is.

Files, for version ``V = step<step:010d>-mv<model_version:08d>-<method>`` (the
name sorts by time: the learner's step never goes back, and model version ids
only grow)::

    <data_dir>/exports/onnx/V.features.onnx         query encoder, 1024-d (or 512-d)
    <data_dir>/exports/onnx/V.features.onnx.sha256
    <data_dir>/exports/onnx/V.embedding.onnx        key encoder + head 0, L2-normalised
    <data_dir>/exports/onnx/V.embedding.onnx.sha256
    <data_dir>/exports/onnx/V.dense.onnx            key encoder's feature maps (stem .. layer3)
    <data_dir>/exports/onnx/V.dense.onnx.sha256
    <data_dir>/exports/onnx/latest.json

``latest.json`` (file names relative to its directory)::

    {"format": 1, "version": V, "model_version_id": 7, "method": "caco",
     "step": 300, "created_at": "2024-05-01T12:00:00Z",
     "files": {"features": "V.features.onnx", "embedding": "V.embedding.onnx",
               "dense": "V.dense.onnx"},
     "sha256": {"features": "…", "embedding": "…", "dense": "…"},
     "parity_max_abs_diff": {"features": 1.2e-06, "embedding": 3.1e-07, "dense": 4e-07},
     "input": {"name": "reflectance", "layout": "NCHW", "dtype": "float32",
               "bands": ["B01", …, "B12"], "scale": 0.0001, "patch_size": 64}}

Publishing a model version that is already published is a no-op (it returns
the published one, and points ``latest.json`` at it if it pointed elsewhere).
The newest ``export.keep_versions`` versions are kept, and always the one
``latest.json`` names; older files and their ``artifact`` rows are removed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from revisit.config import LearnerSettings, Settings
from revisit.db import exports as export_db
from revisit.db import learning
from revisit.db.artifacts import ArtifactRow, delete_artifacts, insert_artifact, list_artifacts
from revisit.errors import ExportError, RevisitError
from revisit.export.onnx import (
    INPUT_LAYOUT,
    INPUT_NAME,
    DenseModel,
    EmbeddingModel,
    FeatureModel,
    Output,
    export_model,
    model_metadata,
    parity_check,
)
from revisit.fsutil import fsync_dir, sha256_file, write_bytes_atomic
from revisit.ingest.chips import ChipStore
from revisit.learner import checkpoint as ckpt
from revisit.learner.heads import ContrastiveModel, upgrade_model_state
from revisit.memory import trim_heap
from revisit.types import CANONICAL_BANDS, DN_SCALE

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

__all__ = [
    "EXPORT_DIR",
    "MANIFEST",
    "OUTPUTS",
    "PublishedModel",
    "export_dir",
    "load_model",
    "outputs_of",
    "publish_onnx",
    "read_manifest",
    "version_name",
]

logger = logging.getLogger(__name__)

#: Where published models lie, relative to the data directory.
EXPORT_DIR = "exports/onnx"
#: The manifest naming the current version.
MANIFEST = "latest.json"
MANIFEST_FORMAT = 1
#: The models of a version, in the order they are exported (``dense`` only with
#: ``export.dense_model``, the default).
OUTPUTS: tuple[Output, ...] = ("features", "embedding", "dense")


def outputs_of(settings: Settings) -> tuple[Output, ...]:
    """The models a version is published as under ``settings``."""
    return OUTPUTS if settings.export.dense_model else OUTPUTS[:2]


_STAGING_PREFIX = ".staging-"
_TMP_SUFFIX = ".tmp"
_FILE_RE = re.compile(
    r"^(?P<version>step\d{10}-mv\d{8,}-[a-z0-9-]+)\.(?P<output>features|embedding|dense)"
    r"\.onnx(?:\.sha256)?$"
)
_LOCK_POLL_S = 0.5


@dataclass(frozen=True)
class PublishedModel:
    """One published version: the ONNX models of one checkpoint.

    Attributes:
        version: The version name, e.g. ``step0000000300-mv00000007-caco``.
        model_version_id: The ``model_version`` row it was exported from.
        method: Its learning method.
        step: Its learner step.
        paths: The ``.onnx`` file of each output (``features``, ``embedding``, ``dense``).
        sha256s: Their hashes.
        max_abs_diff: The parity figure of each output (onnxruntime vs PyTorch).
        artifact_ids: The ``artifact`` row of each output.
        manifest: The ``latest.json`` that names this version.
        created_at: When the models were exported (ISO 8601, UTC).
        patch_size: The chip side of the parity chips (the chips the model was trained on).
        reused: True when the version had been published before and nothing was exported.
    """

    version: str
    model_version_id: int
    method: str
    step: int
    paths: dict[str, Path]
    sha256s: dict[str, str]
    max_abs_diff: dict[str, float]
    artifact_ids: dict[str, int]
    manifest: Path
    created_at: str
    patch_size: int
    reused: bool = False


def version_name(*, method: str, step: int, model_version_id: int) -> str:
    """The published name of a model version; sorts by time and is unique per row.

    Args:
        method: The learning method.
        step: The learner step of the checkpoint.
        model_version_id: Its ``model_version`` id.

    Returns:
        ``step<step:010d>-mv<id:08d>-<method>``.
    """
    return f"step{step:010d}-mv{model_version_id:08d}-{method}"


def export_dir(data_dir: Path) -> Path:
    """The directory of published ONNX models, ``<data_dir>/exports/onnx``."""
    return data_dir / EXPORT_DIR


def read_manifest(data_dir: Path) -> dict[str, Any] | None:
    """The current ``latest.json``, or None when nothing is published.

    Args:
        data_dir: The data directory.

    Returns:
        The manifest as a dict.

    Raises:
        ExportError: The manifest exists but is not a JSON object.
    """
    path = export_dir(data_dir) / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ExportError(f"{path} does not hold a JSON object")
    return manifest


def load_model(data_dir: Path, version: learning.ModelVersionRow) -> ContrastiveModel:
    """The contrastive model of a checkpoint, in eval mode on the CPU.

    Args:
        data_dir: The data directory holding ``checkpoints/``.
        version: The ``model_version`` row.

    Returns:
        The model with the checkpoint's weights.

    Raises:
        ExportError: The row has no checkpoint, or the file is missing, fails its
            hash, or holds another method, step or architecture.
    """
    if version.checkpoint_key is None:
        raise ExportError(
            f"model version {version.id} (step {version.step}) has no checkpoint file"
        )
    try:
        payload = ckpt.load_checkpoint(
            data_dir, version.checkpoint_key, sha256=version.metrics.get("sha256")
        )
    except ckpt.CheckpointError as exc:
        raise ExportError(f"cannot export model version {version.id}: {exc}") from exc
    if payload.get("method") != version.method or int(payload.get("step", -1)) != version.step:
        raise ExportError(
            f"checkpoint {version.checkpoint_key} holds method {payload.get('method')!r} step"
            f" {payload.get('step')}, but model version {version.id} says {version.method!r}"
            f" step {version.step}"
        )
    try:
        settings = LearnerSettings.model_validate(payload.get("settings") or {})
        # The model alone, on the CPU whatever device trained it: no optimiser, and none of
        # the trainer's imports (scikit-learn), in the export's memory.
        model = _contrastive_model(settings, method=version.method)
        model.load_state_dict(upgrade_model_state(payload["trainer"]["model"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ExportError(
            f"checkpoint {version.checkpoint_key} of model version {version.id} does not"
            f" hold a model revisit can build: {exc}"
        ) from exc
    finally:
        del payload  # the whole checkpoint: the optimiser state as well as the model
    return model.eval()


def graph_cache_dir(settings: Settings) -> Path | None:
    """Where exported graphs are kept (``export.graph_cache_dir``), or None when they are not."""
    if not settings.export.graph_cache:
        return None
    return settings.export.graph_cache_dir or settings.data_dir / "cache" / "onnx-graphs"


def _contrastive_model(settings: LearnerSettings, *, method: str) -> ContrastiveModel:
    """The model :class:`~revisit.learner.trainer.Trainer` builds for ``method``, untrained."""
    return ContrastiveModel(
        n_heads=3 if method == "seco" else 1,
        queue_size=settings.queue_size,
        proj_dim=settings.proj_dim,
        momentum=settings.momentum,
        geo_classes=settings.geo_clusters if method == "geo-tp" else None,
    )


def publish_onnx(
    *,
    engine: Engine,
    settings: Settings,
    store: ChipStore | None = None,
    model_version_id: int | None = None,
    lock_timeout_s: float = 300.0,
) -> PublishedModel:
    """Export, check and publish the newest model version as ONNX.

    Args:
        engine: The database.
        settings: The configuration (``data_dir``, ``export``).
        store: The chip store the parity chips are read from;
            ``<data_dir>/chips`` by default.
        model_version_id: Publish this model version instead of the newest.
        lock_timeout_s: How long to wait for another publisher to finish.

    Returns:
        The published version (``reused`` when it had been published before).

    Raises:
        ExportError: There is no model version (train first), its checkpoint
            cannot be loaded, the database holds no chip to check parity on,
            another publisher held the lock too long, or a file could not be
            written.
        ParityError: An exported model differs from PyTorch by more than
            ``export.parity_tolerance``; nothing is published then.
    """
    directory = export_dir(settings.data_dir)
    store = store or ChipStore(settings.data_dir / "chips")
    with _publisher_lock(engine, timeout_s=lock_timeout_s):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ExportError(f"cannot create {directory}: {exc}") from exc
        removed = _remove_temporaries(directory)
        if removed:
            logger.info("removed %d leftover temporary files from %s", removed, directory)
        with engine.connect() as conn:
            version_row = _model_version(conn, model_version_id)
            rows = list_artifacts(conn, kind="onnx")
        name = version_name(
            method=version_row.method, step=version_row.step, model_version_id=version_row.id
        )
        published = _already_published(rows, name, directory, outputs_of(settings))
        if published is None:
            published = _export_and_publish(
                engine=engine,
                settings=settings,
                store=store,
                version_row=version_row,
                name=name,
                stale=[row.id for row in rows if row.metadata.get("version") == name],
            )
        else:
            logger.info("version %s is already published", name)
        try:
            manifest = read_manifest(settings.data_dir)
        except ExportError as exc:  # a damaged manifest is replaced, not a reason to stop
            logger.warning("%s; writing it again", exc)
            manifest = None
        if manifest is None or manifest.get("version") != name:
            _write_manifest(directory, published)
            logger.info("latest.json now names %s", name)
        _apply_retention(
            engine, directory, keep=settings.export.keep_versions, protect=published.version
        )
    return published


@contextlib.contextmanager
def _publisher_lock(engine: Engine, *, timeout_s: float) -> Iterator[None]:
    conn = engine.connect()
    try:
        deadline = time.monotonic() + timeout_s
        while not export_db.try_export_lock(conn):
            conn.commit()
            if time.monotonic() >= deadline:
                raise ExportError(
                    f"another process has been publishing ONNX models for over {timeout_s:g} s"
                    " (it holds the exporter's advisory lock); try again later"
                )
            time.sleep(_LOCK_POLL_S)
        conn.commit()
        try:
            yield
        finally:
            with contextlib.suppress(Exception):  # closing the connection frees it anyway
                export_db.release_export_lock(conn)
                conn.commit()
    finally:
        conn.close()


def _model_version(conn: Connection, model_version_id: int | None) -> learning.ModelVersionRow:
    if model_version_id is None:
        latest = learning.latest_model_version(conn)
        if latest is None:
            raise ExportError(
                "no model to export: the database holds no model version;"
                " train first: revisit learn"
            )
        return latest
    for row in learning.model_versions(conn):
        if row.id == model_version_id:
            return row
    raise ExportError(f"no model version {model_version_id} in the database")


def _remove_temporaries(directory: Path) -> int:
    """Remove staging directories and temporary files a crashed publisher left.

    Only called while holding the publisher lock, so nobody else is writing them.
    """
    removed = 0
    for path in directory.iterdir():
        if path.name.startswith(_STAGING_PREFIX) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith(".") and path.name.endswith(_TMP_SUFFIX) and path.is_file():
            path.unlink(missing_ok=True)
        else:
            continue
        removed += 1
    return removed


def _already_published(
    rows: list[ArtifactRow], name: str, directory: Path, outputs: tuple[Output, ...]
) -> PublishedModel | None:
    """The published version ``name`` when its rows and intact files are all there."""
    mine = {
        str(row.metadata.get("output")): row for row in rows if row.metadata.get("version") == name
    }
    if not set(outputs) <= set(mine):
        return None
    paths: dict[str, Path] = {}
    for output, row in mine.items():
        path = directory / Path(row.path).name
        if not path.is_file() or sha256_file(path) != row.sha256:
            logger.warning(
                "published file %s is missing or damaged; exporting %s again", path, name
            )
            return None
        paths[output] = path
    first = mine[OUTPUTS[0]]
    return PublishedModel(
        version=name,
        model_version_id=int(first.model_version_id or first.metadata["model_version_id"]),
        method=str(first.metadata["method"]),
        step=int(first.metadata["step"]),
        paths=paths,
        sha256s={output: row.sha256 for output, row in mine.items()},
        max_abs_diff={
            output: float(row.metadata["parity_max_abs_diff"]) for output, row in mine.items()
        },
        artifact_ids={output: row.id for output, row in mine.items()},
        manifest=directory / MANIFEST,
        created_at=str(first.metadata["created_at"]),
        patch_size=int(first.metadata["patch_size"]),
        reused=True,
    )


def _parity_chips(engine: Engine, store: ChipStore, n: int) -> npt.NDArray[np.uint16]:
    """Up to ``n`` real chips of one shape, the lowest observation ids, clouds and gaps included."""
    with engine.connect() as conn:
        table = learning.usable_observations(
            conn, min_valid_fraction=0.0, max_cloud_fraction=1.0, limit=n
        )
    if len(table) == 0:
        raise ExportError(
            "the database holds no observation to check the exported models on; ingest first"
        )
    chips: list[npt.NDArray[np.uint16]] = []
    try:
        for key, sha256 in zip(table.chip_key, table.chip_sha256, strict=True):
            chip = store.get(key, sha256)
            if not chips or chip.shape == chips[0].shape:
                chips.append(chip)
    except RevisitError as exc:
        raise ExportError(f"cannot read the parity chips: {exc}") from exc
    return np.stack(chips)


def _export_and_publish(
    *,
    engine: Engine,
    settings: Settings,
    store: ChipStore,
    version_row: learning.ModelVersionRow,
    name: str,
    stale: list[int],
) -> PublishedModel:
    started = time.perf_counter()
    directory = export_dir(settings.data_dir)
    model = load_model(settings.data_dir, version_row)
    chips = _parity_chips(engine, store, settings.export.parity_chips)
    trim_heap()  # the checkpoint just read: its pages go back before the exporter's come
    patch_size = int(chips.shape[-1])
    created_at = datetime.now(UTC)
    stamp = created_at.isoformat(timespec="seconds").replace("+00:00", "Z")
    staging = directory / f"{_STAGING_PREFIX}{os.getpid()}-{time.monotonic_ns()}"
    staging.mkdir()
    try:
        files: dict[str, str] = {}
        sha256s: dict[str, str] = {}
        diffs: dict[str, float] = {}
        # Each wrapper holds a copy of an encoder: one at a time, each freed before the next.
        wrappers: list[Callable[[ContrastiveModel], FeatureModel | EmbeddingModel | DenseModel]] = [
            functools.partial(FeatureModel, pooling=settings.export.features_pooling),
            EmbeddingModel,
        ]
        if settings.export.dense_model:
            wrappers.append(DenseModel)
        for wrapper in wrappers:
            module = wrapper(model)
            output = module.output
            filename = f"{name}.{output}.onnx"
            metadata = model_metadata(
                module,
                method=version_row.method,
                step=version_row.step,
                model_version=version_row.id,
                patch_size=patch_size,
                opset=settings.export.opset,
                version=name,
                checkpoint_sha256=str(version_row.metrics.get("sha256", "")),
                created_at=created_at,
            )
            export_model(
                module,
                staging / filename,
                metadata=metadata,
                opset=settings.export.opset,
                patch_size=patch_size,
                graph_cache=graph_cache_dir(settings),
            )
            diffs[output] = parity_check(
                staging / filename,
                module,
                chips,
                tolerance=settings.export.parity_tolerance,
            )
            sha256s[output] = sha256_file(staging / filename)
            write_bytes_atomic(
                staging / f"{filename}.sha256", f"{sha256s[output]}  {filename}\n".encode()
            )
            files[output] = filename
            del module
            trim_heap()
        _move_into_place(staging, directory, files)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    artifact_ids: dict[str, int] = {}
    with engine.begin() as conn:
        # Rows of an earlier, incomplete publish of this version (their files were just replaced).
        delete_artifacts(conn, stale)
        for out, filename in files.items():
            artifact_ids[out] = insert_artifact(
                conn,
                kind="onnx",
                path=f"{EXPORT_DIR}/{filename}",
                sha256=sha256s[out],
                size_bytes=(directory / filename).stat().st_size,
                model_version_id=version_row.id,
                metadata={
                    "version": name,
                    "output": out,
                    "encoder": "query" if out == "features" else "key",
                    "method": version_row.method,
                    "step": version_row.step,
                    "model_version_id": version_row.id,
                    "parity_max_abs_diff": diffs[out],
                    "parity_chips": int(chips.shape[0]),
                    "parity_tolerance": settings.export.parity_tolerance,
                    "opset": settings.export.opset,
                    "patch_size": patch_size,
                    "created_at": stamp,
                },
            )
    logger.info(
        "published %s (model version %d, step %d) in %.1f s; parity %s",
        name,
        version_row.id,
        version_row.step,
        time.perf_counter() - started,
        ", ".join(f"{k} {v:.2g}" for k, v in diffs.items()),
    )
    return PublishedModel(
        version=name,
        model_version_id=version_row.id,
        method=version_row.method,
        step=version_row.step,
        paths={output: directory / filename for output, filename in files.items()},
        sha256s=sha256s,
        max_abs_diff=diffs,
        artifact_ids=artifact_ids,
        manifest=directory / MANIFEST,
        created_at=stamp,
        patch_size=patch_size,
    )


def _move_into_place(staging: Path, directory: Path, files: Mapping[str, str]) -> None:
    try:
        for filename in files.values():
            os.replace(staging / filename, directory / filename)
            os.replace(staging / f"{filename}.sha256", directory / f"{filename}.sha256")
        fsync_dir(directory)
    except OSError as exc:
        raise ExportError(f"could not move the exported models into {directory}: {exc}") from exc


def _write_manifest(directory: Path, published: PublishedModel) -> None:
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": published.version,
        "model_version_id": published.model_version_id,
        "method": published.method,
        "step": published.step,
        "created_at": published.created_at,
        "files": {output: path.name for output, path in published.paths.items()},
        "sha256": dict(published.sha256s),
        "parity_max_abs_diff": dict(published.max_abs_diff),
        "input": {
            "name": INPUT_NAME,
            "layout": INPUT_LAYOUT,
            "dtype": "float32",
            "bands": list(CANONICAL_BANDS),
            "scale": DN_SCALE,
            "patch_size": published.patch_size,
        },
    }
    target = directory / MANIFEST
    try:
        write_bytes_atomic(target, (json.dumps(manifest, indent=2) + "\n").encode())
    except OSError as exc:
        raise ExportError(f"could not write {target}: {exc}") from exc


def _apply_retention(engine: Engine, directory: Path, *, keep: int, protect: str) -> None:
    """Keep the newest ``keep`` versions and ``protect``; remove the rest, rows then files.

    Files no row names (a publish killed before its rows committed, or after the
    rows of an old version were removed) go too, unless ``latest.json`` names them.
    """
    with engine.begin() as conn:
        rows = [row for row in list_artifacts(conn, kind="onnx") if "version" in row.metadata]
        versions = sorted({str(row.metadata["version"]) for row in rows})
        kept = set(versions[-keep:]) | {protect}
        dropped = [row.id for row in rows if row.metadata["version"] not in kept]
        delete_artifacts(conn, dropped)
    removed = 0
    for path in directory.iterdir():
        match = _FILE_RE.match(path.name)
        if match is None or match["version"] in kept or not path.is_file():
            continue
        path.unlink(missing_ok=True)
        removed += 1
    if dropped or removed:
        logger.info(
            "retention: kept %d versions, removed %d artifact rows and %d files",
            len(kept),
            len(dropped),
            removed,
        )
