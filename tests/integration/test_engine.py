"""l2sweep.engine.fit: the compiled loop equals Keras fit, trains K models as K separate runs,
and trains whatever l2sweep.engine.model defines (or refuses it by name)."""

from __future__ import annotations

import math
import re

import keras
import numpy as np
import pytest

from l2sweep.engine import compiled, model
from l2sweep.base.config import training_loop
from l2sweep.engine.fit import Fold, Trained, fit

#: float32 over a few dozen Adam steps: both loops agree to ~1e-7 relative (measured).
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def data(tiny_arrays):
    """(x_train, y_train, x_val, y_val): the tiny set's uint8 images as prepared, read-only
    like the train stage's (500 train, 100 validation)."""
    arrays = tuple(tiny_arrays[k].copy() for k in ("x_train", "y_train", "x_test", "y_test"))
    for a in arrays:
        a.flags.writeable = False
    return arrays


def grid(tiny_cfg, regularizer: str, strengths, *extra: str, seeds=None) -> list:
    """One config per lambda (with ``seeds``: config i gets seed i), otherwise equal (as the
    train stage makes them)."""
    seeds = seeds or [None] * len(strengths)
    return [tiny_cfg(f"regularizer={regularizer}", f"regularizer.strength={s}", "tracking.enabled=false",
                     *extra, *([f"train.seed={seed}"] if seed is not None else [])) for s, seed in zip(strengths, seeds)]


def assert_same(got: Trained, ref: Trained, what: str) -> None:
    """Every per-epoch metric (but the wall time), weight, seed state (a Dropout's: as many
    draws) and optimizer variable agree."""
    assert got.history.keys() == ref.history.keys(), what
    assert got.diverged_epoch == ref.diverged_epoch, what
    for key in set(ref.history) - {"epoch_time"}:
        np.testing.assert_allclose(got.history[key], ref.history[key], rtol=RTOL, atol=ATOL,
                                   err_msg=f"{what} {key}")
    pairs = list(zip(got.model.variables, ref.model.variables))
    pairs += list(zip(got.model.optimizer.variables, ref.model.optimizer.variables))
    assert len(pairs) == len(ref.model.variables) + len(ref.model.optimizer.variables), what
    for a, b in pairs:
        assert a.name == b.name, what
        np.testing.assert_allclose(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b),
                                   rtol=RTOL, atol=ATOL, err_msg=f"{what} {a.path}")


def fit_each(cfgs, data) -> list[Trained]:
    """Each config on its own (K=1), as one job per lambda trains it."""
    return [fit([c], *data, [[]], c.run_name)[0] for c in cfgs]


# l1_l2 and adamw: test_both_loops_train_what_model_py_defines compares both loops on them;
# weight_decay: test_weight_decay_trains_l2_at_half_lambda_and_adamw_does_not.
@pytest.mark.parametrize("regularizer,lambdas", [("l2", (0.001, 0.1)), ("dropout", (0.2, 0.5))])
def test_compiled_loop_equals_keras_fit(tiny_cfg, data, regularizer, lambdas):
    """4 runs, 2 lambdas x 2 seeds (a seed: its initial weights, batch order, reshuffled
    each epoch, and dropout masks), given lambda by lambda, for 2 epochs: all at once in the
    compiled loop (a group per seed), one by one in it, and one by one in Keras' own fit (fed the
    same batches) give the same metrics, weights and Adam state, each in its config's place."""
    strengths, seeds = (lambdas[0], lambdas[0], lambdas[1], lambdas[1]), (1, 2, 1, 2)
    together = fit(grid(tiny_cfg, regularizer, strengths, "train.epochs=2", seeds=seeds), *data, [[]] * 4, "grid")
    alone = fit_each(grid(tiny_cfg, regularizer, strengths, "train.epochs=2", seeds=seeds), data)
    keras_fit = fit_each(grid(tiny_cfg, regularizer, strengths, "train.epochs=2", "train.loop=keras",
                              seeds=seeds), data)
    for s, seed, a, b, ref in zip(strengths, seeds, together, alone, keras_fit):
        assert len(ref.history["loss"]) == 2 and ref.diverged_epoch is None
        assert_same(a, ref, f"together {regularizer}-{s}-s{seed}")
        assert_same(b, ref, f"alone {regularizer}-{s}-s{seed}")
        assert int(a.model.optimizer.iterations) == 2 * math.ceil(len(data[0]) / 32)


#: The fold tests' runs: 2 epochs, without XLA (compiling costs more than these fits).
TWO_EPOCHS = ("train.epochs=2", "train.jit_compile=false")


def test_folds_train_together_as_keras_fit_trains_each_on_its_fold(tiny_cfg, data):
    """2 lambdas x 2 stratified folds of the pool (x_train), given out of order: all at once in
    the compiled loop (a group per fold, validated on its fold) equal Keras fit of each run on
    its fold's training examples, validated on its validation examples."""
    from l2sweep.base.data import stratified_folds

    x, y = data[:2]
    folds = [Fold(np.setdiff1d(np.arange(len(y)), val), val) for val in stratified_folds(y, 2, seed=0)]
    strengths, which = (0.001, 0.001, 0.1, 0.1), (1, 0, 0, 1)
    runs = [folds[i] for i in which]
    together = fit(grid(tiny_cfg, "l2", strengths, *TWO_EPOCHS), x, y, None, None, [[]] * 4, "cv", folds=runs)
    keras_fit = fit(grid(tiny_cfg, "l2", strengths, *TWO_EPOCHS, "train.loop=keras"), x, y, None, None,
                    [[]] * 4, "cv", folds=runs)
    for s, i, got, ref in zip(strengths, which, together, keras_fit):
        assert len(ref.history["val_loss"]) == 2
        assert_same(got, ref, f"l2-{s}-f{i}")
        assert int(got.model.optimizer.iterations) == 2 * math.ceil(len(folds[i].train) / 32)
    assert together[1].history["val_loss"] != together[2].history["val_loss"]  # 0.001 on folds 0, 1


def test_a_fold_without_validation_data_trains_without_it(tiny_cfg, data):
    """A refit, Fold(the whole pool, val=None), trains in both loops without validation: loss,
    accuracy and data_loss per epoch, no val_* metric, the same in both loops; x_val=None
    without folds trains the same runs. (4 runs, as the test above: its compiled engine.)"""
    x, y = data[:2]
    strengths, seeds = (0.001, 0.001, 0.1, 0.1), (1, 2, 1, 2)
    whole = [Fold(np.arange(len(y)))] * 4
    cfgs = grid(tiny_cfg, "l2", strengths, *TWO_EPOCHS, seeds=seeds)
    refits = fit(cfgs, x, y, None, None, [[]] * 4, "refit", folds=whole)
    no_val = fit(cfgs, x, y, None, None, [[]] * 4, "no val")
    keras_fit = fit(grid(tiny_cfg, "l2", strengths[::3], *TWO_EPOCHS, "train.loop=keras", seeds=seeds[::3]),
                    x, y, None, None, [[], []], "refit", folds=whole[:2])
    for s, seed, got, ref in zip(strengths[::3], seeds[::3], refits[::3], keras_fit):
        assert {"loss", "accuracy", "data_loss", "penalty"} <= ref.history.keys()
        assert not [key for key in ref.history if key.startswith("val_")]
        assert_same(got, ref, f"refit l2-{s}-s{seed}")
    for got, same in zip(refits, no_val):
        assert_same(same, got, "no validation")


def test_the_compiled_loop_refuses_folds_of_different_sizes(tiny_cfg, data):
    x, y = data[:2]
    cfgs = grid(tiny_cfg, "l2", (0.001, 0.1))
    uneven = [Fold(np.arange(300), np.arange(300, 500)), Fold(np.arange(200, 500), np.arange(100))]
    with pytest.raises(ValueError, match=r"on folds of one size: got \(train, validation\) sizes "
                                         r"\[\(300, 100\), \(300, 200\)\]"):
        fit(cfgs, x, y, None, None, [[], []], "cv", folds=uneven)
    with pytest.raises(ValueError, match="one per config"):
        fit(cfgs, *data, [[], []], "cv", folds=uneven)


@pytest.mark.filterwarnings("ignore:Model doesn.t support .jit_compile=True.")  # load_model under op determinism
@pytest.mark.parametrize("regularizer", ["l2", "weight_decay"])
def test_the_trained_model_saves_with_its_optimizer_state(tiny_cfg, data, tmp_path, regularizer):
    """A compiled fit's model.keras holds its weights, Adam moments and step count, so it
    resumes as fit's would (weight_decay's optimizer too: the same decay, on the same kernels)."""
    (trained,) = fit(grid(tiny_cfg, regularizer, (0.01,)), *data, [[]], "save")
    trained.model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert int(loaded.optimizer.iterations) == math.ceil(len(data[0]) / 32)
    assert type(loaded.optimizer) is type(trained.model.optimizer)
    assert loaded.optimizer.get_config() == trained.model.optimizer.get_config()
    for a, b in zip(loaded.weights + loaded.optimizer.variables,
                    trained.model.weights + trained.model.optimizer.variables):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))


def test_weight_decay_trains_l2_at_half_lambda_and_adamw_does_not(tiny_cfg, data):
    """Coupled weight decay λ adds λ·w to the gradient: exactly d/dw of l2's (λ/2)·Σw². From the
    same seed on the same batches, weight_decay λ and l2 λ/2 end with the same weights (to float
    rounding) in both loops, their loss differing by l2's penalty alone; adamw λ (decay outside
    Adam, not rescaled by it) ends elsewhere."""
    kinds = (("weight_decay", 0.02), ("l2", 0.02 / 2), ("adamw", 0.02))
    kernel = lambda t: keras.ops.convert_to_numpy(t.model.get_layer("hidden").kernel)  # noqa: E731
    for loop in ("compiled", "keras"):  # (without XLA: compiling costs more than these fits)
        wd, l2, adamw = (fit_each(grid(tiny_cfg, kind, (s,), f"train.loop={loop}", "train.jit_compile=false"),
                                  data)[0] for kind, s in kinds)
        for a, b in zip(wd.model.weights, l2.model.weights):
            np.testing.assert_allclose(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b),
                                       rtol=RTOL, atol=ATOL, err_msg=f"{loop} {a.path}")
        np.testing.assert_allclose(wd.history["data_loss"], l2.history["data_loss"], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(wd.history["loss"], wd.history["data_loss"], rtol=1e-6)  # no penalty
        assert wd.history["penalty"] == [0.0] and l2.history["penalty"][0] > 0
        assert l2.history["loss"][0] > wd.history["loss"][0]  # + the penalty
        assert not np.allclose(kernel(adamw), kernel(wd), rtol=1e-3, atol=1e-4), loop


def deeper_mlp(hidden_units: int, reg, dropout=None) -> keras.Model:
    """Another MLP for model.mlp: tanh, a second hidden layer (elu, no bias), another width;
    with ``dropout``, a Dropout after each hidden layer (the second's seeded apart)."""
    inputs = keras.Input(shape=model.INPUT_SHAPE, name="image")
    x = keras.layers.Flatten(name="flatten")(inputs)
    x = keras.layers.Dense(48, activation="tanh", kernel_regularizer=reg, name="hidden")(x)
    x = dropout(x) if dropout is not None else x
    x = keras.layers.Dense(24, activation="elu", use_bias=False, kernel_regularizer=reg, name="hidden2")(x)
    if dropout is not None:
        x = keras.layers.Dropout(dropout.rate, seed=dropout.seed + 1, name="dropout2")(x)
    outputs = keras.layers.Dense(model.NUM_CLASSES, activation="softmax", name="output")(x)
    return keras.Model(inputs, outputs, name="mlp")


# weight_decay and dropout: the tests above compare both loops on them.
@pytest.mark.parametrize("regularizer", ["l1_l2", "adamw"])
def test_both_loops_train_what_model_py_defines(tiny_cfg, data, monkeypatch, regularizer):
    """model.py is the one definition: with another MLP in it, the compiled loop trains that
    network (layers, activations, penalties, decay), exactly as Keras fit does."""
    strengths = (0.001, 0.1)
    (relu,) = fit_each(grid(tiny_cfg, regularizer, strengths[:1]), data)
    monkeypatch.setattr(model, "mlp", deeper_mlp)
    compiled = fit(grid(tiny_cfg, regularizer, strengths), *data, [[], []], "grid")
    keras_fit = fit_each(grid(tiny_cfg, regularizer, strengths, "train.loop=keras"), data)
    for s, got, ref in zip(strengths, compiled, keras_fit):
        dense = [layer for layer in got.model.layers if isinstance(layer, keras.layers.Dense)]
        assert [(d.units, d.activation.__name__) for d in dense] == [(48, "tanh"), (24, "elu"), (10, "softmax")]
        assert "weight_norm/hidden2" in got.history
        assert_same(got, ref, f"{regularizer}-{s}")
    assert not np.allclose(compiled[0].history["loss"], relu.history["loss"])  # not the relu MLP's


def test_dropout_acts_in_training_steps_only(tiny_cfg, data):
    """Rate 0 trains as no dropout at all and rate 0.5 otherwise; validation sees no dropout (the
    epoch's val metrics are Keras' evaluate of the trained model)."""
    from l2sweep.base.data import to_float

    off, half = fit(grid(tiny_cfg, "dropout", (0.0, 0.5)), *data, [[], []], "grid")
    (plain,) = fit(grid(tiny_cfg, "none", (0.0,)), *data, [[]], "plain")
    for a, b in zip(off.model.get_weights(), plain.model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
    assert not np.allclose(half.model.get_weights()[0], plain.model.get_weights()[0], rtol=1e-3, atol=1e-4)
    result = half.model.evaluate(to_float(data[2]), data[3], verbose=0, return_dict=True)
    for name in ("loss", "accuracy", "data_loss"):
        np.testing.assert_allclose(half.history[f"val_{name}"][-1], result[name], rtol=RTOL, atol=ATOL)


def _with_noise(hidden_units: int, reg, dropout=None) -> keras.Model:
    inputs = keras.Input(shape=model.INPUT_SHAPE, name="image")
    x = keras.layers.Flatten(name="flatten")(inputs)
    x = keras.layers.GaussianNoise(0.1, name="noise")(keras.layers.Dense(hidden_units, name="hidden")(x))
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax", name="output")(x))


def _shaped_dropout(hidden_units: int, reg, dropout=None) -> keras.Model:
    inputs = keras.Input(shape=model.INPUT_SHAPE, name="image")
    x = keras.layers.Dense(hidden_units, name="hidden")(keras.layers.Flatten(name="flatten")(inputs))
    x = keras.layers.Dropout(0.5, noise_shape=(1, hidden_units), name="dropout")(x)
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax", name="output")(x))


def _linear_output(hidden_units: int, reg, dropout=None) -> keras.Model:
    inputs = keras.Input(shape=model.INPUT_SHAPE, name="image")
    x = keras.layers.Dense(hidden_units, name="hidden")(keras.layers.Flatten(name="flatten")(inputs))
    return keras.Model(inputs, keras.layers.Dense(10, name="output")(x))


@pytest.mark.parametrize("builder,named", [(_with_noise, "layer 'noise' (GaussianNoise)"),
                                          (_shaped_dropout, "layer 'dropout': it sets noise_shape"),
                                          (_linear_output, "layer 'output'")],
                         ids=["noise", "dropout-noise-shape", "no-softmax"])
def test_the_compiled_loop_refuses_what_it_cannot_run(tiny_cfg, data, monkeypatch, builder, named):
    monkeypatch.setattr(model, "mlp", builder)
    with pytest.raises(ValueError, match=f"cannot run {re.escape(named)}.*train.loop=keras"):
        fit([tiny_cfg("tracking.enabled=false")], *data, [[]], "refused")


def test_the_cnn_runs_only_in_keras_fit(tiny_cfg, data):
    from l2sweep.base.config import ConfigError, validate

    assert training_loop(tiny_cfg("model=cnn")) == "keras"
    with pytest.raises(ConfigError, match="train.loop='compiled' is not allowed: auto or keras for model.name=cnn"):
        validate(tiny_cfg("model=cnn", "train.loop=compiled"))
    with pytest.raises(ValueError, match=r"cannot run layer 'channels' \(Reshape\).*train.loop=keras"):
        fit([tiny_cfg("model=cnn", "train.loop=compiled")], *data, [[]], "cnn")
    # With dropout (after its hidden layer), as Keras fit trains it.
    (trained,) = fit([tiny_cfg("model=cnn", "model.conv_filters=[4]", "model.hidden_units=16",
                               "regularizer=dropout", "regularizer.strength=0.5", "tracking.enabled=false")],
                     *data, [[]], "cnn")
    assert [layer.name for layer in trained.model.layers][-3:] == ["hidden", "dropout", "output"]
    assert trained.model.get_layer("dropout").rate == 0.5
    assert len(trained.history["loss"]) == 1 and math.isfinite(trained.history["loss"][0])


def test_the_keras_loop_trains_replicates_one_after_another(tiny_cfg, data):
    """(The CNN's loop.) Each config on its own seed: two models, each its own."""
    cfgs = grid(tiny_cfg, "l2", (0.1, 0.1), "train.loop=keras", seeds=(1, 2))
    first, second = fit(cfgs, *data, [[], []], "keras")
    assert first.history["loss"] != second.history["loss"] and first.model is not second.model


def test_a_diverging_lambda_fails_alone(tiny_cfg, data):
    """lambda=1e37 overflows the penalty at the first step: that model stops with
    diverged_epoch 0; the other trains on exactly as it does alone."""
    cfgs = grid(tiny_cfg, "l2", (0.001, 1e37), "train.epochs=2")
    good, bad = fit(cfgs, *data, [[], []], "grid")
    assert bad.diverged_epoch == 0 and len(bad.history["loss"]) == 1
    assert not math.isfinite(bad.history["loss"][0])
    (alone,) = fit(cfgs[:1], *data, [[]], "alone")
    assert good.diverged_epoch is None and len(good.history["loss"]) == 2
    assert_same(good, alone, "l2-0.001")


class BatchEnds(keras.callbacks.Callback):
    """Records each train batch end: (epoch, batch, loss)."""

    def on_train_begin(self, logs=None):
        self.ends, self.epoch = [], None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.ends.append((self.epoch, batch, logs["loss"]))


def test_epochs_in_calls_of_a_few_steps_equal_keras_fit(tiny_cfg, data, monkeypatch):
    """Calls of 5 steps (16 batches an epoch: 4 calls, the last of one batch) train as Keras fit
    does; after each call the callbacks see a batch end with the epoch's running mean so far."""
    monkeypatch.setattr(compiled, "STEPS_PER_CALL", 5)
    cfgs = grid(tiny_cfg, "l2", (0.001, 0.1), "train.epochs=2")
    ends = [BatchEnds(), BatchEnds()]
    got = fit(cfgs, *data, [[e] for e in ends], "grid")
    refs = fit_each(grid(tiny_cfg, "l2", (0.001, 0.1), "train.epochs=2", "train.loop=keras"), data)
    for s, a, ref, seen in zip((0.001, 0.1), got, refs, ends):
        assert_same(a, ref, f"l2-{s}")
        assert [(e, b) for e, b, _ in seen.ends] == [(e, b) for e in (0, 1) for b in (4, 9, 14, 15)]
        last = [loss for e, b, loss in seen.ends if b == 15]
        np.testing.assert_allclose(last, ref.history["loss"], rtol=RTOL, atol=ATOL)


class StopAfterFirstEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        self.model.stop_training = True


def test_a_callback_stops_its_model_as_in_fit(tiny_cfg, data):
    """A callback setting ``model.stop_training`` ends that model's training as it ends fit's
    (weights and Adam state of that epoch); the other models of the grid go on."""
    cfgs = grid(tiny_cfg, "l2", (0.001, 0.1), "train.epochs=2")
    stopped, going = fit(cfgs, *data, [[StopAfterFirstEpoch()], []], "grid")
    keras_cfgs = grid(tiny_cfg, "l2", (0.001, 0.1), "train.epochs=2", "train.loop=keras")
    (ref_stopped,) = fit(keras_cfgs[:1], *data, [[StopAfterFirstEpoch()]], "keras")
    (ref_going,) = fit(keras_cfgs[1:], *data, [[]], "keras")
    assert len(stopped.history["loss"]) == 1 and len(going.history["loss"]) == 2
    assert_same(stopped, ref_stopped, "stopped")
    assert_same(going, ref_going, "going on")


def test_every_epoch_reshuffles_and_fit_is_fed_that_order():
    """epoch_batches draws each epoch's order from (seed, epoch); EpochBatches feeds Keras fit
    exactly those batches, epoch after epoch (what the compiled loop trains on too)."""
    import tensorflow as tf

    from l2sweep.engine.fit import EpochBatches, epoch_batches

    n, epochs, steps = 100, 3, 4   # 3 batches of 32, then one of 4

    class Recorder(keras.Model):
        """Records the first and last label of every batch it is trained on."""

        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1)
            self.seen = tf.Variable(tf.zeros((epochs * steps, 2), tf.int64), trainable=False)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False)

        def call(self, x):
            return self.dense(x)

        def train_step(self, data):
            _, y = data
            self.seen.scatter_nd_update([[self.step]], [tf.stack([y[0], y[-1]])])
            self.step.assign_add(1)
            return {"step": self.step}

    recorder = Recorder()
    recorder(np.zeros((1, 28, 28)))
    recorder.compile(steps_per_execution=2)
    recorder.fit(EpochBatches(np.zeros((n, 28, 28), np.uint8), np.arange(n), seed=7, batch_size=32),
                 epochs=epochs, shuffle=False, verbose=0)
    order = [epoch_batches(7, epoch, n, 32) for epoch in range(epochs)]
    assert [[len(b) for b in epoch] for epoch in order] == [[32, 32, 32, 4]] * epochs
    mine = np.asarray([[b[0], b[-1]] for epoch in order for b in epoch])
    np.testing.assert_array_equal(mine, recorder.seen.numpy())
    assert all(sorted(np.concatenate(epoch).tolist()) == list(range(n)) for epoch in order)
    assert not np.array_equal(np.concatenate(order[0]), np.concatenate(order[1]))  # reshuffled
    assert [b.tolist() for b in epoch_batches(8, 0, n, 32)] != [b.tolist() for b in order[0]]


def test_uint8_images_train_exactly_as_their_float_copy(tiny_cfg, data):
    """The compiled loop scales uint8 images in its step to exactly to_float's values (the
    float arrays fit is given): every metric and weight is the float copy's, bit for bit."""
    from l2sweep.base.data import to_float

    x, y, xv, yv = data
    cfgs = grid(tiny_cfg, "l2", (0.001, 0.01))
    runs = [fit(cfgs, *arrays, [[], []], "grid") for arrays in ((x, y, xv, yv), (to_float(x), y, to_float(xv), yv))]
    for got, ref in zip(*runs):
        assert got.history.keys() == ref.history.keys()
        for key in set(ref.history) - {"epoch_time"}:  # a wall time
            assert got.history[key] == ref.history[key], key
        for w, w_ref in zip(got.model.get_weights(), ref.model.get_weights()):
            np.testing.assert_array_equal(w, w_ref)


def test_the_compiled_loop_compiles_once_per_process(tiny_cfg, data):
    """The jobs of a sequential sweep reuse one engine: the next lambda starts from its own
    initial weights and zero Adam state without tracing (and so compiling) again.
    (test_compiled_loop_equals_keras_fit shows the reused engine's results equal fit's.)"""
    from l2sweep.engine.compiled import CompiledMLP

    first, second = grid(tiny_cfg, "l2", (0.001, 0.1))
    fit([first], *data, [[]], "first")
    engine = CompiledMLP.for_views([model.build_model(first)])  # the process's engine
    traced = engine.tracing_count()
    assert traced >= 1
    fit([second], *data, [[]], "second")
    assert CompiledMLP.for_views([model.build_model(second)]) is engine and engine.tracing_count() == traced
    other = CompiledMLP.for_views([model.build_model(tiny_cfg("model.hidden_units=16"))])
    assert other is not engine


def test_the_jobs_of_a_process_share_the_data_tensors(tiny_cfg, data):
    """The second job reuses the first one's tensors of the read-only shared arrays; other
    (writeable) arrays are converted anew."""
    from l2sweep.engine import fit as fit_module

    first, second = grid(tiny_cfg, "l2", (0.001, 0.1))
    fit([first], *data, [[]], "first")
    tensors = fit_module.data_tensors(*data)
    fit([second], *data, [[]], "second")
    assert fit_module.data_tensors(*data) is tensors
    assert fit_module.data_tensors(data[0].copy(), *data[1:]) is not tensors  # writeable: not kept