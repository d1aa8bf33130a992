"""The `train` stage: a real Hydra multirun over lambda, tracked in a real sqlite MLflow store."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import write_idx_dir
from helpers import EPOCHS, GRID, run_cli, tiny_arrays, write_project_params

REPO = Path(__file__).resolve().parents[2]

METRICS = ["loss", "accuracy", "val_loss", "val_accuracy", "data_loss", "val_data_loss", "penalty",
           "weight_norm/hidden", "weight_norm/output", "learning_rate", "epoch_time"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, tiny_arrays_module) -> dict:
    """One real `python -m l2sweep.train -m` over GRID on tiny data (shared by this module)."""
    root = tmp_path_factory.mktemp("project")
    idx_dir = write_idx_dir(root / "raw_tiny", tiny_arrays_module)
    write_project_params(root, idx_dir)
    run_cli(root, "l2sweep.prepare")
    proc = run_cli(root, "l2sweep.train", "-m")
    client = MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("l2-sweep")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    return {"root": root, "client": client, "parents": parents, "children": children,
            "log": proc.stdout + proc.stderr}


@pytest.fixture(scope="module")
def tiny_arrays_module():
    return tiny_arrays()


pytestmark = pytest.mark.slow


def test_one_parent_with_a_child_per_lambda(sweep):
    assert len(sweep["parents"]) == 1
    parent = sweep["parents"][0]
    assert parent.info.status == "FINISHED"
    assert "0.001,0.01,0.1" in parent.data.params["grid"]
    assert sorted(sweep["children"]) == sorted(f"l2-{s}" for s in GRID)
    for child in sweep["children"].values():
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id


def test_progress_names_job_and_lambda(sweep):
    assert "job 1/3 l2-0.001" in sweep["log"] and "job 3/3 l2-0.1" in sweep["log"]
    assert "\r" not in sweep["log"]  # no progress-bar spam when output is not a terminal


def test_every_metric_has_one_point_per_epoch(sweep):
    client = sweep["client"]
    for child in sweep["children"].values():
        for key in METRICS:
            history = client.get_metric_history(child.info.run_id, key)
            assert [m.step for m in history] == list(range(EPOCHS)), key


def test_params_are_the_resolved_config(sweep):
    for name, child in sweep["children"].items():
        params = child.data.params
        assert float(params["regularizer.strength"]) == float(name.split("-", 1)[1])
        assert params["train.epochs"] == str(EPOCHS)
        assert params["model.name"] == "mlp" and params["dataset.name"] == "idx_dir"
        assert params["dataset.digest"]  # the prepared data's identity
        # Hyperparameters, not plumbing.
        assert not [k for k in params if k.startswith(("paths.", "gate.", "tracking.", "dataset.files"))]
        inputs = child.inputs.dataset_inputs
        contexts = {i.tags[0].value: i.dataset for i in inputs}
        assert set(contexts) == {"training", "validation", "test"}
        assert {d.name for d in contexts.values()} == {"idx_dir"}
        assert len({d.digest for d in contexts.values()}) == 3  # each split its own identity
        note = child.data.tags["mlflow.note.content"]
        assert f"strength {params['regularizer.strength']}" in note and "val_accuracy" in note, note
        assert child.data.tags.get("mlflow.user")


def test_artifacts(sweep):
    client = sweep["client"]
    for child in sweep["children"].values():
        run_id = child.info.run_id
        paths = {a.path for folder in ("histograms", "hydra", None)
                 for a in client.list_artifacts(run_id, folder)}
        # (the figures, plots/curves.png and histograms/<layer>.png, come with `evaluate`)
        assert {"histograms/hidden.json", "histograms/output.json", "history.json",
                "hydra/config.yaml"} <= paths
        hist = json.loads(Path(client.download_artifacts(run_id, "histograms/hidden.json")).read_text())
        assert len(hist["counts"]) == EPOCHS + 1  # the initial weights, then every epoch


def test_model_loads_through_pyfunc_and_agrees_with_keras_file(sweep, monkeypatch):
    import keras
    import mlflow.pyfunc

    from l2sweep.base.data import load_split, to_float

    root = sweep["root"]
    # (not mlflow.set_tracking_uri: it would stay set, in the environment too, for later tests)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sweep["client"].tracking_uri)
    x, _ = load_split(root / "data" / "prepared", "test")
    x = x[:20]
    for name, child in sweep["children"].items():
        pyfunc = mlflow.pyfunc.load_model(f"models:/{logged_model(sweep, child).model_id}")
        assert pyfunc.metadata.signature is not None
        served = np.asarray(pyfunc.predict(x))  # uint8 pixels, as the data files hold them
        local = keras.saving.load_model(root / "models" / name / "model.keras").predict(to_float(x), verbose=0)
        np.testing.assert_array_equal(served.argmax(axis=1), local.argmax(axis=1))
        with pytest.raises(Exception, match="(?i)incompatible|float"):
            pyfunc.predict(x.astype(np.float32))  # 0-255 floats: rejected, not silently wrong


def logged_model(sweep: dict, child) -> "object":
    """The run's one MLflow 3 logged model."""
    (output,) = child.outputs.model_outputs
    return sweep["client"].get_logged_model(output.model_id)


def test_models_are_logged_models_linked_to_run_and_metrics(sweep):
    client = sweep["client"]
    experiment = client.get_experiment_by_name("l2-sweep")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    found = {m.source_run_id: m for m in client.search_logged_models([experiment.experiment_id])}
    for child in sweep["children"].values():
        model = logged_model(sweep, child)
        assert model.name == "model" and str(model.status) == "READY"
        assert found[child.info.run_id].model_id == model.model_id  # what the Models tab lists
        linked = {m.key: m for m in model.metrics}
        assert linked["val_accuracy"].step == EPOCHS - 1 and linked["val_accuracy"].run_id == child.info.run_id
        # Linking re-logs the last epoch: the run's history still has one point per epoch.
        assert len(client.get_metric_history(child.info.run_id, "val_accuracy")) == EPOCHS


def test_outputs_on_disk_and_manifest(sweep):
    models = sweep["root"] / "models"
    manifest = json.loads((models / "sweep.json").read_text())
    assert manifest["strengths"] == GRID
    assert manifest["parent_run_id"] == sweep["parents"][0].info.run_id
    for run in manifest["runs"]:
        history = json.loads((models / run["dir"] / "history.json").read_text())
        assert (models / run["dir"] / "model.keras").is_file()
        assert history["status"] == "FINISHED" and history["epochs"] == list(range(EPOCHS))
        assert set(METRICS) <= set(history["metrics"])
    # Hydra's folders are fixed: no timestamps anywhere under outputs/.
    assert sorted(p.name for p in (sweep["root"] / "outputs" / "sweep").iterdir()) == \
        sorted(f"l2-{s}" for s in GRID) + ["multirun.yaml"]


def test_larger_lambda_gives_smaller_weights(sweep):
    norms = [sweep["children"][f"l2-{s}"].data.metrics["weight_norm/hidden"] for s in GRID]
    assert norms == sorted(norms, reverse=True)
    penalties = [sweep["children"][f"l2-{s}"].data.metrics["penalty"] for s in GRID]
    assert penalties == sorted(penalties)


def test_bad_grid_fails_before_anything_runs(tmp_path, tiny_arrays_module):
    idx_dir = write_idx_dir(tmp_path / "raw_tiny", tiny_arrays_module)
    write_project_params(tmp_path, idx_dir, sweep={"strengths": [0.01, -0.1]})
    proc = run_cli(tmp_path, "l2sweep.train", "-m", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error: params.yaml: sweep.strengths=-0.1 is not allowed: a finite number >= 0"]
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "models").exists()


def test_threads_default_to_one_for_the_compiled_loop_only(tiny_cfg, monkeypatch):
    from l2sweep.train_cli import configure_threads

    cases = [((), "1"), (("train.fused=true",), None), (("model=cnn",), None),
             (("train.loop=keras",), None), (("train.threads=3",), "3"), (("train.fused=true", "train.threads=2"), "2")]
    for overrides, expected in cases:
        monkeypatch.delenv("TF_NUM_INTRAOP_THREADS", raising=False)
        configure_threads(tiny_cfg(*overrides))
        assert os.environ.get("TF_NUM_INTRAOP_THREADS") == expected, overrides
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "2")  # the user's own setting wins over the default
    configure_threads(tiny_cfg())
    assert os.environ["TF_NUM_INTRAOP_THREADS"] == "2"


def test_the_jobs_of_a_process_share_one_read_of_the_data(prepared_tiny):
    from l2sweep.base.data import load_split, save_prepared
    from l2sweep.train import load_training_data

    (x, y), _ = load_training_data(prepared_tiny)
    assert load_training_data(prepared_tiny)[0][0] is x and not x.flags.writeable
    folder = Path(prepared_tiny.paths.prepared)
    splits = {name: load_split(folder, name) for name in ("train", "val", "test")}
    splits["train"] = (splits["train"][0][:100], splits["train"][1][:100])
    save_prepared(folder, splits, json.loads((folder / "meta.json").read_text()))
    (x2, y2), _ = load_training_data(prepared_tiny)  # the file changed: read again
    assert len(x2) == len(y2) == 100


def test_a_fused_sweep_has_the_sequential_layout(tmp_path, tiny_arrays_module):
    """`python -m l2sweep.train -m train.fused=true`: one job trains the grid; one parent, a
    child per λ with the sequential sweep's metrics and artifacts, models/<run>/ files."""
    idx_dir = write_idx_dir(tmp_path / "raw_tiny", tiny_arrays_module)
    write_project_params(tmp_path, idx_dir)
    run_cli(tmp_path, "l2sweep.prepare")
    proc = run_cli(tmp_path, "l2sweep.train", "-m", "train.fused=true")
    assert "job 1/1 l2-${regularizer.strength}" not in proc.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("l2-sweep").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(children) == sorted(f"l2-{s}" for s in GRID)
    for name, child in children.items():
        run_id = child.info.run_id
        assert child.info.status == "FINISHED" and child.data.tags["l2sweep.fused"] == "true"
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert float(child.data.params["regularizer.strength"]) == float(name.split("-", 1)[1])
        for key in METRICS:
            assert [m.step for m in client.get_metric_history(run_id, key)] == list(range(EPOCHS)), key
        config = Path(client.download_artifacts(run_id, "hydra/config.yaml")).read_text()
        assert f"strength: {name.split('-', 1)[1]}" in config
        history = json.loads((tmp_path / "models" / name / "history.json").read_text())
        assert history["status"] == "FINISHED" and history["mlflow_run_id"] == run_id
        assert (tmp_path / "models" / name / "model.keras").is_file()
    manifest = json.loads((tmp_path / "models" / "sweep.json").read_text())
    assert manifest["strengths"] == GRID and manifest["parent_run_id"] == parents[0].info.run_id
    assert sorted(p.name for p in (tmp_path / "outputs" / "sweep").iterdir()) == ["l2-fused-0", "multirun.yaml"]


def test_one_run_without_multirun(tmp_path, tiny_arrays_module):
    """The README's single run: no `-m`, so no sweep and no parent run; one tracked run. Not
    run by DVC, it writes into a timestamped folder of its own, never into DVC's models/."""
    idx_dir = write_idx_dir(tmp_path / "raw_tiny", tiny_arrays_module)
    write_project_params(tmp_path, idx_dir, paths={"models": "models"})  # as dvc.yaml's out
    shutil.copy(REPO / "dvc.yaml", tmp_path)
    run_cli(tmp_path, "l2sweep.prepare")
    proc = run_cli(tmp_path, "l2sweep.train", "regularizer=l1", "regularizer.strength=0.01",
                   "tracking.log_model=false")
    assert "l1-0.01: val_loss" in proc.stdout + proc.stderr
    (models,) = (tmp_path / "outputs").glob("*-*-*/*-*-*/models")
    assert f"not a DVC stage: models go to {models.relative_to(tmp_path).as_posix()}" in proc.stderr
    assert (models.parent / "train.log").is_file() and not (tmp_path / "models").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("l2-sweep").experiment_id])
    assert run.info.run_name == "l1-0.01" and run.info.status == "FINISHED"
    assert "mlflow.parentRunId" not in run.data.tags
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == list(range(EPOCHS))
    history = json.loads((models / "l1-0.01" / "history.json").read_text())
    assert history["status"] == "FINISHED" and history["mlflow_run_id"] == run.info.run_id


@pytest.fixture(scope="module")
def champion(sweep) -> dict:
    """`python -m l2sweep.evaluate` after the sweep (twice: a rerun registers nothing new)."""
    for _ in range(2):
        run_cli(sweep["root"], "l2sweep.evaluate")
    return json.loads((sweep["root"] / "reports" / "evaluation.json").read_text())["best"]


def test_evaluate_registers_the_best_model_as_champion(sweep, champion, monkeypatch):
    import mlflow.pyfunc

    from l2sweep.base.data import load_split

    client = sweep["client"]
    version = client.get_model_version_by_alias("l2sweep-mlp", "champion")
    assert version.run_id == sweep["children"][champion["run_name"]].info.run_id
    assert len(client.search_model_versions("name = 'l2sweep-mlp'")) == 1
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)
    x, _ = load_split(sweep["root"] / "data" / "prepared", "test")
    probs = np.asarray(mlflow.pyfunc.load_model("models:/l2sweep-mlp@champion").predict(x[:5]))
    assert probs.shape == (5, 10) and np.allclose(probs.sum(axis=1), 1, atol=1e-4)


def test_mlflow_models_serve_answers_for_the_champion(sweep, champion, tmp_path):
    """The README's `mlflow models serve -m models:/l2sweep-mlp@champion --env-manager local`."""
    import subprocess
    import sys
    import time

    import requests

    from helpers import cli_env, free_port
    from l2sweep.base.data import load_split

    port, env = free_port(), {**cli_env(), "MLFLOW_TRACKING_URI": sweep["client"].tracking_uri}
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    with open(tmp_path / "serve.log", "w") as log:
        server = subprocess.Popen([str(mlflow_cli), "models", "serve", "-m", "models:/l2sweep-mlp@champion",
                                   "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                                  cwd=sweep["root"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        x, _ = load_split(sweep["root"] / "data" / "prepared", "test")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            try:
                answer = requests.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": x[:3].tolist()},
                                       timeout=30)
                break
            except requests.ConnectionError:
                time.sleep(1)
        else:
            pytest.fail(f"mlflow models serve did not answer:\n{(tmp_path / 'serve.log').read_text()[-3000:]}")
        assert answer.status_code == 200, answer.text
        assert np.asarray(answer.json()["predictions"]).shape == (3, 10)
    finally:
        server.terminate()
        server.wait(30)
