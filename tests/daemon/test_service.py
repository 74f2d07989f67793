"""``revisit run`` end to end: ingest, learn, export, health, SIGTERM, a restart that resumes."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import psycopg
import pytest

from revisit.db.embedded import EmbeddedPostgres
from tests.daemon.conftest import REVISIT, Daemon, data_dir


def _query(env: dict[str, str], sql: str) -> list[tuple[Any, ...]]:
    # As one more user of the cluster: it starts if the service is not running.
    with EmbeddedPostgres(data_dir(env)) as cluster, psycopg.connect(cluster.conninfo()) as conn:
        return conn.execute(sql).fetchall()


def _scalar(env: dict[str, str], sql: str) -> Any:
    return _query(env, sql)[0][0]


def _metric(text: str, name: str) -> float:
    """The sum of a metric's samples in a Prometheus text page."""
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
        and (line[len(name)] in " {")
    ]  # fmt: skip
    assert values, f"{name} not in /metrics"
    return sum(values)


def _at(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(record["time"]).timestamp()


def _service_did_everything(env: dict[str, str], *, min_step: int) -> bool:
    rows = _query(
        env,
        "SELECT (SELECT count(*) FROM scene),"
        " (SELECT coalesce(max(step), 0) FROM model_version),"
        " (SELECT count(*) FROM change_estimate),"
        " (SELECT count(*) FROM artifact WHERE kind = 'onnx'),"
        " (SELECT count(*) FROM artifact WHERE kind = 'changemap-geojson')",
    )
    scenes, step, estimates, onnx, maps = rows[0]
    return scenes > 0 and step >= min_step and estimates > 0 and onnx > 0 and maps > 0


def _check_published_model_runs(data: Path) -> None:
    latest = json.loads((data / "exports" / "onnx" / "latest.json").read_text())
    session = ort.InferenceSession(
        str(data / "exports" / "onnx" / latest["files"]["embedding"]),
        providers=["CPUExecutionProvider"],
    )
    meta = session.get_modelmeta().custom_metadata_map
    x = np.random.default_rng(0).uniform(0, 0.3, (2, 12, 64, 64)).astype(np.float32)
    (embedding,) = session.run(None, {meta["input_name"]: x})
    assert embedding.shape == (2, 128)
    assert np.allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-4)


def run_and_restart(env: dict[str, str], daemons: list[Daemon], *, min_step: int) -> None:
    """Run the service until it has done everything once, SIGTERM it, restart it, check."""
    first = Daemon(env)
    daemons.append(first)
    first.wait_for_message("revisit is running", timeout=120)  # database up and migrated
    first.wait_for(
        "ingest, learning, estimates, an ONNX model and a change map",
        lambda: _service_did_everything(env, min_step=min_step),
        timeout=240,
    )

    # Health and metrics, over real HTTP.
    assert first.get("/healthz") == (200, "ok\n")
    status, body = first.get("/readyz")
    ready = json.loads(body)
    assert status == 200, body
    assert ready["role"] == "leader" and ready["checks"]["database"] == "ok"
    _, metrics = first.get("/metrics")
    assert _metric(metrics, "revisit_leader") == 1
    assert _metric(metrics, "revisit_scenes_ingested_total") > 0
    assert _metric(metrics, "revisit_chips_ingested_total") > 0
    assert _metric(metrics, "revisit_learner_steps_total") >= 5
    assert _metric(metrics, "revisit_job_runs_total") > 0
    assert "revisit_job_duration_seconds_bucket" in metrics
    assert "revisit_last_export_timestamp_seconds" in metrics

    # SIGTERM: the chunk ends, the learner checkpoints, the database closes, exit 0.
    seconds = first.stop(signal.SIGTERM)
    assert first.proc.returncode == 0, first.log_text()[-4000:]
    messages = first.messages()
    assert "stopped cleanly" in messages
    assert not EmbeddedPostgres(data_dir(env)).is_running()  # it was the cluster's last user
    print(f"SIGTERM to exit: {seconds:.1f} s")
    # The learning chunk in progress ended within 10 s of the signal.
    records = first.records()
    signalled = next(_at(r) for r in records if r["message"] == "received SIGTERM; shutting down")
    chunks = [_at(r) for r in records if r["message"].startswith("job learn ")]
    assert chunks and max(chunks) - signalled < 10
    assert any(r["message"].startswith("jobs stopped and learner checkpointed") for r in records)
    failed = [r for r in first.records() if r.get("outcome") == "failed"]
    assert failed == [], failed
    # Learning chunks follow each other; none is ever refused as a second instance.
    assert not [m for m in messages if '"learn' in m and "running instances" in m]
    # One line per job run, carrying the job's id; the lines its code logs carry it too.
    runs = [r for r in first.records() if str(r.get("message", "")).startswith("job ")]
    assert runs and all("job" in r for r in runs)
    assert any(r.get("job") == "ingest:simulated" and "scene" in r for r in first.records())

    # What it left: a change map on disk, a model that loads in onnxruntime, job records.
    data = data_dir(env)
    maps = list((data / "exports" / "changemaps" / "demo").glob("demo-*.geojson"))
    assert maps and json.loads(maps[0].read_text())["type"] == "FeatureCollection"
    _check_published_model_runs(data)
    last_step = _scalar(env, "SELECT max(step) FROM model_version")
    jobs = dict(_query(env, "SELECT job_id, last_outcome FROM job_run"))
    assert jobs["ingest:simulated"] == "ok" and jobs["learn"] == "ok"
    assert jobs["export:changemap:demo"] == "ok"
    ids = {row[0] for row in _query(env, "SELECT id FROM scheduler_job")}
    assert ids == set(jobs)

    # A restart resumes from the checkpoint's step and stops itself at --until-step.
    second = Daemon(env, "--until-step", str(last_step + 3))
    daemons.append(second)
    second.wait(timeout=240)
    assert second.proc.returncode == 0, second.log_text()[-4000:]
    resumed = [m for m in second.messages() if m.startswith("learner resumes")]
    assert resumed and re.search(rf"at step {last_step}\b", resumed[0]), resumed
    assert f"the learner reached step {last_step + 3} (--until-step)" in second.messages()
    assert _scalar(env, "SELECT max(step) FROM model_version") == last_step + 3
    # The jobs were replaced, not added again.
    assert _scalar(env, "SELECT count(*) FROM scheduler_job") == len(ids)
    assert "(head)" in second.stdout  # the status printed at start

    # `revisit status`, from another process: the jobs, the learner's step, the exports.
    status = subprocess.run(
        [*REVISIT, "status"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert status.returncode == 0, status.stderr
    out = status.stdout
    assert "not running" in out
    assert f"learner step  {last_step + 3} (last checkpoint, caco)" in out
    assert re.search(r"onnx\s.*exports/onnx/step\d{10}-mv\d{8}-caco\.embedding\.onnx", out)
    assert re.search(r"changemap-geojson \(demo\)\s.*exports/changemaps/demo/demo-", out)
    for job_id in ids:
        assert re.search(rf"^ {re.escape(job_id)}\s", out, re.MULTILINE), job_id
    assert re.search(r"^ learn\s+│ \S+ \S+ │ ok ", out, re.MULTILINE), out


def test_run_ingests_learns_exports_stops_on_sigterm_and_resumes(
    daemon_env: dict[str, str], daemons: list[Daemon]
) -> None:
    # Chunks 3 s apart: learning goes on while the ONNX export runs, on half a core, not on
    # the whole core the export child needs (the export is most of this test's time).
    env = {**daemon_env, "REVISIT_DAEMON__LEARN_EVERY_S": "3"}
    run_and_restart(env, daemons, min_step=10)


@pytest.mark.slow
def test_a_longer_run_refits_republishes_and_keeps_its_retention(
    daemon_env: dict[str, str], daemons: list[Daemon]
) -> None:
    env = {
        **daemon_env,
        "REVISIT_SIMULATED__START": "2024-06-01",
        "REVISIT_DAEMON__BOOTSTRAP_BBOX": "[2.30, 48.80, 2.40, 48.86]",
        "REVISIT_DAEMON__INGEST_MAX_SCENES": "40",
        "REVISIT_DAEMON__INGEST_EVERY_S": "5",
        "REVISIT_DAEMON__REFIT_EVERY_S": "5",
        "REVISIT_DAEMON__KEEP_CHANGEMAPS": "2",
        "REVISIT_DAEMON__HOUSEKEEPING_EVERY_S": "20",
        "REVISIT_DAEMON__CHANGEMAP_FORMATS": '["geojson", "cog", "png"]',
    }
    run_and_restart(env, daemons, min_step=40)
    jobs = dict(_query(env, "SELECT job_id, runs FROM job_run"))
    assert jobs["refit"] > 1 and jobs["housekeeping"] >= 1
    assert _scalar(env, "SELECT count(DISTINCT metadata->>'version') FROM artifact"
                        " WHERE kind = 'onnx'") >= 2  # fmt: skip
    kept = list((data_dir(env) / "exports" / "changemaps" / "demo").glob("demo-*.geojson"))
    assert len(kept) <= 2
    assert _scalar(env, "SELECT count(*) FROM scene") > 80  # ingest went on in runs of 40
