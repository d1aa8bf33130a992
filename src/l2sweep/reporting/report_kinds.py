"""The report's sections for a comparison of kinds (:func:`kinds_section`) and for a
cross-validation (:func:`cv_section`), from :func:`l2sweep.reporting.summaries.summarize`'s
``kinds`` and ``refit`` sections.

As in :mod:`l2sweep.reporting.report`, every sentence comes from a rule: a kind is called lower,
higher, better or worse than another only when the 95% interval of their difference, paired by
replicate (seed, fold), excludes zero; otherwise the sentence says the two are within seed noise
at that n, or, with one seed, that no interval exists and nothing is claimed.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from l2sweep.reporting.intervals import comparison, excludes_zero
from l2sweep.reporting.summaries import NEAR_ZERO, format_strength
from l2sweep.reporting.wording import (Stat, fmt_mean, fmt_value, is_are, lam, markdown_table,
                                       with_interval)

Evaluation = Mapping[str, Any]  # an evaluation with summaries.summarize's sections
#: A kind's name inside a sentence.
KIND_NAMES = {"l2": "L2", "l1": "L1", "l1_l2": "L1+L2", "dropout": "dropout",
              "weight_decay": "weight decay", "adamw": "AdamW decay", "none": "none"}
#: The kinds table's columns after kind, best strength and n, and the metric of each.
KIND_TABLE = (("val cross-entropy", "val_data_loss"), ("test acc", "test_accuracy"),
              ("gap (train − val)", "gap"), ("weight norm", "weight_norm"),
              (f"near-zero weights (|w| < {NEAR_ZERO:g})", "near_zero_share"))
NO_INTERVAL = "without an interval the numbers neither show nor refute it"


# --- a comparison of kinds ---------------------------------------------------------------


def _bests(ev: Evaluation) -> dict[str, Mapping[str, Any]]:
    """Each kind with a finished run -> its best configuration (summaries.compare_kinds)."""
    return {kind: best for kind, best in ev["kinds"]["best"].items() if best}


def _stat(ev: Evaluation, kind: str, metric: str) -> Stat:
    """``metric``'s mean and interval of ``kind`` at its best strength."""
    return ev["by_lambda"][ev["kinds"]["best"][kind]["lambda"]]["metrics"][metric]


def _name(ev: Evaluation, kind: str) -> str:
    """``L2 (λ=0.0001)``, ``dropout (λ=0.1)``, ``none``: a kind at its best strength."""
    best = ev["kinds"]["best"][kind]
    name = KIND_NAMES.get(kind, kind)
    return name if kind == "none" else f"{name} (λ={format_strength(best['strength'])})"


def _diff(ev: Evaluation, metric: str, a: str, b: str) -> Optional[Stat]:
    """``b`` minus ``a`` (kinds at their best strengths), paired by replicate."""
    return comparison(ev["kinds"]["comparisons"], metric, a, b)


def _reads(diff: Optional[Stat], above: str, below: str) -> str:
    """How a paired difference reads, as the end of a sentence: ``above`` (its interval above
    zero), ``below``, within seed noise, or no interval."""
    if diff is None or diff["low"] is None:
        return NO_INTERVAL + "."
    side = excludes_zero(diff)
    return (above if side == 1 else below if side == -1 else
            f"within seed noise at n={diff['n']}, so the numbers do not show it") + "."


def kinds_table(ev: Evaluation) -> str:
    """Per kind: its best strength (``not decided`` when its own grid of several does not), n,
    and the means ± half-widths of :data:`KIND_TABLE` at that strength."""
    rows = []
    for kind, best in _bests(ev).items():
        strength = ("–" if kind == "none" else format_strength(best["strength"])
                    + ("" if best["decided"] or best["single"] else " (not decided)"))
        rows.append([KIND_NAMES.get(kind, kind), strength, str(best["n"])]
                    + [fmt_mean(metric, _stat(ev, kind, metric)) for _, metric in KIND_TABLE])
    return markdown_table(["kind", "best strength", "n"] + [c for c, _ in KIND_TABLE], rows)


def lowest_kind_note(ev: Evaluation, metric: str) -> list[str]:
    """Which kind has the lowest mean ``metric`` at its best strength, and against each other
    kind whether that is beyond seed noise (paired) or indistinguishable at this n."""
    kinds = [k for k in _bests(ev) if _stat(ev, k, metric)["mean"] is not None]
    if len(kinds) < 2:
        return []
    top = min(kinds, key=lambda k: _stat(ev, k, metric)["mean"])
    others = [k for k in kinds if k != top]
    what = "validation cross-entropy" if metric == "val_data_loss" else "validation loss"
    text = (f"At their best strengths, {_name(ev, top)} has the lowest mean {what} "
            f"({fmt_mean(metric, _stat(ev, top, metric))}, n={_stat(ev, top, metric)['n']})")
    diffs = {k: _diff(ev, metric, top, k) for k in others}
    part = lambda ks: "; ".join(  # noqa: E731
        f"{KIND_NAMES.get(k, k)} minus {KIND_NAMES.get(top, top)}: "
        f"{with_interval(metric, diffs[k], signed=True)}" for k in ks)
    if all(d is None or d["low"] is None for d in diffs.values()):
        values = ", ".join(f"{fmt_value(metric, _stat(ev, k, metric)['mean'])} for "
                           f"{_name(ev, k)}" for k in others)
        return [text + f" ({values}); with one seed there is no interval, so no kind is "
                "claimed lower than another."]
    clear = [k for k in others if excludes_zero(diffs[k]) == 1]
    close = [k for k in others if k not in clear]
    if clear:
        text += (f"; it is lower beyond seed noise than "
                 f"{', '.join(_name(ev, k) for k in clear)} ({part(clear)})")
    if close:
        names = [_name(ev, k) for k in close]
        text += (f"; {', '.join(names)} {is_are(names)} indistinguishable from it at this n "
                 f"({part(close)})")
    return [text + "."]


def undecided_notes(ev: Evaluation) -> list[str]:
    """A kind whose best strength its own grid does not decide says so (and which λ tie)."""
    notes = []
    for kind, best in ev["kinds"]["best"].items():
        name = KIND_NAMES.get(kind, kind)
        if best is None:
            notes.append(f"No run of {name} finished: it is left out of the comparison.")
        elif not best["single"] and not best["decided"]:
            close = ", ".join(lam(label) for label in best["indistinguishable"])
            why = ("one seed per λ, no interval" if best["n"] < 2 else
                   f"{close} {is_are(best['indistinguishable'])} indistinguishable from it "
                   f"at n={best['n']}")
            notes.append(f"{name}'s best strength is not decided within its own grid: "
                         f"{lam(best['lambda'])} has the lowest mean, but {why}; it is "
                         "compared at that strength.")
    return notes


def claim_notes(ev: Evaluation) -> list[str]:
    """What the seeds claim, and whether the numbers show it: L1 drives weights to zero (its
    near-zero share against L2's, else none's); dropout narrows the gap more than L2."""
    bests, notes = _bests(ev), []
    ref = "l2" if "l2" in bests else "none" if "none" in bests else None
    share = "near_zero_share"
    if "l1" in bests and ref and None not in (_stat(ev, "l1", share)["mean"],
                                              _stat(ev, ref, share)["mean"]):
        diff, other = _diff(ev, share, ref, "l1"), KIND_NAMES[ref]
        notes.append(
            f"The seeds claim that L1 drives weights to zero. Share of the regularized weights "
            f"with |w| < {NEAR_ZERO:g}: {fmt_mean(share, _stat(ev, 'l1', share))} for "
            f"{_name(ev, 'l1')}, {fmt_mean(share, _stat(ev, ref, share))} for {_name(ev, ref)}; "
            f"L1 minus {other}: {with_interval(share, diff, signed=True)}: "
            + _reads(diff, f"L1 has more near-zero weights than {other} beyond seed noise, as "
                     "claimed", f"L1 has fewer near-zero weights than {other} beyond seed "
                     "noise: the numbers contradict the claim"))
    if "dropout" in bests and "l2" in bests:
        diff = _diff(ev, "gap", "l2", "dropout")
        notes.append(
            "The seeds claim that dropout narrows the train/validation gap more than L2. Gap "
            f"(train − val accuracy): {fmt_mean('gap', _stat(ev, 'dropout', 'gap'))} for "
            f"{_name(ev, 'dropout')}, {fmt_mean('gap', _stat(ev, 'l2', 'gap'))} for "
            f"{_name(ev, 'l2')}; dropout minus L2: {with_interval('gap', diff, signed=True)}: "
            + _reads(diff, "dropout's gap is wider beyond seed noise: the numbers contradict "
                     "the claim", "dropout's gap is narrower beyond seed noise, as claimed"))
    return notes


def none_notes(ev: Evaluation, metric: str) -> list[str]:
    """Each kind against no regularization (``none``): lower, higher or within seed noise in
    ``metric`` (paired), and whether any regularizer is better than none beyond noise."""
    bests = _bests(ev)
    kinds = [k for k in bests if k != "none"]
    if "none" not in bests or not kinds:
        return []
    diffs = {k: _diff(ev, metric, "none", k) for k in kinds}
    if all(d is None or d["low"] is None for d in diffs.values()):
        return ["Against none: one seed, no interval, so no regularizer is claimed better or "
                "worse than none."]
    parts = [f"{_name(ev, k)} is " + {-1: "lower beyond seed noise", 1: "higher beyond seed noise",
                                      0: "within seed noise"}[excludes_zero(d)]
             + f" ({KIND_NAMES.get(k, k)} minus none: {with_interval(metric, d, signed=True)})"
             for k, d in diffs.items()]
    better = [_name(ev, k) for k, d in diffs.items() if excludes_zero(d) == -1]
    what = "validation cross-entropy" if metric == "val_data_loss" else "validation loss"
    verdict = (f"{', '.join(better)} {'is' if len(better) == 1 else 'are'} better than no "
               "regularization beyond seed noise" if better else
               "no regularizer is better than none beyond seed noise at this n")
    return [f"Against no regularization, by {what} at each kind's best strength: "
            + "; ".join(parts) + f". So {verdict}."]


def kinds_section(ev: Evaluation) -> list[str]:
    """The section "Kinds compared at their best strength" (none without a ``kinds`` section)."""
    if not ev.get("kinds") or not _bests(ev):
        return []
    metric = (ev.get("best") or {}).get("by", "val_data_loss")
    notes = (lowest_kind_note(ev, metric) + undecided_notes(ev) + claim_notes(ev)
             + none_notes(ev, metric))
    return ["", "## Kinds compared at their best strength", "",
            "Each kind at its own best strength (lowest mean validation cross-entropy in its "
            "grid); differences between kinds are paired by seed. *near-zero weights* is the "
            f"share of the regularized kernels' weights with |w| < {NEAR_ZERO:g} (Adam moves a "
            "weight by about the learning rate per step, so L1 leaves weights hovering within "
            "it rather than at exactly 0).", "", kinds_table(ev), ""] + [f"- {n}" for n in notes]


# --- a cross-validation ------------------------------------------------------------------


def _refit_note(ev: Evaluation) -> str:
    """The refit runs and their test score: the report's only test number."""
    refit, chosen = ev["refit"], (ev.get("best") or {}).get("lambda")
    if not refit["runs"]:
        return "No refit run: no model of this sweep was scored on the test split."
    head = (f"{lam(refit['lambda'])} was retrained on the whole pool once per seed, without "
            f"validation data (runs {', '.join(refit['runs'])})")
    if chosen and refit["lambda"] != chosen:
        head += f"; it is not the strength chosen here ({lam(chosen)})"
    if not refit["n"]:
        return head + "; no refit run finished, so nothing was scored on the test split."
    acc, loss = (refit["metrics"][m] for m in ("test_accuracy", "test_loss"))
    seeds = (f"n={acc['n']} seeds" if acc["n"] > 1 else "one seed: no interval")
    return (head + f", and scored once on the untouched test split: test accuracy "
            f"{fmt_mean('test_accuracy', acc)}, test loss {fmt_mean('test_loss', loss)} "
            f"({seeds}). This is the report's only test score: the fold models are not scored "
            "on the test split.")


def cv_section(ev: Evaluation, choice: Sequence[str]) -> list[str]:
    """The section on k-fold cross-validation: k, the pool, the mean validation cross-entropy
    per strength over folds x seeds, ``choice`` (the report's best-λ sentences), the refit."""
    if "refit" not in ev:
        return []
    sweep = ev.get("sweep") or {}
    k = sweep.get("folds") or ev["refit"]["folds"]
    sizes = sweep.get("split_sizes") or {}
    pool = sweep.get("pool_size") or (sizes["train"] + sizes["val"]
                                      if sizes.get("train") and sizes.get("val") else None)
    seeds = sorted({s for st in ev["by_lambda"].values() for s in st["seeds"] if s is not None})
    per = ", ".join(f"{fmt_mean('val_data_loss', st['metrics']['val_data_loss'])} at {lam(label)} "
                    f"(n={st['n']})" for label, st in ev["by_lambda"].items() if st["n"])
    return (["", "## Cross-validation", "",
            f"- {k}-fold stratified cross-validation of the training pool"
            + (f" ({pool} images: the training and validation splits together)" if pool else "")
            + f", {len(seeds)} seed{'s' if len(seeds) != 1 else ''}: every (λ, seed, fold) run "
            "trains on the pool minus its fold and is validated on that fold.",
            f"- Mean validation cross-entropy over folds × seeds: {per}."]
            + [f"- {c}" for c in choice] + [f"- {_refit_note(ev)}"])
