"""Replicates: the runs a job trains per λ and seed, and the record of what data they train on."""

from __future__ import annotations

import pytest

from l2sweep.base.config import REGULARIZERS, ConfigError, compose_config, sweep_grid, validate
from l2sweep.train import lambda_configs
from l2sweep.train_cli import check_prepared


def cfg(*overrides: str):
    return compose_config(list(overrides), with_params=False)


def test_one_seed_is_the_seeds_single_run():
    (only,) = lambda_configs(cfg("regularizer.strength=0.01"))
    assert only.run_name == "l2-0.01" and only.train.seed == 42


def test_every_seed_is_a_run_of_its_own():
    runs = lambda_configs(cfg("regularizer.strength=0.01", "sweep.seeds=[1,2,3]"))
    assert [(c.run_name, c.train.seed, c.regularizer.strength) for c in runs] == [
        ("l2-0.01-s1", 1, 0.01), ("l2-0.01-s2", 2, 0.01), ("l2-0.01-s3", 3, 0.01)]
    fused = lambda_configs(cfg("train.fused=true", "sweep.strengths=[0.1,0.2]", "sweep.seeds=[7,8]"))
    assert [c.run_name for c in fused] == ["l2-0.1-s7", "l2-0.1-s8", "l2-0.2-s7", "l2-0.2-s8"]


@pytest.mark.parametrize("seeds", ["[]", "[1,1]", "[-1]", "[1.5]", "seven"])
def test_bad_seeds_are_named(seeds):
    # (a float or a string: refused by the schema as the config is composed)
    with pytest.raises(ConfigError, match=r"^sweep.seeds\S*=.* is not allowed: (null or )?a"):
        lambda_configs(cfg(f"sweep.seeds={seeds}"))


def test_a_run_trains_on_what_was_prepared_or_not_at_all():
    meta = {"dataset": "fashion_mnist", "val_fraction": 1 / 6, "seed": 42, "limit": None,
            "source": "/usr/share/datasets/fashion-mnist"}
    check_prepared(cfg(), meta)
    for override, key, prepared in (("data.limit=3000", "data.limit", "null"),
                                    ("dataset=mnist", "dataset.name", "fashion_mnist"),
                                    ("data.seed=1", "data.seed", "42")):
        with pytest.raises(ConfigError, match=rf"^{key}=.* is not allowed: '?{prepared}'?, what "
                                              r"data/prepared/meta.json says was prepared"):
            check_prepared(cfg(override), meta)
    with pytest.raises(ConfigError, match=r"^dataset.path='/elsewhere' is not allowed"):
        check_prepared(cfg("dataset=idx_dir", "dataset.path=/elsewhere"), {**meta, "dataset": "idx_dir"})


def test_each_regularizer_sweeps_its_own_grid_unless_a_list_is_given():
    grids = {kind: sweep_grid(cfg(f"regularizer={kind}")) for kind in REGULARIZERS}
    assert grids["l2"] == [0.0001, 0.001, 0.01]  # the seeds' grid
    assert grids["weight_decay"] == [2 * s for s in grids["l2"]]  # the same models as l2's
    assert grids["adamw"] == [0.01, 0.1, 1.0] and grids["l1"] == [0.00001, 0.0001, 0.001]
    assert grids["none"] == [0.0]  # no grid: one configuration
    assert grids["dropout"] == [0.1, 0.3, 0.5]  # rates
    assert sweep_grid(cfg("regularizer=adamw", "sweep.strengths=[0.5,2.0]")) == [0.5, 2.0]


@pytest.mark.parametrize("overrides, message", [
    (["regularizer=dropout", "sweep.strengths=[0.1,1.0]"], "sweep.strengths=1.0 is not allowed: a dropout rate in [0, 1)"),
    (["regularizer=dropout", "regularizer.strengths=[0.5,-0.1]"], "regularizer.strengths=-0.1 is not allowed: a finite number >= 0"),
    (["regularizer=l2", "regularizer.strengths=[0.1,0.1]"], "regularizer.strengths=[0.1, 0.1] is not allowed: each lambda once (repeated: [0.1])"),
    (["regularizer=none", "sweep.strengths=[0.0,0.1]"], "sweep.strengths=0.1 is not allowed: 0 for regularizer=none"),
    (["regularizer=dropout", "regularizer.strength=1.0"], "regularizer.strength=1.0 is not allowed: a dropout rate in [0, 1)"),
])
def test_a_bad_grid_or_rate_is_named(overrides, message):
    with pytest.raises(ConfigError) as raised:
        validate(cfg(*overrides))
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_none_has_no_grid_and_trains_once_per_seed():
    (only,) = lambda_configs(cfg("regularizer=none"))
    assert (only.run_name, only.regularizer.strength, only.train.seed) == ("none", 0.0, 42)
    for fused in ("false", "true"):
        runs = lambda_configs(cfg("regularizer=none", "sweep.seeds=[1,2]", f"train.fused={fused}"))
        assert [(c.run_name, c.train.seed, c.regularizer.strength) for c in runs] == [
            ("none-s1", 1, 0.0), ("none-s2", 2, 0.0)]
