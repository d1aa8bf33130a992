"""The Markdown report of a sweep, from the numbers of :mod:`l2sweep.reporting.summaries`.

Pure functions (:mod:`l2sweep.evaluate` writes the text). Every sentence is computed from the
numbers given; nothing about the outcome is written in advance.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Sequence

from l2sweep.reporting.summaries import (DIVERGED, FINISHED, MISSING_CELL, finite, fmt_loss, fmt_norm,
                                         fmt_pct, fmt_points, format_strength, runs_by_strength)

#: A penalty share above this "dominates" the training loss.
DOMINANT_SHARE = 0.5
Runs = Sequence[tuple[str, Mapping[str, Any]]]


# --- observations ------------------------------------------------------------------------


def _lam(run: Mapping[str, Any]) -> str:
    return f"λ={format_strength(run['strength'])}"


def _diverged(run: Mapping[str, Any]) -> str:
    at = run.get("diverged_epoch")
    return "diverged" + (f" at epoch {at}" if at is not None else "")


def _status_notes(runs: Runs) -> list[str]:
    """Which runs diverged or did not finish."""
    notes = []
    for _, run in runs:
        if run["status"] != FINISHED:
            what = (_diverged(run) if run["status"] == DIVERGED
                    else f"did not finish (status {run['status']})")
            notes.append(f"{_lam(run)} {what}; it is left out of the comparisons below.")
    return notes


def _best_notes(best: Optional[Mapping[str, Any]], finished: Runs) -> list[str]:
    """The λ picked by validation, against the others."""
    if not best:
        return []
    what = "validation cross-entropy" if best["by"] == "val_data_loss" else "validation loss"
    text = (f"λ={format_strength(best['strength'])} generalises best by {what}: "
            f"{best['value']:.4f} at the last epoch")
    others = [f"{_lam(r)}: {finite(r.get(best['by'])):.4f}" for n, r in finished
              if n != best["run_name"] and finite(r.get(best["by"])) is not None]
    return [text + (f" ({', '.join(others)})." if others else ".")]


def _test_notes(evaluation: Mapping[str, Any], finished: Runs) -> list[str]:
    """The highest test accuracy, and what the λ picked by validation scores."""
    tested = [(n, r) for n, r in finished if finite(r.get("test_accuracy")) is not None]
    if not tested:
        return []
    top_value = max(r["test_accuracy"] for _, r in tested)
    top = [(n, r) for n, r in tested if r["test_accuracy"] == top_value]
    text = f"The highest test accuracy is {fmt_pct(top_value)}, at " + ", ".join(_lam(r) for _, r in top)
    best = evaluation.get("best")
    if best and best["run_name"] not in {n for n, _ in top}:
        text += (f"; the λ picked by validation ({format_strength(best['strength'])}) "
                 f"scores {fmt_pct(evaluation['runs'][best['run_name']]['test_accuracy'])}")
    return [text + "."]


def _penalty_notes(finished: Runs) -> list[str]:
    """The penalty's share of the final training loss (none without a penalty term)."""
    shares = [(n, r) for n, r in finished if finite(r.get("penalty_share")) is not None]
    if not any(r["penalty_share"] > 0 for _, r in shares):  # weight decay has no penalty term
        return []
    parts = [f"{100 * r['penalty_share']:.1f}% at {_lam(r)}" for _, r in shares]
    dominant = [_lam(r) for _, r in shares if r["penalty_share"] > DOMINANT_SHARE]
    text = ("Share of the penalty in the final training loss (penalty / (cross-entropy "
            f"+ penalty)): {', '.join(parts)}. ")
    return [text + (f"The penalty dominates the loss (more than half) at {', '.join(dominant)}."
                    if dominant else "The penalty is less than half of the loss at every λ.")]


def _turn_notes(finished: Runs) -> list[str]:
    """Per run: whether val_loss turned up after its minimum (a U-shape)."""
    notes = []
    for _, run in finished:
        if run.get("best_epoch") is None:
            continue
        if run.get("val_loss_rose"):
            notes.append(f"{_lam(run)}: val_loss reaches its minimum "
                         f"({run['val_loss_min']:.4f}) at epoch {run['best_epoch']} and rises by "
                         f"{run['val_loss_rise']:.4f} by epoch {run['epochs'] - 1} (a U-shape).")
        else:
            notes.append(f"{_lam(run)}: val_loss is lowest at the last epoch "
                         f"({run['best_epoch']}); it did not turn up within "
                         f"{run['epochs']} epochs.")
    return notes


def _gap_notes(finished: Runs) -> list[str]:
    """Final train minus validation accuracy per λ, and on which side each falls."""
    gaps = [(n, r) for n, r in finished if finite(r.get("gap")) is not None]
    if not gaps:
        return []
    parts = [f"{fmt_points(r['gap'])} at {_lam(r)}" for _, r in gaps]
    text = f"Generalization gap (final train minus validation accuracy): {', '.join(parts)}."
    sides = (("Training accuracy is above validation accuracy at", lambda g: g > 0),
             ("Validation accuracy is above training accuracy at", lambda g: g < 0),
             ("They are equal at", lambda g: g == 0))
    for words, side in sides:
        lams = [_lam(r) for _, r in gaps if side(r["gap"])]
        if lams:
            text += f" {words} {', '.join(lams)}."
    return [text]


def _norm_notes(evaluation: Mapping[str, Any], finished: Runs) -> list[str]:
    """How the final norm of the regularized weights moves along the λ grid."""
    norms = [(n, finite(r.get("weight_norm", {}).get("regularized"))) for n, r in finished]
    norms = [(n, v) for n, v in norms if v is not None]
    if len(norms) < 2:
        return []
    values = [v for _, v in norms]
    lams = [_lam(evaluation["runs"][n]) for n, _ in norms]
    span = f"{values[0]:.3f} at {lams[0]} to {values[-1]:.3f} at {lams[-1]}"
    subject = "The final norm of the regularized weights"
    if all(b < a for a, b in zip(values, values[1:])):
        return [f"{subject} falls at every step up the λ grid: {span}."]
    if all(b > a for a, b in zip(values, values[1:])):
        return [f"{subject} rises at every step up the λ grid: {span}."]
    return [f"{subject} is not monotonic in λ: "
            + ", ".join(f"{v:.3f} at {lam}" for lam, v in zip(lams, values)) + "."]


def observations(evaluation: Mapping[str, Any]) -> list[str]:
    """Statements on an evaluation, as Markdown bullet texts (without the ``-``). Each
    quotes its numbers and is made only when they support it ("falls" only if every step falls)."""
    runs = runs_by_strength(evaluation)
    finished = [(n, r) for n, r in runs if r["status"] == FINISHED]
    return (_status_notes(runs) + _best_notes(evaluation.get("best"), finished)
            + _test_notes(evaluation, finished) + _penalty_notes(finished) + _turn_notes(finished)
            + _gap_notes(finished) + _norm_notes(evaluation, finished))


# --- the report --------------------------------------------------------------------------

REGULARIZER_TITLES = {"l2": "L2", "l1": "L1", "l1_l2": "L1+L2", "weight_decay": "Weight-decay",
                      "none": "Unregularized"}
TABLE_COLUMNS = ("λ", "train acc", "val acc", "val loss", "val cross-entropy", "test acc",
                 "test loss", "weight norm", "gap (train − val)", "best epoch")


def table_row(run: Mapping[str, Any]) -> list[str]:
    """The summary-table cells of one run (see :data:`TABLE_COLUMNS`)."""
    lam = format_strength(run["strength"])
    if run["status"] != FINISHED:
        note = _diverged(run) if run["status"] == DIVERGED else run["status"]
        return [lam, note] + [MISSING_CELL] * (len(TABLE_COLUMNS) - 2)
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


def _overview(evaluation: Mapping[str, Any], runs: Runs) -> list[str]:
    """The title and the bullets saying what was trained on what."""
    sweep = evaluation.get("sweep", {})
    regularizer = str(sweep.get("regularizer", "?"))
    grid = ", ".join(format_strength(r["strength"]) for _, r in runs)
    config = sweep.get("config", {})
    sizes = sweep.get("split_sizes") or {}
    lines = [
        f"# {REGULARIZER_TITLES.get(regularizer, regularizer)} regularization sweep: report",
        "",
        "Generated by `python -m l2sweep.evaluate` from the numbers of this run "
        "(`evaluation.json` beside it); do not edit by hand.",
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
    return lines


def _per_class(runs: Runs) -> list[str]:
    """The test accuracy of each class per λ, as a section (none without the numbers)."""
    per_class = [r for _, r in runs if r.get("per_class_accuracy")]
    if not per_class:
        return []
    names = list(per_class[0]["per_class_accuracy"])
    return ["", "## Test accuracy per class", "",
            markdown_table(["class"] + [_lam(r) for r in per_class],
                           ([c] + [fmt_pct(r["per_class_accuracy"].get(c)) for r in per_class]
                            for c in names))]


def render_report(evaluation: Mapping[str, Any],
                  figures: Sequence[tuple[str, str]] = ()) -> str:
    """The Markdown report of ``evaluation`` (the content of ``evaluation.json``), embedding
    ``figures``: ``(caption, path relative to the report)``."""
    runs = runs_by_strength(evaluation)
    lines = _overview(evaluation, runs) + [
        "",
        "## Summary",
        "",
        markdown_table(TABLE_COLUMNS, (table_row(r) for _, r in runs)),
        "",
        "Final-epoch values. *val loss* is Keras' `val_loss`, which includes the penalty "
        "(λ·Σw² for L2); *val cross-entropy* leaves it out, so it compares across λ. *test "
        "loss* is the cross-entropy on the test split. *weight norm* is the final norm of the "
        "regularized kernels (every layer but `output`, combined as sqrt(Σ norm²)); "
        "`evaluation.json` has every layer's. *best epoch* is the epoch of the "
        "lowest `val_loss`.",
        "",
        "## Observations",
        "",
    ]
    lines += [f"- {note}" for note in observations(evaluation)] or ["- (no finished run)"]
    lines += _per_class(runs)
    if figures:
        lines += ["", "## Figures", ""]
        for caption, path in figures:
            lines += [f"![{caption}]({path})", ""]
    return "\n".join(lines).rstrip() + "\n"
