"""The Keras callback that logs each epoch's metrics to a run (l2sweep.tracking.runs)."""

from __future__ import annotations

import numbers
import time
from typing import Optional

import keras

from l2sweep.tracking.runs import ChildRun

#: MLflow's cap on metrics per ``log_batch`` call (mlflow.utils.validation).
MAX_METRICS_PER_BATCH = 1000


class MlflowLogger(keras.callbacks.Callback):
    """Logs every numeric value of ``logs`` to a run, once per epoch (step = epoch, from 0).

    Each epoch end queues one ``log_batch`` on the run's tracking thread with all numeric
    entries of ``logs``: Keras' ``loss``, ``accuracy``, ``data_loss``, their ``val_`` twins and
    whatever callbacks before it added (``penalty``, ``weight_norm/<layer>``, ...). NaN and
    infinite values are logged as they are, so a diverged run shows it. The first epoch's end
    also lets the tracking thread start MLflow (:meth:`l2sweep.tracking.runs.Tracker.release`).
    A store that fails is recorded on the run ("metrics of epochs A-B" not logged); training
    goes on.

    Args:
        run: the run to log to (:func:`l2sweep.tracking.runs.child_run`).

    Example:
        >>> with child_run(cfg, tags) as run:
        ...     model.fit(x, y, epochs=10, callbacks=[EpochStats(), MlflowLogger(run)])
    """

    def __init__(self, run: ChildRun) -> None:
        super().__init__()
        if not isinstance(run, ChildRun):
            raise TypeError(f"run={run!r} is not allowed: an l2sweep.tracking.runs.ChildRun")
        self.run = run

    def on_train_begin(self, logs: Optional[dict] = None) -> None:
        # MLflow's start (~2 s on the tracking thread) overlaps XLA's compilation: a Ctrl-C after
        # the first epoch then ends the runs KILLED without waiting for it.
        if self.run.tracker is not None:
            self.run.tracker.release()

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        if self.run.tracker is None:
            return
        timestamp = int(time.time() * 1000)
        values = {str(k): float(v) for k, v in (logs or {}).items()
                  if isinstance(v, numbers.Real) and not isinstance(v, bool)}
        self.run.log(int(epoch), lambda: self._log(values, int(epoch), timestamp))
        self.run.tracker.release()

    def _log(self, values: dict[str, float], epoch: int, timestamp: int) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(key=k, value=v, timestamp=timestamp, step=epoch) for k, v in values.items()]
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self.run.client.log_batch(self.run.run_id, metrics=metrics[start:start + MAX_METRICS_PER_BATCH])
