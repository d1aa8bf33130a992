"""Callbacks (per-epoch stats, weight histograms, divergence and signal stops) and the per-run
figures drawn from what they record."""

from __future__ import annotations

import json
import math
import os
import signal

import keras
import matplotlib.pyplot as plt
import numpy as np
import pytest

from conftest import model_cfg
from l2sweep.base import signals
from l2sweep.engine.callbacks import EpochStats, StopOnDivergence, StopOnSignal, WeightHistograms
from l2sweep.engine.model import build_model, regularization_penalty, set_seeds, weight_norms
from l2sweep.reporting.plots import plot_curves, plot_histograms, save_figure

EPOCHS = 2


make_cfg = model_cfg


@pytest.fixture(scope="module")
def data(tiny_xy):
    """The conftest's tiny (x, y) pairs: 256 train, 64 validation."""
    return tiny_xy


def fit(cfg, data, callbacks, epochs: int = EPOCHS, **kwargs):
    (x, y), val = data
    set_seeds(cfg.train.seed, cfg.train.deterministic)
    model = build_model(cfg)
    history = model.fit(x, y, validation_data=val, epochs=epochs, batch_size=cfg.train.batch_size,
                        callbacks=callbacks, verbose=0, **kwargs)
    return model, history.history


class Probe(keras.callbacks.Callback):
    """Keeps a copy of the logs each epoch end hands it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict] = []

    def on_epoch_end(self, epoch, logs=None):
        self.seen.append(dict(logs or {}))


@pytest.fixture(scope="module")
def strong_run(data):
    """One 2-epoch fit with every callback, lambda = 0.1 (strong enough to shrink weights)."""
    stats, hists, stop, probe = EpochStats(), WeightHistograms(bins=40), StopOnDivergence(), Probe()
    model, history = fit(make_cfg("regularizer=l2", "regularizer.strength=0.1"), data,
                         [stats, hists, stop, probe])
    return {"model": model, "history": history, "hists": hists, "stop": stop, "probe": probe}


# --- EpochStats --------------------------------------------------------------------------


def test_epoch_stats_reach_history_and_later_callbacks(strong_run):
    history, model = strong_run["history"], strong_run["model"]
    keys = {"penalty", "weight_norm/hidden", "weight_norm/output", "learning_rate", "epoch_time"}
    assert keys <= set(history)
    assert all(keys <= set(logs) for logs in strong_run["probe"].seen)
    assert all(len(history[k]) == EPOCHS for k in keys)
    # the last epoch's values are those of the final weights
    assert history["penalty"][-1] == pytest.approx(regularization_penalty(model), rel=1e-6)
    for name, norm in weight_norms(model).items():
        assert history[f"weight_norm/{name}"][-1] == pytest.approx(norm, rel=1e-6)
    assert history["learning_rate"] == [pytest.approx(0.001)] * EPOCHS
    assert all(t > 0 for t in history["epoch_time"])
    assert history["penalty"][1] < history["penalty"][0]  # strong L2: the penalty falls


# --- WeightHistograms --------------------------------------------------------------------


def test_histograms_count_every_weight_each_epoch(strong_run):
    data = strong_run["hists"].data
    assert set(data) == {"hidden", "output"}
    json.loads(json.dumps(data))  # JSON-serialisable as is
    for layer, size in (("hidden", 784 * 128), ("output", 128 * 10)):
        entry = data[layer]
        assert entry["size"] == size
        assert entry["epochs"] == [-1, *range(EPOCHS)]
        assert len(entry["edges"]) == 41 and entry["edges"][0] == -entry["edges"][-1]
        assert len(entry["counts"]) == EPOCHS + 1
        assert [sum(row) for row in entry["counts"]] == [size] * (EPOCHS + 1)
        assert all(len(v) == EPOCHS + 1 for v in entry["stats"].values())


def test_histograms_show_the_distribution_narrowing(strong_run, data):
    strong = strong_run["hists"].data["hidden"]["stats"]["std"]
    assert strong[-1] < strong[0]  # narrower than at init
    free = WeightHistograms()
    fit(make_cfg("regularizer=none"), data, [EpochStats(), free])
    # same seed, so the same initial weights
    assert free.data["hidden"]["stats"]["std"][0] == pytest.approx(strong[0])
    assert strong[-1] < free.data["hidden"]["stats"]["std"][-1]


def test_histograms_clip_outliers_into_edge_bins(data):
    hists = WeightHistograms(bins=10, range_factor=0.1)  # bins far narrower than the weights
    fit(make_cfg("regularizer=none"), data, [hists], epochs=1)
    entry = hists.data["hidden"]
    assert all(c > 0 for c in entry["clipped"])
    assert [sum(row) for row in entry["counts"]] == [entry["size"]] * 2
    assert entry["counts"][0][0] > 0 and entry["counts"][0][-1] > 0


@pytest.mark.parametrize("bins", [0, -3, 2.5, True])
def test_histograms_reject_bad_bins(bins):
    with pytest.raises(ValueError, match=f"bins={bins!r}"):
        WeightHistograms(bins=bins)


# --- StopOnDivergence --------------------------------------------------------------------


class PoisonWeights(keras.callbacks.Callback):
    """Sets the hidden kernel to NaN at the end of ``epoch``."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            kernel = self.model.get_layer("hidden").kernel
            kernel.assign(np.full(kernel.shape, np.nan, dtype="float32"))


def test_stop_on_nan_loss_within_the_first_epoch(data):
    (x, y), val = data
    x = x.copy()
    x[:32] = np.nan  # the first batch (no shuffling) turns the weights, then the loss, NaN
    stop = StopOnDivergence()
    cfg = make_cfg("train.steps_per_execution=1")
    _, history = fit(cfg, ((x, y), val), [EpochStats(), stop], epochs=5, shuffle=False)
    assert len(history["loss"]) == 1 < 5
    # relu may map a NaN input to 0, so the loss can stay finite for the poisoned batch
    # itself; its NaN gradient makes it NaN from the next batch on.
    assert stop.diverged and stop.diverged_epoch == 0 and stop.diverged_batch in (0, 1)
    assert math.isnan(stop.bad_value)


def test_stop_records_the_epoch_it_diverged_in(data):
    stop = StopOnDivergence()
    _, history = fit(make_cfg(), data, [EpochStats(), stop, PoisonWeights(epoch=0)], epochs=5)
    assert len(history["loss"]) == 2  # epoch 0 sound, epoch 1 diverged, then stopped
    assert stop.diverged_epoch == 1 and isinstance(stop.diverged_epoch, int)
    assert not math.isfinite(stop.bad_value)
    # a new fit resets the record
    fit(make_cfg(), data, [stop], epochs=1)
    assert not stop.diverged and stop.diverged_epoch is None and stop.bad_value is None


class SignalAt(keras.callbacks.Callback):
    """Sends this process ``signum`` at the end of training batch ``batch`` of epoch 0."""

    def __init__(self, signum: int, batch: int) -> None:
        super().__init__()
        self.signum, self.batch, self.batches_after, self.epochs_ended = signum, batch, 0, 0

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.batch:
            os.kill(os.getpid(), self.signum)
        elif batch > self.batch:
            self.batches_after += 1

    def on_epoch_end(self, epoch, logs=None):
        self.epochs_ended += 1


@pytest.mark.parametrize("signum, error", [(signal.SIGTERM, signals.Terminated),
                                           (signal.SIGINT, KeyboardInterrupt)])
def test_a_signal_during_fit_stops_at_the_next_batch_end(data, signum, error):
    sender = SignalAt(signum, batch=1)
    saved = signals.install_handlers()
    try:
        with pytest.raises(error), signals.deferred():
            # StopOnSignal first: it raises at the end of the batch the signal arrived in.
            fit(make_cfg("train.steps_per_execution=1"), data, [StopOnSignal(), sender], epochs=3)
    finally:
        signals.restore_handlers(saved)
    assert sender.batches_after == 0 and sender.epochs_ended == 0
    signals.raise_if_signalled()  # nothing left pending


def test_no_divergence_is_recorded_on_a_sound_run(strong_run):
    stop = strong_run["stop"]
    assert stop.diverged_epoch is None and stop.bad_value is None and not stop.diverged


# --- per-run figures ---------------------------------------------------------------------


def _is_png(path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_curves_saved_as_png(strong_run, tmp_path):
    fig = plot_curves(strong_run["history"], "L2 = 0.1")
    left, right = fig.axes[:2]
    assert left.get_xlabel() == right.get_xlabel() == "epoch"
    assert {"train loss", "val loss"} <= {line.get_label() for line in left.get_lines()}
    assert {"train accuracy", "val accuracy"} == {line.get_label() for line in right.get_lines()}
    path = save_figure(fig, tmp_path / "deep" / "dir" / "curves.png")
    assert _is_png(path)
    assert [p.name for p in path.parent.iterdir()] == ["curves.png"]  # no temp file left
    assert plt.get_fignums() == []


def test_plot_histograms_saved_as_png(strong_run, tmp_path):
    data = strong_run["hists"].data
    for layer in data:
        # both the whole mapping and one layer's entry are accepted
        for source in (data, data[layer]):
            path = save_figure(plot_histograms(source, layer, f"{layer} weights", log_y=True),
                               tmp_path / f"{layer}.png")
            assert _is_png(path)
    with pytest.raises(KeyError, match="'conv9'"):
        plot_histograms(data, "conv9", "missing")
