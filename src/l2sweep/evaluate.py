"""The `evaluate` stage: scores every model of the sweep on the untouched test split.

Run from the repository root (params.yaml over conf/, the command line wins)::

    python -m l2sweep.evaluate                    # what `dvc repro evaluate` runs
    python -m l2sweep.evaluate paths.models=elsewhere/models

Reads the sweep under ``paths.models`` and the test split under ``paths.prepared``; writes the
DVC metrics ``paths.metrics`` (a few numbers per configuration), the DVC plot data under
``paths.plots``, and under ``paths.reports`` ``evaluation.json`` (every run's status, summaries and
test metrics: what the report and the gate read), ``report.md`` and its figures; logs them to the
sweep's MLflow runs. A configuration is a kind and its strength (:func:`summaries.config_label`).
Diverged runs are not scored; nor are cross-validation folds (``fold`` set: they choose the
strength, the test split must play no part in it): only the refits on the whole pool are.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm.contrib.logging import logging_redirect_tqdm

from l2sweep.reporting import dvc_data, report, summaries
from l2sweep.base.cli import entry_point, exit_fast, import_tensorflow
from l2sweep.base import outputs, progress
from l2sweep.base.config import compose_config, validate
from l2sweep.base.config_errors import override_key
from l2sweep.base.files import write_text
from l2sweep.tracking import store
from l2sweep.tracking.artifacts import scratch_folder
from l2sweep.tracking.sweep import MANIFEST, register_champion, tag_best

log = logging.getLogger("l2sweep.evaluate")  # not __main__ under `python -m`

HISTORY, MODEL = "history.json", "model.keras"
#: Settings recorded in the evaluation (``sweep.config``); the gate notes when they differ.
RECORDED_SETTINGS = ("dataset.name", "data.limit", "data.val_fraction", "data.seed", "data.folds",
                     "model.name", "model.hidden_units", "regularizer.name", "train.epochs",
                     "train.batch_size", "train.learning_rate", "train.seed")
#: Summary metrics logged to the parent MLflow run as ``<metric>/<run_name>``.
PARENT_METRICS = ("test_accuracy", "test_loss", "train_accuracy", "val_accuracy", "val_loss",
                  "val_data_loss", "gap", "penalty_share", "best_epoch", "val_loss_rise",
                  "near_zero_share")


class EvaluateError(RuntimeError):
    """The sweep's outputs cannot be found or read."""


@dataclass(frozen=True)
class SweepRun:
    """One run of the sweep as the manifest (or its folder) describes it; ``regularizer``,
    ``seed`` and ``fold`` only order the runs (None where the manifest does not say)."""

    run_name: str
    strength: float
    dir: Path
    mlflow_run_id: Optional[str] = None
    regularizer: Optional[str] = None
    seed: Optional[int] = None
    fold: Optional[int] = None

    def order(self) -> tuple:
        """Kind, strength, seed, fold: a comparison's kinds group, a configuration's runs follow."""
        return (self.regularizer or "", self.strength, self.seed is None, self.seed or 0,
                self.fold is not None, self.fold or 0, self.run_name)


def _sweep_run(info: dict[str, Any], folder: Path, kind: Optional[str] = None) -> SweepRun:
    """A :class:`SweepRun` from a manifest entry or a history (``kind``: the manifest's own)."""
    return SweepRun(info.get("run_name", folder.name), float(info["strength"]), folder,
                    info.get("mlflow_run_id"), info.get("regularizer") or kind, info.get("seed"),
                    info.get("fold"))


def load_sweep(models_dir: str | os.PathLike) -> tuple[dict[str, Any], list[SweepRun]]:
    """The sweep manifest and its runs (without ``sweep.json``: each */history.json), sorted by
    kind, strength, seed and fold (:meth:`SweepRun.order`)."""
    models = Path(models_dir)
    manifest_path = models / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        runs = [_sweep_run(r, models / r.get("dir", r["run_name"]), manifest.get("regularizer"))
                for r in manifest.get("runs", [])]
    else:
        manifest = {}
        runs = [_sweep_run(json.loads(path.read_text(encoding="utf-8")), path.parent)
                for path in sorted(models.glob(f"*/{HISTORY}"))]
    if not runs:
        raise EvaluateError(f"{models}: no {MANIFEST} and no */{HISTORY}; run `dvc repro train` "
                            "(or `python -m l2sweep.train -m`) first")
    missing = [str(r.dir / HISTORY) for r in runs if not (r.dir / HISTORY).is_file()]
    if missing:
        raise EvaluateError(f"{manifest_path} names runs without a history: {', '.join(missing)}")
    return manifest, sorted(runs, key=SweepRun.order)


def read_histories(manifest: dict[str, Any], runs: list[SweepRun]) -> list[dict[str, Any]]:
    """Each run's history, checked to be one sweep's: the manifest's (or, without one, the same
    for every run). A sweep interrupted after some λ leaves their new folders beside the last
    complete sweep's manifest; scoring that mix would report one sweep's numbers as another's."""
    histories = []
    for run in runs:
        path = run.dir / HISTORY
        try:
            histories.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EvaluateError(f"{path}: not a readable history ({exc}); run `dvc repro train` "
                                "(or `dvc checkout`) to restore it") from None
    expected = manifest.get("sweep_id") or (histories[0].get("sweep_id") if histories else None)
    other = [run.dir.name for run, h in zip(runs, histories)
             if expected and h.get("sweep_id") not in (expected, None)]
    if other:
        raise EvaluateError(
            f"{', '.join(other)} in {runs[0].dir.parent} belong to another sweep than "
            f"{manifest and MANIFEST or runs[0].dir.name} (sweep {expected}): the last sweep did "
            "not finish; run it again (`dvc repro`), or `dvc checkout` for the last complete one")
    return histories


def load_test_split(prepared_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """The test split as float32 images in [0, 1] and int64 labels."""
    from l2sweep.base.data import load_split, to_float

    x, y = load_split(prepared_dir, "test")
    return to_float(x), y


def score_model(model_path: Path, x: np.ndarray, y: np.ndarray, class_names: list[str],
                 batch_size: int = 1024) -> dict[str, Any]:
    """Test loss (cross-entropy), accuracy, per-class accuracy and confusion matrix of a model,
    and its :func:`near_zero_share`."""
    import_tensorflow()  # before Keras loads it: no start-up notices
    import keras

    try:
        model = keras.saving.load_model(model_path, compile=False)
    except Exception as exc:  # a truncated or foreign file: Keras' own words vary by the damage
        raise EvaluateError(f"{model_path}: not a readable Keras model ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}); run `dvc repro "
                            "train` (or `dvc checkout`) to restore it") from None
    probs = np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float64)
    n_classes = probs.shape[1]
    # Clipped like Keras' crossentropy, so a confident mistake costs a finite amount.
    picked = np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0)
    pred = probs.argmax(axis=1)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    per_class = np.diag(confusion) / np.maximum(confusion.sum(axis=1), 1)
    return {
        "test_loss": float(-np.log(picked).mean()),
        "test_accuracy": float((pred == y).mean()),
        "per_class_accuracy": {name: float(a) for name, a in zip(class_names, per_class)},
        "confusion_matrix": confusion.tolist(),
        "near_zero_share": near_zero_share(model),
    }


def near_zero_share(model: Any, threshold: float = summaries.NEAR_ZERO) -> Optional[float]:
    """The share of the regularized kernels' weights (every kernel layer but ``output``, as
    ``l2sweep.engine.model.regularized_layers``) with |w| < ``threshold``: what L1 drives to zero.
    None when the model has no such layer."""
    import keras

    kernels = [np.abs(keras.ops.convert_to_numpy(layer.kernel)) for layer in model.layers
               if getattr(layer, "kernel", None) is not None
               and layer.name != summaries.REGULARIZED_EXCLUDED]
    total = sum(k.size for k in kernels)
    return float(sum(int((k < threshold).sum()) for k in kernels) / total) if total else None


def evaluate_run(run: SweepRun, history: dict[str, Any], x: np.ndarray, y: np.ndarray,
                 class_names: list[str]) -> dict[str, Any]:
    """The evaluation's entry of one run: kind, fold, status, summary figures and (if it has a
    model and is no cross-validation fold) test metrics."""
    fold = history.get("fold")
    entry: dict[str, Any] = {"strength": run.strength, "regularizer": history.get("regularizer"),
                             "seed": history.get("seed"), "fold": fold,
                             "refit": bool(history.get("refit")), "status": summaries.FINISHED,
                             "diverged_epoch": history.get("diverged_epoch"),
                             "mlflow_run_id": run.mlflow_run_id}
    entry.update(summaries.summarize_history(history))
    model_path = run.dir / MODEL
    scored = fold is None  # a fold only chooses the strength: the test split plays no part
    if history.get("diverged_epoch") is not None:
        entry["status"] = summaries.DIVERGED
    elif history.get("status", "FINISHED") != "FINISHED" or (scored and not model_path.is_file()):
        entry["status"] = summaries.FAILED
        log.warning("%s: status %s, model %s; not evaluated", run.run_name,
                    history.get("status"), "present" if model_path.is_file() else "missing")
    if entry["status"] == summaries.FINISHED and scored:
        entry.update(score_model(model_path, x, y, class_names))
    else:
        entry.update({"test_loss": None, "test_accuracy": None, "near_zero_share": None})
    log.info("%s: %s, %s", run.run_name, entry["status"],
             f"fold {fold}: not scored on test" if not scored else
             f"test accuracy {summaries.fmt_pct(entry['test_accuracy'])}")
    return entry


def write_json(path: Path, data: Any) -> None:
    """Writes ``data`` as indented JSON (NaN/inf as null), atomically."""
    write_text(path, json.dumps(dvc_data.json_safe(data), indent=2) + "\n")


def write_figures(evaluation: dict[str, Any], histories: list[dict[str, Any]],
                  fig_dir: Path) -> list[tuple[str, Path]]:
    """The comparison PNGs (:func:`l2sweep.reporting.plots.sweep_figures`); returns
    ``(caption, path)`` of each."""
    from l2sweep.reporting import plots

    return [(caption, plots.save_figure(fig, fig_dir / name))
            for caption, name, fig in plots.sweep_figures(evaluation, histories)]


def log_to_mlflow(cfg: DictConfig, manifest: dict[str, Any], evaluation: dict[str, Any],
                  runs: list[tuple[SweepRun, dict[str, Any]]], artifacts: list[Path]) -> None:
    """Logs summaries, best-λ tags, report, figures and the evaluation to the sweep's parent run,
    :func:`log_child` to each child run, and registers the best λ's model."""
    parent = manifest.get("parent_run_id")
    if not cfg.tracking.enabled or not parent:
        log.info("no parent MLflow run (tracking off or no sweep manifest): not logging")
        return
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    uri = store.tracking_uri(cfg, manifest.get("tracking_uri"))
    client = store.get_client(cfg, manifest.get("tracking_uri"))
    now, reports = int(time.time() * 1000), Path(cfg.paths.reports)
    metrics = []
    for name, run in evaluation["runs"].items():
        values = {key: summaries.finite(run.get(key)) for key in PARENT_METRICS}
        values["weight_norm"] = summaries.finite(run["weight_norm"].get("total"))
        # MLflow metric names allow no "+", which a lambda like 1e+38 (a diverged run) has.
        safe = re.sub(r"[^\w\-. :/]", "_", name)
        metrics += [Metric(f"{key}/{safe}", v, now, 0) for key, v in values.items() if v is not None]
    try:
        client.log_batch(parent, metrics=metrics)
        best = evaluation.get("best")  # a cross-validation's: the refit's run (summaries.summarize)
        if best:
            tag_best(uri, parent, best)
            best_run = evaluation["runs"][best["run_name"]].get("mlflow_run_id")
            register_champion(client, cfg.tracking.registered_model, best_run)
        for path in artifacts:
            client.log_artifact(parent, str(path), "figures" if path.suffix == ".png" else None)
        for run, history in progress.bar(runs, "logging figures", "run"):
            log_child(client, run, evaluation["runs"][run.run_name], history, now, reports)
    except MlflowException as exc:
        raise EvaluateError(f"could not log to the sweep's MLflow run {parent} in "
                            f"{store.redact(uri)}: {store.redact(str(exc))}. "
                            "Metrics, plots and report are written; tracking.enabled=false "
                            "skips MLflow") from exc
    log.info("logged the evaluation to MLflow run %s (%s)", parent, store.redact(uri))


def log_child(client: Any, run: SweepRun, entry: dict[str, Any], history: dict[str, Any], now: int,
              reports: Path) -> None:
    """Logs a child run's test metrics and figures (curves, weight histograms), drawn in a scratch
    folder in ``reports``."""
    from mlflow.entities import Metric

    from l2sweep.reporting import plots

    run_id = run.mlflow_run_id
    if not run_id:
        return
    if entry.get("status") == summaries.FINISHED and entry.get("test_accuracy") is not None:
        client.log_batch(run_id, metrics=[Metric(k, entry[k], now, 0) for k in ("test_accuracy", "test_loss")])
    name = run.run_name
    figures = {"plots/curves.png": plots.plot_curves(history["metrics"], name)}
    hist_file = run.dir / "histograms.json"
    layers = json.loads(hist_file.read_text()) if hist_file.is_file() else {}
    for layer, data in layers.items():
        figures[f"histograms/{layer}.png"] = plots.plot_histograms(data, layer, f"{name}: {layer} weights")
    with scratch_folder(reports / f"figures-{run.run_name}") as tmp:
        for rel, fig in figures.items():
            plots.save_figure(fig, tmp / rel, tight=False)
        client.log_artifacts(run_id, str(tmp))


def describe_sweep(cfg: DictConfig, manifest: dict[str, Any], runs: list[SweepRun],
                   histories: list[dict[str, Any]], y: np.ndarray) -> dict[str, Any]:
    """The ``sweep`` section of the evaluation: dataset, model, regularizer (the list of kinds in
    a comparison), grid (per kind in a comparison: ``grids``), seeds, ``folds`` (k, or None
    without cross-validation) and the pool they split (``pool_examples``: train + validation),
    class names and settings."""
    from l2sweep.base.data import DataError, load_meta

    try:
        meta = load_meta(cfg.paths.prepared)
    except DataError as exc:  # provenance only: the numbers do not depend on it
        log.warning("%s", exc)
        meta = {}
    dataset = manifest.get("dataset") or meta.get("dataset") or cfg.dataset.name
    sizes = {split: info.get("size") for split, info in meta.get("splits", {}).items()}
    kinds = summaries.kinds_of(histories)
    grids = {kind: sorted({float(h["strength"]) for h in histories if h.get("regularizer") == kind})
             for kind in kinds}
    folds = next((h["folds"] for h in histories if h.get("folds")), None)
    pool = (sum(sizes.get(split) or 0 for split in ("train", "val")) or None) if folds else None
    return {"dataset": dataset, "model": manifest.get("model", cfg.model.name),
            "regularizer": (kinds if len(kinds) > 1 else kinds[0] if kinds
                            else manifest.get("regularizer", cfg.regularizer.name)),
            "strengths": sorted({r.strength for r in runs}),
            "grids": grids if len(kinds) > 1 else None, "folds": folds, "pool_examples": pool,
            "seeds": sorted({h["seed"] for h in histories if h.get("seed") is not None}),
            "test_examples": int(len(y)),
            "split_sizes": sizes,
            "class_names": summaries.class_names(str(dataset), int(y.max()) + 1 if len(y) else 10),
            "parent_run_id": manifest.get("parent_run_id"),
            "config": {key: OmegaConf.select(cfg, key) for key in RECORDED_SETTINGS}}


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Scores the sweep, writes metrics, plots and report, logs them; returns the evaluation."""
    validate(cfg)
    manifest, runs = load_sweep(cfg.paths.models)
    histories = read_histories(manifest, runs)
    x, y = load_test_split(cfg.paths.prepared)
    sweep = describe_sweep(cfg, manifest, runs, histories, y)

    entries = {}
    for run, history in progress.bar(list(zip(runs, histories)), "scoring", "model"):
        entries[run.run_name] = evaluate_run(run, history, x, y, sweep["class_names"])
    evaluation = {"sweep": sweep, "runs": entries, **summaries.summarize(entries)}

    reports = Path(cfg.paths.reports)
    write_json(reports / summaries.EVALUATION_FILE, evaluation)
    write_json(Path(cfg.paths.metrics), dvc_data.dvc_metrics(evaluation))
    for name, rows in dvc_data.plot_data(evaluation, histories).items():
        write_json(Path(cfg.paths.plots) / name, rows)
    figures = write_figures(evaluation, histories, reports / "figures")
    links = [(caption, path.relative_to(reports).as_posix()) for caption, path in figures]
    (reports / "report.md").write_text(report.render_report(evaluation, links), encoding="utf-8")

    log_to_mlflow(cfg, manifest, evaluation, list(zip(runs, histories)),
                  [path for _, path in figures] + [reports / "report.md",
                                                   reports / summaries.EVALUATION_FILE])
    return evaluation


@entry_point(EvaluateError)
def main(overrides: list[str]) -> int:
    """Entry point: ``python -m l2sweep.evaluate [--verbose] [overrides]``; errors: one line, exit 2."""
    cfg = compose_config(overrides)
    adhoc = outputs.adhoc_evaluate_paths(cfg.paths, {override_key(o) for o in overrides})
    for key, path in adhoc.items():  # an ad-hoc sweep: its results beside it, not in DVC's
        OmegaConf.update(cfg, f"paths.{key}", path)
    if adhoc:
        log.info("not a DVC stage and not DVC's models: writing %s", ", ".join(adhoc.values()))
    with logging_redirect_tqdm():  # log lines above a progress bar, not through it
        evaluation = evaluate(cfg)
    print(summary_line(evaluation))
    return 0


def summary_line(evaluation: dict[str, Any]) -> str:
    """The console's last line: the best λ and whether it is decided; in a comparison each
    kind's best; in a cross-validation the chosen strength and the refit's test accuracy."""
    wrote, best = f"wrote {len(evaluation['runs'])} runs", evaluation["best"]
    by = best["by"] if best else "-"
    cv = dvc_data.cross_validation(evaluation)
    if cv:
        chosen = "none" if cv["chosen"] is None else summaries.format_strength(cv["chosen"])
        return (f"{wrote}; {cv['folds']}-fold cross-validation chose λ={chosen} (lowest mean {by} "
                f"over folds); refit test accuracy {summaries.fmt_pct(cv['test_accuracy'])}")
    if len(summaries.kinds_of(evaluation["runs"].values())) > 1:
        kinds = dvc_data.best_by_kind(evaluation)
        return (f"{wrote}; each kind's best by mean {by}: " + ", ".join(
            f"{b['lambda']} (test {summaries.fmt_pct(b['test_accuracy'])})" for b in kinds.values())
            + (f"; lowest overall: {best['lambda']}" if best else ""))
    if best and best.get("single"):  # nothing to choose among
        return (f"{wrote}; one configuration ({best['run_name']} the champion): no λ to choose")
    verdict = ("decided beyond seed noise" if best["decided"] else "not decided: "
               + ("one seed per λ" if best["n"] < 2 else "others within seed noise")) if best else ""
    return (f"{wrote}; lowest mean {by}: "
            f"λ={summaries.format_strength(best['strength']) if best else 'none'}"
            + (f" ({verdict})" if verdict else ""))


if __name__ == "__main__":
    exit_fast(main)
