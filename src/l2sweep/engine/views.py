"""What the compiled loop (l2sweep.engine.compiled) can run, read from the Keras models that
:func:`l2sweep.engine.model.build_model` makes, one per run (the "views"): their Dense layers
(and the Dropout after each), penalties, Adam settings and weight decay, as one :class:`Spec`.
Anything else is refused by name (train that with ``train.loop=keras``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import keras
import numpy as np

from l2sweep.base import compat
from l2sweep.engine.optimizers import CoupledDecayAdam

#: Optimizer options the engine cannot run when set (off in Keras' defaults).
UNSUPPORTED_OPTIMIZER_OPTIONS = ("amsgrad", "clipnorm", "clipvalue", "global_clipnorm", "use_ema",
                                 "gradient_accumulation_steps", "loss_scale_factor")
#: Dense options the engine cannot run when set.
UNSUPPORTED_DENSE_OPTIONS = ("bias_regularizer", "activity_regularizer", "kernel_constraint",
                             "bias_constraint", "lora_rank", "quantization_config")


def _refused(what: str, why: str) -> ValueError:
    return ValueError(f"the compiled training loop cannot run {what}: {why}; "
                      "train this model with train.loop=keras")


def _layers(view: keras.Model) -> list[tuple[keras.layers.Dense, Optional[keras.layers.Dropout]]]:
    """Each Dense layer of ``view`` after its Flatten, with the Dropout right after it (or None);
    a ValueError for anything else."""
    layers = [layer for layer in view.layers if not isinstance(layer, keras.layers.InputLayer)]
    expected = "only Input -> Flatten -> Dense [-> Dropout] ... -> Dense"
    if len(view.inputs) != 1 or len(layers) < 2:
        raise _refused(f"model {view.name!r}", expected)
    pairs = []
    for i, layer in enumerate(layers):
        if (i and isinstance(layer, keras.layers.Dropout) and isinstance(layers[i - 1], keras.layers.Dense)
                and i + 1 < len(layers)):
            if layer.noise_shape is not None or not 0 <= layer.rate < 1 or layer.compute_dtype != "float32":
                raise _refused(f"layer {layer.name!r}", f"it sets noise_shape={layer.noise_shape}, "
                               f"rate={layer.rate} or dtype {layer.compute_dtype} "
                               "(allowed: none, [0, 1), float32)")
            pairs[-1] = (pairs[-1][0], layer)
            continue
        if not isinstance(layer, keras.layers.Dense if i else keras.layers.Flatten):
            raise _refused(f"layer {layer.name!r} ({type(layer).__name__})", expected)
        config = layer.get_config() if i else {}
        options = [k for k in UNSUPPORTED_DENSE_OPTIONS if config.get(k) not in (None, 0)]
        if options or layer.compute_dtype != "float32":
            raise _refused(f"layer {layer.name!r}", f"it sets {options or layer.compute_dtype}")
        if i:
            pairs.append((layer, None))
    last = layers[-1]
    if last.activation is not keras.activations.softmax:
        raise _refused(f"layer {last.name!r}", "the last layer must be a Dense with softmax activation")
    if view.get_compile_config().get("loss") != "sparse_categorical_crossentropy":
        raise _refused(f"model {view.name!r}", "its loss must be sparse_categorical_crossentropy")
    return pairs


def dense_layers(view: keras.Model) -> list[keras.layers.Dense]:
    """The Dense layers of ``view``, after its Flatten; a ValueError for anything else."""
    return [dense for dense, _ in _layers(view)]


def dropout_layers(view: keras.Model) -> list[Optional[keras.layers.Dropout]]:
    """For each of :func:`dense_layers`, the Dropout right after it, or None."""
    return [dropout for _, dropout in _layers(view)]


def seed_state(dropout: Optional[keras.layers.Dropout]) -> np.ndarray:
    """The state of ``dropout``'s seed generator (zeros without one: rate 0 draws nothing)."""
    if dropout is None or dropout.rate == 0:
        return np.zeros(2, np.int64)
    return keras.ops.convert_to_numpy(dropout.seed_generator.state).astype(np.int64)


def penalty_coefficients(layer: keras.layers.Dense) -> tuple[float, float]:
    """(l1, l2) of ``layer``'s kernel regularizer (keras.regularizers L1, L2, L1L2), else zeros."""
    reg = layer.kernel_regularizer
    if reg is None:
        return 0.0, 0.0
    if not isinstance(reg, (keras.regularizers.L1, keras.regularizers.L2, keras.regularizers.L1L2)):
        raise _refused(f"layer {layer.name!r}'s kernel regularizer {type(reg).__name__}",
                       "only L1, L2 and L1L2")
    config = reg.get_config()
    return float(config.get("l1", 0.0)), float(config.get("l2", 0.0))


@dataclass(frozen=True)
class Adam:
    """Adam's hyper-parameters as read from a view's optimizer (the decay's strength is kept apart)."""

    learning_rate: float
    beta_1: float
    beta_2: float
    epsilon: float
    coupled: bool = False  # decay adds decay * w to the gradient (CoupledDecayAdam), else AdamW's


#: The optimizers the engine runs (exactly these: a subclass may change the update).
OPTIMIZERS = (keras.optimizers.Adam, keras.optimizers.AdamW, CoupledDecayAdam)


def adam_settings(optimizer: Any) -> tuple[Adam, float]:
    """(Adam's hyper-parameters, weight decay or 0.0) of a view's Adam, AdamW (decoupled decay)
    or CoupledDecayAdam (coupled), else a ValueError."""
    config = optimizer.get_config()
    options = [k for k in UNSUPPORTED_OPTIMIZER_OPTIONS if config.get(k)]
    if type(optimizer) not in OPTIMIZERS or options:
        raise _refused(f"optimizer {type(optimizer).__name__}",
                       f"only {', '.join(o.__name__ for o in OPTIMIZERS)}, without {options}")
    if not isinstance(config["learning_rate"], float):
        raise _refused("a learning-rate schedule", "only a constant learning rate")
    coupled = isinstance(optimizer, CoupledDecayAdam)
    adam = Adam(float(config["learning_rate"]), float(config["beta_1"]), float(config["beta_2"]),
                float(config["epsilon"]), coupled)
    return adam, float(optimizer.decay if coupled else config.get("weight_decay") or 0.0)


def decays_variable(optimizer: Any, variable: Any) -> bool:
    """Whether a view's optimizer (with a decay) decays ``variable``."""
    if isinstance(optimizer, CoupledDecayAdam):
        return optimizer.decays(variable)
    return compat.uses_weight_decay(optimizer, variable)


def model_variables(view: keras.Model) -> list[Any]:
    """The Dense layers' kernels and biases, layer by layer: the order of the engine's params."""
    return [w for layer in dense_layers(view)
            for w in ((layer.kernel, layer.bias) if layer.use_bias else (layer.kernel,))]


@dataclass(frozen=True)
class Layer:
    """One Dense layer as the engine runs it in every slice."""

    units: int
    activation: Callable[[Any], Any]
    use_bias: bool
    l1: bool  # some slice has an L1 term on this kernel
    l2: bool  # ... an L2 term
    dropout: bool  # a Dropout follows it (in every slice; each slice its own rate)


@dataclass(frozen=True)
class Spec:
    """Everything the compiled functions depend on: equal specs share one engine."""

    k: int
    groups: int  # G: slices g*M .. g*M+M-1 see the batches of order g (M = k // groups)
    inputs: int
    layers: tuple[Layer, ...]
    decayed: tuple[bool, ...]  # per param: the optimizer decays it (adam.coupled: how)
    adam: Adam
    jit_compile: bool


def read_spec(views: list[keras.Model], groups: int = 1, jit_compile: bool = True) -> Spec:
    """The engine's spec for ``views`` (they must differ only in penalty, decay and dropout strengths), in
    ``groups`` groups of equal size (consecutive views; each group one batch order)."""
    if groups < 1 or len(views) % groups:
        raise ValueError(f"{len(views)} models do not form {groups} groups of equal size")
    structures = {tuple((layer.units, layer.activation, layer.use_bias, dropout is not None)
                        for layer, dropout in _layers(v)) for v in views}
    settings = [adam_settings(v.optimizer) for v in views]
    decays = any(decay for _, decay in settings)
    masks = {tuple(decays and decays_variable(v.optimizer, w) for w in model_variables(v))
             for v in views}
    if len(structures) != 1 or len({adam for adam, _ in settings}) != 1 or len(masks) != 1:
        raise ValueError("the models of one compiled fit must differ only in their penalty, dropout "
                         f"and weight-decay strengths; got layers {structures}, optimizers {settings}")
    used = np.asarray([[penalty_coefficients(layer) for layer in dense_layers(v)] for v in views]) != 0
    layers = tuple(Layer(int(units), activation, bool(bias), bool(l1), bool(l2), dropout) for
                   (units, activation, bias, dropout), (l1, l2) in zip(next(iter(structures)), used.any(axis=0)))
    inputs = int(np.prod(views[0].inputs[0].shape[1:]))
    return Spec(len(views), groups, inputs, layers, next(iter(masks)), settings[0][0], bool(jit_compile))
