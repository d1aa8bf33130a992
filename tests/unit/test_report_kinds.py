"""Comparison of kinds and cross-validation: summarize's ``kinds`` and ``refit`` sections and the
report's sentences on synthetic evaluations where each claim is true, false and within seed
noise (l2sweep.reporting.summaries, report, report_kinds; pure functions, no training)."""

from __future__ import annotations

import pytest

from helpers import table_rows
from l2sweep.reporting import report, report_kinds, summaries

#: A comparison sweep: each kind's grid (none has one configuration).
KINDS = {"dropout": (0.1, 0.3), "l1": (1e-05,), "l2": (0.0001, 0.001), "none": (0.0,)}
SEEDS = (1, 2, 3)
#: Every metric the same everywhere unless a test says otherwise: no claim but its own.
DEFAULTS = {"val_data_loss": 0.40, "test_accuracy": 0.85, "gap": 0.02, "weight_norm": 3.0,
            "near_zero_share": 0.01, "initial_loss": 0.6, "penalty_share": 0.1}


def entry(kind: str, strength: float, seed: int, fold=None, refit: bool = False,
          status: str = summaries.FINISHED, **values: float) -> dict:
    """An evaluation entry as evaluate writes it (fold runs carry no test metrics)."""
    v = {**DEFAULTS, **values}
    norm = v.pop("weight_norm")
    e = {"regularizer": kind, "strength": strength, "seed": seed, "fold": fold, "refit": refit,
         "status": status, "diverged_epoch": 2 if status == summaries.DIVERGED else None,
         "epochs": 5, "train_accuracy": 0.9, "val_accuracy": 0.9 - v["gap"],
         "val_loss": v["val_data_loss"] + 0.05, "test_loss": 0.4, "best_epoch": 4,
         "weight_norm": {"hidden": norm, "output": 2.0, "regularized": norm,
                         "total": (norm ** 2 + 4) ** 0.5},
         "val_ce_per_epoch": [0.5, 0.45, v["val_data_loss"]], **v}
    if refit:
        e.update(val_accuracy=None, val_loss=None, val_data_loss=None, gap=None, val_ce_per_epoch=[])
    elif fold is not None:
        e.update(test_accuracy=None, test_loss=None)
    return e


def compare(seeds=SEEDS, **metrics: dict[str, list[float]]) -> dict:
    """A comparison evaluation: every kind's grid x ``seeds``; ``metrics``: name -> label
    (``l2-0.0001``, ``none``) -> value per seed."""
    runs = {}
    for kind, grid in KINDS.items():
        for lam in grid:
            label = summaries.config_label({"regularizer": kind, "strength": lam}, True)
            for i, seed in enumerate(seeds):
                values = {m: by[label][i] for m, by in metrics.items() if label in by}
                runs[f"{label}-s{seed}"] = entry(kind, lam, seed, **values)
    return {"sweep": {"regularizer": "compare", "model": "mlp", "dataset": "fashion_mnist",
                      "test_examples": 10000, "config": {}}, "runs": runs, **summaries.summarize(runs)}


def kind_notes(evaluation: dict, start: str) -> list[str]:
    text = report.render_report(evaluation)
    return [line[2:] for line in text.splitlines() if line.startswith(f"- {start}")]


#: L2 at 0.0001 lowest in val cross-entropy, beyond noise against every other configuration.
CLEAR = {"l2-0.0001": [0.30, 0.31, 0.29], "l2-0.001": [0.35, 0.36, 0.34],
         "dropout-0.1": [0.33, 0.34, 0.32], "dropout-0.3": [0.38, 0.39, 0.37],
         "l1-1e-05": [0.36, 0.37, 0.35], "none": [0.40, 0.41, 0.39]}


def test_summarize_adds_kinds_at_their_best_strengths():
    out = compare(val_data_loss=CLEAR)
    assert set(out) - {"sweep", "runs"} == {"by_lambda", "comparisons", "best", "kinds"}
    assert list(out["by_lambda"]) == ["dropout-0.1", "dropout-0.3", "l1-1e-05", "l2-0.0001",
                                      "l2-0.001", "none"]
    assert out["by_lambda"]["l2-0.0001"]["kind"] == "l2" and out["best"]["lambda"] == "l2-0.0001"
    best = out["kinds"]["best"]
    assert list(best) == ["dropout", "l1", "l2", "none"]
    assert {k: (b["lambda"], b["decided"], b["single"]) for k, b in best.items()} == {
        "dropout": ("dropout-0.1", True, False), "l1": ("l1-1e-05", False, True),
        "l2": ("l2-0.0001", True, False), "none": ("none", False, True)}
    assert best["dropout"]["margins"].keys() == {"dropout-0.3"}  # its own grid only
    assert set(out["kinds"]["comparisons"]) == set(summaries.KIND_METRICS)
    diff = report_kinds.comparison(out["kinds"]["comparisons"], "val_data_loss", "l2", "dropout")
    # dropout-0.1 minus l2-0.0001 per seed: 0.03, 0.03, 0.03
    assert (diff["a"], diff["b"], diff["n"], diff["seeds"], diff["folds"]) == (
        "l2", "dropout", 3, [1, 2, 3], [])
    assert diff["mean"] == pytest.approx(0.03) and diff["low"] == pytest.approx(0.03)


def test_one_kind_sweep_has_no_new_sections():
    runs = {f"l2-{lam:g}-s{s}": entry("l2", lam, s) for lam in (0.001, 0.01) for s in SEEDS}
    out = summaries.summarize(runs)
    assert set(out) == {"by_lambda", "comparisons", "best"} and "cv" not in out["best"]
    assert list(out["by_lambda"]) == ["0.001", "0.01"]
    text = report.render_report({"sweep": {"regularizer": "l2"}, "runs": runs, **out})
    assert "## Kinds compared" not in text and "## Cross-validation" not in text
    assert "| λ | train acc | val acc | val loss | val cross-entropy | test acc |" in text


def test_kinds_table_quotes_each_kind_at_its_best():
    text = report.render_report(compare(val_data_loss=CLEAR))
    assert "# Regularizers compared: report" in text
    assert ("kinds compared, each over its own grid: `dropout` λ 0.1, 0.3 (the dropout rate); "
            "`l1` λ 1e-05; `l2` λ 0.0001, 0.001; `none`.") in text
    section = text.split("## Kinds compared at their best strength")[1].split("## Observations")[0]
    rows = table_rows("## Summary" + section)  # the kinds table
    # sd of 0.30, 0.31, 0.29 is 0.01: half 4.3027 * 0.01 / sqrt(3) = 0.0248
    assert rows["L2"] == ["0.0001", "3", "0.3000 ± 0.0248", "85.00% ± 0.00", "+2.00 pt ± 0.00",
                          "3.000 ± 0.000", "1.0% ± 0.0"]
    assert rows["none"][:2] == ["–", "3"] and rows["dropout"][0] == "0.1"
    assert "| kind | best strength | n | val cross-entropy |" in section
    assert "near-zero weights (|w| < 0.001)" in section
    assert "dropout-0.1" in table_rows(text)  # the summary table: per configuration


def test_lowest_kind_beyond_noise_against_every_other():
    (note,) = kind_notes(compare(val_data_loss=CLEAR), "At their best strengths")
    assert note.startswith("At their best strengths, L2 (λ=0.0001) has the lowest mean validation "
                           "cross-entropy (0.3000 ± 0.0248, n=3); it is lower beyond seed noise "
                           "than dropout (λ=0.1), L1 (λ=1e-05), none (dropout minus L2: +0.0300 "
                           "(95% CI +0.0300 to +0.0300, n=3); L1 minus L2: +0.0600")
    assert "indistinguishable" not in note


def test_lowest_kind_indistinguishable_at_this_n():
    ce = {**CLEAR, "dropout-0.1": [0.29, 0.33, 0.30]}  # minus L2: -0.01, +0.02, +0.01
    (note,) = kind_notes(compare(val_data_loss=ce), "At their best strengths")
    assert note.startswith("At their best strengths, L2 (λ=0.0001) has the lowest mean")
    assert note.endswith("; dropout (λ=0.1) is indistinguishable from it at this n (dropout minus "
                         "L2: +0.0067 (95% CI -0.0313 to +0.0446, n=3)).")
    assert "lower beyond seed noise than L1 (λ=1e-05), none (L1 minus L2" in note


def test_lowest_kind_with_one_seed_claims_nothing():
    ce = {label: values[:1] for label, values in CLEAR.items()}
    (note,) = kind_notes(compare(seeds=(1,), val_data_loss=ce), "At their best strengths")
    assert note == ("At their best strengths, L2 (λ=0.0001) has the lowest mean validation "
                    "cross-entropy (0.3000, n=1) (0.3300 for dropout (λ=0.1), 0.3600 for L1 "
                    "(λ=1e-05), 0.4000 for none); with one seed there is no interval, so no kind "
                    "is claimed lower than another.")
    assert ("L2's best strength is not decided within its own grid: l2 λ=0.0001 has the lowest "
            "mean, but one seed per λ, no interval; it is compared at that strength.") in \
        kind_notes(compare(seeds=(1,), val_data_loss=ce), "L2's best")


def test_a_kind_undecided_within_its_grid_says_so():
    ce = {**CLEAR, "l2-0.001": [0.29, 0.33, 0.30]}
    (note,) = kind_notes(compare(val_data_loss=ce), "L2's best strength")
    assert note == ("L2's best strength is not decided within its own grid: l2 λ=0.0001 has the "
                    "lowest mean, but l2 λ=0.001 is indistinguishable from it at n=3; it is "
                    "compared at that strength.")
    assert compare(val_data_loss=ce)["kinds"]["best"]["l2"]["decided"] is False
    assert not kind_notes(compare(val_data_loss=CLEAR), "L2's best strength")


L1_CLAIM = "The seeds claim that L1 drives weights to zero."


@pytest.mark.parametrize("l1, ending", [
    ([0.40, 0.42, 0.41], "L1 minus L2: +40.0 pt (95% CI +37.5 pt to +42.5 pt, n=3): L1 has more "
                         "near-zero weights than L2 beyond seed noise, as claimed."),
    ([0.001, 0.002, 0.0], "L1 has fewer near-zero weights than L2 beyond seed noise: the "
                          "numbers contradict the claim."),
    ([0.03, 0.0, 0.01], "L1 minus L2: +0.3 pt (95% CI -3.5 pt to +4.1 pt, n=3): within seed "
                        "noise at n=3, so the numbers do not show it."),
])
def test_l1_drives_weights_to_zero_true_false_or_within_noise(l1, ending):
    share = {"l1-1e-05": l1, "l2-0.0001": [0.01, 0.01, 0.01]}
    (note,) = kind_notes(compare(val_data_loss=CLEAR, near_zero_share=share), L1_CLAIM)
    assert note.startswith(f"{L1_CLAIM} Share of the regularized weights with |w| < 0.001: ")
    assert "for L1 (λ=1e-05), 1.0% ± 0.0 for L2 (λ=0.0001)" in note
    assert note.endswith(ending)


def test_l1_claim_with_one_seed_and_against_none_without_l2():
    share = {"l1-1e-05": [0.4], "l2-0.0001": [0.01]}
    ce = {label: values[:1] for label, values in CLEAR.items()}
    (note,) = kind_notes(compare(seeds=(1,), val_data_loss=ce, near_zero_share=share), L1_CLAIM)
    assert note.endswith("L1 minus L2: +39.0 pt (n=1: no interval): without an interval the "
                         "numbers neither show nor refute it.")
    evaluation = compare(val_data_loss=CLEAR)
    for name in [n for n in evaluation["runs"] if n.startswith("l2-")]:
        del evaluation["runs"][name]
    evaluation.update(summaries.summarize(evaluation["runs"]))
    (note,) = kind_notes(evaluation, L1_CLAIM)
    assert "for none; L1 minus none: +0.0 pt" in note


GAP_CLAIM = "The seeds claim that dropout narrows the train/validation gap more than L2."


@pytest.mark.parametrize("dropout, ending", [
    ([0.005, 0.006, 0.004], "dropout's gap is narrower beyond seed noise, as claimed."),
    ([0.04, 0.041, 0.039], "dropout's gap is wider beyond seed noise: the numbers contradict the "
                           "claim."),
    ([0.03, 0.01, 0.02], "within seed noise at n=3, so the numbers do not show it."),
])
def test_dropout_narrows_the_gap_true_false_or_within_noise(dropout, ending):
    gap = {"dropout-0.1": dropout, "l2-0.0001": [0.02, 0.021, 0.019]}
    (note,) = kind_notes(compare(val_data_loss=CLEAR, gap=gap), GAP_CLAIM)
    assert note.startswith(f"{GAP_CLAIM} Gap (train − val accuracy): ")
    assert "for dropout (λ=0.1), +2.00 pt ± 0.25 for L2 (λ=0.0001); dropout minus L2: " in note
    assert note.endswith(ending)


NONE = "Against no regularization"


def test_each_kind_against_none():
    ce = {**CLEAR, "dropout-0.1": [0.41, 0.39, 0.40], "dropout-0.3": [0.42, 0.43, 0.41],
          "l1-1e-05": [0.45, 0.46, 0.44]}
    (note,) = kind_notes(compare(val_data_loss=ce), NONE)
    assert note.startswith("Against no regularization, by validation cross-entropy at each "
                           "kind's best strength: dropout (λ=0.1) is within seed noise (dropout "
                           "minus none: +0.0000 (95% CI")
    assert ("; L1 (λ=1e-05) is higher beyond seed noise (L1 minus none: +0.0500 (95% CI +0.0500 "
            "to +0.0500, n=3)); L2 (λ=0.0001) is lower beyond seed noise (L2 minus none: -0.1000 "
            "(95% CI -0.1000 to -0.1000, n=3)). So L2 (λ=0.0001) is better than no "
            "regularization beyond seed noise.") in note
    worse = {label: [0.5, 0.51, 0.49] if label != "none" else [0.40, 0.41, 0.39] for label in CLEAR}
    worse.update({"dropout-0.1": [0.41, 0.39, 0.40], "dropout-0.3": [0.42, 0.43, 0.41]})
    (note,) = kind_notes(compare(val_data_loss=worse), NONE)
    assert note.endswith("So no regularizer is better than none beyond seed noise at this n.")


def test_per_kind_trends_follow_each_kinds_own_grid():
    norm = {"l2-0.0001": [6.0, 6.1, 5.9], "l2-0.001": [3.0, 3.1, 2.9]}
    text = report.render_report(compare(val_data_loss=CLEAR, weight_norm=norm))
    assert ("- Within L2's grid, the final norm of the regularized weights shrinks with λ at every "
            "step, each beyond seed noise (6.000 ± 0.248 at l2 λ=0.0001, 3.000 ± 0.248 at l2 "
            "λ=0.001)") in text
    assert "- Within dropout's grid, the final norm of the regularized weights does not shrink" in text
    assert "Within L1's grid" not in text and "Within none's grid" not in text  # one λ: no trend
    assert "from dropout λ=0.3 to l1" not in text  # no trend across kinds


# --- cross-validation --------------------------------------------------------------------

FOLDS = (0, 1, 2)


def cv(val_ce: dict[float, list[float]], refit_acc=(0.87, 0.88, 0.86), seeds=(1, 2),
       refit_strength=None, refit_status=summaries.FINISHED) -> dict:
    """A CV evaluation: λ -> val CE per (seed, fold) (seed-major), then the refit of the
    lowest-mean λ (or ``refit_strength``) once per seed of ``refit_acc``'s length."""
    runs = {}
    for lam, values in val_ce.items():
        for i, (seed, fold) in enumerate((s, f) for s in seeds for f in FOLDS):
            runs[f"l2-{lam:g}-s{seed}-f{fold}"] = entry("l2", lam, seed, fold,
                                                        val_data_loss=values[i])
    chosen = refit_strength or min(val_ce, key=lambda lam: sum(val_ce[lam]))
    for seed, acc in zip(seeds + (9,) * len(refit_acc), refit_acc):
        runs[f"l2-{chosen:g}-refit-s{seed}"] = entry("l2", chosen, seed, refit=True,
                                                     test_accuracy=acc, status=refit_status)
    return {"sweep": {"regularizer": "l2", "model": "mlp", "dataset": "fashion_mnist",
                      "folds": 3, "split_sizes": {"train": 800, "val": 200}, "test_examples": 500,
                      "config": {}}, "runs": runs, **summaries.summarize(runs)}


#: Fold effects (fold 2 is hard) shared by every λ: they cancel when paired by (seed, fold).
FOLD_LEVEL = [0.30, 0.35, 0.50, 0.31, 0.36, 0.51]
CHOSEN = {0.001: FOLD_LEVEL, 0.01: [v + 0.02 for v in FOLD_LEVEL]}


def test_cv_statistics_pair_by_seed_and_fold_and_name_the_refit():
    out = cv(CHOSEN, refit_acc=(0.87, 0.88))
    lam = out["by_lambda"]["0.001"]
    assert (lam["n"], lam["seeds"], lam["folds"]) == (6, [1, 1, 1, 2, 2, 2], [0, 1, 2])
    assert lam["metrics"]["test_accuracy"]["n"] == 0  # folds are not scored on test
    diff = summaries.comparison(out["comparisons"], "val_data_loss", "0.001", "0.01")
    assert (diff["n"], diff["seeds"], diff["folds"]) == (6, [1, 2], [0, 1, 2])
    assert diff["low"] == pytest.approx(0.02) and diff["high"] == pytest.approx(0.02)
    best = out["best"]
    assert (best["lambda"], best["decided"], best["cv"]) == ("0.001", True, True)
    assert best["run_name"] == "l2-0.001-refit-s1"  # the champion: the refit, its first seed
    refit = out["refit"]
    assert refit["runs"] == ["l2-0.001-refit-s1", "l2-0.001-refit-s2"]
    assert (refit["lambda"], refit["strength"], refit["n"], refit["folds"]) == ("0.001", 0.001, 2, 3)
    acc = refit["metrics"]["test_accuracy"]
    # 0.87, 0.88: sd 0.0070711, half 12.7062 * 0.0070711 / sqrt(2) = 0.0635
    assert acc["mean"] == pytest.approx(0.875) and acc["half"] == pytest.approx(0.0635, abs=1e-4)


def test_cv_report_has_one_test_number_the_refits():
    text = report.render_report(cv(CHOSEN))
    assert ("800 training and 200 validation images (pooled for 3-fold cross-validation); 500 "
            "test images, untouched") in text
    header = text.split("## Summary")[1].split("\n")[2]
    assert "test" not in header and "val cross-entropy" in header
    section = text.split("## Cross-validation")[1].split("## Observations")[0]
    assert ("- 3-fold stratified cross-validation of the training pool (1000 images: the "
            "training and validation splits together), 2 seeds: every (λ, seed, fold) run trains "
            "on the pool minus its fold and is validated on that fold.") in section
    assert "- Mean validation cross-entropy over folds × seeds: 0.3883 ± " in section
    assert "at λ=0.001 (n=6), 0.4083 ± " in section
    assert "- λ=0.001 generalises best by validation cross-entropy: mean 0.3883" in section
    assert ("- λ=0.001 was retrained on the whole pool once per seed, without validation data "
            "(runs l2-0.001-refit-s1, l2-0.001-refit-s2, l2-0.001-refit-s9), and scored once on "
            "the untouched test split: test accuracy 87.00% ± 2.48, test loss 0.4000 ± 0.0000 "
            "(n=3 seeds). This is the report's only test score") in section
    observations = text.split("## Observations")[1]
    assert "test accuracy" not in observations and "generalises best" not in observations
    assert "- 6 finished (seed, fold) runs per λ (2 seeds × 3 folds): values are means" in text


def test_cv_choice_undecided_and_a_refit_of_one_seed():
    noisy = {0.001: FOLD_LEVEL, 0.01: [v + d for v, d in zip(FOLD_LEVEL, (0.03, -0.02, 0.01,
                                                                          -0.01, 0.02, -0.005))]}
    out = cv(noisy, refit_acc=(0.87,))
    assert out["best"]["decided"] is False and out["best"]["run_name"] == "l2-0.001-refit-s1"
    section = report.render_report(out).split("## Cross-validation")[1]
    assert ("- No λ is decided best by validation cross-entropy at n=6: λ=0.001 has the lowest "
            "mean") in section
    assert "λ=0.01 is indistinguishable from it" in section
    assert ("test accuracy 87.00%, test loss 0.4000 (one seed: no interval). This is the "
            "report's only test score") in section


def test_cv_refit_failed_or_of_another_strength():
    out = cv(CHOSEN, refit_status=summaries.DIVERGED)
    assert out["refit"]["n"] == 0 and out["refit"]["diverged"] == 3
    assert out["best"]["run_name"] == "l2-0.001-s1-f0"  # no refit finished: the best fold run
    text = report.render_report(out)
    assert "no refit run finished, so nothing was scored on the test split." in text
    assert "seed 9" not in text.split("## Observations")[1]  # refits: the CV section's
    other = cv(CHOSEN, refit_strength=0.01)
    assert other["best"]["run_name"] == "l2-0.001-s1-f0"
    assert "; it is not the strength chosen here (λ=0.001)" in report.render_report(other)
    folds_only = {n: e for n, e in other["runs"].items() if not e["refit"]}
    out = summaries.summarize(folds_only)  # the train job choosing, before any refit
    assert out["best"]["cv"] and out["refit"]["runs"] == [] and out["refit"]["run_name"] is None


def test_cv_status_notes_name_seed_and_fold():
    evaluation = cv(CHOSEN)
    evaluation["runs"]["l2-0.01-s2-f1"].update(status=summaries.DIVERGED, diverged_epoch=2)
    evaluation.update(summaries.summarize(evaluation["runs"]))
    assert ("λ=0.01 seed 2 fold 1 diverged at epoch 2; it is left out of the means and "
            "comparisons below.") in report.observations(evaluation)
