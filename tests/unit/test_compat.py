"""l2sweep.base.compat: each adapter of a private third-party API, on a small real object.

A failure here means an upgrade of the named package changed that private API: fix the
adapter in l2sweep/base/compat.py (its docstring names the API), not the callers.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from l2sweep.base import compat


def test_op_determinism_enabled_answers():
    """tensorflow.python.framework.config.is_op_determinism_enabled (tensorflow)."""
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()  # process-wide; the test suite runs with it on
    assert compat.op_determinism_enabled() is True


def test_force_jit_compile_turns_xla_on_under_op_determinism():
    """keras.Model._jit_compile (keras): the public setter refuses XLA under op determinism."""
    import keras
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(loss="mse", jit_compile=False)
    compat.force_jit_compile(model)
    assert model.jit_compile is True, "keras.Model no longer reads its XLA switch from _jit_compile"


def test_uses_weight_decay_reads_back_the_exclusions():
    """keras BaseOptimizer._use_weight_decay (keras)."""
    import keras

    layer = keras.layers.Dense(2)
    layer.build((None, 3))
    optimizer = keras.optimizers.AdamW(weight_decay=0.1)
    optimizer.exclude_from_weight_decay(var_list=[layer.bias])
    assert compat.uses_weight_decay(optimizer, layer.kernel) is True
    assert compat.uses_weight_decay(optimizer, layer.bias) is False


def test_run_exit_hooks_joins_threads_then_runs_atexit():
    """threading._shutdown and atexit._run_exitfuncs (CPython), in a fresh interpreter."""
    script = """if True:
        import atexit, os, threading, time
        from l2sweep.base.compat import run_exit_hooks
        threading.Thread(target=lambda: (time.sleep(0.2), print("thread done", flush=True))).start()
        atexit.register(lambda: print("atexit hook", flush=True))
        run_exit_hooks()
        print("after", flush=True)
        os._exit(0)
    """
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n") == ["thread done", "atexit hook", "after", ""], proc.stdout


@pytest.mark.filterwarnings("ignore:The specified dataset source can be interpreted")
def test_dataset_input_is_mlflows_entity_with_its_context():
    """mlflow.entities.DatasetInput built from a dataset's public to_dict() (mlflow)."""
    import mlflow
    from mlflow.entities import DatasetInput

    dataset = mlflow.data.from_numpy(np.zeros((2, 3), np.float32), targets=np.arange(2), name="tiny",
                                     source="/tmp/tiny", digest="0123abcd")
    got = compat.dataset_input(dataset, "training")
    assert isinstance(got, DatasetInput)
    assert (got.dataset.name, got.dataset.digest, got.dataset.source_type) == ("tiny", "0123abcd", "local")
    assert "/tmp/tiny" in got.dataset.source and '"features"' in (got.dataset.schema or "")
    assert got.dataset.profile and [(t.key, t.value) for t in got.tags] == [("mlflow.data.context", "training")]


def test_start_system_metrics_uses_mlflows_monitor_with_a_tracking_uri():
    import inspect

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # (the monitor itself is driven in tests/integration/test_tracking_runs.py)
    assert {"run_id", "tracking_uri"} <= set(inspect.signature(SystemMetricsMonitor).parameters)
    assert callable(SystemMetricsMonitor.start) and callable(SystemMetricsMonitor.finish)
