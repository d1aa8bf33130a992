"""Callbacks (per-epoch stats, weight histograms, divergence stop, MLflow logging) and the
per-run figures drawn from what they record."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import keras
import matplotlib.pyplot as plt
import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import model_cfg
from l2sweep.tracking import runs as tracking
from l2sweep.engine.callbacks import (EpochStats, MlflowEpochLogger, MlflowRunLogger, StopOnDivergence,
                               StopOnSignal, WeightHistograms)
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


class CountingClient:
    """Wraps an MlflowClient and records each log_batch call (to prove one per epoch)."""

    def __init__(self, client: MlflowClient) -> None:
        self.client = client
        self.calls: list[list[str]] = []

    def log_batch(self, run_id, metrics=(), **kwargs):
        self.calls.append([m.key for m in metrics])
        return self.client.log_batch(run_id, metrics=metrics, **kwargs)


class Probe(keras.callbacks.Callback):
    """Keeps a copy of the logs each epoch end hands it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict] = []

    def on_epoch_end(self, epoch, logs=None):
        self.seen.append(dict(logs or {}))


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """One real sqlite MLflow store for the module (creating one runs migrations, ~2 s)."""
    root = tmp_path_factory.mktemp("mlflow")
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment_id = client.create_experiment("callbacks", artifact_location=(root / "artifacts").as_uri())
    return client, experiment_id


@pytest.fixture(scope="module")
def strong_run(data, mlflow_store):
    """One 2-epoch fit with every callback, lambda = 0.1 (strong enough to shrink weights)."""
    client, experiment_id = mlflow_store
    run_id = client.create_run(experiment_id).info.run_id
    counting = CountingClient(client)
    stats, hists, stop, probe = EpochStats(), WeightHistograms(bins=40), StopOnDivergence(), Probe()
    logger = MlflowEpochLogger(counting, run_id)
    model, history = fit(make_cfg("regularizer=l2", "regularizer.strength=0.1"), data,
                         [stats, hists, stop, logger, probe])
    return {"model": model, "history": history, "hists": hists, "stop": stop, "probe": probe,
            "client": client, "counting": counting, "run_id": run_id}


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


@pytest.mark.parametrize("signum, error", [(signal.SIGTERM, tracking.Terminated),
                                           (signal.SIGINT, KeyboardInterrupt)])
def test_a_signal_during_fit_stops_at_the_next_batch_end(data, signum, error):
    sender = SignalAt(signum, batch=1)
    saved = tracking.install_signal_handlers()
    try:
        with pytest.raises(error), tracking.deferred_signals():
            # StopOnSignal first: it raises at the end of the batch the signal arrived in.
            fit(make_cfg("train.steps_per_execution=1"), data, [StopOnSignal(), sender], epochs=3)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert sender.batches_after == 0 and sender.epochs_ended == 0
    tracking.raise_if_signalled()  # nothing left pending


def test_no_divergence_is_recorded_on_a_sound_run(strong_run):
    stop = strong_run["stop"]
    assert stop.diverged_epoch is None and stop.bad_value is None and not stop.diverged


# --- MlflowEpochLogger -------------------------------------------------------------------


def test_mlflow_gets_every_metric_once_per_epoch(strong_run):
    client, run_id = strong_run["client"], strong_run["run_id"]
    calls = strong_run["counting"].calls
    assert len(calls) == EPOCHS  # one log_batch per epoch, nothing per step
    assert set(calls[0]) == set(strong_run["history"])  # every numeric log, incl. EpochStats'
    for key in ("loss", "val_loss", "accuracy", "val_accuracy", "data_loss", "val_data_loss",
                "penalty", "weight_norm/hidden", "weight_norm/output"):
        points = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [m.step for m in points] == list(range(EPOCHS)), key
        assert [m.value for m in points] == pytest.approx(strong_run["history"][key], rel=1e-6), key


def test_mlflow_logger_keeps_non_finite_values_and_skips_non_numbers(mlflow_store):
    client, experiment_id = mlflow_store
    run_id = client.create_run(experiment_id).info.run_id
    logger = MlflowEpochLogger(client, run_id)
    logger.on_epoch_end(3, {"loss": float("nan"), "val_loss": float("inf"), "note": "text",
                            "flag": True, "accuracy": np.float32(0.5)})
    metrics = client.get_run(run_id).data.metrics
    assert set(metrics) == {"loss", "val_loss", "accuracy"}
    assert math.isnan(metrics["loss"]) and metrics["val_loss"] > 1e300 and metrics["accuracy"] == 0.5
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [3]


def test_mlflow_logger_validates_its_arguments(mlflow_store):
    client, _ = mlflow_store
    with pytest.raises(TypeError, match="client='not a client'"):
        MlflowEpochLogger("not a client", "abc")
    with pytest.raises(ValueError, match="run_id=''"):
        MlflowEpochLogger(client, "")
    with pytest.raises(ValueError, match="run_id=None"):
        MlflowEpochLogger(client, None)
    with pytest.raises(TypeError, match="on_error='log'"):
        MlflowEpochLogger(client, "abc", on_error="log")


class GoneClient:
    """A store that has gone away: every log_batch fails."""

    calls = 0

    def log_batch(self, run_id, metrics=(), **kwargs):
        self.calls += 1
        raise ConnectionError("server gone")


def test_mlflow_logger_with_on_error_keeps_training_and_reports_the_missing_epochs():
    client, reported = GoneClient(), []
    logger = MlflowEpochLogger(client, "abc", on_error=lambda what, exc: reported.append((what, str(exc))))
    logger.on_train_begin()
    for epoch in range(3):
        logger.on_epoch_end(epoch, {"loss": 1.0})
    logger.on_train_end()
    assert reported == [("metrics of epochs 0-2", "server gone")]
    assert client.calls == 1  # not asked again once it failed
    with pytest.raises(ConnectionError):  # without on_error, the failure stops training
        MlflowEpochLogger(GoneClient(), "abc").on_epoch_end(0, {"loss": 1.0})


def _pending_run(create) -> tuple[tracking.ChildRun, threading.Event]:
    """A ChildRun whose creation (``create(handle)``) runs on a thread once the event is set,
    as the deferred MLflow start creates the first job's run while it trains."""
    handle, go = tracking.ChildRun(None, None, "l2-test"), threading.Event()
    handle.enabled = True

    def created():
        go.wait(30)
        create(handle)

    handle.created = ThreadPoolExecutor(1).submit(created)
    return handle, go


def test_run_logger_keeps_the_epochs_until_the_run_exists_then_logs_each(mlflow_store):
    client, experiment_id = mlflow_store
    counting = CountingClient(client)

    def create(handle):
        handle._client, handle._run_id = counting, client.create_run(experiment_id).info.run_id

    run, go = _pending_run(create)
    logger = MlflowRunLogger(run)
    logger.on_train_begin()
    logger.on_epoch_end(0, {"loss": 3.0})
    logger.on_epoch_end(1, {"loss": 2.0})
    assert counting.calls == []  # the run does not exist yet: nothing waits on it
    go.set()
    run.created.result()
    logger.on_epoch_end(2, {"loss": 1.0})
    run.wait()  # handed to the tracking thread: training does not wait for the store
    assert len(counting.calls) == 3  # the kept epochs, then this one: one call per epoch
    logger.on_epoch_end(3, {"loss": 0.5})
    logger.on_train_end()
    run.wait()
    history = client.get_metric_history(run.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 3.0), (1, 2.0), (2, 1.0), (3, 0.5)]
    assert run.unlogged == []


def test_run_logger_hands_the_last_epochs_over_at_the_end_of_training(mlflow_store):
    client, experiment_id = mlflow_store

    def create(handle):
        handle._client, handle._run_id = client, client.create_run(experiment_id).info.run_id

    run, go = _pending_run(create)
    logger = MlflowRunLogger(run)
    logger.on_train_begin()
    for epoch in range(2):
        logger.on_epoch_end(epoch, {"loss": 1.0 / (epoch + 1)})
    # The run is created only after the last epoch: on_train_end does not wait for it, the
    # run's end does (ChildRun.wait).
    logger.on_train_end()
    threading.Timer(0.2, go.set).start()
    run.wait()
    assert [m.step for m in client.get_metric_history(run.run_id, "loss")] == [0, 1]


def test_run_logger_reports_the_epochs_of_a_run_that_could_not_be_created():
    run, go = _pending_run(lambda handle: handle.not_logged("the run", OSError("database disk image is malformed")))
    logger = MlflowRunLogger(run)
    logger.on_train_begin()
    for epoch in range(3):
        logger.on_epoch_end(epoch, {"loss": 1.0})
    go.set()
    logger.on_train_end()
    run.wait()
    assert run.run_id is None
    assert run.unlogged == ["the run", "metrics of epochs 0-2"]
    assert run.tracking_error == "database disk image is malformed"


def test_run_logger_validates_its_argument():
    with pytest.raises(TypeError, match="run=.*ChildRun"):
        MlflowRunLogger("abc")


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
