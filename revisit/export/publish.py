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
from revisit.export import graphs
from revisit.export.finish import (
    INPUT_LAYOUT,
    INPUT_NAME,
    Output,
    compare_outputs,
    finish_model,
    run_model,
)
from revisit.fsutil import fsync_dir, sha256_file, write_bytes_atomic
from revisit.ingest.chips import ChipStore
from revisit.memory import trim_heap
from revisit.types import CANONICAL_BANDS, DN_SCALE

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

    from revisit.export.onnx import DenseModel, EmbeddingModel, FeatureModel
    from revisit.learner.heads import ContrastiveModel

# PyTorch (the modules, the checkpoint, the exporter) is imported by the functions that
# need it: the export child that publishes a prepared export imports this module without it.

__all__ = [
    "EXPORT_DIR",
    "MANIFEST",
    "OUTPUTS",
    "PreparedExport",
    "PreparedModel",
    "PublishedModel",
    "export_dir",
    "load_model",
    "outputs_of",
    "prepare_export",
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


@dataclass(frozen=True)
class PreparedModel:
    """One model of a version, made ready by :func:`prepare_export` for a process without PyTorch.

    Attributes:
        output: ``features``, ``embedding`` or ``dense``.
        graph_key: The key of its graph in the graph cache (:func:`.graphs.graph_key`).
        output_names: The graph's outputs.
        metadata: The metadata properties the model carries.
        doc_string: Its documentation string.
        weights: An ``.npz`` of the module's state dict (the graph's initializers).
        expected: An ``.npz`` of PyTorch's outputs on the parity chips (``arr_0``, ...).
    """

    output: Output
    graph_key: str
    output_names: tuple[str, ...]
    metadata: dict[str, str]
    doc_string: str
    weights: Path
    expected: Path


@dataclass(frozen=True)
class PreparedExport:
    """What :func:`prepare_export` made of one model version: all an export needs of PyTorch.

    Attributes:
        model_version_id: The ``model_version`` row.
        name: Its version name.
        directory: Where its files lie; the caller removes it when done.
        chips: An ``.npy`` of the parity chips (uint16 digital numbers).
        created_at: When it was exported (ISO 8601, UTC).
        models: One per output, in export order.
    """

    model_version_id: int
    name: str
    directory: Path
    chips: Path
    created_at: str
    models: tuple[PreparedModel, ...]


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
    from revisit.learner import checkpoint as ckpt
    from revisit.learner.heads import upgrade_model_state

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
    from revisit.learner.heads import ContrastiveModel

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
    prepared: PreparedExport | None = None,
) -> PublishedModel:
    """Export, check and publish the newest model version as ONNX.

    With ``prepared`` (from :func:`prepare_export`, for the version being
    published) the models are made from the graph cache and the prepared
    weights, and checked against the prepared outputs, without PyTorch; should
    a cached graph no longer fit, or ``prepared`` be of another version, the
    export falls back to PyTorch.

    Args:
        engine: The database.
        settings: The configuration (``data_dir``, ``export``).
        store: The chip store the parity chips are read from;
            ``<data_dir>/chips`` by default.
        model_version_id: Publish this model version instead of the newest.
        lock_timeout_s: How long to wait for another publisher to finish.
        prepared: The version's prepared export, or None to export with PyTorch.

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
        stale = [row.id for row in rows if row.metadata.get("version") == name]
        if published is None and prepared is not None:
            if prepared.model_version_id == version_row.id:
                published = _publish_prepared(
                    engine=engine,
                    settings=settings,
                    version_row=version_row,
                    prepared=prepared,
                    stale=stale,
                )
            else:
                logger.info(
                    "the prepared export is of model version %d, not %d: exporting with PyTorch",
                    prepared.model_version_id,
                    version_row.id,
                )
        if published is None:
            published = _export_and_publish(
                engine=engine,
                settings=settings,
                store=store,
                version_row=version_row,
                name=name,
                stale=stale,
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


def _wrappers(settings: Settings) -> list[Callable[[ContrastiveModel], Any]]:
    """The module of each output, in export order (each holds a copy of an encoder)."""
    from revisit.export.onnx import DenseModel, EmbeddingModel, FeatureModel

    wrappers: list[Callable[[ContrastiveModel], FeatureModel | EmbeddingModel | DenseModel]] = [
        functools.partial(FeatureModel, pooling=settings.export.features_pooling),
        EmbeddingModel,
    ]
    if settings.export.dense_model:
        wrappers.append(DenseModel)
    return wrappers


def _metadata(
    module: FeatureModel | EmbeddingModel | DenseModel,
    *,
    settings: Settings,
    version_row: learning.ModelVersionRow,
    name: str,
    patch_size: int,
    created_at: datetime,
) -> dict[str, str]:
    from revisit.export.onnx import model_metadata

    return model_metadata(
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


def _new_staging(directory: Path) -> Path:
    staging = directory / f"{_STAGING_PREFIX}{os.getpid()}-{time.monotonic_ns()}"
    staging.mkdir()
    return staging


def _stage_hash(staging: Path, filename: str) -> str:
    """Hash a staged model and write its ``.sha256`` file beside it."""
    sha256 = sha256_file(staging / filename)
    write_bytes_atomic(staging / f"{filename}.sha256", f"{sha256}  {filename}\n".encode())
    return sha256


def _export_and_publish(
    *,
    engine: Engine,
    settings: Settings,
    store: ChipStore,
    version_row: learning.ModelVersionRow,
    name: str,
    stale: list[int],
) -> PublishedModel:
    from revisit.export.onnx import export_model, parity_check

    started = time.perf_counter()
    directory = export_dir(settings.data_dir)
    model = load_model(settings.data_dir, version_row)
    chips = _parity_chips(engine, store, settings.export.parity_chips)
    trim_heap()  # the checkpoint just read: its pages go back before the exporter's come
    patch_size = int(chips.shape[-1])
    created_at = datetime.now(UTC)
    staging = _new_staging(directory)
    try:
        files: dict[str, str] = {}
        sha256s: dict[str, str] = {}
        diffs: dict[str, float] = {}
        # Each wrapper holds a copy of an encoder: one at a time, each freed before the next.
        for wrapper in _wrappers(settings):
            module = wrapper(model)
            output = module.output
            filename = f"{name}.{output}.onnx"
            export_model(
                module,
                staging / filename,
                metadata=_metadata(
                    module,
                    settings=settings,
                    version_row=version_row,
                    name=name,
                    patch_size=patch_size,
                    created_at=created_at,
                ),
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
            sha256s[output] = _stage_hash(staging, filename)
            files[output] = filename
            del module
            trim_heap()
        _move_into_place(staging, directory, files)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _record(
        engine=engine,
        settings=settings,
        version_row=version_row,
        name=name,
        stale=stale,
        files=files,
        sha256s=sha256s,
        diffs=diffs,
        n_chips=int(chips.shape[0]),
        patch_size=patch_size,
        created_at=created_at,
        started=started,
    )


def prepare_export(
    *,
    engine: Engine,
    settings: Settings,
    root: Path,
    store: ChipStore | None = None,
    model_version_id: int | None = None,
) -> PreparedExport | None:
    """Do the part of an export that needs PyTorch, so that another process can finish it without.

    For each model of the version: its weights (an ``.npz`` of the module's state
    dict), its metadata, and PyTorch's outputs on the parity chips, written under
    a new directory in ``root``; :func:`publish_onnx` given the result makes the
    models from the graph cache, checks them against those outputs and
    publishes them, importing neither PyTorch nor the exporter. The service
    does this half in the daemon, which holds PyTorch for its learner anyway,
    and the rest in its export child (:mod:`revisit.export.child`).

    Nothing is prepared (None) when the graph cache is off or lacks a graph
    of this version's models (the first export of an architecture traces, and
    needs PyTorch), or when the version has ``artifact`` rows for every model
    already (publishing it again is a check of its files, which needs nothing).

    Args:
        engine: The database.
        settings: The configuration.
        root: The directory the prepared directory goes in (made if missing).
        store: The chip store the parity chips are read from; ``<data_dir>/chips``
            by default.
        model_version_id: Prepare this model version instead of the newest.

    Returns:
        The prepared export (the caller removes its ``directory`` when done), or None.

    Raises:
        ExportError: As :func:`publish_onnx` for a missing model version, a bad
            checkpoint or a database with no chip; or the files could not be written.
    """
    from revisit.export.onnx import doc_string, output_names, reference_outputs

    cache = graph_cache_dir(settings)
    if cache is None:
        return None
    store = store or ChipStore(settings.data_dir / "chips")
    with engine.connect() as conn:
        version_row = _model_version(conn, model_version_id)
        rows = list_artifacts(conn, kind="onnx")
    name = version_name(
        method=version_row.method, step=version_row.step, model_version_id=version_row.id
    )
    published = {
        str(row.metadata.get("output")) for row in rows if row.metadata.get("version") == name
    }
    if set(outputs_of(settings)) <= published:
        return None
    model = load_model(settings.data_dir, version_row)
    chips = _parity_chips(engine, store, settings.export.parity_chips)
    reflectance = chips.astype(np.float32) * np.float32(DN_SCALE)
    patch_size = int(chips.shape[-1])
    created_at = datetime.now(UTC)
    try:
        root.mkdir(parents=True, exist_ok=True)
        directory = root / f"{os.getpid()}-{time.monotonic_ns()}"
        directory.mkdir()
    except OSError as exc:
        raise ExportError(f"cannot prepare the export in {root}: {exc}") from exc
    try:
        models: list[PreparedModel] = []
        for wrapper in _wrappers(settings):
            module = wrapper(model)
            names = output_names(module)
            key = graphs.graph_key(module, opset=settings.export.opset, output_names=names)
            if not graphs.graph_path(cache, key).is_file():
                logger.info(
                    "no cached graph of the %s model yet: the export traces it", module.output
                )
                shutil.rmtree(directory, ignore_errors=True)
                return None
            weights = directory / f"{module.output}.weights.npz"
            expected = directory / f"{module.output}.expected.npz"
            np.savez(
                weights, **{k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
            )
            np.savez(expected, *reference_outputs(module, reflectance))
            models.append(
                PreparedModel(
                    output=module.output,
                    graph_key=key,
                    output_names=tuple(names),
                    metadata=_metadata(
                        module,
                        settings=settings,
                        version_row=version_row,
                        name=name,
                        patch_size=patch_size,
                        created_at=created_at,
                    ),
                    doc_string=doc_string(module),
                    weights=weights,
                    expected=expected,
                )
            )
            del module
        np.save(directory / "chips.npy", chips)
    except OSError as exc:
        shutil.rmtree(directory, ignore_errors=True)
        raise ExportError(f"cannot prepare the export in {directory}: {exc}") from exc
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    finally:
        del model
        trim_heap()
    return PreparedExport(
        model_version_id=version_row.id,
        name=name,
        directory=directory,
        chips=directory / "chips.npy",
        created_at=created_at.isoformat(timespec="seconds").replace("+00:00", "Z"),
        models=tuple(models),
    )


def _publish_prepared(
    *,
    engine: Engine,
    settings: Settings,
    version_row: learning.ModelVersionRow,
    prepared: PreparedExport,
    stale: list[int],
) -> PublishedModel | None:
    """Publish a prepared export without PyTorch; None when a cached graph no longer fits."""
    started = time.perf_counter()
    directory = export_dir(settings.data_dir)
    cache = graph_cache_dir(settings)
    try:
        chips = np.load(prepared.chips)
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read the prepared parity chips {prepared.chips}: {exc}") from exc
    reflectance = chips.astype(np.float32) * np.float32(DN_SCALE)
    name = prepared.name
    staging = _new_staging(directory)
    try:
        files: dict[str, str] = {}
        sha256s: dict[str, str] = {}
        diffs: dict[str, float] = {}
        for item in prepared.models:
            filename = f"{name}.{item.output}.onnx"
            began = time.perf_counter()
            try:
                with np.load(item.weights) as state:
                    model = (
                        None
                        if cache is None
                        else graphs.fill_graph(
                            cache, item.graph_key, state, output_names=list(item.output_names)
                        )
                    )
                with np.load(item.expected) as saved:
                    expected = [saved[f"arr_{i}"] for i in range(len(saved.files))]
            except (OSError, ValueError, KeyError) as exc:
                raise ExportError(f"cannot read the prepared {item.output} model: {exc}") from exc
            if model is None:
                logger.info(
                    "the cached graph of the %s model no longer fits: exporting with PyTorch",
                    item.output,
                )
                return None
            finish_model(
                model, staging / filename, metadata=item.metadata, doc_string=item.doc_string
            )
            del model
            logger.info(
                "exported %s model %s (opset %d) in %.1f s, its graph from the cache,"
                " without PyTorch",
                item.output,
                filename,
                settings.export.opset,
                time.perf_counter() - began,
            )
            diffs[item.output] = compare_outputs(
                filename,
                run_model(staging / filename, reflectance),
                expected,
                n_chips=int(chips.shape[0]),
                tolerance=settings.export.parity_tolerance,
            )
            del expected
            sha256s[item.output] = _stage_hash(staging, filename)
            files[item.output] = filename
            trim_heap()
        _move_into_place(staging, directory, files)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _record(
        engine=engine,
        settings=settings,
        version_row=version_row,
        name=name,
        stale=stale,
        files=files,
        sha256s=sha256s,
        diffs=diffs,
        n_chips=int(chips.shape[0]),
        patch_size=int(chips.shape[-1]),
        created_at=datetime.fromisoformat(prepared.created_at.replace("Z", "+00:00")),
        started=started,
    )


def _record(
    *,
    engine: Engine,
    settings: Settings,
    version_row: learning.ModelVersionRow,
    name: str,
    stale: list[int],
    files: Mapping[str, str],
    sha256s: dict[str, str],
    diffs: dict[str, float],
    n_chips: int,
    patch_size: int,
    created_at: datetime,
    started: float,
) -> PublishedModel:
    """The ``artifact`` rows of models now in place, in one transaction; the published version."""
    directory = export_dir(settings.data_dir)
    stamp = created_at.isoformat(timespec="seconds").replace("+00:00", "Z")
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
                    "parity_chips": n_chips,
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
