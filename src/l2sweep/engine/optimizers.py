"""Coupled weight decay in Keras: :class:`CoupledDecayAdam`, the ``weight_decay`` regularizer's
optimizer (PyTorch's ``Adam(weight_decay=λ)``), as opposed to ``keras.optimizers.AdamW``'s
decoupled decay (the ``adamw`` regularizer)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import keras


@keras.saving.register_keras_serializable(package="l2sweep")
class CoupledDecayAdam(keras.optimizers.Adam):
    """Adam on ``gradient + decay * w`` for the variables it decays: the gradient of
    ``(decay / 2) * sum(w^2)`` (so exactly ``keras.regularizers.L2(decay / 2)``'s), with nothing
    added to the loss. AdamW instead shrinks ``w -= learning_rate * decay * w`` outside Adam.

    The decayed variables are kept by path (``hidden/kernel``) in the config, where AdamW's
    ``exclude_from_weight_decay()`` keeps variable identities that a saved model loses: a
    reloaded model decays the same kernels. The decay is added in :meth:`apply`, which sees
    ``keras.Variable`` objects (``update_step`` gets the backend's variable, without a path).

    Args:
        decay: λ, the coefficient of ``w`` added to each decayed variable's gradient.
        decayed: paths (``keras.Variable.path``) of the variables to decay.
        **kwargs: ``keras.optimizers.Adam``'s arguments; ``weight_decay`` must stay None (it is
            Keras' decoupled decay).

    Example:
        >>> kernels = [model.get_layer("hidden").kernel.path]
        >>> model.compile(optimizer=CoupledDecayAdam(decay=0.002, decayed=kernels), loss=...)
    """

    def __init__(self, decay: float = 0.0, decayed: Sequence[str] = (), **kwargs: Any) -> None:
        if kwargs.get("weight_decay") is not None:
            raise ValueError(f"weight_decay={kwargs['weight_decay']!r} is not allowed: None (the "
                             "coupled decay is `decay`; keras.optimizers.AdamW decouples it)")
        super().__init__(**kwargs)
        self.decay = float(decay)
        self.decayed = tuple(str(path) for path in decayed)

    def decays(self, variable: Any) -> bool:
        """Whether ``variable`` (a ``keras.Variable``) is decayed."""
        return variable.path in self.decayed

    def apply(self, grads: Sequence[Any], trainable_variables: Optional[Sequence[Any]] = None) -> None:
        if trainable_variables is None:
            # Keras' own loops (fit, train_on_batch) pass the variables; the decay needs them.
            if self.decayed:
                raise ValueError("trainable_variables=None is not allowed: CoupledDecayAdam.apply "
                                 "needs the variables it decays")
            return super().apply(grads, trainable_variables)
        trainable_variables = list(trainable_variables)
        grads = [g if g is None or not self.decays(v) else
                 keras.ops.add(g, keras.ops.multiply(keras.ops.cast(self.decay, v.dtype), v))
                 for g, v in zip(grads, trainable_variables)]
        return super().apply(grads, trainable_variables)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"decay": self.decay, "decayed": list(self.decayed)})
        return config
