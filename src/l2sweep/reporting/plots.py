"""Figures: per-run curves and weight histograms, and comparisons across λ.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot's global state;
:func:`save_figure` writes it. The Agg backend renders without a display (CI, DVC stages).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
from matplotlib import cm, colors  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from l2sweep.reporting import summaries  # noqa: E402

#: Fixed margins of the per-run figures (12 x 4.6 in, two panels), so they are saved without a
#: second layout pass (``save_figure(..., tight=False)``).
RUN_FIGURE_MARGINS = {"left": 0.07, "right": 0.98, "bottom": 0.12, "top": 0.86, "wspace": 0.25}


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 110, tight: bool = True) -> Path:
    """Writes ``fig`` to ``path`` atomically (its suffix picks the format) and closes it.
    ``tight`` crops to the drawn content (a second layout pass); False keeps the figure's own
    margins (:data:`RUN_FIGURE_MARGINS`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix.lstrip(".").lower() or "png"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format=fmt, dpi=dpi, bbox_inches="tight" if tight else None)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path


def _finish(ax: Any, xlabel: str, ylabel: Optional[str], title: str,
            legend: Optional[dict[str, Any]] = None) -> None:
    """Labels, title and grid; a legend (``legend``: its options) when a line has a label."""
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend is not None and ax.get_legend_handles_labels()[0]:
        ax.legend(**legend)


# --- per-run figures ----------------------------------------------------------------------


def plot_curves(metrics: Mapping[str, Sequence[float]], title: str,
                show_data_loss: bool = True) -> Figure:
    """A run's loss (left) and accuracy (right) per epoch (from 1), from ``History.history``-style
    ``metrics`` (missing keys left out); ``show_data_loss`` adds the cross-entropy alone, dashed."""
    fig = Figure(figsize=(12, 4.6))
    fig.subplots_adjust(**RUN_FIGURE_MARGINS)
    ax_loss, ax_acc = fig.subplots(1, 2)
    styles = {"loss": ("train loss", "C0", "-"), "val_loss": ("val loss", "C1", "-"),
              "data_loss": ("train cross-entropy (no penalty)", "C0", "--"),
              "val_data_loss": ("val cross-entropy (no penalty)", "C1", "--"),
              "accuracy": ("train accuracy", "C0", "-"), "val_accuracy": ("val accuracy", "C1", "-")}
    loss_keys = ["loss", "val_loss"] + (["data_loss", "val_data_loss"] if show_data_loss else [])
    for ax, keys, ylabel in ((ax_loss, loss_keys, "loss"),
                             (ax_acc, ["accuracy", "val_accuracy"], "accuracy")):
        for key in keys:
            values = metrics.get(key)
            if values is None or len(values) == 0:
                continue
            label, color, line = styles[key]
            ax.plot(np.arange(1, len(values) + 1), values, line, color=color, marker="o",
                    markersize=3, label=label)
        _finish(ax, "epoch", ylabel, ylabel.capitalize(), legend={})
    fig.suptitle(title)
    return fig


def plot_histograms(hist_layer_data: Mapping[str, Any], layer: str, title: str,
                    log_y: bool = False, cmap: str = "viridis") -> Figure:
    """One layer's weight distribution over the epochs.

    Left: histograms coloured by epoch (the initial weights, epoch -1, dashed grey). Right: the
    median and the 25-75 and 5-95 percentile bands per epoch.

    Args:
        hist_layer_data: :attr:`l2sweep.engine.callbacks.WeightHistograms.data` (all layers),
            or one layer's entry of it.
        log_y: logarithmic count axis (shows the tails).

    Raises:
        KeyError: ``layer`` is not in the data (the message lists the layers there).
    """
    entry = hist_layer_data
    if "edges" not in entry:  # all layers
        if layer not in entry:
            raise KeyError(f"layer={layer!r} has no histogram data; layers: {sorted(entry)}")
        entry = entry[layer]
    fig = Figure(figsize=(12, 4.6))
    fig.subplots_adjust(**RUN_FIGURE_MARGINS)
    ax_hist, ax_band = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    _draw_histograms(fig, ax_hist, entry, layer, log_y, cmap)
    _draw_percentiles(ax_band, list(entry["epochs"]), entry.get("stats") or {})
    fig.suptitle(title)
    return fig


def _draw_histograms(fig: Figure, ax: Any, entry: Mapping[str, Any], layer: str, log_y: bool,
                     cmap: str) -> None:
    edges = np.asarray(entry["edges"], dtype=float)
    epochs = list(entry["epochs"])
    trained = [e for e in epochs if e >= 0]
    norm = colors.Normalize(vmin=min(trained) if trained else 0, vmax=max(max(trained) if trained else 1, 1))
    colormap = matplotlib.colormaps[cmap]
    for epoch, row in zip(epochs, entry["counts"]):
        if epoch < 0:
            ax.stairs(row, edges, color="0.4", linestyle="--", linewidth=1.2, label="init")
        else:
            ax.stairs(row, edges, color=colormap(norm(epoch)), linewidth=1.2)
    if log_y:
        ax.set_yscale("log")
    _finish(ax, "weight value", "count", f"{layer}: kernel weights per epoch",
            legend={"loc": "upper right"})
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=colormap), ax=ax, label="epoch")


def _draw_percentiles(ax: Any, epochs: list[int], stats: Mapping[str, Any]) -> None:
    if all(k in stats for k in ("p5", "p25", "p50", "p75", "p95")):
        x = np.asarray(epochs)
        ax.fill_between(x, stats["p5"], stats["p95"], alpha=0.2, color="C0", label="5-95%")
        ax.fill_between(x, stats["p25"], stats["p75"], alpha=0.4, color="C0", label="25-75%")
        ax.plot(x, stats["p50"], color="C0", label="median")
        if "std" in stats:
            ax.plot(x, stats["std"], color="C3", linestyle=":", label="std")
        ax.axhline(0.0, color="0.5", linewidth=0.8)
    _finish(ax, "epoch (-1 = init)", "weight value", "percentiles", legend={"loc": "best"})


# --- comparison figures (across λ) ----------------------------------------------------------
# Inputs are ``history.json`` contents; epochs are drawn as recorded (from 0, like MLflow's
# steps). A λ axis is logarithmic (symlog when the grid holds 0).


def _lam_label(strength: float, diverged_epoch: Any = None) -> str:
    label = f"λ={float(strength):g}"
    return label if diverged_epoch is None else f"{label} (diverged at epoch {diverged_epoch})"


def _by_strength(histories: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return sorted(histories, key=lambda h: float(h["strength"]))


def _finite_array(values: Sequence[Any]) -> np.ndarray:
    """Values as floats, with None/NaN/inf as NaN (matplotlib leaves a gap there)."""
    out = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
    out[~np.isfinite(out)] = np.nan
    return out


def _mean_line(ax: Any, epochs: Sequence[int], curve: Mapping[str, Sequence[Any]], color: str,
               style: str = "-", label: Optional[str] = None) -> np.ndarray:
    """The mean curve with its 95% band (none where one seed gives no interval); returns the mean."""
    x = np.asarray(epochs)
    mean = _finite_array(curve["mean"])
    ax.plot(x, mean, style, marker="o", markersize=3, color=color, label=label)
    low, high = _finite_array(curve["low"]), _finite_array(curve["high"])
    if np.isfinite(low).any():
        ax.fill_between(x, low, high, color=color, alpha=0.18, linewidth=0)
    return mean


def _seeds_label(curve: Mapping[str, Any]) -> str:
    label = _lam_label(curve["strength"], curve.get("diverged_epoch"))
    return label + (f", n={curve['n']}" if curve["n"] > 1 else "")


def plot_val_loss_by_lambda(histories: Sequence[Mapping[str, Any]]) -> Figure:
    """Validation loss per epoch, one line per λ: the mean over its seeds with a 95% confidence
    band (:func:`l2sweep.reporting.summaries.curves_by_lambda`), each mean's minimum starred.

    Left: ``val_loss`` (with the penalty); right, when the histories have it, ``val_data_loss``
    (the cross-entropy alone, which compares across λ).
    """
    keys = [("val_loss", "val_loss (with penalty)")]
    if any(h["metrics"].get("val_data_loss") for h in histories):
        keys.append(("val_data_loss", "validation cross-entropy (no penalty)"))
    curves = summaries.curves_by_lambda(histories, [key for key, _ in keys])
    fig = Figure(figsize=(6.2 * len(keys), 4.6))
    axes = np.atleast_1d(fig.subplots(1, len(keys)))
    for ax, (key, title) in zip(axes, keys):
        for i, curve in enumerate(curves):
            if all(v is None for v in curve["metrics"][key]["mean"]):
                continue
            color = f"C{i % 10}"
            mean = _mean_line(ax, curve["epochs"], curve["metrics"][key], color,
                              label=_seeds_label(curve))
            best = int(np.nanargmin(mean))
            ax.plot(curve["epochs"][best], mean[best], marker="*", markersize=12, color=color,
                    markeredgecolor="black", linestyle="none")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _finish(ax, "epoch", "loss", title, legend={"title": "★ = minimum of the mean"})
    fig.suptitle("Validation loss per epoch, by λ: mean over seeds, band = 95% CI of the mean")
    return fig


def plot_accuracy_by_lambda(histories: Sequence[Mapping[str, Any]]) -> Figure:
    """Train vs validation accuracy per epoch, one panel per λ (shared y axis): the mean over
    seeds with a 95% confidence band."""
    curves = summaries.curves_by_lambda(histories, ["accuracy", "val_accuracy"])
    fig = Figure(figsize=(4.2 * max(len(curves), 1), 4.2))
    axes = np.atleast_1d(fig.subplots(1, max(len(curves), 1), sharey=True))
    for ax, curve in zip(axes, curves):
        for key, label, style, color in (("accuracy", "train", "-", "C0"),
                                         ("val_accuracy", "validation", "--", "C1")):
            if any(v is not None for v in curve["metrics"][key]["mean"]):
                _mean_line(ax, curve["epochs"], curve["metrics"][key], color, style, label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _finish(ax, "epoch", None, _seeds_label(curve), legend={})
    axes[0].set_ylabel("accuracy")
    fig.suptitle("Train vs validation accuracy per epoch, by λ: mean over seeds, band = 95% CI")
    return fig


def plot_vs_lambda(strengths: Sequence[float], series: Mapping[str, Sequence[Any]],
                   ylabel: str, title: str, percent: bool = False,
                   intervals: Optional[Mapping[str, Sequence[tuple[Any, Any]]]] = None) -> Figure:
    """Final values against λ: one marked line per ``series`` entry (label -> one value per λ,
    None where a run has none); ``percent`` shows fractions as percentages. ``intervals``
    (label -> ``(low, high)`` per λ, None where there is none) draws error bars."""
    order = np.argsort(np.asarray(strengths, dtype=float))
    xs = np.asarray(strengths, dtype=float)[order]
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.subplots()
    for i, (label, values) in enumerate(series.items()):
        ys = _finite_array(values)[order] * (100.0 if percent else 1.0)
        ax.plot(xs, ys, marker="o", color=f"C{i % 10}", label=label)
        bounds = (intervals or {}).get(label)
        if bounds is not None:
            scale = 100.0 if percent else 1.0
            low = _finite_array([b[0] for b in bounds])[order] * scale
            high = _finite_array([b[1] for b in bounds])[order] * scale
            ax.errorbar(xs, ys, yerr=np.vstack([ys - low, high - ys]), fmt="none",
                        ecolor=f"C{i % 10}", capsize=4)
        for x, y in zip(xs, ys):
            if np.isfinite(y):
                ax.annotate(f"{y:.2f}" if percent else f"{y:.4g}", (x, y),
                            textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    if series:  # a λ without any value (a diverged run) gets a dotted marker line
        stacked = np.array([_finite_array(v)[order] for v in series.values()])
        for x, column in zip(xs, stacked.T):
            if np.isnan(column).all():
                ax.axvline(x, color="0.6", linestyle=":", label=f"λ={x:g}: no value")
    positive = [s for s in xs if s > 0]
    if len(positive) < len(xs):  # a log axis cannot show 0
        ax.set_xscale("symlog", linthresh=min(positive) if positive else 1.0)
    else:
        ax.set_xscale("log")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{s:g}" for s in xs])
    ax.minorticks_off()
    _finish(ax, "λ (L2 strength, log scale)", f"{ylabel} (%)" if percent else ylabel, title)
    ax.legend()
    return fig


def plot_confusion_matrices(matrices: Sequence[tuple[float, Sequence[Sequence[int]]]],
                            class_names: Sequence[str]) -> Figure:
    """Row-normalised test confusion matrices, ``(λ, counts[true][predicted])``, a panel each."""
    n = max(len(matrices), 1)
    fig = Figure(figsize=(5.2 * n, 5.0))
    axes = np.atleast_1d(fig.subplots(1, n))
    image = None
    for i, (ax, (strength, counts)) in enumerate(
            zip(axes, sorted(matrices, key=lambda m: float(m[0])))):
        counts = np.asarray(counts, dtype=float)
        rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
        image = ax.imshow(rates, vmin=0.0, vmax=1.0, cmap="Blues")
        ticks = np.arange(len(class_names))
        ax.set_xticks(ticks, class_names, rotation=90, fontsize=7)
        # Class names on the first panel only: repeated, they would run into the neighbour.
        ax.set_yticks(ticks, class_names if i == 0 else [], fontsize=7)
        ax.set_xlabel("predicted")
        if i == 0:
            ax.set_ylabel("true")
        ax.set_title(_lam_label(strength))
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="share of the true class", shrink=0.8)
    fig.suptitle("Test confusion matrices (rows sum to 1)")
    return fig
