"""Adapters for the private APIs of other packages that l2sweep cannot do without.

Each names the private API it uses and why; tests/unit/test_compat.py fails by name when an
upgrade breaks one. Tested with keras 3.15, tensorflow 2.21, mlflow 3.17, Python 3.11.
"""

from __future__ import annotations

from typing import Any


def op_determinism_enabled() -> bool:
    """Whether op determinism is on. Private: ``is_op_determinism_enabled`` (as Keras asks);
    TensorFlow exports the switch but not the question."""
    from tensorflow.python.framework.config import is_op_determinism_enabled

    return bool(is_op_determinism_enabled())


def force_jit_compile(model: Any) -> None:
    """Turns XLA on although op determinism is on. Private: ``Model._jit_compile``; the public
    setter refuses (for GPU ops), but on CPU our models repeat bit for bit (tests/unit/test_model.py)."""
    model._jit_compile = True


def uses_weight_decay(optimizer: Any, variable: Any) -> bool:
    """Whether ``optimizer`` decays ``variable``. Private: ``BaseOptimizer._use_weight_decay``;
    nothing public reads back what ``exclude_from_weight_decay()`` excluded."""
    return bool(optimizer._use_weight_decay(variable))


def run_exit_hooks() -> None:
    """Joins non-daemon threads, then runs the ``atexit`` handlers, as an interpreter exit does.
    Private: ``threading._shutdown``, ``atexit._run_exitfuncs``; needed before ``os._exit``."""
    import atexit
    import threading

    threading._shutdown()
    atexit._run_exitfuncs()


def dataset_input(dataset: Any, context: str) -> Any:
    """An ``mlflow.data`` dataset as ``log_inputs``' ``DatasetInput``, tagged with ``context``
    (public API only: what the private ``Dataset._to_mlflow_entity()`` does)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    fields = dataset.to_dict()
    entity = Dataset(name=fields["name"], digest=fields["digest"], source_type=fields["source_type"],
                     source=fields["source"], schema=fields.get("schema"), profile=fields.get("profile"))
    return DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])


def start_system_metrics(run_id: str, tracking_uri: str) -> Any:
    """Starts MLflow's system-metrics monitor for a run (``finish()`` stops it). Private:
    ``SystemMetricsMonitor``; the public switch serves only the fluent run of one thread."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, tracking_uri=tracking_uri)
    monitor.start()
    return monitor
