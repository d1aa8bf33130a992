"""Adapters for the private APIs of other packages that l2sweep cannot do without.

Each names the private API it uses and why; tests/unit/test_compat.py fails by name when an
upgrade breaks one. Tested with keras 3.15, tensorflow 2.21, mlflow 3.17, Python 3.11.
"""

from __future__ import annotations

from typing import Any


def fit_batch_dataset(n: int, batch_size: int) -> tuple[Any, int]:
    """The index batches ``Model.fit(x, y, batch_size, shuffle=True)`` feeds for ``n`` examples:
    (a ``tf.data.Dataset`` of int64 index batches, reshuffled per iteration; batches per epoch).

    Private: ``keras.src.trainers.data_adapters.get_data_adapter``, the adapter ``fit`` builds.
    Nothing public gives ``fit``'s shuffle order, which the compiled loop must match.
    """
    import numpy as np
    from keras.src.trainers.data_adapters import get_data_adapter

    adapter = get_data_adapter(np.arange(n, dtype=np.int64), batch_size=batch_size, shuffle=True)
    return adapter.get_tf_dataset().map(lambda *x: x[0]), int(adapter.num_batches)


def op_determinism_enabled() -> bool:
    """Whether ``tf.config.experimental.enable_op_determinism()`` was called in this process.

    Private: ``tensorflow.python.framework.config.is_op_determinism_enabled`` (as Keras asks);
    TensorFlow exports the switch but not the question.
    """
    from tensorflow.python.framework.config import is_op_determinism_enabled

    return bool(is_op_determinism_enabled())


def force_jit_compile(model: Any) -> None:
    """Turns XLA on for a compiled Keras model although op determinism is on.

    Private: ``Model._jit_compile``. The public setter refuses XLA under op determinism (some
    GPU ops lack a deterministic XLA kernel); on CPU our models repeat bit for bit (checked in
    tests/unit/test_model.py).
    """
    model._jit_compile = True


def uses_weight_decay(optimizer: Any, variable: Any) -> bool:
    """Whether ``optimizer`` (Adam/AdamW with ``weight_decay``) decays ``variable``.

    Private: ``BaseOptimizer._use_weight_decay``. ``exclude_from_weight_decay()`` is public, but
    nothing public reads back what it excluded.
    """
    return bool(optimizer._use_weight_decay(variable))


def run_exit_hooks() -> None:
    """What a normal interpreter exit runs first: threading's exit hooks (non-daemon threads
    are joined), then the ``atexit`` handlers.

    Private: ``threading._shutdown`` and ``atexit._run_exitfuncs`` (what ``Py_FinalizeEx``
    calls); nothing public runs them before ``os._exit`` (l2sweep.base.cli.exit_fast).
    """
    import atexit
    import threading

    threading._shutdown()
    atexit._run_exitfuncs()


def dataset_input(dataset: Any, context: str) -> Any:
    """``dataset`` (an ``mlflow.data`` dataset) as the ``DatasetInput`` that
    ``MlflowClient.log_inputs`` takes, tagged ``mlflow.data.context=context``.

    Public API only: what the private ``Dataset._to_mlflow_entity()`` does, from ``to_dict()``.
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    fields = dataset.to_dict()
    entity = Dataset(name=fields["name"], digest=fields["digest"], source_type=fields["source_type"],
                     source=fields["source"], schema=fields.get("schema"), profile=fields.get("profile"))
    return DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
