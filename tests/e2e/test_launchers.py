"""Hydra launchers and sweepers: the same parent/child MLflow layout under each of them.

Real CLI sweeps on tiny data: ``hydra/launcher=parallel`` (joblib, two worker processes,
one sqlite store), ``hydra/launcher=submitit_local`` (submitit's code path as local
processes; ``slurm`` differs only in the executor) and ``hydra/sweeper=lambda_search``
(Optuna). The MLflow model artifact is switched off here (it is tested in test_train and costs
seconds a run).
"""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

from helpers import EPOCHS, GRID, copy_project, make_project, run_cli, sqlite_uri
from l2sweep.tracking import runs, sweep
from l2sweep.base.config import CONF_DIR

FAST = ("tracking.log_model=false",)
METRICS = ("loss", "val_loss", "val_data_loss", "penalty", "weight_norm/hidden")


def hydra_node(*overrides: str):
    """The composed ``hydra`` node for ``overrides`` (as the app would see it)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True).hydra


def sweep_runs(root: Path) -> tuple:
    """(parents, {child name: child run}) of the project's store."""
    client = MlflowClient(sqlite_uri(root))
    experiment = client.get_experiment_by_name("l2-sweep")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    return client, parents, children


def assert_one_sweep(root: Path, names: list[str], epochs: int) -> tuple:
    """One FINISHED parent; a FINISHED child per name attached to it, every metric complete."""
    client, parents, children = sweep_runs(root)
    assert len(parents) == 1, [p.info.run_name for p in parents]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert sorted(children) == sorted(names)
    for name, child in children.items():
        assert child.info.status == "FINISHED", name
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id, name
        for key in METRICS:
            steps = [m.step for m in client.get_metric_history(child.info.run_id, key)]
            assert sorted(steps) == list(range(epochs)), (name, key, steps)
    manifest = json.loads((root / "models" / "sweep.json").read_text())
    assert manifest["parent_run_id"] == parent.info.run_id
    return client, parent, children


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared tiny project; each test sweeps in its own copy."""
    return make_project(tmp_path_factory.mktemp("launchers") / "template")


# --- configs (fast) ------------------------------------------------------------------------


def test_launcher_and_sweeper_configs_compose():
    parallel = hydra_node("hydra/launcher=parallel").launcher
    assert parallel._target_.endswith("JoblibLauncher") and parallel.n_jobs == 2
    assert hydra_node("hydra/launcher=joblib", "hydra.launcher.n_jobs=3").launcher.n_jobs == 3
    slurm = hydra_node("hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                       "hydra.launcher.gpus_per_node=1").launcher
    assert slurm._target_.endswith("SlurmLauncher")
    assert (slurm.partition, slurm.gpus_per_node, slurm.timeout_min, slurm.cpus_per_task) == ("gpu", 1, 60, 4)
    assert hydra_node("hydra/launcher=submitit_local").launcher._target_.endswith("LocalLauncher")
    search = hydra_node("hydra/sweeper=lambda_search", "hydra.sweeper.n_trials=7").sweeper
    assert search._target_.endswith("OptunaSweeper") and search.n_trials == 7
    assert search.direction == "minimize"
    assert search.params["regularizer.strength"] == "tag(log, interval(1e-6, 1e-1))"


def test_a_job_in_another_process_gets_the_parent_from_the_pickled_callback(tiny_cfg):
    """Launchers pickle the callback with each job (loky workers, submitit job files): the job
    finds the sweep's parent run even where the launching process's environment is not."""
    cfg = tiny_cfg()
    names = (runs.PARENT_ENV, runs.SWEEP_ENV)
    saved = {name: os.environ.pop(name, None) for name in names}
    callback = sweep.SweepCallback()
    try:
        callback.on_multirun_start(cfg)
        in_worker = pickle.loads(pickle.dumps(callback))  # waits for the parent's creation
        expected = {name: os.environ.pop(name) for name in names}
        assert MlflowClient(cfg.tracking.uri).get_run(expected[runs.PARENT_ENV]).info.status == "RUNNING"
        in_worker.on_job_start(cfg)
        assert {name: os.environ[name] for name in names} == expected
    finally:
        sweep.finish("FINISHED")
        for name, value in saved.items():  # later tests must not see this sweep
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# --- real sweeps (slow) --------------------------------------------------------------------


@pytest.mark.slow
def test_joblib_runs_jobs_in_parallel_into_one_sqlite_store(prepared, tmp_path):
    root = copy_project(prepared, tmp_path)
    proc = run_cli(root, "l2sweep.train", "-m", "hydra/launcher=parallel", *FAST)
    log = proc.stdout + proc.stderr
    assert "Joblib.Parallel(n_jobs=2" in log and "backend=loky" in log
    assert "database is locked" not in log and "Traceback" not in log
    _, parent, _ = assert_one_sweep(root, [f"l2-{s}" for s in GRID], EPOCHS)
    assert parent.data.params["hydra.launcher"] == "parallel"
    assert parent.data.tags["best_lambda"] in {f"{s:g}" for s in GRID}


@pytest.mark.slow
def test_submitit_local_runs_the_submitit_code_path(prepared, tmp_path):
    grid = GRID[:2]
    root = copy_project(prepared, tmp_path, sweep={"strengths": grid}, train={"epochs": 1})
    run_cli(root, "l2sweep.train", "-m", "hydra/launcher=submitit_local", *FAST)
    assert_one_sweep(root, [f"l2-{s}" for s in grid], 1)
    # submitit's own traces: one folder per job with its pickles and logs
    jobs = [p for p in (root / "outputs" / "sweep" / ".submitit").iterdir() if any(p.glob("*_result.pkl"))]
    assert len(jobs) == len(grid)


@pytest.mark.slow
def test_optuna_searches_lambda_and_tags_the_best_on_the_parent(prepared, tmp_path):
    trials = 3
    root = copy_project(prepared, tmp_path, train={"epochs": 1})
    run_cli(root, "l2sweep.train", "-m", "hydra/sweeper=lambda_search",
            f"hydra.sweeper.n_trials={trials}", *FAST)
    client, parents, children = sweep_runs(root)
    assert len(parents) == 1 and len(children) == trials
    parent = parents[0]
    strengths = {name: float(run.data.params["regularizer.strength"]) for name, run in children.items()}
    assert all(1e-6 <= s <= 1e-1 for s in strengths.values()) and len(set(strengths.values())) == trials
    assert {c.data.tags["mlflow.parentRunId"] for c in children.values()} == {parent.info.run_id}
    assert "interval(1e-6, 1e-1)" in parent.data.params["grid"]
    assert parent.data.params["hydra.sweeper"] == "lambda_search"

    # The best lambda: lowest final validation cross-entropy, as Optuna saw it too.
    finals = {name: run.data.metrics["val_data_loss"] for name, run in children.items()}
    best = min(finals, key=finals.get)
    assert parent.data.tags["best_run_name"] == best and parent.data.tags["best_by"] == "val_data_loss"
    assert math.isclose(float(parent.data.tags["best_lambda"]), strengths[best], rel_tol=1e-5)
    optuna = yaml.safe_load((root / "outputs" / "sweep" / "optimization_results.yaml").read_text())
    assert math.isclose(optuna["best_value"], finals[best], rel_tol=1e-6)
    assert math.isclose(optuna["best_params"]["regularizer.strength"], strengths[best])
