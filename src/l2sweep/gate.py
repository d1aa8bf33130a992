"""The regression gate: compares the evaluation (``reports/evaluation.json``, written by
``evaluate``) with a baseline, configuration by configuration (λ, or ``<kind>-<λ>`` in a
comparison of kinds: :func:`l2sweep.reporting.summaries.config_label`): the means over each
one's finished seeds, with the 95% interval of the current mean beside each change (an
evaluation from before replicates reads as one seed per λ). In a cross-validation the folds have
no test scores: each strength's mean validation cross-entropy over its folds is compared (it may
rise as much as the test loss), and the refit (label ``refit``) on its test metrics.

Run it after ``dvc repro`` (or ``python -m l2sweep.evaluate``)::

    python -m l2sweep.gate                              # baseline: gate.baseline
    python -m l2sweep.gate --baseline other.json        # any evaluation.json-shaped file
    python -m l2sweep.gate --rev main                   # reports/evaluation.json as committed at main
    python -m l2sweep.gate --rev cream-tuba --json      # ... in a DVC experiment; JSON verdict
    python -m l2sweep.gate gate.max_accuracy_drop=0.01  # Hydra overrides (tolerances, paths)

Test accuracy may drop by ``gate.max_accuracy_drop`` (absolute), test loss rise by
``gate.max_loss_increase`` (relative), both in the mean over seeds; a baseline configuration now
missing, newly diverged, or with more diverged or failed seeds than in the baseline fails.
Prints a Markdown table, or with ``--json`` one JSON object (``passed``, ``checks``, ``error``).
Exit status: 0 passed; 1 a regression, a missing or diverged λ; 2 unreadable metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from l2sweep.base.cli import entry_point
from l2sweep.reporting.report import markdown_table
from l2sweep.reporting.summaries import (DIVERGED, EVALUATION_FILE, FAILED, FINISHED, finite,
                                         fmt_loss, fmt_pct, format_strength, summarize,
                                         summarize_lambda)

EXIT_OK, EXIT_REGRESSED, EXIT_ERROR = 0, 1, 2
#: Changes within this of the limit count as equal to it (float noise, not a regression).
EPS = 1e-12
#: Printed before the table when the two files' ``sweep.config`` (settings of the run) differ.
CONFIG_NOTE = "baseline and current were produced with different settings"
#: The label of a cross-validation's refit (its strength may differ between the two files).
REFIT = "refit"


class GateError(Exception):
    """The gate cannot compare: a metrics file is missing or unreadable."""


@dataclass(frozen=True)
class Tolerance:
    """How much one evaluation metric may worsen for any λ: absolute, or ``relative`` to the baseline."""

    metric: str
    higher_is_better: bool
    max_change: float
    relative: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.max_change, (int, float)) and math.isfinite(self.max_change)
                and self.max_change >= 0):
            raise ValueError(f"tolerance of {self.metric}: max_change={self.max_change!r} is not "
                             "allowed: a finite number >= 0")

    def limit_text(self) -> str:
        """The limit as the table shows it: ``-0.50 pt`` or ``+5.0%``."""
        sign = "-" if self.higher_is_better else "+"
        if self.relative:
            return f"{sign}{100 * self.max_change:.1f}%"
        if "accuracy" in self.metric:
            return f"{sign}{100 * self.max_change:.2f} pt"
        return f"{sign}{self.max_change:g}"


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check: one configuration (``label``, its ``strength``) and metric
    (``baseline`` and ``current``: means over seeds; ``interval``: the current mean's 95% interval
    and n), or (``metric`` ``-``) one configuration as a whole; ``status``: ``ok``,
    ``regressed``, ``missing``, ``diverged``, ``failed``, ``new`` or ``skipped``."""

    strength: float
    metric: str
    baseline: Optional[float]
    current: Optional[float]
    change: str
    status: str
    passed: bool
    note: str = ""
    interval: str = ""
    label: str = ""


def tolerances_from_config(gate_cfg: Any) -> list[Tolerance]:
    """The tolerances of ``cfg.gate``: test accuracy (absolute drop), test loss (relative rise)."""
    return [
        Tolerance("test_accuracy", higher_is_better=True,
                  max_change=float(gate_cfg.max_accuracy_drop)),
        Tolerance("test_loss", higher_is_better=False,
                  max_change=float(gate_cfg.max_loss_increase), relative=True),
    ]


def _by_label(evaluation: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per configuration label its statistics over seeds (and folds)
    (:func:`l2sweep.reporting.summaries.summarize`'s ``by_lambda``), always recomputed from
    ``runs``: the same numbers evaluate stored, one code path for files written before
    replicates (each run one seed), and the runs are the record. A cross-validation's refits
    are :data:`REFIT`'s, apart from the folds of their strength."""
    runs = evaluation.get("runs", {})
    labels = summarize(runs)["by_lambda"]  # the refits apart
    refits = sorted((name, e) for name, e in runs.items() if e.get("refit"))
    if refits:
        labels[REFIT] = summarize_lambda(refits)
    return labels


def _cross_validated(evaluation: Mapping[str, Any]) -> bool:
    return any(e.get("fold") is not None for e in evaluation.get("runs", {}).values())


def _order(labels: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple]:
    """Sort keys of labels: a comparison's kinds grouped, then by strength; the refit last."""
    return {label: (label == REFIT, label.rsplit("-", 1)[0] if label[0].isalpha() else "",
                    s["strength"]) for label, s in labels.items()}


def _status(stats: Mapping[str, Any]) -> str:
    """A λ's status: finished when a seed finished, else diverged when one diverged, else failed."""
    return FINISHED if stats["n"] else DIVERGED if stats["diverged"] else FAILED


def interval_text(metric: str, stat: Mapping[str, Any]) -> str:
    """A mean's 95% interval as the table shows it: ``95% CI 85.10% to 86.20%, n=3``."""
    if stat["low"] is None:
        return f"n={stat['n']}: no interval"
    return (f"95% CI {_fmt_value(metric, stat['low'])} to {_fmt_value(metric, stat['high'])}, "
            f"n={stat['n']}")


def _fmt_value(metric: str, value: Optional[float]) -> str:
    return fmt_pct(value) if "accuracy" in metric else fmt_loss(value)


def check(tolerance: Tolerance, strength: float, baseline: Optional[float],
          current: Optional[float]) -> Verdict:
    """Compares one metric of one λ against its tolerance."""
    metric = tolerance.metric
    if baseline is None:
        return Verdict(strength, metric, None, current, "-", "new", True,
                       "no baseline value to compare with")
    if current is None:
        return Verdict(strength, metric, baseline, None, "-", "missing", False,
                       f"{metric} is missing from the current metrics")
    worse = baseline - current if tolerance.higher_is_better else current - baseline
    if tolerance.relative:
        scale = abs(baseline)
        worsening = worse / scale if scale > 0 else (math.inf if worse > 0 else 0.0)
        rel = (current - baseline) / scale if scale > 0 else 0.0
        change = f"{100 * rel:+.1f}%"
    else:
        worsening = worse
        change = (f"{100 * (current - baseline):+.2f} pt" if "accuracy" in metric
                  else f"{current - baseline:+.4f}")
    if worsening > tolerance.max_change + EPS:
        return Verdict(strength, metric, baseline, current, change, "regressed", False,
                       f"beyond the limit {tolerance.limit_text()}")
    return Verdict(strength, metric, baseline, current, change, "ok", True,
                   f"limit {tolerance.limit_text()}")


def gate(current: Mapping[str, Any], baseline: Mapping[str, Any],
         tolerances: Sequence[Tolerance]) -> list[Verdict]:
    """Compares two evaluations: one verdict per configuration and metric on the means over
    seeds (per configuration if not comparable; one more per configuration with more diverged or
    failed seeds than the baseline). A cross-validation's folds are compared on their validation
    cross-entropy (the tolerance of ``test_loss``), its refit on every tolerance."""
    cur, base = _by_label(current), _by_label(baseline)
    order = {**_order(base), **_order(cur)}
    folds = [replace(t, metric="val_data_loss") for t in tolerances if t.metric == "test_loss"]
    verdicts: list[Verdict] = []
    for label in sorted(order, key=order.__getitem__):
        c, b = cur.get(label), base.get(label)
        cv = label != REFIT and (_cross_validated(current) or _cross_validated(baseline))
        verdicts += _label_verdicts(label, c, b, folds if cv else tolerances, list(cur))
    return verdicts


def _name(label: str, stats: Mapping[str, Any]) -> str:
    """How a note names a configuration: ``λ=0.01``, ``l2-0.01``, ``refit (λ=0.01)``."""
    if label == REFIT:
        return f"refit (λ={format_strength(stats['strength'])})"
    return label if label[0].isalpha() else f"λ={label}"


def _label_verdicts(label: str, c: Optional[Mapping[str, Any]], b: Optional[Mapping[str, Any]],
                    tolerances: Sequence[Tolerance], have: Sequence[str]) -> list[Verdict]:
    """:func:`gate`'s verdicts of one configuration (``c`` current, ``b`` baseline statistics)."""
    strength = (c or b)["strength"]
    lam, whole = _name(label, c or b), dict(label=label, metric="-", baseline=None, current=None,
                                             change="-")
    if c is None:
        return [Verdict(strength, status="missing", passed=False, **whole,
                        note=f"{lam} is in the baseline but not in the current metrics (they "
                             f"have {'λ: ' if all(not h[0].isalpha() for h in have) else ''}"
                             f"{', '.join(have) or 'none'})")]
    if b is None:
        return [Verdict(strength, status="new", passed=True, note=f"{lam} has no baseline",
                        **whole)]
    if not b["n"]:
        return [Verdict(strength, status="skipped", passed=True, **whole,
                        note=f"{lam} did not finish in the baseline (status {_status(b)})")]
    if not c["n"]:
        at = c["diverged_epochs"]
        return [Verdict(strength, status=_status(c), passed=False, **whole,
                        note=f"{lam} finished in the baseline but is now {_status(c)}"
                             + (f" (epoch {', '.join(map(str, at))})" if at else ""))]
    verdicts = []
    lost, was = c["diverged"] + c["failed"], b["diverged"] + b["failed"]
    if lost > was:
        verdicts.append(Verdict(strength, status=_status({**c, "n": 0}), passed=False, **whole,
                                note=f"{lam}: {lost} of {c['runs']} seeds diverged or failed "
                                     f"(baseline: {was} of {b['runs']})"))
    for tol in tolerances:
        verdict = check(tol, strength, b["metrics"][tol.metric]["mean"],
                        c["metrics"][tol.metric]["mean"])
        verdicts.append(replace(verdict, label=label, interval=interval_text(
            tol.metric, c["metrics"][tol.metric])))
    return verdicts


def config_differences(current: Mapping[str, Any], baseline: Mapping[str, Any]) -> list[str]:
    """``key: baseline -> current`` for each setting of ``sweep.config`` that differs."""
    cur = current.get("sweep", {}).get("config", {})
    base = baseline.get("sweep", {}).get("config", {})
    return [f"{key}: {base.get(key)!r} -> {cur.get(key)!r}"
            for key in sorted(set(cur) | set(base)) if cur.get(key) != base.get(key)]


def format_verdicts(verdicts: Sequence[Verdict]) -> str:
    """The gate's table (Markdown): means over seeds; beside each change, the 95% interval of
    the current mean over its seeds."""
    rows = []
    for v in verdicts:
        shown = v.status.upper() if not v.passed else v.status
        change = f"{v.change} (current {v.interval})" if v.interval else v.change
        rows.append([v.label or format_strength(v.strength), v.metric,
                     _fmt_value(v.metric, v.baseline),
                     _fmt_value(v.metric, v.current), change, f"{shown}: {v.note}"])
    numeric = all(not (v.label or "0")[0].isalpha() for v in verdicts)
    return markdown_table(["λ" if numeric else "configuration", "metric", "baseline", "current",
                           "change", "verdict"], rows)


def passed(verdicts: Sequence[Verdict]) -> bool:
    """Whether the gate passes."""
    return all(v.passed for v in verdicts)


# --- reading metrics ---------------------------------------------------------------------


def parse_metrics(text: str, source: str) -> dict[str, Any]:
    """Parses an evaluation.json text; ``source`` names it in errors."""
    try:
        metrics = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GateError(f"{source} is not valid JSON: {exc}") from exc
    if not isinstance(metrics, dict) or not isinstance(metrics.get("runs"), dict):
        raise GateError(f"{source} has no 'runs' section: expected the {EVALUATION_FILE} "
                        "written by `python -m l2sweep.evaluate` (paths.reports)")
    for name, run in metrics["runs"].items():
        if finite(run.get("strength")) is None:
            raise GateError(f"{source}: run {name!r} has strength={run.get('strength')!r}; "
                            "expected a number")
    return metrics


def load_metrics(path: str | Path, role: str = "current") -> dict[str, Any]:
    """Reads an evaluation.json-shaped file; ``role`` (``current``/``baseline``) words the error."""
    path = Path(path)
    if not path.is_file():
        hint = (f"commit one made from a reference run (a copy of its reports/{EVALUATION_FILE}), or "
                "pass --baseline PATH or --rev REV" if role == "baseline" else
                "run `dvc repro` (or `python -m l2sweep.evaluate`) first")
        raise GateError(f"{role} metrics file {path} does not exist: {hint}")
    return parse_metrics(path.read_text(encoding="utf-8"), str(path))


def experiment_ref(rev: str) -> Optional[str]:
    """The git ref (``refs/exps/<baseline>/<name>``) of the DVC experiment named ``rev``, else None."""
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"],
                          capture_output=True, text=True, check=False).stdout.split()
    named = [ref for ref in refs if ref.count("/") == 4 and ref.rsplit("/", 1)[1] == rev]
    if len(named) > 1:
        raise GateError(f"--rev {rev}: {len(named)} DVC experiments have that name; pass the "
                        "commit of one (`dvc exp show --sha`)")
    return named[0] if named else None


def resolve_commit(rev: str) -> Optional[str]:
    """The commit ``rev`` names (a git revision), else None. ``rev`` is only ever read as a
    revision: one that starts with ``-`` is refused, and git gets it after ``--end-of-options``."""
    if not rev or rev.startswith("-") or any(c in rev for c in "\0\n"):
        raise GateError(f"--rev {rev!r} is not allowed: a git revision (branch, tag, commit) or "
                        "a DVC experiment's name")
    out = subprocess.run(["git", "rev-parse", "--verify", "--quiet", "--end-of-options",
                          f"{rev}^{{commit}}"], capture_output=True, text=True, check=False)
    return out.stdout.strip() if out.returncode == 0 else None


def load_metrics_at_rev(rev: str, path: str | Path) -> dict[str, Any]:
    """Reads ``path`` as committed at ``rev``, a git revision or a DVC experiment's name."""
    path = Path(path)
    relative = Path(os.path.relpath(path)) if path.is_absolute() else path
    try:
        commit = resolve_commit(rev) or experiment_ref(rev)
        if commit is None:
            raise GateError(f"--rev {rev}: no such git revision or DVC experiment")
        out = subprocess.run(["git", "show", f"{commit}:./{relative.as_posix()}"],
                             capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise GateError(f"--rev {rev}: git is not installed") from exc
    if out.returncode != 0:
        raise GateError(f"--rev {rev}: cannot read {path} at that revision "
                        f"({out.stderr.strip() or 'git show failed'})")
    return parse_metrics(out.stdout, f"{path}@{rev}")


# --- entry point -------------------------------------------------------------------------


def run_gate(cfg: Any, baseline_path: Optional[str] = None, rev: Optional[str] = None,
             current_path: Optional[str] = None, out: Any = None, as_json: bool = False) -> int:
    """Loads both metrics files, prints the table (or JSON) to ``out`` and returns the exit status."""
    out = out or sys.stdout
    evaluation = Path(cfg.paths.reports) / EVALUATION_FILE
    current_path = current_path or evaluation
    current = load_metrics(current_path)
    if rev:
        baseline, source = load_metrics_at_rev(rev, evaluation), f"{evaluation}@{rev}"
    else:
        source = baseline_path or cfg.gate.baseline
        baseline = load_metrics(source, "baseline")
    verdicts = gate(current, baseline, tolerances_from_config(cfg.gate))
    diffs = config_differences(current, baseline)
    if as_json:
        print(json.dumps({"passed": passed(verdicts), "current": str(current_path),
                          "baseline": str(source), "config_differences": diffs,
                          "checks": [asdict(v) for v in verdicts]}), file=out)
        return EXIT_OK if passed(verdicts) else EXIT_REGRESSED
    print(f"Regression gate: {current_path} against {source}\n", file=out)
    print("Values are means over each λ's finished seeds; the interval is the 95% t-interval "
          "of the current mean.\n", file=out)
    if diffs:
        print(f"Note: {CONFIG_NOTE}: " + "; ".join(diffs) + "\n", file=out)
    print(format_verdicts(verdicts), file=out)
    failed = [v for v in verdicts if not v.passed]
    for v in failed:
        if v.metric == "-":
            print(f"\nerror: {v.note}", file=out)
    print(f"\ngate: {'PASSED' if not failed else 'FAILED'} ({len(verdicts)} checks, "
          f"{len(failed)} failed)", file=out)
    return EXIT_OK if not failed else EXIT_REGRESSED


@entry_point()
def main(argv: Optional[list[str]] = None) -> int:
    """``python -m l2sweep.gate [--baseline PATH | --rev REV] [--current PATH] [overrides]``."""
    parser = argparse.ArgumentParser(prog="python -m l2sweep.gate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--baseline", help="baseline metrics file (default: gate.baseline)")
    which.add_argument("--rev", help="git revision or DVC experiment whose metrics are the baseline")
    parser.add_argument("--json", action="store_true", help="print the verdict as JSON (stdout)")
    parser.add_argument("--current", help=f"evaluation under test (default: <paths.reports>/{EVALUATION_FILE})")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. gate.max_accuracy_drop=0.01")
    args = parser.parse_args(argv)

    from l2sweep.base.config import compose_config, validate

    try:
        cfg = compose_config(args.overrides)  # the gate reads gate.* and paths.reports only
        validate(cfg)
        return run_gate(cfg, baseline_path=args.baseline, rev=args.rev, current_path=args.current,
                        as_json=args.json)
    except (GateError, ValueError) as exc:  # ValueError: a bad tolerance
        print(f"error: {exc}", file=sys.stderr)
        if args.json:
            print(json.dumps({"passed": False, "error": str(exc)}))
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
