"""``fit(cfgs, ...)``: one model per config, by the ``compiled`` loop (K at once) or ``keras``'s
``Model.fit`` (one); both call the callbacks as Keras ``fit`` does."""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import keras
import numpy as np
import tensorflow as tf
from omegaconf import DictConfig

from l2sweep.base.cache import CACHE
from l2sweep.base.config import training_loop
from l2sweep.base.data import to_float
from l2sweep.engine.callbacks import EpochLine, EpochStats, StopOnDivergence, WeightHistograms
from l2sweep.engine.compiled import CompiledMLP
from l2sweep.engine.model import build_model, set_seeds

log = logging.getLogger(__name__)

#: The metrics of an epoch, as Keras names them (``val_`` + these on validation data).
EPOCH_METRICS = ("accuracy", "data_loss", "loss")


@dataclass
class Trained:
    """What training one config produced: the model (final weights and optimizer state), its
    history (metric -> value per epoch), the epoch it diverged in (else None), ``WeightHistograms.data``."""

    model: Any
    history: dict[str, list[float]] = field(default_factory=dict)
    diverged_epoch: Optional[int] = None
    histograms: dict[str, Any] = field(default_factory=dict)


def fit(cfgs: list, x_train, y_train, x_val, y_val, callbacks: list[list], label: str) -> list[Trained]:
    """Trains one model per config (the configs differ only in ``regularizer.strength`` and
    ``train.seed``: initial weights and batch order), each with ``EpochStats``,
    ``WeightHistograms``, ``StopOnDivergence``, progress and ``callbacks[k]``.

    Args:
        cfgs: one config per model; the compiled loop trains them at once, ``keras`` in turn.
        x_train, y_train, x_val, y_val: images (N, 28, 28), uint8 or float32 in [0, 1], int labels.
        label: prefix of the log lines.

    Example:
        >>> (trained,) = fit([cfg], x_train, y_train, x_val, y_val, [[StopOnSignal()]], "job 1/3")
        >>> trained.history["val_loss"][-1]
    """
    if len(callbacks) != len(cfgs) or not cfgs:
        raise ValueError(f"one callback list per config: got {len(callbacks)} for {len(cfgs)} configs")
    if training_loop(cfgs[0]) == "compiled":
        return _fit_compiled(cfgs, x_train, y_train, x_val, y_val, callbacks, label)
    # Keras fit trains one model at a time: the configs one after another.
    return [_fit_keras(c, x_train, y_train, x_val, y_val, cbs) for c, cbs in zip(cfgs, callbacks)]


def _progress(cfg: DictConfig) -> tuple[int, list]:
    """Keras' ``verbose`` and callbacks: its progress bar on a terminal, else an :class:`EpochLine`."""
    return (1, []) if sys.stdout.isatty() else (0, [EpochLine(cfg.run_name)])


def _as_float(x: np.ndarray) -> np.ndarray:
    return to_float(x) if x.dtype == np.uint8 else x


def _fit_keras(cfg: DictConfig, x_train, y_train, x_val, y_val, callbacks: list) -> Trained:
    """Keras ``Model.fit`` on float copies of the images."""
    set_seeds(cfg.train.seed, cfg.train.deterministic)
    model = build_model(cfg)
    histograms, divergence = WeightHistograms(cfg.tracking.histogram_bins), StopOnDivergence()
    verbose, progress = _progress(cfg)
    history = model.fit(
        EpochBatches(x_train, y_train, int(cfg.train.seed), int(cfg.train.batch_size)),
        validation_data=(_as_float(x_val), y_val), epochs=cfg.train.epochs, shuffle=False,
        validation_batch_size=cfg.train.validation_batch_size,
        callbacks=[EpochStats(), *progress, histograms, divergence, *callbacks], verbose=verbose).history
    if divergence.diverged:
        log.warning("%s diverged in epoch %d (%s)", cfg.run_name, divergence.diverged_epoch, divergence.reason)
    return Trained(model, {k: [float(v) for v in values] for k, values in history.items()},
                   divergence.diverged_epoch, histograms.data)


# --- the compiled loop -------------------------------------------------------------------

def epoch_batches(seed: int, epoch: int, n: int, batch_size: int) -> list[np.ndarray]:
    """Epoch ``epoch``'s training batches of a run seeded ``seed``: a permutation of ``range(n)``
    drawn from (seed, epoch), cut into ``batch_size`` pieces (the last one shorter). Every epoch
    reshuffles, as SGD assumes; both loops feed these, so they train on the same batches."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


class EpochBatches(keras.utils.PyDataset):
    """The training split in :func:`epoch_batches`' order, for Keras ``fit`` (float images).

    Example:
        >>> model.fit(EpochBatches(x_train, y_train, seed=42, batch_size=32), epochs=10)
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, seed: int, batch_size: int) -> None:
        super().__init__()  # one worker, no processes: batches in order
        self.x, self.y, self.seed, self.batch_size, self.epoch = x, y, seed, batch_size, -1
        self.batches = epoch_batches(seed, 0, len(x), batch_size)  # what Keras peeks at first

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self.batches[i]
        return _as_float(self.x[idx]), self.y[idx]

    def on_epoch_begin(self) -> None:
        # Keras calls it once as each training epoch starts (on_epoch_end also at other times).
        self.epoch += 1
        self.batches = epoch_batches(self.seed, self.epoch, len(self.x), self.batch_size)


def data_tensors(*arrays: np.ndarray) -> tuple:
    """The arrays as tensors (images flattened, labels int64); read-only ones are cached by id
    (the cached value holds the arrays, so no other array can take those ids)."""
    def convert():
        return arrays, tuple(tf.constant(a.reshape(len(a), -1)) if a.ndim > 1
                             else tf.constant(a.astype(np.int64)) for a in arrays)

    if any(a.flags.writeable for a in arrays):
        return convert()[1]
    return CACHE.get("data tensors", tuple(id(a) for a in arrays), convert)[1]


@dataclass
class _Slice:
    """One model of a compiled fit: its view, config and callbacks."""

    cfg: DictConfig
    view: Any
    callbacks: Any  # keras.callbacks.CallbackList
    histograms: WeightHistograms
    divergence: StopOnDivergence
    record: Any     # keras.callbacks.History, last in the list: it sees every value

    def trained(self) -> Trained:
        history = {k: [float(v) for v in values] for k, values in self.record.history.items()}
        return Trained(self.view, history, self.divergence.diverged_epoch, self.histograms.data)


def _slices(cfgs: list, callbacks: list[list], steps: int) -> list[_Slice]:
    """A view per config (same seed and initial weights as ``fit``'s) and its callback list."""
    slices = []
    for cfg, extra in zip(cfgs, callbacks):
        set_seeds(cfg.train.seed, cfg.train.deterministic)
        view = build_model(cfg)
        hists, stop, record = (WeightHistograms(cfg.tracking.histogram_bins), StopOnDivergence(),
                               keras.callbacks.History())
        verbose, progress = _progress(cfg) if len(cfgs) == 1 else (0, [])  # else: _log_epoch
        cbs = keras.callbacks.CallbackList([EpochStats(), *progress, hists, stop, *extra, record],
                                           add_progbar=verbose > 0, model=view, verbose=verbose,
                                           epochs=int(cfg.train.epochs), steps=steps)
        slices.append(_Slice(cfg, view, cbs, hists, stop, record))
    return slices


def _fit_compiled(cfgs: list, x_train, y_train, x_val, y_val, callbacks: list[list],
                  label: str) -> list[Trained]:
    """Each epoch of all K models in compiled calls of ``STEPS_PER_CALL`` steps, a batch end after
    each; each model's callbacks see its view as ``model``. The runs of one seed see the same
    batches: the engine trains them as a group (one GEMM for the group's first layer)."""
    base, epochs = cfgs[0], int(cfgs[0].train.epochs)
    n, batch_size = len(x_train), int(base.train.batch_size)
    # The engine's slices: the configs by seed (a group per seed when each has as many runs).
    rank = sorted(range(len(cfgs)), key=lambda k: int(cfgs[k].train.seed))
    seeds = [int(cfgs[k].train.seed) for k in rank]
    groups = sorted(set(seeds)) if len(set(map(seeds.count, seeds))) == 1 else seeds
    slices = _slices([cfgs[k] for k in rank], [callbacks[k] for k in rank], steps=math.ceil(n / batch_size))
    views = [s.view for s in slices]
    engine = CompiledMLP.for_views(views, len(groups), jit_compile=bool(base.train.jit_compile))
    data = data_tensors(x_train, y_train, x_val, y_val)
    for s in slices:
        s.view.stop_training = False
        s.callbacks.on_train_begin()
    for epoch in range(epochs):
        running = [k for k, s in enumerate(slices) if not s.view.stop_training]
        if not running:
            break
        orders = {seed: epoch_batches(seed, epoch, n, batch_size) for seed in set(groups)}
        _epoch(engine, data, [orders[seed] for seed in groups], slices, running, epoch, label)
        if len(slices) > 1:
            _log_epoch(label, epoch, epochs, [slices[k] for k in running])
    engine.copy_to(views, [k for k, s in enumerate(slices) if not s.view.stop_training],
                   optimizer_state=True)
    for s in slices:
        s.callbacks.on_train_end()
    trained = [s.trained() for s in slices]
    return [trained[rank.index(k)] for k in range(len(cfgs))]


def _epoch(engine: CompiledMLP, data: tuple, orders: list, slices: list[_Slice],
           running: list[int], epoch: int, label: str) -> None:
    """One epoch of the ``running`` slices on ``orders`` (see :meth:`CompiledMLP.train_epoch`),
    with their callbacks' epoch events."""
    x, y, xv, yv = data
    for k in running:
        slices[k].callbacks.on_epoch_begin(epoch)

    def batch_end(batch: int, logs: dict[str, np.ndarray]) -> None:  # StopOnSignal raises here
        for k in running:
            slices[k].callbacks.on_train_batch_end(batch, {name: float(v[k]) for name, v in logs.items()})

    train_logs = engine.train_epoch(x, y, orders, batch_end)
    val_logs = engine.evaluate(xv, yv)
    views = [s.view for s in slices]
    engine.copy_to(views, running)
    for k in running:
        logs = {name: float(train_logs[name][k]) for name in EPOCH_METRICS}
        logs.update({f"val_{name}": float(val_logs[name][k]) for name in EPOCH_METRICS})
        slices[k].callbacks.on_epoch_end(epoch, logs)
        if slices[k].view.stop_training:  # its weights and optimizer state stay this epoch's
            engine.copy_to(views, [k], optimizer_state=True)
        if slices[k].divergence.diverged:
            log.warning("%s: %s diverged in epoch %d (%s)%s", label, slices[k].cfg.run_name, epoch,
                        slices[k].divergence.reason, "; the other lambdas go on" if len(slices) > 1 else "")


def _log_epoch(label: str, epoch: int, epochs: int, running: list[_Slice]) -> None:
    """The summary line of an epoch of several models."""
    last = [{name: values[-1] for name, values in s.record.history.items()} for s in running]
    best = min(range(len(running)), key=lambda i: last[i]["val_loss"]
               if math.isfinite(last[i]["val_loss"]) else math.inf)
    log.info("%s: epoch %d/%d, %d runs in %.1f s; best val_loss %.4f (%s)", label, epoch + 1,
             epochs, len(running), last[best]["epoch_time"], last[best]["val_loss"],
             running[best].cfg.run_name)
