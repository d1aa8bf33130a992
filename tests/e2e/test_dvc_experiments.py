"""DVC experiments the everyday way: `dvc exp run --queue -S ...` twice, `dvc queue start`.

Each queued experiment runs in a copy of the repository that DVC deletes afterwards; its MLflow
runs must still land in the repository's own store (the relative `sqlite:///mlruns/mlflow.db`
resolved against DVC_ROOT), tagged with the experiment's name, and the gate must take the
experiment's name as `--rev`, as `dvc metrics diff` does.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import write_idx_dir
from helpers import GRID, cli_env, sqlite_uri, tiny_arrays

REPO = Path(__file__).resolve().parents[2]
DVC = str(Path(sys.executable).parent / "dvc")
ENV = cli_env(DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
              GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")


def run(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    # Output through files, not pipes: `dvc queue start`'s detached workers may inherit its
    # stdout, and reading a pipe waits for every holder to close it (the workers' lifetime).
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        code = subprocess.run(args, cwd=root, env=ENV, stdout=out, stderr=err, timeout=300).returncode
        out.seek(0), err.seek(0)
        proc = subprocess.CompletedProcess(args, code, out.read(), err.read())
    assert not check or proc.returncode == 0, f"{args}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def queued(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A git + DVC copy of the project on tiny data (prepared and committed), with two queued
    experiments run by `dvc queue start`; returns the repository and the experiments' names,
    the whole pipeline's first."""
    root = tmp_path_factory.mktemp("repo")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, root / name)
    (root / ".gitignore").write_text("/mlruns/\n/outputs/\n")  # the tiny data/raw is committed
    for name in ("conf", "src"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    write_idx_dir(root / "data" / "raw" / "tiny", tiny_arrays())
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["dataset"] = {"name": "idx_dir", "path": "data/raw/tiny"}
    params["sweep"]["strengths"], params["sweep"]["seeds"] = GRID[:2], None
    params["tracking"] = {"log_model": False}
    params["train"]["epochs"] = 1
    params["data"]["limit"] = 60  # few enough that test accuracy differs between the seeds
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(root, "git", "init", "-q")
    run(root, DVC, "init", "-q")
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots", dirs_exist_ok=True)
    run(root, DVC, "config", "core.site_cache_dir", str(tmp_path_factory.mktemp("dvc-site")))
    run(root, DVC, "repro")
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-q", "-m", "project")
    for seed in (1, 2):
        run(root, DVC, "exp", "run", "--queue", "-S", f"train.seed={seed}")
    run(root, DVC, "queue", "start", "-j", "2")
    deadline = time.monotonic() + 240
    while any(s in (status := run(root, DVC, "queue", "status").stdout) for s in ("Queued", "Running")):
        assert time.monotonic() < deadline, status
        time.sleep(2)
    assert "Failed" not in status, status + run(root, DVC, "queue", "logs", status.split()[5], check=False).stdout
    shown = json.loads(run(root, DVC, "exp", "show", "--json").stdout)
    exps = {e["name"]: e["revs"][0]["data"]["params"]["params.yaml"]["data"]["train"]["seed"]
            for commit in shown for e in commit.get("experiments") or []}
    assert len(exps) == 2, (shown, status)
    return root, sorted(exps, key=exps.get)


@pytest.mark.slow
def test_queued_experiments_log_to_the_repositorys_store(queued):
    from mlflow import MlflowClient

    root, names = queued
    client = MlflowClient(sqlite_uri(root))
    (experiment,) = [e for e in client.search_experiments() if e.name == "l2-sweep"]
    runs = client.search_runs([experiment.experiment_id])
    sweeps = [r for r in runs if r.data.tags.get("l2sweep.kind") == "sweep"]
    parents = {r.data.tags["dvc.experiment"]: r for r in sweeps if "dvc.experiment" in r.data.tags}
    assert sorted(parents) == sorted(names) and len(sweeps) == 3  # and the baseline's `dvc repro`
    for name, parent in parents.items():
        assert parent.info.status == "FINISHED"
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(r.data.params["regularizer.strength"] for r in children) == sorted(map(str, GRID[:2]))
        assert {r.data.tags["dvc.experiment"] for r in children} == {name}
        assert parent.info.artifact_uri.removeprefix("file://").startswith(str(root / "mlruns"))
    # evaluate, in the same copy, found the parent; the experiment's committed metrics name it
    evaluated = parents[names[0]]
    assert any(key.startswith("test_accuracy/") for key in evaluated.data.metrics)
    assert {"evaluation.json", "report.md"} <= {a.path for a in client.list_artifacts(evaluated.info.run_id)}
    committed = run(root, "git", "show", f"{exp_ref(root, names[0])}:reports/evaluation.json").stdout
    assert evaluated.info.run_id in committed


@pytest.mark.slow
def test_exp_show_of_two_experiments_fits_160_columns(queued):
    """The README's comparison, `dvc exp show --only-changed --drop 'State|Executor|models'` (as a
    pager shows it: full width), shows the experiments' test accuracy per λ, best λ and the
    changed param in at most 160 columns."""
    root, names = queued
    env = {**ENV, "COLUMNS": "1000"}  # rich draws the table at its natural width
    proc = subprocess.run([DVC, "exp", "show", "--only-changed", "--drop", "State|Executor|models",
                           "--no-pager"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120, check=True)
    lines = proc.stdout.splitlines()
    assert max(map(len, lines)) <= 160, proc.stdout
    header = next(line for line in lines if "Experiment" in line).split()
    assert {"best.test_acc", "best.val_ce", "train.seed"} <= set(header), proc.stdout
    assert {f"test_acc.{lam:g}" for lam in GRID[:2]} <= set(header), header
    assert sum(name in proc.stdout for name in names) == 2


def exp_ref(root: Path, name: str) -> str:
    refs = run(root, "git", "for-each-ref", "--format=%(refname)", "refs/exps/").stdout.split()
    (ref,) = [r for r in refs if r.endswith("/" + name)]
    return ref


@pytest.mark.slow
def test_gate_takes_an_experiment_name_as_rev(queued):
    root, (evaluated, _) = queued
    run(root, DVC, "exp", "apply", evaluated)
    proc = run(root, sys.executable, "-m", "l2sweep.gate", "--rev", evaluated, "--json")
    verdict = json.loads(proc.stdout)
    assert verdict["baseline"] == f"reports/evaluation.json@{evaluated}" and len(verdict["checks"]) == 4
    assert verdict["passed"] is True
    proc = run(root, sys.executable, "-m", "l2sweep.gate", "--rev", "no-such-exp", check=False)
    assert proc.returncode == 2 and "--rev no-such-exp: no such git revision or DVC experiment" in proc.stderr
