"""The `train` stage: the seeds' experiment, one MLflow-tracked run per λ.

Run (from the repository root; params.yaml is layered over conf/, the command line wins):
    python -m l2sweep.train -m                                  # sweep the λ grid (sweep_grid)
    python -m l2sweep.train -m regularizer.strength=0.1,1.0     # an ad-hoc grid
    python -m l2sweep.train -m train.fused=true                 # the whole grid in one job, at once
    python -m l2sweep.train -m hydra/launcher=parallel          # jobs in parallel processes
    python -m l2sweep.train -m hydra/sweeper=lambda_search      # Optuna search over λ

Each λ writes ``<paths.models>/<run_name>/{model.keras,history.json,histograms.json}`` and an
MLflow child run under the sweep's parent run (l2sweep.tracking). How it trains is
l2sweep.engine.fit: the compiled loop for the MLP, Keras ``Model.fit`` for the CNN or with
``train.loop=keras``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import hydra
import numpy as np
from omegaconf import DictConfig

from l2sweep import train_cli
from l2sweep.base import cli, files, signals
from l2sweep.base.cache import CACHE
from l2sweep.base.config import CONF_DIR, ConfigError, sweep_grid, validate, validate_seeds
from l2sweep.base.data import load_meta, load_split, stratified_folds
from l2sweep.reporting.summaries import BEST_BY
from l2sweep.tracking import artifacts, runs, sweep

if TYPE_CHECKING:
    from l2sweep.engine.fit import Fold, Trained

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Trains ``cfg``'s λ (every λ of its grid with ``train.fused=true``, in a comparison's job or
    a cross-validation) once per seed, and records each on disk and as an MLflow run.

    With ``data.folds=k`` every (λ, seed) trains once per fold of the training pool (train +
    validation splits), then the λ of lowest mean validation cross-entropy over the folds (the
    report's rule) is retrained on the whole pool once per seed: the ``refit`` runs, the only
    ones ``evaluate`` scores on the test split.

    Args:
        cfg: the composed config (see l2sweep.base.config.Config).

    Returns:
        run name -> that run's final-epoch metrics (``loss``, ``val_loss``, ...; NaN where it diverged).
    """
    validate(cfg)
    planned = [Planned(c) for c in lambda_configs(cfg)]
    (x_train, y_train), (x_val, y_val) = load_training_data(cfg)
    job = Job(load_meta(cfg.paths.prepared), x_val[:5], y_val, train_cli.job_label(cfg), len(planned) > 1)
    train_cli.check_prepared(cfg, job.meta)  # each job: a sweeper's trial may set data keys too
    data: tuple = (x_train, y_train, x_val, y_val)
    sizes = len(x_train), len(x_val)
    if cfg.data.folds:  # the pool, split into folds; no separate validation split
        data = (np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val]), None, None)
        folds = stratified_folds(data[1], int(cfg.data.folds), int(cfg.data.seed))
        planned = with_folds(planned, folds, len(data[1]))
        sizes = len(planned[0].fold.train), len(folds[0])
    log.info("%s: %s x %d runs, %d epochs on %d images (%d validation)", job.label, cfg.model.name,
             len(planned), cfg.train.epochs, *sizes)
    histories = {}
    for batch in batches(planned, cfg.train.fused):
        histories.update(train_batch(job, batch, data))
    if cfg.data.folds:
        best = sweep.best_run(list(histories.values()))
        if best is None:
            log.warning("%s: every fold diverged; no λ to retrain on the whole pool", job.label)
        else:
            log.info("%s: cross-validation chose λ=%g; retraining it on the whole pool", job.label,
                     best["strength"])
            histories.update(train_batch(job, refit_runs(cfg, best["strength"], len(data[0])), data))
    return {name: {k: v[-1] if v else math.nan for k, v in h["metrics"].items()}
            for name, h in histories.items()}


@dataclass(frozen=True)
class Planned:
    """One run of a job: its config, and in a cross-validation its data (``fold``: the pool's
    examples it trains and validates on) and role (``fold_index``; ``refit``: the whole pool)."""

    cfg: DictConfig
    fold: Optional[Fold] = None
    fold_index: Optional[int] = None
    refit: bool = False


@dataclass(frozen=True)
class Job:
    """What every run of a job shares: the prepared data's meta, the MLflow input example, the
    validation labels, the log prefix and whether it trains several runs."""

    meta: dict[str, Any]
    example: Any
    y_val: Any
    label: str
    several: bool


def with_folds(planned: list[Planned], folds: list[np.ndarray], n: int) -> list[Planned]:
    """Each run once per fold of a pool of ``n`` examples (``folds``: the validation indices of
    each), trained on every other example, named ``<run>-f<i>``."""
    from l2sweep.engine.fit import Fold

    splits = [Fold(np.setdiff1d(np.arange(n), val), val) for val in folds]
    out = []
    for p in planned:
        for i, fold in enumerate(splits):
            sub = p.cfg.copy()
            sub.run_name = f"{p.cfg.run_name}-f{i}"
            out.append(Planned(sub, fold, i))
    return out


def refit_runs(cfg: DictConfig, strength: float, n: int) -> list[Planned]:
    """The chosen ``strength`` once per seed on the whole pool of ``n`` examples, without
    validation data: ``<regularizer>-<λ>-refit`` (``-s<seed>`` with several seeds)."""
    from l2sweep.engine.fit import Fold

    seeds = validate_seeds(None if cfg.sweep.seeds is None else list(cfg.sweep.seeds)) or [cfg.train.seed]
    out = []
    for seed in seeds:
        sub = cfg.copy()
        sub.regularizer.strength, sub.train.seed = strength, seed
        sub.run_name = configuration_name(cfg.regularizer.name, strength) + "-refit" + (
            f"-s{seed}" if len(seeds) > 1 else "")
        out.append(Planned(sub, Fold(np.arange(n), None), refit=True))
    return out


def batches(planned: list[Planned], fused: bool) -> list[list[Planned]]:
    """What trains at once: everything when ``fused``, else the seeds of one configuration (λ and
    fold), configurations one after another (the compiled loop trains a batch as one model)."""
    if fused:
        return [planned]
    groups: dict[tuple, list[Planned]] = {}
    for p in planned:
        groups.setdefault((float(p.cfg.regularizer.strength), p.fold_index, p.refit), []).append(p)
    return list(groups.values())


def train_batch(job: Job, batch: list[Planned], data: tuple) -> dict[str, dict[str, Any]]:
    """Trains ``batch`` at once (``data``: train images and labels, validation ones or None with
    folds) with a child run each; returns run name -> its history record."""
    # TensorFlow loads here, not when the module does: `main` checks the command line (a typo:
    # one line, no TensorFlow start-up) and sets TensorFlow's threads before it starts.
    from l2sweep.engine.callbacks import StopOnSignal
    from l2sweep.engine.fit import fit
    from l2sweep.tracking.callback import MlflowLogger

    cfgs = [p.cfg for p in batch]
    folds = [p.fold for p in batch] if batch[0].fold is not None else None
    with contextlib.ExitStack() as stack:
        tracked = [stack.enter_context(runs.child_run(p.cfg, run_tags(p.cfg, p))) for p in batch]
        for run, c in zip(tracked, cfgs):
            run.log("params and input", functools.partial(artifacts.log_inputs, run, c, job.meta,
                                                          job.example, job.y_val))
        callbacks = [[StopOnSignal(), MlflowLogger(run)] for run in tracked]
        with signals.deferred():
            trained = fit(cfgs, *data, callbacks, job.label, folds=folds)
        return {p.cfg.run_name: finish_run(p, run, t, job) for p, run, t in zip(batch, tracked, trained)}


def configuration_name(kind: str, strength: float) -> str:
    """The start of a run's name: ``<regularizer>-<λ>``; ``none`` (it has no λ)."""
    return kind if kind == "none" else f"{kind}-{strength}"


def lambda_configs(cfg: DictConfig) -> list[DictConfig]:
    """The configs this job trains: ``cfg``'s λ (with ``train.fused=true`` every λ of
    :func:`sweep_grid`), once per seed of ``sweep.seeds`` (null: ``train.seed`` alone), with
    ``regularizer.strength``, ``train.seed`` and ``run_name`` set for each. Replicates are named
    ``<regularizer>-<λ>-s<seed>``; a single seed keeps ``<regularizer>-<λ>``; ``none`` has no
    λ: ``none`` (``none-s<seed>``).

    Raises:
        ConfigError: the grid or the seeds are invalid, or ``run_name`` does not tell them apart.
    """
    in_job = cfg.train.fused or cfg.data.folds or cfg.sweep.compare  # the job trains its whole grid
    strengths = sweep_grid(cfg) if in_job else [cfg.regularizer.strength]
    seeds = validate_seeds(None if cfg.sweep.seeds is None else list(cfg.sweep.seeds))
    default_name = cfg.run_name == f"{cfg.regularizer.name}-{cfg.regularizer.strength}"
    if len(strengths) == 1 and (seeds is None or seeds == [cfg.train.seed]):
        if not (default_name and cfg.regularizer.name == "none"):
            return [cfg]
    configs = []
    for strength in strengths:
        for seed in seeds or [cfg.train.seed]:
            sub = cfg.copy()
            sub.regularizer.strength, sub.train.seed = strength, seed
            if default_name:  # a composed config has its name resolved already
                sub.run_name = configuration_name(cfg.regularizer.name, strength) + (
                    f"-s{seed}" if seeds and len(seeds) > 1 else "")
            configs.append(sub)
    names = [c.run_name for c in configs]
    if len(set(names)) != len(names):
        raise ConfigError("run_name", cfg.run_name, "a name that depends on regularizer.strength "
                          "and train.seed (the default ${regularizer.name}-${regularizer.strength}, "
                          f"with -s<seed> for replicates), so that every run is its own (got {names})")
    return configs


def load_training_data(cfg: DictConfig) -> tuple:
    """The prepared train and validation splits (uint8 images, int labels), read-only.

    The jobs of a sweep in one process share one read; a split file that changed in between
    (size or modification time) is read again.
    """
    folder = Path(cfg.paths.prepared).resolve()
    stamps = []
    for split in ("train", "val"):
        path = folder / f"{split}.npz"
        stamps.append((path.stat().st_size, path.stat().st_mtime_ns) if path.exists() else None)

    def read() -> tuple:
        splits = tuple(load_split(folder, split) for split in ("train", "val"))
        for x, y in splits:
            x.flags.writeable = y.flags.writeable = False
        return splits

    return CACHE.get("training data", (str(folder), tuple(stamps)), read)


def run_tags(cfg: DictConfig, planned: Optional[Planned] = None) -> dict[str, str]:
    """The tags of a λ's child run (empty values left out); in a cross-validation its fold, or
    ``l2sweep.refit`` for the chosen λ retrained on the whole pool."""
    tags = {"dataset": cfg.dataset.name, "regularizer": cfg.regularizer.name, "l2sweep.kind": "run",
            # the replicates of one λ share this tag: the runs table groups by it
            "l2sweep.lambda": f"{cfg.regularizer.name}-{float(cfg.regularizer.strength):g}",
            "l2sweep.seed": str(cfg.train.seed),
            "l2sweep.fused": "true" if cfg.train.fused else "", "dvc.stage": os.environ.get("DVC_STAGE", ""),
            "l2sweep.fold": "" if planned is None or planned.fold_index is None else str(planned.fold_index),
            "l2sweep.refit": "true" if planned is not None and planned.refit else "",
            "dvc.experiment": os.environ.get("DVC_EXP_NAME", "")}
    return {k: v for k, v in tags.items() if v}


def finish_run(planned: Planned, run: runs.ChildRun, trained: Trained, job: Job) -> dict[str, Any]:
    """Records a trained run: status, its folder under ``paths.models`` (disk first: if the store
    is gone, the results still exist), then its artifacts on the run. Returns its history record."""
    cfg, label = planned.cfg, job.label
    diverged = trained.diverged_epoch
    if diverged is not None:
        run.fail(f"diverged at epoch {diverged}")
        log.warning("%s: %s diverged at epoch %d; no model written", label, cfg.run_name, diverged)
    model = trained.model if diverged is None else None
    run.wait()  # its creation: history.json names the run
    history = history_record(planned, trained, run.run_id)
    write_run_outputs(Path(cfg.paths.models) / cfg.run_name, model, history, trained.histograms)
    if not cfg.tracking.log_model:
        model = None
    run.log("artifacts (histograms, history, config, model)", functools.partial(
        artifacts.log_outputs, run, model, history, trained.histograms, job.example,
        hydra_output_dir(), cfg if job.several else None))
    final = {k: v[-1] if v else math.nan for k, v in history["metrics"].items()}
    split = "val_" if "val_loss" in final else ""  # a refit has no validation data
    log.info("%s: %sloss %.4f %saccuracy %.4f", cfg.run_name if job.several else label, split,
             final.get(f"{split}loss", math.nan), split, final.get(f"{split}accuracy", math.nan))
    return history


def history_record(planned: Planned, trained: Trained, run_id: Optional[str]) -> dict[str, Any]:
    """The content of ``history.json``: what evaluate and the report read."""
    cfg = planned.cfg
    metrics = {k: [float(v) for v in values] for k, values in trained.history.items()}
    return {
        "run_name": cfg.run_name, "regularizer": cfg.regularizer.name,
        "strength": float(cfg.regularizer.strength), "seed": int(cfg.train.seed), "model": cfg.model.name,
        "fold": planned.fold_index, "folds": cfg.data.folds, "refit": planned.refit,
        "status": "FAILED" if trained.diverged_epoch is not None else "FINISHED",
        "diverged_epoch": trained.diverged_epoch, "mlflow_run_id": run_id,
        "sweep_id": os.environ.get(runs.SWEEP_ENV),
        "epochs": list(range(len(next(iter(metrics.values()), [])))), "metrics": metrics,
    }


def write_run_outputs(out_dir: Path, model: Any, history: dict[str, Any],
                      histograms: dict[str, Any]) -> None:
    """Replaces ``out_dir`` with ``model.keras`` (unless None), ``history.json`` and
    ``histograms.json``, atomically: an interrupted run leaves the previous folder, never half
    a model."""
    def fill(tmp: Path) -> None:
        if model is not None:
            model.save(tmp / "model.keras")
        (tmp / "history.json").write_text(json.dumps(history, indent=2) + "\n")
        (tmp / "histograms.json").write_text(json.dumps(histograms) + "\n")

    files.replace_folder(out_dir, fill)


def hydra_output_dir() -> Optional[Path]:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def objective(finals: dict[str, dict[str, float]]) -> float:
    """What optimising sweepers (Optuna) minimise: the lowest final validation cross-entropy
    (``val_data_loss``; ``val_loss`` adds λ's own penalty, so it would favour small λ) of the
    job's runs, else ``val_loss`` (the report's rule); inf when none is finite."""
    values = [next((f[k] for k in BEST_BY if f.get(k) is not None), math.inf) for f in finals.values()]
    return min((v for v in values if math.isfinite(v)), default=math.inf)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_app(cfg: DictConfig) -> float:
    with train_cli.cluster_job(cfg):
        return objective(train(cfg))


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: layers params.yaml, fills in the λ grid, checks, runs the Hydra app.

    A failure ends in one ``error:`` line and a non-zero status (l2sweep.base.cli); add
    ``--verbose`` or set ``HYDRA_FULL_ERROR=1`` for the traceback. The sweep's parent run is
    ended FINISHED, FAILED (with the error as reason) or KILLED whatever happens.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = cli.wants_traceback(args)
    args = cli.strip_verbose(args)
    if verbose:  # TensorFlow's start-up notices too, in this process and the launchers' workers
        os.environ[cli.VERBOSE_ENV] = "1"
    try:
        hydra_args = train_cli.launch_argv(args)
    except Exception as exc:  # bad input: nothing has been written
        raise SystemExit(cli.report(exc, args, verbose=verbose)) from None
    status, reason, error = "FAILED", "the sweep stopped with an error", None
    previous = signals.install_handlers()
    try:
        with train_cli.hydra_argv(hydra_args):
            hydra_app()
        status, reason = "FINISHED", None
    except (Exception, KeyboardInterrupt, signals.Terminated) as raised:
        exc = train_cli.cluster_error(raised)
        interrupted = not isinstance(exc, Exception)
        status = "KILLED" if interrupted else "FAILED"
        reason = f"interrupted by {signals.signal_of(exc).name}" if interrupted else cli.describe(exc, args)
        error = exc
        if verbose:
            raise
    finally:
        with contextlib.suppress(KeyboardInterrupt, signals.Terminated), signals.deferred():
            sweep.finish(status, reason)  # no run left RUNNING
        signals.restore_handlers(previous)
    if error is not None:  # reported last, after the parent run's own log lines
        raise SystemExit(cli.report(error, args))


if __name__ == "__main__":
    # The importable module's main, not this __main__ copy's: launchers pickle the Hydra app for
    # their worker processes, and a function of l2sweep.train pickles as a reference.
    from l2sweep import train as stage

    cli.exit_fast(stage.main)
