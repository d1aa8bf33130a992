"""The train stage called in-process (``train(cfg)``) on tiny data, with a real sqlite store:
determinism, run status on failure, tracking off, the whole grid at once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from mlflow import MlflowClient

import l2sweep.train as train_module
from conftest import override
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
    (first,), (second,) = train(cfg).values(), train(cfg).values()
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


# --- the whole grid at once (train.fused=true) ---------------------------------------------

#: Every per-epoch metric both paths record (epoch_time is a wall time, so not compared).
METRICS = ["loss", "accuracy", "val_loss", "val_accuracy", "data_loss", "val_data_loss", "penalty",
           "weight_norm/hidden", "weight_norm/output", "learning_rate"]
#: float32 over a few dozen Adam steps: the paths agree to ~1e-7 relative.
RTOL, ATOL = 1e-5, 1e-6


def _weights(path: Path) -> list:
    import keras

    return keras.saving.load_model(path).get_weights()


def test_fused_compiled_and_keras_write_the_same_runs(prepared_tiny, tiny_cfg, tmp_path):
    """The same grid trained three ways: at once (train.fused=true), one λ per call in the
    compiled loop, one λ per call in Keras' fit. The runs on disk agree: metrics and weights."""
    import numpy as np

    def cfg(models: str, *extra: str):
        return tiny_cfg("sweep.strengths=[0.001,0.01,0.1]", "tracking.enabled=false",
                        override("paths.models", str(tmp_path / models)), *extra)

    fused = train(cfg("fused", "train.fused=true"))
    for way, extra in (("compiled", ()), ("keras", ("train.loop=keras",))):
        for strength in (0.001, 0.01, 0.1):
            train(cfg(way, f"regularizer.strength={strength}", *extra))
    assert sorted(fused) == [f"l2-{s}" for s in (0.001, 0.01, 0.1)]
    for name in fused:
        ref = json.loads((tmp_path / "keras" / name / "history.json").read_text())
        for way in ("fused", "compiled"):
            got = json.loads((tmp_path / way / name / "history.json").read_text())
            assert got["status"] == ref["status"] == "FINISHED" and got["epochs"] == ref["epochs"] == [0]
            for key in METRICS:
                np.testing.assert_allclose(got["metrics"][key], ref["metrics"][key], rtol=RTOL,
                                           atol=ATOL, err_msg=f"{way} {name} {key}")
            for a, b in zip(_weights(tmp_path / way / name / "model.keras"),
                            _weights(tmp_path / "keras" / name / "model.keras")):
                np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=f"{way} {name}")


def test_a_diverging_lambda_of_a_fused_grid_fails_alone(prepared_tiny, tiny_cfg):
    """λ=1e37 overflows the penalty at the first step: that run is FAILED with no model; the
    other finishes."""
    import math

    cfg = tiny_cfg("sweep.strengths=[0.001,1e37]", "train.fused=true")
    finals = train(cfg)
    assert math.isfinite(finals["l2-0.001"]["val_loss"]) and not math.isfinite(finals["l2-1e+37"]["loss"])
    models = Path(cfg.paths.models)
    bad = json.loads((models / "l2-1e+37" / "history.json").read_text())
    assert bad["status"] == "FAILED" and bad["diverged_epoch"] == 0
    assert not (models / "l2-1e+37" / "model.keras").exists()
    assert (models / "l2-0.001" / "model.keras").is_file()
    runs = {r.info.run_name: r for r in _runs(cfg)}
    assert runs["l2-1e+37"].info.status == "FAILED"
    assert runs["l2-1e+37"].data.tags[tracking.REASON_TAG] == "diverged at epoch 0"
    assert runs["l2-0.001"].info.status == "FINISHED"
    assert runs["l2-0.001"].data.tags["l2sweep.fused"] == "true"


def test_only_the_mlp_is_fused(tiny_cfg):
    from l2sweep.base.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"model.name='cnn' is not allowed: mlp with train.fused=true"):
        validate(tiny_cfg("model=cnn", "train.fused=true"))
    with pytest.raises(ConfigError, match="train.loop='compiled' is not allowed: auto or keras for model.name=cnn"):
        validate(tiny_cfg("model=cnn", "train.loop=compiled"))


def test_a_fused_multirun_is_one_job_of_the_whole_grid(prepared_project, monkeypatch):
    from l2sweep.train_cli import JOBS_ENV, launch_argv

    argv = launch_argv(["-m", "train.fused=true", "regularizer.strength=0.1,1.0", "tracking.enabled=false"])
    assert "train.fused=true" in argv and "sweep.strengths=[0.1,1.0]" in argv
    assert not any(a.startswith("regularizer.strength=") for a in argv)
    assert os.environ[JOBS_ENV] == "1"


def test_none_is_one_job_and_null_sweeps_the_regularizers_own_grid(prepared_project):
    from l2sweep.train_cli import JOBS_ENV, launch_argv

    argv = launch_argv(["-m", "regularizer=none", "sweep.strengths=null", "tracking.enabled=false"])
    assert "regularizer.strength=0.0" in argv and os.environ[JOBS_ENV] == "1"
    argv = launch_argv(["-m", "regularizer=adamw", "sweep.strengths=null", "tracking.enabled=false"])
    assert "regularizer.strength=0.01,0.1,1.0" in argv and os.environ[JOBS_ENV] == "3"


def test_replicates_are_runs_of_their_own_and_evaluate_gives_their_intervals(prepared_tiny, tiny_cfg):
    """sweep.seeds: one job trains a λ once per seed, at once; each (λ, seed) is a tracked run
    with its own initial weights and batches, tagged for grouping; evaluate then reports the
    λ's mean and 95% interval over them (n stated), and each seed equals its run alone."""
    from l2sweep.evaluate import evaluate

    cfg = tiny_cfg("train.epochs=2", "regularizer.strength=0.01", "sweep.seeds=[1,2,3]")
    finals = train(cfg)
    assert sorted(finals) == ["l2-0.01-s1", "l2-0.01-s2", "l2-0.01-s3"]
    assert len({f["val_loss"] for f in finals.values()}) == 3  # three different models
    runs = {r.info.run_name: r for r in _runs(cfg)}
    assert {n: (r.data.tags["l2sweep.lambda"], r.data.tags["l2sweep.seed"], r.data.params["train.seed"])
            for n, r in runs.items()} == {f"l2-0.01-s{s}": ("l2-0.01", str(s), str(s)) for s in (1, 2, 3)}
    evaluation = evaluate(cfg)
    lam = evaluation["by_lambda"]["0.01"]
    assert lam["n"] == 3 and lam["seeds"] == [1, 2, 3]
    values = [evaluation["runs"][f"l2-0.01-s{s}"]["val_data_loss"] for s in (1, 2, 3)]
    ce = lam["metrics"]["val_data_loss"]
    assert ce["mean"] == pytest.approx(sum(values) / 3) and ce["low"] < ce["mean"] < ce["high"]
    assert "n=3" in (Path(cfg.paths.reports) / "report.md").read_text()

    (alone,) = train(tiny_cfg("train.epochs=2", "regularizer.strength=0.01", "train.seed=2",
                              "tracking.enabled=false")).values()
    assert alone["val_loss"] == pytest.approx(finals["l2-0.01-s2"]["val_loss"], rel=1e-5)
