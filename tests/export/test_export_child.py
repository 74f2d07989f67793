"""The daemon's ONNX export job runs the export in a child process: real processes, a real database.

The job publishes from a child (another pid, gone when the job returns) while
the learner's lock stays free; a child that fails gives a failed run with the
child's own message, and a child killed in the middle publishes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import onnx
import pytest

from revisit.daemon import jobs
from revisit.daemon.jobs import JobContext, JobResult, run_job
from revisit.daemon.metrics import Metrics
from revisit.db import daemon as daemon_db
from revisit.db.artifacts import list_artifacts
from revisit.export import graphs
from revisit.export.child import PREPARED_DIR, publish_in_child
from revisit.export.onnx import FeatureModel, export_model, model_metadata, read_metadata
from revisit.export.publish import (
    MANIFEST,
    export_dir,
    graph_cache_dir,
    load_model,
    prepare_export,
    publish_onnx,
    version_name,
)
from revisit.ingest.chips import ChipStore
from tests.export.conftest import ExportWorld

JOB_TIMEOUT_S = 240


def _context(world: ExportWorld) -> JobContext:
    settings = world.settings()
    return JobContext(
        settings=settings,
        engine=world.engine,
        store=ChipStore(settings.data_dir / "chips"),
        metrics=Metrics(),
        stop=threading.Event(),
        runner="test:1",
    )


def _run_export(ctx: JobContext, *, while_running: object = None) -> JobResult:
    """Run the export job on a thread of its own; ``while_running()`` is polled meanwhile."""
    results: list[JobResult] = []
    thread = threading.Thread(
        target=lambda: results.append(run_job(ctx, jobs.EXPORT_ONNX, jobs.export_onnx))
    )
    thread.start()
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while thread.is_alive() and time.monotonic() < deadline:
        if callable(while_running):
            while_running()
        thread.join(timeout=0.05)
    assert not thread.is_alive(), f"the export job did not end within {JOB_TIMEOUT_S} s"
    return results[0]


def _onnx_versions(world: ExportWorld) -> set[str]:
    with world.engine.connect() as conn:
        return {str(row.metadata["version"]) for row in list_artifacts(conn, kind="onnx")}


def _manifest_version(world: ExportWorld) -> str:
    return str(json.loads((export_dir(world.data_dir) / MANIFEST).read_text())["version"])


def _recorded(world: ExportWorld) -> daemon_db.JobRunRow:
    with world.engine.connect() as conn:
        runs = [r for r in daemon_db.job_runs(conn) if r.job_id == jobs.EXPORT_ONNX]
    assert runs, "the export run was not recorded"
    return runs[0]


def _newest_name(world: ExportWorld) -> str:
    newest = world.trained.versions[-1]
    return version_name(method=newest.method, step=newest.step, model_version_id=newest.id)


def test_the_export_job_publishes_from_a_child_process_while_learning_goes_on(
    export_world: ExportWorld,
) -> None:
    ctx = _context(export_world)
    before = _manifest_version(export_world)
    # The learner's lock is held all along, as by a learning chunk: the export does not wait.
    with ctx.learner.lock:
        result = _run_export(ctx)
    assert result.outcome == "ok", result.detail
    # The graph cache holds the graphs (the world's own publish put them there): the daemon
    # prepares, and the child publishes without importing PyTorch.
    match = re.search(r"in child process (\d+) without PyTorch$", result.detail)
    assert match, result.detail
    pid = int(match.group(1))
    assert pid != os.getpid()
    with pytest.raises(ProcessLookupError):  # it has ended, and was reaped
        os.kill(pid, 0)

    name = _newest_name(export_world)
    assert before != name and _manifest_version(export_world) == name
    assert name in _onnx_versions(export_world)
    directory = export_dir(export_world.data_dir)
    for output in ("features", "embedding"):
        assert (directory / f"{name}.{output}.onnx").is_file()
    assert not [p for p in directory.iterdir() if p.name.startswith(".")]  # no staging left
    run = _recorded(export_world)
    assert (run.last_outcome, run.last_detail) == ("ok", result.detail)


def test_a_failing_export_child_gives_a_failed_run_with_its_message(
    export_world: ExportWorld,
) -> None:
    newest = export_world.trained.versions[-1]
    assert newest.checkpoint_key is not None
    checkpoint = export_world.data_dir / newest.checkpoint_key
    # A new file under the name (the data directory's files are hard links to shared ones).
    checkpoint.unlink()
    checkpoint.write_bytes(b"not a checkpoint")
    before = (_manifest_version(export_world), _onnx_versions(export_world))

    result = _run_export(_context(export_world))

    assert result.outcome == "failed"
    assert f"checkpoint {newest.checkpoint_key} fails its hash" in result.detail
    assert re.search(r"\(export child, pid \d+\)$", result.detail), result.detail
    assert (_manifest_version(export_world), _onnx_versions(export_world)) == before
    run = _recorded(export_world)
    assert (run.last_outcome, run.last_detail) == ("failed", result.detail)


def test_a_killed_export_child_publishes_nothing(export_world: ExportWorld) -> None:
    directory = export_dir(export_world.data_dir)
    before = (_manifest_version(export_world), _onnx_versions(export_world))
    killed: list[int] = []

    def kill_once_it_stages() -> None:
        # The child exports into `.staging-<pid>-<ns>/`: kill it there, mid-export.
        if killed:
            return
        for path in directory.glob(".staging-*"):
            pid = int(path.name.split("-")[1])
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    result = _run_export(_context(export_world), while_running=kill_once_it_stages)

    assert killed, "the child never staged an export"
    assert result.outcome == "failed"
    assert result.detail == f"the export child (pid {killed[0]}) was killed by SIGKILL"
    assert (_manifest_version(export_world), _onnx_versions(export_world)) == before
    name = _newest_name(export_world)
    assert not list(directory.glob(f"{name}.*"))  # only the staging directory holds its files


@pytest.mark.slow
def test_after_a_killed_child_the_next_export_cleans_up_and_publishes(
    export_world: ExportWorld,
) -> None:
    directory = export_dir(export_world.data_dir)
    ctx = _context(export_world)
    killed: list[int] = []

    def kill_once_it_stages() -> None:
        if not killed:
            for path in directory.glob(".staging-*"):
                killed.append(int(path.name.split("-")[1]))
                os.kill(killed[-1], signal.SIGKILL)

    assert _run_export(ctx, while_running=kill_once_it_stages).outcome == "failed"
    assert list(directory.glob(".staging-*"))

    result = _run_export(ctx)

    assert result.outcome == "ok", result.detail
    assert _manifest_version(export_world) == _newest_name(export_world)
    assert not list(directory.glob(".staging-*"))


def test_the_export_child_refuses_a_bad_command_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "revisit.export.child"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "usage" in done.stderr


def _graph_of(path: os.PathLike[str] | str) -> tuple[list[tuple[str, str, tuple[str, ...]]], dict]:
    """A model's nodes and initializers, leaving its metadata and doc string out."""
    proto = onnx.load(str(path))
    nodes = [(n.op_type, n.domain, tuple(n.input)) for n in proto.graph.node]
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    return nodes, weights


def test_the_child_without_pytorch_writes_the_model_the_exporter_writes(
    export_world: ExportWorld,
) -> None:
    settings = export_world.settings()
    # What a killed daemon left (its process is gone) goes at the next export.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    abandoned = export_world.data_dir / PREPARED_DIR / f"{int(dead.stdout)}-1"
    abandoned.mkdir(parents=True)
    (abandoned / "features.weights.npz").write_bytes(b"left by a killed daemon")

    published = publish_in_child(engine=export_world.engine, settings=settings, prepare=True)

    assert not published.torch and not published.reused
    assert published.version == _newest_name(export_world)
    # The prepared files went with the export, and so did the abandoned ones.
    assert not list((export_world.data_dir / PREPARED_DIR).iterdir())
    # The same module exported in this process, with PyTorch, from the same graph cache.
    newest = export_world.trained.versions[-1]
    module = FeatureModel(load_model(export_world.data_dir, newest))
    path = export_world.data_dir / "reference.features.onnx"
    export_model(
        module,
        path,
        metadata=model_metadata(
            module,
            method=newest.method,
            step=newest.step,
            model_version=newest.id,
            patch_size=32,
            opset=18,
        ),
        graph_cache=graph_cache_dir(settings),
    )
    nodes, weights = _graph_of(path)
    got_nodes, got_weights = _graph_of(published.paths["features"])
    assert got_nodes == nodes
    assert got_weights.keys() == weights.keys()
    for name, value in weights.items():
        np.testing.assert_array_equal(got_weights[name], value, err_msg=name)
    metadata = read_metadata(published.paths["features"])
    assert metadata["version"] == published.version
    assert metadata["model_version"] == str(newest.id)


def test_nothing_is_prepared_without_cached_graphs_or_for_a_published_version(
    export_world: ExportWorld,
) -> None:
    root = export_world.data_dir / PREPARED_DIR
    empty = export_world.data_dir / "empty-graph-cache"
    cold = export_world.settings(graph_cache_dir=empty)
    assert prepare_export(engine=export_world.engine, settings=cold, root=root) is None
    assert not root.exists() or not list(root.iterdir())
    # The cold cache: the child traces with PyTorch, and fills the cache for next time.
    published = publish_in_child(engine=export_world.engine, settings=cold)
    assert published.torch and len(list(empty.glob("*.onnx"))) == 2
    # That version is published: nothing to prepare, and the child reuses it without PyTorch.
    assert prepare_export(engine=export_world.engine, settings=cold, root=root) is None
    again = publish_in_child(engine=export_world.engine, settings=cold)
    assert again.reused and not again.torch


def test_a_cached_graph_that_no_longer_fits_falls_back_to_pytorch(
    export_world: ExportWorld, caplog: pytest.LogCaptureFixture
) -> None:
    settings = export_world.settings()
    own = export_world.data_dir / "own-graph-cache"
    shutil.copytree(graph_cache_dir(settings), own)
    settings = export_world.settings(graph_cache_dir=own)
    prepared = prepare_export(
        engine=export_world.engine, settings=settings, root=export_world.data_dir / "prepared"
    )
    assert prepared is not None and [m.output for m in prepared.models] == [
        "features",
        "embedding",
    ]
    features, embedding = prepared.models
    # The features graph replaced by the embedding's: its outputs are not the features'.
    shutil.copyfile(
        graphs.graph_path(own, embedding.graph_key), graphs.graph_path(own, features.graph_key)
    )
    with caplog.at_level(logging.INFO, logger="revisit.export.publish"):
        published = publish_onnx(engine=export_world.engine, settings=settings, prepared=prepared)
    assert "no longer fits: exporting with PyTorch" in caplog.text
    assert published.version == prepared.name
    assert read_metadata(published.paths["features"])["output"] == "features"
