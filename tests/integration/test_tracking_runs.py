"""The tracking thread's contract, against a real sqlite store: every epoch's metrics reach the
run once; a store failure is reported for the run it happened in, names what is missing, and
leaves no run RUNNING; the run's status says how it ended."""

from __future__ import annotations

import math

import numpy as np
import pytest
from mlflow import MlflowClient

from l2sweep.base import signals
from l2sweep.tracking.callback import MlflowLogger
from l2sweep.tracking.runs import REASON_TAG, TrackingError, child_run


@pytest.fixture
def cfg(tiny_cfg):
    return tiny_cfg()


def runs_of(cfg) -> list:
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def steps(cfg, run, key: str) -> list[tuple[int, float]]:
    history = MlflowClient(cfg.tracking.uri).get_metric_history(run.info.run_id, key)
    return sorted((m.step, m.value) for m in history)


def epochs(logger: MlflowLogger, logs: list[dict]) -> None:
    logger.on_train_begin()
    for epoch, values in enumerate(logs):
        logger.on_epoch_end(epoch, values)
    logger.on_train_end()


def test_each_epoch_reaches_the_run_once_and_the_run_finishes(cfg):
    with child_run(cfg, {"l2sweep.kind": "run"}) as run:
        epochs(MlflowLogger(run), [{"loss": 3.0, "note": "text", "flag": True},
                                   {"loss": float("nan"), "accuracy": np.float32(0.5)}])
    (stored,) = runs_of(cfg)
    assert stored.info.status == "FINISHED" and stored.info.run_name == cfg.run_name
    assert stored.data.tags["l2sweep.kind"] == "run"
    loss = steps(cfg, stored, "loss")
    assert [s for s, _ in loss] == [0, 1] and loss[0][1] == 3.0 and math.isnan(loss[1][1])
    assert set(stored.data.metrics) == {"loss", "accuracy"}  # numbers only


class GoneClient:
    """The store went away after the run was created: logging fails, ending still works."""

    def __init__(self, client: MlflowClient) -> None:
        self.client = client

    def log_batch(self, *args, **kwargs):
        raise ConnectionError("server gone")

    def __getattr__(self, name):
        return getattr(self.client, name)


def test_a_store_failure_is_reported_for_its_run_with_what_is_missing(cfg, tmp_path):
    with pytest.raises(TrackingError) as error:
        with child_run(cfg, {}) as run:
            run.wait()  # created
            run.client = GoneClient(run.client)
            epochs(MlflowLogger(run), [{"loss": 1.0}] * 3)
            run.log("artifacts", lambda: None)  # skipped: the store failed already
    assert str(error.value).startswith(
        f"run {cfg.run_name}: not logged to MLflow: metrics of epochs 0-2, artifacts. "
        f"MLflow store {cfg.tracking.uri}: server gone")
    (stored,) = runs_of(cfg)
    assert stored.info.status == "FAILED"  # not left RUNNING
    assert "metrics of epochs 0-2" in stored.data.tags[REASON_TAG]
    # The next run of the process is not blamed for it.
    with child_run(cfg, {}) as run:
        epochs(MlflowLogger(run), [{"loss": 1.0}])
    assert runs_of(cfg)[-1].info.status == "FINISHED"


def test_a_store_that_cannot_start_fails_its_run_and_stops_the_next(tiny_cfg, tmp_path):
    (tmp_path / "blocker").write_text("a file where the store's folder should be")
    cfg = tiny_cfg(f"tracking.uri=sqlite:///{tmp_path / 'blocker' / 'mlflow.db'}")
    with pytest.raises(TrackingError, match=r"not logged to MLflow: the run, metrics of epoch 0\."):
        with child_run(cfg, {}) as run:
            epochs(MlflowLogger(run), [{"loss": 1.0}])
    with pytest.raises(TrackingError, match="blocker"):
        with child_run(cfg, {}):
            pytest.fail("trained although the store cannot start")


@pytest.mark.parametrize("error, status", [(KeyboardInterrupt(), "KILLED"),
                                           (signals.Terminated(), "KILLED"),
                                           (OSError(28, "No space left on device"), "FAILED")])
def test_the_status_says_how_the_run_ended(cfg, error, status):
    with pytest.raises(type(error)):
        with child_run(cfg, {}) as run:
            epochs(MlflowLogger(run), [{"loss": 1.0}])
            raise error
    (stored,) = runs_of(cfg)
    assert stored.info.status == status
    if status == "FAILED":
        assert "No space left on device" in stored.data.tags[REASON_TAG]


def test_tracking_off_logs_nothing(tiny_cfg, tmp_path):
    cfg = tiny_cfg("tracking.enabled=false")
    with child_run(cfg, {}) as run:
        epochs(MlflowLogger(run), [{"loss": 1.0}])
        assert run.run_id is None
    assert not (tmp_path / "mlruns").exists()


def test_the_logger_validates_its_argument():
    with pytest.raises(TypeError, match="run='abc' is not allowed"):
        MlflowLogger("abc")


def test_system_metrics_are_logged_when_asked(tiny_cfg, monkeypatch):
    import time

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    cfg = tiny_cfg("tracking.system_metrics=true")
    with child_run(cfg, {}) as run:
        run.wait()  # created: its monitor runs
        time.sleep(1.5)  # a few samples
    (stored,) = runs_of(cfg)
    assert stored.info.status == "FINISHED"
    assert "system/cpu_utilization_percentage" in stored.data.metrics, sorted(stored.data.metrics)
    assert run.monitor is not None
