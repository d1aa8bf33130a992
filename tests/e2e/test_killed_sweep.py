"""A sweep killed with SIGKILL (no ``finally`` runs) leaves its MLflow runs RUNNING; the next sweep
against the same store, on the same host, ends them FAILED ("process died") and runs as usual."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest
from mlflow import MlflowClient

from helpers import cli_env, make_project, run_cli, sqlite_uri, tiny_arrays, wait_until
from l2sweep.tracking.runs import PID_TAG, REASON_TAG

pytestmark = pytest.mark.slow


def open_runs_with_metrics(db: Path) -> int:
    """RUNNING runs with metrics in the store (plain sqlite: MLflow must not create the schema
    while the sweep does)."""
    if not db.is_file():
        return 0
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
            return con.execute("SELECT count(*) FROM runs r WHERE status = 'RUNNING' AND EXISTS "
                               "(SELECT 1 FROM metrics m WHERE m.run_uuid = r.run_uuid)").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_a_sweep_killed_with_sigkill_is_closed_by_the_next_sweep(tmp_path):
    # Keras' fit: the compiled loop draws every epoch's batch order before the first one.
    root = make_project(tmp_path / "p", tiny_arrays(), sweep={"strengths": [0.01]},
                        train={"epochs": 100000, "loop": "keras"}, tracking={"log_model": False})
    uri, log = sqlite_uri(root), tmp_path / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "l2sweep.train", "-m"], cwd=root, env=cli_env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: open_runs_with_metrics(root / "mlruns" / "mlflow.db") > 0, 120,
                   "the first sweep's child run", proc, log)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("l2-sweep").experiment_id
    killed = client.search_runs([experiment])
    assert len(killed) == 2 and {r.info.status for r in killed} == {"RUNNING"}
    assert {r.data.tags[PID_TAG] for r in killed} == {str(proc.pid)}

    run_cli(root, "l2sweep.train", "-m", "train.epochs=1")

    after = {r.info.run_id: r for r in client.search_runs([experiment])}
    for old in killed:
        run = after.pop(old.info.run_id)
        assert run.info.status == "FAILED", run.info.run_name
        assert run.data.tags[REASON_TAG].startswith(f"process died: pid {proc.pid} on {socket.gethostname()}")
    assert sorted((r.info.run_name.split("-")[0], r.info.status) for r in after.values()) == [
        ("l2", "FINISHED"), ("sweep", "FINISHED")]
