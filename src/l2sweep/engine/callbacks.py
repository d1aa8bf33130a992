"""Keras callbacks: per-epoch statistics, weight histograms, divergence stop, MLflow logging.

A training run uses them in this order (``EpochStats`` must come first, so every callback
after it, and Keras' ``History``, sees the values it adds to ``logs``)::

    stats = EpochStats()
    hists = WeightHistograms(bins=cfg.tracking.histogram_bins)
    stop = StopOnDivergence()
    mlf = MlflowEpochLogger(client, run_id)     # or MlflowRunLogger(run) for a ChildRun
    model.fit(..., callbacks=[stats, hists, stop, mlf])
"""

from __future__ import annotations

import functools
import math
import numbers
import time
from typing import Any, Callable, Optional

import keras
import numpy as np

from l2sweep.engine.model import kernel_layers, regularization_penalty, weight_norms

#: Percentiles recorded per layer and epoch by :class:`WeightHistograms`.
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
#: MLflow's cap on metrics per ``log_batch`` call (mlflow.utils.validation).
MAX_METRICS_PER_BATCH = 1000


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class EpochStats(keras.callbacks.Callback):
    """Adds the regularization statistics of each epoch to ``logs``.

    At every epoch end it writes, into the ``logs`` dict Keras passes along (so callbacks
    placed after it and ``model.history`` see them):

    * ``penalty``: the regularization term at the epoch's final weights
      (:func:`l2sweep.engine.model.regularization_penalty`); 0.0 without a penalty.
    * ``weight_norm/<layer>``: the L2 norm of each kernel (:func:`l2sweep.engine.model.weight_norms`).
    * ``learning_rate``: the optimizer's current learning rate.
    * ``epoch_time``: wall-clock seconds of the epoch, validation included.

    Place it **first** in the callback list: Keras calls callbacks in list order with the
    same ``logs`` dict, so a callback before it would not see these keys.

    It takes no arguments.

    Example:
        >>> stats = EpochStats()
        >>> history = model.fit(x, y, epochs=2, callbacks=[stats, MlflowEpochLogger(client, run_id)])
        >>> history.history["weight_norm/hidden"]
    """

    def __init__(self) -> None:
        super().__init__()
        self._epoch_start: Optional[float] = None

    def on_train_begin(self, logs: Optional[dict] = None) -> None:
        self._epoch_start = None

    def on_epoch_begin(self, epoch: int, logs: Optional[dict] = None) -> None:
        self._epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        # Not ``logs or {}``: the values must land in the caller's dict even if it is empty.
        logs = logs if logs is not None else {}
        now = time.perf_counter()
        logs["penalty"] = regularization_penalty(self.model)
        for name, norm in weight_norms(self.model).items():
            logs[f"weight_norm/{name}"] = norm
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        logs["epoch_time"] = now - self._epoch_start if self._epoch_start is not None else float("nan")


class WeightHistograms(keras.callbacks.Callback):
    """Records each kernel's weight distribution at the start of training and every epoch end.

    Bin edges are fixed per layer at ``on_train_begin`` (symmetric, ``±1.5 * max|w_init|``)
    so the histograms of all epochs share one x axis; weights outside the range are counted
    in the edge bins (and in ``clipped``), so each epoch's counts sum to the layer's number
    of weights (NaN/inf weights of a diverged run are left out of counts and statistics).
    The initial weights are recorded as epoch ``-1``.

    After ``fit``, :attr:`data` holds (JSON-serialisable)::

        {layer: {"edges": [bins + 1 floats], "size": n_weights,
                 "epochs": [-1, 0, 1, ...], "counts": [[bins ints] per epoch],
                 "clipped": [int per epoch],
                 "stats": {"mean" | "std" | "min" | "max" | "abs_mean" | "p1" ... "p99":
                           [float per epoch]}}}

    Args:
        bins: number of bins per layer (``tracking.histogram_bins``).
        range_factor: half-width of the bins as a multiple of the initial ``max|w|``.

    Example:
        >>> hists = WeightHistograms(bins=50)
        >>> model.fit(x, y, epochs=10, callbacks=[EpochStats(), hists])
        >>> json.dump(hists.data, open("histograms.json", "w"))
    """

    def __init__(self, bins: int = 50, range_factor: float = 1.5) -> None:
        super().__init__()
        if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
            raise ValueError(f"bins={bins!r} is not allowed: a positive integer")
        if (isinstance(range_factor, bool) or not _is_number(range_factor)
                or not math.isfinite(range_factor) or range_factor <= 0):
            raise ValueError(f"range_factor={range_factor!r} is not allowed: a finite number > 0")
        self.bins = int(bins)
        self.range_factor = float(range_factor)
        self.data: dict[str, dict[str, Any]] = {}

    def on_train_begin(self, logs: Optional[dict] = None) -> None:
        self.data = {}
        for layer in kernel_layers(self.model):
            w = keras.ops.convert_to_numpy(layer.kernel).ravel()
            half = float(np.max(np.abs(w))) * self.range_factor if w.size else 0.0
            if not math.isfinite(half) or half <= 0.0:
                half = 1.0  # all-zero (or broken) init: any symmetric range will do
            self.data[layer.name] = {
                "edges": np.linspace(-half, half, self.bins + 1).tolist(),
                "size": int(w.size),
                "epochs": [],
                "counts": [],
                "clipped": [],
                "stats": {key: [] for key in self._stat_keys()},
            }
        self._record(-1)

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        self._record(int(epoch))

    @staticmethod
    def _stat_keys() -> list[str]:
        return ["mean", "std", "min", "max", "abs_mean"] + [f"p{p}" for p in PERCENTILES]

    def _record(self, epoch: int) -> None:
        for layer in kernel_layers(self.model):
            entry = self.data.get(layer.name)
            if entry is None:
                continue
            w = keras.ops.convert_to_numpy(layer.kernel).astype(np.float64).ravel()
            edges = np.asarray(entry["edges"])
            finite = w[np.isfinite(w)]
            # Clip into the fixed range so every weight is counted (np.histogram drops
            # values outside the edges and NaNs); the edge bins absorb the tails.
            clipped = np.clip(finite, edges[0], edges[-1])
            counts, _ = np.histogram(clipped, bins=edges)
            entry["epochs"].append(epoch)
            entry["counts"].append(counts.astype(int).tolist())
            entry["clipped"].append(int(np.sum((finite < edges[0]) | (finite > edges[-1]))))
            stats = entry["stats"]
            if finite.size:
                values = [finite.mean(), finite.std(), finite.min(), finite.max(), np.abs(finite).mean()]
                values += list(np.percentile(finite, PERCENTILES))
            else:
                values = [float("nan")] * len(stats)
            for key, value in zip(self._stat_keys(), values):
                stats[key].append(float(value))


class StopOnDivergence(keras.callbacks.Callback):
    """Stops training as soon as the loss becomes NaN or infinite.

    The loss is checked at every ``on_train_batch_end`` (Keras calls it once per
    ``steps_per_execution`` batches) and at every epoch end. On divergence it sets
    ``model.stop_training`` and records where: :attr:`diverged_epoch` (int),
    :attr:`diverged_batch` (int, or None when caught at the epoch end) and
    :attr:`bad_value` (the loss seen). All three are None while training is sound.

    Args:
        monitor: the ``logs`` key to watch.

    Example:
        >>> stop = StopOnDivergence()
        >>> model.fit(x, y, epochs=10, callbacks=[EpochStats(), stop])
        >>> if stop.diverged_epoch is not None:
        ...     print(f"diverged in epoch {stop.diverged_epoch}: loss={stop.bad_value}")
    """

    def __init__(self, monitor: str = "loss") -> None:
        super().__init__()
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor={monitor!r} is not allowed: a non-empty logs key such as 'loss'")
        self.monitor = monitor
        self.diverged_epoch: Optional[int] = None
        self.diverged_batch: Optional[int] = None
        self.bad_value: Optional[float] = None
        self._epoch = 0

    @property
    def diverged(self) -> bool:
        """Whether the last fit diverged."""
        return self.diverged_epoch is not None

    def on_train_begin(self, logs: Optional[dict] = None) -> None:
        self.diverged_epoch = self.diverged_batch = self.bad_value = None
        self._epoch = 0

    def on_epoch_begin(self, epoch: int, logs: Optional[dict] = None) -> None:
        self._epoch = int(epoch)

    def on_train_batch_end(self, batch: int, logs: Optional[dict] = None) -> None:
        self._check(logs or {}, batch=int(batch))

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        self._epoch = int(epoch)
        self._check(logs or {}, batch=None)

    def _check(self, logs: dict, batch: Optional[int]) -> None:
        if self.diverged:
            return
        value = logs.get(self.monitor)
        if value is None:
            return
        value = float(value)
        if not math.isfinite(value):
            self.diverged_epoch, self.diverged_batch, self.bad_value = self._epoch, batch, value
            self.model.stop_training = True


class StopOnSignal(keras.callbacks.Callback):
    """Ends ``fit`` between two steps (or two epochs) when SIGINT or SIGTERM arrived.

    Inside :func:`l2sweep.tracking.runs.deferred_signals` the signal handlers only record a signal;
    this callback raises its exception (``KeyboardInterrupt`` or
    :class:`l2sweep.tracking.runs.Terminated`) at the next batch end of training or validation,
    a point where Keras unwinds cleanly, so the run is closed as KILLED and no model is written.

    Example:
        >>> with tracking.deferred_signals():
        ...     model.fit(x, y, epochs=10, callbacks=[StopOnSignal()])
    """

    def on_train_batch_end(self, batch: int, logs: Optional[dict] = None) -> None:
        from l2sweep.tracking.runs import raise_if_signalled

        raise_if_signalled()

    on_test_batch_end = on_train_batch_end

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        # The only event of a loop without batch events (l2sweep.engine.compiled: an epoch per call).
        self.on_train_batch_end(-1, logs)


class MlflowEpochLogger(keras.callbacks.Callback):
    """Logs every numeric value of ``logs`` to an MLflow run, once per epoch.

    Each epoch end makes one ``client.log_batch`` call (step = epoch, starting at 0) with
    all numeric entries of ``logs``: Keras' ``loss``, ``accuracy``, ``data_loss``, their
    ``val_`` twins, and whatever callbacks before it added (``penalty``,
    ``weight_norm/<layer>``, ...). Nothing is logged per step. NaN and infinite values
    are logged as they are (MLflow stores them), so a diverged run shows it.

    A failing store raises out of ``fit`` unless ``on_error`` is given: then training goes on,
    the store is not asked again for the rest of the fit (a server that went away would cost
    a timeout per epoch), and ``on_error("metrics of epochs A-B", first_error)`` is called at
    the end of training so the caller can say what is missing.

    Args:
        client: an ``mlflow.MlflowClient`` (anything with its ``log_batch``).
        run_id: the id of an existing run to log to.
        on_error: ``(what, error)`` callback for epochs that could not be logged, or None to raise.

    Example:
        >>> client = mlflow.MlflowClient(tracking_uri)
        >>> run = client.create_run(experiment_id)
        >>> model.fit(x, y, epochs=10,
        ...           callbacks=[EpochStats(), MlflowEpochLogger(client, run.info.run_id)])
    """

    def __init__(self, client: Any, run_id: str,
                 on_error: Optional[Callable[[str, BaseException], None]] = None) -> None:
        super().__init__()
        if not callable(getattr(client, "log_batch", None)):
            raise TypeError(f"client={client!r} is not allowed: an mlflow.MlflowClient (needs log_batch)")
        if not isinstance(run_id, str) or not run_id.strip():
            raise ValueError(f"run_id={run_id!r} is not allowed: the id of an MLflow run (a non-empty string)")
        if on_error is not None and not callable(on_error):
            raise TypeError(f"on_error={on_error!r} is not allowed: a callable (what, error) or None")
        self.client = client
        self.run_id = run_id
        self.on_error = on_error
        self.error: Optional[BaseException] = None
        self.unlogged_epochs: list[int] = []

    def on_train_begin(self, logs: Optional[dict] = None) -> None:
        self.error, self.unlogged_epochs = None, []

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        from mlflow.entities import Metric

        if self.error is not None:  # the store failed earlier in this fit: don't wait on it again
            self.unlogged_epochs.append(int(epoch))
            return
        logs = logs or {}
        timestamp = int(time.time() * 1000)
        metrics = [Metric(key=str(key), value=float(value), timestamp=timestamp, step=int(epoch))
                   for key, value in logs.items() if _is_number(value)]
        try:
            # One call per epoch; only a log with more than MLflow's per-call cap is split.
            for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=metrics[start:start + MAX_METRICS_PER_BATCH])
        except Exception as exc:
            if self.on_error is None:
                raise
            self.error = exc
            self.unlogged_epochs.append(int(epoch))

    def on_train_end(self, logs: Optional[dict] = None) -> None:
        if self.unlogged_epochs and self.on_error is not None:
            self.on_error(metrics_of(self.unlogged_epochs), self.error)


def metrics_of(epochs: list[int]) -> str:
    """``"metrics of epoch 3"`` / ``"metrics of epochs 3-9"``: what a list of unlogged epochs says."""
    first, last = epochs[0], epochs[-1]
    return f"metrics of {f'epoch {first}' if first == last else f'epochs {first}-{last}'}"


class MlflowRunLogger(keras.callbacks.Callback):
    """:class:`MlflowEpochLogger` for a run that lives on the sweep's tracking thread.

    With the deferred MLflow start (l2sweep.tracking.runs) a job's run is created, and logged to,
    on the tracking thread, in order. Each epoch's ``logs`` (a copy) are handed over to that
    thread at the epoch's end, where :class:`MlflowEpochLogger` logs them (one ``log_batch``
    per epoch): the training loop never waits for the store. While the thread is busy (the
    run is still being created, or the previous job's artifacts are being logged) the epochs
    are kept, and handed over together at the next epoch end. ``on_train_end`` hands over the
    rest; :meth:`l2sweep.tracking.runs.ChildRun.wait` waits until they are logged (the run's end
    does). A run whose creation failed gets ``run.not_logged("metrics of epochs A-B")``; a
    store that fails later is handled as :class:`MlflowEpochLogger` handles it, with
    ``on_error=run.not_logged``. A run created in this thread (``run.created`` None) is
    logged to here, as each epoch ends.

    Args:
        run: the run's handle (:class:`l2sweep.tracking.runs.ChildRun`: ``ready()``, ``queue()``,
            ``client``, ``run_id``, ``not_logged``).

    Example:
        >>> with tracking.child_run(cfg) as run:
        ...     model.fit(x, y, epochs=10, callbacks=[EpochStats(), MlflowRunLogger(run)])
    """

    def __init__(self, run: Any) -> None:
        super().__init__()
        if not all(callable(getattr(run, name, None)) for name in ("ready", "queue", "not_logged")):
            raise TypeError(f"run={run!r} is not allowed: an l2sweep.tracking.runs.ChildRun "
                            "(needs ready, queue, not_logged)")
        self.run = run
        self._logger: Optional[MlflowEpochLogger] = None
        self._pending: list[tuple[int, dict]] = []
        self._no_run: list[int] = []

    def on_train_begin(self, logs: Optional[dict] = None) -> None:
        self._logger, self._pending, self._no_run = None, [], []

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        self._pending.append((int(epoch), dict(logs or {})))
        if self.run.ready():
            self._hand_over(end=False)

    def on_train_end(self, logs: Optional[dict] = None) -> None:
        self._hand_over(end=True)

    def _hand_over(self, end: bool) -> None:
        pending, self._pending = self._pending, []
        self.run.queue(functools.partial(self._log, pending, end))

    def _log(self, pending: list[tuple[int, dict]], end: bool) -> None:
        """Logs ``pending`` (on the tracking thread, or here); at the ``end``, reports what
        was not logged. Records failures, never raises."""
        try:
            if self.run.run_id is None:  # its creation failed (recorded): nor are its metrics logged
                self._no_run += [epoch for epoch, _ in pending]
            else:
                if self._logger is None:
                    self._logger = MlflowEpochLogger(self.run.client, self.run.run_id,
                                                     on_error=self.run.not_logged)
                    self._logger.on_train_begin()
                for epoch, logs in pending:
                    self._logger.on_epoch_end(epoch, logs)
            if end and self._no_run:
                self.run.not_logged(metrics_of(self._no_run))
            if end and self._logger is not None:
                self._logger.on_train_end()
        except Exception as exc:  # not the store's (MlflowEpochLogger records those): say so
            self.run.not_logged(metrics_of([epoch for epoch, _ in pending]) if pending else "metrics", exc)


def start_deferred_tracking() -> keras.callbacks.Callback:
    """A callback that lets the sweep's tracking thread (l2sweep.tracking.runs) work while the job
    trains: the deferred MLflow start at the first epoch's end (the epochs after it leave the
    GIL free for MLflow; the first one compiles), and the previous run's artifacts, held from
    that job's end, as each epoch begins."""
    from l2sweep.tracking.runs import release_deferred_start, training_under_way

    return keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: training_under_way(),
                                          on_epoch_end=lambda epoch, logs: release_deferred_start())
