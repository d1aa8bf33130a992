"""Numbers in words, as the report writes them: each metric in its unit, a mean with the
half-width of its 95% interval, a difference with its interval, a configuration's name, a
Markdown table (:mod:`l2sweep.reporting.report` and :mod:`l2sweep.reporting.report_kinds`)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Sequence

from l2sweep.reporting.summaries import MISSING_CELL, fmt_pct, fmt_points

Stat = Mapping[str, Any]  # intervals.mean_ci's dict: mean, sd, n, low, high, half

#: A kind's name in titles.
REGULARIZER_TITLES = {"l2": "L2", "l1": "L1", "l1_l2": "L1+L2", "weight_decay": "Weight-decay",
                      "adamw": "AdamW-decay", "dropout": "Dropout", "none": "Unregularized"}
#: How each metric is written: accuracies as %, their differences in percentage points.
UNITS = {"test_accuracy": "pct", "val_accuracy": "pct", "train_accuracy": "pct", "gap": "pt",
         "weight_norm": "norm", "weight_norm_total": "norm", "penalty_share": "share",
         "best_epoch": "epoch", "near_zero_share": "share"}


def fmt_value(metric: str, value: Optional[float], signed: bool = False) -> str:
    """A value of ``metric`` in its unit (``signed``: a difference, with its sign)."""
    if value is None:
        return MISSING_CELL
    unit = UNITS.get(metric, "loss")
    if unit in ("pct", "pt"):
        return fmt_points(value) if signed or unit == "pt" else fmt_pct(value)
    if unit == "share":
        return f"{100 * value:+.1f} pt" if signed else f"{100 * value:.1f}%"
    digits = {"norm": 3, "epoch": 1}.get(unit, 4)
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def fmt_half(metric: str, half: float) -> str:
    """An interval's half-width in ``metric``'s unit (percentage points for accuracies)."""
    unit = UNITS.get(metric, "loss")
    if unit in ("pct", "pt"):
        return f"{100 * half:.2f}"
    if unit == "share":
        return f"{100 * half:.1f}"
    return f"{half:.{ {'norm': 3, 'epoch': 1}.get(unit, 4) }f}"


def fmt_mean(metric: str, stat: Stat) -> str:
    """``mean ± half-width`` of the 95% interval (the mean alone with one seed)."""
    if stat["mean"] is None:
        return MISSING_CELL
    if stat["half"] is None:
        if UNITS.get(metric) == "epoch":
            return f"{stat['mean']:g}"
        return fmt_value(metric, stat["mean"])
    return f"{fmt_value(metric, stat['mean'])} ± {fmt_half(metric, stat['half'])}"


def with_interval(metric: str, stat: Stat, signed: bool = False) -> str:
    """``value (95% CI low to high, n=N)``, or ``value (n=1: no interval)``."""
    value = fmt_value(metric, stat["mean"], signed)
    if stat["low"] is None:
        return f"{value} (n={stat['n']}: no interval)"
    return (f"{value} (95% CI {fmt_value(metric, stat['low'], signed)} to "
            f"{fmt_value(metric, stat['high'], signed)}, n={stat['n']})")


def lams(labels: Sequence[str]) -> str:
    """Configurations as a list in words: ``λ=0.001, λ=0.01``."""
    return ", ".join(lam(label) for label in labels)


def is_are(labels: Sequence[str]) -> str:
    """The verb that agrees with a list of ``labels``."""
    return "is" if len(labels) == 1 else "are"


def lam(label: str) -> str:
    """A configuration as sentences name it: ``λ=0.0001`` in a sweep of one kind (its label is
    the strength), ``l2 λ=0.0001`` or ``none`` in a comparison of kinds (``l2-0.0001``)."""
    try:
        float(label)
    except ValueError:
        kind, _, strength = label.partition("-")
        return f"{kind} λ={strength}" if strength else label
    return f"λ={label}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
