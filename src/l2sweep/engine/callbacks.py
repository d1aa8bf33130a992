"""Keras callbacks: per-epoch statistics and line, weight histograms, divergence and signal stops."""

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
#: The statistics recorded per layer and epoch, in :meth:`WeightHistograms._record`'s order.
STAT_KEYS = ("mean", "std", "min", "max", "abs_mean") + tuple(f"p{p}" for p in PERCENTILES)


class EpochStats(keras.callbacks.Callback):
    """Adds ``penalty``, ``weight_norm/<layer>``, ``learning_rate`` and ``epoch_time`` (seconds)
    to each epoch's ``logs``. Place it first, so later callbacks and ``History`` see them.

    Example:
        >>> model.fit(x, y, epochs=2, callbacks=[EpochStats()]).history["weight_norm/hidden"]
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


class EpochLine(keras.callbacks.Callback):
    """Prints a short line per epoch, e.g. ``l2-0.001 Epoch 2/10 - loss 0.4701 - ... - 1.3s``
    (``epoch_time`` from an :class:`EpochStats` placed before it).

    Args:
        label: the line's start, e.g. the run's name.

    Example:
        >>> model.fit(x, y, epochs=10, verbose=0, callbacks=[EpochStats(), EpochLine("l2-0.001")])
    """

    KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")  # shown when in ``logs``

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        logs = logs or {}
        parts = [f"{self.label} Epoch {epoch + 1}/{self.params.get('epochs', '?')}"]
        parts += [f"{key} {float(logs[key]):.4f}" for key in self.KEYS if key in logs]
        if math.isfinite(logs.get("epoch_time", math.nan)):
            parts.append(f"{logs['epoch_time']:.1f}s")
        print(" - ".join(parts), flush=True)


class WeightHistograms(keras.callbacks.Callback):
    """Records each kernel's weight distribution before training (epoch ``-1``) and every epoch end.

    Bin edges are fixed per layer at ``on_train_begin``; weights outside them count in the edge
    bins (and in ``clipped``), NaN/inf ones nowhere. :attr:`data` (JSON-serialisable) maps each
    layer to ``edges``, ``size``, and per epoch ``epochs``, ``counts``, ``clipped`` and ``stats``
    (:data:`STAT_KEYS` -> a float per epoch).

    Args:
        bins: number of bins per layer (``tracking.histogram_bins``).
        range_factor: half-width of the bins as a multiple of the initial ``max|w|``.

    Example:
        >>> hists = WeightHistograms(bins=50)
        >>> model.fit(x, y, epochs=10, callbacks=[EpochStats(), hists])
    """

    def __init__(self, bins: int = 50, range_factor: float = 1.5) -> None:
        super().__init__()
        if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
            raise ValueError(f"bins={bins!r} is not allowed: a positive integer")
        if (isinstance(range_factor, bool) or not isinstance(range_factor, numbers.Real)
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
                "edges": np.linspace(-half, half, self.bins + 1).tolist(), "size": int(w.size),
                "epochs": [], "counts": [], "clipped": [], "stats": {key: [] for key in STAT_KEYS},
            }
        self._record(-1)

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        self._record(int(epoch))

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
            for key, value in zip(STAT_KEYS, values):
                stats[key].append(float(value))


class StopOnDivergence(keras.callbacks.Callback):
    """Stops training once it has diverged, recording :attr:`diverged_epoch`, :attr:`diverged_batch`
    (None at an epoch end), :attr:`bad_key` and :attr:`bad_value` (what tripped the rule).

    The rule. A run has diverged when

    - at a train batch end or an epoch end, the total loss (``monitor``, penalty included) or the
      cross-entropy alone (``data_monitor``) is NaN or infinite; or
    - at an epoch end, the epoch's mean training cross-entropy exceeds ``factor`` times
      ln(number of classes), the cross-entropy of a uniform guess (2 x ln 10 = 4.61 for 10 classes).

    A model that learns, or that a large λ flattens towards the uniform guess, stays below
    ln(classes) from its first epoch on (Fashion-MNIST, 50,000 images, λ 1e-4 to 0.1: at most 0.78
    at learning rate 1e-3, 0.96 at 1e-2, measured). Updates that explode (learning rate 1e6) give
    a finite cross-entropy of 4e13 to 2e14 in the first epoch with accuracy at chance (10-12 %).
    The total loss cannot tell them apart: a large λ makes a sound model's penalty large too. The
    ceiling is checked on the epoch's mean, which both training loops (Keras ``fit``, the
    compiled loop) report; validation cross-entropy is not used (an overfitting model may exceed it).

    Args:
        monitor: the ``logs`` key of the total loss.
        data_monitor: the ``logs`` key of the cross-entropy without the penalty; not checked
            when absent from ``logs``.
        factor: the ceiling, as a multiple (> 1) of ln(classes).
        num_classes: the number of classes; None: the width of the model's output.

    Example:
        >>> stop = StopOnDivergence()
        >>> model.fit(x, y, epochs=10, callbacks=[stop])
        >>> stop.diverged, stop.reason
    """

    def __init__(self, monitor: str = "loss", data_monitor: str = "data_loss", factor: float = 2.0,
                 num_classes: Optional[int] = None) -> None:
        super().__init__()
        for name, key in (("monitor", monitor), ("data_monitor", data_monitor)):
            if not isinstance(key, str) or not key:
                raise ValueError(f"{name}={key!r} is not allowed: a non-empty logs key such as 'loss'")
        if (isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not math.isfinite(factor)
                or factor <= 1):
            raise ValueError(f"factor={factor!r} is not allowed: a finite number > 1")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 2):
            raise ValueError(f"num_classes={num_classes!r} is not allowed: an integer >= 2, or None")
        self.monitor, self.data_monitor = monitor, data_monitor
        self.factor, self.num_classes = float(factor), num_classes
        self.diverged_epoch: Optional[int] = None
        self.diverged_batch: Optional[int] = None
        self.bad_key: Optional[str] = None
        self.bad_value: Optional[float] = None
        self.ceiling = math.inf
        self._epoch = 0

    @property
    def diverged(self) -> bool:
        """Whether the last fit diverged."""
        return self.diverged_epoch is not None

    @property
    def reason(self) -> str:
        """What tripped the rule, e.g. ``data_loss 3.9e+13 > 4.61 = 2 x ln 10``; empty if nothing did."""
        if not self.diverged:
            return ""
        if not math.isfinite(self.bad_value):
            return f"{self.bad_key} {self.bad_value}"
        return f"{self.bad_key} {self.bad_value:.4g} > {self.ceiling:.3g} = {self.factor:g} x ln {self._classes()}"

    def on_train_begin(self, logs: Optional[dict] = None) -> None:
        self.diverged_epoch = self.diverged_batch = self.bad_key = self.bad_value = None
        self.ceiling = self.factor * math.log(self._classes())
        self._epoch = 0

    def on_epoch_begin(self, epoch: int, logs: Optional[dict] = None) -> None:
        self._epoch = int(epoch)

    def on_train_batch_end(self, batch: int, logs: Optional[dict] = None) -> None:
        self._check(logs or {}, batch=int(batch))

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        self._epoch = int(epoch)
        self._check(logs or {}, batch=None)

    def _classes(self) -> int:
        return self.num_classes or int(self.model.outputs[0].shape[-1])

    def _check(self, logs: dict, batch: Optional[int]) -> None:
        if self.diverged:
            return
        values = {key: float(logs[key]) for key in (self.monitor, self.data_monitor) if logs.get(key) is not None}
        bad = next((key for key, value in values.items() if not math.isfinite(value)), None)
        if bad is None and batch is None and values.get(self.data_monitor, 0.0) > self.ceiling:
            bad = self.data_monitor
        if bad is not None:
            self.diverged_epoch, self.diverged_batch, self.bad_key, self.bad_value = self._epoch, batch, bad, values[bad]
            self.model.stop_training = True


class StopOnSignal(keras.callbacks.Callback):
    """Raises a SIGINT/SIGTERM deferred by :func:`l2sweep.base.signals.deferred` at the next batch
    (or epoch) end, where Keras unwinds cleanly: the run closes as KILLED, no model is written.

    Example:
        >>> with signals.deferred():
        ...     model.fit(x, y, epochs=10, callbacks=[StopOnSignal()])
    """

    def on_train_batch_end(self, batch: int, logs: Optional[dict] = None) -> None:
        signals.raise_if_signalled()

    on_test_batch_end = on_train_batch_end

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        # A signal that came after the epoch's last batch end (during validation).
        self.on_train_batch_end(-1, logs)
