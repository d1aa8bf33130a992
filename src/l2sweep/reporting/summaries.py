"""The numbers of a sweep from its histories: the evaluation's summaries, the statistics over
seeds (:func:`summarize`: per λ means and 95% t-intervals, differences between λ paired by
seed, the best λ and whether it is decided), the DVC metrics and plot data. Epochs count from
0; ``loss`` includes the penalty, ``data_loss`` is the cross-entropy alone.

Two files hold the numbers: the evaluation (``<paths.reports>/evaluation.json``: every run's
status, summaries, test metrics and the sweep's settings; what the report and the gate read) and
the DVC metrics file (``paths.metrics``: the few numbers ``dvc exp show`` compares, see
:func:`l2sweep.reporting.dvc_data.dvc_metrics`).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional, Sequence

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


# --- statistics over seeds ---------------------------------------------------------------
# A sweep trains every λ once per seed. Per λ: the mean and a 95% t-interval over the finished
# seeds of each summary metric; between λ: differences paired by seed (only seeds finished at
# both), whose interval is narrower than the two means' because a seed's shared luck cancels.

#: 97.5% quantiles of Student's t by degrees of freedom (two-sided 95% intervals):
#: ``scipy.stats.t.ppf(0.975, df)`` to 4 decimals (scipy is not a dependency).
T_975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469, 7: 2.3646,
         8: 2.306, 9: 2.2622, 10: 2.2281, 11: 2.201, 12: 2.1788, 13: 2.1604, 14: 2.1448,
         15: 2.1314, 16: 2.1199, 17: 2.1098, 18: 2.1009, 19: 2.093, 20: 2.086, 21: 2.0796,
         22: 2.0739, 23: 2.0687, 24: 2.0639, 25: 2.0595, 26: 2.0555, 27: 2.0518, 28: 2.0484,
         29: 2.0452, 30: 2.0423, 40: 2.0211, 60: 2.0003, 120: 1.9799}
#: Metrics summarized per λ; ``weight_norm`` is the regularized norm (every layer but
#: ``output``), ``weight_norm_total`` every layer's; ``initial_loss`` is epoch 0's ``loss``.
STAT_METRICS = ("test_accuracy", "test_loss", "val_accuracy", "val_data_loss", "val_loss",
                "train_accuracy", "gap", "weight_norm", "weight_norm_total", "penalty_share",
                "initial_loss", "best_epoch")
#: Metrics compared between every two λ, paired by seed: those the report's rules use.
COMPARED_METRICS = ("val_data_loss", "val_loss", "test_accuracy", "initial_loss", "weight_norm",
                    "gap")


def t_quantile(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom: :data:`T_975`'s for
    df 1-30, 40, 60, 120; between those the nearest tabulated df below (an interval slightly
    wider, never narrower); above 120 df 120's (1.9799; 1.9600 at infinity).

    Raises:
        ValueError: ``df`` < 1 (one value has no spread).
    """
    if df < 1:
        raise ValueError(f"df={df!r}: a t quantile needs df >= 1 (two values or more)")
    return T_975[max(d for d in T_975 if d <= df)]


def mean_ci(values: Iterable[Any]) -> dict[str, Any]:
    """The finite ``values``' mean, sample sd (n - 1), ``n`` and 95% t-interval: ``low``,
    ``high`` and ``half`` (its half-width). One value gives a mean but no sd and no interval
    (None); none gives only ``n`` = 0."""
    xs = [v for v in (finite(v) for v in values) if v is not None]
    stat: dict[str, Any] = {"mean": None, "sd": None, "n": len(xs), "low": None, "high": None,
                            "half": None}
    if xs:
        stat["mean"] = math.fsum(xs) / len(xs)
    if len(xs) >= 2:
        stat["sd"] = math.sqrt(math.fsum((x - stat["mean"]) ** 2 for x in xs) / (len(xs) - 1))
        stat["half"] = t_quantile(len(xs) - 1) * stat["sd"] / math.sqrt(len(xs))
        stat["low"], stat["high"] = stat["mean"] - stat["half"], stat["mean"] + stat["half"]
    return stat


def metric_value(entry: Mapping[str, Any], name: str) -> Optional[float]:
    """One of :data:`STAT_METRICS` of an evaluation entry (None where unknown)."""
    if name in ("weight_norm", "weight_norm_total"):
        return finite((entry.get("weight_norm") or {}).get(
            "regularized" if name == "weight_norm" else "total"))
    return finite(entry.get(name))


def _seed_order(item: tuple[str, Mapping[str, Any]]) -> tuple:
    seed = item[1].get("seed")
    return (float(item[1]["strength"]), seed is None, seed if seed is not None else 0, item[0])


def runs_by_lambda(entries: Mapping[str, Mapping[str, Any]]
                   ) -> dict[str, list[tuple[str, Mapping[str, Any]]]]:
    """``(run name, entry)`` grouped by λ (``format_strength``), λ ascending, then by seed."""
    groups: dict[str, list[tuple[str, Mapping[str, Any]]]] = {}
    for name, entry in sorted(entries.items(), key=_seed_order):
        groups.setdefault(format_strength(entry["strength"]), []).append((name, entry))
    return groups


def val_ce_turn(finished: Sequence[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
    """Whether the validation cross-entropy (not the penalized ``val_loss``) turns up beyond its
    noise, over one λ's finished seeds; None without a full curve.

    The mean curve over seeds (to the shortest seed's last epoch) is lowest at ``min_epoch``
    (value ``min``). ``rise`` is the mean and 95% interval over seeds of each seed's last-epoch
    value minus its value at ``min_epoch``: paired within the seed, so the seed-to-seed spread
    of the level cancels and what is left is the noise of the rise itself, epoch-to-epoch
    swings included. ``turned`` is True only when ``min_epoch`` is before the last epoch and
    the interval lies above zero; False when the minimum is at the last epoch or the interval
    holds zero (a rise within noise); None with one seed (no interval: no claim). The mean
    curve's minimum, not each seed's own: a seed's own minimum makes every rise >= 0, so
    noise alone would look like a turn.
    """
    curves = [list(e.get("val_ce_per_epoch") or []) for e in finished]
    curves = [c for c in curves if c and all(v is not None for v in c)]
    if not curves:
        return None
    length = min(len(c) for c in curves)
    mean_curve = [math.fsum(c[i] for c in curves) / len(curves) for i in range(length)]
    lowest = min(range(length), key=mean_curve.__getitem__)  # first epoch on ties
    rise = mean_ci(c[length - 1] - c[lowest] for c in curves)
    turned = (False if lowest == length - 1 else
              None if rise["low"] is None else bool(rise["low"] > 0))
    return {"min_epoch": lowest, "min": mean_curve[lowest], "last_epoch": length - 1,
            "rise": rise, "turned": turned}


def summarize_lambda(runs: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """One λ's entry of ``by_lambda``: its seeds' counts, :func:`mean_ci` of every
    :data:`STAT_METRICS` (and per weight layer) over the finished seeds, the mean test accuracy
    per class, and :func:`val_ce_turn`."""
    entries = [e for _, e in runs]
    finished = [e for e in entries if e.get("status") == FINISHED]
    layers = sorted({k for e in finished for k in (e.get("weight_norm") or {})
                     if k not in ("total", "regularized")})
    classes = list(next((e["per_class_accuracy"] for e in finished
                         if e.get("per_class_accuracy")), {}))
    return {
        "strength": float(entries[0]["strength"]),
        "n": len(finished), "seeds": [e.get("seed") for e in finished], "runs": len(entries),
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
    """:func:`mean_ci` of ``b`` minus ``a`` in metric ``name``, paired by seed over the seeds
    finished at both (``seeds``)."""
    def by_seed(entries: Sequence[Mapping[str, Any]]) -> dict[Any, float]:
        values = {e.get("seed"): metric_value(e, name) for e in entries
                  if e.get("status") == FINISHED}
        return {seed: v for seed, v in values.items() if v is not None}

    va, vb = by_seed(a), by_seed(b)
    seeds = [s for s in vb if s in va]
    return {**mean_ci(vb[s] - va[s] for s in seeds), "seeds": seeds}


def compare_lambdas(groups: Mapping[str, Sequence[tuple[str, Mapping[str, Any]]]]
                    ) -> dict[str, list[dict[str, Any]]]:
    """Per metric of :data:`COMPARED_METRICS`, every two λ ``a`` < ``b`` as
    ``{"a", "b", ...}`` + :func:`paired_difference` (``b`` minus ``a``)."""
    labels = list(groups)
    out: dict[str, list[dict[str, Any]]] = {}
    for name in COMPARED_METRICS:
        out[name] = [{"a": a, "b": b, **paired_difference([e for _, e in groups[a]],
                                                          [e for _, e in groups[b]], name)}
                     for i, a in enumerate(labels) for b in labels[i + 1:]]
    return out


def comparison(comparisons: Mapping[str, Sequence[Mapping[str, Any]]], name: str, a: str,
               b: str) -> Optional[dict[str, Any]]:
    """λ ``b`` minus λ ``a`` in metric ``name`` (labels as :func:`format_strength` writes
    them, either order): the paired difference of ``comparisons``, None if not compared."""
    for c in comparisons.get(name, []):
        if (c["a"], c["b"]) == (a, b):
            return dict(c)
        if (c["a"], c["b"]) == (b, a):
            flip = lambda v: None if v is None else -v  # noqa: E731
            return {**c, "a": a, "b": b, "mean": flip(c["mean"]), "low": flip(c["high"]),
                    "high": flip(c["low"])}
    return None


def best_lambda(groups: Mapping[str, Sequence[tuple[str, Mapping[str, Any]]]],
                by_lambda: Mapping[str, Mapping[str, Any]],
                comparisons: Mapping[str, Sequence[Mapping[str, Any]]],
                by: Sequence[str] = BEST_BY) -> Optional[dict[str, Any]]:
    """The λ with the lowest mean of the first metric of ``by`` every λ with a finished seed has.

    Returns None without one, else ``lambda`` (label), ``strength``, ``by``, ``value`` (the
    mean), ``n``, ``margins`` (per other λ: its paired difference minus the best's, positive
    when the best is lower), ``indistinguishable`` (the other λ whose margin's 95% interval
    holds zero, or that has none: fewer than two shared seeds), ``decided`` (True only when
    there is another λ and none is indistinguishable: with one seed never), ``run_name``
    (the best λ's seed lowest in ``by``: the model to register) and ``single`` (True when the
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


def summarize(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The statistics of a sweep's evaluation entries (one per λ and seed, each with
    ``strength``, ``status``, ``seed`` and the fields of :func:`summarize_history` and the test
    metrics): ``by_lambda`` (label -> :func:`summarize_lambda`), ``comparisons``
    (:func:`compare_lambdas`) and ``best`` (:func:`best_lambda`)."""
    groups = runs_by_lambda(entries)
    by_lambda = {label: summarize_lambda(runs) for label, runs in groups.items()}
    comparisons = compare_lambdas(groups)
    return {"by_lambda": by_lambda, "comparisons": comparisons,
            "best": best_lambda(groups, by_lambda, comparisons)}


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


def fmt_norm(value: Optional[float]) -> str:
    """A weight norm with 3 decimals."""
    return MISSING_CELL if value is None else f"{value:.3f}"


def fmt_points(value: Optional[float]) -> str:
    """A signed accuracy difference in percentage points: 0.0123 -> ``+1.23 pt``."""
    return MISSING_CELL if value is None else f"{100 * value:+.2f} pt"


def runs_by_strength(evaluation: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(run name, entry)`` of an evaluation's runs, sorted by λ."""
    return sorted(evaluation["runs"].items(), key=lambda item: item[1]["strength"])


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
    """Per λ (ascending): ``strength``, ``lambda``, ``n`` (seeds averaged), ``diverged_epoch``
    (the earliest, when every seed diverged), ``epochs`` and per metric of ``names``
    (:func:`epoch_values`) ``{"mean", "low", "high"}`` lists: per epoch the mean over seeds and
    its 95% t-interval (None with one seed). The finished seeds only, when the λ has one (a
    diverged seed's values would drag the mean); else every seed, so a λ that diverged in every
    seed still shows where."""
    groups: dict[float, list[Mapping[str, Any]]] = {}
    for h in histories:
        groups.setdefault(float(h["strength"]), []).append(h)
    out = []
    for strength in sorted(groups):
        finished = [h for h in groups[strength] if _finished_history(h)]
        used = finished or groups[strength]
        epochs = max((list(h.get("epochs", [])) for h in used), key=len)
        curves: dict[str, dict[str, list]] = {}
        for name in names:
            columns = [epoch_values(h, name) for h in used]
            stats = [mean_ci(c[i] for c in columns if i < len(c)) for i in range(len(epochs))]
            curves[name] = {k: [st[k] for st in stats] for k in ("mean", "low", "high")}
        diverged = [h["diverged_epoch"] for h in used if h.get("diverged_epoch") is not None]
        out.append({"strength": strength, "lambda": format_strength(strength), "n": len(used),
                    "diverged_epoch": None if finished or not diverged else min(diverged),
                    "epochs": [int(e) for e in epochs], "metrics": curves})
    return out
