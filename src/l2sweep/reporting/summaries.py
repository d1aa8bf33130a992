"""The numbers of a sweep from its histories: the evaluation's summaries, the DVC metrics and plot
data, the best-λ rule. Epochs count from 0; ``loss`` includes the penalty, ``data_loss`` is the
cross-entropy alone.

Two files hold the numbers: the evaluation (``<paths.reports>/evaluation.json``: every run's
status, summaries, test metrics and the sweep's settings; what the report and the gate read) and
the DVC metrics file (``paths.metrics``: the few numbers ``dvc exp show`` compares, see
:func:`dvc_metrics`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

#: The evaluation's file name, in ``paths.reports``.
EVALUATION_FILE = "evaluation.json"
#: Run status in the evaluation.
FINISHED, DIVERGED, FAILED = "finished", "diverged", "failed"
#: Metrics preferred, in order, to pick the best λ: the validation cross-entropy, else val_loss.
BEST_BY = ("val_data_loss", "val_loss")

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
#: The layer no regularizer acts on (l2sweep.engine.model.regularized_layers).
REGULARIZED_EXCLUDED = "output"
#: Per-epoch metrics copied into ``epochs.json`` (when a history has them).
EPOCH_FIELDS = ("loss", "val_loss", "data_loss", "val_data_loss", "accuracy", "val_accuracy",
                "penalty")


# --- small numeric helpers ---------------------------------------------------------------


def finite(value: Any) -> Optional[float]:
    """``value`` as a float, or None when it is missing, not a number, NaN or infinite."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def series(history: Mapping[str, Any], name: str) -> list[Optional[float]]:
    """One per-epoch metric of a history, non-finite values as None ([] when absent)."""
    return [finite(v) for v in history.get("metrics", {}).get(name, [])]


def last(values: Sequence[Optional[float]]) -> Optional[float]:
    """The value of the last epoch (None when there is none or it is not finite)."""
    return values[-1] if values else None


def format_strength(strength: float) -> str:
    """λ as people write it: ``0.0001``, ``0.001``, ``1e-05``, ``0``."""
    return f"{float(strength):g}"


def class_names(dataset: str, num_classes: int = 10) -> list[str]:
    """Readable class names: Fashion-MNIST's official names, else the digits ``0``..``n-1``."""
    if dataset == "fashion_mnist" and num_classes == len(FASHION_MNIST_CLASSES):
        return list(FASHION_MNIST_CLASSES)
    return [str(i) for i in range(num_classes)]


# --- per-run summary ---------------------------------------------------------------------


def _combined(values: list[Optional[float]]) -> Optional[float]:
    """sqrt(Σ v²), or None when there are none or one is not finite."""
    return (math.sqrt(sum(v * v for v in values))
            if values and all(v is not None for v in values) else None)


def weight_norms(history: Mapping[str, Any]) -> dict[str, Optional[float]]:
    """Final ``weight_norm/<layer>`` values plus their ``total`` and ``regularized`` (no ``output``) norms."""
    metrics = history.get("metrics", {})
    norms = {key.split("/", 1)[1]: last(series(history, key))
             for key in metrics if key.startswith("weight_norm/")}
    regularized = [v for layer, v in norms.items() if layer != REGULARIZED_EXCLUDED]
    return {**norms, "total": _combined(list(norms.values())), "regularized": _combined(regularized)}


def val_loss_turn(epochs: Sequence[int], val_loss: Sequence[Optional[float]]) -> dict[str, Any]:
    """Where ``val_loss`` bottoms out (``best_epoch``, ``val_loss_min``) and whether it rose after
    (``val_loss_rise``: last minus minimum, ``val_loss_rose``); all None when none is finite."""
    points = [(e, v) for e, v in zip(epochs, val_loss) if v is not None]
    if not points:
        return {"best_epoch": None, "val_loss_min": None, "val_loss_rise": None,
                "val_loss_rose": None}
    best_epoch, minimum = min(points, key=lambda p: p[1])  # first epoch on ties
    final = last(val_loss)
    rise = None if final is None else final - minimum
    rose = bool(final is not None and best_epoch != epochs[-1] and final > minimum)
    return {"best_epoch": int(best_epoch), "val_loss_min": minimum, "val_loss_rise": rise,
            "val_loss_rose": rose}


def summarize_history(history: Mapping[str, Any]) -> dict[str, Any]:
    """One run's summary from its ``history.json`` content: final accuracies and losses,
    ``penalty_share``, ``gap``, :func:`val_loss_turn`, :func:`weight_norms`; None where unknown."""
    epochs = [int(e) for e in history.get("epochs", [])]
    train_acc = last(series(history, "accuracy"))
    val_acc = last(series(history, "val_accuracy"))
    data_loss = last(series(history, "data_loss"))
    penalty = last(series(history, "penalty"))
    share = None
    if penalty is not None and data_loss is not None and data_loss + penalty > 0:
        share = penalty / (data_loss + penalty)
    summary: dict[str, Any] = {
        "epochs": len(epochs),
        "train_accuracy": train_acc,
        "val_accuracy": val_acc,
        "train_loss": last(series(history, "loss")),
        "val_loss": last(series(history, "val_loss")),
        "train_data_loss": data_loss,
        "val_data_loss": last(series(history, "val_data_loss")),
        "penalty": penalty,
        "penalty_share": share,
        "gap": None if train_acc is None or val_acc is None else train_acc - val_acc,
    }
    summary.update(val_loss_turn(epochs, series(history, "val_loss")))
    summary["weight_norm"] = weight_norms(history)
    return summary


def pick_best(runs: Mapping[str, Mapping[str, Any]],
              by: Sequence[str] = BEST_BY) -> Optional[dict[str, Any]]:
    """The finished run lowest in the first metric of ``by`` they all have: ``{"run_name", ...}``."""
    finished = {name: run for name, run in runs.items() if run.get("status") == FINISHED}
    for metric in by:
        values = {name: finite(run.get(metric)) for name, run in finished.items()}
        if values and all(v is not None for v in values.values()):
            name = min(values, key=lambda n: values[n])
            return {"run_name": name, "strength": finished[name]["strength"], "by": metric,
                    "value": values[name]}
    return None


# --- formatting --------------------------------------------------------------------------

MISSING_CELL = "–"


def fmt_pct(value: Optional[float]) -> str:
    """0.8512 -> ``85.12%``."""
    return MISSING_CELL if value is None else f"{100 * value:.2f}%"


def fmt_loss(value: Optional[float]) -> str:
    """A loss with 4 decimals."""
    return MISSING_CELL if value is None else f"{value:.4f}"


def fmt_norm(value: Optional[float]) -> str:
    """A weight norm with 3 decimals."""
    return MISSING_CELL if value is None else f"{value:.3f}"


def fmt_points(value: Optional[float]) -> str:
    """A signed accuracy difference in percentage points: 0.0123 -> ``+1.23 pt``."""
    return MISSING_CELL if value is None else f"{100 * value:+.2f} pt"


def runs_by_strength(evaluation: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(run name, entry)`` of an evaluation's runs, sorted by λ."""
    return sorted(evaluation["runs"].items(), key=lambda item: item[1]["strength"])


# --- DVC metrics -------------------------------------------------------------------------


def dvc_metrics(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """The DVC metrics file: numbers only, few enough that ``dvc exp show --only-changed`` of two
    experiments fits a 160-column terminal. ``best.lambda``, ``best.test_acc`` and ``best.val_ce``
    (the validation cross-entropy that chose it), which every grid shares, and ``test_acc.<λ>`` per
    finished λ. Everything else is in the evaluation file."""
    runs = dict(runs_by_strength(evaluation))
    metrics: dict[str, Any] = {}
    best = evaluation.get("best")
    if best:
        metrics["best"] = {"lambda": float(best["strength"]),
                           "test_acc": finite(runs[best["run_name"]].get("test_accuracy")),
                           "val_ce" if best["by"] == "val_data_loss" else "val_loss": best["value"]}
    metrics["test_acc"] = {format_strength(run["strength"]): finite(run.get("test_accuracy"))
                           for run in runs.values() if run.get("status") == FINISHED}
    return metrics


# --- DVC plot data -----------------------------------------------------------------------


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def plot_data(evaluation: Mapping[str, Any],
              histories: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[dict]]]:
    """The DVC plot files: file name -> ``{name: rows}``, each row with ``lambda`` (label) and
    ``strength`` (number) for the templates in ``.dvc/plots/``: per λ and epoch (``epochs.json``),
    and ``split`` (``accuracy.json``), per λ (``by_lambda.json``)."""
    epoch_rows, acc_rows, lambda_rows = [], [], []
    for h in sorted(histories, key=lambda h: float(h["strength"])):
        strength = float(h["strength"])
        base = {"lambda": format_strength(strength), "strength": strength}
        layers = [k for k in h.get("metrics", {}) if k.startswith("weight_norm/")]
        cols = {name: series(h, name) for name in EPOCH_FIELDS + tuple(layers)}
        for i, epoch in enumerate(h.get("epochs", [])):
            row = {**base, "epoch": int(epoch)}
            row.update({name: vals[i] if i < len(vals) else None
                        for name, vals in cols.items() if name in EPOCH_FIELDS})
            norms = [cols[k][i] if i < len(cols[k]) else None for k in layers]
            row["weight_norm"] = _combined(norms)
            epoch_rows.append(row)
            for split, key in (("train", "accuracy"), ("validation", "val_accuracy")):
                vals = cols[key]
                acc_rows.append({**base, "epoch": int(epoch), "split": split,
                                 "accuracy": vals[i] if i < len(vals) else None})
    for _, run in runs_by_strength(evaluation):
        lambda_rows.append({
            "lambda": format_strength(run["strength"]), "strength": float(run["strength"]),
            "status": run["status"], "test_accuracy": finite(run.get("test_accuracy")),
            "test_loss": finite(run.get("test_loss")), "val_accuracy": finite(run.get("val_accuracy")),
            "val_data_loss": finite(run.get("val_data_loss")),
            "weight_norm": finite(run.get("weight_norm", {}).get("total")),
            "gap": finite(run.get("gap")), "penalty_share": finite(run.get("penalty_share"))})
    return {"epochs.json": {"epochs": epoch_rows}, "accuracy.json": {"accuracy": acc_rows},
            "by_lambda.json": {"by_lambda": lambda_rows}}
