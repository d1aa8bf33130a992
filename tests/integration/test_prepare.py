"""The ``prepare`` stage: prepare(cfg), its CLI, and the real ``dvc repro prepare``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import TINY_TEST, TINY_TRAIN, override, write_idx_dir
from l2sweep.base.data import load_meta, load_split
from l2sweep.prepare import main, prepare

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def test_prepare_writes_splits_and_meta(prepared_tiny):
    cfg = prepared_tiny
    out = Path(cfg.paths.prepared)
    meta = load_meta(out)
    sizes = {s: meta["splits"][s]["size"] for s in ("train", "val", "test")}
    assert sizes == {"train": TINY_TRAIN - round(TINY_TRAIN / 6), "val": round(TINY_TRAIN / 6),
                     "test": TINY_TEST}
    for split, size in sizes.items():
        x, y = load_split(out, split)
        assert x.shape == (size, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
        assert meta["splits"][split]["class_counts"] == {
            str(c): int(n) for c, n in enumerate(np.bincount(y, minlength=10))}
    assert meta["dataset"] == "idx_dir" and meta["source"] == cfg.dataset.path
    assert set(meta["checksums"]) == {"x_train", "y_train", "x_test", "y_test"}
    assert (meta["val_fraction"], meta["seed"], meta["limit"]) == (1 / 6, 42, None)


def test_prepare_honours_limit_and_keeps_val(tiny_cfg):
    meta = prepare(tiny_cfg("data.limit=50"))
    assert meta["splits"]["train"]["size"] == 50
    assert meta["splits"]["val"]["size"] == round(TINY_TRAIN / 6)
    assert meta["limit"] == 50


def test_prepare_is_deterministic_per_seed(tiny_cfg, tmp_path):
    outs = {}
    for tag, seed in (("a", 1), ("b", 1), ("c", 2)):
        cfg = tiny_cfg(f"data.seed={seed}", override("paths.prepared", str(tmp_path / tag)))
        prepare(cfg)
        outs[tag] = load_split(cfg.paths.prepared, "val")[1], (tmp_path / tag / "val.npz").read_bytes()
    assert outs["a"][1] == outs["b"][1]  # byte-identical outputs: DVC sees no change
    assert not np.array_equal(outs["a"][0], outs["c"][0])


def test_prepare_npz_dataset(tiny_cfg, tiny_npz):
    meta = prepare(tiny_cfg("dataset=npz", override("dataset.path", str(tiny_npz))))
    assert meta["dataset"] == "npz" and set(meta["checksums"]) == {"archive"}
    assert meta["splits"]["test"]["size"] == TINY_TEST


def test_main_prints_summary(tiny_idx_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: conf/ + these overrides only
    monkeypatch.setenv("L2SWEEP_PARAMS", "")
    rc = main(["dataset=idx_dir", override("dataset.path", str(tiny_idx_dir)), "paths.prepared=out"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "prepared idx_dir from" in printed and "train 417  val 83  test 100" in printed
    assert "-> out" in printed.replace("  ", " ")
    assert (tmp_path / "out" / "meta.json").is_file()


# --- the CLI in a subprocess ----------------------------------------------------------------


def run_cli(args, cwd, extra_env=None):
    env = {k: v for k, v in os.environ.items() if k not in ("L2SWEEP_PARAMS", "HYDRA_FULL_ERROR")}
    env["L2SWEEP_PARAMS"] = ""  # no params.yaml here: conf/ + the arguments only
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "l2sweep.prepare", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, expected", [
    (["dataset=npz"], "error: dataset.path=None is not allowed"),
    (["bogus.key=1"], "error: bogus.key=1 is not allowed: a key the schema declares ('bogus' is unknown"),
    (["data.limit=3", "dataset=idx_dir", "dataset.path=TINY"], "error: data.limit=3 is not allowed"),
    (["dataset=idx_dir", "dataset.path=/no/such/folder"], "error: /no/such/folder: not a folder"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, tiny_idx_dir, args, expected):
    args = [a.replace("TINY", str(tiny_idx_dir)) for a in args]
    result = run_cli(args, tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr
    assert not (tmp_path / "data" / "prepared").exists()


def test_cli_verbose_shows_traceback(tmp_path):
    result = run_cli(["dataset=npz", "--verbose"], tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr and "ConfigError" in result.stderr


# --- the real DVC stage ---------------------------------------------------------------------


def _run(cmd, cwd, env):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{cmd}: {result.stdout}\n{result.stderr}"
    return result.stdout


def test_dvc_repro_prepare(tmp_path, tiny_arrays):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, repo / name)
    for name in ("conf", "src"):
        shutil.copytree(REPO / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "data" / "raw").mkdir(parents=True)
    shutil.copy(REPO / "data" / "raw" / "README.md", repo / "data" / "raw" / "README.md")
    # The tiny data lives under paths.raw, which dvc.yaml tracks as a dependency.
    write_idx_dir(repo / "data" / "raw" / "tiny", tiny_arrays)
    params_path = repo / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["dataset"] = {"name": "idx_dir", "path": "data/raw/tiny"}
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))

    env = {k: v for k, v in os.environ.items() if k not in ("L2SWEEP_PARAMS", "HYDRA_FULL_ERROR")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", DVC_NO_ANALYTICS="1",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    _run(["git", "init", "-q"], repo, env)
    _run(["dvc", "init", "-q"], repo, env)
    _run(["dvc", "repro", "prepare"], repo, env)

    meta = json.loads((repo / "data" / "prepared" / "meta.json").read_text())
    assert meta["dataset"] == "idx_dir" and meta["splits"]["train"]["size"] == 417
    assert (repo / "dvc.lock").is_file()
    status = json.loads(_run(["dvc", "status", "prepare", "--json"], repo, env) or "{}")
    assert status == {}, status

    params["data"]["seed"] = 7
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(_run(["dvc", "status", "prepare", "--json"], repo, env))
    # dvc.yaml lists the whole `data` group, so DVC reports the group as modified.
    assert status == {"prepare": [{"changed deps": {"params.yaml": {"data.seed": "modified"}}}]}, status
