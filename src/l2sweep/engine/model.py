"""The networks under study and their regularizers, as both training loops train them.

The output layer is never regularized (nor decayed), so a lambda means the same across models
and regularizer kinds. Layer names (``hidden``, ``output``, ``conv1`` ...) are stable; ``dropout``
(strength = rate) adds a Dropout layer named ``dropout`` right after ``hidden``, at any rate.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import keras
import numpy as np
import tensorflow as tf

from l2sweep.base import compat
from l2sweep.base.config import MODELS, REGULARIZERS, ConfigError
from l2sweep.engine.optimizers import CoupledDecayAdam

INPUT_SHAPE = (28, 28)
NUM_CLASSES = 10


def set_seeds(seed: int, deterministic: bool = True) -> None:
    """Seeds Python, NumPy and TensorFlow, before :func:`build_model` and before ``fit``;
    ``deterministic`` also enables op determinism (process-wide, for good)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r} is not allowed: a non-negative integer")
    keras.utils.set_random_seed(int(seed))
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def make_regularizer(name: str, strength: float, l1_ratio: float = 0.5) -> Optional[keras.regularizers.Regularizer]:
    """The kernel regularizer of ``name`` (Keras semantics; None for the optimizer's decay,
    ``weight_decay`` and ``adamw``, and for ``none``); ``l1_ratio``: ``l1_l2``'s share of lambda
    given to the L1 term."""
    strength = float(strength)
    if name == "l2":
        return keras.regularizers.L2(strength)
    if name == "l1":
        return keras.regularizers.L1(strength)
    if name == "l1_l2":
        return keras.regularizers.L1L2(l1=strength * l1_ratio, l2=strength * (1.0 - l1_ratio))
    if name in ("weight_decay", "adamw", "dropout", "none"):  # the optimizer's decay; a layer
        return None
    raise ConfigError("regularizer.name", name, f"one of {', '.join(REGULARIZERS)}")


def make_dropout(r: Any, seed: int) -> Optional[keras.layers.Dropout]:
    """Regularizer ``r``'s Dropout layer, named ``dropout`` (rate ``r.strength``), for
    ``r.name == "dropout"``, else None. Its masks are drawn from ``seed`` (``train.seed``), so a run
    repeats them and the compiled loop draws the same (l2sweep.engine.compiled)."""
    if r.name != "dropout":
        return None
    return keras.layers.Dropout(float(r.strength), seed=int(seed), name="dropout")


def mlp(hidden_units: int, reg: Optional[keras.regularizers.Regularizer],
        dropout: Optional[keras.layers.Dropout] = None) -> keras.Model:
    """The MLP: ``Input(28, 28) -> Flatten -> Dense(hidden_units, relu, reg) [-> dropout]
    -> Dense(10, softmax)``."""
    inputs = keras.Input(shape=INPUT_SHAPE, dtype="float32", name="image")
    x = keras.layers.Flatten(name="flatten")(inputs)
    x = keras.layers.Dense(hidden_units, activation="relu", kernel_regularizer=reg, name="hidden")(x)
    if dropout is not None:
        x = dropout(x)
    outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax", name="output")(x)
    return keras.Model(inputs, outputs, name="mlp")


def cnn(conv_filters: list[int], hidden_units: int, reg: Optional[keras.regularizers.Regularizer],
        dropout: Optional[keras.layers.Dropout] = None) -> keras.Model:
    """The CNN: ``Conv2D(f, 3x3, relu, reg)`` per filter count -> Flatten -> Dense(relu, reg)
    [-> dropout] -> Dense(10)."""
    inputs = keras.Input(shape=INPUT_SHAPE, dtype="float32", name="image")
    x = keras.layers.Reshape(INPUT_SHAPE + (1,), name="channels")(inputs)
    for i, filters in enumerate(conv_filters, start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu",
                                kernel_regularizer=reg, name=f"conv{i}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(hidden_units, activation="relu", kernel_regularizer=reg, name="hidden")(x)
    if dropout is not None:
        x = dropout(x)
    outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax", name="output")(x)
    return keras.Model(inputs, outputs, name="cnn")


def build_model(cfg: Any) -> keras.Model:
    """The configured network, compiled: metrics ``accuracy`` and ``data_loss`` (``loss`` minus
    the penalty); Adam (:func:`_optimizer`: with ``weight_decay`` or ``adamw`` decay).
    ConfigError for a bad ``model.*``/``regularizer.*``."""
    model = _network(cfg.model, make_regularizer(cfg.regularizer.name, cfg.regularizer.strength,
                                                 cfg.regularizer.l1_ratio),
                     make_dropout(cfg.regularizer, cfg.train.seed))
    _compile(model, _optimizer(model, cfg.regularizer, float(cfg.train.learning_rate)), cfg.train)
    return model


def _network(m: Any, reg: Optional[keras.regularizers.Regularizer],
             dropout: Optional[keras.layers.Dropout]) -> keras.Model:
    if m.name == "mlp":
        return mlp(int(m.hidden_units), reg, dropout)
    if m.name == "cnn":
        filters = [int(f) for f in (m.conv_filters or [])]
        if not filters:
            raise ConfigError("model.conv_filters", list(m.conv_filters or []),
                              "a non-empty list of filter counts for cnn, e.g. [32, 64]")
        return cnn(filters, int(m.hidden_units), reg, dropout)
    raise ConfigError("model.name", m.name, f"one of {', '.join(MODELS)}")


def _optimizer(model: keras.Model, r: Any, learning_rate: float) -> keras.optimizers.Optimizer:
    """Adam; for ``weight_decay`` coupled decay (``gradient + λ·w``, CoupledDecayAdam), for
    ``adamw`` decoupled (``w -= lr·λ·w``, Keras AdamW), both on the kernels the penalties
    regularize: not on biases (standard practice), not on the output layer (never regularized)."""
    decayed = [layer.kernel for layer in regularized_layers(model)]
    if r.name == "weight_decay":
        return CoupledDecayAdam(decay=float(r.strength), decayed=[w.path for w in decayed],
                                learning_rate=learning_rate)
    if r.name != "adamw":
        return keras.optimizers.Adam(learning_rate=learning_rate)
    optimizer = keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=float(r.strength))
    kept = {id(w) for w in decayed}
    optimizer.exclude_from_weight_decay(var_list=[v for v in model.trainable_variables if id(v) not in kept])
    return optimizer


def _compile(model: keras.Model, optimizer: keras.optimizers.Optimizer, t: Any) -> None:
    jit = bool(t.jit_compile)
    force_jit = jit and _xla_refused_only_for_determinism()
    with warnings.catch_warnings():
        if force_jit:
            warnings.filterwarnings("ignore", message="Model doesn't support `jit_compile=True`")
        model.compile(
            optimizer=optimizer,
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy", keras.metrics.SparseCategoricalCrossentropy(name="data_loss")],
            steps_per_execution=int(t.steps_per_execution),
            jit_compile=jit,
        )
    if force_jit:
        # Keras refuses XLA under op determinism for GPU's sake; on CPU it repeats bit for bit.
        compat.force_jit_compile(model)


def _xla_refused_only_for_determinism() -> bool:
    """Whether Keras refuses XLA only for op determinism, with no GPU (where XLA is safe)."""
    return compat.op_determinism_enabled() and not tf.config.list_physical_devices("GPU")


def kernel_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers of ``model`` that have a kernel (Dense, Conv), in model order."""
    return [layer for layer in model.layers if getattr(layer, "kernel", None) is not None]


def regularized_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers whose kernel is under study (regularized or decayed): all kernel layers but ``output``."""
    return [layer for layer in kernel_layers(model) if layer.name != "output"]


def regularization_penalty(model: keras.Model) -> float:
    """The regularization term at the current weights (the sum of ``model.losses``; 0.0 if none)."""
    return float(sum(float(keras.ops.convert_to_numpy(loss)) for loss in model.losses))


def weight_norms(model: keras.Model) -> dict[str, float]:
    """The L2 (Frobenius) norm of each kernel, keyed by layer name."""
    return {layer.name: float(np.linalg.norm(keras.ops.convert_to_numpy(layer.kernel)))
            for layer in kernel_layers(model)}
