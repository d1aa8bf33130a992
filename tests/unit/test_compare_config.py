"""A comparison of kinds (``sweep.compare``) and cross-validation (``data.folds``): what the
multirun's jobs are, which runs each trains and what bad values say."""

from __future__ import annotations

import os

import pytest

from l2sweep.base.config import ConfigError, compose_config, sweep_grid, validate
from l2sweep.train import lambda_configs

COMPARE = "sweep.compare={l2:[0.001,0.01],dropout:null,none:[]}"


def cfg(*overrides: str):
    return compose_config(list(overrides), with_params=False)


def test_each_job_of_a_comparison_trains_its_kinds_grid():
    assert sweep_grid(cfg(COMPARE)) == [0.001, 0.01]  # regularizer=l2, the default group
    assert sweep_grid(cfg(COMPARE, "regularizer=dropout")) == [0.1, 0.3, 0.5]  # null: its own
    assert sweep_grid(cfg(COMPARE, "regularizer=none")) == [0.0]
    # a comparison's entry wins over sweep.strengths (params.yaml keeps one for the l2 sweep)
    assert sweep_grid(cfg(COMPARE, "sweep.strengths=[0.5]")) == [0.001, 0.01]
    names = [c.run_name for c in lambda_configs(cfg(COMPARE, "regularizer=dropout", "sweep.seeds=[1,2]"))]
    assert names == [f"dropout-{r}-s{s}" for r in (0.1, 0.3, 0.5) for s in (1, 2)]
    assert [c.run_name for c in lambda_configs(cfg(COMPARE, "regularizer=none", "sweep.seeds=[1,2]"))] == [
        "none-s1", "none-s2"]


@pytest.mark.parametrize("value, message", [
    ("{l2:null}", r"^sweep.compare=\{'l2': None\} is not allowed: null or a mapping of two or more"),
    ("{l2:null,l3:null}", r"^sweep.compare='l3' is not allowed: kinds among l2, l1, "),
    ("{l2:[],none:[]}", r"^sweep.compare.l2=\[\] is not allowed: a non-empty list"),
    ("{l2:null,dropout:[0.5,1.0]}", r"^sweep.compare.dropout=1.0 is not allowed: a dropout rate in \[0, 1\)"),
    ("{l2:null,none:[0.1]}", r"^sweep.compare.none=\[0.1\] is not allowed: \[\] or null"),
    ("five", r"^sweep.compare='five' is not allowed: null or a mapping"),
])
def test_a_bad_comparison_is_named(value, message):
    with pytest.raises(ConfigError, match=message):
        validate(cfg(f"sweep.compare={value}"))


@pytest.mark.parametrize("folds", ["1", "0", "-2", "true"])
def test_bad_folds_are_named(folds):
    # (true: refused by the schema as the config is composed)
    with pytest.raises(ConfigError, match=r"^data.folds=\S+ is not allowed: null (\(no cross-validation\) )?"
                                          r"or an integer"):
        validate(cfg(f"data.folds={folds}"))


def test_folds_and_a_comparison_are_one_or_the_other():
    with pytest.raises(ConfigError, match=r"^data.folds=3 is not allowed: null with sweep.compare"):
        validate(cfg("data.folds=3", COMPARE))


def test_a_comparison_is_a_job_per_kind(prepared_project):
    from l2sweep.train_cli import JOBS_ENV, launch_argv

    argv = launch_argv(["-m", COMPARE, "tracking.enabled=false"])
    assert "regularizer=l2,dropout,none" in argv and "regularizer=l2" not in argv
    assert "hydra.sweep.subdir=${regularizer.name}" in argv
    assert not any(a.startswith("regularizer.strength=") for a in argv)
    assert os.environ[JOBS_ENV] == "3"
    with pytest.raises(ConfigError, match=r"^sweep.compare=.* is not allowed: null with a "
                                          r"regularizer.strength sweep"):
        launch_argv(["-m", COMPARE, "regularizer.strength=0.1,0.2", "tracking.enabled=false"])
    with pytest.raises(ConfigError, match=r"is not allowed: null with a regularizer sweep"):
        launch_argv(["-m", COMPARE, "regularizer=l1,l2", "tracking.enabled=false"])


def test_a_cross_validation_is_one_job_of_the_whole_grid(prepared_project):
    from l2sweep.train_cli import JOBS_ENV, launch_argv

    argv = launch_argv(["-m", "data.folds=3", "regularizer.strength=0.1,1.0", "tracking.enabled=false"])
    assert "sweep.strengths=[0.1,1.0]" in argv and os.environ[JOBS_ENV] == "1"
    assert "hydra.sweep.subdir=${regularizer.name}-cv-${hydra.job.num}" in argv
    assert not any(a.startswith("regularizer.strength=") for a in argv)
