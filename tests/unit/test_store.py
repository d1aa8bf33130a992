"""Which MLflow store a run uses (l2sweep.tracking.store.tracking_uri), inside and outside DVC."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from l2sweep.tracking import store

CFG = OmegaConf.create({"tracking": {"uri": "sqlite:///mlruns/mlflow.db", "experiment": "l2-sweep"}})


@pytest.fixture
def copy_of_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A queued or temporary `dvc exp run`: the stage runs in a copy, DVC_ROOT names the repo."""
    (tmp_path / "copy").mkdir()
    monkeypatch.chdir(tmp_path / "copy")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "repo"


def test_a_relative_store_stays_relative_in_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert store.tracking_uri(CFG) == "sqlite:///mlruns/mlflow.db"
    assert store.artifact_location(CFG) is None
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # `dvc repro`, `dvc exp run` in the workspace
    assert store.tracking_uri(CFG) == "sqlite:///mlruns/mlflow.db"
    assert store.artifact_location(CFG) is None


def test_a_dvc_experiment_in_a_copy_uses_the_repositorys_store(copy_of_repo, monkeypatch):
    assert store.tracking_uri(CFG) == f"sqlite:///{copy_of_repo}/mlruns/mlflow.db"
    assert store.tracking_uri(CFG, "sqlite:///mlruns/mlflow.db") == store.tracking_uri(CFG)
    assert store.artifact_location(CFG) == (copy_of_repo / "mlruns" / "l2-sweep").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "mlruns")
    assert store.tracking_uri(CFG) == str(copy_of_repo / "mlruns")


@pytest.mark.parametrize("uri", ["sqlite:////abs/mlflow.db", "http://127.0.0.1:5000"])
def test_absolute_stores_and_servers_are_left_alone(copy_of_repo, monkeypatch, uri):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert store.tracking_uri(CFG) == uri
    if uri.startswith("http"):
        assert store.artifact_location(CFG) is None  # the server's own artifact root
