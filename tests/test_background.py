"""A run's artifacts are logged by a background thread while the next job of the sweep trains,
and MLflow itself starts there while the first job trains; what goes wrong there is reported,
and no run is left RUNNING. Real CLI on tiny data."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from helpers import cli_env, make_project, sqlite_uri, tiny_arrays

GRID = [0.001, 0.01, 0.1]

#: Runs the sweep with l2sweep.train's artifact logging and compiled loop, and the epochs'
#: begin (l2sweep.tracking.runs.training_under_way), wrapped: each call is written to $EVENTS as
#: [thread name, what, run name] (and with each fit, how many objects the collector has
#: frozen). The artifacts of $HOLD wait (up to 60 s) until the next lambda's training has
#: started, which only a background thread can see; those of $FAIL raise.
_DRIVER = """
import gc, json, os, sys, threading
import l2sweep.train as t

events, hold, fail = os.environ["EVENTS"], os.environ.get("HOLD"), os.environ.get("FAIL")
next_started = threading.Event()
log_run_artifacts, fit_compiled = t.log_run_artifacts, t._fit_compiled

def note(what, name):
    with open(events, "a") as f:
        f.write(json.dumps([threading.current_thread().name, what, name]) + "\\n")

def artifacts(run, model, history, *args, **kwargs):
    note("artifacts", history["run_name"])
    if history["run_name"] == fail:
        raise OSError("the artifact store is gone")
    if history["run_name"] == hold:
        note("saw the next job train" if next_started.wait(60) else "timed out", hold)
    return log_run_artifacts(run, model, history, *args, **kwargs)

def fit(cfg, *args, **kwargs):
    note("fit", cfg.run_name)
    note("frozen objects", gc.get_freeze_count())
    if hold and cfg.run_name != hold:
        next_started.set()
    return fit_compiled(cfg, *args, **kwargs)

import l2sweep.tracking.runs as tracking
start_parent = tracking.SweepCallback._start_parent

def parent(self, config, started):
    note("parent", "sweep")
    return start_parent(self, config, started)

under_way = tracking.training_under_way

def training():  # an epoch begins
    note("epoch", "")
    under_way()

t.log_run_artifacts, t._fit_compiled, tracking.SweepCallback._start_parent = artifacts, fit, parent
tracking.training_under_way = training
sys.argv[1:] = ["-m"]
t.main()
"""


def _sweep(root: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    events = root / "events.jsonl"
    proc = subprocess.run([sys.executable, "-c", _DRIVER], cwd=root, capture_output=True, text=True,
                          env=cli_env(EVENTS=str(events), **env), timeout=600)
    return proc, [json.loads(line) for line in events.read_text().splitlines()]


def _runs(root: Path) -> tuple[list, dict]:
    client = MlflowClient(sqlite_uri(root))
    runs = client.search_runs([client.get_experiment_by_name("l2-sweep").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parents, {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "p", tiny_arrays(), sweep={"strengths": GRID})


def test_artifacts_are_logged_while_the_next_lambda_trains(project):
    proc, events = _sweep(project, HOLD="l2-0.001")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # l2-0.001's artifacts were still being logged when l2-0.01 started training.
    assert ["l2sweep-tracking_0", "saw the next job train", "l2-0.001"] in events, events
    artifacts = [e for e in events if e[1] == "artifacts"]
    assert [name for _, _, name in artifacts] == [f"l2-{s}" for s in GRID]
    assert {thread for thread, _, _ in artifacts} == {"l2sweep-tracking_0"}
    assert {thread for thread, what, _ in events if what == "fit"} == {"MainThread"}

    (parent,), children = _runs(project)
    assert parent.info.status == "FINISHED"
    client = MlflowClient(sqlite_uri(project))
    for name, run in children.items():
        assert run.info.status == "FINISHED", name
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"plots", "histograms", "model", "hydra"}
        # Each run got its own job's Hydra config, though the next job had started.
        (project / "downloads" / name).mkdir(parents=True)
        overrides = client.download_artifacts(run.info.run_id, "hydra/overrides.yaml",
                                              str(project / "downloads" / name))
        assert f"regularizer.strength={run.data.params['regularizer.strength']}" in Path(overrides).read_text()


def test_a_runs_artifacts_wait_until_the_next_job_trains(project):
    # The end of a job and the start of the next (Hydra, building the model) are Python: the
    # tracking thread and the figure helpers keep off them, and start once an epoch begins.
    proc, events = _sweep(project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for done, following in zip(GRID, GRID[1:]):
        next_fit = events.index(["MainThread", "fit", f"l2-{following}"])
        first_epoch = events.index(["MainThread", "epoch", ""], next_fit)
        assert events.index(["l2sweep-tracking_0", "artifacts", f"l2-{done}"]) > first_epoch, events
    # The last job's are logged at once: no job follows.
    assert ["l2sweep-tracking_0", "artifacts", f"l2-{GRID[-1]}"] in events
    (parent,), children = _runs(project)
    assert parent.info.status == "FINISHED"
    assert {r.info.status for r in children.values()} == {"FINISHED"}


def test_a_failure_in_the_background_names_the_run_and_leaves_nothing_running(project):
    proc, _ = _sweep(project, FAIL="l2-0.001")
    assert proc.returncode == 1, proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: run l2-0.001: not logged to MLflow: artifacts (curves, histograms, "
                            f"history, config, model); its outputs are in {Path('models') / 'l2-0.001'}. "
                            "MLflow store sqlite:///"), error
    assert error.endswith("the artifact store is gone"), error
    assert "Traceback" not in proc.stderr

    (parent,), children = _runs(project)
    assert parent.info.status == "FAILED"
    assert {name: r.info.status for name, r in children.items()} == {
        "l2-0.001": "FAILED", "l2-0.01": "FINISHED", "l2-0.1": "FINISHED"}
    for strength in GRID:  # nothing lost: every lambda's outputs are on disk
        assert (project / "models" / f"l2-{strength}" / "model.keras").is_file()


def test_mlflow_starts_on_the_tracking_thread_once_the_first_job_trains(project):
    proc, events = _sweep(project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert events.index(["l2sweep-tracking_0", "parent", "sweep"]) > events.index(["MainThread", "fit", "l2-0.001"])
    # Then what it, TensorFlow and Keras hold for good leaves the collector's full passes.
    frozen = [count for _, what, count in events if what == "frozen objects"]
    assert frozen[0] == 0 and min(frozen[1:]) > 100_000, frozen
    (parent,), children = _runs(project)
    assert parent.info.status == "FINISHED" and parent.info.run_name.startswith("sweep-l2-")
    client = MlflowClient(sqlite_uri(project))
    epochs = json.loads((project / "models" / "l2-0.001" / "history.json").read_text())["epochs"]
    for name, run in children.items():  # the first job's too: every epoch, params and input
        assert run.info.status == "FINISHED", name
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == epochs, name
        assert run.data.params["regularizer.strength"] and run.inputs.dataset_inputs, name


def test_a_store_mlflow_cannot_use_stops_the_sweep_after_the_first_job(project):
    # A database sqlite reads (so preflight passes) with a schema version MLflow does not know.
    (project / "mlruns").mkdir()
    with sqlite3.connect(project / "mlruns" / "mlflow.db") as con:
        con.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        con.execute("INSERT INTO alembic_version VALUES ('0123456789ab')")
    proc = subprocess.run([sys.executable, "-m", "l2sweep.train", "-m"], cwd=project,
                          capture_output=True, text=True, env=cli_env(), timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: run l2-0.001: not logged to MLflow: the run, params and input, "
                            "metrics of epoch"), error
    assert f"its outputs are in {Path('models') / 'l2-0.001'}. MLflow store sqlite:///" in error, error
    assert "0123456789ab" in error, error
    assert "Traceback" not in proc.stderr
    # Nothing lost, nothing more trained: the first job's outputs, and no second job.
    assert [p.name for p in (project / "models").iterdir() if p.is_dir()] == ["l2-0.001"]
    assert (project / "models" / "l2-0.001" / "model.keras").is_file()
