"""bench/: the arithmetic that turns timings into the figures the README quotes."""

from __future__ import annotations

import pytest

from bench.run import fit_overhead


def _rows(fixed: float, per_epoch: float, c0: float, c_epoch: float, epochs: list[int]) -> list[dict]:
    return [{"epochs": e, "wall_s": {"c": c0 + c_epoch * e, "b": c0 + c_epoch * e + fixed + per_epoch * e}}
            for e in epochs]


def test_fit_recovers_tracking_cost_and_the_sweep_length_where_it_is_five_percent():
    fit = fit_overhead(_rows(2.7, 0.0168, 8.0, 1.65, [10, 20, 40]), n_lambdas=3)
    assert fit["fixed_s"] == pytest.approx(2.7)
    assert fit["per_lambda_epoch_s"] == pytest.approx(0.0056)
    assert fit["untracked_fixed_s"] == pytest.approx(8.0)
    # (2.7 + 0.0168 E) = 0.05 (8 + 1.65 E)  ->  E = 2.3 / 0.0657
    epochs = fit["epochs_for_1.05"]
    assert epochs == pytest.approx(2.3 / 0.0657)
    b = 8.0 + 1.65 * epochs + 2.7 + 0.0168 * epochs
    assert b / (8.0 + 1.65 * epochs) == pytest.approx(1.05)


def test_fit_says_never_when_tracking_grows_as_fast_as_training():
    assert fit_overhead(_rows(1.0, 0.1, 8.0, 1.0, [10, 20]), n_lambdas=3)["epochs_for_1.05"] is None


def test_fit_says_zero_when_tracking_is_already_cheap_enough():
    assert fit_overhead(_rows(0.1, 0.0, 8.0, 1.0, [10, 20]), n_lambdas=3)["epochs_for_1.05"] == 0.0
