"""Bad input: one clear ``error:`` line naming key, value and what is allowed; exit 2; nothing
written (no MLflow store, existing outputs byte-for-byte the same).

Most cases call the entry points' ``main`` in-process (they fail before Hydra or TensorFlow
start); a few run the real CLI to prove the exit status and that no traceback is printed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml

from conftest import IDX_FILES, override, write_idx_dir
from helpers import cli_env, run_cli
from l2sweep import evaluate
from l2sweep import gate
from l2sweep import prepare
from l2sweep import train
from l2sweep.base.idx import idx_bytes


def snapshot(root: Path) -> dict[str, str]:
    """Path -> SHA-256 of every file under ``root`` (the raw data excepted)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "raw_tiny" not in p.parts}


@pytest.fixture
def project(prepared_project: Path) -> Path:
    """A prepared tiny project as the current directory, with a finished run's folder in
    ``models/`` (what a bad command must leave alone)."""
    (prepared_project / "models" / "l2-0.001").mkdir(parents=True)
    (prepared_project / "models" / "l2-0.001" / "history.json").write_text('{"status": "FINISHED"}\n')
    return prepared_project


def expect_one_line(capsys, expected: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    return lines[0]


def run_train(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        train.main(args)
    return exit_info.value.code


# --- the command line -----------------------------------------------------------------------

TRAIN_CASES = [
    # lambda: negative, NaN, infinite, not a number; in a swept grid; the grid itself
    (["regularizer.strength=-0.1"], "regularizer.strength=-0.1 is not allowed: a finite number >= 0"),
    (["regularizer.strength=nan"], "regularizer.strength=nan is not allowed: a finite number >= 0"),
    (["regularizer.strength=inf"], "regularizer.strength=inf is not allowed: a finite number >= 0"),
    (["regularizer.strength=abc"], "regularizer.strength='abc' is not allowed: a number"),
    (["regularizer.strength=0.1,-1"], "regularizer.strength=-1.0 is not allowed: a finite number >= 0"),
    (["regularizer.strength=0.1,0.1"], "is not allowed: each lambda once (repeated: [0.1])"),
    (["sweep.strengths=[]"], "sweep.strengths=[] is not allowed: a non-empty list of numbers >= 0"),
    (["sweep.strengths=[0.1,0.01,0.1]"], "is not allowed: each lambda once (repeated: [0.1])"),
    (["sweep.strengths=[0.1,x]"], "sweep.strengths[1]='x' is not allowed: a number"),
    # training settings
    (["train.epochs=0"], "train.epochs=0 is not allowed: a positive integer"),
    (["train.epochs=-3"], "train.epochs=-3 is not allowed: a positive integer"),
    (["train.epochs=1.5"], "train.epochs=1.5 is not allowed: an integer"),
    (["train.epochs=abc"], "train.epochs='abc' is not allowed: an integer"),
    (["train.batch_size=0"], "train.batch_size=0 is not allowed: a positive integer"),
    (["train.batch_size=-32"], "train.batch_size=-32 is not allowed: a positive integer"),
    (["train.batch_size=big"], "train.batch_size='big' is not allowed: an integer"),
    (["train.learning_rate=0"], "train.learning_rate=0.0 is not allowed: a finite number > 0"),
    (["train.learning_rate=-0.001"], "train.learning_rate=-0.001 is not allowed: a finite number > 0"),
    (["train.learning_rate=fast"], "train.learning_rate='fast' is not allowed: a number"),
    (["train.loop=fast"], "train.loop='fast' is not allowed: one of auto, compiled, keras"),
    (["model=cnn", "train.loop=compiled"], "train.loop='compiled' is not allowed: auto or keras for "
                                           "model.name=cnn (the compiled loop runs only mlp)"),
    (["train.threads=0"], "train.threads=0 is not allowed: a positive integer"),
    # tracking settings
    (["tracking.histogram_bins=many"], "tracking.histogram_bins='many' is not allowed: an integer"),
    # data settings
    (["data.val_fraction=0"], "data.val_fraction=0.0 is not allowed: a number strictly between 0 and 1"),
    (["data.val_fraction=1"], "data.val_fraction=1.0 is not allowed: a number strictly between 0 and 1"),
    (["data.val_fraction=-0.2"], "data.val_fraction=-0.2 is not allowed: a number strictly between 0 and 1"),
    (["data.limit=0"], "data.limit=0 is not allowed: a positive integer"),
    # unknown names: the valid ones are listed
    (["dataset=cifar"], "dataset='cifar' is not allowed: one of fashion_mnist, idx_dir, mnist, npz"),
    (["model=resnet"], "model='resnet' is not allowed: one of cnn, mlp"),
    (["regularizer=l3"], "regularizer='l3' is not allowed: one of adamw, dropout, l1, l1_l2, l2, none, weight_decay"),
    (["model.name=resnet"], "model.name='resnet' is not allowed: one of mlp, cnn"),
    # misspelt keys
    (["train.epoch=3"], "train.epoch=3 is not allowed: a key the schema declares "
                        "('train.epoch' is unknown; did you mean 'train.epochs'?)"),
    (["regulariser.strength=0.1"], "('regulariser' is unknown; did you mean 'regularizer'?)"),
]


@pytest.mark.parametrize("args, expected", TRAIN_CASES, ids=[" ".join(a) for a, _ in TRAIN_CASES])
def test_train_rejects_bad_input_before_anything_runs(project, capsys, args, expected):
    before = snapshot(project)
    assert run_train(["-m", *args]) == 2
    expect_one_line(capsys, expected)
    assert not (project / "mlruns").exists() and not (project / "outputs").exists()
    assert snapshot(project) == before


PARAMS_CASES = [
    ({"trian": {"epochs": 3}}, "params.yaml: trian.epochs=3 is not allowed: a key the schema "
                               "declares ('trian' is unknown; did you mean 'train'?)"),
    ({"train": {"epcohs": 3}}, "params.yaml: train.epcohs=3 is not allowed: a key the schema "
                               "declares ('train.epcohs' is unknown; did you mean 'train.epochs'?)"),
    ({"train": {"epochs": "ten"}}, "params.yaml: train.epochs='ten' is not allowed: an integer"),
    ({"train": {"learning_rate": [0.1]}}, "params.yaml: train.learning_rate=[0.1] is not allowed: a number"),
    ({"data": {"limit": 2.5}}, "params.yaml: data.limit=2.5 is not allowed: null or an integer"),
    ({"model": {"name": "mpl"}}, "params.yaml: model='mpl' is not allowed: one of cnn, mlp"),
    ({"sweep": {"strengths": [0.1, -1]}}, "params.yaml: sweep.strengths=-1.0 is not allowed: a finite number >= 0"),
]


@pytest.mark.parametrize("params, expected", PARAMS_CASES, ids=[str(p) for p, _ in PARAMS_CASES])
def test_a_bad_params_yaml_is_named(project, capsys, params, expected):
    path = project / "params.yaml"
    values = yaml.safe_load(path.read_text())
    for section, entries in params.items():
        values.setdefault(section, {}).update(entries)
    path.write_text(yaml.safe_dump(values))
    before = snapshot(project)
    assert run_train(["-m"]) == 2
    expect_one_line(capsys, expected)
    assert snapshot(project) == before and not (project / "mlruns").exists()


def test_params_yaml_that_is_not_yaml(project, capsys):
    (project / "params.yaml").write_text("train:\n  epochs: [3\n")
    assert run_train(["-m"]) == 2
    expect_one_line(capsys, "params.yaml:3: not valid YAML")


@pytest.mark.parametrize("stage", ["prepare", "train", "evaluate", "gate"])
def test_every_stage_reports_a_typo_the_same_way(project, capsys, stage):
    before = snapshot(project)
    mains: dict[str, Callable] = {"prepare": prepare.main, "evaluate": evaluate.main, "gate": gate.main,
                                  "train": lambda a: run_train(a)}
    assert mains[stage](["model=resnet"]) == 2
    expect_one_line(capsys, "model='resnet' is not allowed: one of cnn, mlp")
    assert snapshot(project) == before


# --- the data files -----------------------------------------------------------------------------


def _idx(arrays, role):
    return idx_bytes(arrays[role].astype(np.uint8))


DATA_CASES = {
    "missing file": (lambda d, a: (d / IDX_FILES["y_test"]).unlink(), "missing t10k-labels-idx1-ubyte"),
    "truncated": (lambda d, a: (d / IDX_FILES["y_train"]).write_bytes(_idx(a, "y_train")[:-7]),
                  "truncated IDX payload"),
    "empty": (lambda d, a: (d / IDX_FILES["y_train"]).write_bytes(b""), "file is empty"),
    "wrong magic": (lambda d, a: (d / IDX_FILES["y_train"]).write_bytes(b"\x12\x34" + _idx(a, "y_train")[2:]),
                    "not an IDX file (magic bytes 12 34"),
    "lengths differ": (lambda d, a: (d / IDX_FILES["y_train"]).write_bytes(idx_bytes(a["y_train"][:-5].astype(np.uint8))),
                       "495 labels for 500 images"),
    "labels outside 0-9": (lambda d, a: (d / IDX_FILES["y_train"]).write_bytes(
        idx_bytes(np.where(a["y_train"] == 3, 12, a["y_train"]).astype(np.uint8))), "labels outside 0-9 (e.g. [12])"),
}


def _plain_idx_dir(tmp_path: Path, arrays) -> Path:
    return write_idx_dir(tmp_path / "raw_tiny" / "broken", arrays, gz=())


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_prepare_rejects_a_broken_idx_file(project, tiny_arrays, capsys, case):
    folder = _plain_idx_dir(project, tiny_arrays)
    DATA_CASES[case][0](folder, tiny_arrays)
    before = snapshot(project)
    assert prepare.main(["dataset=idx_dir", override("dataset.path", str(folder))]) == 2
    line = expect_one_line(capsys, DATA_CASES[case][1])
    assert str(folder) in line  # the file (or folder) is named
    assert snapshot(project) == before  # data/prepared untouched


def test_prepare_rejects_a_checksum_mismatch(project, tiny_arrays, capsys):
    folder = _plain_idx_dir(project, tiny_arrays)
    before = snapshot(project)
    pinned = "+dataset.sha256.x_train=" + "f" * 64
    assert prepare.main(["dataset=idx_dir", override("dataset.path", str(folder)), pinned]) == 2
    expect_one_line(capsys, f"SHA-256 mismatch for x_train: expected {'f' * 64}, got ")
    assert snapshot(project) == before


@pytest.mark.parametrize("content, expected", [
    ("keys", "missing keys y_test; required: x_train, y_train, x_test, y_test"),
    ("truncated", "not a readable .npz archive"),
])
def test_prepare_rejects_a_broken_npz(project, tiny_arrays, capsys, content, expected):
    path = project / "raw_tiny" / "data.npz"
    np.savez(path, **{k: v for k, v in tiny_arrays.items() if content != "keys" or k != "y_test"})
    if content == "truncated":
        path.write_bytes(path.read_bytes()[:5000])
    before = snapshot(project)
    assert prepare.main(["dataset=npz", override("dataset.path", str(path))]) == 2
    expect_one_line(capsys, f"{path}: {expected}")
    assert snapshot(project) == before


@pytest.mark.parametrize("args, expected", [
    (["data.val_fraction=0.01"], "data.val_fraction=0.01 is not allowed: a share that leaves every "
                                 "class a validation example"),
    (["data.limit=5"], "data.limit=5 is not allowed: null or an integer >= 10 (one example per class)"),
    (["data.val_fraction=1.5"], "data.val_fraction=1.5 is not allowed: a number strictly between 0 and 1"),
])
def test_prepare_rejects_a_split_the_data_cannot_give(project, capsys, args, expected):
    before = snapshot(project)
    assert prepare.main(args) == 2
    expect_one_line(capsys, expected)
    assert snapshot(project) == before


def test_train_rejects_a_corrupt_prepared_split_before_any_run(project, capsys):
    path = project / "data" / "prepared" / "train.npz"
    path.write_bytes(path.read_bytes()[:1000])
    assert run_train(["-m"]) == 2
    expect_one_line(capsys, f"{Path('data/prepared/train.npz')}: not a prepared split")
    assert not (project / "mlruns").exists()


# --- the real CLI: exit status, one line, traceback only on request ----------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("module, args", [
    ("l2sweep.train", ["-m", "train.epochs=abc"]),
    ("l2sweep.prepare", ["dataset=cifar"]),
    ("l2sweep.evaluate", ["regularizer.strength=-1"]),
])
def test_cli_prints_one_line_and_exits_2(project, module, args):
    before = snapshot(project)
    proc = run_cli(project, module, *args, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "is not allowed" in lines[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert snapshot(project) == before and not (project / "mlruns").exists()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["--verbose", "HYDRA_FULL_ERROR=1"])
def test_traceback_on_request(project, how):
    args, env = (["-m", "train.epochs=abc", how], cli_env()) if how.startswith("--") else \
        (["-m", "train.epochs=abc"], cli_env(HYDRA_FULL_ERROR="1"))
    proc = run_cli(project, "l2sweep.train", *args, check=False, env=env)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ConfigError: train.epochs='abc' is not allowed" in proc.stderr


@pytest.mark.parametrize("stage", ["prepare", "evaluate", "gate"])
def test_every_stage_answers_help_with_what_it_does_and_examples(stage, tmp_path):
    proc = run_cli(tmp_path, f"l2sweep.{stage}", "--help")
    assert f"python -m l2sweep.{stage} " in proc.stdout and not proc.stderr.strip(), proc.stdout


def test_train_answers_help_with_its_keys_groups_and_examples(tmp_path):
    # No params.yaml here: conf/ defaults alone, asked for as users do (a missing one is an error).
    proc = run_cli(tmp_path, "l2sweep.train", "--help", env=cli_env(L2SWEEP_PARAMS=""))
    assert proc.stdout.startswith("The `train` stage"), proc.stdout
    for text in ("python -m l2sweep.train -m", "Main keys: regularizer.strength",
                 "regularizer: adamw, dropout, l1, l1_l2, l2, none, weight_decay"):
        assert text in proc.stdout
    assert not (tmp_path / "outputs").exists()
