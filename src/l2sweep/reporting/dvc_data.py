"""What ``evaluate`` writes for DVC: the metrics file (a few numbers, :func:`dvc_metrics`) and
the plot data (:func:`plot_data`), from the evaluation and its histories; and :func:`json_safe`,
how they (and the evaluation) are written as JSON."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from l2sweep.reporting.summaries import (DIVERGED, EPOCH_FIELDS, FAILED, FINISHED, curves_by_lambda,
                                         with_statistics)


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dvc_metrics(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """The DVC metrics file: numbers only, few enough that ``dvc exp show --only-changed`` of two
    experiments fits a 160-column terminal. ``best.lambda``, ``best.test_acc`` and ``best.val_ce``
    (the mean validation cross-entropy that chose it), which every grid shares, and
    ``test_acc.<λ>`` per λ with a finished seed; accuracies are means over seeds. A sweep of one
    configuration (``none``) keeps these keys: ``best`` is that configuration, nothing chosen
    (``best.lambda`` its strength, 0 for none). Everything else (intervals, whether the best λ
    is decided, ``single``) is in the evaluation file."""
    evaluation = with_statistics(evaluation)
    by_lambda = evaluation["by_lambda"]
    metrics: dict[str, Any] = {}
    best = evaluation.get("best")
    if best:
        metrics["best"] = {
            "lambda": float(best["strength"]),
            "test_acc": by_lambda[best["lambda"]]["metrics"]["test_accuracy"]["mean"],
            "val_ce" if best["by"] == "val_data_loss" else "val_loss": best["value"]}
    metrics["test_acc"] = {label: s["metrics"]["test_accuracy"]["mean"]
                           for label, s in by_lambda.items() if s["n"] > 0}
    return metrics


def plot_data(evaluation: Mapping[str, Any],
              histories: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[dict]]]:
    """The DVC plot files: file name -> ``{name: rows}``, each row with ``lambda`` (label) and
    ``strength`` (number) for the templates in ``.dvc/plots/``: per λ and epoch (``epochs.json``,
    one line per λ: the mean over its seeds, see :func:`curves_by_lambda`), and ``split``
    (``accuracy.json``, with the 95% interval as ``low``/``high``), per λ (``by_lambda.json``:
    means over the finished seeds, ``n`` of them)."""
    epoch_rows, acc_rows, lambda_rows = [], [], []
    for curve in curves_by_lambda(histories, EPOCH_FIELDS + ("weight_norm",)):
        base = {"lambda": curve["lambda"], "strength": curve["strength"], "n": curve["n"]}
        means = {name: c["mean"] for name, c in curve["metrics"].items()}
        for i, epoch in enumerate(curve["epochs"]):
            epoch_rows.append({**base, "epoch": epoch, **{k: v[i] for k, v in means.items()}})
            for split, key in (("train", "accuracy"), ("validation", "val_accuracy")):
                c = curve["metrics"][key]
                acc_rows.append({**base, "epoch": epoch, "split": split, "accuracy": c["mean"][i],
                                 "low": c["low"][i], "high": c["high"][i]})
    for label, s in with_statistics(evaluation)["by_lambda"].items():
        mean = {name: stat["mean"] for name, stat in s["metrics"].items()}
        status = FINISHED if s["n"] else DIVERGED if s["diverged"] else FAILED
        lambda_rows.append({
            "lambda": label, "strength": s["strength"], "status": status, "n": s["n"],
            "test_accuracy": mean["test_accuracy"], "test_loss": mean["test_loss"],
            "val_accuracy": mean["val_accuracy"], "val_data_loss": mean["val_data_loss"],
            "weight_norm": mean["weight_norm_total"], "gap": mean["gap"],
            "penalty_share": mean["penalty_share"]})
    return {"epochs.json": {"epochs": epoch_rows}, "accuracy.json": {"accuracy": acc_rows},
            "by_lambda.json": {"by_lambda": lambda_rows}}
