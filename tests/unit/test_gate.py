"""The regression gate: pure comparisons, tolerances from the real config, and its CLI."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from l2sweep import gate as g
from l2sweep.base.config import compose_config


def metrics(accuracies: dict[float, float]) -> dict:
    """An evaluation.json content: λ -> test accuracy (test loss 0.40 everywhere)."""
    runs = {f"l2-{strength:g}": {"strength": strength, "status": "finished", "diverged_epoch": None,
                                 "test_accuracy": acc, "test_loss": 0.40}
            for strength, acc in accuracies.items()}
    return {"sweep": {"config": {"train.epochs": 10}}, "best": None, "runs": runs}


@pytest.fixture
def baseline() -> dict:
    return metrics({0.0001: 0.870, 0.001: 0.865, 0.01: 0.850})


def tolerances(*overrides: str) -> list[g.Tolerance]:
    """The tolerances of the real config (conf/, no params.yaml) with ``overrides``."""
    return g.tolerances_from_config(compose_config(list(overrides), with_params=False).gate)


def test_defaults_come_from_the_config():
    tol = {t.metric: t for t in tolerances()}
    assert tol["test_accuracy"].max_change == 0.005 and not tol["test_accuracy"].relative
    assert tol["test_loss"].max_change == 0.05 and tol["test_loss"].relative


def test_identical_metrics_pass(baseline):
    verdicts = g.gate(copy.deepcopy(baseline), baseline, tolerances())
    assert g.passed(verdicts) and len(verdicts) == 6
    assert {v.status for v in verdicts} == {"ok"}


def test_one_point_accuracy_drop_fails(baseline):
    current = copy.deepcopy(baseline)
    current["runs"]["l2-0.001"]["test_accuracy"] -= 0.01
    verdicts = g.gate(current, baseline, tolerances())
    assert not g.passed(verdicts)
    (bad,) = [v for v in verdicts if not v.passed]
    assert (bad.strength, bad.metric, bad.status, bad.change) == (0.001, "test_accuracy", "regressed", "-1.00 pt")
    table = g.format_verdicts(verdicts)
    assert "| 0.001 | test_accuracy | 86.50% | 85.50% | -1.00 pt (current n=1: no interval) | REGRESSED" in table


def test_small_changes_and_improvements_pass(baseline):
    current = copy.deepcopy(baseline)
    current["runs"]["l2-0.001"]["test_accuracy"] -= 0.004
    current["runs"]["l2-0.01"]["test_accuracy"] += 0.03
    current["runs"]["l2-0.01"]["test_loss"] *= 1.04
    assert g.passed(g.gate(current, baseline, tolerances()))


def test_loss_rise_beyond_five_percent_fails(baseline):
    current = copy.deepcopy(baseline)
    current["runs"]["l2-0.01"]["test_loss"] *= 1.06
    (bad,) = [v for v in g.gate(current, baseline, tolerances()) if not v.passed]
    assert bad.metric == "test_loss" and bad.change == "+6.0%"


def test_changed_tolerances_are_honoured(baseline):
    current = copy.deepcopy(baseline)
    current["runs"]["l2-0.001"]["test_accuracy"] -= 0.01
    current["runs"]["l2-0.01"]["test_loss"] *= 1.06
    assert g.passed(g.gate(current, baseline, tolerances("gate.max_accuracy_drop=0.02",
                                                        "gate.max_loss_increase=0.1")))
    assert not g.passed(g.gate(baseline, baseline, [g.Tolerance("test_accuracy", True, 0.0)])
                        + g.gate(current, baseline, [g.Tolerance("test_accuracy", True, 0.0)]))
    with pytest.raises(ValueError, match=r"max_change=-0.1 is not allowed"):
        g.Tolerance("test_accuracy", True, -0.1)


def test_missing_lambda_is_reported(baseline):
    current = copy.deepcopy(baseline)
    del current["runs"]["l2-0.01"]
    verdicts = g.gate(current, baseline, tolerances())
    (bad,) = [v for v in verdicts if not v.passed]
    assert bad.status == "missing" and bad.strength == 0.01
    assert "λ=0.01 is in the baseline but not in the current metrics (they have λ: 0.0001, 0.001)" in bad.note
    assert "MISSING" in g.format_verdicts(verdicts)


def test_diverged_and_new_lambdas(baseline):
    current = copy.deepcopy(baseline)
    current["runs"]["l2-0.01"].update(status="diverged", diverged_epoch=3, test_accuracy=None)
    current["runs"]["l2-0.1"] = {"strength": 0.1, "status": "finished", "test_accuracy": 0.8,
                                 "test_loss": 0.5}
    verdicts = {v.strength: v for v in g.gate(current, baseline, tolerances())}
    assert verdicts[0.01].status == "diverged" and not verdicts[0.01].passed
    assert "epoch 3" in verdicts[0.01].note
    assert verdicts[0.1].status == "new" and verdicts[0.1].passed


def replicated(accuracies: dict[float, list[float]]) -> dict:
    """An evaluation.json content with seeds: λ -> test accuracy per seed (42, 43, ...)."""
    runs = {f"l2-{strength:g}-s{42 + i}": {"strength": strength, "seed": 42 + i,
                                           "status": "finished", "diverged_epoch": None,
                                           "test_accuracy": acc, "test_loss": 0.40}
            for strength, accs in accuracies.items() for i, acc in enumerate(accs)}
    return {"sweep": {"config": {"train.epochs": 10}}, "best": None, "runs": runs}


def test_replicates_compare_means_and_show_the_interval():
    baseline = replicated({0.001: [0.86, 0.87, 0.88]})
    current = replicated({0.001: [0.84, 0.87, 0.88]})  # one seed 2 pt down: the mean 0.67 pt
    (acc, loss) = g.gate(current, baseline, tolerances())
    assert acc.baseline == pytest.approx(0.87) and acc.current == pytest.approx((0.84 + 0.87 + 0.88) / 3)
    assert acc.status == "regressed" and acc.change == "-0.67 pt"
    # mean 0.863333, sd 0.020817, t(2) 4.3027: half-width 0.051712
    assert acc.interval == "95% CI 81.16% to 91.50%, n=3"
    assert loss.interval == "95% CI 0.4000 to 0.4000, n=3"
    assert ("| 0.001 | test_accuracy | 87.00% | 86.33% | -0.67 pt (current 95% CI 81.16% to "
            "91.50%, n=3) | REGRESSED") in g.format_verdicts([acc, loss])
    assert g.passed(g.gate(current, baseline, tolerances("gate.max_accuracy_drop=0.007")))


def test_more_diverged_seeds_fail_and_an_old_baseline_reads_as_one_seed(baseline):
    current = replicated({0.0001: [0.870, 0.872], 0.001: [0.865, 0.866], 0.01: [0.850, 0.851]})
    current["runs"]["l2-0.01-s43"].update(status="diverged", diverged_epoch=2, test_accuracy=None)
    verdicts = g.gate(current, baseline, tolerances())
    (bad,) = [v for v in verdicts if not v.passed]
    assert (bad.strength, bad.metric, bad.status) == (0.01, "-", "diverged")
    assert bad.note == "λ=0.01: 1 of 2 seeds diverged or failed (baseline: 0 of 1)"
    ok = {(v.strength, v.metric): v for v in verdicts if v.metric != "-"}
    assert ok[(0.0001, "test_accuracy")].current == pytest.approx(0.871)
    assert ok[(0.01, "test_accuracy")].interval == "n=1: no interval"
    for run in current["runs"].values():
        run.update(status="diverged", diverged_epoch=2, test_accuracy=None)
    verdicts = g.gate(current, baseline, tolerances())
    assert {v.status for v in verdicts} == {"diverged"} and len(verdicts) == 3
    assert verdicts[0].note == "λ=0.0001 finished in the baseline but is now diverged (epoch 2, 2)"


def test_config_differences_are_named(baseline):
    current = copy.deepcopy(baseline)
    current["sweep"]["config"]["train.epochs"] = 2
    assert g.config_differences(current, baseline) == ["train.epochs: 10 -> 2"]


def compared(accuracies: dict[str, float]) -> dict:
    """An evaluation.json content of a comparison of kinds: label -> test accuracy."""
    runs = {}
    for label, acc in accuracies.items():
        kind, _, lam = label.partition("-")
        runs[f"{label}-s1"] = {"regularizer": kind, "strength": float(lam or 0), "seed": 1,
                               "status": "finished", "diverged_epoch": None,
                               "test_accuracy": acc, "test_loss": 0.40}
    return {"sweep": {"config": {}}, "best": None, "runs": runs}


def test_a_comparison_is_gated_per_kind_and_strength():
    baseline = compared({"l2-0.001": 0.87, "l2-0.01": 0.85, "dropout-0.1": 0.86, "none": 0.84})
    assert g.passed(g.gate(copy.deepcopy(baseline), baseline, tolerances()))
    current = copy.deepcopy(baseline)
    current["runs"]["dropout-0.1-s1"]["test_accuracy"] -= 0.01
    del current["runs"]["l2-0.01-s1"]
    verdicts = g.gate(current, baseline, tolerances())
    assert [v.label for v in verdicts if v.metric == "test_accuracy"] == [
        "dropout-0.1", "l2-0.001", "none"]  # kinds grouped, then by strength
    bad = {v.label: v for v in verdicts if not v.passed}
    assert set(bad) == {"dropout-0.1", "l2-0.01"} and bad["dropout-0.1"].change == "-1.00 pt"
    assert bad["l2-0.01"].status == "missing" and bad["l2-0.01"].note == (
        "l2-0.01 is in the baseline but not in the current metrics (they have dropout-0.1, "
        "l2-0.001, none)")
    table = g.format_verdicts(verdicts)
    assert "| configuration | metric | baseline |" in table
    assert "| dropout-0.1 | test_accuracy | 86.00% | 85.00% | -1.00 pt" in table


def cross_validated(val_ce: dict[float, list[float]], chosen: float, refit_acc: float) -> dict:
    """A cross-validation's evaluation: strength -> each fold's validation cross-entropy (no
    test scores), and the refit of ``chosen`` with its test accuracy."""
    runs = {f"l2-{lam:g}-f{fold}": {"regularizer": "l2", "strength": lam, "seed": 1, "fold": fold,
                                    "refit": False, "status": "finished", "diverged_epoch": None,
                                    "val_data_loss": ce, "test_accuracy": None, "test_loss": None}
            for lam, losses in val_ce.items() for fold, ce in enumerate(losses)}
    runs[f"l2-{chosen:g}-refit"] = {"regularizer": "l2", "strength": chosen, "seed": 1,
                                    "fold": None, "refit": True, "status": "finished",
                                    "diverged_epoch": None, "test_accuracy": refit_acc,
                                    "test_loss": 0.4}
    return {"sweep": {"config": {}}, "best": None, "runs": runs}


def test_a_cross_validation_gates_the_folds_val_ce_and_the_refits_test():
    baseline = cross_validated({0.001: [0.40, 0.42], 0.01: [0.50, 0.52]}, 0.001, 0.86)
    verdicts = g.gate(copy.deepcopy(baseline), baseline, tolerances())
    assert g.passed(verdicts)
    assert [(v.label, v.metric) for v in verdicts] == [
        ("0.001", "val_data_loss"), ("0.01", "val_data_loss"), ("refit", "test_accuracy"),
        ("refit", "test_loss")]
    assert verdicts[0].baseline == pytest.approx(0.41) and verdicts[0].interval.endswith("n=2")
    # The folds' CE 10% up at 0.01; the refit (now of another strength) 1 pt down.
    current = cross_validated({0.001: [0.40, 0.42], 0.01: [0.55, 0.572]}, 0.01, 0.85)
    bad = [(v.label, v.metric, v.change) for v in g.gate(current, baseline, tolerances())
           if not v.passed]
    assert bad == [("0.01", "val_data_loss", "+10.0%"), ("refit", "test_accuracy", "-1.00 pt")]
    del current["runs"]["l2-0.01-refit"]
    (missing,) = [v for v in g.gate(current, baseline, tolerances()) if v.status == "missing"]
    assert missing.label == "refit" and missing.note.startswith(
        "refit (λ=0.001) is in the baseline but not in the current metrics (they have λ: 0.001, 0.01)")


# --- the command line --------------------------------------------------------------------


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory; conf/ defaults only (``L2SWEEP_PARAMS=``)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("L2SWEEP_PARAMS", "")  # conf/ defaults only
    return tmp_path


def test_main_exit_status_and_table(workdir, baseline, capsys):
    write(workdir / "metrics/baseline.json", baseline)
    current = copy.deepcopy(baseline)
    write(workdir / "reports/evaluation.json", current)
    assert g.main([]) == g.EXIT_OK
    out = capsys.readouterr().out
    assert "| λ | metric | baseline | current | change | verdict |" in out
    assert "Values are means over each λ's finished seeds" in out and "gate: PASSED" in out

    current["runs"]["l2-0.0001"]["test_accuracy"] -= 0.01
    write(workdir / "reports/evaluation.json", current)
    assert g.main([]) == g.EXIT_REGRESSED
    assert "gate: FAILED (6 checks, 1 failed)" in capsys.readouterr().out
    assert g.main(["gate.max_accuracy_drop=0.011"]) == g.EXIT_OK


def test_main_missing_file_is_a_clear_error(workdir, baseline, capsys):
    write(workdir / "reports/evaluation.json", baseline)
    assert g.main(["--baseline", "nowhere.json"]) == g.EXIT_ERROR
    err = capsys.readouterr().err
    assert "baseline metrics file nowhere.json does not exist: commit one" in err
    (workdir / "reports/evaluation.json").unlink()
    assert g.main([]) == g.EXIT_ERROR
    assert "current metrics file reports/evaluation.json does not exist: run `dvc repro`" in capsys.readouterr().err
    write(workdir / "reports/evaluation.json", {"not": "metrics"})
    assert g.main(["--baseline", "reports/evaluation.json"]) == g.EXIT_ERROR
    assert "has no 'runs' section" in capsys.readouterr().err


def git(cwd: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


def test_rev_compares_with_committed_metrics(workdir, baseline, capsys):
    git(workdir, "init", "-q", "-b", "main")
    write(workdir / "reports/evaluation.json", baseline)
    git(workdir, "add", "reports/evaluation.json")
    git(workdir, "commit", "-q", "-m", "baseline")
    current = copy.deepcopy(baseline)
    current["runs"]["l2-0.001"]["test_accuracy"] -= 0.01
    write(workdir / "reports/evaluation.json", current)
    assert g.main(["--rev", "main"]) == g.EXIT_REGRESSED
    assert "against reports/evaluation.json@main" in capsys.readouterr().out
    assert g.main(["--rev", "no-such-branch"]) == g.EXIT_ERROR
    assert "--rev no-such-branch: no such git revision or DVC experiment" in capsys.readouterr().err
    git(workdir, "rm", "-q", "--cached", "reports/evaluation.json")
    git(workdir, "commit", "-q", "-m", "no evaluation")
    assert g.main(["--rev", "main"]) == g.EXIT_ERROR
    assert "--rev main: cannot read reports/evaluation.json at that revision" in capsys.readouterr().err


def test_rev_is_only_ever_read_as_a_revision(workdir, baseline, capsys):
    """``--rev=--output=X`` once made ``git show`` write the file X."""
    git(workdir, "init", "-q", "-b", "main")
    write(workdir / "reports/evaluation.json", baseline)
    for rev in ("--output=written", "-p"):
        assert g.main([f"--rev={rev}"]) == g.EXIT_ERROR
        assert f"error: --rev {rev!r} is not allowed: a git revision" in capsys.readouterr().err
    assert not (workdir / "written").exists()


def test_rev_takes_a_dvc_experiment_name(workdir, baseline, capsys):
    """DVC keeps an experiment as the git ref refs/exps/<baseline sha, split 2/38>/<name>."""
    git(workdir, "init", "-q", "-b", "main")
    write(workdir / "reports/evaluation.json", baseline)
    git(workdir, "add", "reports/evaluation.json")
    git(workdir, "commit", "-q", "-m", "baseline")
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=workdir, capture_output=True,
                         text=True, check=True).stdout.strip()
    git(workdir, "update-ref", f"refs/exps/{sha[:2]}/{sha[2:]}/cream-tuba", "HEAD")
    current = copy.deepcopy(baseline)
    current["runs"]["l2-0.001"]["test_accuracy"] -= 0.01
    write(workdir / "reports/evaluation.json", current)
    assert g.main(["--rev", "cream-tuba"]) == g.EXIT_REGRESSED
    assert "against reports/evaluation.json@cream-tuba" in capsys.readouterr().out
    git(workdir, "update-ref", f"refs/exps/{'0' * 2}/{'1' * 38}/cream-tuba", "HEAD")
    assert g.main(["--rev", "cream-tuba"]) == g.EXIT_ERROR
    assert "--rev cream-tuba: 2 DVC experiments have that name" in capsys.readouterr().err


def test_json_prints_the_verdict_and_keeps_the_exit_status(workdir, baseline, capsys):
    write(workdir / "metrics/baseline.json", baseline)
    current = copy.deepcopy(baseline)
    current["runs"]["l2-0.0001"]["test_accuracy"] -= 0.01
    write(workdir / "reports/evaluation.json", current)
    assert g.main(["--json"]) == g.EXIT_REGRESSED
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["passed"] is False and verdict["baseline"] == "metrics/baseline.json"
    assert len(verdict["checks"]) == 6
    (failed,) = [c for c in verdict["checks"] if not c["passed"]]
    assert failed["strength"] == 0.0001 and failed["metric"] == "test_accuracy"
    assert failed["status"] == "regressed" and failed["change"] == "-1.00 pt"
    assert g.main(["--json", "gate.max_accuracy_drop=0.011"]) == g.EXIT_OK
    assert json.loads(capsys.readouterr().out)["passed"] is True
    assert g.main(["--json", "--baseline", "nowhere.json"]) == g.EXIT_ERROR
    out, err = capsys.readouterr()
    assert json.loads(out)["error"].startswith("baseline metrics file nowhere.json does not exist")
    assert "error: baseline metrics file nowhere.json" in err


@pytest.mark.slow
def test_cli_in_a_subprocess(workdir, baseline):
    write(workdir / "metrics/baseline.json", baseline)
    current = copy.deepcopy(baseline)
    del current["runs"]["l2-0.01"]
    write(workdir / "reports/evaluation.json", current)
    out = subprocess.run([sys.executable, "-m", "l2sweep.gate"], capture_output=True, text=True)
    assert out.returncode == g.EXIT_REGRESSED, out.stderr
    assert "error: λ=0.01 is in the baseline but not in the current metrics" in out.stdout
