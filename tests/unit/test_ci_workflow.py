"""The users' CI workflow (.github/workflows/ci.yml) cannot run here; this checks that it
parses, that its key steps exist and say what the README promises, and that every `run:` block
is valid bash."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / ".github/workflows/ci.yml"


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def steps(workflow: dict, job: str) -> list[dict]:
    return workflow["jobs"][job]["steps"]


def named(workflow: dict, job: str, text: str) -> dict:
    (step,) = [s for s in steps(workflow, job) if text in str(s.get("name", s.get("uses", "")))]
    return step


def test_triggers_and_jobs(workflow):
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as true
    assert {"push", "pull_request"} <= set(triggers)
    assert set(workflow["jobs"]) == {"tests", "pipeline"}
    assert named(workflow, "tests", "Test suite")["run"] == ".ci/run"


@pytest.mark.parametrize("job", ["tests", "pipeline"])
def test_the_virtualenv_is_cached_whole(workflow, job):
    cache = named(workflow, job, "Cache the virtualenv")
    assert ".venv" in cache["with"]["path"].split()
    key = cache["with"]["key"]
    assert "requirements.lock" in key and "pyproject.toml" in key and "python-version" in key
    reuse = named(workflow, job, "Reuse the cached virtualenv")
    assert "cache-hit" in reuse["if"] and "touch .venv/.installed" in reuse["run"]
    stamp = re.search(r"^STAMP := (\S+)", (REPO / "Makefile").read_text(), re.M).group(1)
    assert stamp == "$(VENV)/.installed"  # what the touch above keeps current


def test_the_dataset_is_cached(workflow):
    cache = named(workflow, "pipeline", "Cache the dataset")
    assert cache["with"]["path"] == "data/raw"


def test_pull_requests_are_gated_against_the_target_branch(workflow):
    env = workflow["jobs"]["pipeline"]["env"]
    assert "github.base_ref" in env["BASE_REV"] and "origin/" in env["BASE_REV"]
    choose = named(workflow, "pipeline", "Choose the baseline")["run"]
    assert 'gate_args=--rev $BASE_REV' in choose and "reports/evaluation.json" in choose
    assert "steps.baseline.outputs.gate_args" in named(workflow, "pipeline", "Regression gate")["run"]
    assert steps(workflow, "pipeline")[0]["with"]["fetch-depth"] == 0


def test_the_pull_request_gets_the_gate_table_and_plots_diff(workflow):
    job = workflow["jobs"]["pipeline"]
    assert job["permissions"]["pull-requests"] == "write"
    assert named(workflow, "pipeline", "iterative/setup-cml")["uses"].startswith("iterative/setup-cml@v")
    comment = named(workflow, "pipeline", "Comment on the pull request")
    assert "pull_request" in comment["if"] and comment["env"]["REPO_TOKEN"]
    run = comment["run"]
    assert "cat gate.md" in run and 'dvc plots diff "$BASE_REV"' in run and "--show-vega" in run
    assert "vl2png" in run and "cml comment create" in run
    plot_ids = {next(iter(plot)) for plot in yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]}
    for plot in re.search(r"for plot in ([^;]+);", run).group(1).split():
        assert plot in plot_ids, plot


def test_every_run_block_is_valid_bash(workflow):
    bash = shutil.which("bash")
    for job, spec in workflow["jobs"].items():
        for step in spec["steps"]:
            if "run" in step:
                script = re.sub(r"\$\{\{[^}]*\}\}", "X", step["run"])
                proc = subprocess.run([bash, "-n"], input=script, text=True, capture_output=True)
                assert proc.returncode == 0, f"{job} / {step.get('name')}: {proc.stderr}"
