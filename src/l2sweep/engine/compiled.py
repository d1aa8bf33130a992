"""The compiled loop: K copies of a Keras MLP, one per run (λ, seed and fold), trained as one set
of variables by XLA calls of :data:`STEPS_PER_CALL` steps each (run by l2sweep.engine.fit; K=1 is
an MLP run's default loop). The K slices form G groups of M = K/G; the slices of a group see the
same batches (runs of one seed and fold), so the first layer is one GEMM per group, and are
validated on the same examples (a group's fold, or the validation split for all).

It runs what l2sweep.engine.views reads from the models that
:func:`l2sweep.engine.model.build_model` makes, one per run (the "views"). Each slice starts from its
view's weights, sees its own batches (its own order: replicates differ in it) and is updated as
Keras does (tests/integration/test_engine.py). The slices share no parameter and the loss differentiated
is the sum of theirs, so each gets exactly its own gradient and a NaN in one affects no other.
A Dropout after a hidden layer drops in training steps only, each slice at its own rate with
its own copy of its view's seed generator: the masks Keras ``fit`` draws, step by step.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple, Optional

import keras
import numpy as np
import tensorflow as tf

from l2sweep.base.cache import CACHE
from l2sweep.base.data import to_float
from l2sweep.engine.views import (Spec, adam_settings, dense_layers, dropout_layers, model_variables,
                                  penalty_coefficients, read_spec, seed_state)

#: Validation examples per compiled call (memory: chunk * K * units floats).
VAL_CHUNK = 2000
#: Optimizer steps per compiled call. Between calls the loop's callbacks see a batch end (as
#: Keras ``fit``'s with ``steps_per_execution``), so Ctrl-C stops training within one call
#: (~75 ms for one MLP of the default config on a CPU core) instead of an epoch (~0.45 s).
#: Measured per epoch against one call: 128 steps +5 %, 256 and 512 +1-2 % (calls cost ~2 ms).
STEPS_PER_CALL = 256


# --- the engine ----------------------------------------------------------------------------

class Param(NamedTuple):
    """A fused kernel or bias. The first layer's kernel is (G, inputs, M * units): a group's
    slices side by side on the last axis (one GEMM per group); every other is stacked, (K, ...)."""

    layer: int
    kernel: bool
    first: bool


class CompiledMLP:
    """K copies of an MLP as one set of variables, trained by compiled calls of many steps;
    build it with :meth:`for_views`."""

    def __init__(self, spec: Spec) -> None:
        self.spec, self.k, self.layers = spec, spec.k, spec.layers
        self.g, self.m = spec.groups, spec.k // spec.groups
        self.parts, shapes, fan_in = [], [], spec.inputs
        for i, layer in enumerate(spec.layers):
            self.parts.append(Param(i, True, i == 0))
            shapes.append((self.g, fan_in, self.m * layer.units) if i == 0 else (spec.k, fan_in, layer.units))
            if layer.use_bias:
                self.parts.append(Param(i, False, False))
                shapes.append((spec.k, layer.units))
            fan_in = layer.units
        self.params, self.moment_1, self.moment_2 = ([tf.Variable(tf.zeros(s)) for s in shapes] for _ in range(3))
        self.iterations = tf.Variable(0, dtype=tf.int64)
        # Variables, not constants: a reused engine trains another grid without retracing.
        self.l1 = [tf.Variable(tf.zeros(spec.k)) for _ in spec.layers]
        self.l2 = [tf.Variable(tf.zeros(spec.k)) for _ in spec.layers]
        self.decay = tf.Variable(tf.zeros(spec.k))
        self.ones = tf.Variable(tf.ones((8, max(spec.inputs, *(layer.units for layer in spec.layers)))))
        # Per layer: each slice's dropout rate and 1 / (1 - rate) (as Keras rounds it), and for a
        # layer with a Dropout each slice's seed generator, loaded from its view's.
        self.rate = [tf.Variable(tf.zeros(spec.k)) for _ in spec.layers]
        self.scale = [tf.Variable(tf.ones(spec.k)) for _ in spec.layers]
        self.seeds = [[keras.random.SeedGenerator(0) for _ in range(spec.k)] if layer.dropout else []
                      for layer in spec.layers]
        # Pixel value -> model input: to_float's own values, looked up (XLA's x / 255 rounds
        # 126 of the 256 values differently from numpy's).
        self.pixel_values = tf.constant(to_float(np.arange(256, dtype=np.uint8)))
        self._train = tf.function(self._train_steps, jit_compile=spec.jit_compile, reduce_retracing=True)
        self._eval = tf.function(self._eval_chunk, jit_compile=spec.jit_compile, reduce_retracing=True)

    @classmethod
    def for_views(cls, views: list[keras.Model], groups: int = 1, jit_compile: bool = True) -> "CompiledMLP":
        """The engine for ``views`` (one compiled model per slice; ``groups`` groups of consecutive
        views, each trained on one batch order), loaded from them. The process keeps the last
        engine (l2sweep.base.cache), compiled functions and all, for the same :class:`Spec`."""
        spec = read_spec(views, groups, jit_compile)
        engine = CACHE.get("compiled engine", spec, lambda: cls(spec))
        engine.load(views)
        return engine

    def tracing_count(self) -> int:
        """How often the epoch function was traced (and so compiled) in this engine's life."""
        return int(self._train.experimental_get_tracing_count())

    def load(self, views: list[keras.Model]) -> None:
        """Starts afresh: slice k = ``views[k]``'s weights, penalties, dropout rates and seed
        states, zero Adam state."""
        variables = [model_variables(v) for v in views]
        for j, (part, p, m, v) in enumerate(zip(self.parts, self.params, self.moment_1, self.moment_2)):
            value = np.stack([keras.ops.convert_to_numpy(w[j]) for w in variables])
            if part.first:  # (K, inputs, units) -> (G, inputs, M * units)
                g, inputs, units = self.g, value.shape[1], value.shape[2]
                value = value.reshape(g, self.m, inputs, units).transpose(0, 2, 1, 3).reshape(g, inputs, -1)
            p.assign(value)
            m.assign(np.zeros_like(value))
            v.assign(np.zeros_like(value))
        self.iterations.assign(0)
        coefficients = np.asarray([[penalty_coefficients(layer) for layer in dense_layers(v)]
                                   for v in views], np.float32)  # (K, layers, 2)
        for i in range(len(self.layers)):
            self.l1[i].assign(coefficients[:, i, 0])
            self.l2[i].assign(coefficients[:, i, 1])
        dropouts = [dropout_layers(v) for v in views]  # (K, layers): a Dropout or None
        for i in range(len(self.layers)):
            rates = np.asarray([float(d[i].rate) if d[i] is not None else 0.0 for d in dropouts])
            self.rate[i].assign(rates.astype(np.float32))
            self.scale[i].assign((1 / (1 - rates)).astype(np.float32))  # Keras: in float64, then float32
            for generator, d in zip(self.seeds[i], dropouts):
                generator.state.assign(seed_state(d[i]))
        self.decay.assign(np.asarray([adam_settings(v.optimizer)[1] for v in views], np.float32))

    # --- the model, per slice ----------------------------------------------------------

    def _per_slice(self, values, part: Param):
        """(K,) values broadcast against ``part``'s fused shape."""
        if part.first:  # (G, 1, M * units)
            return tf.repeat(tf.reshape(values, (self.g, self.m)), self.layers[0].units, axis=1)[:, None]
        return tf.reshape(values, (self.k,) + (1,) * (2 if part.kernel else 1))

    def _logits(self, x, training: bool = False):
        """(G, B, M, classes) of ``x``: (G, B, inputs), a batch per group, or (B, inputs) seen by
        every slice; each Dense layer's own activation, applied per slice, then (``training``) its
        Dropout, if any."""
        params = iter(self.params)
        h = None
        for i, layer in enumerate(self.layers):
            kernel = next(params)
            if i == 0:  # a GEMM per group
                z = tf.matmul(x, kernel) if len(x.shape) == 3 else tf.einsum("bi,gio->gbo", x, kernel)
                z = tf.reshape(z, (self.g, -1, self.m, layer.units))
            else:
                z = tf.einsum("gbmi,gmio->gbmo", h, tf.reshape(kernel, (self.g, self.m, *kernel.shape[1:])))
            if layer.use_bias:
                z = z + tf.reshape(next(params), (self.g, 1, self.m, layer.units))
            # The last layer's softmax is left to the loss (Keras takes it from the logits).
            h = z if i == len(self.layers) - 1 else layer.activation(z)
            if training and layer.dropout:
                h = self._dropout(i, h)
        return h

    def _dropout(self, i, h):
        """Layer ``i``'s Dropout on ``h`` (G, B, M, units), each slice at its own rate, as Keras'
        Dropout computes it (tf.nn.experimental.stateless_dropout): a uniform per value of the
        slice's (B, units) batch, drawn from its seed generator (the numbers Keras draws), kept
        where >= rate and scaled by 1 / (1 - rate)."""
        shape = tf.shape(h)[1::2]  # (B, units)
        draws = tf.stack([keras.random.uniform(shape, seed=generator) for generator in self.seeds[i]])
        draws = tf.transpose(tf.reshape(draws, (self.g, self.m, -1, h.shape[-1])), (0, 2, 1, 3))
        rate, scale = (tf.reshape(v, (self.g, 1, self.m, 1)) for v in (self.rate[i], self.scale[i]))
        return tf.where(draws >= rate, h * scale, 0.0)

    def _inputs(self, x):
        """uint8 pixels through to_float's values (the floats ``fit`` is given); floats as they are."""
        return tf.gather(self.pixel_values, tf.cast(x, tf.int32)) if x.dtype == tf.uint8 else x

    def _kernels(self):
        """(param index, layer, Param, kernel) of each kernel that has a penalty."""
        return [(j, self.layers[part.layer], part, p) for j, (part, p) in enumerate(zip(self.parts, self.params))
                if part.kernel and (self.layers[part.layer].l1 or self.layers[part.layer].l2)]

    def _column_sums(self, values):
        """Sums of ``values`` (..., rows, columns) over its rows, as a GEMM by rows of ones: XLA
        compiles a reduction for the CPU as one serial loop, which made the penalty a third of an
        MLP's step; a GEMM runs vectorized (bench/README.md). The ones are a variable: XLA would
        turn a product with constant ones back into a reduction."""
        return tf.matmul(self.ones[:, :values.shape[-2]], values)[..., 0, :]

    def _penalty(self):
        """Per-slice penalty of the kernels, shape (K,) (keras.regularizers semantics)."""
        def per_slice(values, part):
            sums = self._column_sums(values)  # (G, M * units) or (K, units)
            return tf.reduce_sum(tf.reshape(sums, (self.k, -1)), axis=1)

        penalty = tf.zeros(self.k, tf.float32)
        for _, layer, part, w in self._kernels():
            if layer.l1:
                penalty += self.l1[part.layer] * per_slice(tf.abs(w), part)
            if layer.l2:
                penalty += self.l2[part.layer] * per_slice(tf.square(w), part)
        return penalty

    def _with_penalty_gradients(self, grads):
        """``grads`` plus d penalty / d kernel, written out as autodiff of :meth:`_penalty` gives
        it (``l1 * sign(w)``, ``l2 * 2w``): the penalty's value is then needed once per step."""
        grads = list(grads)
        for j, layer, part, w in self._kernels():
            terms = []
            if layer.l1:
                terms.append(self._per_slice(self.l1[part.layer], part) * tf.sign(w))
            if layer.l2:
                terms.append(self._per_slice(self.l2[part.layer], part) * (2.0 * w))
            grads[j] = grads[j] + tf.add_n(terms)
        return grads

    def _batch_stats(self, x, y, weight, training: bool = False):
        """Per-slice sums over a batch of cross-entropy and of correct predictions (shape (K,));
        ``x``, ``y``: a batch per group (G, B, ...) or one for all (B, ...); ``weight`` (B,) is
        1 for real examples and 0 for the padding of a partial batch; ``training``: with dropout."""
        logits = self._logits(x, training)  # (G, B, M, classes)
        labels = tf.broadcast_to((y if len(y.shape) == 2 else y[None])[:, :, None], tf.shape(logits)[:3])
        # Keras computes sparse_categorical_crossentropy of a softmax output from its logits.
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        pred = tf.argmax(tf.nn.softmax(logits), axis=-1, output_type=labels.dtype)
        correct = tf.cast(tf.equal(pred, labels), tf.float32)
        w = weight[None, :, None]
        return (tf.reshape(tf.reduce_sum(ce * w, axis=1), (self.k,)),
                tf.reshape(tf.reduce_sum(correct * w, axis=1), (self.k,)))

    # --- compiled calls of STEPS_PER_CALL steps ----------------------------------------

    def _train_steps(self, x, y, batches, sizes, count):
        """One optimizer step per row of ``batches[:count]`` (shape (steps, G, B), a batch per
        group: ``sizes[i]`` indices into x/y, then padding;
        the rows after ``count`` too, so that every call has one shape and one compilation).
        Returns per-slice sums of loss * batch size (Keras' loss tracker), cross-entropy and hits."""
        positions = tf.range(tf.shape(batches)[-1])
        sums = (tf.zeros(self.k, tf.float32),) * 3
        # The penalty at the next step's weights, computed once after each update (not differentiated).
        penalty = self._penalty()
        i = tf.constant(0)
        # A while loop, not ``for i in tf.range(count)``: that bounds the loop's iterations by
        # ``count``, which XLA then needs as a constant: one compilation (~0.5 s) per count.
        while i < count:
            idx = batches[i]
            weight = tf.cast(positions < sizes[i], tf.float32)
            size = tf.cast(sizes[i], tf.float32)
            xb, yb = self._inputs(tf.gather(x, idx)), tf.gather(y, idx)
            with tf.GradientTape() as tape:
                ce_sum, correct = self._batch_stats(xb, yb, weight, training=True)
                total = tf.reduce_sum(ce_sum / size)  # summed, not averaged: per-slice gradients intact
            grads = self._with_penalty_gradients(tape.gradient(total, self.params))
            # Keras: sum_over_batch_size reduction, then + the penalty (model.losses).
            loss = ce_sum / size + penalty
            self._apply_adam(grads)
            penalty = self._penalty()
            sums = tuple(a + b for a, b in zip(sums, (loss * size, ce_sum, correct)))
            i += 1
        return sums

    def _apply_adam(self, grads):
        """keras.optimizers.Adam.update_step: on ``grads + decay * w`` for the decayed params
        with coupled decay (CoupledDecayAdam.apply), or after AdamW's ``w -= lr * decay * w``."""
        adam = self.spec.adam
        lr = tf.constant(adam.learning_rate, tf.float32)
        step = tf.cast(self.iterations + 1, tf.float32)
        beta_1_power = tf.pow(tf.constant(adam.beta_1, tf.float32), step)
        beta_2_power = tf.pow(tf.constant(adam.beta_2, tf.float32), step)
        alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        grads = list(grads)
        for j, (part, p, decayed) in enumerate(zip(self.parts, self.params, self.spec.decayed)):
            if decayed and adam.coupled:
                grads[j] = grads[j] + self._per_slice(self.decay, part) * p
            elif decayed:
                p.assign_sub(p * self._per_slice(self.decay, part) * lr)
        for p, g, m, v in zip(self.params, grads, self.moment_1, self.moment_2):
            m.assign_add((g - m) * (1 - adam.beta_1))
            v.assign_add((tf.square(g) - v) * (1 - adam.beta_2))
            p.assign_sub((m * alpha) / (tf.sqrt(v) + adam.epsilon))
        self.iterations.assign_add(1)

    def _eval_chunk(self, x, y):
        """Per-slice sums on ``x``, ``y``: a chunk for all (B, ...) or one per group (G, B, ...)."""
        ce_sum, correct = self._batch_stats(self._inputs(x), y, tf.ones(tf.shape(y)[-1:], tf.float32))
        # The penalty at these weights, compiled like the training step's (an eager float32
        # sum over 100k squares drifts by ~1e-5 relative).
        return ce_sum, correct, self._penalty()

    # --- host side ---------------------------------------------------------------------

    def train_epoch(self, x, y, orders: list[list[np.ndarray]],
                    batch_end: Optional[Callable[[int, dict[str, np.ndarray]], None]] = None
                    ) -> dict[str, np.ndarray]:
        """One epoch, group g's slices over ``orders[g]``'s batches (index arrays of at most the
        first one's size; every order the same number and sizes), in calls of
        :data:`STEPS_PER_CALL` steps.

        Args:
            orders: one list of batches per group (G lists; a λ grid of one seed and fold: one list).
            batch_end: called after each call with the index of its last batch and the running
                means so far (as the return value); it may raise to stop the epoch.

        Returns:
            Per-slice ``loss``, ``data_loss`` and ``accuracy`` (shape (K,)): Keras' running means.
        """
        shapes = {tuple(len(b) for b in order) for order in orders}
        if len(orders) != self.g or len(shapes) != 1:
            raise ValueError(f"one batch order per group, all of the same batch sizes (runs trained "
                             f"together train on as many examples): got {len(orders)} orders for "
                             f"{self.g} groups, of {len(shapes)} different batch sizes")
        steps, totals, seen = len(orders[0]), np.zeros((3, self.k), np.float64), 0
        for start in range(0, steps, STEPS_PER_CALL):
            count = min(STEPS_PER_CALL, steps - start)
            padded = np.zeros((STEPS_PER_CALL, self.g, len(orders[0][0])), np.int64)
            sizes = np.zeros(STEPS_PER_CALL, np.int32)
            for g, order in enumerate(orders):
                for i, b in enumerate(order[start:start + count]):
                    padded[i, g, :len(b)], sizes[i] = b, len(b)
            sums = self._train(x, y, padded, sizes, tf.constant(count, tf.int32))
            totals += np.asarray([s.numpy() for s in sums], np.float64)
            seen += int(sizes.sum())
            loss, ce, correct = totals / seen
            logs = {"loss": loss, "data_loss": ce, "accuracy": correct}
            if batch_end is not None:
                batch_end(start + count - 1, logs)
        return logs

    def evaluate(self, x, y, index: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
        """Per-slice ``loss`` (cross-entropy + penalty), ``data_loss`` and ``accuracy`` on (x, y),
        or with ``index`` (G, n) group g's slices on ``x[index[g]]``, ``y[index[g]]`` (each
        group's validation fold of the pool)."""
        totals = np.zeros((2, self.k), np.float64)
        n = int(x.shape[0]) if index is None else index.shape[1]
        if index is not None and index.shape[0] != self.g:
            raise ValueError(f"one row of validation indices per group: got {index.shape[0]} for {self.g}")
        for start in range(0, n, VAL_CHUNK):
            if index is None:
                chunk = x[start:start + VAL_CHUNK], y[start:start + VAL_CHUNK]
            else:  # (G, chunk, ...): a chunk per group
                chunk = tuple(tf.gather(a, index[:, start:start + VAL_CHUNK]) for a in (x, y))
            ce, correct, penalty = self._eval(*chunk)
            totals += np.asarray([ce.numpy(), correct.numpy()], np.float64)
        ce, correct = totals / n
        penalty = penalty.numpy().astype(np.float64)
        return {"loss": ce + penalty, "data_loss": ce, "accuracy": correct}

    def _slice(self, arrays: list[np.ndarray], k: int) -> list[np.ndarray]:
        """Slice ``k`` of arrays shaped like the params, in :func:`model_variables`' order."""
        units, (g, m) = self.layers[0].units, divmod(k, self.m)
        return [a[g, :, m * units:(m + 1) * units] if part.first else a[k]
                for part, a in zip(self.parts, arrays)]

    def copy_to(self, views: list[keras.Model], slices: Iterable[int], optimizer_state: bool = False) -> None:
        """Sets ``views[k]``'s weights (and its Dropouts' seed states) from slice k, for each k in
        ``slices``; with ``optimizer_state`` also its step count and Adam moments (a saved model
        then resumes as ``fit``'s does)."""
        params = [p.numpy() for p in self.params]
        moments = ([[m.numpy() for m in self.moment_1], [v.numpy() for v in self.moment_2]]
                   if optimizer_state else None)
        for k in slices:
            variables = model_variables(views[k])
            for var, value in zip(variables, self._slice(params, k)):
                var.assign(value)
            for dropout, generators in zip(dropout_layers(views[k]), self.seeds):
                if dropout is not None and dropout.rate > 0:
                    dropout.seed_generator.state.assign(keras.ops.convert_to_numpy(generators[k].state))
            if moments is not None:
                _set_adam_state(views[k], variables, self._slice(moments[0], k),
                                self._slice(moments[1], k), int(self.iterations.numpy()))


def _set_adam_state(view: keras.Model, variables: list[Any], momentums: list[np.ndarray],
                    velocities: list[np.ndarray], iterations: int) -> None:
    """Sets ``view``'s Adam state through the names Keras gives it (add_variable_from_reference)."""
    optimizer = view.optimizer
    if not optimizer.built:
        optimizer.build(view.trainable_variables)
    slots = {w.name: w for w in optimizer.variables}
    for var, m, v in zip(variables, momentums, velocities):
        for kind, value in (("momentum", m), ("velocity", v)):
            name = f"{var.path.replace('/', '_')}_{kind}"
            if name not in slots:
                raise RuntimeError(f"no optimizer variable {name!r} among {sorted(slots)}: Keras named "
                                   "Adam's state differently (see Optimizer.add_variable_from_reference)")
            slots[name].assign(value)
    optimizer.iterations.assign(iterations)
