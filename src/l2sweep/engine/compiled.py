"""The fused sweep: every lambda of the grid trained at once, as one vectorized model.

Run (from the repository root):
    python -m l2sweep.train -m train.fused=true          # sweep.strengths in one job
    python -m l2sweep.train -m hydra/launcher=fused      # the same (an alias)

Why: the seeds' MLP is tiny, so a plain loop of ``fit`` per lambda spends most of its time on
per-step overhead, K times over. Here the K models of a K-lambda grid become one model that
sees one shared batch stream:

* the hidden layers of all K models are one ``(784, K*128)`` kernel, so the first layer is a
  single GEMM on the shared input; the output layers are a batched ``einsum`` over
  ``(K, 128, 10)``;
* each slice gets its own penalty (``lambda_k * sum(w_k**2)`` for l2; l1, l1_l2, none and
  decoupled weight decay likewise), and the loss that is differentiated is the **sum** of the
  K per-slice losses: slices share no parameter, so each slice's gradient is exactly its
  standalone model's (a mean would scale it by 1/K). The penalty's gradient is written out
  (``2 * lambda_k * w``, ``lambda_k * sign(w)``, what autodiff gives) and its value, which only
  the ``loss`` metric needs, is computed once per step right after the update and carried
  to the next step (the same numbers; a fused epoch on two threads ~13 % faster);
* Adam is element-wise, so one Adam over the fused variables is K independent Adams;
* a whole epoch runs inside one XLA-compiled loop (batches gathered on the device from the
  epoch's permutation), so there is no per-step Python or tf.data overhead at all.

Equivalence with the sequential sweep (``tests/test_fused.py`` checks it): each slice starts
from the weights ``build_model`` draws for its lambda after ``set_seeds(train.seed)`` (the
standalone models are built and their weights copied in: Glorot on a ``K*128``-wide kernel
would have the wrong fan-out), batches come in the order Keras' ``fit(shuffle=True)`` would
use (taken from Keras' own data adapter), and the per-slice metrics are Keras' (running means
over the epoch's batches weighted by batch size; ``loss`` includes the penalty, ``data_loss``
does not; validation with the epoch's final weights). ``penalty``, ``weight_norm/<layer>``,
the weight histograms and the saved model come from a standalone Keras model per lambda whose
weights are set from its slice, through the same callbacks the sequential path uses. So each
lambda still gets its own MLflow child run (open while the grid trains, its metrics logged
epoch by epoch), ``models/<run>/{model.keras,history.json}`` and artifacts, and ``evaluate``
cannot tell the two paths apart.

A slice whose loss becomes NaN or infinite is reported FAILED for its lambda (``diverged_epoch``
= that epoch, no model written) and ignored from then on; slices share nothing, so the others
train on exactly as they would alone (tests/test_fused.py checks it).

The same engine with K=1 is the sequential sweep's default training loop for the MLP
(``train.loop=auto``, see :func:`l2sweep.train.train`): one lambda per job, its Keras callbacks
(``EpochStats``, ``WeightHistograms``, ``MlflowEpochLogger``, ``StopOnSignal``, Keras' progress
lines) called once per epoch exactly as ``fit`` calls them. Its compiled functions are kept
between the jobs of a process (:meth:`FusedMLP.for_views`), so a sweep compiles once, not
once per lambda.

Only ``model=mlp`` is fused; ``cnn`` raises a :class:`~l2sweep.base.config.ConfigError` (run it
with ``train.fused=false``). ``epoch_time`` is the fused epoch's wall time, shared by all
lambdas; ``train.steps_per_execution`` does not apply (an epoch is one compiled call).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from omegaconf import DictConfig

from l2sweep.base.config import FUSABLE_MODELS, ConfigError, validate, validate_strengths

log = logging.getLogger(__name__)

#: The engine kept for reuse (see FusedMLP.for_views): key -> engine.
_ENGINE: dict[tuple, "FusedMLP"] = {}
#: Validation examples per compiled call (memory: chunk * K * hidden_units floats).
VAL_CHUNK = 2000


def check_fusable(cfg: DictConfig) -> None:
    """Raises :class:`ConfigError` when ``cfg`` asks for a fused sweep of a model it cannot fuse."""
    if cfg.model.name not in FUSABLE_MODELS:
        raise ConfigError("model.name", cfg.model.name,
                          f"{' or '.join(FUSABLE_MODELS)} with train.fused=true (the fused sweep "
                          "vectorizes only the seeds' MLP); run this model with train.fused=false")


def slice_configs(cfg: DictConfig) -> list[DictConfig]:
    """One config per lambda of ``cfg.sweep.strengths``: the job's config with
    ``regularizer.strength`` set, so ``run_name`` (and everything else) resolves exactly as
    the sequential sweep's job for that lambda would.

    Raises:
        ConfigError: the grid is invalid, or ``run_name`` does not tell the lambdas apart.
    """
    strengths = validate_strengths(list(cfg.sweep.strengths))
    # A resolved config (compose_config resolves) has lost the interpolation: keep its pattern.
    node = cfg._get_node("run_name")
    default_pattern = (not node._is_interpolation()
                       and cfg.run_name == f"{cfg.regularizer.name}-{cfg.regularizer.strength}")
    configs = []
    for strength in strengths:
        sub = copy.deepcopy(cfg)
        sub.regularizer.strength = strength
        if default_pattern:
            sub.run_name = f"{cfg.regularizer.name}-{strength}"
        configs.append(sub)
    names = [c.run_name for c in configs]
    if len(set(names)) != len(names):
        raise ConfigError("run_name", node._value(),
                          "a name that depends on regularizer.strength (the default "
                          "${regularizer.name}-${regularizer.strength}), so that every lambda of "
                          f"a fused sweep gets its own run (got {names})")
    return configs


@dataclass
class SliceResult:
    """What training produced for one lambda (in the shapes the sequential path produces).

    Attributes:
        history: Keras-style history: metric name -> one value per epoch trained.
        diverged_epoch: the epoch in which the loss became NaN/inf, else None.
        histograms: :class:`l2sweep.engine.callbacks.WeightHistograms` data.
    """

    history: dict[str, list[float]] = field(default_factory=dict)
    diverged_epoch: Optional[int] = None
    histograms: dict[str, Any] = field(default_factory=dict)


def _penalty_coefficients(cfg: DictConfig, strengths: list[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-slice (L1, L2, decoupled decay) coefficients, as keras.regularizers / AdamW apply them."""
    name, ratio = cfg.regularizer.name, float(cfg.regularizer.l1_ratio)
    lam = np.asarray(strengths, np.float32)
    zero = np.zeros_like(lam)
    if name == "l2":
        return zero, lam, zero
    if name == "l1":
        return lam, zero, zero
    if name == "l1_l2":
        # keras.regularizers.L1L2(l1=lam*ratio, l2=lam*(1-ratio)), computed in float32 as Keras does.
        return (np.asarray([np.float32(s * ratio) for s in strengths]),
                np.asarray([np.float32(s * (1.0 - ratio)) for s in strengths]), zero)
    if name == "weight_decay":
        return zero, zero, lam
    return zero, zero, zero  # none


class FusedMLP:
    """K copies of the seeds' MLP as one set of variables, trained by one compiled loop.

    Slices share no parameter and every operation keeps them apart (one GEMM computes each
    slice's columns from its own kernel columns; the einsum, biases, penalties and Adam are
    per slice; the summed loss gives each slice its own gradient), so a slice that produces
    NaN or inf cannot affect the others: it is simply reported and ignored.

    Build it with :meth:`for_views`.
    """

    def __init__(self, k: int, inputs: int, units: int, kinds: tuple[bool, bool, bool],
                 learning_rate: float, beta_1: float, beta_2: float, epsilon: float,
                 jit_compile: bool = True) -> None:
        import tensorflow as tf

        from l2sweep.base.data import to_float
        from l2sweep.engine.model import NUM_CLASSES

        self.k, self.units = int(k), int(units)
        shapes = ((inputs, k * units), (k * units,), (k, units, NUM_CLASSES), (k, NUM_CLASSES))
        self.params = [tf.Variable(tf.zeros(s), name=n) for s, n in zip(shapes, ("w1", "b1", "w2", "b2"))]
        self.m = [tf.Variable(tf.zeros_like(p)) for p in self.params]
        self.v = [tf.Variable(tf.zeros_like(p)) for p in self.params]
        self.iterations = tf.Variable(0, dtype=tf.int64)
        # Variables, not constants: a reused engine trains another grid without retracing.
        self.l1, self.l2 = tf.Variable(tf.zeros(k)), tf.Variable(tf.zeros(k))
        # Decoupled decay per column of the hidden kernel (AdamW decays kernels only).
        self.decay = tf.Variable(tf.zeros((1, k * units)))
        self.use_l1, self.use_l2, self.use_decay = kinds
        self.lr = float(learning_rate)
        self.beta_1, self.beta_2, self.epsilon = float(beta_1), float(beta_2), float(epsilon)
        # Pixel value -> model input: to_float's own values, looked up (XLA's x / 255 rounds
        # 126 of the 256 values differently from numpy's).
        self.pixel_values = tf.constant(to_float(np.arange(256, dtype=np.uint8)))
        self._train = tf.function(self._train_steps, jit_compile=jit_compile, reduce_retracing=True)
        self._eval = tf.function(self._eval_chunk, jit_compile=jit_compile, reduce_retracing=True)

    @classmethod
    def for_views(cls, views: list[Any], l1: np.ndarray, l2: np.ndarray, decay: np.ndarray,
                  learning_rate: float, jit_compile: bool = True) -> "FusedMLP":
        """The engine for ``views``, initialised from their current weights.

        The last engine built is kept and reused when the next call has the same shapes,
        penalty kinds and optimizer settings (every job of a sequential sweep in one
        process): its compiled functions, and their XLA compilation (~2-3 s), are reused.

        Args:
            views: one compiled standalone model per lambda (``l2sweep.engine.model.build_model``); their
                current weights become the slices' initial weights, their optimizer's
                hyper-parameters (Adam's betas and epsilon) are used.
            l1, l2, decay: per-slice penalty coefficients and decoupled weight decay (shape (K,)).
            learning_rate: Adam's learning rate.
            jit_compile: compile the epoch loop and the evaluation with XLA.
        """
        hidden = views[0].get_layer("hidden")
        opt = views[0].optimizer
        key = (len(views), int(hidden.kernel.shape[0]), int(hidden.units),
               (bool(np.any(l1)), bool(np.any(l2)), bool(np.any(decay))), float(learning_rate),
               float(opt.beta_1), float(opt.beta_2), float(opt.epsilon), bool(jit_compile))
        engine = _ENGINE.get(key)
        if engine is None:
            _ENGINE.clear()  # one engine at a time: a new grid's shapes free the old one
            engine = _ENGINE[key] = cls(*key)
        engine.load(views, l1, l2, decay)
        return engine

    def load(self, views: list[Any], l1: np.ndarray, l2: np.ndarray, decay: np.ndarray) -> None:
        """Starts afresh: slice k = ``views[k]``'s weights, zero Adam state, these penalties."""
        hidden = [v.get_layer("hidden") for v in views]
        output = [v.get_layer("output") for v in views]
        values = (np.concatenate([np.asarray(h.kernel) for h in hidden], axis=1),
                  np.concatenate([np.asarray(h.bias) for h in hidden]),
                  np.stack([np.asarray(o.kernel) for o in output]),
                  np.stack([np.asarray(o.bias) for o in output]))
        for p, m, v, value in zip(self.params, self.m, self.v, values):
            p.assign(value)
            m.assign(np.zeros_like(value))
            v.assign(np.zeros_like(value))
        self.iterations.assign(0)
        self.l1.assign(np.asarray(l1, np.float32))
        self.l2.assign(np.asarray(l2, np.float32))
        self.decay.assign(np.repeat(np.asarray(decay, np.float32), self.units)[None, :])

    # --- the model ---------------------------------------------------------------------

    def _logits(self, x):
        import tensorflow as tf

        w1, b1, w2, b2 = self.params
        h = tf.nn.relu(tf.matmul(x, w1) + b1)                       # one GEMM for all slices
        h = tf.reshape(h, (-1, self.k, self.units))                 # (B, K, H)
        return tf.einsum("bkh,kho->bko", h, w2) + b2                # (B, K, 10)

    def _inputs(self, x):
        """The model's float32 input for a batch of images: uint8 pixels through
        :func:`~l2sweep.base.data.to_float`'s values (exactly the float arrays ``fit`` is given),
        float32 images as they are."""
        import tensorflow as tf

        return tf.gather(self.pixel_values, tf.cast(x, tf.int32)) if x.dtype == tf.uint8 else x

    def _penalty(self, w1):
        """Per-slice penalty of the hidden kernels, shape (K,) (keras.regularizers semantics)."""
        import tensorflow as tf

        def per_slice(values):  # column sums first: a contiguous reduction XLA vectorizes
            return tf.reduce_sum(tf.reshape(tf.reduce_sum(values, axis=0), (self.k, self.units)), axis=1)

        penalty = tf.zeros(self.k, tf.float32)
        if self.use_l1:
            penalty += self.l1 * per_slice(tf.abs(w1))
        if self.use_l2:
            penalty += self.l2 * per_slice(tf.square(w1))
        return penalty

    def _penalty_gradient(self, w1):
        """d penalty / d w1, written out: what autodiff of :meth:`_penalty` gives (``l1 *
        sign(w)``, ``l2 * 2w``), or None without a penalty. The training loop adds it to the
        data loss's gradient itself, so the penalty's value is needed only once per step."""
        import tensorflow as tf

        def per_column(coefficients):  # (K,) -> (1, K*units): slice k's coefficient, repeated
            return tf.reshape(tf.repeat(coefficients, self.units), (1, -1))

        grads = []
        if self.use_l1:
            grads.append(per_column(self.l1) * tf.sign(w1))
        if self.use_l2:
            grads.append(per_column(self.l2) * (2.0 * w1))
        return tf.add_n(grads) if grads else None

    def _batch_stats(self, x, y, weight):
        """Per-slice sums over a batch of cross-entropy and of correct predictions (shape (K,)).

        ``weight`` (B,) is 1 for real examples and 0 for the padding of a partial batch.
        """
        import tensorflow as tf

        logits = self._logits(x)
        labels = tf.broadcast_to(y[:, None], tf.shape(logits)[:2])
        # Keras computes sparse_categorical_crossentropy of a softmax output from its logits.
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        pred = tf.argmax(tf.nn.softmax(logits), axis=-1, output_type=labels.dtype)
        correct = tf.cast(tf.equal(pred, labels), tf.float32)
        w = weight[:, None]
        return tf.reduce_sum(ce * w, axis=0), tf.reduce_sum(correct * w, axis=0)

    # --- one compiled call per epoch ---------------------------------------------------

    def _train_steps(self, x, y, batches, sizes):
        """Runs one optimizer step per row of ``batches`` (indices into x/y; row i holds
        ``sizes[i]`` real examples, then padding).

        Returns per-slice sums over the steps: loss * batch size (Keras' loss tracker),
        cross-entropy and correct predictions over examples.
        """
        import tensorflow as tf

        zeros = tf.zeros(self.k, tf.float32)
        positions = tf.range(tf.shape(batches)[1])
        sums = (zeros, zeros, zeros)
        # The penalty at the weights the next step sees, carried from step to step: computed
        # once, right after each update, instead of inside the differentiated loss. The same
        # numbers; a fused 3-lambda epoch on two threads ~13 % faster, one model on one
        # thread unchanged (bench/README.md).
        penalty = self._penalty(self.params[0])
        for i in tf.range(tf.shape(batches)[0]):
            idx = batches[i]
            weight = tf.cast(positions < sizes[i], tf.float32)
            size = tf.cast(sizes[i], tf.float32)
            xb, yb = self._inputs(tf.gather(x, idx)), tf.gather(y, idx)
            with tf.GradientTape() as tape:
                ce_sum, correct = self._batch_stats(xb, yb, weight)
                # summed, not averaged: per-slice gradients intact
                total = tf.reduce_sum(ce_sum / size)
            grads = tape.gradient(total, self.params)
            penalty_grad = self._penalty_gradient(self.params[0])
            if penalty_grad is not None:
                grads = [grads[0] + penalty_grad, *grads[1:]]
            # Keras: sum_over_batch_size reduction, then + the penalty (self.losses).
            loss = ce_sum / size + penalty
            self._apply_adam(grads)
            penalty = self._penalty(self.params[0])
            loss_sum, ce_total, correct_total = sums
            sums = (loss_sum + loss * size, ce_total + ce_sum, correct_total + correct)
        return sums

    def _apply_adam(self, grads):
        """keras.optimizers.Adam.update_step (after AdamW's decoupled decay, if any)."""
        import tensorflow as tf

        lr = tf.constant(self.lr, tf.float32)
        step = tf.cast(self.iterations + 1, tf.float32)
        beta_1_power = tf.pow(tf.constant(self.beta_1, tf.float32), step)
        beta_2_power = tf.pow(tf.constant(self.beta_2, tf.float32), step)
        alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        if self.use_decay:
            w1 = self.params[0]
            w1.assign_sub(w1 * self.decay * lr)
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m.assign_add((g - m) * (1 - self.beta_1))
            v.assign_add((tf.square(g) - v) * (1 - self.beta_2))
            p.assign_sub((m * alpha) / (tf.sqrt(v) + self.epsilon))
        self.iterations.assign_add(1)

    def _eval_chunk(self, x, y):
        import tensorflow as tf

        ce_sum, correct = self._batch_stats(self._inputs(x), y, tf.ones(tf.shape(y), tf.float32))
        # The penalty at these weights, compiled like the training step's (an eager float32
        # sum over 100k squares drifts by ~1e-5 relative).
        return ce_sum, correct, self._penalty(self.params[0])

    # --- host side ---------------------------------------------------------------------

    def train_epoch(self, x, y, batches: list[np.ndarray]) -> dict[str, np.ndarray]:
        """One epoch over ``batches`` (index arrays of at most the first one's size), in one call.

        Returns:
            Per-slice epoch metrics ``loss``, ``data_loss``, ``accuracy`` (arrays of shape (K,)),
            Keras' running means (weighted by batch size) at the epoch's end.
        """
        width = len(batches[0])
        padded = np.zeros((len(batches), width), np.int64)
        sizes = np.asarray([len(b) for b in batches], np.int32)
        for i, b in enumerate(batches):
            padded[i, :len(b)] = b
        sums = self._train(x, y, padded, sizes)
        loss, ce, correct = (np.asarray(s.numpy(), np.float64) / float(sizes.sum()) for s in sums)
        return {"loss": loss, "data_loss": ce, "accuracy": correct}

    def evaluate(self, x, y) -> dict[str, np.ndarray]:
        """Per-slice ``loss`` (cross-entropy + penalty), ``data_loss`` and ``accuracy`` on (x, y)."""
        totals = np.zeros((2, self.k), np.float64)
        n = int(x.shape[0])
        for start in range(0, n, VAL_CHUNK):
            ce, correct, penalty = self._eval(x[start:start + VAL_CHUNK], y[start:start + VAL_CHUNK])
            totals += np.asarray([ce.numpy(), correct.numpy()], np.float64)
        ce, correct = totals / n
        penalty = penalty.numpy().astype(np.float64)
        return {"loss": ce + penalty, "data_loss": ce, "accuracy": correct}

    def _slice(self, arrays: list[np.ndarray], k: int) -> list[np.ndarray]:
        """Slice ``k`` of (w1, b1, w2, b2)-shaped arrays, in the standalone model's variable order."""
        w1, b1, w2, b2 = arrays
        cols = slice(k * self.units, (k + 1) * self.units)
        return [w1[:, cols], b1[cols], w2[k], b2[k]]

    def copy_to(self, views: list[Any], optimizer_state: bool = False) -> None:
        """Sets each standalone model's weights from its slice.

        Args:
            views: the standalone models, one per slice.
            optimizer_state: also set their optimizer's iterations and Adam moments, so a saved
                ``model.keras`` holds what the sequential path's does (and resumes the same).
        """
        params = [p.numpy() for p in self.params]
        moments = ([m.numpy() for m in self.m], [v.numpy() for v in self.v]) if optimizer_state else None
        for k, view in enumerate(views):
            variables = view.trainable_variables  # hidden kernel, hidden bias, output kernel, bias
            for var, value in zip(variables, self._slice(params, k)):
                var.assign(value)
            if moments is None:
                continue
            opt = view.optimizer
            if not opt.built:
                opt.build(variables)
            for var, m, v in zip(variables, self._slice(moments[0], k), self._slice(moments[1], k)):
                index = opt._get_variable_index(var)
                opt._momentums[index].assign(m)
                opt._velocities[index].assign(v)
            opt.iterations.assign(int(self.iterations.numpy()))


#: The last batch order and data tensors built, for the next job of the process (see below).
_ORDER: dict[tuple, list[list[np.ndarray]]] = {}
_TENSORS: dict[tuple, tuple] = {}


def _batch_order(cfg: DictConfig, n: int) -> list[list[np.ndarray]]:
    """:func:`keras_batch_order` for ``cfg``; call it right after ``set_seeds(cfg.train.seed)``.
    The order is then a function of the seed, so the jobs of a sweep in one process (same
    seed, data size, batch size and epochs) share the last one computed (~1 s of tf.data
    each on 50,000 images)."""
    key = (int(cfg.train.seed), bool(cfg.train.deterministic), n, int(cfg.train.batch_size),
           int(cfg.train.epochs))
    if key not in _ORDER:
        _ORDER.clear()
        _ORDER[key] = keras_batch_order(n, int(cfg.train.batch_size), int(cfg.train.epochs))
    return _ORDER[key]


def _data_tensors(*arrays: np.ndarray) -> tuple:
    """The training and validation arrays as tensors (images flattened, labels int64).

    Read-only arrays (l2sweep.train.load_training_data's, shared by the jobs of a process)
    keep their tensors for the next job: the first copy of 50,000 images into TensorFlow
    costs ~0.5 s as float32 (~0.1 s as uint8). The key holds the arrays themselves, so their
    ids cannot be reused.
    """
    import tensorflow as tf

    def convert():
        return tuple(tf.constant(a.reshape(len(a), -1)) if a.ndim > 1 else tf.constant(a.astype(np.int64))
                     for a in arrays)

    if any(a.flags.writeable for a in arrays):
        return convert()
    key = tuple(id(a) for a in arrays)
    if key not in _TENSORS:
        _TENSORS.clear()
        _TENSORS[key] = (arrays, convert())
    return _TENSORS[key][1]


def keras_batch_order(n: int, batch_size: int, epochs: int) -> list[list[np.ndarray]]:
    """The index batches ``Model.fit(x, y, batch_size, shuffle=True)`` feeds, epoch by epoch.

    Taken from Keras' own data adapter on ``arange(n)``, iterated afresh each epoch as ``fit``
    does (call it right after ``set_seeds``, as ``fit`` runs after it), so the fused and the
    sequential sweep see the same batches in the same order (tests/test_fused.py checks it
    against ``fit`` itself). Keras 3.15 on TensorFlow with a global seed draws the same
    permutation every epoch; this follows whatever Keras does.
    """
    from keras.src.trainers.data_adapters import get_data_adapter

    adapter = get_data_adapter(np.arange(n, dtype=np.int64), batch_size=batch_size, shuffle=True)
    # All of an epoch's batches as one padded tensor: one iterator step instead of one per batch.
    dataset = adapter.get_tf_dataset().map(lambda *x: x[0]).padded_batch(
        adapter.num_batches, padded_shapes=[batch_size], padding_values=np.int64(-1))
    order = []
    for _ in range(epochs):
        batches = next(iter(dataset)).numpy()
        order.append([b[b >= 0] for b in batches])
    return order


def fit_fused(cfgs: list[DictConfig], x_train: np.ndarray, y_train: np.ndarray,
              x_val: np.ndarray, y_val: np.ndarray, label: str = "fused",
              callbacks: Optional[list[list[Any]]] = None, verbose: int = 0
              ) -> tuple[list[Any], list[SliceResult]]:
    """Trains the K models of ``cfgs`` (one per lambda, otherwise equal) at once.

    Each slice has its own Keras callback list, called as ``fit`` calls it, once per epoch:
    ``on_train_begin``, ``on_epoch_begin``, ``on_epoch_end`` (with Keras' ``logs``), then
    ``on_train_end``, with the slice's standalone model (holding the slice's weights) as
    ``self.model``. :class:`~l2sweep.engine.callbacks.EpochStats` and
    :class:`~l2sweep.engine.callbacks.WeightHistograms` come first; a diverged slice gets no more
    epochs. There are no batch events: an epoch is one compiled call.

    Args:
        cfgs: per-lambda configs (:func:`slice_configs`).
        x_train, y_train, x_val, y_val: images (N, 28, 28), uint8 as prepared (scaled inside the
            compiled step, to exactly :func:`~l2sweep.base.data.to_float`'s values: a quarter of the
            memory, and no float copy to make) or float32 in [0, 1]; int labels.
        label: prefix of the progress lines.
        callbacks: per slice, more Keras callbacks (e.g. ``MlflowEpochLogger``, ``StopOnSignal``).
        verbose: Keras' progress lines per slice, as ``fit(verbose=...)`` (0: none; then one
            summary line per epoch of the grid is logged instead).

    Returns:
        (the standalone Keras model of each lambda, holding its slice's final weights,
        per-lambda :class:`SliceResult`).
    """
    import keras

    from l2sweep.engine.callbacks import EpochStats, StopOnDivergence, WeightHistograms
    from l2sweep.engine.model import build_model, set_seeds

    base = cfgs[0]
    check_fusable(base)
    views = []
    for cfg in cfgs:
        # Exactly what the sequential job does before its fit: same seed -> same initial weights.
        set_seeds(cfg.train.seed, cfg.train.deterministic)
        views.append(build_model(cfg))
    set_seeds(base.train.seed, base.train.deterministic)
    epochs = int(base.train.epochs)
    order = _batch_order(base, len(x_train))

    l1, l2, decay = _penalty_coefficients(base, [float(c.regularizer.strength) for c in cfgs])
    fused = FusedMLP.for_views(views, l1, l2, decay, float(base.train.learning_rate),
                               jit_compile=bool(base.train.jit_compile))
    x, y, xv, yv = _data_tensors(x_train, y_train, x_val, y_val)

    results = [SliceResult() for _ in cfgs]
    hists = [WeightHistograms(int(base.tracking.histogram_bins)) for _ in cfgs]
    stops = [StopOnDivergence() for _ in cfgs]
    records = [keras.callbacks.History() for _ in cfgs]  # last, as in fit: sees every value
    lists = [keras.callbacks.CallbackList([EpochStats(), h, d, *(callbacks[k] if callbacks else []), r],
                                          add_progbar=verbose > 0, model=view, verbose=verbose,
                                          epochs=epochs, steps=len(order[0]))
             for k, (view, h, d, r) in enumerate(zip(views, hists, stops, records))]
    for cbs in lists:
        cbs.on_train_begin()
    for epoch in range(epochs):
        running = [k for k, r in enumerate(results) if r.diverged_epoch is None]
        if not running:
            break
        for k in running:
            lists[k].on_epoch_begin(epoch)
        train_logs = fused.train_epoch(x, y, order[epoch])
        val_logs = fused.evaluate(xv, yv)
        fused.copy_to(views)
        for k in running:
            logs = {name: float(train_logs[name][k]) for name in ("accuracy", "data_loss", "loss")}
            logs.update({f"val_{name}": float(val_logs[name][k])
                         for name in ("accuracy", "data_loss", "loss")})
            lists[k].on_epoch_end(epoch, logs)
            if stops[k].diverged:  # Keras' running mean of the loss: any bad step shows
                results[k].diverged_epoch = stops[k].diverged_epoch
                log.warning("%s: %s diverged in epoch %d (loss %s)%s", label, cfgs[k].run_name,
                            epoch, logs["loss"], "; the other lambdas go on" if len(cfgs) > 1 else "")
        if not verbose:
            last = {k: {name: values[-1] for name, values in records[k].history.items()} for k in running}
            best = min(running, key=lambda k: last[k]["val_loss"]
                       if math.isfinite(last[k]["val_loss"]) else math.inf)
            log.info("%s: epoch %d/%d, %d lambdas in %.1f s; best val_loss %.4f (%s)", label,
                     epoch + 1, epochs, len(running), last[best]["epoch_time"],
                     last[best]["val_loss"], cfgs[best].run_name)
    fused.copy_to(views, optimizer_state=True)
    for cbs in lists:
        cbs.on_train_end()
    for result, h, r in zip(results, hists, records):
        result.history = {name: [float(v) for v in values] for name, values in r.history.items()}
        result.histograms = h.data
    return views, results


def train_fused(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Trains every lambda of ``cfg.sweep.strengths`` at once and records each as its own run.

    Each lambda gets what the sequential sweep's job would give it: an MLflow child run (params,
    input, per-epoch metrics, histograms, plots, model, Hydra config) and
    ``<paths.models>/<run_name>/{model.keras,history.json}``. The K runs are open while the
    grid trains: each gets its epochs' metrics as they end (``MlflowRunLogger``), and an
    interrupt ends them all KILLED.

    Args:
        cfg: the composed config with ``train.fused=true`` (see l2sweep.base.config.Config).

    Returns:
        run name -> that run's final-epoch metrics (NaN where it diverged).

    Raises:
        ConfigError: ``model.name`` is not fusable, or ``run_name`` does not depend on lambda.
    """
    validate(cfg)
    check_fusable(cfg)
    from l2sweep.tracking import runs as tracking
    from l2sweep.base.data import load_meta, to_float
    from l2sweep.train import _job_label, finish_run, load_training_data, run_callbacks, run_tags

    cfgs = slice_configs(cfg)
    (x_train, y_train), (x_val, y_val) = load_training_data(cfg)
    meta = load_meta(cfg.paths.prepared)
    example = to_float(x_val[:5])  # the MLflow model's input example
    label = _job_label(cfg)
    log.info("%s: fused %s x %d lambdas, %d epochs on %d images (%d validation)", label,
             cfg.model.name, len(cfgs), cfg.train.epochs, len(x_train), len(x_val))
    with contextlib.ExitStack() as stack:
        runs = [stack.enter_context(tracking.child_run(sub, run_tags(sub, {"l2sweep.engine.compiled": "true"})))
                for sub in cfgs]
        callbacks = [run_callbacks(run, sub, meta, example, y_val) for run, sub in zip(runs, cfgs)]
        start = time.perf_counter()
        with tracking.deferred_signals():
            views, results = fit_fused(cfgs, x_train, y_train, x_val, y_val, label=label, callbacks=callbacks)
        log.info("%s: trained %d lambdas in %.1f s", label, len(cfgs), time.perf_counter() - start)
        return {sub.run_name: finish_run(sub, run, view, result.history, result.diverged_epoch,
                                         result.histograms, example,
                                         f"{label} [{i + 1}/{len(cfgs)}] {sub.run_name}", job_config=sub)
                for i, (sub, run, view, result) in enumerate(zip(cfgs, runs, views, results))}
