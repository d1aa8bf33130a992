"""Input that used to be accepted and ignored, or found wrong only after training (issue 25),
fails before anything trains: one line naming the key or file, the value and what is allowed.

In-process through compose_config/validate/check_store; one run of the real CLI proves the exit
status, the single line and that TensorFlow was never imported.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import override
from helpers import cli_env
from l2sweep import gate
from l2sweep.base.config import ConfigError, ParamsFileError, compose_config, validate
from l2sweep.tracking import store

STEERING = "set L2SWEEP_PARAMS= (empty) to run on conf/ defaults alone"


def conf_only(*overrides: str):
    return compose_config(list(overrides), with_params=False)


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty current folder (no params.yaml) and no L2SWEEP_PARAMS."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("L2SWEEP_PARAMS", raising=False)
    return tmp_path


# --- 1. a key added with + that the schema lacks ---------------------------------------------


@pytest.mark.parametrize("added, expected", [
    ("+train.epoch=3", "train.epoch=3 is not allowed: a key the schema declares ('train.epoch' is "
                       "unknown; did you mean 'train.epochs'?)"),
    ("+train.nonsense=1", "train.nonsense=1 is not allowed: a key the schema declares "
                          "('train.nonsense' is unknown; keys of train: epochs, batch_size,"),
    ("++foo=1", "foo=1 is not allowed: a key the schema declares ('foo' is unknown; keys: run_name,"),
])
def test_an_added_key_the_schema_lacks_is_refused(added, expected):
    with pytest.raises(ConfigError) as info:
        conf_only(added)
    assert str(info.value).startswith(expected)


def test_added_keys_the_schema_leaves_free_and_every_group_still_compose():
    pin = "0" * 64
    cfg = conf_only("dataset=idx_dir", "dataset.path=x", f"+dataset.sha256.extra={pin}",
                    "model=cnn", "regularizer=l1_l2", "hydra/launcher=parallel",
                    "hydra/sweeper=lambda_search")
    assert cfg.dataset.sha256.extra == pin and cfg.model.name == "cnn"


def test_the_cli_refuses_an_added_typo_before_tensorflow_loads(tmp_path):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "l2sweep.train", "-m",
                           "+train.epoch=3"], cwd=tmp_path, env=cli_env(L2SWEEP_PARAMS=""),
                          capture_output=True, text=True, timeout=60)
    imported = [line for line in proc.stderr.splitlines() if line.startswith("import time:")]
    lines = [line for line in proc.stderr.splitlines() if line.strip() and line not in imported]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert lines == ["error: train.epoch=3 is not allowed: a key the schema declares "
                     "('train.epoch' is unknown; did you mean 'train.epochs'?)"]
    assert imported and not any("tensorflow" in line for line in imported)
    assert not (tmp_path / "outputs").exists()


# --- 2. the params file -----------------------------------------------------------------------


def test_a_missing_params_yaml_is_named(here):
    with pytest.raises(ParamsFileError) as info:
        compose_config([])
    assert str(info.value).startswith(f"params.yaml: no such file (in {Path.cwd()}); run from the "
                                      "repository root")
    assert str(info.value).endswith(STEERING)


def test_l2sweep_params_naming_a_missing_file_is_named(here, monkeypatch):
    monkeypatch.setenv("L2SWEEP_PARAMS", "nope.yaml")
    with pytest.raises(ParamsFileError, match=r"^L2SWEEP_PARAMS=nope.yaml: no such file \(in "):
        compose_config([])


def test_l2sweep_params_names_the_file_or_empty_asks_for_conf_defaults(here, monkeypatch):
    (here / "params.yaml").write_text("train: {epochs: 3}\n")
    (here / "other.yaml").write_text("train: {epochs: 4}\n")
    assert compose_config([]).train.epochs == 3
    monkeypatch.setenv("L2SWEEP_PARAMS", "other.yaml")
    assert compose_config([]).train.epochs == 4
    monkeypatch.setenv("L2SWEEP_PARAMS", "")
    assert compose_config([]).train.epochs == 10  # conf/ alone, deliberately


@pytest.mark.parametrize("text, kind", [("[1, 2]\n", "list ([1, 2])"), ("just words\n", "str (just words)")])
def test_a_params_file_that_is_not_a_mapping_is_named(here, text, kind):
    (here / "params.yaml").write_text(text)
    with pytest.raises(ParamsFileError) as info:
        compose_config([])
    assert str(info.value) == (f"params.yaml: holds a {kind}, not a mapping; "
                               "expected sections such as `train: {epochs: 10}`")


# --- 3. the store -------------------------------------------------------------------------------


@pytest.mark.parametrize("setting, expected", [
    ("tracking.uri=''", "tracking.uri='' is not allowed: a tracking URI such as sqlite:///"),
    ("tracking.experiment=''", "tracking.experiment='' is not allowed: a non-empty experiment name"),
    ("tracking.experiment=' '", "tracking.experiment=' ' is not allowed: a non-empty experiment name"),
])
def test_an_empty_store_or_experiment_is_refused(setting, expected):
    with pytest.raises(ConfigError) as info:
        validate(conf_only(setting))
    assert str(info.value).startswith(expected)


@pytest.mark.parametrize("key", ["tracking.uri", "MLFLOW_TRACKING_URI"])
def test_a_sqlite_store_that_is_a_folder_is_refused_before_training(tmp_path, monkeypatch, key):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    folder = tmp_path / "somefolder"
    folder.mkdir()
    uri = f"sqlite:///{folder}"
    if key == "MLFLOW_TRACKING_URI":
        monkeypatch.setenv(key, uri)
        cfg = conf_only()
    else:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        cfg = conf_only(override("tracking.uri", uri))
    with pytest.raises(ConfigError) as info:
        store.check_store(cfg)
    assert str(info.value) == (f"{key}={uri!r} is not allowed: a sqlite database file, but {folder} "
                               f"is a folder (e.g. {uri}/mlflow.db)")
    assert list(folder.iterdir()) == []


# --- 4. the gate's tolerances -------------------------------------------------------------------


@pytest.mark.parametrize("key", ["gate.max_accuracy_drop", "gate.max_loss_increase"])
@pytest.mark.parametrize("value, shown", [("-1", "-1.0"), ("nan", "nan")])
def test_a_negative_or_nan_gate_tolerance_is_refused(key, value, shown):
    with pytest.raises(ConfigError) as info:
        validate(conf_only(f"{key}={value}"))
    assert str(info.value) == f"{key}={shown} is not allowed: a finite number >= 0"


def test_the_gate_names_a_bad_tolerance_before_reading_any_metrics(here, monkeypatch, capsys):
    monkeypatch.setenv("L2SWEEP_PARAMS", "")
    assert gate.main(["gate.max_accuracy_drop=-1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: gate.max_accuracy_drop=-1.0 is not allowed: a finite number >= 0"]
