"""Sharing results through a DVC remote, so a teammate reuses them without retraining.

A throwaway copy of the project (its dvc.yaml, code and conf/, tiny data) runs
`dvc repro train`, adds a local-folder remote and `dvc push`es; a teammate's copy (what a clone
has: no DVC cache, no prepared data, no models) `dvc pull`s them back byte for byte and
`dvc repro` has nothing to do.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import write_idx_dir
from helpers import GRID, cli_env, tiny_arrays

REPO = Path(__file__).resolve().parents[2]
DVC = str(Path(sys.executable).parent / "dvc")
OUTPUTS = ("data/prepared", "models")


def dvc(root: Path, *args: str) -> str:
    proc = subprocess.run([DVC, *args], cwd=root, env=cli_env(DVC_NO_ANALYTICS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def digests(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file of the DVC-tracked outputs."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for out in OUTPUTS for p in sorted((root / out).rglob("*")) if p.is_file()}


def test_the_project_ships_without_a_remote():
    config = (REPO / ".dvc" / "config").read_text()
    assert not re.search(r"^\s*\[\s*'?remote", config, re.M), config
    assert not re.search(r"^\s*remote\s*=", config, re.M), config


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's pipeline (`dvc repro train`) in a throwaway copy on tiny data."""
    root = tmp_path_factory.mktemp("origin")
    shutil.copy(REPO / "dvc.yaml", root)
    shutil.copytree(REPO / "conf", root / "conf")
    shutil.copytree(REPO / "src" / "l2sweep", root / "src" / "l2sweep",
                    ignore=shutil.ignore_patterns("__pycache__"))
    write_idx_dir(root / "data" / "raw" / "tiny", tiny_arrays())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["dataset"] = {"name": "idx_dir", "path": "data/raw/tiny"}
    params["train"]["epochs"] = 1
    params["sweep"]["strengths"] = GRID[:2]
    params["sweep"]["seeds"] = [1, 2]  # replicates, through dvc repro and dvc push/pull
    params["tracking"] = {"log_model": False}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc(root, "init", "--no-scm", "--quiet")
    dvc(root, "config", "core.analytics", "false")
    dvc(root, "config", "core.site_cache_dir", str(tmp_path_factory.mktemp("dvc-site-cache")))
    dvc(root, "repro", "train")
    return root


@pytest.mark.slow
def test_a_teammate_pulls_the_results_instead_of_retraining(origin, tmp_path):
    produced = digests(origin)
    assert {p.split("/")[1] for p in produced if p.endswith("/model.keras")} == {
        f"l2-{s}-s{seed}" for s in GRID[:2] for seed in (1, 2)}  # a run per λ and seed
    assert "data/prepared/train.npz" in produced

    remote = tmp_path / "remote"
    dvc(origin, "remote", "add", "--default", "shared", str(remote))
    dvc(origin, "push")
    assert any(p.is_file() for p in remote.rglob("*"))

    # What a clone holds: code, config, dvc.yaml/dvc.lock, the raw data (`make data`); no DVC
    # cache, no prepared data, no models.
    mate = tmp_path / "teammate"
    shutil.copytree(origin, mate, ignore=shutil.ignore_patterns("cache", "tmp", "prepared", "models",
                                                                "mlruns", "outputs"))
    assert not (mate / ".dvc" / "cache").exists() and not (mate / "models").exists()
    dvc(mate, "pull")
    assert digests(mate) == produced

    status = dvc(mate, "status", "--with-deps", "train")
    assert "up to date" in status, status
    repro = dvc(mate, "repro", "train")
    assert "Stage 'train' didn't change" in repro and "Running stage" not in repro, repro
    assert digests(mate) == produced
