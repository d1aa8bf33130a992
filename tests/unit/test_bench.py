"""bench/: the arithmetic that turns timings into the figures the README quotes."""

from __future__ import annotations

import pytest

from bench.run import agreement, check_targets, fit_overhead, seed_noise


def _rows(fixed: float, per_epoch: float, c0: float, c_epoch: float, epochs: list[int]) -> list[dict]:
    return [{"epochs": e, "wall_s": {"c": c0 + c_epoch * e, "b": c0 + c_epoch * e + fixed + per_epoch * e}}
            for e in epochs]


def test_fit_recovers_tracking_cost_and_the_sweep_length_where_it_is_five_percent():
    fit = fit_overhead(_rows(2.7, 0.0168, 8.0, 1.65, [10, 20, 40]), n_lambdas=3, target=1.05)
    assert fit["fixed_s"] == pytest.approx(2.7)
    assert fit["per_lambda_epoch_s"] == pytest.approx(0.0056)
    assert fit["untracked_fixed_s"] == pytest.approx(8.0)
    # (2.7 + 0.0168 E) = 0.05 (8 + 1.65 E)  ->  E = 2.3 / 0.0657
    epochs = fit["epochs_for_1.05"]
    assert epochs == pytest.approx(2.3 / 0.0657)
    b = 8.0 + 1.65 * epochs + 2.7 + 0.0168 * epochs
    assert b / (8.0 + 1.65 * epochs) == pytest.approx(1.05)


def test_fit_says_never_when_tracking_grows_as_fast_as_training():
    assert fit_overhead(_rows(1.0, 0.1, 8.0, 1.0, [10, 20]), n_lambdas=3, target=1.05)["epochs_for_1.05"] is None


def test_fit_says_zero_when_tracking_is_already_cheap_enough():
    assert fit_overhead(_rows(0.1, 0.0, 8.0, 1.0, [10, 20]), n_lambdas=3, target=1.05)["epochs_for_1.05"] == 0.0


def test_fit_defaults_to_the_tracking_target():
    fit = fit_overhead(_rows(0.1, 0.0, 8.0, 1.0, [10, 20]), n_lambdas=3)
    assert fit["target"] == 1.08 and "epochs_for_1.08" in fit


def test_targets_are_judged_at_full_size_only():
    full = check_targets({"a/b": 5.0, "b/c": 1.10, "a/d": 6.0}, full_size=True)
    assert full["a/b"] == {"target": ">= 4.5", "measured": 5.0, "met": True}
    assert full["b/c"]["met"] is False
    small = check_targets({"a/b": 1.6, "b/c": 1.39}, full_size=False)
    assert small["a/b"]["met"] is None and small["b/c"]["measured"] == 1.39
    assert check_targets({"b/c": 1.02}, full_size=True)["a/b"] == {"target": ">= 4.5", "measured": None, "met": None}


def _per_lambda(acc_small: float, acc_large: float) -> dict:
    return {"0.0001": {"val_accuracy": acc_small, "val_loss": 1 - acc_small},
            "0.01": {"val_accuracy": acc_large, "val_loss": 1 - acc_large}}


def test_seed_noise_is_the_spread_over_every_seed_per_lambda():
    noise = seed_noise({44: _per_lambda(0.87, 0.83), 42: _per_lambda(0.86, 0.84), 43: _per_lambda(0.88, 0.835)})
    assert noise["seeds"] == [42, 43, 44]
    assert noise["per_lambda"]["0.0001"]["val_accuracy"] == pytest.approx(0.02)  # 0.88 - 0.86
    assert noise["per_lambda"]["0.01"]["val_accuracy"] == pytest.approx(0.01)    # 0.84 - 0.83
    assert noise["values"]["0.01"]["val_accuracy"] == [0.84, 0.835, 0.83]
    assert noise["max_abs_diff"]["val_accuracy"] == pytest.approx(0.02)


def test_agreement_measures_each_variant_from_the_seeds_mean_against_their_spread():
    # (b)'s seeds: 0.86 / 0.88 at the small lambda (mean 0.87, spread 0.02), 0.84 / 0.835.
    noise = seed_noise({42: _per_lambda(0.86, 0.84), 43: _per_lambda(0.88, 0.835)})
    summary = {v: {"per_lambda": pl} for v, pl in
               {"b": _per_lambda(0.86, 0.84), "c": _per_lambda(0.86, 0.84),
                "d": _per_lambda(0.87, 0.83), "a": _per_lambda(0.885, 0.84),
                "x": _per_lambda(0.895, 0.84)}.items()}
    out = agreement(summary, noise)
    assert out["c-b"]["val_accuracy"] == 0.0 and out["c-b"]["within_noise"]
    assert out["d-b"]["val_accuracy"] == pytest.approx(0.01) and out["d-b"]["within_noise"]
    # 0.025 from seed 42, but 0.015 from the seeds' mean: another draw, within their spread
    assert out["a-b"]["val_accuracy"] == pytest.approx(0.025)
    assert out["a-b"]["vs_seed_mean"]["val_accuracy"] == pytest.approx(0.015) and out["a-b"]["within_noise"]
    assert out["x-b"]["vs_seed_mean"]["val_accuracy"] == pytest.approx(0.025) and not out["x-b"]["within_noise"]


def test_the_engine_benchmark_times_a_real_training_of_k_models(capsys):
    """bench.engine trains the compiled engine for real: K finite losses that fall as the
    epochs go, the compiling call and the steady epochs timed apart."""
    import json
    import math

    from bench.engine import main

    main(["--k", "2", "--epochs", "2", "--n", "640"])
    one = json.loads(capsys.readouterr().out)
    main(["--k", "2", "--epochs", "4", "--n", "640"])
    longer = json.loads(capsys.readouterr().out)
    assert one["k"] == 2 and len(one["epoch_s"]) == 2 and len(longer["epoch_s"]) == 4
    assert one["first_s"] > 0 and all(t > 0 for t in one["epoch_s"])
    assert len(one["loss"]) == 2 and all(math.isfinite(v) for v in one["loss"])
    # More epochs on the same data: a lower training loss for every slice.
    assert all(b < a for a, b in zip(one["loss"], longer["loss"]))


def _log_line(when: float, message: str) -> str:
    """A line as Hydra's default job logging writes it (hydra/job_logging/default.yaml)."""
    import logging
    from importlib.resources import files

    import yaml

    conf = yaml.safe_load((files("hydra.conf") / "hydra" / "job_logging" / "default.yaml").read_text())
    record = logging.LogRecord("l2sweep.train", logging.INFO, __file__, 1, message, None, None)
    record.created, record.msecs = when, (when % 1) * 1000
    return logging.Formatter(conf["formatters"]["simple"]["format"]).format(record)


def test_phases_split_a_sweeps_wall_time_at_its_job_log_lines():
    from bench.run import phases

    t0 = 1_800_000_000.0
    lines = ["2026 some TensorFlow noise",
             _log_line(t0 + 4.0, "job 1/2 l2-0.0001: 1 epochs, batch 32"),
             _log_line(t0 + 9.5, "job 1/2 l2-0.0001: val_loss 0.4000 val_accuracy 0.8600"),
             _log_line(t0 + 9.75, "job 2/2 l2-0.01: 1 epochs, batch 32"),
             _log_line(t0 + 14.25, "job 2/2 l2-0.01: val_loss 0.5000 val_accuracy 0.8300"),
             _log_line(t0 + 14.5, "sweep done")]
    got = phases("\n".join(lines), spawned=t0, wall=15.0)
    assert got["start_s"] == pytest.approx(4.0, abs=1e-3)
    assert got["jobs_s"] == pytest.approx([5.5, 4.5], abs=1e-3)
    assert got["between_s"] == pytest.approx(0.25, abs=1e-3)
    assert got["after_s"] == pytest.approx(0.75, abs=1e-3)
    assert phases(lines[0], spawned=t0, wall=1.0) is None
