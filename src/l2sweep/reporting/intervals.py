"""Means and paired differences over replicates with their 95% t-intervals, and whether a
validation curve turns up beyond its noise: the statistics every claim of the report rests on
(:mod:`l2sweep.reporting.summaries` applies them to a sweep).

A replicate is one (seed, fold) of a configuration: a seed in a plain sweep (fold None), a
(seed, fold) pair in a cross-validation. Differences between two configurations are paired by
replicate (only those finished at both): the interval of a paired difference is narrower than
the two means' because a replicate's shared luck (its initial weights, batch order, fold) cancels.
"""

from __future__ import annotations

import math
from typing import Any, Hashable, Iterable, Mapping, Optional, Sequence

#: 97.5% quantiles of Student's t by degrees of freedom (two-sided 95% intervals):
#: ``scipy.stats.t.ppf(0.975, df)`` to 4 decimals (scipy is not a dependency).
T_975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469, 7: 2.3646,
         8: 2.306, 9: 2.2622, 10: 2.2281, 11: 2.201, 12: 2.1788, 13: 2.1604, 14: 2.1448,
         15: 2.1314, 16: 2.1199, 17: 2.1098, 18: 2.1009, 19: 2.093, 20: 2.086, 21: 2.0796,
         22: 2.0739, 23: 2.0687, 24: 2.0639, 25: 2.0595, 26: 2.0555, 27: 2.0518, 28: 2.0484,
         29: 2.0452, 30: 2.0423, 40: 2.0211, 60: 2.0003, 120: 1.9799}


def finite(value: Any) -> Optional[float]:
    """``value`` as a float, or None when it is missing, not a number, NaN or infinite."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


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


def replicate(entry: Mapping[str, Any]) -> tuple[Any, Any]:
    """The key pairing an entry with its counterparts: ``(seed, fold)`` (fold None outside CV)."""
    return entry.get("seed"), entry.get("fold")


def paired(a: Mapping[Hashable, float], b: Mapping[Hashable, float]) -> dict[str, Any]:
    """:func:`mean_ci` of ``b`` minus ``a`` over the :func:`replicate` keys both have (values
    per key, finite), with ``seeds`` (the seeds of those keys, each once, in order) and
    ``folds`` (their folds, each once; [] outside cross-validation)."""
    keys = [k for k in b if k in a]
    once = lambda xs: list(dict.fromkeys(x for x in xs if x is not None))  # noqa: E731
    return {**mean_ci(b[k] - a[k] for k in keys), "seeds": list(dict.fromkeys(k[0] for k in keys)),
            "folds": once(k[1] for k in keys)}


def comparison(comparisons: Mapping[str, Any], name: str, a: str,
               b: str) -> Optional[dict[str, Any]]:
    """``b`` minus ``a`` in metric ``name`` (configuration labels, or kinds, either order): the
    paired difference of ``comparisons`` (metric -> ``[{"a", "b", ...}]``), None if not compared."""
    for c in comparisons.get(name, []):
        if (c["a"], c["b"]) == (a, b):
            return dict(c)
        if (c["a"], c["b"]) == (b, a):
            flip = lambda v: None if v is None else 0.0 - v  # noqa: E731  (0.0 - 0.0 is +0.0)
            return {**c, "a": a, "b": b, "mean": flip(c["mean"]), "low": flip(c["high"]),
                    "high": flip(c["low"])}
    return None


def excludes_zero(stat: Optional[Mapping[str, Any]]) -> int:
    """+1: the interval lies above zero; -1: below; 0: it holds zero or there is none."""
    if stat is None or stat["low"] is None:
        return 0
    return 1 if stat["low"] > 0 else -1 if stat["high"] < 0 else 0


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
