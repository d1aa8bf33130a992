"""build_model: architectures, regularizers, the loss decomposition, determinism."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import model_cfg
from l2sweep.engine.callbacks import EpochStats
from l2sweep.base.config import REGULARIZERS, ConfigError
from l2sweep.engine.model import (build_model, kernel_layers, make_regularizer, regularization_penalty,
                           set_seeds, weight_norms)


make_cfg = model_cfg


@pytest.fixture(scope="module")
def data(tiny_xy):
    """The conftest's tiny (x, y) pairs: 256 train, 64 validation."""
    return tiny_xy


def fit(cfg, data, epochs: int = 1, callbacks=()):
    """Seeds, builds and fits like the train stage; returns (model, history dict)."""
    (x, y), val = data
    set_seeds(cfg.train.seed, cfg.train.deterministic)
    model = build_model(cfg)
    history = model.fit(x, y, validation_data=val, epochs=epochs, batch_size=cfg.train.batch_size,
                        callbacks=[EpochStats(), *callbacks], verbose=0)
    return model, history.history


def test_mlp_is_the_seeds_model():
    cfg = make_cfg("model=mlp", "regularizer=l2", "regularizer.strength=0.01")
    first, second = build_model(cfg), build_model(cfg)
    for model in (first, second):  # names stay stable however many models a process builds
        assert model.name == "mlp"
        assert [layer.name for layer in model.layers] == ["image", "flatten", "hidden", "output"]
    hidden, output = first.get_layer("hidden"), first.get_layer("output")
    assert tuple(first.inputs[0].shape) == (None, 28, 28)
    assert hidden.units == 128 and hidden.activation.__name__ == "relu"
    assert output.units == 10 and output.activation.__name__ == "softmax"
    assert isinstance(hidden.kernel_regularizer, keras.regularizers.L2)
    assert hidden.kernel_regularizer.l2 == pytest.approx(0.01)
    assert output.kernel_regularizer is None  # the seeds regularize the hidden layer only
    assert [layer.name for layer in kernel_layers(first)] == ["hidden", "output"]
    assert first.count_params() == 784 * 128 + 128 + 128 * 10 + 10


def test_cnn_is_seed_004s_model():
    model = build_model(make_cfg("model=cnn", "regularizer=l2"))
    assert model.name == "cnn"
    assert [layer.name for layer in model.layers] == [
        "image", "channels", "conv1", "conv2", "flatten", "hidden", "output"]
    assert [model.get_layer(n).filters for n in ("conv1", "conv2")] == [32, 64]
    assert model.get_layer("conv1").kernel_size == (3, 3)
    assert model.get_layer("flatten").output.shape[-1] == 28 * 28 * 64
    for name in ("conv1", "conv2", "hidden"):
        assert isinstance(model.get_layer(name).kernel_regularizer, keras.regularizers.L2)
    assert model.get_layer("output").kernel_regularizer is None


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_dropout_is_a_layer_after_hidden(model_name, rate):
    """Any rate (0 too) adds a Dropout named ``dropout`` right after ``hidden``, seeded with
    train.seed, and no penalty."""
    model = build_model(make_cfg(f"model={model_name}", "regularizer=dropout",
                                 f"regularizer.strength={rate}", "train.seed=7"))
    names = [layer.name for layer in model.layers]
    assert names[names.index("hidden") + 1:] == ["dropout", "output"]
    dropout = model.get_layer("dropout")
    assert isinstance(dropout, keras.layers.Dropout) and dropout.rate == rate and dropout.seed == 7
    assert not model.losses and all(layer.kernel_regularizer is None for layer in kernel_layers(model))


def test_regularizer_kinds():
    l1_l2 = make_regularizer("l1_l2", 0.01, l1_ratio=0.25)
    assert l1_l2.l1 == pytest.approx(0.0025) and l1_l2.l2 == pytest.approx(0.0075)
    assert isinstance(make_regularizer("l1", 0.01), keras.regularizers.L1)
    assert make_regularizer("none", 0.01) is None and make_regularizer("weight_decay", 0.01) is None
    assert make_regularizer("adamw", 0.01) is None
    with pytest.raises(ConfigError, match="'l3'"):
        make_regularizer("l3", 0.01)
    with pytest.raises(ConfigError, match="conv_filters"):
        build_model(make_cfg("model=cnn", "model.conv_filters=[]"))


def test_weight_decay_is_coupled_on_the_regularized_kernels_only():
    """(That it trains l2's weights at λ/2: tests/integration/test_engine.py.)"""
    from l2sweep.engine.optimizers import CoupledDecayAdam

    model = build_model(make_cfg("regularizer=weight_decay", "regularizer.strength=0.01"))
    optimizer = model.optimizer
    assert type(optimizer) is CoupledDecayAdam and optimizer.decay == pytest.approx(0.01)
    assert optimizer.weight_decay is None and model.get_layer("hidden").kernel_regularizer is None
    assert [w.path for w in model.trainable_variables if optimizer.decays(w)] == ["hidden/kernel"]
    with pytest.raises(ValueError, match="weight_decay=0.1 is not allowed: None"):
        CoupledDecayAdam(decay=0.1, weight_decay=0.1)


def test_adamw_uses_keras_adamw_on_the_regularized_kernels_only(data):
    cfg = make_cfg("regularizer=adamw", "regularizer.strength=0.01")
    model = build_model(cfg)
    assert isinstance(model.optimizer, keras.optimizers.AdamW)
    assert model.optimizer.weight_decay == pytest.approx(0.01)
    assert model.get_layer("hidden").kernel_regularizer is None
    # Behaviour rather than Keras internals: with lambda * lr = 1 one step of decoupled decay
    # zeroes every decayed weight, so what survives shows what is excluded.
    cfg = make_cfg("regularizer=adamw", "regularizer.strength=1000.0",
                   "train.steps_per_execution=1", "train.jit_compile=false")
    set_seeds(0, True)
    model = build_model(cfg)
    for layer in ("hidden", "output"):
        model.get_layer(layer).bias.assign(np.ones(model.get_layer(layer).units))
    before = weight_norms(model)
    (x, y), _ = data
    model.train_on_batch(x[:32], y[:32])
    after = weight_norms(model)
    # One Adam step moves each weight by at most ~lr = 0.001.
    assert after["hidden"] < 0.05 * before["hidden"]  # decayed to ~0
    assert after["output"] == pytest.approx(before["output"], rel=0.05)  # output kernel not decayed
    for layer in ("hidden", "output"):  # biases not decayed
        np.testing.assert_allclose(model.get_layer(layer).bias.numpy(), 1.0, atol=0.01)


@pytest.mark.parametrize("name", ["l2", "l1", "l1_l2"])
def test_loss_is_data_loss_plus_penalty(data, name):
    cfg = make_cfg(f"regularizer={name}", "regularizer.strength=0.01")
    model, _ = fit(cfg, data)
    (x, y), _ = data
    # Compare at fixed weights: evaluate() reports loss and data_loss over the same batches at
    # the current weights, and the penalty is computed from those same weights. The epoch
    # values fit() logs are running means over batches whose weights kept changing (and
    # the penalty with them), so they match only approximately.
    result = model.evaluate(x, y, batch_size=32, verbose=0, return_dict=True)
    penalty = regularization_penalty(model)
    assert penalty > 0
    assert result["loss"] == pytest.approx(result["data_loss"] + penalty, rel=1e-5, abs=1e-6)


def test_penalty_has_keras_l2_semantics():
    lam = 0.01
    model = build_model(make_cfg("regularizer=l2", f"regularizer.strength={lam}"))
    kernel = model.get_layer("hidden").kernel.numpy().astype(np.float64)
    # lambda * sum(w^2) over the hidden kernel only (no 1/2, output layer not included)
    assert regularization_penalty(model) == pytest.approx(lam * np.sum(kernel**2), rel=1e-5)
    assert weight_norms(model)["hidden"] == pytest.approx(np.sqrt(np.sum(kernel**2)), rel=1e-5)


def test_larger_lambda_gives_smaller_weights(data):
    norms = {}
    for lam in (0.0, 0.01, 0.1):
        _, history = fit(make_cfg("regularizer=l2", f"regularizer.strength={lam}"), data, epochs=2)
        norms[lam] = history["weight_norm/hidden"][-1]
    assert norms[0.0] > norms[0.01] > norms[0.1]


def test_none_and_weight_decay_add_no_penalty(data):
    _, none = fit(make_cfg("regularizer=none"), data, epochs=2)
    model, wd = fit(make_cfg("regularizer=weight_decay", "regularizer.strength=1.0"), data, epochs=2)
    assert none["penalty"] == [0.0, 0.0] and wd["penalty"] == [0.0, 0.0]
    assert regularization_penalty(model) == 0.0
    for key in ("loss", "val_loss"):  # nothing is added to the cross-entropy
        np.testing.assert_allclose(wd[key], wd[key.replace("loss", "data_loss")], rtol=1e-6)
    assert wd["weight_norm/hidden"][-1] < none["weight_norm/hidden"][-1]


EPOCH_KEYS = {"loss", "accuracy", "data_loss", "val_loss", "val_accuracy", "val_data_loss",
              "penalty", "learning_rate", "epoch_time"}


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize("regularizer", REGULARIZERS)
def test_every_model_and_regularizer_trains(data, model_name, regularizer):
    cfg = make_cfg(f"model={model_name}", f"regularizer={regularizer}")
    model, history = fit(cfg, data)
    layers = [layer.name for layer in kernel_layers(model)]
    assert set(history) == EPOCH_KEYS | {f"weight_norm/{name}" for name in layers}
    assert all(len(values) == 1 and math.isfinite(values[0]) for values in history.values())
    assert history["learning_rate"] == [pytest.approx(cfg.train.learning_rate)]
    assert (history["penalty"][0] > 0) == (regularizer in ("l2", "l1", "l1_l2"))


@pytest.mark.parametrize("spe,jit", [(1, False), (4, True)], ids=["eager-steps", "xla-spe4"])
def test_same_seed_same_history(data, spe, jit):
    cfg = make_cfg("regularizer=l2", f"train.steps_per_execution={spe}",
                   f"train.jit_compile={str(jit).lower()}", "train.deterministic=true")
    runs = []
    for _ in range(2):
        model, history = fit(cfg, data, epochs=2)
        # XLA really on: build_model re-enables it under op determinism on CPU (not on GPU)
        assert model.jit_compile is (jit and not tf.config.list_physical_devices("GPU"))
        history.pop("epoch_time")  # wall clock
        runs.append(history)
    assert runs[0] == runs[1]


def test_set_seeds_rejects_bad_seed():
    with pytest.raises(ValueError, match="-1"):
        set_seeds(-1, False)
