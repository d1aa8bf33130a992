"""The fused sweep (l2sweep.engine.compiled): equal to the sequential sweep, per-lambda failure, same layout."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import override
from helpers import EPOCHS, GRID, make_project, run_cli, sqlite_uri

#: Every per-epoch metric both paths record (epoch_time is a wall time, so not compared).
METRICS = ["loss", "accuracy", "val_loss", "val_accuracy", "data_loss", "val_data_loss", "penalty",
           "weight_norm/hidden", "weight_norm/output", "learning_rate"]
#: float32 over a few dozen Adam steps: both paths agree to ~1e-7 relative (measured).
RTOL, ATOL = 1e-5, 1e-6


def _weights(path: Path) -> list[np.ndarray]:
    import keras

    return [np.asarray(w) for w in keras.saving.load_model(path).get_weights()]


@pytest.mark.parametrize("regularizer", ["l2", "l1_l2", "weight_decay"])
def test_fused_equals_sequential(prepared_tiny, tiny_cfg, tmp_path, regularizer):
    """The same tiny grid trained three ways for one epoch: fused, one job per lambda in the
    compiled loop (the default for mlp) and one job per lambda in Keras' own ``fit``. Every
    per-lambda metric and weight (and Adam's state, via model.keras) equal within float
    tolerance."""
    from l2sweep.engine.compiled import slice_configs, train_fused
    from l2sweep.train import train, training_loop

    def cfg(models: str, **extra):
        return tiny_cfg(f"regularizer={regularizer}", "sweep.strengths=[0.001,0.01,0.1]",
                        "tracking.enabled=false", override("paths.models", str(tmp_path / models)),
                        *[f"{k}={v}" for k, v in extra.items()])

    fused = train_fused(cfg("fused", **{"train.fused": "true"}))
    assert training_loop(cfg("x")) == "compiled" and training_loop(cfg("x", **{"train.loop": "keras"})) == "keras"
    ways = {"compiled": cfg("compiled"), "keras": cfg("keras", **{"train.loop": "keras"})}
    runs = {way: {c.run_name: train(c) for c in slice_configs(base)} for way, base in ways.items()}
    assert sorted(fused) == sorted(runs["keras"]) == sorted(runs["compiled"]) \
        == sorted(f"{regularizer}-{s}" for s in (0.001, 0.01, 0.1))
    for name in fused:
        ref = json.loads((tmp_path / "keras" / name / "history.json").read_text())
        wref = _weights(tmp_path / "keras" / name / "model.keras")
        for way in ("fused", "compiled"):
            got = json.loads((tmp_path / way / name / "history.json").read_text())
            assert got["status"] == ref["status"] == "FINISHED" and got["epochs"] == ref["epochs"] == [0]
            assert set(got["metrics"]) == set(ref["metrics"])
            for key in METRICS:
                np.testing.assert_allclose(got["metrics"][key], ref["metrics"][key], rtol=RTOL,
                                           atol=ATOL, err_msg=f"{way} {name} {key}")
            weights = _weights(tmp_path / way / name / "model.keras")
            assert [w.shape for w in weights] == [w.shape for w in wref]
            for x, y in zip(weights, wref):
                np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL, err_msg=f"{way} {name}")


def test_batches_come_in_fits_order():
    """keras_batch_order is what fit(shuffle=True) feeds, batch for batch, epoch after epoch."""
    import keras
    import tensorflow as tf

    from l2sweep.engine.compiled import keras_batch_order
    from l2sweep.engine.model import set_seeds

    n, epochs, steps = 100, 3, 4   # 3 batches of 32, then one of 4

    class Recorder(keras.Model):
        """Records the first and last label of every batch it is trained on."""

        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1)
            self.seen = tf.Variable(tf.zeros((epochs * steps, 2), tf.int64), trainable=False)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False)

        def call(self, x):
            return self.dense(x)

        def train_step(self, data):
            _, y = data
            self.seen.scatter_nd_update([[self.step]], [tf.stack([y[0], y[-1]])])
            self.step.assign_add(1)
            return {"step": self.step}

    set_seeds(42)
    model = Recorder()
    model(np.zeros((1, 1)))
    model.compile(steps_per_execution=2)
    model.fit(np.zeros((n, 1)), np.arange(n), batch_size=32, epochs=epochs, shuffle=True, verbose=0)
    set_seeds(42)
    order = keras_batch_order(n, 32, epochs)
    assert [[len(b) for b in epoch] for epoch in order] == [[32, 32, 32, 4]] * epochs
    mine = np.asarray([[b[0], b[-1]] for epoch in order for b in epoch])
    np.testing.assert_array_equal(mine, model.seen.numpy())
    assert sorted(np.concatenate(order[0]).tolist()) == list(range(n))


def test_fused_keeps_keras_optimizer_state(prepared_tiny, tiny_cfg, tmp_path):
    """A fused lambda's model.keras carries its Adam moments and step count, like fit's."""
    import keras

    from l2sweep.base.data import to_float
    from l2sweep.engine.compiled import fit_fused, slice_configs
    from l2sweep.engine.model import build_model, set_seeds
    from l2sweep.train import load_training_data

    cfg = tiny_cfg("sweep.strengths=[0.01]", "tracking.enabled=false")
    (x, y), (xv, yv) = load_training_data(cfg)
    views, _ = fit_fused(slice_configs(cfg), x, y, xv, yv)
    set_seeds(cfg.train.seed, cfg.train.deterministic)
    model = build_model(slice_configs(cfg)[0])
    model.fit(to_float(x), y, batch_size=cfg.train.batch_size, epochs=1, shuffle=True, verbose=0)
    assert int(views[0].optimizer.iterations) == int(model.optimizer.iterations) == math.ceil(len(x) / 32)
    for a, b in zip(views[0].optimizer.variables, model.optimizer.variables):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b),
                                   rtol=RTOL, atol=ATOL)


def test_uint8_images_train_exactly_as_their_float_copy(prepared_tiny, tiny_cfg):
    """The compiled loop takes the prepared uint8 images and scales them in its step to
    exactly to_float's values (the float arrays fit is given): every metric and weight is the
    float copy's, bit for bit."""
    from l2sweep.base.data import to_float
    from l2sweep.engine.compiled import fit_fused, slice_configs
    from l2sweep.train import load_training_data

    cfg = tiny_cfg("sweep.strengths=[0.001,0.01]", "tracking.enabled=false")
    (x, y), (xv, yv) = load_training_data(cfg)
    assert x.dtype == xv.dtype == np.uint8
    runs = [fit_fused(slice_configs(cfg), *data) for data in
            ((x, y, xv, yv), (to_float(x), y, to_float(xv), yv))]
    for (view, result), (ref_view, ref) in zip(zip(*runs[0]), zip(*runs[1])):
        assert result.history.keys() == ref.history.keys()
        for key in set(ref.history) - {"epoch_time"}:  # a wall time
            assert result.history[key] == ref.history[key], key
        for w, w_ref in zip(view.get_weights(), ref_view.get_weights()):
            np.testing.assert_array_equal(w, w_ref)


def test_a_diverging_lambda_fails_alone(prepared_tiny, tiny_cfg, tmp_path):
    """lambda=1e37 overflows the penalty at the first step: that run is FAILED with no model,
    the others finish exactly as they would have without it."""
    from l2sweep.engine.compiled import train_fused

    cfg = tiny_cfg("sweep.strengths=[0.001,1e37]", "train.fused=true")
    finals = train_fused(cfg)
    assert math.isfinite(finals["l2-0.001"]["val_loss"]) and not math.isfinite(finals["l2-1e+37"]["loss"])
    models = Path(cfg.paths.models)
    bad = json.loads((models / "l2-1e+37" / "history.json").read_text())
    good = json.loads((models / "l2-0.001" / "history.json").read_text())
    assert bad["status"] == "FAILED" and bad["diverged_epoch"] == 0
    assert not (models / "l2-1e+37" / "model.keras").exists()
    assert good["status"] == "FINISHED" and (models / "l2-0.001" / "model.keras").is_file()

    alone = train_fused(tiny_cfg("sweep.strengths=[0.001]", "tracking.enabled=false",
                                 override("paths.models", str(tmp_path / "alone"))))
    for key in METRICS:
        np.testing.assert_allclose(finals["l2-0.001"][key], alone["l2-0.001"][key], rtol=RTOL, atol=ATOL)

    client = MlflowClient(cfg.tracking.uri)
    runs = {r.info.run_name: r for r in client.search_runs(
        [client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])}
    assert runs["l2-1e+37"].info.status == "FAILED"
    assert "diverged at epoch 0" in runs["l2-1e+37"].data.tags["l2sweep.failure_reason"]
    assert runs["l2-0.001"].info.status == "FINISHED"


def test_the_compiled_loop_compiles_once_per_process(prepared_tiny, tiny_cfg):
    """The jobs of a sequential sweep reuse one engine: the second lambda starts from its own
    initial weights and zero Adam state without tracing (and so compiling) again.
    (test_fused_equals_sequential shows the reused engine's results equal fit's.)"""
    from l2sweep.engine import compiled as fused
    from l2sweep.train import load_training_data

    (x, y), (xv, yv) = load_training_data(prepared_tiny)
    first, second = (tiny_cfg(f"regularizer.strength={s}", "tracking.enabled=false") for s in (0.001, 0.1))
    fused.fit_fused([first], x, y, xv, yv)
    (engine,) = fused._ENGINE.values()
    assert engine._train.experimental_get_tracing_count() == 1
    fused.fit_fused([second], x, y, xv, yv)
    (reused,) = fused._ENGINE.values()
    assert reused is engine and reused._train.experimental_get_tracing_count() == 1
    assert int(reused.iterations.numpy()) == math.ceil(len(x) / first.train.batch_size)  # reset, then 1 epoch
    np.testing.assert_allclose(reused.l2.numpy(), [0.1])


def test_the_jobs_of_a_process_share_the_batch_order_and_data_tensors(prepared_tiny, tiny_cfg, monkeypatch):
    """The second job reuses the first one's batch order (the same seed gives the same order)
    and its tensors of the read-only shared arrays; other arrays, or another seed, do not."""
    from l2sweep.engine import compiled as fused
    from l2sweep.train import load_training_data

    calls = []
    order = fused.keras_batch_order
    monkeypatch.setattr(fused, "_ORDER", {})  # nothing from the tests before
    monkeypatch.setattr(fused, "_TENSORS", {})
    monkeypatch.setattr(fused, "keras_batch_order", lambda *a: calls.append(a) or order(*a))
    (x, y), (xv, yv) = load_training_data(prepared_tiny)
    cfgs = [tiny_cfg(f"regularizer.strength={s}", "tracking.enabled=false") for s in (0.001, 0.1)]
    fused.fit_fused([cfgs[0]], x, y, xv, yv)
    tensors = fused._data_tensors(x, y, xv, yv)
    fused.fit_fused([cfgs[1]], x, y, xv, yv)
    assert len(calls) == 1 and fused._data_tensors(x, y, xv, yv) is tensors
    assert fused._data_tensors(x.copy(), y, xv, yv) is not tensors  # writeable: not kept
    fused.fit_fused([tiny_cfg("train.seed=7", "tracking.enabled=false")], x, y, xv, yv)
    assert len(calls) == 2


def test_the_compiled_loop_is_refused_for_the_cnn(tiny_cfg):
    from l2sweep.base.config import ConfigError, validate
    from l2sweep.train import training_loop

    assert training_loop(tiny_cfg("model=cnn")) == "keras"
    with pytest.raises(ConfigError, match="train.loop='compiled' is not allowed: auto or keras for model.name=cnn"):
        validate(tiny_cfg("model=cnn", "train.loop=compiled"))


def test_cnn_is_not_fused(tiny_cfg):
    from l2sweep.base.config import ConfigError
    from l2sweep.engine.compiled import train_fused

    with pytest.raises(ConfigError, match="model.name='cnn'.*train.fused"):
        train_fused(tiny_cfg("model=cnn", "train.fused=true"))


def test_launch_argv_makes_one_job_of_the_grid(monkeypatch):
    from l2sweep.base.config import ConfigError
    from l2sweep.train_cli import launch_argv
    from l2sweep.tracking.runs import JOBS_ENV

    monkeypatch.delenv(JOBS_ENV, raising=False)
    argv = launch_argv(["-m", "hydra/launcher=fused", "regularizer.strength=0.1,1.0"])
    assert "train.fused=true" in argv and "sweep.strengths=[0.1,1.0]" in argv
    assert not any(a.startswith("regularizer.strength=") for a in argv)
    assert os.environ[JOBS_ENV] == "1"
    with pytest.raises(ConfigError, match="model.name"):
        launch_argv(["-m", "train.fused=true", "model=cnn"])


@pytest.mark.slow
def test_fused_cli_sweep_has_the_sequential_layout(tmp_path):
    """`python -m l2sweep.train -m hydra/launcher=fused`: one parent, a child per lambda with the
    sequential sweep's metrics and artifacts, models/<run>/ files; evaluate reads them."""
    root = make_project(tmp_path / "project")
    proc = run_cli(root, "l2sweep.train", "-m", "hydra/launcher=fused")
    assert "fused mlp x 3 lambdas" in proc.stdout + proc.stderr
    client = MlflowClient(sqlite_uri(root))
    runs = client.search_runs([client.get_experiment_by_name("l2-sweep").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(children) == sorted(f"l2-{s}" for s in GRID)
    for name, child in children.items():
        run_id = child.info.run_id
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert child.data.tags["l2sweep.engine.compiled"] == "true"
        assert float(child.data.params["regularizer.strength"]) == float(name.split("-", 1)[1])
        for key in METRICS + ["epoch_time"]:
            assert [m.step for m in client.get_metric_history(run_id, key)] == list(range(EPOCHS)), key
        paths = {a.path for folder in ("histograms", "plots", "model", "hydra")
                 for a in client.list_artifacts(run_id, folder)}
        assert {"histograms/hidden.json", "histograms/hidden.png", "histograms/output.png",
                "plots/curves.png", "model/MLmodel", "hydra/config.yaml"} <= paths
        config = Path(client.download_artifacts(run_id, "hydra/config.yaml")).read_text()
        assert f"strength: {name.split('-', 1)[1]}" in config
        history = json.loads((root / "models" / name / "history.json").read_text())
        assert history["status"] == "FINISHED" and history["mlflow_run_id"] == run_id
        assert (root / "models" / name / "model.keras").is_file()
    manifest = json.loads((root / "models" / "sweep.json").read_text())
    assert manifest["strengths"] == GRID and manifest["parent_run_id"] == parents[0].info.run_id
    assert sorted(p.name for p in (root / "outputs" / "sweep").iterdir()) == ["l2-fused-0", "multirun.yaml"]

    run_cli(root, "l2sweep.evaluate")
    assert (root / "metrics" / "eval.json").is_file()
