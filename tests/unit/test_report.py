"""Summary figures and the report text, from hand-made histories (no TensorFlow, fast)."""

from __future__ import annotations

import math

import pytest

from helpers import parse_cell, table_rows
from l2sweep.reporting import dvc_data, report, summaries


def make_history(strength: float, val_loss: list[float], *, acc: float = 0.9, val_acc: float = 0.88,
                 penalty: float = 0.05, data_loss: float = 0.3, diverged_epoch=None) -> dict:
    """A history.json content in the train stage's format (values per epoch)."""
    n = len(val_loss)
    return {
        "run_name": f"l2-{strength}", "regularizer": "l2", "strength": strength, "model": "mlp",
        "status": "FAILED" if diverged_epoch is not None else "FINISHED",
        "diverged_epoch": diverged_epoch, "mlflow_run_id": None, "epochs": list(range(n)),
        "metrics": {
            "loss": [data_loss + penalty] * n, "accuracy": [acc - 0.01 * (n - 1 - i) for i in range(n)],
            "val_loss": val_loss, "val_accuracy": [val_acc] * n,
            "data_loss": [data_loss] * n, "val_data_loss": [v - penalty for v in val_loss],
            "penalty": [penalty] * n,
            "weight_norm/hidden": [3.0] * n, "weight_norm/output": [4.0] * n,
        },
    }


def entry(history: dict, status: str = summaries.FINISHED, **test) -> dict:
    """An evaluation run entry built the way evaluate builds it."""
    e = {"strength": history["strength"], "status": status,
         "diverged_epoch": history["diverged_epoch"], "test_loss": None, "test_accuracy": None}
    e.update(summaries.summarize_history(history))
    e.update(test)
    return e


@pytest.fixture
def evaluation() -> dict:
    """Three λ: a U-shaped val_loss, a monotone one with a dominant penalty, a diverged run."""
    u = make_history(0.0001, [0.50, 0.40, 0.35, 0.38, 0.41], acc=0.95, val_acc=0.90)
    flat = make_history(0.01, [0.60, 0.55, 0.52, 0.50, 0.49], acc=0.86, val_acc=0.88,
                        penalty=0.4, data_loss=0.3)
    bad = make_history(10.0, [2.0, float("nan")], diverged_epoch=1)
    runs = {
        "l2-0.0001": entry(u, test_accuracy=0.871, test_loss=0.361),
        "l2-0.01": entry(flat, test_accuracy=0.865, test_loss=0.372),
        "l2-10.0": entry(bad, status=summaries.DIVERGED),
    }
    return {"sweep": {"regularizer": "l2", "model": "mlp", "dataset": "fashion_mnist",
                      "test_examples": 10000, "config": {"train.epochs": 5}},
            "best": summaries.pick_best(runs), "runs": runs}


def test_summary_finds_the_u_shape():
    s = summaries.summarize_history(make_history(0.001, [0.5, 0.4, 0.35, 0.38, 0.41]))
    assert s["best_epoch"] == 2 and s["val_loss_min"] == 0.35
    assert s["val_loss_rose"] is True and s["val_loss_rise"] == pytest.approx(0.06)
    assert s["epochs"] == 5 and s["val_loss"] == 0.41


def test_summary_monotone_and_derived_values():
    s = summaries.summarize_history(make_history(0.01, [0.6, 0.5, 0.49], acc=0.86, val_acc=0.88,
                                              penalty=0.1, data_loss=0.3))
    assert s["best_epoch"] == 2 and s["val_loss_rose"] is False and s["val_loss_rise"] == 0
    assert s["gap"] == pytest.approx(0.86 - 0.88)  # signed: validation above training
    assert s["penalty_share"] == pytest.approx(0.1 / 0.4)
    assert s["weight_norm"] == {"hidden": 3.0, "output": 4.0, "total": pytest.approx(5.0),
                                "regularized": pytest.approx(3.0)}


def test_summary_of_a_diverged_history_has_no_nan():
    s = summaries.summarize_history(make_history(10.0, [2.0, float("nan")], diverged_epoch=1))
    assert s["val_loss"] is None and s["best_epoch"] == 0 and s["val_loss_rose"] is False
    assert all(not (isinstance(v, float) and math.isnan(v)) for v in s.values())


def test_best_is_lowest_validation_cross_entropy_of_finished_runs(evaluation):
    best = evaluation["best"]
    assert best["by"] == "val_data_loss"
    assert best["run_name"] == "l2-0.01"  # 0.49 - 0.4 = 0.09 < 0.41 - 0.05 = 0.36
    runs = {k: {**v} for k, v in evaluation["runs"].items()}
    for run in runs.values():
        run.pop("val_data_loss")
    assert summaries.pick_best(runs)["by"] == "val_loss"
    assert summaries.pick_best({"x": {**runs["l2-10.0"]}}) is None


def test_observations_quote_the_numbers_of_one_seed(evaluation):
    """One seed per λ (an evaluation written before replicates): the values, and no claim."""
    notes = report.observations(evaluation)
    text = "\n".join(notes)
    assert "λ=10 diverged at epoch 1; it is left out of the comparisons below." in text
    assert ("λ=0.01 has the lowest validation cross-entropy: 0.0900 at the last epoch (0.3600 at "
            "λ=0.0001); with one seed per λ there is no interval, so which λ generalises best "
            "is not decided.") in text
    assert "The highest test accuracy is 87.10%, at λ=0.0001 (one seed per λ: no interval" in text
    assert "the λ picked by validation (0.01) scores 86.50%" in text
    assert ("λ=0.0001: validation cross-entropy is lowest at epoch 2 (0.3000) and 0.0600 higher "
            "at epoch 4 (one seed: no interval, so no turn is claimed).") in text
    assert "λ=0.01: the validation cross-entropy is lowest at the last epoch (4)" in text
    assert "14.3% at λ=0.0001, 57.1% at λ=0.01" in text
    assert ("The generalization gap (final train minus validation accuracy) by λ: +5.00 pt at "
            "λ=0.0001, -2.00 pt at λ=0.01 (one seed per λ: no interval, so no claim is made "
            "about its trend with λ).") in text


def test_observations_do_not_claim_what_one_seed_cannot_show(evaluation):
    text = "\n".join(report.observations(evaluation))
    for claim in ("dominates", "less than half", "generalises best by", "within seed noise",
                  "beyond seed noise (", "beyond seed noise at", "beyond its noise",
                  "turns up", "at every step", "above training accuracy"):
        assert claim not in text, claim
    assert "starting loss (epoch 0's training loss, penalty included) by λ: 0.3500 at λ=0.0001, " \
           "0.7000 at λ=0.01 (one seed per λ: no interval" in text


def test_report_table_equals_the_metrics(evaluation):
    text = report.render_report(evaluation, [("Validation loss", "figures/val_loss.png")])
    rows = table_rows(text)
    assert set(rows) == {"0.0001", "0.01", "10"}
    keys = ["train_accuracy", "val_accuracy", "val_loss", "val_data_loss", "test_accuracy",
            "test_loss", None, "gap", "best_epoch"]
    for name, run in evaluation["runs"].items():
        cells = rows[summaries.format_strength(run["strength"])]
        if run["status"] != summaries.FINISHED:
            assert cells[0].startswith("diverged")
            continue
        for key, cell in zip(keys, cells):
            expected = run["weight_norm"]["regularized"] if key is None else run[key]
            assert parse_cell(cell) == pytest.approx(expected, abs=5e-4), (name, key, cell)
    assert "![Validation loss](figures/val_loss.png)" in text


def test_plot_data_is_long_format_with_every_lambda(evaluation):
    histories = [make_history(0.0001, [0.5, 0.4]), make_history(10.0, [2.0, float("nan")], diverged_epoch=1)]
    files = dvc_data.plot_data(evaluation, histories)
    epochs = files["epochs.json"]["epochs"]
    assert [(r["lambda"], r["epoch"]) for r in epochs] == [("0.0001", 0), ("0.0001", 1), ("10", 0), ("10", 1)]
    assert epochs[-1]["val_loss"] is None and epochs[0]["weight_norm"] == pytest.approx(5.0)
    assert {r["split"] for r in files["accuracy.json"]["accuracy"]} == {"train", "validation"}
    by_lambda = files["by_lambda.json"]["by_lambda"]
    assert [r["lambda"] for r in by_lambda] == ["0.0001", "0.01", "10"]
    assert by_lambda[-1]["test_accuracy"] is None
    assert dvc_data.json_safe({"a": [float("inf"), 1.0]}) == {"a": [None, 1.0]}
