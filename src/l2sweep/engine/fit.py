"""``fit(cfgs, ...)``: one model per config, by the ``compiled`` loop (K at once) or ``keras``'s
``Model.fit`` (one); both call the callbacks as Keras ``fit`` does."""

from __future__ import annotations

import functools
import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

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


@dataclass(frozen=True, eq=False)
class Fold:
    """What one run trains and validates on, as indices into the training pool: ``train`` (in
    this order: :func:`epoch_batches` permutes positions in it), ``val`` (None: no validation
    data; the run's history then has no ``val_*`` metrics, as a refit on the whole pool)."""

    train: np.ndarray
    val: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        for name in ("train", "val"):
            if getattr(self, name) is not None:  # lists too; int64, as stratified_folds gives
                object.__setattr__(self, name, np.asarray(getattr(self, name), np.int64))

    def key(self) -> tuple:
        """Equal for folds of the same indices."""
        return self.train.tobytes(), None if self.val is None else self.val.tobytes()


def fit(cfgs: list, x_train, y_train, x_val, y_val, callbacks: list[list], label: str,
        folds: Optional[list[Fold]] = None) -> list[Trained]:
    """Trains one model per config (the configs differ only in ``regularizer.strength`` and
    ``train.seed``: initial weights and batch order), each with ``EpochStats``,
    ``WeightHistograms``, ``StopOnDivergence``, progress and ``callbacks[k]``.

    Args:
        cfgs: one config per model; the compiled loop trains them at once, ``keras`` in turn.
        x_train, y_train, x_val, y_val: images (N, 28, 28), uint8 or float32 in [0, 1], int
            labels; ``x_val``, ``y_val`` None: no validation data (no ``val_*`` metrics).
        label: prefix of the log lines.
        folds: None, or one :class:`Fold` per config: config k trains on
            ``x_train[folds[k].train]`` and validates on ``x_train[folds[k].val]`` (x_train,
            y_train are then the pool, x_val and y_val None). The compiled loop needs folds of
            equal sizes (:func:`l2sweep.base.data.stratified_folds`).

    Example:
        >>> (trained,) = fit([cfg], x_train, y_train, x_val, y_val, [[StopOnSignal()]], "job 1/3")
        >>> trained.history["val_loss"][-1]
    """
    if len(callbacks) != len(cfgs) or not cfgs:
        raise ValueError(f"one callback list per config: got {len(callbacks)} for {len(cfgs)} configs")
    if (x_val is None) != (y_val is None):
        raise ValueError("validation data: both x_val and y_val, or neither")
    if folds is not None and (len(folds) != len(cfgs) or x_val is not None):
        raise ValueError(f"folds: one per config (got {len(folds)} for {len(cfgs)}), each naming its "
                         "validation examples in x_train (then x_val=None, y_val=None)")
    if training_loop(cfgs[0]) == "compiled":
        return _fit_compiled(cfgs, x_train, y_train, x_val, y_val, callbacks, label, folds)
    # Keras fit trains one model at a time: the configs one after another.
    return [_fit_keras(c, *_fold_data(x_train, y_train, x_val, y_val, fold), cbs)
            for c, fold, cbs in zip(cfgs, folds or [None] * len(cfgs), callbacks)]


def _fold_data(x, y, x_val, y_val, fold: Optional[Fold]) -> tuple:
    """(x, y, validation data or None) of ``fold`` of the pool (x, y); without one, the splits."""
    if fold is None:
        return x, y, None if x_val is None else (x_val, y_val)
    return x[fold.train], y[fold.train], None if fold.val is None else (x[fold.val], y[fold.val])


def _progress(cfg: DictConfig) -> tuple[int, list]:
    """Keras' ``verbose`` and callbacks: its progress bar on a terminal, else an :class:`EpochLine`."""
    return (1, []) if sys.stdout.isatty() else (0, [EpochLine(cfg.run_name)])


def _as_float(x: np.ndarray) -> np.ndarray:
    return to_float(x) if x.dtype == np.uint8 else x


def _fit_keras(cfg: DictConfig, x_train, y_train, validation: Optional[tuple], callbacks: list) -> Trained:
    """Keras ``Model.fit`` on float copies of the images; ``validation``: (x, y) or None."""
    set_seeds(cfg.train.seed, cfg.train.deterministic)
    model = build_model(cfg)
    histograms, divergence = WeightHistograms(cfg.tracking.histogram_bins), StopOnDivergence()
    verbose, progress = _progress(cfg)
    history = model.fit(
        EpochBatches(x_train, y_train, int(cfg.train.seed), int(cfg.train.batch_size)),
        validation_data=None if validation is None else (_as_float(validation[0]), validation[1]),
        epochs=cfg.train.epochs, shuffle=False,
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
                  label: str, folds: Optional[list[Fold]]) -> list[Trained]:
    """Each epoch of all K models in compiled calls of ``STEPS_PER_CALL`` steps, a batch end after
    each; each model's callbacks see its view as ``model``. The runs of one seed and fold see the
    same batches: the engine trains them as a group (one GEMM for the group's first layer) and
    validates the group on its fold."""
    base, epochs = cfgs[0], int(cfgs[0].train.epochs)
    batch_size = int(base.train.batch_size)
    folds = folds or [Fold(np.arange(len(x_train)))] * len(cfgs)
    rank, groups = _groups(cfgs, folds)
    slices = _slices([cfgs[k] for k in rank], [callbacks[k] for k in rank],
                     steps=math.ceil(len(folds[0].train) / batch_size))
    views = [s.view for s in slices]
    engine = CompiledMLP.for_views(views, len(groups), jit_compile=bool(base.train.jit_compile))
    tensors = data_tensors(*(a for a in (x_train, y_train, x_val, y_val) if a is not None))
    validate = functools.partial(_validate, engine, tensors, groups)
    for s in slices:
        s.view.stop_training = False
        s.callbacks.on_train_begin()
    for epoch in range(epochs):
        running = [k for k, s in enumerate(slices) if not s.view.stop_training]
        if not running:
            break
        # A group's batches: epoch_batches' positions in its fold's training examples.
        orders = [[fold.train[b] for b in epoch_batches(seed, epoch, len(fold.train), batch_size)]
                  for seed, fold in groups]
        _epoch(engine, tensors[:2], orders, validate, slices, running, epoch, label)
        if len(slices) > 1:
            _log_epoch(label, epoch, epochs, [slices[k] for k in running])
    engine.copy_to(views, [k for k, s in enumerate(slices) if not s.view.stop_training],
                   optimizer_state=True)
    for s in slices:
        s.callbacks.on_train_end()
    trained = [s.trained() for s in slices]
    return [trained[rank.index(k)] for k in range(len(cfgs))]


def _groups(cfgs: list, folds: list[Fold]) -> tuple[list[int], list[tuple[int, Fold]]]:
    """The engine's slices: the configs in order of (seed, fold) (``rank``: the config of each
    slice), and its groups' (seed, fold): a group per distinct pair when each has as many runs,
    else a group per slice. ValueError unless the folds are of one size (train, validation)."""
    sizes = sorted({(len(f.train), None if f.val is None else len(f.val)) for f in folds}, key=str)
    if len(sizes) != 1:
        raise ValueError(f"the compiled loop trains its runs together, on folds of one size: got "
                         f"(train, validation) sizes {sizes}; make equal folds "
                         "(l2sweep.base.data.stratified_folds) or fit the runs apart")
    ids: dict[tuple, int] = {}
    keys = [(int(c.train.seed), ids.setdefault(f.key(), len(ids))) for c, f in zip(cfgs, folds)]
    rank = sorted(range(len(cfgs)), key=keys.__getitem__)
    distinct = sorted(set(keys))
    chosen = distinct if len({keys.count(key) for key in distinct}) == 1 else [keys[k] for k in rank]
    return rank, [(seed, folds[keys.index((seed, i))]) for seed, i in chosen]


def _validate(engine: CompiledMLP, tensors: tuple, groups: list[tuple[int, Fold]]) -> Optional[dict]:
    """Per-slice validation metrics: on the validation split (``tensors[2:]``), else each group's
    on its fold of the pool (``tensors[:2]``), else None (no validation data)."""
    if len(tensors) == 4:
        return engine.evaluate(*tensors[2:])
    if groups[0][1].val is None:
        return None
    return engine.evaluate(*tensors, index=np.stack([fold.val for _, fold in groups]))


def _epoch(engine: CompiledMLP, data: tuple, orders: list, validate: Callable[[], Optional[dict]],
           slices: list[_Slice], running: list[int], epoch: int, label: str) -> None:
    """One epoch of the ``running`` slices on ``orders`` (see :meth:`CompiledMLP.train_epoch`),
    then ``validate()``, with their callbacks' epoch events."""
    x, y = data
    for k in running:
        slices[k].callbacks.on_epoch_begin(epoch)

    def batch_end(batch: int, logs: dict[str, np.ndarray]) -> None:  # StopOnSignal raises here
        for k in running:
            slices[k].callbacks.on_train_batch_end(batch, {name: float(v[k]) for name, v in logs.items()})

    train_logs = engine.train_epoch(x, y, orders, batch_end)
    val_logs = validate()
    views = [s.view for s in slices]
    engine.copy_to(views, running)
    for k in running:
        logs = {name: float(train_logs[name][k]) for name in EPOCH_METRICS}
        if val_logs is not None:
            logs.update({f"val_{name}": float(val_logs[name][k]) for name in EPOCH_METRICS})
        slices[k].callbacks.on_epoch_end(epoch, logs)
        if slices[k].view.stop_training:  # its weights and optimizer state stay this epoch's
            engine.copy_to(views, [k], optimizer_state=True)
        if slices[k].divergence.diverged:
            log.warning("%s: %s diverged in epoch %d (%s)%s", label, slices[k].cfg.run_name, epoch,
                        slices[k].divergence.reason, "; the other lambdas go on" if len(slices) > 1 else "")


def _log_epoch(label: str, epoch: int, epochs: int, running: list[_Slice]) -> None:
    """The summary line of an epoch of several models (the best by validation loss, without
    validation data by training loss)."""
    last = [{name: values[-1] for name, values in s.record.history.items()} for s in running]
    key = "val_loss" if "val_loss" in last[0] else "loss"
    best = min(range(len(running)), key=lambda i: last[i][key] if math.isfinite(last[i][key]) else math.inf)
    log.info("%s: epoch %d/%d, %d runs in %.1f s; best %s %.4f (%s)", label, epoch + 1,
             epochs, len(running), last[best]["epoch_time"], key, last[best][key],
             running[best].cfg.run_name)
