"""Seed 003/004's whole comparison through real `dvc repro` on tiny data: kinds side by side in
one sweep (``sweep.compare``), then λ chosen by k-fold cross-validation (``data.folds``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import cli_env, pipeline_copy, sqlite_uri

DVC = str(Path(sys.executable).parent / "dvc")
ENV = cli_env(DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
              GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
SEEDS = [1, 2]
COMPARE = {"l2": [0.001, 0.01], "dropout": [0.2], "none": []}


def run(root: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=root, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{args}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def set_params(root: Path, **sections: dict) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    for key, value in sections.items():
        params[key].update(value)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def read(root: Path, path: str) -> dict:
    return json.loads((root / path).read_text())


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = pipeline_copy(tmp_path_factory.mktemp("repo"), train={"epochs": 1, "fused": True},
                         sweep={"seeds": SEEDS, "compare": COMPARE}, tracking={"log_model": False})
    (root / ".gitignore").write_text("/mlruns/\n/outputs/\n")
    run(root, "git", "init", "-q")
    run(root, DVC, "init", "-q")
    run(root, DVC, "config", "core.site_cache_dir", str(tmp_path_factory.mktemp("dvc-site")))
    return root


@pytest.mark.slow
def test_a_comparison_of_kinds_runs_through_dvc_repro(repo):
    run(repo, DVC, "repro")
    runs = read(repo, "reports/evaluation.json")["runs"]
    expected = {f"l2-{lam}-s{s}" for lam in (0.001, 0.01) for s in SEEDS} | {
        f"dropout-0.2-s{s}" for s in SEEDS} | {f"none-s{s}" for s in SEEDS}
    assert set(runs) == expected
    assert {r["regularizer"] for r in runs.values()} == {"l2", "dropout", "none"}
    assert all(r["test_accuracy"] is not None and 0 <= r["near_zero_share"] <= 1 for r in runs.values())
    # `dvc plots`: one line per (kind, strength)
    rows = read(repo, "plots/epochs.json")
    labels = {row["lambda"] for row in next(iter(rows.values()))}
    assert labels == {"l2-0.001", "l2-0.01", "dropout-0.2", "none"}
    report = (repo / "reports" / "report.md").read_text()
    assert "Kinds compared at their best strength" in report
    # the parent run says what it compared; each child its kind
    from mlflow import MlflowClient

    client = MlflowClient(sqlite_uri(repo))
    (experiment,) = [e for e in client.search_experiments() if e.name == "l2-sweep"]
    found = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in found if r.data.tags.get("l2sweep.kind") == "sweep"]
    assert parent.data.tags["regularizer"] == "l2,dropout,none" and parent.info.status == "FINISHED"
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["regularizer"] for r in children) == sorted(
        r["regularizer"] for r in runs.values())
    assert "up to date" in run(repo, DVC, "status").stdout or not run(repo, DVC, "status").stdout.strip()


@pytest.mark.slow
def test_cross_validation_chooses_retrains_and_tests_once_through_dvc_repro(repo):
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "-m", "comparison")
    set_params(repo, data={"folds": 2}, sweep={"compare": None, "strengths": [0.001, 0.1]})
    out = run(repo, DVC, "repro").stdout
    assert "Running stage 'prepare'" not in out  # the folds are the train stage's business
    evaluation = read(repo, "reports/evaluation.json")
    runs = evaluation["runs"]
    folds = {n: r for n, r in runs.items() if r["fold"] is not None}
    refits = {n: r for n, r in runs.items() if r["refit"]}
    assert set(folds) == {f"l2-{lam}-s{s}-f{f}" for lam in (0.001, 0.1) for s in SEEDS for f in (0, 1)}
    assert all(r["test_accuracy"] is None for r in folds.values())  # the test split is untouched
    chosen = evaluation["best"]["strength"]
    assert set(refits) == {f"l2-{chosen}-refit-s{s}" for s in SEEDS}
    assert all(r["test_accuracy"] is not None for r in refits.values())
    assert evaluation["best"]["run_name"] in refits
    assert not (repo / "models" / "none-s1").exists()  # the comparison's runs are gone from models/
    history = read(repo, f"models/{next(iter(refits))}/history.json")
    assert not any(k.startswith("val_") for k in history["metrics"])  # no validation data
    # MLflow: each fold run is tagged with its fold, each refit as one, under one parent
    from mlflow import MlflowClient

    client = MlflowClient(sqlite_uri(repo))
    tagged = {r.info.run_name: r.data.tags for r in client.search_runs(
        [client.get_experiment_by_name("l2-sweep").experiment_id],
        f"tags.`mlflow.parentRunId` = '{evaluation['sweep']['parent_run_id']}'")}
    assert set(tagged) == set(runs)
    assert {n: t.get("l2sweep.fold") for n, t in tagged.items() if n in folds} == {
        n: n[-1] for n in folds}
    assert all(tagged[n]["l2sweep.refit"] == "true" for n in refits)
