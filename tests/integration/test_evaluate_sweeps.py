"""`evaluate` on fabricated comparison and cross-validation sweeps: tiny hand-made Keras models
and histories (no training), so each kind, fold and refit is exactly what the test says."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import make_images, write_idx_dir
from helpers import plots_repo
from test_evaluate import dvc, project_cfg

#: (kind, strength) -> the final validation cross-entropy of seeds 1 and 2.
COMPARED = {("l1", 0.001): (0.45, 0.47), ("l2", 0.001): (0.40, 0.42), ("l2", 0.01): (0.50, 0.52),
            ("none", 0.0): (0.60, 0.61)}
#: strength -> the final validation cross-entropy of folds 0 and 1 (one seed).
FOLDS = {0.001: (0.40, 0.44), 0.01: (0.50, 0.52)}
EPOCHS = 2


def write_model(folder: Path, seed: int, zeroed: float = 0.0) -> None:
    """A tiny MLP as `train` saves it (layers ``hidden`` and ``output``); ``zeroed``: the share
    of the hidden kernel set to 0 (what L1 does)."""
    import keras

    rng = np.random.default_rng(seed)
    inputs = keras.Input(shape=(28, 28), name="image")
    hidden = keras.layers.Dense(8, activation="relu", name="hidden")
    output = keras.layers.Dense(10, activation="softmax", name="output")
    model = keras.Model(inputs, output(hidden(keras.layers.Flatten()(inputs))))
    kernel = rng.normal(0, 0.1, size=(784, 8)).astype("float32")
    kernel[rng.random(kernel.shape) < zeroed] = 0.0
    hidden.set_weights([kernel, np.zeros(8, "float32")])
    output.set_weights([rng.normal(0, 0.3, size=(8, 10)).astype("float32"), np.zeros(10, "float32")])
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "model.keras")


def write_history(folder: Path, name: str, kind: str, strength: float, seed: int, val_ce: float,
                  fold: int | None = None, folds: int | None = None, refit: bool = False) -> None:
    """A history as `train` writes it; a refit's has no validation metrics."""
    metrics = {"loss": [1.0, 0.5], "data_loss": [0.9, 0.45], "penalty": [0.1, 0.05],
               "accuracy": [0.7, 0.8], "weight_norm/hidden": [3.0, 3.5],
               "weight_norm/output": [2.0, 2.2]}
    if not refit:
        metrics.update(val_loss=[val_ce + 0.3, val_ce + 0.05], val_data_loss=[val_ce + 0.2, val_ce],
                       val_accuracy=[0.65, 0.75])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "history.json").write_text(json.dumps({
        "run_name": name, "regularizer": kind, "strength": strength, "seed": seed, "model": "mlp",
        "status": "FINISHED", "diverged_epoch": None, "mlflow_run_id": None, "sweep_id": "s",
        "epochs": list(range(EPOCHS)), "metrics": metrics, "fold": fold, "folds": folds,
        "refit": refit}))


def prepared_root(root: Path) -> Path:
    """Tiny prepared data (train, validation and test splits) under ``root``."""
    from l2sweep.prepare import prepare

    x_train, y_train = make_images(200, seed=0)
    x_test, y_test = make_images(50, seed=1)
    write_idx_dir(root / "idx", {"x_train": x_train, "y_train": y_train, "x_test": x_test,
                                 "y_test": y_test})
    prepare(project_cfg(root))
    return root


@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A comparison of l1, l2 and none, two seeds each, evaluated."""
    from l2sweep.evaluate import evaluate

    root = prepared_root(tmp_path_factory.mktemp("compare"))
    for (kind, strength), losses in COMPARED.items():
        for seed, val_ce in zip((1, 2), losses):
            name = (kind if kind == "none" else f"{kind}-{strength:g}") + f"-s{seed}"
            write_history(root / "models" / name, name, kind, strength, seed, val_ce)
            write_model(root / "models" / name, seed, zeroed=0.9 if kind == "l1" else 0.0)
    return {"root": root, "evaluation": evaluate(project_cfg(root))}


def test_comparison_entries_carry_kind_and_near_zero_share(comparison):
    evaluation = comparison["evaluation"]
    runs = evaluation["runs"]
    assert list(runs) == ["l1-0.001-s1", "l1-0.001-s2", "l2-0.001-s1", "l2-0.001-s2",
                          "l2-0.01-s1", "l2-0.01-s2", "none-s1", "none-s2"]  # kinds grouped
    for name, run in runs.items():
        assert run["regularizer"] == name.split("-")[0] and run["fold"] is None
        assert run["refit"] is False and run["status"] == "finished"
        assert 0.0 <= run["near_zero_share"] <= 1.0 and run["test_accuracy"] is not None
    assert runs["l1-0.001-s1"]["near_zero_share"] > 0.85 > runs["l2-0.001-s1"]["near_zero_share"]
    sweep = evaluation["sweep"]
    assert sweep["regularizer"] == ["l1", "l2", "none"] and sweep["folds"] is None
    assert sweep["grids"] == {"l1": [0.001], "l2": [0.001, 0.01], "none": [0.0]}


def test_comparison_metrics_name_each_kinds_best(comparison):
    evaluation, root = comparison["evaluation"], comparison["root"]
    metrics = json.loads((root / "metrics/eval.json").read_text())
    runs = evaluation["runs"]
    mean = lambda *names: sum(runs[n]["test_accuracy"] for n in names) / len(names)  # noqa: E731
    assert metrics["best"]["lambda"] == 0.001 and metrics["best"]["val_ce"] == pytest.approx(0.41)
    assert metrics["best_by_kind"] == {
        "l1": {"lambda": 0.001, "val_ce": pytest.approx(0.46),
               "test_acc": pytest.approx(mean("l1-0.001-s1", "l1-0.001-s2"))},
        "l2": {"lambda": 0.001, "val_ce": pytest.approx(0.41),
               "test_acc": pytest.approx(mean("l2-0.001-s1", "l2-0.001-s2"))},
        "none": {"lambda": 0.0, "val_ce": pytest.approx(0.605),
                 "test_acc": pytest.approx(mean("none-s1", "none-s2"))}}
    assert set(metrics["test_acc"]) == {"l1-0.001", "l2-0.001", "l2-0.01", "none"}


def test_comparison_plot_rows_have_a_line_per_kind_and_strength(comparison):
    plots = comparison["root"] / "plots"
    epochs = json.loads((plots / "epochs.json").read_text())["epochs"]
    assert [(r["lambda"], r["kind"], r["strength"], r["epoch"], r["n"]) for r in epochs[::EPOCHS]] \
        == [("l1-0.001", "l1", 0.001, 0, 2), ("l2-0.001", "l2", 0.001, 0, 2),
            ("l2-0.01", "l2", 0.01, 0, 2), ("none", "none", 0.0, 0, 2)]
    assert epochs[1]["val_data_loss"] == pytest.approx(0.46)
    rows = json.loads((plots / "by_lambda.json").read_text())["by_lambda"]
    assert [(r["lambda"], r["kind"]) for r in rows] == [
        ("l1-0.001", "l1"), ("l2-0.001", "l2"), ("l2-0.01", "l2"), ("none", "none")]
    assert rows[0]["near_zero_share"] > 0.85 > rows[1]["near_zero_share"]
    accuracy = json.loads((plots / "accuracy.json").read_text())["accuracy"]
    assert {r["lambda"] for r in accuracy} == {r["lambda"] for r in rows}


def test_comparison_figures_and_console_line(comparison):
    from l2sweep.evaluate import summary_line

    figures = comparison["root"] / "reports/figures"
    for name in ("val_loss", "accuracy", "weight_norm_vs_lambda", "test_accuracy_vs_lambda",
                 "near_zero_vs_lambda", "confusion_matrices"):
        assert (figures / f"{name}.png").stat().st_size > 10_000, name
    line = summary_line(comparison["evaluation"])
    assert "each kind's best by mean val_data_loss: l1-0.001 (test " in line
    assert ", l2-0.001 (test " in line and ", none (test " in line
    assert line.endswith("; lowest overall: l2-0.001")


def test_dvc_plots_show_draws_a_line_per_configuration(comparison, tmp_path):
    repo = plots_repo(tmp_path / "repo")
    shutil.copytree(comparison["root"] / "plots", repo / "plots")
    shown = json.loads(dvc(repo, "plots", "show", "--json").stdout)
    assert "errors" not in shown
    content = shown["data"]["test_accuracy_vs_lambda"][0]["content"]
    assert content["encoding"]["color"]["field"] == "kind"
    assert {(r["lambda"], r["kind"]) for r in content["data"]["values"]} == {
        ("l1-0.001", "l1"), ("l2-0.001", "l2"), ("l2-0.01", "l2"), ("none", "none")}
    lines = shown["data"]["val_loss_per_epoch"][0]["content"]["data"]["values"]
    assert {r["lambda"] for r in lines} == {"l1-0.001", "l2-0.001", "l2-0.01", "none"}


def cv_models(root: Path) -> Path:
    """A 2-fold cross-validation of FOLDS (seed 1) and the refit of the chosen λ=0.001; one
    fold keeps a model, which must not be scored either."""
    models = root / "models"
    for strength, losses in FOLDS.items():
        for fold, val_ce in enumerate(losses):
            name = f"l2-{strength:g}-f{fold}"
            write_history(models / name, name, "l2", strength, 1, val_ce, fold=fold, folds=2)
    write_model(models / "l2-0.001-f0", 1)
    write_history(models / "l2-0.001-refit", "l2-0.001-refit", "l2", 0.001, 1, 0.0, folds=2,
                  refit=True)
    write_model(models / "l2-0.001-refit", 1)
    return root


@pytest.fixture(scope="module")
def cross_validated(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from l2sweep.evaluate import evaluate

    root = cv_models(prepared_root(tmp_path_factory.mktemp("cv")))
    return {"root": root, "evaluation": evaluate(project_cfg(root))}


def test_folds_are_not_scored_on_test_and_the_refit_is(cross_validated):
    evaluation = cross_validated["evaluation"]
    runs = evaluation["runs"]
    assert list(runs) == ["l2-0.001-refit", "l2-0.001-f0", "l2-0.001-f1", "l2-0.01-f0",
                          "l2-0.01-f1"]
    for name in ("l2-0.001-f0", "l2-0.001-f1", "l2-0.01-f0", "l2-0.01-f1"):
        run = runs[name]
        assert run["status"] == "finished" and run["fold"] == int(name[-1])
        assert run["test_accuracy"] is None and run["test_loss"] is None
        assert run["near_zero_share"] is None and "confusion_matrix" not in run
    refit = runs["l2-0.001-refit"]
    assert refit["refit"] is True and refit["fold"] is None and refit["val_data_loss"] is None
    assert 0.0 <= refit["test_accuracy"] <= 1.0 and sum(map(sum, refit["confusion_matrix"])) == 50
    assert 0.0 <= refit["near_zero_share"] <= 1.0
    sweep = evaluation["sweep"]
    assert sweep["folds"] == 2 and sweep["regularizer"] == "l2"
    sizes = sweep["split_sizes"]
    assert sweep["pool_examples"] == sizes["train"] + sizes["val"] == 200


def test_cv_metrics_plots_and_figures(cross_validated):
    from l2sweep.evaluate import summary_line

    root, evaluation = cross_validated["root"], cross_validated["evaluation"]
    refit = evaluation["runs"]["l2-0.001-refit"]
    assert json.loads((root / "metrics/eval.json").read_text()) == {
        "cv": {"chosen": 0.001, "folds": 2, "val_ce": pytest.approx(0.42)},
        "refit": {"test_acc": refit["test_accuracy"], "test_loss": refit["test_loss"]},
        "val_ce": {"0.001": pytest.approx(0.42), "0.01": pytest.approx(0.51)}}
    epochs = json.loads((root / "plots/epochs.json").read_text())["epochs"]
    assert [(r["lambda"], r["n"]) for r in epochs[::EPOCHS]] == [("0.001", 2), ("0.01", 2)]
    # the test-accuracy-vs-λ chart: the chosen λ's refit is its one point
    rows = json.loads((root / "plots/by_lambda.json").read_text())["by_lambda"]
    assert [(r["lambda"], r["test_accuracy"]) for r in rows] == [("0.001", refit["test_accuracy"]),
                                                                 ("0.01", None)]
    figures = root / "reports/figures"
    assert not (figures / "near_zero_vs_lambda.png").exists()  # no fold is scored: no values
    for name in ("val_loss", "accuracy", "test_accuracy_vs_lambda", "confusion_matrices"):
        assert (figures / f"{name}.png").is_file(), name
    assert summary_line(evaluation) == (
        "wrote 5 runs; 2-fold cross-validation chose λ=0.001 (lowest mean val_data_loss over "
        f"folds); refit test accuracy {100 * refit['test_accuracy']:.2f}%")


def test_the_refit_is_the_champion(tmp_path, monkeypatch):
    """With tracking on, the parent run's best run is the refit, not a fold's model."""
    from mlflow import MlflowClient

    from l2sweep.evaluate import evaluate

    root = cv_models(prepared_root(tmp_path / "p"))
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    experiment = client.create_experiment("cv", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(experiment, run_name="sweep").info.run_id
    runs = [{"run_name": p.name, "strength": json.loads((p / "history.json").read_text())["strength"],
             "dir": p.name} for p in sorted((root / "models").iterdir())]
    (root / "models/sweep.json").write_text(json.dumps(
        {"sweep_id": "s", "parent_run_id": parent, "regularizer": "l2", "runs": runs}))
    evaluate(project_cfg(root, "tracking.enabled=true"))
    tags = client.get_run(parent).data.tags
    assert tags["best_run_name"] == "l2-0.001-refit" and tags["best_lambda"] == "0.001"
