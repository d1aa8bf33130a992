"""Statistics over seeds (l2sweep.reporting.summaries): t quantiles, intervals, paired
differences, the best λ, and the DVC files built from them. Pure functions, hand-computed values."""

from __future__ import annotations

import math

import pytest

from l2sweep.reporting import dvc_data, intervals
from l2sweep.reporting import summaries as s

#: Two-sided 95% t quantiles from printed tables (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2).
PRINTED_T = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 10: 2.228, 20: 2.086,
             29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def test_t_quantiles_match_printed_tables():
    for df, value in PRINTED_T.items():
        assert intervals.t_quantile(df) == pytest.approx(value, abs=6e-4), df
    assert intervals.t_quantile(35) == intervals.t_quantile(30)  # between tabulated df: the wider
    assert intervals.t_quantile(10_000) == pytest.approx(1.980, abs=6e-4)  # >= 1.960, never narrower
    table = list(intervals.T_975.values())
    assert all(a > b for a, b in zip(table, table[1:]))
    with pytest.raises(ValueError, match=r"df=0: a t quantile needs df >= 1"):
        intervals.t_quantile(0)


def test_mean_ci_by_hand():
    stat = s.mean_ci([0.84, 0.87, 0.88, None, float("nan")])  # non-finite values are left out
    # mean 0.863333; sd sqrt(0.000866667 / 2) = 0.0208167; half 4.3027 * 0.0120185 = 0.0517120
    assert stat["n"] == 3 and stat["mean"] == pytest.approx(0.8633333, abs=1e-7)
    assert stat["sd"] == pytest.approx(0.0208167, abs=1e-7)
    assert stat["half"] == pytest.approx(0.0517120, abs=1e-6)
    assert (stat["low"], stat["high"]) == pytest.approx((0.8116213, 0.9150453), abs=1e-6)
    assert s.mean_ci([0.5]) == {"mean": 0.5, "sd": None, "n": 1, "low": None, "high": None,
                                "half": None}  # one seed: no interval, never an invented one
    assert s.mean_ci([])["n"] == 0 and s.mean_ci([])["mean"] is None
    # Five values, df 4: sd 1.5811388, half 2.7764 * 1.5811388 / sqrt(5) = 1.9632
    assert s.mean_ci([1, 2, 3, 4, 5])["half"] == pytest.approx(1.96322, abs=1e-5)


def entry(strength: float, seed: int, val_ce: float, acc: float, status: str = s.FINISHED) -> dict:
    return {"strength": strength, "seed": seed, "status": status, "epochs": 3,
            "diverged_epoch": 1 if status == s.DIVERGED else None,
            "val_data_loss": val_ce if status == s.FINISHED else None, "val_loss": val_ce + 0.1,
            "test_accuracy": acc if status == s.FINISHED else None,
            "weight_norm": {"hidden": 3.0, "output": 4.0, "total": 5.0, "regularized": 3.0},
            "per_class_accuracy": {"a": acc, "b": 1 - acc},
            "val_ce_per_epoch": [val_ce + 0.2, val_ce + 0.1, val_ce]}


def entries(values: dict[float, list[tuple[float, float]]]) -> dict[str, dict]:
    """λ -> (val cross-entropy, test accuracy) per seed 1, 2, ..."""
    return {f"l2-{lam:g}-s{i + 1}": entry(lam, i + 1, ce, acc)
            for lam, seeds in values.items() for i, (ce, acc) in enumerate(seeds)}


def test_summarize_structure_and_paired_comparisons():
    runs = entries({0.01: [(0.46, 0.83), (0.47, 0.84), (0.45, 0.82)],
                    0.001: [(0.39, 0.86), (0.41, 0.87), (0.38, 0.86)]})
    runs["l2-0.01-s4"] = entry(0.01, 4, 0.0, 0.0, status=s.DIVERGED)
    out = s.summarize(runs)
    assert set(out) == {"by_lambda", "comparisons", "best"}
    assert list(out["by_lambda"]) == ["0.001", "0.01"]  # ascending λ
    lam = out["by_lambda"]["0.01"]
    assert (lam["n"], lam["seeds"], lam["runs"], lam["diverged"], lam["failed"]) == (3, [1, 2, 3], 4, 1, 0)
    assert lam["diverged_epochs"] == [1] and lam["epochs"] == [3]
    assert set(lam["metrics"]) == set(s.STAT_METRICS)
    assert lam["metrics"]["val_data_loss"]["mean"] == pytest.approx(0.46)
    assert lam["metrics"]["weight_norm"]["mean"] == 3.0 and lam["weight_norm_layers"]["output"]["mean"] == 4.0
    assert lam["per_class_accuracy"]["a"] == pytest.approx(0.83)
    # 0.01 minus 0.001 per seed: 0.07, 0.06, 0.07 -> mean 0.066667, sd 0.0057735, half 0.0143423
    (diff,) = out["comparisons"]["val_data_loss"]
    assert (diff["a"], diff["b"], diff["seeds"], diff["n"]) == ("0.001", "0.01", [1, 2, 3], 3)
    values = lambda d: (d["mean"], d["low"], d["high"])  # noqa: E731
    assert values(diff) == pytest.approx((0.0666667, 0.0523244, 0.0810090), abs=1e-6)
    flipped = s.comparison(out["comparisons"], "val_data_loss", "0.01", "0.001")
    assert values(flipped) == pytest.approx((-0.0666667, -0.0810090, -0.0523244), abs=1e-6)
    best = out["best"]
    assert (best["lambda"], best["by"], best["n"], best["decided"]) == ("0.001", "val_data_loss", 3, True)
    assert best["value"] == pytest.approx(0.3933333) and best["strength"] == 0.001
    assert best["run_name"] == "l2-0.001-s3" and best["indistinguishable"] == []
    assert best["margins"]["0.01"]["mean"] == pytest.approx(0.0666667)


def test_best_is_undecided_when_a_margin_holds_zero_or_there_is_one_seed():
    noisy = s.summarize(entries({0.001: [(0.39, 0.86), (0.41, 0.87), (0.38, 0.86)],
                                 0.01: [(0.37, 0.83), (0.44, 0.84), (0.40, 0.82)]}))["best"]
    assert noisy["lambda"] == "0.001" and not noisy["decided"]
    assert noisy["indistinguishable"] == ["0.01"]
    single = s.summarize(entries({0.001: [(0.39, 0.86)], 0.01: [(0.46, 0.83)]}))
    assert single["best"]["lambda"] == "0.001" and not single["best"]["decided"]
    assert single["best"]["indistinguishable"] == ["0.01"]  # one shared seed: no interval
    assert single["comparisons"]["val_data_loss"][0]["low"] is None
    only = s.summarize(entries({0.001: [(0.39, 0.86), (0.41, 0.87)]}))["best"]
    assert only["decided"] is False and only["margins"] == {} and only["single"] is True
    assert noisy["single"] is False


def test_seeds_pair_only_where_both_finished():
    runs = entries({0.001: [(0.39, 0.86), (0.41, 0.87), (0.38, 0.86)],
                    0.01: [(0.46, 0.83), (0.47, 0.84), (0.45, 0.82)]})
    runs["l2-0.01-s2"].update(status=s.DIVERGED, val_data_loss=None)
    diff = s.comparison(s.summarize(runs)["comparisons"], "val_data_loss", "0.001", "0.01")
    assert diff["seeds"] == [1, 3] and diff["mean"] == pytest.approx(0.07)


def test_val_ce_turn_uses_the_mean_curve_and_the_paired_rise():
    rose = [{"val_ce_per_epoch": c} for c in ([0.5, 0.35, 0.41], [0.52, 0.36, 0.42], [0.49, 0.34, 0.40])]
    turn = s.val_ce_turn(rose)
    assert (turn["min_epoch"], turn["last_epoch"], turn["turned"]) == (1, 2, True)
    assert turn["min"] == pytest.approx(0.35) and turn["rise"]["mean"] == pytest.approx(0.06)
    noise = [{"val_ce_per_epoch": c} for c in ([0.5, 0.35, 0.34], [0.5, 0.34, 0.37], [0.5, 0.35, 0.36])]
    assert s.val_ce_turn(noise)["turned"] is False  # rises -0.01, 0.03, 0.01: holds zero
    assert s.val_ce_turn(rose[:1])["turned"] is None  # one seed: no claim
    assert s.val_ce_turn([{"val_ce_per_epoch": [0.5, 0.4, 0.3]}])["turned"] is False
    assert s.val_ce_turn([{"val_ce_per_epoch": [0.5, None]}]) is None


def test_dvc_metrics_are_means_and_stay_small():
    runs = entries({0.001: [(0.39, 0.86), (0.41, 0.87), (0.38, 0.86)],
                    0.01: [(0.46, 0.83), (0.47, 0.84), (0.45, 0.82)]})
    evaluation = {"sweep": {}, "runs": runs, **s.summarize(runs)}
    metrics = dvc_data.dvc_metrics(evaluation)
    assert metrics == {"best": {"lambda": 0.001, "test_acc": pytest.approx(0.8633333),
                                "val_ce": pytest.approx(0.3933333)},
                       "test_acc": {"0.001": pytest.approx(0.8633333), "0.01": pytest.approx(0.83)}}


def history(strength: float, seed: int, val_loss: list[float], status: str = "FINISHED") -> dict:
    n = len(val_loss)
    return {"strength": strength, "seed": seed, "status": status, "epochs": list(range(n)),
            "diverged_epoch": None if status == "FINISHED" else n - 1,
            "metrics": {"val_loss": val_loss, "accuracy": [0.8] * n, "val_accuracy": [0.7] * n,
                        "weight_norm/hidden": [3.0] * n, "weight_norm/output": [4.0] * n}}


def test_plot_data_has_one_line_per_lambda_the_mean_over_seeds():
    histories = [history(0.001, 1, [0.5, 0.4]), history(0.001, 2, [0.7, 0.6]),
                 history(0.001, 3, [0.9, math.nan], status="FAILED"),  # diverged: left out
                 history(0.01, 1, [1.0, math.nan], status="FAILED")]
    runs = entries({0.001: [(0.39, 0.86), (0.41, 0.87)]})
    files = dvc_data.plot_data({"sweep": {}, "runs": runs}, histories)
    rows = files["epochs.json"]["epochs"]
    assert [(r["lambda"], r["epoch"], r["n"]) for r in rows] == [
        ("0.001", 0, 2), ("0.001", 1, 2), ("0.01", 0, 1), ("0.01", 1, 1)]
    assert rows[0]["val_loss"] == pytest.approx(0.6) and rows[1]["val_loss"] == pytest.approx(0.5)
    assert rows[0]["weight_norm"] == pytest.approx(5.0) and rows[3]["val_loss"] is None
    acc = files["accuracy.json"]["accuracy"][0]
    assert acc["split"] == "train"
    assert (acc["accuracy"], acc["low"], acc["high"]) == pytest.approx((0.8, 0.8, 0.8))
    (lam,) = files["by_lambda.json"]["by_lambda"]
    assert lam["n"] == 2 and lam["test_accuracy"] == pytest.approx(0.865)
    assert lam["val_data_loss"] == pytest.approx(0.40) and lam["weight_norm"] == 5.0


def test_summarize_history_adds_the_starting_loss_and_the_curve():
    h = history(0.001, 1, [0.5, 0.4])
    h["metrics"].update(loss=[0.9, 0.6], val_data_loss=[0.45, math.nan])
    summary = s.summarize_history(h)
    assert summary["initial_loss"] == 0.9 and summary["val_ce_per_epoch"] == [0.45, None]
