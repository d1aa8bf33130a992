"""The `evaluate` stage on a real tiny sweep: metrics, report, DVC plots, MLflow, the gate."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import DictConfig

from conftest import make_images, override, write_idx_dir
from l2sweep import gate
from l2sweep.reporting import dvc_data
from l2sweep.reporting import summaries as report
from l2sweep.base.config import CONF_DIR, compose_config, merge_overrides
from helpers import parse_cell, plots_repo, table_rows

GRID = (0.0001, 0.01)
EPOCHS = 2
DIVERGED = "l2-10.0"
REPO = CONF_DIR.parent
PLOT_IDS = {"val_loss_per_epoch", "val_cross_entropy_per_epoch", "accuracy_per_epoch",
            "weight_norm_vs_lambda", "test_accuracy_vs_lambda"}


def project_cfg(root: Path, *extra: str) -> DictConfig:
    """The real config (conf/, no params.yaml) on the tiny data, every path under ``root``."""
    base = ["dataset=idx_dir", override("dataset.path", str(root / "idx")),
            f"train.epochs={EPOCHS}", "tracking.enabled=false", "train.jit_compile=false"]
    base += [override(f"paths.{key}", str(root / rel)) for key, rel in (
        ("raw", "data/raw"), ("prepared", "data/prepared"), ("models", "models"),
        ("metrics", "metrics/eval.json"), ("plots", "plots"), ("reports", "reports"),
        ("outputs", "outputs"))]
    return compose_config(merge_overrides(base, list(extra)), with_params=False)


def add_diverged_run(models: Path, like: str) -> None:
    """A run that diverged at epoch 1, as `train` leaves it: a history, no model."""
    history = json.loads((models / like / "history.json").read_text())
    history.update(run_name=DIVERGED, strength=10.0, status="FAILED", diverged_epoch=1)
    history["metrics"] = {k: [v[0], math.nan] for k, v in history["metrics"].items()}
    (models / DIVERGED).mkdir()
    (models / DIVERGED / "history.json").write_text(json.dumps(history))


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """prepare + one real `train` per λ of GRID (2 epochs, 400 images) + a diverged run."""
    from l2sweep.prepare import prepare
    from l2sweep.tracking import runs, sweep
    from l2sweep.train import train

    root = tmp_path_factory.mktemp("sweep")
    x_train, y_train = make_images(400, seed=0)
    x_test, y_test = make_images(100, seed=1)
    write_idx_dir(root / "idx", {"x_train": x_train, "y_train": y_train, "x_test": x_test,
                                 "y_test": y_test})
    prepare(project_cfg(root))
    for strength in GRID:
        train(project_cfg(root, f"regularizer.strength={strength}"))
    add_diverged_run(root / "models", f"l2-{GRID[0]}")
    with pytest.MonkeyPatch.context() as mp:
        for name in (runs.SWEEP_ENV, runs.PARENT_ENV):
            mp.delenv(name, raising=False)
        sweep.write_manifest(project_cfg(root), None)
    return root


def copy_project(sweep_root: Path, dest: Path) -> Path:
    shutil.copytree(sweep_root, dest)
    return dest


@pytest.fixture(scope="module")
def evaluated(sweep_root: Path) -> dict:
    """``evaluate`` once on the sweep; returns its result and the root."""
    from l2sweep.evaluate import evaluate

    return {"root": sweep_root, "evaluation": evaluate(project_cfg(sweep_root))}


def histories(root: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in (root / "models").glob("*/history.json")}


def test_every_lambda_is_in_the_evaluation(evaluated):
    root = evaluated["root"]
    on_disk = json.loads((root / "reports/evaluation.json").read_text())
    assert on_disk == dvc_data.json_safe(evaluated["evaluation"])
    runs = on_disk["runs"]
    assert set(runs) == {f"l2-{s}" for s in GRID} | {DIVERGED}
    assert {n: r["status"] for n, r in runs.items()} == {
        "l2-0.0001": "finished", "l2-0.01": "finished", DIVERGED: "diverged"}
    assert on_disk["sweep"]["strengths"] == [*GRID, 10.0]
    assert on_disk["sweep"]["config"]["train.epochs"] == EPOCHS
    assert on_disk["best"]["run_name"] in {f"l2-{s}" for s in GRID}
    assert on_disk["best"]["value"] == min(runs[f"l2-{s}"]["val_data_loss"] for s in GRID)


def test_dvc_metrics_are_few_and_numeric(evaluated):
    """metrics/eval.json holds what `dvc exp show` compares: the best λ and test accuracy per
    finished λ (the diverged λ has none); the details are in reports/evaluation.json."""
    evaluation = evaluated["evaluation"]
    best = evaluation["runs"][evaluation["best"]["run_name"]]
    assert json.loads((evaluated["root"] / "metrics/eval.json").read_text()) == {
        "best": {"lambda": best["strength"], "test_acc": best["test_accuracy"],
                 "val_ce": best["val_data_loss"]},
        "test_acc": {report.format_strength(s): evaluation["runs"][f"l2-{s}"]["test_accuracy"]
                     for s in GRID}}


def test_values_are_consistent_with_histories_and_models(evaluated):
    import keras

    from l2sweep.base.data import load_split, to_float

    root, runs = evaluated["root"], evaluated["evaluation"]["runs"]
    x, y = load_split(root / "data/prepared", "test")
    for name, history in histories(root).items():
        run, m = runs[name], history["metrics"]
        assert run["epochs"] == len(history["epochs"]) == EPOCHS
        if run["status"] != "finished":
            assert run["test_accuracy"] is None and run["diverged_epoch"] == 1
            continue
        assert run["train_accuracy"] == m["accuracy"][-1]
        assert run["val_accuracy"] == m["val_accuracy"][-1]
        assert run["val_loss"] == m["val_loss"][-1] and run["val_data_loss"] == m["val_data_loss"][-1]
        assert run["gap"] == pytest.approx(m["accuracy"][-1] - m["val_accuracy"][-1])
        assert run["best_epoch"] == int(np.argmin(m["val_loss"]))
        assert run["val_loss_rose"] == (m["val_loss"][-1] > min(m["val_loss"]))
        norms = [m["weight_norm/hidden"][-1], m["weight_norm/output"][-1]]
        assert run["weight_norm"]["total"] == pytest.approx(math.hypot(*norms))
        assert run["penalty_share"] == pytest.approx(
            m["penalty"][-1] / (m["penalty"][-1] + m["data_loss"][-1]))
        # Test metrics: recomputed from the saved model with Keras' own loss.
        confusion = np.array(run["confusion_matrix"])
        assert confusion.sum() == len(y) and confusion.shape == (10, 10)
        assert run["test_accuracy"] == pytest.approx(np.trace(confusion) / len(y))
        assert list(run["per_class_accuracy"].values()) == pytest.approx(
            list(np.diag(confusion) / confusion.sum(axis=1)))
        model = keras.saving.load_model(root / "models" / name / "model.keras", compile=False)
        probs = model.predict(to_float(x), verbose=0)
        loss = keras.losses.SparseCategoricalCrossentropy()(y, probs)
        assert run["test_loss"] == pytest.approx(float(loss), rel=1e-4)
        assert run["test_accuracy"] == pytest.approx(float((probs.argmax(1) == y).mean()))


def test_report_table_equals_the_evaluation(evaluated):
    root = evaluated["root"]
    metrics = json.loads((root / "reports/evaluation.json").read_text())
    text = (root / "reports/report.md").read_text()
    rows = table_rows(text)
    keys = ["train_accuracy", "val_accuracy", "val_loss", "val_data_loss", "test_accuracy",
            "test_loss", None, "gap", "best_epoch"]
    assert set(rows) == {report.format_strength(r["strength"]) for r in metrics["runs"].values()}
    for run in metrics["runs"].values():
        cells = rows[report.format_strength(run["strength"])]
        if run["status"] == "diverged":
            assert cells[0] == "diverged at epoch 1"
            continue
        for key, cell in zip(keys, cells):
            expected = run["weight_norm"]["regularized"] if key is None else run[key]
            assert parse_cell(cell) == pytest.approx(expected, abs=5e-4), (key, cell)
    assert "λ=10 diverged at epoch 1" in text
    for figure in ("val_loss", "accuracy", "weight_norm_vs_lambda", "test_accuracy_vs_lambda",
                   "confusion_matrices"):
        assert f"(figures/{figure}.png)" in text
        assert (root / "reports/figures" / f"{figure}.png").stat().st_size > 10_000


def dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com"}
    cmd = [str(Path(sys.executable).parent / "dvc"), *args] if args[0] != "git" else list(args)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout}\n{proc.stderr}"
    return proc


def test_dvc_plots_show_and_diff_render(evaluated, tmp_path):
    """The repo's dvc.yaml, params.yaml and templates draw the plots evaluate wrote."""
    repo = plots_repo(tmp_path / "repo")
    shutil.copytree(evaluated["root"] / "plots", repo / "plots")
    shutil.copytree(evaluated["root"] / "metrics", repo / "metrics")

    shown = json.loads(dvc(repo, "plots", "show", "--json").stdout)
    assert "errors" not in shown and set(shown["data"]) == PLOT_IDS
    for plot_id, renders in shown["data"].items():
        values = renders[0]["content"]["data"]["values"]
        assert values, plot_id
        assert {"lambda", "strength"} <= set(values[0]), plot_id
    lambdas = {row["lambda"] for row in shown["data"]["val_loss_per_epoch"][0]["content"]["data"]["values"]}
    assert lambdas == {"0.0001", "0.01", "10"}  # every λ on one chart
    shown_metrics = json.loads(dvc(repo, "metrics", "show", "--json").stdout)
    data = shown_metrics[""]["data"]["metrics/eval.json"]["data"]
    assert data["test_acc"]["0.01"] == evaluated["evaluation"]["runs"]["l2-0.01"]["test_accuracy"]

    dvc(repo, "git", "add", "-A")
    dvc(repo, "git", "commit", "-q", "-m", "evaluated")
    epochs = json.loads((repo / "plots/epochs.json").read_text())
    for row in epochs["epochs"]:
        if row["val_loss"] is not None:
            row["val_loss"] *= 1.1
    (repo / "plots/epochs.json").write_text(json.dumps(epochs))
    diff = json.loads(dvc(repo, "plots", "diff", "HEAD", "--json").stdout)
    assert "errors" not in diff
    assert set(diff["data"]["val_loss_per_epoch"][0]["revisions"]) == {"HEAD", "workspace"}


def test_gate_reports_a_diverged_lambda(evaluated):
    current = evaluated["evaluation"]
    baseline = copy.deepcopy(current)
    baseline["runs"][DIVERGED] = {**baseline["runs"]["l2-0.01"], "strength": 10.0}
    cfg = project_cfg(evaluated["root"])
    verdicts = gate.gate(current, baseline, gate.tolerances_from_config(cfg.gate))
    assert not gate.passed(verdicts)
    assert [v.status for v in verdicts if not v.passed] == ["diverged"]
    assert "| 10 | - | – | – | - | DIVERGED: λ=10 finished in the baseline but is now diverged (epoch 1) |" \
        in gate.format_verdicts(verdicts)
    assert gate.passed(gate.gate(current, copy.deepcopy(current), gate.tolerances_from_config(cfg.gate)))


def test_without_a_manifest_it_reads_every_history(sweep_root, tmp_path):
    from l2sweep.evaluate import evaluate

    root = copy_project(sweep_root, tmp_path / "p")
    (root / "models/sweep.json").unlink()
    runs = evaluate(project_cfg(root))["runs"]
    assert set(runs) == {f"l2-{s}" for s in GRID} | {DIVERGED}


def test_parent_mlflow_run_gets_metrics_artifacts_and_best_tag(sweep_root, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from l2sweep.evaluate import evaluate

    root = copy_project(sweep_root, tmp_path / "p")
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    experiment = client.create_experiment("l2-sweep", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(experiment, run_name="sweep")
    child = client.create_run(experiment, run_name="l2-0.01")
    for run in (parent, child):
        client.set_terminated(run.info.run_id, "FINISHED")
    manifest_path = root / "models/sweep.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["parent_run_id"] = parent.info.run_id
    for r in manifest["runs"]:
        if r["run_name"] == "l2-0.01":
            r["mlflow_run_id"] = child.info.run_id
    manifest_path.write_text(json.dumps(manifest))

    evaluation = evaluate(project_cfg(root, "tracking.enabled=true"))
    logged = client.get_run(parent.info.run_id).data
    for name, run in evaluation["runs"].items():
        if run["status"] == "finished":
            assert logged.metrics[f"test_accuracy/{name}"] == pytest.approx(run["test_accuracy"])
            assert logged.metrics[f"weight_norm/{name}"] == pytest.approx(run["weight_norm"]["total"])
    assert f"test_accuracy/{DIVERGED}" not in logged.metrics
    assert logged.tags["best_lambda"] == report.format_strength(evaluation["best"]["strength"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "evaluation.json", "figures"} <= artifacts
    figures = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert "figures/val_loss.png" in figures
    child_metrics = client.get_run(child.info.run_id).data.metrics
    assert child_metrics["test_accuracy"] == pytest.approx(evaluation["runs"]["l2-0.01"]["test_accuracy"])
    # The child's own figures: its curves and a histogram figure per kernel layer.
    assert [a.path for a in client.list_artifacts(child.info.run_id, "plots")] == ["plots/curves.png"]
    assert {a.path for a in client.list_artifacts(child.info.run_id, "histograms")} == \
        {"histograms/hidden.png", "histograms/output.png"}


@pytest.mark.slow
def test_cli_evaluate_then_gate(sweep_root, tmp_path):
    """``python -m l2sweep.evaluate`` and ``python -m l2sweep.gate`` as users run them."""
    root = copy_project(sweep_root, tmp_path / "p")
    cfg = project_cfg(root)
    overrides = [override(f"paths.{k}", str(v)) for k, v in cfg.paths.items()]
    overrides += ["dataset=idx_dir", override("dataset.path", str(root / "idx")),
                  "tracking.enabled=false"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "L2SWEEP_"))}
    env["L2SWEEP_PARAMS"] = ""  # no params.yaml: conf/ and the overrides
    run = lambda *args: subprocess.run([sys.executable, "-m", *args], cwd=root, env=env,  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    proc = run("l2sweep.evaluate", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lowest mean val_data_loss: λ=" in proc.stdout and "(not decided: one seed per λ)" in proc.stdout
    shutil.copy(root / "reports/evaluation.json", root / "baseline.json")
    proc = run("l2sweep.gate", "--baseline", "baseline.json", *overrides)
    assert proc.returncode == 0 and "gate: PASSED" in proc.stdout, proc.stdout + proc.stderr


def test_evaluate_scores_one_sweep_and_names_damaged_files(sweep_root, tmp_path):
    """An interrupted sweep leaves its first λ's new folder beside the last complete sweep's
    manifest: evaluate refuses the mix (before writing anything), and names a damaged file."""
    from l2sweep.evaluate import EvaluateError, evaluate

    root = copy_project(sweep_root, tmp_path / "p")
    for written in ("reports", "metrics", "plots"):
        shutil.rmtree(root / written, ignore_errors=True)
    models = root / "models"

    def edit(path: Path, **changes) -> None:
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    edit(models / "sweep.json", sweep_id="complete")
    edit(models / "l2-0.0001" / "history.json", sweep_id="complete")
    edit(models / "l2-0.01" / "history.json", sweep_id="interrupted")
    with pytest.raises(EvaluateError, match=r"^l2-0.01 in .*models belong to another sweep than "
                                            r"sweep.json \(sweep complete\): the last sweep did not finish"):
        evaluate(project_cfg(root))
    assert not any((root / written).exists() for written in ("reports", "metrics", "plots"))

    history = (models / "l2-0.01" / "history.json").read_text()
    (models / "l2-0.01" / "history.json").write_text(history[:40])
    with pytest.raises(EvaluateError, match=r"l2-0.01/history.json: not a readable history"):
        evaluate(project_cfg(root))
    (models / "l2-0.01" / "history.json").write_text(history)
    edit(models / "l2-0.01" / "history.json", sweep_id="complete")
    model = models / "l2-0.0001" / "model.keras"
    model.write_bytes(model.read_bytes()[:200])
    with pytest.raises(EvaluateError, match=r"l2-0.0001/model.keras: not a readable Keras model"):
        evaluate(project_cfg(root))
