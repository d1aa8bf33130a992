"""The numbers of a sweep from its histories: the evaluation's summaries, the statistics over
replicates (:func:`summarize`: per λ means and 95% t-intervals, differences between λ paired by
seed (and fold), the best λ and whether it is decided; kinds compared at their best strengths;
a cross-validation's refit), the DVC metrics and plot data. Epochs count from
0; ``loss`` includes the penalty, ``data_loss`` is the cross-entropy alone.

Two files hold the numbers: the evaluation (``<paths.reports>/evaluation.json``: every run's
status, summaries, test metrics and the sweep's settings; what the report and the gate read) and
the DVC metrics file (``paths.metrics``: the few numbers ``dvc exp show`` compares, see
:func:`l2sweep.reporting.dvc_data.dvc_metrics`).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional, Sequence

from l2sweep.reporting.intervals import (comparison, finite, mean_ci, paired, replicate,
                                         val_ce_turn)

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
    ``penalty_share``, ``gap``, :func:`val_loss_turn`, :func:`weight_norms`, ``initial_loss``
    (epoch 0's training loss) and ``val_ce_per_epoch`` (the validation cross-entropy curve);
    None where unknown."""
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
    loss = series(history, "loss")
    summary["initial_loss"] = loss[0] if loss else None  # epoch 0, penalty included
    # The whole curve: where val cross-entropy turns up is judged on the mean over seeds.
    summary["val_ce_per_epoch"] = series(history, "val_data_loss")
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


# --- statistics over replicates ----------------------------------------------------------
# A sweep trains every λ once per seed (per seed and fold in a cross-validation: a replicate).
# Per λ: the mean and a 95% t-interval over the finished replicates of each summary metric;
# between λ: differences paired by replicate (l2sweep.reporting.intervals).

#: A weight counts as near zero when ``|w| < NEAR_ZERO``; ``near_zero_share`` is the share of the
#: regularized kernels' weights below it. Adam moves a weight by about the learning rate per
#: step (1e-3 here) whatever its gradient's size, so an L1-penalized weight whose optimum is 0
#: oscillates within about 1e-3 of it and is never exactly 0: below 1e-3 is what "driven to
#: zero" can mean under Adam. The baseline: a Glorot-uniform start (784 x 128: limit 0.081)
#: puts about 1e-3 / 0.081 = 1.2% of a layer's weights there by chance.
NEAR_ZERO = 1e-3

#: Metrics summarized per λ; ``weight_norm`` is the regularized norm (every layer but
#: ``output``), ``weight_norm_total`` every layer's; ``initial_loss`` is epoch 0's ``loss``.
STAT_METRICS = ("test_accuracy", "test_loss", "val_accuracy", "val_data_loss", "val_loss",
                "train_accuracy", "gap", "weight_norm", "weight_norm_total", "penalty_share",
                "initial_loss", "best_epoch", "near_zero_share")
#: Metrics compared between every two λ, paired by seed: those the report's rules use.
COMPARED_METRICS = ("val_data_loss", "val_loss", "test_accuracy", "initial_loss", "weight_norm",
                    "gap")
#: Metrics compared between kinds at their best strengths (:func:`compare_kinds`).
KIND_METRICS = ("val_data_loss", "val_loss", "test_accuracy", "gap", "weight_norm",
                "near_zero_share")
#: A cross-validation's refit metrics (the only ones scored on the test split).
REFIT_METRICS = ("test_accuracy", "test_loss")


def metric_value(entry: Mapping[str, Any], name: str) -> Optional[float]:
    """One of :data:`STAT_METRICS` of an evaluation entry (None where unknown)."""
    if name in ("weight_norm", "weight_norm_total"):
        return finite((entry.get("weight_norm") or {}).get(
            "regularized" if name == "weight_norm" else "total"))
    return finite(entry.get(name))


def kinds_of(entries: Iterable[Mapping[str, Any]]) -> list[str]:
    """The regularizer kinds of a sweep's entries (or histories), sorted; [] when none says."""
    return sorted({str(e["regularizer"]) for e in entries if e.get("regularizer")})


def config_label(entry: Mapping[str, Any], compared: bool) -> str:
    """The label of an entry's (or history's) configuration, the key of every per-λ table, plot
    line and DVC metric: λ as :func:`format_strength` writes it in a sweep of one kind;
    ``<kind>-<λ>`` (``none`` alone) in a comparison of kinds (``compared``: more than one kind)."""
    strength = format_strength(entry["strength"])
    if not compared:
        return strength
    kind = str(entry.get("regularizer") or "?")
    return kind if kind == "none" else f"{kind}-{strength}"


def _seed_order(item: tuple[str, Mapping[str, Any]]) -> tuple:
    seed, fold = item[1].get("seed"), item[1].get("fold")
    return (str(item[1].get("regularizer") or ""), float(item[1]["strength"]), seed is None,
            seed if seed is not None else 0, fold if fold is not None else -1, item[0])


def runs_by_lambda(entries: Mapping[str, Mapping[str, Any]]
                   ) -> dict[str, list[tuple[str, Mapping[str, Any]]]]:
    """``(run name, entry)`` grouped by configuration (:func:`config_label`): kind, then λ
    ascending, then by seed (and fold)."""
    compared = len(kinds_of(entries.values())) > 1
    groups: dict[str, list[tuple[str, Mapping[str, Any]]]] = {}
    for name, entry in sorted(entries.items(), key=_seed_order):
        groups.setdefault(config_label(entry, compared), []).append((name, entry))
    return groups


def summarize_lambda(runs: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """One λ's entry of ``by_lambda``: its replicates' counts (``seeds``: the seed of each
    finished one; ``folds``: the folds among them, [] outside cross-validation; ``kind``: the
    regularizer), :func:`mean_ci` of every :data:`STAT_METRICS` (and per weight layer) over the
    finished replicates, the mean test accuracy per class, and :func:`val_ce_turn`."""
    entries = [e for _, e in runs]
    finished = [e for e in entries if e.get("status") == FINISHED]
    layers = sorted({k for e in finished for k in (e.get("weight_norm") or {})
                     if k not in ("total", "regularized")})
    classes = list(next((e["per_class_accuracy"] for e in finished
                         if e.get("per_class_accuracy")), {}))
    return {
        "strength": float(entries[0]["strength"]),
        "n": len(finished), "seeds": [e.get("seed") for e in finished], "runs": len(entries),
        "folds": sorted({e["fold"] for e in finished if e.get("fold") is not None}),
        "kind": entries[0].get("regularizer"),
        "diverged": sum(e.get("status") == DIVERGED for e in entries),
        "failed": sum(e.get("status") not in (FINISHED, DIVERGED) for e in entries),
        "diverged_epochs": sorted(e["diverged_epoch"] for e in entries
                                  if e.get("status") == DIVERGED and e.get("diverged_epoch") is not None),
        "epochs": sorted({int(e["epochs"]) for e in finished if e.get("epochs") is not None}),
        "metrics": {name: mean_ci(metric_value(e, name) for e in finished)
                    for name in STAT_METRICS},
        "weight_norm_layers": {layer: mean_ci((e.get("weight_norm") or {}).get(layer)
                                              for e in finished) for layer in layers},
        "per_class_accuracy": {c: mean_ci((e.get("per_class_accuracy") or {}).get(c)
                                          for e in finished)["mean"] for c in classes},
        "val_ce_turn": val_ce_turn(finished),
    }


def paired_difference(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]],
                      name: str) -> dict[str, Any]:
    """:func:`mean_ci` of ``b`` minus ``a`` in metric ``name``, paired by replicate (seed, fold)
    over those finished at both (:func:`l2sweep.reporting.intervals.paired`)."""
    def by_replicate(entries: Sequence[Mapping[str, Any]]) -> dict[Any, float]:
        values = {replicate(e): metric_value(e, name) for e in entries
                  if e.get("status") == FINISHED}
        return {key: v for key, v in values.items() if v is not None}

    return paired(by_replicate(a), by_replicate(b))


def compare_lambdas(groups: Mapping[str, Sequence[tuple[str, Mapping[str, Any]]]],
                    metrics: Sequence[str] = COMPARED_METRICS) -> dict[str, list[dict[str, Any]]]:
    """Per metric of ``metrics``, every two groups (λ labels, or kinds) ``a`` before ``b`` as
    ``{"a", "b", ...}`` + :func:`paired_difference` (``b`` minus ``a``)."""
    labels = list(groups)
    out: dict[str, list[dict[str, Any]]] = {}
    for name in metrics:
        out[name] = [{"a": a, "b": b, **paired_difference([e for _, e in groups[a]],
                                                          [e for _, e in groups[b]], name)}
                     for i, a in enumerate(labels) for b in labels[i + 1:]]
    return out


def best_lambda(groups: Mapping[str, Sequence[tuple[str, Mapping[str, Any]]]],
                by_lambda: Mapping[str, Mapping[str, Any]],
                comparisons: Mapping[str, Sequence[Mapping[str, Any]]],
                by: Sequence[str] = BEST_BY) -> Optional[dict[str, Any]]:
    """The λ with the lowest mean of the first metric of ``by`` every λ with a finished seed has.

    Returns None without one, else ``lambda`` (label), ``strength``, ``by``, ``value`` (the
    mean), ``n``, ``margins`` (per other λ: its paired difference minus the best's, positive
    when the best is lower), ``indistinguishable`` (the other λ whose margin's 95% interval
    holds zero, or that has none: fewer than two shared replicates), ``decided`` (True only
    when there is another λ and none is indistinguishable: with one seed never), ``run_name``
    (the best λ's replicate lowest in ``by``: the model to register) and ``single`` (True when the
    sweep has one configuration, such as ``none``: nothing was chosen, it is the champion alone).
    """
    candidates = {label: s for label, s in by_lambda.items() if s["n"] > 0}
    for metric in by:
        means = {label: s["metrics"][metric]["mean"] for label, s in candidates.items()}
        if not means or any(v is None for v in means.values()):
            continue
        best = min(means, key=lambda label: means[label])
        margins = {other: comparison(comparisons, metric, best, other)
                   for other in candidates if other != best}
        unclear = [o for o, m in margins.items() if m is None or m["low"] is None or m["low"] <= 0]
        finished = [(name, e) for name, e in groups[best] if e.get("status") == FINISHED
                    and metric_value(e, metric) is not None]
        run_name = min(finished, key=lambda item: metric_value(item[1], metric))[0]
        return {"lambda": best, "strength": candidates[best]["strength"], "by": metric,
                "value": means[best], "n": candidates[best]["n"], "run_name": run_name,
                "decided": bool(margins) and not unclear, "indistinguishable": unclear,
                "margins": margins, "single": len(by_lambda) == 1}
    return None


def compare_kinds(groups: Mapping[str, Sequence[tuple[str, Mapping[str, Any]]]],
                  by_lambda: Mapping[str, Mapping[str, Any]],
                  comparisons: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """The ``kinds`` section of a comparison of kinds: ``best`` (kind -> :func:`best_lambda`
    over that kind's configurations alone: its best strength and whether it is decided within
    its own grid; None when none of its runs finished) and ``comparisons``
    (:func:`compare_lambdas` of the kinds at those strengths, ``a``/``b`` kinds, in
    :data:`KIND_METRICS`, paired by replicate)."""
    labels: dict[str, list[str]] = {}
    for label, runs in groups.items():
        labels.setdefault(str(runs[0][1].get("regularizer")), []).append(label)
    best = {kind: best_lambda({lab: groups[lab] for lab in own},
                              {lab: by_lambda[lab] for lab in own}, comparisons)
            for kind, own in labels.items()}
    at_best = {kind: groups[b["lambda"]] for kind, b in best.items() if b}
    return {"best": best, "comparisons": compare_lambdas(at_best, KIND_METRICS)}


def summarize_refit(refits: Mapping[str, Mapping[str, Any]], folds: Iterable[Any],
                    compared: bool) -> dict[str, Any]:
    """The ``refit`` section of a cross-validation: the chosen strength retrained on the whole
    pool once per seed and scored once on the test split. ``lambda``/``strength`` (the refit
    runs', None without one), ``runs`` (their names by seed), ``n`` (finished), ``seeds``,
    ``diverged``, ``failed``, ``metrics`` (:func:`mean_ci` over seeds of each of
    :data:`REFIT_METRICS`), ``folds`` (k: how many folds the strength was chosen over) and
    ``run_name`` (its first finished seed: the champion; None when none finished)."""
    runs = sorted(refits.items(), key=_seed_order)
    finished = [(name, e) for name, e in runs if e.get("status") == FINISHED]
    first = runs[0][1] if runs else None
    return {"lambda": config_label(first, compared) if first else None,
            "strength": float(first["strength"]) if first else None,
            "runs": [name for name, _ in runs], "n": len(finished),
            "seeds": [e.get("seed") for _, e in finished],
            "diverged": sum(e.get("status") == DIVERGED for _, e in runs),
            "failed": sum(e.get("status") not in (FINISHED, DIVERGED) for _, e in runs),
            "metrics": {m: mean_ci(metric_value(e, m) for _, e in finished) for m in REFIT_METRICS},
            "folds": len({f for f in folds if f is not None}),
            "run_name": finished[0][0] if finished else None}


def summarize(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The statistics of a sweep's evaluation entries (one per configuration and replicate,
    each with ``strength``, ``status``, ``seed`` and the fields of :func:`summarize_history` and
    the test metrics; ``regularizer``, ``fold`` and ``refit`` where the sweep has them).

    Returns ``by_lambda`` (label -> :func:`summarize_lambda`), ``comparisons``
    (:func:`compare_lambdas`) and ``best`` (:func:`best_lambda`), all over the entries that are
    not refits (a cross-validation's fold runs); with several kinds also ``kinds``
    (:func:`compare_kinds`); in a cross-validation (a ``fold`` or ``refit`` entry) also
    ``refit`` (:func:`summarize_refit`), and ``best`` gains ``cv`` (True) and names as
    ``run_name`` the refit's champion when the refit is of the chosen strength.
    """
    chosen_from = {name: e for name, e in entries.items() if not e.get("refit")}
    groups = runs_by_lambda(chosen_from)
    by_lambda = {label: summarize_lambda(runs) for label, runs in groups.items()}
    comparisons = compare_lambdas(groups)
    best = best_lambda(groups, by_lambda, comparisons)
    out: dict[str, Any] = {"by_lambda": by_lambda, "comparisons": comparisons, "best": best}
    kinds = kinds_of(chosen_from.values())
    if len(kinds) > 1:
        out["kinds"] = compare_kinds(groups, by_lambda, comparisons)
    if any(e.get("fold") is not None or e.get("refit") for e in entries.values()):
        refit = summarize_refit({name: e for name, e in entries.items() if e.get("refit")},
                                (e.get("fold") for e in chosen_from.values()), len(kinds) > 1)
        out["refit"] = refit
        if best:
            champion = refit["run_name"] if refit["lambda"] == best["lambda"] else None
            out["best"] = {**best, "cv": True, "run_name": champion or best["run_name"]}
    return out


def with_statistics(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """``evaluation`` with :func:`summarize`'s sections, computed from its ``runs`` when it has
    none (an evaluation written before replicates: every run one seed)."""
    if "by_lambda" in evaluation:
        return dict(evaluation)
    return {**evaluation, **summarize(evaluation["runs"])}


# --- formatting --------------------------------------------------------------------------

MISSING_CELL = "–"


def fmt_pct(value: Optional[float]) -> str:
    """0.8512 -> ``85.12%``."""
    return MISSING_CELL if value is None else f"{100 * value:.2f}%"


def fmt_loss(value: Optional[float]) -> str:
    """A loss with 4 decimals."""
    return MISSING_CELL if value is None else f"{value:.4f}"


def fmt_points(value: Optional[float]) -> str:
    """A signed accuracy difference in percentage points: 0.0123 -> ``+1.23 pt``."""
    return MISSING_CELL if value is None else f"{100 * value:+.2f} pt"


# --- curves over seeds ---------------------------------------------------------------


def _finished_history(history: Mapping[str, Any]) -> bool:
    return history.get("status", "FINISHED") == "FINISHED" and history.get("diverged_epoch") is None


def epoch_values(history: Mapping[str, Any], name: str) -> list[Optional[float]]:
    """A per-epoch metric of a history; ``weight_norm`` combines every ``weight_norm/<layer>``."""
    if name != "weight_norm":
        return series(history, name)
    layers = [series(history, k) for k in history.get("metrics", {}) if k.startswith("weight_norm/")]
    length = max((len(v) for v in layers), default=0)
    return [_combined([v[i] if i < len(v) else None for v in layers]) if layers else None
            for i in range(length)]


def curves_by_lambda(histories: Sequence[Mapping[str, Any]],
                     names: Sequence[str]) -> list[dict[str, Any]]:
    """Per configuration (:func:`config_label`; kind, then λ ascending): ``strength``, ``kind``,
    ``lambda`` (the label), ``n`` (runs averaged), ``diverged_epoch`` (the earliest, when every
    run diverged), ``epochs`` and per metric of ``names`` (:func:`epoch_values`) ``{"mean",
    "low", "high"}`` lists: per epoch the mean over seeds (and folds) and its 95% t-interval (None
    with one). The finished runs only, when the configuration has one (a diverged seed's values
    would drag the mean); else every run, so one that diverged in every seed still shows where.
    A cross-validation's refits are left out (no validation data)."""
    used = [h for h in histories if not h.get("refit")]
    compared = len(kinds_of(used)) > 1
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for h in sorted(used, key=lambda h: (str(h.get("regularizer") or ""), float(h["strength"]))):
        groups.setdefault(config_label(h, compared), []).append(h)
    out = []
    for label, group in groups.items():
        finished = [h for h in group if _finished_history(h)]
        runs = finished or group
        epochs = max((list(h.get("epochs", [])) for h in runs), key=len)
        curves: dict[str, dict[str, list]] = {}
        for name in names:
            columns = [epoch_values(h, name) for h in runs]
            stats = [mean_ci(c[i] for c in columns if i < len(c)) for i in range(len(epochs))]
            curves[name] = {k: [st[k] for st in stats] for k in ("mean", "low", "high")}
        diverged = [h["diverged_epoch"] for h in runs if h.get("diverged_epoch") is not None]
        out.append({"strength": float(group[0]["strength"]), "kind": str(group[0].get("regularizer") or ""),
                    "lambda": label, "n": len(runs),
                    "diverged_epoch": None if finished or not diverged else min(diverged),
                    "epochs": [int(e) for e in epochs], "metrics": curves})
    return out
