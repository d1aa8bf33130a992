"""Faults during a sweep lose nothing: divergence, interruption, an unusable or full store,
two sweeps at once, and the tracking server going away. Real CLIs on tiny data."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional

import pytest
import yaml
from mlflow import MlflowClient

from helpers import (cli_env, free_port, make_project, pipeline_copy, run_cli, sqlite_uri, stop_process_group,
                     tiny_arrays, wait_until)
from l2sweep import train
from l2sweep.base import files
from l2sweep.tracking.runs import REASON_TAG

REPO = Path(__file__).resolve().parents[2]
GRID = [0.001, 0.01]
#: The MLflow copy of each model is not what these tests are about; skipping it saves seconds.
NO_MLFLOW_MODEL = {"log_model": False}


def runs_of(uri: str) -> tuple[list, dict]:
    """(parent runs, {child run name: run}) of the ``l2-sweep`` experiment in ``uri``."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("l2-sweep")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parents, {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}


def steps(uri: str, run, key: str = "loss") -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run.info.run_id, key))


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path) -> its sha256."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_dirs(models: Path) -> list[str]:
    """Everything in ``models/`` but the manifest: run folders and (hidden) temp folders."""
    return sorted(p.name for p in models.iterdir() if p.name != "sweep.json") if models.is_dir() else []


def signal_when(cmd: list[str], cwd: Path, line_start: str, send, timeout: float = 300,
                env: Optional[dict] = None, anywhere: bool = False) -> tuple[int, str]:
    """Runs ``cmd`` (own session), calls ``send(proc)`` once an output line starts with
    ``line_start`` (or, ``anywhere``, contains it); returns (exit status, all output)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or cli_env(PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    watchdog = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    watchdog.start()
    output, sent = [], False
    try:
        for line in proc.stdout:
            output.append(line)
            if not sent and (line_start in line if anywhere else line.startswith(line_start)):
                send(proc)
                sent = True
        proc.wait(60)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = "".join(output)
    assert sent, f"never saw a line starting with {line_start!r}:\n{text[-3000:]}"
    return proc.returncode, text


pytestmark = pytest.mark.slow


# --- divergence ------------------------------------------------------------------------------------


def test_a_diverging_lambda_fails_alone_and_evaluate_reports_it(tmp_path):
    # lambda * sum(w^2) with lambda = 1e38 overflows float32 at the first step: loss = inf.
    root = make_project(tmp_path / "p", tiny_arrays(), sweep={"strengths": [0.001, 1e38]},
                        train={"epochs": 3}, tracking=NO_MLFLOW_MODEL)
    proc = run_cli(root, "l2sweep.train", "-m")  # exit 0: the sweep goes on
    uri = sqlite_uri(root)
    (parent,), children = runs_of(uri)
    good, bad = children["l2-0.001"], children["l2-1e+38"]
    assert good.info.status == "FINISHED" and steps(uri, good) == [0, 1, 2]
    assert bad.info.status == "FAILED" and bad.data.tags[REASON_TAG] == "diverged at epoch 0"
    assert steps(uri, bad) == [0]  # stopped at once, not after all epochs
    assert parent.info.status == "FAILED"  # the sweep did not fully succeed
    assert "diverged at epoch 0; no model written" in proc.stdout + proc.stderr
    history = json.loads((root / "models" / "l2-1e+38" / "history.json").read_text())
    assert history["status"] == "FAILED" and history["diverged_epoch"] == 0 and history["epochs"] == [0]
    assert not (root / "models" / "l2-1e+38" / "model.keras").exists()

    run_cli(root, "l2sweep.evaluate")
    evaluation = json.loads((root / "reports" / "evaluation.json").read_text())
    assert evaluation["runs"]["l2-1e+38"]["status"] == "diverged"
    assert evaluation["runs"]["l2-1e+38"]["test_accuracy"] is None
    assert evaluation["runs"]["l2-0.001"]["status"] == "finished"
    assert "diverged at epoch 0" in (root / "reports" / "report.md").read_text()


# --- interruption ------------------------------------------------------------------------------------


def dvc_repo(root: Path, epochs: int = 2) -> Path:
    """A copy of this project's pipeline on the tiny data, under git and DVC."""
    pipeline_copy(root, train={"epochs": epochs}, sweep={"strengths": GRID[:1], "seeds": None},
                  tracking=NO_MLFLOW_MODEL)
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=root, env=dvc_env(), check=True, capture_output=True)
    if (REPO / ".dvc" / "plots").is_dir():  # dvc.yaml's plot templates
        shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")
    return root


def dvc_env() -> dict[str, str]:
    return cli_env(DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1", GIT_AUTHOR_NAME="t",
                   GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")


def dvc(root: Path, *args: str) -> str:
    proc = subprocess.run(["dvc", *args], cwd=root, env=dvc_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"dvc {args}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_ctrl_c_during_dvc_repro_kills_the_run_and_the_next_repro_completes(tmp_path):
    root = dvc_repo(tmp_path / "repo", epochs=50)  # the signal lands after epoch 1's line
    dvc(root, "repro", "prepare")
    prepared = digest(root / "data" / "prepared")

    # Ctrl-C in a terminal signals the whole foreground process group: dvc and the stage.
    status, output = signal_when(["dvc", "repro"], root, " Epoch 1/",
                                 lambda p: os.killpg(p.pid, signal.SIGINT), env=dvc_env(), anywhere=True)
    assert status != 0, output
    assert "error: interrupted (SIGINT)" in output
    (parent,), children = runs_of(sqlite_uri(root))
    assert [r.info.status for r in children.values()] == ["KILLED"], output
    assert parent.info.status == "KILLED" and parent.data.tags[REASON_TAG] == "interrupted by SIGINT"
    assert run_dirs(root / "models") == []  # no partial model, no temp folder
    assert digest(root / "data" / "prepared") == prepared

    dvc(root, "repro")
    assert json.loads(dvc(root, "status", "--json") or "{}") == {}
    assert (root / "models" / "l2-0.001" / "model.keras").is_file()
    parents, _ = runs_of(sqlite_uri(root))
    assert sorted(r.info.status for r in parents) == ["FINISHED", "KILLED"]
    finished = next(r for r in parents if r.info.status == "FINISHED")
    children = MlflowClient(sqlite_uri(root)).search_runs(
        [finished.info.experiment_id], f"tags.mlflow.parentRunId = '{finished.info.run_id}'")
    assert [r.info.status for r in children] == ["FINISHED"]
    evaluation = json.loads((root / "reports" / "evaluation.json").read_text())
    assert {r["status"] for r in evaluation["runs"].values()} == {"finished"}

    # A new grid in params.yaml (the one source of truth) makes `train` stale, not `prepare`.
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["sweep"]["strengths"] = GRID
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stale = json.loads(dvc(root, "status", "--json"))
    assert "prepare" not in stale and "evaluate" not in stale, stale
    assert stale["train"] == [{"changed deps": {"params.yaml": {"sweep": "modified"}}}], stale

    # Rejected input through `dvc repro` itself: DVC leaves the outputs (persist), the stage
    # refuses before it replaces them, so the last good models and data are still there.
    models = tree_digest(root / "models")
    for section, bad, named in (("train", {"batch_size": "big"}, "train.batch_size"),
                                ("dataset", {"path": "data/raw/nowhere"}, "data/raw/nowhere")):
        broken = {**params, section: {**params[section], **bad}}
        (root / "params.yaml").write_text(yaml.safe_dump(broken, sort_keys=False))
        proc = subprocess.run(["dvc", "repro"], cwd=root, env=dvc_env(), capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode != 0 and named in proc.stdout + proc.stderr, proc.stdout + proc.stderr
        assert tree_digest(root / "models") == models and digest(root / "data" / "prepared") == prepared

    # A new grid: models/ then holds that sweep's runs alone (the stage removes the earlier λ).
    params["sweep"]["strengths"], params["train"]["epochs"] = GRID[1:], 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc(root, "repro", "train")
    assert run_dirs(root / "models") == [f"l2-{s}" for s in GRID[1:]]
    assert "train" not in json.loads(dvc(root, "status", "--json") or "{}")


def test_sigterm_kills_the_run_and_keeps_the_data(tmp_path):
    root = make_project(tmp_path / "p", tiny_arrays(), sweep={"strengths": GRID}, train={"epochs": 50})
    prepared = digest(root / "data" / "prepared")
    status, output = signal_when([sys.executable, "-m", "l2sweep.train", "-m"], root, " Epoch 1/",
                                 lambda p: p.send_signal(signal.SIGTERM), anywhere=True)
    assert status == 128 + signal.SIGTERM, output
    assert output.strip().splitlines()[-1].startswith("error: interrupted (SIGTERM)")
    (parent,), children = runs_of(sqlite_uri(root))
    assert {name: r.info.status for name, r in children.items()} == {"l2-0.001": "KILLED"}
    assert children["l2-0.001"].data.tags[REASON_TAG].startswith("interrupted")
    assert parent.info.status == "KILLED"
    assert run_dirs(root / "models") == []
    assert digest(root / "data" / "prepared") == prepared


def test_sigterm_kills_every_run_of_a_fused_sweep(tmp_path):
    """The fused sweep's runs are open while the grid trains (each gets its epochs as they
    end): SIGTERM ends all of them KILLED, and no model is written."""
    root = make_project(tmp_path / "p", tiny_arrays(), sweep={"strengths": GRID}, train={"epochs": 50})
    status, output = signal_when([sys.executable, "-m", "l2sweep.train", "-m", "train.fused=true"], root,
                                 ": epoch 2/50, ", lambda p: p.send_signal(signal.SIGTERM),
                                 anywhere=True)
    assert status == 128 + signal.SIGTERM, output
    assert output.strip().splitlines()[-1].startswith("error: interrupted (SIGTERM)")
    (parent,), children = runs_of(sqlite_uri(root))
    assert {name: r.info.status for name, r in children.items()} == {f"l2-{s}": "KILLED" for s in GRID}
    for name, run in children.items():
        assert run.data.tags[REASON_TAG].startswith("interrupted")
        assert run.data.params["regularizer.strength"] == name.split("-", 1)[1]
    assert parent.info.status == "KILLED"
    assert run_dirs(root / "models") == []


def test_temp_folders_of_killed_runs_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live = tmp_path / f".l2-0.1.tmp-{dead.pid}-ab12cd34", tmp_path / f".l2-0.2.tmp-{os.getpid()}-ab12cd34"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "model.keras").write_bytes(b"half")
    assert files.remove_stale_temp(tmp_path) == [stale]
    assert not stale.exists() and live.exists()  # a running sweep's folder is left alone


# --- an unusable or full store -----------------------------------------------------------------------


def _fill(project: Path, what: str, monkeypatch) -> str:
    if what == "store is not a database":
        (project / "mlruns").mkdir()
        (project / "mlruns" / "mlflow.db").write_bytes(b"not a database\n" * 512)
        return "MLflow store sqlite:///mlruns/mlflow.db: file is not a database"
    if what == "mlruns is a file":
        (project / "mlruns").write_text("")
        return ("mlruns: cannot write the MLflow store (sqlite:///mlruns/mlflow.db) there "
                "(mlruns is a file, not a folder)")
    if what == "models is a file":
        (project / "models").write_text("")
        return "models: cannot write the trained models (paths.models) there (models is a file, not a folder)"
    if what == "read-only mlruns":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (project / "mlruns").mkdir(mode=0o555)
        return "mlruns: cannot write the MLflow store (sqlite:///mlruns/mlflow.db) there (Permission denied)"
    if what == "disk full":
        monkeypatch.setattr(files, "MIN_FREE_BYTES", 1 << 60)
        return "a sweep needs at least"
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    return f"MLflow tracking server http://127.0.0.1:{port} does not answer (Connection refused)"


@pytest.mark.parametrize("what", ["mlruns is a file", "read-only mlruns", "models is a file",
                                  "disk full", "server not running", "store is not a database"])
def test_an_unusable_store_fails_before_training(prepared_project, capsys, monkeypatch, what):
    expected = _fill(prepared_project, what, monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["-m"])
    assert exit_info.value.code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not (prepared_project / "outputs").exists()  # Hydra never started
    assert not (prepared_project / "models").is_dir()


_DISK_FULL = """
import errno, sys
import l2sweep.train as t
def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
t.write_run_outputs = disk_full
sys.argv[1:] = ["-m"]
t.main()
"""


def test_a_disk_that_fills_up_during_training_fails_the_run_with_the_reason(tmp_path):
    root = make_project(tmp_path / "p", tiny_arrays(), sweep={"strengths": [0.001]}, train={"epochs": 1})
    proc = subprocess.run([sys.executable, "-c", _DISK_FULL], cwd=root, env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: [Errno 28] No space left on device"
    assert "Traceback" not in proc.stderr
    (parent,), children = runs_of(sqlite_uri(root))
    run = children["l2-0.001"]
    assert run.info.status == "FAILED" and "No space left on device" in run.data.tags[REASON_TAG]
    assert parent.info.status == "FAILED" and "No space left" in parent.data.tags[REASON_TAG]
    assert run_dirs(root / "models") == []


# --- two sweeps at once ------------------------------------------------------------------------------


def test_two_sweeps_at_once_into_one_store_both_complete(tmp_path):
    root = make_project(tmp_path / "p", tiny_arrays(), sweep={"strengths": GRID}, tracking=NO_MLFLOW_MODEL)
    assert not (root / "mlruns").exists()  # both create the store: the schema race, too
    procs = [subprocess.Popen([sys.executable, "-m", "l2sweep.train", "-m", f"regularizer={name}"],
                              cwd=root, env=cli_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for name in ("l1", "l2")]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]
    uri = sqlite_uri(root)
    parents, children = runs_of(uri)
    assert sorted(r.info.status for r in parents) == ["FINISHED", "FINISHED"]
    assert sorted(children) == sorted(f"{n}-{s}" for n in ("l1", "l2") for s in GRID)
    for name, run in children.items():
        assert run.info.status == "FINISHED", name
        for key in ("loss", "val_loss", "penalty", "weight_norm/hidden"):
            assert steps(uri, run, key) == [0, 1], (name, key)
        assert (root / "models" / name / "model.keras").is_file()


# --- the tracking server goes away --------------------------------------------------------------------


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` on a free 127.0.0.1 port (sqlite backend under tmp_path)."""
    port, log = free_port(), tmp_path / "server.log"
    store = tmp_path / "server"
    store.mkdir()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1", "--backend-store-uri",
             f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination", str(store / "artifacts")],
            cwd=tmp_path, env=cli_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def healthy() -> bool:
            import urllib.request

            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
            except OSError:
                return False

        wait_until(healthy, 120, "mlflow server", proc=proc, log=log)
        yield {"uri": f"http://127.0.0.1:{port}", "proc": proc, "db": f"sqlite:///{store / 'mlflow.db'}"}
    finally:
        stop_process_group(proc)


def test_the_server_going_away_keeps_the_outputs_and_says_what_was_not_logged(tmp_path, mlflow_server):
    epochs = 60
    root = make_project(tmp_path / "p", tiny_arrays(), sweep={"strengths": [0.001]},
                        train={"epochs": epochs})
    env = cli_env(PYTHONUNBUFFERED="1", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
                  MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    proc = subprocess.Popen([sys.executable, "-m", "l2sweep.train", "-m", f"tracking.uri={mlflow_server['uri']}"],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # The server dies for good once the run exists on it, while the sweep goes on.
    def created() -> bool:
        try:
            return "l2-0.001" in runs_of(mlflow_server["db"])[1]
        except Exception:  # the server is writing the database right now
            return False

    wait_until(created, 300, "the child run", proc=proc)
    os.killpg(mlflow_server["proc"].pid, signal.SIGKILL)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1, output
    error = output.strip().splitlines()[-1]
    assert error.startswith("error: run l2-0.001: not logged to MLflow: "), error
    assert "artifacts (histograms, history, config, model)" in error
    assert f"its outputs are in {Path('models') / 'l2-0.001'}" in error
    assert f"MLflow tracking server {mlflow_server['uri']} does not answer" in error

    out = root / "models" / "l2-0.001"
    history = json.loads((out / "history.json").read_text())
    assert history["epochs"] == list(range(epochs)) and (out / "model.keras").is_file()
    assert run_dirs(root / "models") == ["l2-0.001"]

    # What the server got before it died matches what the error says is missing.
    _, children = runs_of(mlflow_server["db"])
    logged = steps(mlflow_server["db"], children["l2-0.001"])
    assert logged == list(range(len(logged)))
    first_missing = len(logged)
    assert f"metrics of epochs {first_missing}-{epochs - 1}" in error, (logged, error)
