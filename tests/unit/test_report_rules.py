"""The report's rules on synthetic sweeps of several seeds: each claim true, false and within
seed noise, and the wording of each (l2sweep.reporting.report; pure functions, no training)."""

from __future__ import annotations

import pytest

from helpers import table_rows
from l2sweep.reporting import report, summaries

GRID = (0.0001, 0.001, 0.01)
SEEDS = (1, 2, 3)
#: Every metric the same at every λ and seed unless a test says otherwise: no claim but its own.
DEFAULTS = {"initial_loss": 0.6, "weight_norm": 3.0, "gap": 0.01, "val_data_loss": 0.4,
            "test_accuracy": 0.85, "penalty_share": 0.2}


def sweep(**metrics: dict[float, list[float]]) -> dict:
    """An evaluation: three seeds per λ of GRID; ``metrics``: name -> λ -> value per seed."""
    runs = {}
    for lam in GRID:
        for i, seed in enumerate(SEEDS):
            value = {name: (metrics[name][lam][i] if name in metrics and lam in metrics[name]
                            else default) for name, default in DEFAULTS.items()}
            curve = (metrics["val_ce_per_epoch"][lam][i] if "val_ce_per_epoch" in metrics
                     and lam in metrics["val_ce_per_epoch"] else [0.5, 0.45, 0.42, 0.41, 0.40])
            norm = value.pop("weight_norm")
            runs[f"l2-{lam:g}-s{seed}"] = {
                "strength": lam, "seed": seed, "status": summaries.FINISHED, "diverged_epoch": None,
                "epochs": 5, "train_accuracy": 0.9, "val_accuracy": 0.9 - value["gap"],
                "val_loss": value["val_data_loss"] + 0.05, "test_loss": 0.4, "best_epoch": 4,
                "weight_norm": {"hidden": norm, "output": 2.0, "regularized": norm,
                                "total": (norm ** 2 + 4) ** 0.5},
                "val_ce_per_epoch": curve, **value}
    return {"sweep": {"regularizer": "l2", "model": "mlp", "dataset": "fashion_mnist",
                      "test_examples": 10000, "config": {}},
            "runs": runs, **summaries.summarize(runs)}


def notes(evaluation: dict, start: str) -> list[str]:
    return [n for n in report.observations(evaluation) if n.startswith(start)]


RISING = {0.0001: [0.54, 0.55, 0.53], 0.001: [0.66, 0.68, 0.65], 0.01: [0.89, 0.90, 0.88]}
STARTING = "The starting loss (epoch 0's training loss, penalty included)"


def test_starting_loss_rises_with_lambda():
    (note,) = notes(sweep(initial_loss=RISING), STARTING)
    # 0.001 minus 0.0001 per seed: 0.12, 0.13, 0.12 -> mean 0.12333, sd 0.0057735,
    # half 4.3027 * 0.0057735 / sqrt(3) = 0.014342
    assert note == (f"{STARTING} rises with λ at every step, each beyond seed noise (0.5400 ± "
                    "0.0248 at λ=0.0001, 0.6633 ± 0.0379 at λ=0.001, 0.8900 ± 0.0248 at λ=0.01); "
                    "paired differences λ=0.0001 to λ=0.001: +0.1233 (95% CI +0.1090 to +0.1377, "
                    "n=3); λ=0.001 to λ=0.01: +0.2267 (95% CI +0.2123 to +0.2410, n=3).")


def test_starting_loss_falling_is_no_rise():
    falling = {lam: RISING[other] for lam, other in zip(GRID, GRID[::-1])}
    (note,) = notes(sweep(initial_loss=falling), STARTING)
    assert note.startswith(f"{STARTING} does not rise at every step beyond seed noise (")
    assert "it falls from λ=0.0001 to λ=0.001 (-0.2267 (95% CI -0.2410 to -0.2123, n=3))" in note
    assert "it falls from λ=0.001 to λ=0.01" in note and "rises" not in note


def test_starting_loss_within_noise_names_the_step():
    noisy = {**RISING, 0.001: [0.60, 0.50, 0.55]}  # paired: +0.06, -0.05, +0.02
    (note,) = notes(sweep(initial_loss=noisy), STARTING)
    assert note.startswith(f"{STARTING} does not rise at every step beyond seed noise")
    # paired: mean 0.01, sd 0.055678, half 4.3027 * 0.055678 / sqrt(3) = 0.13831
    assert ("from λ=0.0001 to λ=0.001 the change (+0.0100 (95% CI -0.1283 to +0.1483, n=3)) is "
            "within seed noise; it rises from λ=0.001 to λ=0.01") in note


NORM = "The final norm of the regularized weights"


def test_weights_shrink_grow_or_stay_within_noise():
    shrinking = {0.0001: [9.0, 9.2, 8.9], 0.001: [6.0, 6.1, 5.9], 0.01: [3.0, 3.1, 2.9]}
    (note,) = notes(sweep(weight_norm=shrinking), NORM)
    assert note.startswith(f"{NORM} shrinks with λ at every step, each beyond seed noise (9.033 ± ")
    # paired: -3.0, -3.1, -3.0 -> mean -3.0333, sd 0.057735, half 0.14342
    assert "λ=0.0001 to λ=0.001: -3.033 (95% CI -3.177 to -2.890, n=3)" in note
    growing = {lam: shrinking[other] for lam, other in zip(GRID, GRID[::-1])}
    (note,) = notes(sweep(weight_norm=growing), NORM)
    assert note.startswith(f"{NORM} does not shrink at every step beyond seed noise")
    assert "it grows from λ=0.0001 to λ=0.001" in note and "it grows from λ=0.001 to λ=0.01" in note
    (note,) = notes(sweep(), NORM)  # the same norm everywhere
    assert "from λ=0.0001 to λ=0.001 the change (+0.000 (95% CI +0.000 to +0.000, n=3)) is " \
           "within seed noise" in note


GAP = "The generalization gap (final train minus validation accuracy)"


def test_gap_narrows_and_its_side_is_claimed_only_beyond_noise():
    narrowing = {0.0001: [0.031, 0.033, 0.029], 0.001: [0.015, 0.016, 0.014],
                 0.01: [0.002, -0.004, 0.003]}
    notes_ = report.observations(sweep(gap=narrowing))
    (note,) = [n for n in notes_ if n.startswith(GAP)]
    assert note.startswith(f"{GAP} narrows with λ at every step, each beyond seed noise "
                           "(+3.10 pt ± 0.50 at λ=0.0001")
    assert ("Training accuracy is above validation accuracy beyond seed noise at λ=0.0001, "
            "λ=0.001. The gap is within seed noise of zero at λ=0.01.") in notes_
    widening = {lam: narrowing[other] for lam, other in zip(GRID, GRID[::-1])}
    widening[0.0001] = [-0.02, -0.021, -0.019]
    notes_ = report.observations(sweep(gap=widening))
    (note,) = [n for n in notes_ if n.startswith(GAP)]
    assert note.startswith(f"{GAP} does not narrow at every step beyond seed noise")
    assert "it widens from λ=0.0001 to λ=0.001" in note
    assert ("Training accuracy is above validation accuracy beyond seed noise at λ=0.001, λ=0.01. "
            "Validation accuracy is above training accuracy beyond seed noise at λ=0.0001.") in notes_


def test_best_lambda_decided():
    ce = {0.0001: [0.35, 0.36, 0.34], 0.001: [0.39, 0.40, 0.38], 0.01: [0.46, 0.47, 0.45]}
    (note,) = notes(sweep(val_data_loss=ce), "λ=0.0001 generalises best")
    # sd of 0.35, 0.36, 0.34 is 0.01: half 4.3027 * 0.01 / sqrt(3) = 0.0248
    assert note.startswith("λ=0.0001 generalises best by validation cross-entropy: mean 0.3500 ± "
                           "0.0248 (n=3); its paired margin to every other λ excludes zero: "
                           "λ=0.001 minus λ=0.0001: +0.0400 (95% CI +0.0400 to +0.0400, n=3); "
                           "λ=0.01 minus λ=0.0001: +0.1100")


def test_best_lambda_indistinguishable():
    ce = {0.0001: [0.35, 0.36, 0.34], 0.001: [0.34, 0.40, 0.36], 0.01: [0.46, 0.47, 0.45]}
    (note,) = notes(sweep(val_data_loss=ce), "No λ is decided best")
    # margins 0.001 - 0.0001: -0.01, +0.04, +0.02 -> mean 0.016667, sd 0.025166, half 0.062517
    assert note == ("No λ is decided best by validation cross-entropy at n=3: λ=0.0001 has the "
                    "lowest mean (0.3500 ± 0.0248), but λ=0.001 is indistinguishable from it "
                    "(paired margin λ=0.001 minus λ=0.0001: +0.0167 (95% CI -0.0459 to +0.0792, "
                    "n=3)); λ=0.01 is worse beyond seed noise (λ=0.01 minus λ=0.0001: +0.1100 "
                    "(95% CI +0.1100 to +0.1100, n=3)).")
    assert not any("generalises best by" in n for n in report.observations(sweep(val_data_loss=ce)))


def test_one_configuration_has_no_best_lambda():
    """regularizer=none (one configuration, three seeds): nothing is chosen or ranked."""
    runs = {name.replace("l2-0.0001", "none"): {**run, "strength": 0.0}
            for name, run in sweep()["runs"].items() if run["strength"] == 0.0001}
    evaluation = {"sweep": {**sweep()["sweep"], "regularizer": "none"}, "runs": runs,
                  **summaries.summarize(runs)}
    assert evaluation["best"]["single"] and evaluation["best"]["run_name"].startswith("none-s")
    text = report.observations(evaluation)
    assert ("The sweep has one configuration (none): there is no λ to choose; its mean validation "
            "cross-entropy is 0.4000") in text[0]
    assert not any(word in n for n in text for word in ("generalises best", "highest", "decided"))


def test_test_accuracy_ahead_or_within_noise():
    ahead = {0.0001: [0.87, 0.875, 0.872], 0.001: [0.86, 0.865, 0.861], 0.01: [0.83, 0.835, 0.832]}
    (note,) = notes(sweep(test_accuracy=ahead), "The highest mean test accuracy")
    # mean 0.872333, sd 0.0025166, half 4.3027 * 0.0025166 / sqrt(3) = 0.0062517
    assert note.startswith("The highest mean test accuracy is 87.23% ± 0.63, at λ=0.0001 (n=3); it "
                           "is above every other λ beyond seed noise (paired difference "
                           "λ=0.0001 minus λ=0.001: +1.03 pt (95% CI +0.89 pt to +1.18 pt, n=3)")
    close = {**ahead, 0.001: [0.871, 0.868, 0.874]}
    (note,) = notes(sweep(test_accuracy=close), "The highest mean test accuracy")
    assert ("; λ=0.001 is within seed noise of it (paired difference λ=0.0001 minus λ=0.001: "
            "+0.13 pt (95% CI") in note
    assert "above every other" not in note


def test_val_cross_entropy_turns_up_only_beyond_its_noise():
    rose = [[0.5, 0.4, 0.35, 0.38, 0.41], [0.52, 0.41, 0.36, 0.39, 0.42], [0.49, 0.40, 0.34, 0.37, 0.40]]
    wobble = [[0.5, 0.4, 0.35, 0.36, 0.34], [0.5, 0.4, 0.35, 0.34, 0.37], [0.5, 0.4, 0.36, 0.35, 0.36]]
    text = "\n".join(report.observations(sweep(val_ce_per_epoch={0.0001: rose, 0.001: wobble})))
    assert ("λ=0.0001: validation cross-entropy turns up beyond its noise: its mean is lowest at "
            "epoch 2 (0.3500) and rises by +0.0600 (95% CI +0.0600 to +0.0600, n=3) by epoch 4.") in text
    # mean curve lowest at epoch 3 (0.3500); rises -0.02, +0.03, +0.01 hold zero
    assert ("λ=0.001: the mean validation cross-entropy is lowest at epoch 3 (0.3500), but its "
            "rise by epoch 4 (+0.0067 (95% CI") in text
    assert "is within seed noise: no turn is claimed." in text
    assert ("λ=0.01: the mean validation cross-entropy is lowest at the last epoch (4); it does not "
            "turn up within 5 epochs.") in text


def test_penalty_share_sides():
    shares = {0.0001: [0.1, 0.11, 0.12], 0.001: [0.45, 0.55, 0.5], 0.01: [0.6, 0.62, 0.61]}
    (note,) = notes(sweep(penalty_share=shares), "Share of the penalty")
    assert "11.0% ± 2.5 at λ=0.0001" in note
    assert note.endswith("The penalty dominates the loss (more than half, beyond seed noise) at "
                         "λ=0.01. The penalty is less than half of the loss, beyond seed noise, at "
                         "λ=0.0001. The share is within seed noise of half at λ=0.001.")


def test_a_diverged_seed_is_named_and_left_out():
    evaluation = sweep(initial_loss=RISING)
    evaluation["runs"]["l2-0.01-s2"].update(status=summaries.DIVERGED, diverged_epoch=3,
                                            test_accuracy=None)
    evaluation.update(summaries.summarize(evaluation["runs"]))
    text = report.render_report(evaluation)
    assert "- λ=0.01 seed 2 diverged at epoch 3; it is left out of the means and comparisons below." in text
    rows = table_rows(text)
    assert rows["0.01"][-1] == "2" and rows["0.001"][-1] == "3"
    assert rows["0.0001"][report.TABLE_COLUMNS.index("starting loss") - 1] == "0.5400 ± 0.0248"
    assert "- 2 to 3 finished seeds per λ (seeds 1, 2, 3): values are means over seeds ± the " \
           "half-width of their 95% t-interval" in text
    # seeds 1 and 3: 0.89, 0.88 -> sd 0.0070711, half 12.7062 * 0.0070711 / sqrt(2) = 0.0635
    assert rows["0.01"][report.TABLE_COLUMNS.index("starting loss") - 1] == "0.8850 ± 0.0635"


def test_one_seed_makes_no_claim_and_quotes_no_interval():
    one = sweep(initial_loss=RISING)
    runs = {k: v for k, v in one["runs"].items() if v["seed"] == 1}
    evaluation = {**one, "runs": runs, **summaries.summarize(runs)}
    text = report.render_report(evaluation)
    assert "- One seed per λ (seed 1): no interval can be computed" in text
    assert (f"{STARTING} by λ: 0.5400 at λ=0.0001, 0.6600 at λ=0.001, 0.8900 at λ=0.01 (one seed "
            "per λ: no interval, so no claim is made about its trend with λ).") in text
    assert not any("±" in cell for cells in table_rows(text).values() for cell in cells)
    assert "95% CI" not in text
    assert "which λ generalises best is not decided" in text


@pytest.mark.parametrize("n", [1, 3])
def test_figures_render_means_with_bands(n, tmp_path):
    from l2sweep.reporting import plots

    evaluation = sweep()
    lams = [s["strength"] for s in evaluation["by_lambda"].values()]
    stat = [s["metrics"]["weight_norm"] for s in evaluation["by_lambda"].values()]
    histories = [{"strength": lam, "seed": seed, "status": "FINISHED", "epochs": [0, 1, 2],
                  "metrics": {"val_loss": [0.5, 0.4 + 0.01 * seed, 0.45], "accuracy": [0.7, 0.8, 0.9],
                              "val_accuracy": [0.7, 0.75, 0.8], "val_data_loss": [0.4, 0.3, 0.35]}}
                 for lam in GRID for seed in SEEDS[:n]]
    figs = [plots.plot_val_loss_by_lambda(histories), plots.plot_accuracy_by_lambda(histories),
            plots.plot_vs_lambda(lams, {"norm": [s["mean"] for s in stat]}, "norm", "t",
                                 intervals={"norm": [(s["low"], s["high"]) for s in stat]})]
    for i, fig in enumerate(figs):
        assert plots.save_figure(fig, tmp_path / f"{i}.png").stat().st_size > 5_000
