"""Figures: per-run curves and weight histograms (and, below, comparisons across lambdas).

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot's global
state; :func:`save_figure` writes it atomically and closes it. The Agg backend is selected
at import, so figures render without a display (CI, servers, DVC stages).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
from matplotlib import cm, colors  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


# --- saving -------------------------------------------------------------------------------


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 110, tight: bool = True) -> Path:
    """Writes ``fig`` to ``path`` atomically (temp file + rename) and closes it.

    Args:
        fig: the figure.
        path: the target file; its suffix picks the format (``.png``, ``.svg``, ``.pdf``);
            parent folders are created.
        dpi: resolution of raster formats.
        tight: crop to the drawn content (``bbox_inches="tight"``, which lays the figure out
            twice); False keeps the figure's own margins (the per-run figures set theirs,
            :data:`RUN_FIGURE_MARGINS`).

    Returns:
        The path written.
    """
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


# --- per-run figures ----------------------------------------------------------------------

#: Fixed margins of the per-run figures (12 x 4.6 in, two panels): room for their tick labels,
#: axis labels, colour bar and titles, so they are saved without a second layout pass
#: (``save_figure(..., tight=False)``).
RUN_FIGURE_MARGINS = {"left": 0.07, "right": 0.98, "bottom": 0.12, "top": 0.86, "wspace": 0.25}


def _epochs(values: Sequence[float]) -> np.ndarray:
    return np.arange(1, len(values) + 1)


def plot_curves(metrics: Mapping[str, Sequence[float]], title: str,
                show_data_loss: bool = True) -> Figure:
    """The seeds' two-panel training figure: loss (left) and accuracy (right) per epoch.

    Args:
        metrics: per-epoch values keyed as in ``History.history`` (``loss``, ``val_loss``,
            ``accuracy``, ``val_accuracy``; ``data_loss`` and ``val_data_loss`` optional).
            Missing keys are left out of the figure.
        title: figure title, e.g. ``"L2 = 0.001"``.
        show_data_loss: also draw the cross-entropy without the penalty (dashed), so the
            gap to ``loss`` shows the penalty.

    Returns:
        The figure (epochs on the x axis start at 1).
    """
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
            ax.plot(_epochs(values), values, line, color=color, marker="o", markersize=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(ylabel.capitalize())
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(title)
    return fig


def _layer_entry(hist_data: Mapping[str, Any], layer: str) -> Mapping[str, Any]:
    if "edges" in hist_data:  # already one layer's entry
        return hist_data
    if layer not in hist_data:
        raise KeyError(f"layer={layer!r} has no histogram data; layers: {sorted(hist_data)}")
    return hist_data[layer]


def plot_histograms(hist_layer_data: Mapping[str, Any], layer: str, title: str,
                    log_y: bool = False, cmap: str = "viridis") -> Figure:
    """One layer's weight distribution over the epochs.

    Left: step histograms on the layer's fixed bins, coloured by epoch (colour bar; the
    initial weights are epoch -1, drawn dashed in grey). Right: the median and the 25-75 and
    5-95 percentile bands per epoch, so the narrowing under a penalty reads at a glance.

    Args:
        hist_layer_data: :attr:`l2sweep.engine.callbacks.WeightHistograms.data` (all layers), or
            one layer's entry of it.
        layer: the layer to draw (e.g. ``"hidden"``).
        title: figure title.
        log_y: logarithmic count axis (shows the tails).
        cmap: Matplotlib colormap of the epochs.

    Returns:
        The figure.

    Raises:
        KeyError: if ``layer`` is not in the data (the message lists the layers there).
    """
    entry = _layer_entry(hist_layer_data, layer)
    fig = Figure(figsize=(12, 4.6))
    fig.subplots_adjust(**RUN_FIGURE_MARGINS)
    ax_hist, ax_band = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    _draw_histograms(fig, ax_hist, entry, layer, log_y, cmap)
    _draw_percentiles(ax_band, list(entry["epochs"]), entry.get("stats") or {})
    fig.suptitle(title)
    return fig


def _draw_histograms(fig: Figure, ax: Any, entry: Mapping[str, Any], layer: str, log_y: bool,
                     cmap: str) -> None:
    """Step histograms coloured by epoch, with a colour bar; the initial weights dashed."""
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
    ax.set_xlabel("weight value")
    ax.set_ylabel("count")
    if log_y:
        ax.set_yscale("log")
    ax.set_title(f"{layer}: kernel weights per epoch")
    ax.grid(alpha=0.3)
    if -1 in epochs:
        ax.legend(loc="upper right")
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=colormap), ax=ax, label="epoch")


def _draw_percentiles(ax: Any, epochs: list[int], stats: Mapping[str, Any]) -> None:
    """The median and the 25-75 and 5-95 percentile bands per epoch (when the data has them)."""
    if all(k in stats for k in ("p5", "p25", "p50", "p75", "p95")):
        x = np.asarray(epochs)
        ax.fill_between(x, stats["p5"], stats["p95"], alpha=0.2, color="C0", label="5-95%")
        ax.fill_between(x, stats["p25"], stats["p75"], alpha=0.4, color="C0", label="25-75%")
        ax.plot(x, stats["p50"], color="C0", label="median")
        if "std" in stats:
            ax.plot(x, stats["std"], color="C3", linestyle=":", label="std")
        ax.axhline(0.0, color="0.5", linewidth=0.8)
        ax.legend(loc="best")
    ax.set_xlabel("epoch (-1 = init)")
    ax.set_ylabel("weight value")
    ax.set_title("percentiles")
    ax.grid(alpha=0.3)


# --- comparison figures (across lambdas) ----------------------------------------------------
#
# Inputs are ``history.json`` contents (``strength``, ``epochs``, ``metrics``,
# ``diverged_epoch``); epochs are drawn as recorded (from 0, like MLflow's steps and the
# report's "best epoch"). Where lambda is the x axis it is logarithmic (symlog when the grid
# holds 0, which a log axis cannot show).

from matplotlib.ticker import MaxNLocator  # noqa: E402


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


def _lambda_axis(ax: Any, strengths: Sequence[float]) -> None:
    if any(s <= 0 for s in strengths):
        positive = [s for s in strengths if s > 0]
        ax.set_xscale("symlog", linthresh=min(positive) if positive else 1.0)
    else:
        ax.set_xscale("log")
    ax.set_xticks(list(strengths))
    ax.set_xticklabels([f"{s:g}" for s in strengths])
    ax.minorticks_off()
    ax.set_xlabel("λ (L2 strength, log scale)")


def plot_val_loss_by_lambda(histories: Sequence[Mapping[str, Any]]) -> Figure:
    """Validation loss per epoch, one line per λ, the minimum of each marked.

    Left: Keras' ``val_loss`` (includes the penalty). Right, when the histories have it:
    ``val_data_loss``, the cross-entropy alone, which compares across λ.

    Args:
        histories: one ``history.json`` content per λ.

    Returns:
        The figure.
    """
    keys = [("val_loss", "val_loss (with penalty)")]
    if any(h["metrics"].get("val_data_loss") for h in histories):
        keys.append(("val_data_loss", "validation cross-entropy (no penalty)"))
    fig = Figure(figsize=(6.2 * len(keys), 4.6))
    axes = np.atleast_1d(fig.subplots(1, len(keys)))
    for ax, (key, title) in zip(axes, keys):
        for i, h in enumerate(_by_strength(histories)):
            values = _finite_array(h["metrics"].get(key, []))
            if not len(values) or np.isnan(values).all():
                continue
            epochs = np.asarray(h["epochs"][:len(values)])
            color = f"C{i % 10}"
            ax.plot(epochs, values, marker="o", markersize=3, color=color,
                    label=_lam_label(h["strength"], h.get("diverged_epoch")))
            best = int(np.nanargmin(values))
            ax.plot(epochs[best], values[best], marker="*", markersize=12, color=color,
                    markeredgecolor="black", linestyle="none")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(title="★ = minimum")
    fig.suptitle("Validation loss per epoch, by λ")
    return fig


def plot_accuracy_by_lambda(histories: Sequence[Mapping[str, Any]]) -> Figure:
    """Train vs validation accuracy per epoch, one panel per λ (shared y axis).

    Args:
        histories: one ``history.json`` content per λ.

    Returns:
        The figure.
    """
    ordered = _by_strength(histories)
    fig = Figure(figsize=(4.2 * max(len(ordered), 1), 4.2))
    axes = np.atleast_1d(fig.subplots(1, max(len(ordered), 1), sharey=True))
    for ax, h in zip(axes, ordered):
        for key, label, style in (("accuracy", "train", "-"), ("val_accuracy", "validation", "--")):
            values = _finite_array(h["metrics"].get(key, []))
            if len(values):
                ax.plot(np.asarray(h["epochs"][:len(values)]), values, style, marker="o",
                        markersize=3, label=label)
        ax.set_title(_lam_label(h["strength"], h.get("diverged_epoch")))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    axes[0].set_ylabel("accuracy")
    fig.suptitle("Train vs validation accuracy per epoch, by λ")
    return fig


def plot_vs_lambda(strengths: Sequence[float], series: Mapping[str, Sequence[Any]],
                   ylabel: str, title: str, percent: bool = False) -> Figure:
    """One or more final values against λ (log x axis), one marked line per series.

    Args:
        strengths: the λ grid (x values).
        series: legend label -> one value per λ (None where a run has none, e.g. diverged).
        ylabel: the y axis label.
        title: the figure title.
        percent: values are fractions shown as percentages.

    Returns:
        The figure.
    """
    order = np.argsort(np.asarray(strengths, dtype=float))
    xs = np.asarray(strengths, dtype=float)[order]
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.subplots()
    for i, (label, values) in enumerate(series.items()):
        ys = _finite_array(values)[order] * (100.0 if percent else 1.0)
        ax.plot(xs, ys, marker="o", color=f"C{i % 10}", label=label)
        for x, y in zip(xs, ys):
            if np.isfinite(y):
                ax.annotate(f"{y:.2f}" if percent else f"{y:.4g}", (x, y),
                            textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    if series:  # a λ without any value (a diverged run) gets a dotted marker line
        stacked = np.array([_finite_array(v)[order] for v in series.values()])
        for x, column in zip(xs, stacked.T):
            if np.isnan(column).all():
                ax.axvline(x, color="0.6", linestyle=":", label=f"λ={x:g}: no value")
    _lambda_axis(ax, list(xs))
    ax.set_ylabel(f"{ylabel} (%)" if percent else ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_confusion_matrices(matrices: Sequence[tuple[float, Sequence[Sequence[int]]]],
                            class_names: Sequence[str]) -> Figure:
    """Row-normalised test confusion matrices, one panel per λ.

    Args:
        matrices: ``(λ, counts)`` with ``counts[true][predicted]``.
        class_names: label of each class, in index order.

    Returns:
        The figure (the diagonal is each class's test accuracy).
    """
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
        # Class names on the first panel only: the panels share them, and repeating them
        # would run into the neighbouring panel.
        ax.set_yticks(ticks, class_names if i == 0 else [], fontsize=7)
        ax.set_xlabel("predicted")
        if i == 0:
            ax.set_ylabel("true")
        ax.set_title(_lam_label(strength))
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="share of the true class", shrink=0.8)
    fig.suptitle("Test confusion matrices (rows sum to 1)")
    return fig
