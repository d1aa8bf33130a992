"""Figures: per-run curves and weight histograms, and comparisons across configurations (λ, or
kind and λ in a comparison of kinds: :func:`l2sweep.reporting.summaries.config_label`).

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

from l2sweep.reporting import dvc_data, summaries  # noqa: E402

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


# --- comparison figures (across configurations) --------------------------------------------
# Inputs are ``history.json`` contents; epochs are drawn as recorded (from 0, like MLflow's
# steps), one line or panel per configuration (the mean over its seeds and folds). A λ axis is
# logarithmic (symlog when the grid holds 0).

#: Panels per row of the figures with one panel per configuration.
PANELS_PER_ROW = 5


def _lam_label(label: Any, diverged_epoch: Any = None) -> str:
    """``λ=0.001`` for a strength (or its label), a comparison's label (``l2-0.001``) as it is."""
    try:
        text = f"λ={float(label):g}"
    except ValueError:
        text = str(label)
    return text if diverged_epoch is None else f"{text} (diverged at epoch {diverged_epoch})"


def _panels(fig: Figure, n: int, **options: Any) -> list[Any]:
    """``n`` axes in rows of at most :data:`PANELS_PER_ROW` (the spare ones hidden)."""
    cols = max(min(n, PANELS_PER_ROW), 1)
    axes = list(np.atleast_1d(fig.subplots(-(-max(n, 1) // cols), cols, squeeze=False, **options))
                .ravel())
    for ax in axes[max(n, 1):]:
        ax.set_visible(False)
    return axes[:max(n, 1)]


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
    label = _lam_label(curve["lambda"], curve.get("diverged_epoch"))
    return label + (f", n={curve['n']}" if curve["n"] > 1 else "")


def plot_val_loss_by_lambda(histories: Sequence[Mapping[str, Any]]) -> Figure:
    """Validation loss per epoch, one line per configuration: the mean over its seeds (and
    folds) with a 95% confidence band (:func:`l2sweep.reporting.summaries.curves_by_lambda`), each
    mean's minimum starred.

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
    fig.suptitle("Validation loss per epoch, by configuration: mean over seeds (and folds), "
                 "band = 95% CI of the mean")
    return fig


def plot_accuracy_by_lambda(histories: Sequence[Mapping[str, Any]]) -> Figure:
    """Train vs validation accuracy per epoch, one panel per configuration (shared y axis, rows
    of :data:`PANELS_PER_ROW`): the mean over seeds (and folds) with a 95% confidence band."""
    curves = summaries.curves_by_lambda(histories, ["accuracy", "val_accuracy"])
    rows = -(-max(len(curves), 1) // PANELS_PER_ROW)
    fig = Figure(figsize=(4.2 * min(max(len(curves), 1), PANELS_PER_ROW), 4.2 * rows))
    axes = _panels(fig, len(curves), sharey=True)
    for ax, curve in zip(axes, curves):
        for key, label, style, color in (("accuracy", "train", "-", "C0"),
                                         ("val_accuracy", "validation", "--", "C1")):
            if any(v is not None for v in curve["metrics"][key]["mean"]):
                _mean_line(ax, curve["epochs"], curve["metrics"][key], color, style, label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _finish(ax, "epoch", None, _seeds_label(curve), legend={})
    axes[0].set_ylabel("accuracy")
    fig.suptitle("Train vs validation accuracy per epoch, by configuration: mean over seeds (and "
                 "folds), band = 95% CI")
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


def plot_confusion_matrices(matrices: Sequence[tuple[Any, Sequence[Sequence[int]]]],
                            class_names: Sequence[str]) -> Figure:
    """Row-normalised test confusion matrices, ``(label, counts[true][predicted])`` in the order
    given (the label: λ or a configuration's label), a panel each, rows of :data:`PANELS_PER_ROW`."""
    n = max(len(matrices), 1)
    fig = Figure(figsize=(5.2 * min(n, PANELS_PER_ROW), 5.0 * -(-n // PANELS_PER_ROW)))
    axes = _panels(fig, n)
    image = None
    for i, (ax, (strength, counts)) in enumerate(zip(axes, matrices)):
        counts = np.asarray(counts, dtype=float)
        rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
        image = ax.imshow(rates, vmin=0.0, vmax=1.0, cmap="Blues")
        ticks = np.arange(len(class_names))
        ax.set_xticks(ticks, class_names, rotation=90, fontsize=7)
        # Class names on the first panel only: repeated, they would run into the neighbour.
        ax.set_yticks(ticks, class_names if i % PANELS_PER_ROW == 0 else [], fontsize=7)
        ax.set_xlabel("predicted")
        if i % PANELS_PER_ROW == 0:
            ax.set_ylabel("true")
        ax.set_title(_lam_label(strength))
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="share of the true class", shrink=0.8)
    fig.suptitle("Test confusion matrices (rows sum to 1)")
    return fig


def plot_by_kind(lines: Sequence[Mapping[str, Any]], ylabel: str, title: str,
                 percent: bool = False) -> Figure:
    """Final values against the strength in a comparison of kinds, on a log axis: one marked line
    per entry of ``lines`` (``label``, ``kind``, ``points``: ``(strength, mean, low, high)``,
    ``dashed``), coloured by kind, error bars where there is an interval. A line's point at
    strength 0 (``none``) is a horizontal reference line, its interval a band."""
    kinds = sorted({line["kind"] for line in lines})
    scale = 100.0 if percent else 1.0
    fig = Figure(figsize=(7.2, 4.8))
    ax = fig.subplots()
    for line in lines:
        color = f"C{kinds.index(line['kind']) % 10}"
        points = [(float(x), *(_finite_array(v) * scale)) for x, *v in line["points"]]
        for x, mean, low, high in points:
            if x <= 0 and np.isfinite(mean):
                ax.axhline(mean, color=color, linestyle="-." if line.get("dashed") else ":",
                           label=f"{line['label']} (reference)")
                if np.isfinite(low):
                    ax.axhspan(low, high, color=color, alpha=0.12, linewidth=0)
        drawn = sorted(p for p in points if p[0] > 0 and np.isfinite(p[1]))
        if drawn:
            xs, ys, low, high = (np.asarray(v) for v in zip(*drawn))
            ax.plot(xs, ys, "--" if line.get("dashed") else "-", marker="o", color=color,
                    label=line["label"])
            ok = np.isfinite(low)
            ax.errorbar(xs[ok], ys[ok], yerr=np.vstack([ys[ok] - low[ok], high[ok] - ys[ok]]),
                        fmt="none", ecolor=color, capsize=3)
    if any(x > 0 for line in lines for x, *_ in line["points"]):
        ax.set_xscale("log")
    _finish(ax, "strength (λ, dropout rate or decay; each kind its own grid; log scale)",
            f"{ylabel} (%)" if percent else ylabel, title, legend={"fontsize": 8})
    return fig


def sweep_figures(evaluation: Mapping[str, Any], histories: Sequence[Mapping[str, Any]]
                  ) -> list[tuple[str, str, Figure]]:
    """The sweep's comparison figures as ``(caption, file name, figure)``, from the means over
    seeds (and folds; bands and error bars: 95% t-intervals of the mean, none with one seed):
    curves per configuration, final values against λ (per kind in a comparison:
    :func:`plot_by_kind`), test confusion matrices pooled per configuration. A figure without any
    value is left out (a cross-validation's folds have no test scores)."""
    band = "mean over seeds, band = 95% CI of the mean"
    figures = []
    if any(h["metrics"].get("val_loss") for h in histories if not h.get("refit")):
        figures += [(f"Validation loss per epoch, by configuration ({band})", "val_loss.png",
                     plot_val_loss_by_lambda(histories)),
                    (f"Train vs validation accuracy per configuration ({band})", "accuracy.png",
                     plot_accuracy_by_lambda(histories))]
    figures += _final_value_figures(evaluation)
    compared = len(summaries.kinds_of(evaluation["runs"].values())) > 1
    pooled: dict[str, np.ndarray] = {}  # counts summed over seeds: rates pool every seed
    for run in sorted(evaluation["runs"].values(), key=lambda r: (str(r.get("regularizer") or ""),
                                                                  float(r["strength"]))):
        if run.get("confusion_matrix"):
            counts = np.asarray(run["confusion_matrix"], dtype=np.int64)
            label = summaries.config_label(run, compared) + (" (refit)" if run.get("refit") else "")
            pooled[label] = pooled[label] + counts if label in pooled else counts
    if pooled:
        figures.append(("Test confusion matrices (counts pooled over seeds)",
                        "confusion_matrices.png",
                        plot_confusion_matrices(list(pooled.items()),
                                                evaluation["sweep"]["class_names"])))
    return figures


def _final_value_figures(evaluation: Mapping[str, Any]) -> list[tuple[str, str, Figure]]:
    """:func:`sweep_figures`' final values against λ: weight norm, accuracy, near-zero share."""
    configs = list(dvc_data.configurations(evaluation).values())
    kinds = sorted({c["kind"] for c in configs})
    stat = lambda name: [c["metrics"][name] for c in configs]  # noqa: E731
    norms = {"all layers": stat("weight_norm_total")}
    if len(kinds) == 1:  # per layer too (in a comparison of kinds, too many lines)
        for layer in sorted({k for c in configs for k in c["weight_norm_layers"]}):
            norms[layer] = [c["weight_norm_layers"].get(layer, summaries.mean_ci([]))
                            for c in configs]
    accuracy = {"test": stat("test_accuracy"), "validation (final epoch)": stat("val_accuracy")}
    what = "Test accuracy vs λ"
    cv = dvc_data.cross_validation(evaluation)
    if cv:  # the folds have no test scores: the refit's, at the strength chosen
        what = "Validation accuracy vs λ (mean over folds), test accuracy of the refit"
        refit = {"mean": cv["test_accuracy"], "low": None, "high": None}
        accuracy = {"validation (final epoch)": accuracy["validation (final epoch)"],
                    "test (refit on the whole pool)": [
                        refit if c["strength"] == cv["chosen"] else summaries.mean_ci([])
                        for c in configs]}
    specs = [("Final weight norm vs λ", "weight_norm_vs_lambda.png", "final weight norm", False,
              norms),
             (what, "test_accuracy_vs_lambda.png", "accuracy", True, accuracy),
             (f"Share of the regularized weights with |w| < {summaries.NEAR_ZERO:g} vs λ",
              "near_zero_vs_lambda.png", "weights near zero", True,
              {"near zero": stat("near_zero_share")})]
    figures = []
    for title, name, ylabel, percent, series in specs:
        series = {k: v for k, v in series.items() if any(s["mean"] is not None for s in v)}
        if series:  # else every value is missing: no figure rather than an empty one
            figures.append((f"{title} (mean over seeds ± 95% CI of the mean)", name,
                            _final_value_figure(configs, kinds, series, ylabel, title, percent)))
    return figures


def _final_value_figure(configs: Sequence[Mapping[str, Any]], kinds: Sequence[str],
                        series: Mapping[str, Sequence[Mapping[str, Any]]], ylabel: str,
                        title: str, percent: bool) -> Figure:
    """One figure of :func:`_final_value_figures`: ``series`` (label -> a :func:`mean_ci` per
    configuration) against λ, or per kind against its strength in a comparison of kinds."""
    if len(kinds) == 1:
        return plot_vs_lambda([c["strength"] for c in configs],
                              {k: [s["mean"] for s in v] for k, v in series.items()}, ylabel,
                              title, percent=percent,
                              intervals={k: [(s["low"], s["high"]) for s in v]
                                         for k, v in series.items()})
    lines = [{"label": f"{kind}: {label}" if len(series) > 1 else kind, "kind": kind,
              "dashed": i > 0, "points": [(c["strength"], s["mean"], s["low"], s["high"])
                                          for c, s in zip(configs, values) if c["kind"] == kind]}
             for i, (label, values) in enumerate(series.items()) for kind in kinds]
    return plot_by_kind(lines, ylabel, title.replace("λ", "strength, per kind"), percent)
