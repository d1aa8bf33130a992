"""The Markdown report of a sweep, from the numbers of :mod:`l2sweep.reporting.summaries`.

Pure functions (:mod:`l2sweep.evaluate` writes the text). Every sentence is computed from the
numbers given by a rule over the seeds of each λ (the functions under "the rules"); nothing
about the outcome is written in advance. A comparison of kinds and a cross-validation add the
sections of :mod:`l2sweep.reporting.report_kinds`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from l2sweep.reporting import report_kinds
from l2sweep.reporting.intervals import comparison, excludes_zero
from l2sweep.reporting.summaries import (DIVERGED, FINISHED, MISSING_CELL, fmt_pct, format_strength,
                                         runs_by_lambda, with_statistics)
from l2sweep.reporting.wording import (REGULARIZER_TITLES, fmt_mean, fmt_value, is_are, lam, lams,
                                       markdown_table, with_interval)

#: A penalty share above this "dominates" the training loss.
DOMINANT_SHARE = 0.5
Evaluation = Mapping[str, Any]  # an evaluation with summaries.summarize's sections

# Every sentence below comes from a rule over the seeds of each λ: a claim ("rises with λ",
# "best", "turns up") is written only when the 95% interval of the paired differences (or of
# the mean) excludes zero. With one seed per λ there is no interval: the rules then quote the
# values and say that no claim is made, rather than claim with a caveat.

def _finished(ev: Evaluation, metric: str) -> list[str]:
    """The λ labels (ascending) with a finished seed and a mean of ``metric``."""
    return [label for label, s in ev["by_lambda"].items()
            if s["n"] and s["metrics"][metric]["mean"] is not None]


def _one_seed(ev: Evaluation, labels: Sequence[str]) -> bool:
    return all(ev["by_lambda"][label]["n"] < 2 for label in labels)


# --- the rules ---------------------------------------------------------------------------


def status_notes(ev: Evaluation) -> list[str]:
    """Which runs diverged or did not finish (naming the seed, and fold, when a λ has several);
    a cross-validation's refit runs are the cross-validation section's."""
    notes = []
    chosen_from = {name: run for name, run in ev["runs"].items() if not run.get("refit")}
    for label, runs in runs_by_lambda(chosen_from).items():
        for _, run in runs:
            if run["status"] == FINISHED:
                continue
            fold = "" if run.get("fold") is None else f" fold {run['fold']}"
            who = lam(label) + (f" seed {run.get('seed')}{fold}" if len(runs) > 1 else "")
            at = run.get("diverged_epoch")
            what = (("diverged" + (f" at epoch {at}" if at is not None else ""))
                    if run["status"] == DIVERGED else f"did not finish (status {run['status']})")
            notes.append(f"{who} {what}; it is left out of the "
                         f"{'means and ' if len(runs) > 1 else ''}comparisons below.")
    return notes


def best_notes(ev: Evaluation) -> list[str]:
    """The λ lowest in mean validation cross-entropy: decided best only when its paired margin
    to every other λ excludes zero; otherwise which λ are indistinguishable from it."""
    best = ev.get("best")
    if not best:
        return []
    metric, label = best["by"], best["lambda"]
    what = "validation cross-entropy" if metric == "val_data_loss" else "validation loss"
    by = ev["by_lambda"]
    if best.get("single"):
        kind = (ev.get("sweep") or {}).get("regularizer")
        config = "none" if kind == "none" else f"{kind} {lam(label)}" if kind else lam(label)
        return [f"The sweep has one configuration ({config}): there is no λ to choose; its "
                f"mean {what} is {fmt_mean(metric, by[label]['metrics'][metric])}."]
    others = [o for o in _finished(ev, metric) if o != label]
    if not others:
        return [f"Only {lam(label)} has a finished seed: there is no other λ to compare it with."]
    if _one_seed(ev, [label, *others]):
        values = ", ".join(f"{fmt_value(metric, by[o]['metrics'][metric]['mean'])} at {lam(o)}"
                           for o in others)
        return [f"{lam(label)} has the lowest {what}: {fmt_value(metric, best['value'])} at the "
                f"last epoch ({values}); with one seed per λ there is no interval, so which λ "
                "generalises best is not decided."]
    margin = lambda o: (f"{lam(o)} minus {lam(label)}: "  # noqa: E731
                        f"{with_interval(metric, best['margins'][o], signed=True)}")
    mean = fmt_mean(metric, by[label]["metrics"][metric])
    if best["decided"]:
        return [f"{lam(label)} generalises best by {what}: mean {mean} (n={best['n']}); its paired "
                f"margin to every other λ excludes zero: {'; '.join(margin(o) for o in others)}."]
    close = [o for o in others if o in best["indistinguishable"]]
    clear = [o for o in others if o not in close]
    text = (f"No λ is decided best by {what} at n={best['n']}: {lam(label)} has the lowest mean "
            f"({mean}), but {lams(close)} {is_are(close)} indistinguishable from it (paired "
            f"margin {'; '.join(margin(o) for o in close)})")
    if clear:
        text += (f"; {lams(clear)} {is_are(clear)} worse beyond seed noise "
                 f"({'; '.join(margin(o) for o in clear)})")
    return [text + "."]


def test_notes(ev: Evaluation) -> list[str]:
    """The λ highest in mean test accuracy, whether the others are within seed noise of it
    (paired by seed), and what the λ picked by validation scores."""
    metric, by = "test_accuracy", ev["by_lambda"]
    tested = _finished(ev, metric)
    if not tested:
        return []
    if len(by) == 1:  # one configuration: nothing to rank
        stat = by[tested[0]]["metrics"][metric]
        return [f"Its mean test accuracy is {fmt_mean(metric, stat)} (n={stat['n']})."]
    top = max(tested, key=lambda label: by[label]["metrics"][metric]["mean"])
    stat = by[top]["metrics"][metric]
    if _one_seed(ev, tested):
        text = (f"The highest test accuracy is {fmt_pct(stat['mean'])}, at {lam(top)} (one seed "
                "per λ: no interval, so no claim that it is higher beyond seed noise)")
    else:
        diffs = {o: comparison(ev["comparisons"], metric, o, top) for o in tested if o != top}
        close = [o for o, d in diffs.items() if excludes_zero(d) != 1]
        text = f"The highest mean test accuracy is {fmt_mean(metric, stat)}, at {lam(top)} (n={stat['n']})"
        diff = lambda o: (f"{lam(top)} minus {lam(o)}: "  # noqa: E731
                          f"{with_interval(metric, diffs[o], signed=True)}")
        if close:
            text += (f"; {lams(close)} {is_are(close)} within seed noise of it (paired difference "
                     f"{'; '.join(diff(o) for o in close)})")
        elif diffs:
            text += (f"; it is above every other λ beyond seed noise (paired difference "
                     f"{'; '.join(diff(o) for o in diffs)})")
    best = ev.get("best")
    if best and best["lambda"] != top and best["lambda"] in tested:
        picked = lam(best["lambda"]) if ev.get("kinds") else best["lambda"]
        text += (f"; the λ picked by validation ({picked}) scores "
                 f"{fmt_mean(metric, by[best['lambda']]['metrics'][metric])}")
    return [text + "."]


def trend_notes(ev: Evaluation, metric: str, subject: str, verbs: tuple[str, str, str],
                up: bool) -> list[str]:
    """Whether ``metric`` moves one way along the λ grid: ``verbs`` (``rises``, ``rise``,
    ``falls``) are said of it, ``up`` the direction claimed. Claimed "at every step" only when
    every adjacent step's paired difference interval excludes zero in that direction; else
    each step is named: the claimed way, the other way, or within seed noise."""
    labels = _finished(ev, metric)
    if len(labels) < 2:
        return []
    by = ev["by_lambda"]
    values = ", ".join(f"{fmt_mean(metric, by[label]['metrics'][metric])} at {lam(label)}"
                       for label in labels)
    if _one_seed(ev, labels):
        return [f"{subject} by λ: {values} (one seed per λ: no interval, so no claim is made "
                "about its trend with λ)."]
    steps = [(a, b, comparison(ev["comparisons"], metric, a, b)) for a, b in zip(labels, labels[1:])]
    sides = [excludes_zero(c) * (1 if up else -1) for _, _, c in steps]
    step = lambda a, b, c: f"{lam(a)} to {lam(b)}: {with_interval(metric, c, signed=True)}"  # noqa: E731
    if all(side == 1 for side in sides):
        return [f"{subject} {verbs[0]} with λ at every step, each beyond seed noise ({values}); "
                f"paired differences {'; '.join(step(a, b, c) for a, b, c in steps)}."]
    parts = []
    for (a, b, c), side in zip(steps, sides):
        diff = with_interval(metric, c, signed=True)
        if side == 1:
            parts.append(f"it {verbs[0]} from {lam(a)} to {lam(b)} ({diff})")
        elif side == -1:
            parts.append(f"it {verbs[2]} from {lam(a)} to {lam(b)} ({diff})")
        else:
            parts.append(f"from {lam(a)} to {lam(b)} the change ({diff}) is within seed noise")
    return [f"{subject} does not {verbs[1]} at every step beyond seed noise ({values}): "
            + "; ".join(parts) + "."]


def gap_side_notes(ev: Evaluation) -> list[str]:
    """On which side of zero the generalization gap lies per λ, where its interval says so."""
    labels = [label for label in _finished(ev, "gap") if ev["by_lambda"][label]["n"] >= 2]
    sides = {label: excludes_zero(ev["by_lambda"][label]["metrics"]["gap"]) for label in labels}
    words = ((1, "Training accuracy is above validation accuracy beyond seed noise at"),
             (-1, "Validation accuracy is above training accuracy beyond seed noise at"),
             (0, "The gap is within seed noise of zero at"))
    parts = [f"{text} {lams([lab for lab in labels if sides[lab] == side])}."
             for side, text in words if any(sides[lab] == side for lab in labels)]
    return [" ".join(parts)] if parts else []


def turn_notes(ev: Evaluation) -> list[str]:
    """Per λ: whether the validation cross-entropy turns up beyond its noise
    (:func:`l2sweep.reporting.summaries.val_ce_turn` defines it)."""
    notes = []
    for label, s in ev["by_lambda"].items():
        turn = s.get("val_ce_turn")
        if not s["n"] or not turn:
            continue
        low, last = turn["min_epoch"], turn["last_epoch"]
        head = f"{lam(label)}: the {'mean ' if s['n'] > 1 else ''}validation cross-entropy"
        if low == last:
            notes.append(f"{head} is lowest at the last epoch ({last}); it does not turn up "
                         f"within {last + 1} epochs.")
        elif turn["turned"] is None:
            notes.append(f"{lam(label)}: validation cross-entropy is lowest at epoch {low} "
                         f"({turn['min']:.4f}) and {turn['rise']['mean']:.4f} higher at epoch "
                         f"{last} (one seed: no interval, so no turn is claimed).")
        elif turn["turned"]:
            notes.append(f"{lam(label)}: validation cross-entropy turns up beyond its noise: its "
                         f"mean is lowest at epoch {low} ({turn['min']:.4f}) and rises by "
                         f"{with_interval('val_data_loss', turn['rise'], signed=True)} by epoch "
                         f"{last}.")
        else:
            notes.append(f"{head} is lowest at epoch {low} ({turn['min']:.4f}), but its rise by "
                         f"epoch {last} ({with_interval('val_data_loss', turn['rise'], True)}) "
                         "is within seed noise: no turn is claimed.")
    return notes


def penalty_notes(ev: Evaluation) -> list[str]:
    """The penalty's share of the final training loss (none without a penalty term), and
    where it is above or below half beyond seed noise."""
    metric = "penalty_share"
    labels = _finished(ev, metric)
    stats = {label: ev["by_lambda"][label]["metrics"][metric] for label in labels}
    if not any(st["mean"] > 0 for st in stats.values()):  # weight decay has no penalty term
        return []
    parts = ", ".join(f"{fmt_mean(metric, st)} at {lam(label)}" for label, st in stats.items())
    text = ("Share of the penalty in the final training loss (penalty / (cross-entropy "
            f"+ penalty)): {parts}.")
    if _one_seed(ev, labels):
        return [text + " One seed per λ: no interval, so no claim about where it is above half."]
    side = {label: (0 if st["low"] is None else 1 if st["low"] > DOMINANT_SHARE
                    else -1 if st["high"] < DOMINANT_SHARE else 0) for label, st in stats.items()}
    for value, words in ((1, "The penalty dominates the loss (more than half, beyond seed noise) at"),
                         (-1, "The penalty is less than half of the loss, beyond seed noise, at"),
                         (0, "The share is within seed noise of half at")):
        chosen = [label for label in labels if side[label] == value]
        if chosen:
            text += f" {words} {lams(chosen)}."
    return [text]


def observations(evaluation: Mapping[str, Any]) -> list[str]:
    """Statements on an evaluation, as Markdown bullet texts (without the ``-``): each from a
    rule above, quoting its numbers and intervals, written only as far as the seeds support it."""
    ev = with_statistics(evaluation)
    # A cross-validation's choice is said in its own section (report_kinds.cv_section).
    notes = status_notes(ev) + ([] if "refit" in ev else best_notes(ev)) + test_notes(ev)
    for view, within in _grids(ev):
        subject = lambda text: within + text if within else text[0].upper() + text[1:]  # noqa: E731
        notes += (trend_notes(view, "initial_loss", subject("the starting loss (epoch 0's "
                              "training loss, penalty included)"), ("rises", "rise", "falls"),
                              up=True)
                  + trend_notes(view, "weight_norm", subject("the final norm of the regularized "
                                "weights"), ("shrinks", "shrink", "grows"), up=False)
                  + trend_notes(view, "gap", subject("the generalization gap (final train minus "
                                "validation accuracy)"), ("narrows", "narrow", "widens"), up=False))
    return notes + gap_side_notes(ev) + turn_notes(ev) + penalty_notes(ev)


def _grids(ev: Evaluation) -> list[tuple[Evaluation, str]]:
    """The λ grids trends are followed along: the sweep's (no prefix), or in a comparison of
    kinds each kind's own (``Within L2's grid, ``), as a view of ``ev`` with its λ alone."""
    if not ev.get("kinds"):
        return [(ev, "")]
    return [({**ev, "by_lambda": {label: s for label, s in ev["by_lambda"].items()
                                  if s.get("kind") == kind}},
             f"Within {report_kinds.KIND_NAMES.get(kind, kind)}'s grid, ")
            for kind in ev["kinds"]["best"]]


# --- the report --------------------------------------------------------------------------

#: The summary table's columns and the ``by_lambda`` metric of each (after ``λ``; ``n`` last).
TABLE_COLUMNS = ("λ", "train acc", "val acc", "val loss", "val cross-entropy", "test acc",
                 "test loss", "weight norm", "gap (train − val)", "best epoch", "starting loss",
                 "n")
TABLE_METRICS = ("train_accuracy", "val_accuracy", "val_loss", "val_data_loss", "test_accuracy",
                 "test_loss", "weight_norm", "gap", "best_epoch", "initial_loss")


def table_row(label: str, stats: Mapping[str, Any], runs: Sequence[Mapping[str, Any]],
              metrics: Sequence[str] = TABLE_METRICS) -> list[str]:
    """The summary-table cells of one λ (see :data:`TABLE_COLUMNS`; ``metrics`` a subset of
    :data:`TABLE_METRICS`): ``stats`` is its ``by_lambda`` entry, ``runs`` its evaluation
    entries (for a λ with no finished seed)."""
    if not stats["n"]:
        at = sorted(r["diverged_epoch"] for r in runs if r.get("diverged_epoch") is not None)
        if stats["diverged"] and len(runs) == 1:
            note = "diverged" + (f" at epoch {at[0]}" if at else "")
        elif stats["diverged"]:
            note = f"diverged ({stats['diverged']} of {len(runs)} seeds)"
        else:
            note = str(runs[0].get("status")) if len(runs) == 1 else f"failed ({len(runs)} seeds)"
        return [label, note] + [MISSING_CELL] * (len(metrics) - 1) + ["0"]
    return ([label] + [fmt_mean(m, stats["metrics"][m]) for m in metrics]
            + [str(stats["n"])])


def _seeds_line(ev: Evaluation) -> str:
    """The overview's bullet on replicates: how many seeds, and what ± and the intervals are."""
    counts = sorted({s["n"] for s in ev["by_lambda"].values() if s["n"]})
    seeds = sorted({seed for s in ev["by_lambda"].values() for seed in s["seeds"] if seed is not None})
    if not counts or counts[-1] < 2:
        seed = seeds[0] if seeds else ev.get("sweep", {}).get("config", {}).get("train.seed", "?")
        return (f"- One seed per λ (seed {seed}): no interval can be computed, so no statement "
                "below claims to hold beyond seed noise.")
    n = str(counts[0]) if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
    if "refit" in ev:
        return (f"- {n} finished (seed, fold) runs per λ ({len(seeds)} seed"
                f"{'s' if len(seeds) != 1 else ''} × {ev['refit']['folds']} folds): values are "
                "means over them ± the half-width of their 95% t-interval; differences between λ "
                "are paired by (seed, fold).")
    return (f"- {n} finished seeds per λ (seeds {', '.join(str(x) for x in seeds)}): values are "
            "means over seeds ± the half-width of their 95% t-interval; differences between λ "
            "are paired by seed.")


def _overview(ev: Evaluation) -> list[str]:
    """The title and the bullets saying what was trained on what."""
    sweep = ev.get("sweep", {})
    regularizer = "compare" if ev.get("kinds") else str(sweep.get("regularizer", "?"))
    grid = ", ".join(ev["by_lambda"])
    config = sweep.get("config", {})
    sizes = sweep.get("split_sizes") or {}
    lines = [
        "# Regularizers compared: report" if regularizer == "compare" else
        f"# {REGULARIZER_TITLES.get(regularizer, regularizer)} regularization sweep: report",
        "",
        "Generated by `python -m l2sweep.evaluate` from the numbers of this run "
        "(`evaluation.json` beside it); do not edit by hand.",
        "",
        f"- Model `{sweep.get('model', '?')}`, " + (
            _kinds_grids(ev) if regularizer == "compare" else
            f"regularizer `{sweep.get('regularizer', '?')}`, λ grid: {grid}"
            + (" (λ is the dropout rate)." if regularizer == "dropout" else ".")),
        f"- Dataset `{sweep.get('dataset', '?')}`: "
        + (f"{sizes['train']} training and {sizes['val']} validation images"
           + (f" (pooled for {sweep['folds']}-fold cross-validation); " if sweep.get("folds") else "; ")
           if sizes.get("train") and sizes.get("val") else "")
        + f"{sweep.get('test_examples', '?')} test images, untouched by training and model "
        "selection.",
    ]
    counts = sorted({e for s in ev["by_lambda"].values() for e in s["epochs"]})
    if counts:
        trained = str(counts[0]) if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
        lines.append(f"- {trained} epochs per run (numbered from 0); batch size "
                     f"{config.get('train.batch_size', '?')}, learning rate "
                     f"{config.get('train.learning_rate', '?')}.")
    return lines + [_seeds_line(ev)]


def _kinds_grids(ev: Evaluation) -> str:
    """The overview's words for a comparison of kinds: each kind with its own grid."""
    grids: dict[str, list[str]] = {}
    for s in ev["by_lambda"].values():
        grids.setdefault(str(s.get("kind")), []).append(format_strength(s["strength"]))
    return ("kinds compared, each over its own grid: " + "; ".join(
        f"`{kind}`" + ("" if kind == "none" else f" λ {', '.join(grid)}"
                       + (" (the dropout rate)" if kind == "dropout" else ""))
        for kind, grid in grids.items()) + ".")


def _per_class(ev: Evaluation) -> list[str]:
    """The mean test accuracy of each class per λ, as a section (none without the numbers)."""
    per_class = [(label, s) for label, s in ev["by_lambda"].items() if s.get("per_class_accuracy")]
    if not per_class:
        return []
    names = list(per_class[0][1]["per_class_accuracy"])
    several = any(s["n"] > 1 for _, s in per_class)
    return ["", "## Test accuracy per class", ""] + (
        ["Means over the finished seeds of each λ.", ""] if several else []) + [
        markdown_table(["class"] + [lam(label) for label, _ in per_class],
                       ([c] + [fmt_pct(s["per_class_accuracy"].get(c)) for _, s in per_class]
                        for c in names))]


def render_report(evaluation: Mapping[str, Any],
                  figures: Sequence[tuple[str, str]] = ()) -> str:
    """The Markdown report of ``evaluation`` (the content of ``evaluation.json``), embedding
    ``figures``: ``(caption, path relative to the report)``."""
    ev = with_statistics(evaluation)
    cv = "refit" in ev  # fold models are not scored on the test split: no test columns
    groups = runs_by_lambda({name: r for name, r in ev["runs"].items() if not r.get("refit")})
    metrics = [m for m in TABLE_METRICS if not (cv and m.startswith("test_"))]
    columns = ["configuration" if ev.get("kinds") else TABLE_COLUMNS[0]] + [
        c for c, m in zip(TABLE_COLUMNS[1:], TABLE_METRICS) if m in metrics] + ["n"]
    rows = (table_row(label, stats, [r for _, r in groups.get(label, [])], metrics)
            for label, stats in ev["by_lambda"].items())
    lines = _overview(ev) + [
        "",
        "## Summary",
        "",
        markdown_table(columns, rows),
        "",
        "Final-epoch values; with several "
        + ("(seed, fold) runs per λ, the mean over its *n* finished ones" if cv else
           "seeds per λ, the mean over its *n* finished seeds") + " ± the "
        "half-width of the 95% t-interval of that mean (in the column's unit: percentage points "
        "for accuracies); with one seed the value alone, as no interval can be computed. "
        "*val loss* is Keras' `val_loss`, which includes the penalty "
        "(λ·Σw² for L2); *val cross-entropy* leaves it out, so it compares across λ. "
        + ("" if cv else "*test loss* is the cross-entropy on the test split. ") +
        "*weight norm* is the final norm of the "
        "regularized kernels (every layer but `output`, combined as sqrt(Σ norm²)); "
        "`evaluation.json` has every layer's. *best epoch* is the epoch of the "
        "lowest `val_loss`; *starting loss* is epoch 0's training loss (penalty included).",
    ]
    lines += report_kinds.kinds_section(ev) + report_kinds.cv_section(ev, best_notes(ev))
    lines += ["", "## Observations", ""]
    lines += [f"- {note}" for note in observations(ev)] or ["- (no finished run)"]
    lines += _per_class(ev)
    if figures:
        lines += ["", "## Figures", ""]
        for caption, path in figures:
            lines += [f"![{caption}]({path})", ""]
    return "\n".join(lines).rstrip() + "\n"
