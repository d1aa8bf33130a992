"""Where runs write: DVC's outputs under `dvc repro`, a folder of their own otherwise."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from l2sweep.base import outputs

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The project's dvc.yaml and params.yaml in the working directory, outside any DVC stage."""
    for name in outputs.PROJECT_FILES:
        shutil.copy(REPO / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(outputs.DVC_STAGE_ENV, raising=False)
    return tmp_path


def paths(**changed: str) -> object:
    return OmegaConf.create({**yaml.safe_load((REPO / "params.yaml").read_text())["paths"], **changed})


def test_dvc_yaml_declares_exactly_these_outputs():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    declared = set()
    for stage in stages.values():
        for out in stage.get("outs", []) + stage.get("metrics", []):
            path = next(iter(out)) if isinstance(out, dict) else out
            declared.add(re.fullmatch(r"\$\{paths\.(\w+)\}", path).group(1))
    assert declared == set(outputs.DVC_OUTPUTS)


def test_an_adhoc_train_gets_a_timestamped_folder(project, monkeypatch):
    folder = outputs.adhoc_train_folder("models", set(), True, "outputs")
    assert re.fullmatch(r"multirun/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d", folder.as_posix())
    single = outputs.adhoc_train_folder(str(project / "models"), set(), False, "outputs")
    assert single.parts[0] == "outputs"
    assert outputs.train_overrides(folder, set(), True) == [
        f"paths.models='{folder.as_posix()}/models'", f"hydra.sweep.dir='{folder.as_posix()}'"]
    assert outputs.train_overrides(folder, {"hydra.run.dir"}, False) == [
        f"paths.models='{folder.as_posix()}/models'"]
    # The user's own path, any other folder, or a DVC stage: as given.
    assert outputs.adhoc_train_folder("models", {"paths.models"}, True, "outputs") is None
    assert outputs.adhoc_train_folder("elsewhere", set(), True, "outputs") is None
    monkeypatch.setenv(outputs.DVC_STAGE_ENV, "train")
    assert outputs.adhoc_train_folder("models", set(), True, "outputs") is None


def test_outside_a_dvc_project_paths_are_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(outputs.DVC_STAGE_ENV, raising=False)
    assert outputs.adhoc_train_folder("models", set(), True, "outputs") is None
    assert outputs.adhoc_evaluate_paths(paths(models="multirun/x/models"), set()) == {}


def test_evaluate_of_an_adhoc_sweep_writes_beside_it(project, monkeypatch):
    adhoc = paths(models="multirun/2026-01-01/10-00-00/models")
    assert outputs.adhoc_evaluate_paths(adhoc, set()) == {
        "metrics": "multirun/2026-01-01/10-00-00/metrics/eval.json",
        "plots": "multirun/2026-01-01/10-00-00/plots",
        "reports": "multirun/2026-01-01/10-00-00/reports"}
    assert set(outputs.adhoc_evaluate_paths(adhoc, {"paths.reports"})) == {"metrics", "plots"}
    assert outputs.adhoc_evaluate_paths(paths(), set()) == {}  # DVC's models: DVC's outputs
    monkeypatch.setenv(outputs.DVC_STAGE_ENV, "evaluate")
    assert outputs.adhoc_evaluate_paths(adhoc, set()) == {}
