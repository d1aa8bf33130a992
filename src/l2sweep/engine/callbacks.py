"""Keras callbacks: per-epoch statistics, weight histograms, divergence and signal stops.

A training run uses them in this order (``EpochStats`` must come first, so every callback
after it, and Keras' ``History``, sees the values it adds to ``logs``)::

    stats = EpochStats()
    hists = WeightHistograms(bins=cfg.tracking.histogram_bins)
    stop = StopOnDivergence()
    model.fit(..., callbacks=[stats, hists, stop, MlflowLogger(run)])   # l2sweep.tracking
"""

from __future__ import annotations

import math
import numbers
import time
from typing import Any, Optional

import keras
import numpy as np

from l2sweep.base import signals
from l2sweep.engine.model import kernel_layers, regularization_penalty, weight_norms

#: Percentiles recorded per layer and epoch by :class:`WeightHistograms`.
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


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

    Inside :func:`l2sweep.base.signals.deferred` the signal handlers only record a signal;
    this callback raises its exception (``KeyboardInterrupt`` or
    :class:`l2sweep.base.signals.Terminated`) at the next batch end of training or validation,
    a point where Keras unwinds cleanly, so the run is closed as KILLED and no model is written.

    Example:
        >>> with signals.deferred():
        ...     model.fit(x, y, epochs=10, callbacks=[StopOnSignal()])
    """

    def on_train_batch_end(self, batch: int, logs: Optional[dict] = None) -> None:
        signals.raise_if_signalled()

    on_test_batch_end = on_train_batch_end

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        # The only event of a loop without batch events (l2sweep.engine.compiled: an epoch per call).
        self.on_train_batch_end(-1, logs)
