"""train() called directly: determinism, run status on failure, tracking switched off."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

import l2sweep.train as train_module
from l2sweep.tracking import runs as tracking
from l2sweep.train import train


def _runs(cfg) -> list:
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def _history(client: MlflowClient, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_same_seed_gives_identical_metric_histories(prepared_tiny, tiny_cfg):
    cfg = tiny_cfg("train.epochs=2")
    first, second = train(cfg), train(cfg)
    assert first == {**second, "epoch_time": first["epoch_time"]}
    client = MlflowClient(cfg.tracking.uri)
    a, b = (r.info.run_id for r in _runs(cfg))
    for key in ("loss", "val_loss", "accuracy", "data_loss", "penalty", "weight_norm/hidden"):
        assert _history(client, a, key) == _history(client, b, key), key


def test_a_failure_marks_the_run_failed_with_the_reason(prepared_tiny, tiny_cfg, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train_module, "write_run_outputs", disk_full)
    cfg = tiny_cfg()
    with pytest.raises(OSError):
        train(cfg)
    (run,) = _runs(cfg)
    assert run.info.status == "FAILED"
    assert "No space left on device" in run.data.tags[tracking.REASON_TAG]


def test_an_interrupt_marks_the_run_killed(prepared_tiny, tiny_cfg, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "write_run_outputs", interrupted)
    cfg = tiny_cfg()
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    (run,) = _runs(cfg)
    assert run.info.status == "KILLED"


def test_divergence_fails_the_run_and_writes_no_model(prepared_tiny, tiny_cfg):
    # Adam moves each weight by about lr per step: w ~ 1e20 makes lambda*sum(w^2) overflow float32.
    cfg = tiny_cfg("train.learning_rate=1e20", "train.epochs=3", "regularizer.strength=1.0")
    final = train(cfg)
    out = Path(cfg.paths.models) / cfg.run_name
    history = json.loads((out / "history.json").read_text())
    assert history["status"] == "FAILED" and history["diverged_epoch"] == 0
    assert not (out / "model.keras").exists()
    (run,) = _runs(cfg)
    assert run.info.status == "FAILED"
    assert run.data.tags[tracking.REASON_TAG] == "diverged at epoch 0"
    assert len(history["epochs"]) == 1 and final


def test_tracking_off_still_writes_outputs(prepared_tiny, tiny_cfg, tmp_path):
    cfg = tiny_cfg("tracking.enabled=false")
    train(cfg)
    history = json.loads((tmp_path / "models" / cfg.run_name / "history.json").read_text())
    assert history["mlflow_run_id"] is None and history["status"] == "FINISHED"
    assert not (tmp_path / "mlruns").exists()
