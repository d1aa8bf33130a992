"""What ``evaluate`` writes for DVC: the metrics file (a few numbers, :func:`dvc_metrics`) and
the plot data (:func:`plot_data`), from the evaluation and its histories; and :func:`json_safe`,
how they (and the evaluation) are written as JSON."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

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


def configurations(evaluation: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per configuration label (:func:`config_label`), kind then strength ascending: its
    statistics over seeds and folds (:func:`summarize`'s ``by_lambda``: a cross-validation's
    refits are not among them), ``kind`` as a string (``""`` where the runs do not say)."""
    return {label: {**s, "kind": str(s.get("kind") or "")}
            for label, s in with_statistics(evaluation)["by_lambda"].items()}


def best_by_kind(evaluation: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """In a comparison of kinds, per kind its best configuration (:func:`summarize`'s
    ``kinds.best``: ``lambda`` label, ``strength``, ``by``, ``value``) with its mean
    ``test_accuracy``; {} for a sweep of one kind."""
    stats = with_statistics(evaluation)
    by_lambda = stats["by_lambda"]
    return {kind: {**best, "test_accuracy":
                   by_lambda[best["lambda"]]["metrics"]["test_accuracy"]["mean"]}
            for kind, best in sorted(((stats.get("kinds") or {}).get("best") or {}).items())
            if best}


def cross_validation(evaluation: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """A cross-validation's outcome (None for a sweep without folds): :func:`summarize`'s
    ``refit`` (``lambda`` label and ``strength`` of the refit, ``runs``, ``run_name``, ``n``) with
    ``folds`` (k), ``chosen`` (the refit's strength: what train chose) and the refits' mean
    ``test_accuracy`` and ``test_loss`` over seeds."""
    refit = with_statistics(evaluation).get("refit")
    if refit is None:
        return None
    return {**refit, "folds": (evaluation.get("sweep") or {}).get("folds") or refit["folds"],
            "chosen": refit["strength"],
            "test_accuracy": refit["metrics"]["test_accuracy"]["mean"],
            "test_loss": refit["metrics"]["test_loss"]["mean"]}


def dvc_metrics(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """The DVC metrics file: numbers only, few enough that ``dvc exp show --only-changed`` of two
    experiments fits a 160-column terminal; accuracies are means over seeds, keys are
    configuration labels (:func:`config_label`: λ, or ``<kind>-<λ>`` in a comparison).

    A sweep: ``best.lambda``, ``best.test_acc`` and ``best.val_ce`` (the mean validation
    cross-entropy that chose it), and ``test_acc.<label>`` per configuration with a finished
    seed; a comparison of kinds adds ``best_by_kind.<kind>.{lambda,val_ce,test_acc}``. A sweep
    of one configuration (``none``) keeps these keys: ``best`` is that configuration, nothing
    chosen (``best.lambda`` its strength, 0 for none). A cross-validation: ``cv.chosen`` (the
    strength refit), ``cv.folds``, ``cv.val_ce`` (its mean over seeds and folds),
    ``refit.test_acc``, ``refit.test_loss`` and ``val_ce.<label>`` per strength (folds are not
    scored on test).
    Everything else (intervals, whether the best is decided) is in the evaluation file."""
    configs = configurations(evaluation)
    ce = {label: c["metrics"]["val_data_loss"]["mean"] for label, c in configs.items() if c["n"]}
    cv = cross_validation(evaluation)
    if cv:
        return {"cv": {"chosen": cv["chosen"], "folds": cv["folds"],
                       "val_ce": ce.get(cv["lambda"])},
                "refit": {"test_acc": cv["test_accuracy"], "test_loss": cv["test_loss"]},
                "val_ce": ce}
    metrics: dict[str, Any] = {}
    best = evaluation.get("best")
    if best:
        metrics["best"] = {
            "lambda": float(best["strength"]),
            "test_acc": (configs[best["lambda"]]["metrics"]["test_accuracy"]["mean"]
                         if best["lambda"] in configs else None),
            _value_key(best["by"]): best["value"]}
    kinds = best_by_kind(evaluation)
    if kinds:
        metrics["best_by_kind"] = {
            kind: {"lambda": float(b["strength"]), _value_key(b["by"]): b["value"],
                   "test_acc": b["test_accuracy"]} for kind, b in kinds.items()}
    metrics["test_acc"] = {label: c["metrics"]["test_accuracy"]["mean"]
                           for label, c in configs.items() if c["n"] > 0}
    return metrics


def _value_key(by: str) -> str:
    return "val_ce" if by == "val_data_loss" else "val_loss"


def plot_data(evaluation: Mapping[str, Any],
              histories: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[dict]]]:
    """The DVC plot files: file name -> ``{name: rows}``, each row with ``lambda`` (the
    configuration label: one line per (kind, strength)), ``kind`` and ``strength`` (number) for
    the templates in ``.dvc/plots/``: per configuration and epoch (``epochs.json``: the mean over
    its seeds and folds, see :func:`curves_by_lambda`), and ``split`` (``accuracy.json``, with the
    95% interval as ``low``/``high``), per configuration (``by_lambda.json``: means over the
    finished seeds, ``n`` of them; see :func:`configurations`; in a cross-validation the test
    score is the chosen λ's refit's, the other λ have none)."""
    epoch_rows, acc_rows, lambda_rows = [], [], []
    for curve in curves_by_lambda(histories, EPOCH_FIELDS + ("weight_norm",)):
        base = {"lambda": curve["lambda"], "kind": curve["kind"], "strength": curve["strength"],
                "n": curve["n"]}
        means = {name: c["mean"] for name, c in curve["metrics"].items()}
        for i, epoch in enumerate(curve["epochs"]):
            epoch_rows.append({**base, "epoch": epoch, **{k: v[i] for k, v in means.items()}})
            for split, key in (("train", "accuracy"), ("validation", "val_accuracy")):
                c = curve["metrics"][key]
                acc_rows.append({**base, "epoch": epoch, "split": split, "accuracy": c["mean"][i],
                                 "low": c["low"][i], "high": c["high"][i]})
    cv = cross_validation(evaluation)
    for label, s in configurations(evaluation).items():
        mean = {name: stat["mean"] for name, stat in s["metrics"].items()}
        if cv is not None and label == cv["lambda"]:  # the folds have no test score; the refit has
            mean.update(test_accuracy=cv["test_accuracy"], test_loss=cv["test_loss"])
        status = FINISHED if s["n"] else DIVERGED if s["diverged"] else FAILED
        lambda_rows.append({
            "lambda": label, "kind": s["kind"], "strength": s["strength"], "status": status,
            "n": s["n"], "test_accuracy": mean["test_accuracy"], "test_loss": mean["test_loss"],
            "val_accuracy": mean["val_accuracy"], "val_data_loss": mean["val_data_loss"],
            "weight_norm": mean["weight_norm_total"], "gap": mean["gap"],
            "penalty_share": mean["penalty_share"], "near_zero_share": mean["near_zero_share"]})
    return {"epochs.json": {"epochs": epoch_rows}, "accuracy.json": {"accuracy": acc_rows},
            "by_lambda.json": {"by_lambda": lambda_rows}}
