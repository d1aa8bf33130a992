"""Summary figures derived from training histories, and the Markdown report rendered from them.

Pure functions only (no files, no TensorFlow): :mod:`l2sweep.evaluate` reads the histories
and the test split, and writes what these functions return. Every sentence the report makes
is computed here from the numbers it is given; nothing about the outcome is written in
advance.

Conventions:
    * Epochs count from 0, as in the histories and in MLflow's steps.
    * ``loss``/``val_loss`` are Keras' losses and include the penalty (λ·Σw²);
      ``data_loss``/``val_data_loss`` are the cross-entropy alone.
    * Accuracies are fractions in [0, 1]; the report shows them as percentages.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional, Sequence

#: Run status in ``metrics/eval.json``.
FINISHED, DIVERGED, FAILED = "finished", "diverged", "failed"
#: Metrics preferred, in order, to pick the λ that generalises best: the validation
#: cross-entropy (comparable across λ), else Keras' val_loss (which includes the penalty).
BEST_BY = ("val_data_loss", "val_loss")
#: A penalty share above this "dominates" the training loss.
DOMINANT_SHARE = 0.5

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


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


#: The layer no regularizer acts on (l2sweep.engine.model.regularized_layers): the output layer.
REGULARIZED_EXCLUDED = "output"


# --- per-run summary ---------------------------------------------------------------------


def _combined(values: list[Optional[float]]) -> Optional[float]:
    """sqrt(Σ v²), or None when there are none or one is not finite."""
    return (math.sqrt(sum(v * v for v in values))
            if values and all(v is not None for v in values) else None)


def weight_norms(history: Mapping[str, Any]) -> dict[str, Optional[float]]:
    """Final ``weight_norm/<layer>`` values, plus ``total`` = sqrt(Σ layer norms²) and
    ``regularized``, the same over the layers the regularizer acts on (all but ``output``).

    A combined value is None when any of its layers' final norm is not finite, or there are none.
    """
    metrics = history.get("metrics", {})
    norms = {key.split("/", 1)[1]: last(series(history, key))
             for key in metrics if key.startswith("weight_norm/")}
    regularized = [v for layer, v in norms.items() if layer != REGULARIZED_EXCLUDED]
    return {**norms, "total": _combined(list(norms.values())), "regularized": _combined(regularized)}


def val_loss_turn(epochs: Sequence[int], val_loss: Sequence[Optional[float]]) -> dict[str, Any]:
    """Where ``val_loss`` bottoms out and whether it rose after (the "U-shape").

    Args:
        epochs: the epoch numbers of the history.
        val_loss: validation loss per epoch (None where not finite).

    Returns:
        ``best_epoch`` (epoch of the minimum), ``val_loss_min``, ``val_loss_rise``
        (last value minus the minimum, >= 0) and ``val_loss_rose`` (the minimum is before the
        last epoch and the last value is above it). All None when there is no finite value.
    """
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
    """The summary figures of one run, from its ``history.json`` content.

    Args:
        history: a parsed ``history.json`` (``epochs`` and ``metrics``, one value per epoch).

    Returns:
        ``epochs`` (how many were recorded), final ``train_accuracy``, ``val_accuracy``,
        ``train_loss``, ``val_loss``, ``train_data_loss``, ``val_data_loss``, ``penalty``,
        ``penalty_share`` (penalty / (data_loss + penalty) at the last epoch), ``gap`` (train
        minus validation accuracy, signed), the :func:`val_loss_turn` fields and
        ``weight_norm`` (:func:`weight_norms`). Values that cannot be computed are None.
    """
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
    """The finished run with the lowest final validation loss.

    Args:
        runs: run name -> eval entry (``status``, ``strength`` and the summary figures).
        by: metric names tried in order; the first that every finished run has is used.

    Returns:
        ``{"run_name", "strength", "by", "value"}``, or None when no finished run has one.
    """
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


# --- observations ------------------------------------------------------------------------


def _ordered(evaluation: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Runs sorted by λ."""
    return sorted(evaluation["runs"].items(), key=lambda item: item[1]["strength"])


def _lam(run: Mapping[str, Any]) -> str:
    return f"λ={format_strength(run['strength'])}"


def observations(evaluation: Mapping[str, Any]) -> list[str]:
    """Short statements derived from the numbers of ``evaluation`` (an eval.json content).

    Each statement quotes the values it rests on; a statement is only made when the numbers
    support it (for example "falls as λ grows" only when every step down the grid falls).

    Args:
        evaluation: the content of ``metrics/eval.json``.

    Returns:
        Markdown bullet texts (without the leading ``-``).
    """
    runs = _ordered(evaluation)
    finished = [(n, r) for n, r in runs if r["status"] == FINISHED]
    notes: list[str] = []

    for name, run in runs:
        if run["status"] == DIVERGED:
            at = run.get("diverged_epoch")
            notes.append(f"{_lam(run)} diverged" + (f" at epoch {at}" if at is not None else "")
                         + "; it is left out of the comparisons below.")
        elif run["status"] != FINISHED:
            notes.append(f"{_lam(run)} did not finish (status {run['status']}); "
                         "it is left out of the comparisons below.")

    best = evaluation.get("best")
    if best:
        what = ("validation cross-entropy" if best["by"] == "val_data_loss"
                else "validation loss")
        text = (f"λ={format_strength(best['strength'])} generalises best by {what}: "
                f"{best['value']:.4f} at the last epoch")
        others = [f"{_lam(r)}: {finite(r.get(best['by'])):.4f}" for n, r in finished
                  if n != best["run_name"] and finite(r.get(best["by"])) is not None]
        notes.append(text + (f" ({', '.join(others)})." if others else "."))

    tested = [(n, r) for n, r in finished if finite(r.get("test_accuracy")) is not None]
    if tested:
        top_value = max(r["test_accuracy"] for _, r in tested)
        top = [(n, r) for n, r in tested if r["test_accuracy"] == top_value]
        text = (f"The highest test accuracy is {fmt_pct(top_value)}, at "
                + ", ".join(_lam(r) for _, r in top))
        if best and best["run_name"] not in {n for n, _ in top}:
            text += (f"; the λ picked by validation ({format_strength(best['strength'])}) "
                     f"scores {fmt_pct(evaluation['runs'][best['run_name']]['test_accuracy'])}")
        notes.append(text + ".")

    shares = [(n, r) for n, r in finished if finite(r.get("penalty_share")) is not None]
    if any(r["penalty_share"] > 0 for _, r in shares):  # no penalty term (weight decay): no note
        parts = [f"{100 * r['penalty_share']:.1f}% at {_lam(r)}" for _, r in shares]
        dominant = [_lam(r) for _, r in shares if r["penalty_share"] > DOMINANT_SHARE]
        text = ("Share of the penalty in the final training loss (penalty / (cross-entropy "
                f"+ penalty)): {', '.join(parts)}. ")
        text += (f"The penalty dominates the loss (more than half) at {', '.join(dominant)}."
                 if dominant else "The penalty is less than half of the loss at every λ.")
        notes.append(text)

    for _, run in finished:
        if run.get("best_epoch") is None:
            continue
        last_epoch = run["epochs"] - 1
        if run.get("val_loss_rose"):
            notes.append(f"{_lam(run)}: val_loss reaches its minimum "
                         f"({run['val_loss_min']:.4f}) at epoch {run['best_epoch']} and rises by "
                         f"{run['val_loss_rise']:.4f} by epoch {last_epoch} (a U-shape).")
        else:
            notes.append(f"{_lam(run)}: val_loss is lowest at the last epoch "
                         f"({run['best_epoch']}); it did not turn up within "
                         f"{run['epochs']} epochs.")

    gaps = [(n, r) for n, r in finished if finite(r.get("gap")) is not None]
    if gaps:
        parts = [f"{fmt_points(r['gap'])} at {_lam(r)}" for _, r in gaps]
        above = [_lam(r) for _, r in gaps if r["gap"] > 0]
        below = [_lam(r) for _, r in gaps if r["gap"] < 0]
        text = f"Generalization gap (final train minus validation accuracy): {', '.join(parts)}."
        if above:
            text += f" Training accuracy is above validation accuracy at {', '.join(above)}."
        if below:
            text += f" Validation accuracy is above training accuracy at {', '.join(below)}."
        level = [_lam(r) for _, r in gaps if r["gap"] == 0]
        if level:
            text += f" They are equal at {', '.join(level)}."
        notes.append(text)

    norms = [(n, finite(r.get("weight_norm", {}).get("regularized"))) for n, r in finished]
    norms = [(n, v) for n, v in norms if v is not None]
    if len(norms) >= 2:
        values = [v for _, v in norms]
        lams = [_lam(evaluation["runs"][n]) for n, _ in norms]
        span = f"{values[0]:.3f} at {lams[0]} to {values[-1]:.3f} at {lams[-1]}"
        if all(b < a for a, b in zip(values, values[1:])):
            notes.append(f"The final norm of the regularized weights falls at every step up the λ grid: {span}.")
        elif all(b > a for a, b in zip(values, values[1:])):
            notes.append(f"The final norm of the regularized weights rises at every step up the λ grid: {span}.")
        else:
            notes.append("The final norm of the regularized weights is not monotonic in λ: "
                         + ", ".join(f"{v:.3f} at {lam}" for lam, v in zip(lams, values)) + ".")
    return notes


# --- the report --------------------------------------------------------------------------

REGULARIZER_TITLES = {"l2": "L2", "l1": "L1", "l1_l2": "L1+L2", "weight_decay": "Weight-decay",
                      "none": "Unregularized"}
TABLE_COLUMNS = ("λ", "train acc", "val acc", "val loss", "val cross-entropy", "test acc",
                 "test loss", "weight norm", "gap (train − val)", "best epoch")


def table_row(run: Mapping[str, Any]) -> list[str]:
    """The summary-table cells of one run (see :data:`TABLE_COLUMNS`)."""
    lam = format_strength(run["strength"])
    if run["status"] == DIVERGED:
        at = run.get("diverged_epoch")
        note = "diverged" + (f" at epoch {at}" if at is not None else "")
        return [lam, note] + [MISSING_CELL] * (len(TABLE_COLUMNS) - 2)
    if run["status"] != FINISHED:
        return [lam, run["status"]] + [MISSING_CELL] * (len(TABLE_COLUMNS) - 2)
    best_epoch = run.get("best_epoch")
    return [
        lam,
        fmt_pct(run.get("train_accuracy")),
        fmt_pct(run.get("val_accuracy")),
        fmt_loss(run.get("val_loss")),
        fmt_loss(run.get("val_data_loss")),
        fmt_pct(run.get("test_accuracy")),
        fmt_loss(run.get("test_loss")),
        fmt_norm(run.get("weight_norm", {}).get("regularized")),
        fmt_points(run.get("gap")),
        MISSING_CELL if best_epoch is None else str(best_epoch),
    ]


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_report(evaluation: Mapping[str, Any],
                  figures: Sequence[tuple[str, str]] = ()) -> str:
    """The Markdown report of one sweep.

    Args:
        evaluation: the content of ``metrics/eval.json``.
        figures: ``(caption, path relative to the report)`` of each figure to embed.

    Returns:
        The report's text.
    """
    sweep = evaluation.get("sweep", {})
    regularizer = str(sweep.get("regularizer", "?"))
    runs = _ordered(evaluation)
    grid = ", ".join(format_strength(r["strength"]) for _, r in runs)
    config = sweep.get("config", {})
    sizes = sweep.get("split_sizes") or {}
    lines = [
        f"# {REGULARIZER_TITLES.get(regularizer, regularizer)} regularization sweep: report",
        "",
        "Generated by `python -m l2sweep.evaluate` from the numbers of this run "
        "(`metrics/eval.json`); do not edit by hand.",
        "",
        f"- Model `{sweep.get('model', '?')}`, regularizer `{sweep.get('regularizer', '?')}`, "
        f"λ grid: {grid}.",
        f"- Dataset `{sweep.get('dataset', '?')}`: "
        + (f"{sizes['train']} training and {sizes['val']} validation images; "
           if sizes.get("train") and sizes.get("val") else "")
        + f"{sweep.get('test_examples', '?')} test images, untouched by training and model "
        "selection.",
    ]
    counts = sorted({r["epochs"] for _, r in runs if r["status"] == FINISHED})
    if counts:
        trained = str(counts[0]) if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
        lines.append(f"- {trained} epochs per λ (numbered from 0); batch size "
                     f"{config.get('train.batch_size', '?')}, learning rate "
                     f"{config.get('train.learning_rate', '?')}, seed {config.get('train.seed', '?')}.")
    lines += [
        "",
        "## Summary",
        "",
        markdown_table(TABLE_COLUMNS, (table_row(r) for _, r in runs)),
        "",
        "Final-epoch values. *val loss* is Keras' `val_loss`, which includes the penalty "
        "(λ·Σw² for L2); *val cross-entropy* leaves it out, so it compares across λ. *test "
        "loss* is the cross-entropy on the test split. *weight norm* is the final norm of the "
        "regularized kernels (every layer but `output`, combined as sqrt(Σ norm²)); "
        "`metrics/eval.json` has every layer's. *best epoch* is the epoch of the "
        "lowest `val_loss`.",
        "",
        "## Observations",
        "",
    ]
    lines += [f"- {note}" for note in observations(evaluation)] or ["- (no finished run)"]
    per_class = [(n, r) for n, r in runs if r.get("per_class_accuracy")]
    if per_class:
        names = list(per_class[0][1]["per_class_accuracy"])
        lines += ["", "## Test accuracy per class", "",
                  markdown_table(["class"] + [f"λ={format_strength(r['strength'])}"
                                              for _, r in per_class],
                                 ([c] + [fmt_pct(r["per_class_accuracy"].get(c))
                                         for _, r in per_class] for c in names))]
    if figures:
        lines += ["", "## Figures", ""]
        for caption, path in figures:
            lines += [f"![{caption}]({path})", ""]
    return "\n".join(lines).rstrip() + "\n"


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


#: Per-epoch metrics copied into ``epochs.json`` (when a history has them).
EPOCH_FIELDS = ("loss", "val_loss", "data_loss", "val_data_loss", "accuracy", "val_accuracy",
                "penalty")


def plot_data(evaluation: Mapping[str, Any],
              histories: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[dict]]]:
    """The DVC plot files: file name -> ``{name: rows}`` (long format, one row per point).

    Every row carries ``lambda`` (the label, e.g. ``"0.001"``) and ``strength`` (the number),
    which the templates in ``.dvc/plots/`` colour and sort by, so one chart holds every λ of
    whatever grid was run.

    * ``epochs.json``: per λ and epoch, :data:`EPOCH_FIELDS` and ``weight_norm`` (all layers).
    * ``accuracy.json``: per λ, epoch and ``split`` (``train``/``validation``), ``accuracy``.
    * ``by_lambda.json``: per λ, the final and test figures (``test_accuracy``,
      ``test_loss``, ``val_accuracy``, ``val_data_loss``, ``weight_norm``, ``gap``...).
    """
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
            row["weight_norm"] = (math.sqrt(sum(v * v for v in norms))
                                  if norms and all(v is not None for v in norms) else None)
            epoch_rows.append(row)
            for split, key in (("train", "accuracy"), ("validation", "val_accuracy")):
                vals = cols[key]
                acc_rows.append({**base, "epoch": int(epoch), "split": split,
                                 "accuracy": vals[i] if i < len(vals) else None})
    for _, run in _ordered(evaluation):
        lambda_rows.append({
            "lambda": format_strength(run["strength"]), "strength": float(run["strength"]),
            "status": run["status"], "test_accuracy": finite(run.get("test_accuracy")),
            "test_loss": finite(run.get("test_loss")), "val_accuracy": finite(run.get("val_accuracy")),
            "val_data_loss": finite(run.get("val_data_loss")),
            "weight_norm": finite(run.get("weight_norm", {}).get("total")),
            "gap": finite(run.get("gap")), "penalty_share": finite(run.get("penalty_share"))})
    return {"epochs.json": {"epochs": epoch_rows}, "accuracy.json": {"accuracy": acc_rows},
            "by_lambda.json": {"by_lambda": lambda_rows}}
