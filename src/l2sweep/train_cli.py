"""From a user's command line to the Hydra app's: params.yaml, the λ grid, the checks; and
on the jobs' side, the label of a job and what a job on a cluster (submitit) reports.

``python -m l2sweep.train -m`` sweeps the λ grid (l2sweep.base.config.sweep_grid: params.yaml's
``sweep.strengths``, else the regularizer's own) in one Hydra multirun; an explicit
``regularizer.strength=a,b`` or another sweeper (``hydra/sweeper=...``) replaces that grid.
Everything is validated, and the outputs and the store checked (:func:`preflight`), before
Hydra starts any job, so a typo or a full disk costs nothing.
A Hydra callback could not do this: Hydra turns a callback's errors into warnings.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from l2sweep.base import cli, files, outputs, signals
from l2sweep.base.cli import VERBOSE_ENV, VERBOSE_LOGGERS
from l2sweep.base.config import (ConfigError, compose_config, format_override_value, override_key,
                                 params_file, project_overrides, sweep_grid, training_loop, validate,
                                 validate_strengths)
from l2sweep.base.data import load_meta, load_split
from l2sweep.base.grid import compared_kinds
from l2sweep.tracking import store

log = logging.getLogger(__name__)

#: Number of jobs in the sweep, for progress lines ("job 2/3").
JOBS_ENV = "L2SWEEP_JOBS"
#: Hydra's flags that only print (help, config, info): no writable outputs or store needed.
PRINT_ONLY_FLAGS = {"--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--info", "-i",
                    "--shell-completion", "-sc"}

#: Hydra's own command-line flags that take a value.
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name",
                "-cn", "--config-dir", "-cd", "--experimental-rerun"}
_MULTIRUN_FLAGS = {"-m", "--multirun"}
STRENGTH = "regularizer.strength"


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Separates Hydra's flags (with their values) from overrides."""
    flags, overrides = [], []
    it = iter(args)
    for arg in it:
        if arg.startswith("-"):
            flags.append(arg)
            if arg in _VALUE_FLAGS:
                flags.append(next(it, ""))
        else:
            overrides.append(arg)
    return flags, overrides


def _parse(overrides: list[str]) -> list[Any]:
    try:
        return OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ConfigError("override", " ".join(overrides), f"Hydra's override grammar ({exc})") from None


def _sweep_values(overrides: list[str]) -> dict[str, list[Any]]:
    """Key -> list of values for every choice or range sweep (``a=1,2``, ``a=range(1,4)``)."""
    return {o.get_key_element().lstrip("+~"): list(o.sweep_iterator()) for o in _parse(overrides)
            if o.is_sweep_override() and o.is_discrete_sweep()}


def _interval_sweeps(overrides: list[str]) -> dict[str, Any]:
    """Key -> IntervalSweep for every ``interval(a, b)`` (a search space for Optuna)."""
    return {o.get_key_element().lstrip("+~"): o.value() for o in _parse(overrides)
            if o.is_sweep_override() and o.is_interval_sweep()}


def _validate_interval(key: str, interval: Any) -> None:
    """A lambda search space: finite bounds, 0 <= low < high (0 < low on a log scale)."""
    low, high, log_scale = interval.start, interval.end, "log" in interval.tags
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                  for v in (low, high))
    if not (numbers and (low > 0 if log_scale else low >= 0) and low < high):
        text = f"interval({low}, {high})"
        raise ConfigError(key, f"tag(log, {text})" if log_scale else text,
                          f"an interval with {'0 < low' if log_scale else '0 <= low'} < high")


def launch_argv(args: list[str]) -> list[str]:
    """The Hydra app's argv for a user's ``args``.

    Layers params.yaml under the command-line overrides, fills in :func:`sweep_grid` as the
    multirun grid when none is given, and composes + validates the config of the first job
    (and every swept λ) so a bad value fails here with the key named; then, unless the flags
    only print, runs :func:`preflight` and sets TensorFlow's threads.

    Raises:
        ConfigError: a value is out of range or the grid is empty, repeated or not numeric.
        DataError, OutputError, StoreError: see :func:`preflight`.
    """
    flags, cli = split_args(args)
    helping = any(a in ("--help", "-h", "--hydra-help") for a in flags)
    # Help answers anywhere: without a params file, on conf/ defaults.
    overrides = list(cli) if helping and params_file() is None else project_overrides(cli)
    multirun = bool(_MULTIRUN_FLAGS & set(flags)) or "hydra.mode=MULTIRUN" in overrides
    keys = {override_key(o) for o in cli}
    swept = _sweep_values(overrides)
    searched = _interval_sweeps(overrides)
    custom_sweeper = any(k.startswith("hydra/sweeper") or k.startswith("hydra.sweeper") for k in keys)

    first = [o for o in overrides if override_key(o) not in swept and override_key(o) not in searched]
    first += [f"{k}={format_override_value(v[0])}" for k, v in swept.items()]
    first += [f"{k}={format_override_value(v.start)}" for k, v in searched.items()]
    try:
        cfg = compose_config(first, with_params=False)
    except HydraException as exc:
        raise ConfigError("override", " ".join(cli) or "(params.yaml)", str(exc).splitlines()[0]) from None
    validate(cfg)

    if STRENGTH in searched:
        _validate_interval(STRENGTH, searched[STRENGTH])
    overrides = _grid_overrides(cfg, overrides, swept, multirun, custom_sweeper or bool(searched))
    placed, adhoc = _placement(cfg, keys, multirun)
    overrides += placed
    jobs = 1
    for values in swept.values():
        jobs *= len(values)
    if custom_sweeper or searched:  # a search sweeper decides how many jobs (n_trials)
        os.environ.pop(JOBS_ENV, None)
    else:
        os.environ[JOBS_ENV] = str(jobs)
    if not any(a.split("=", 1)[0] in PRINT_ONLY_FLAGS for a in flags):
        preflight(cfg)  # after every validation: bad input writes nothing
        configure_threads(cfg)
        if adhoc is not None:
            print(f"not a DVC stage: models go to {cfg.paths.models} (evaluate them with "
                  f"`python -m l2sweep.evaluate paths.models={cfg.paths.models}`)", file=sys.stderr)
    return flags + overrides


def _placement(cfg: DictConfig, keys: set[str], multirun: bool) -> tuple[list[str], Optional[Path]]:
    """Overrides for where the run writes and how loud it is: outside ``dvc repro`` a folder of
    its own (l2sweep.base.outputs; ``cfg.paths.models`` follows), never the models/ that
    dvc.lock records; with ``--verbose`` MLflow's INFO lines. Returns them and that folder."""
    overrides = []
    adhoc = outputs.adhoc_train_folder(cfg.paths.models, keys, multirun, cfg.paths.outputs)
    if adhoc is not None:
        overrides += outputs.train_overrides(adhoc, keys, multirun)
        OmegaConf.update(cfg, "paths.models", (adhoc / "models").as_posix())
    if os.environ.get(VERBOSE_ENV):
        overrides += [f"hydra.job_logging.loggers.{name}.level=INFO" for name in VERBOSE_LOGGERS]
    return overrides, adhoc


def preflight(cfg: DictConfig) -> None:
    """Every check before training, cheapest first: the prepared splits load, the models'
    folder can be written and has room (temp folders of killed runs are removed), the store
    can be used (l2sweep.tracking.store.check_store).

    Raises:
        DataError: the prepared splits are missing or broken.
        OutputError: a folder cannot be written, or a disk is nearly full.
        StoreError: the tracking store cannot be used.
    """
    for split in ("train", "val"):
        load_split(cfg.paths.prepared, split)
    check_prepared(cfg, load_meta(cfg.paths.prepared))
    models = Path(cfg.paths.models)
    files.check_writable(models, "the trained models (paths.models)")
    files.check_free_space(models, "the trained models (paths.models)")
    if models.is_dir():
        files.remove_stale_temp(models)
    if cfg.tracking.enabled:
        store.apply_http_defaults()
        store.check_store(cfg)


#: ``dataset.*``/``data.*`` keys -> the ``meta.json`` field that records what was prepared.
PREPARED_AS = {"dataset.name": "dataset", "data.val_fraction": "val_fraction", "data.seed": "seed",
               "data.limit": "limit"}


def check_prepared(cfg: DictConfig, meta: dict[str, Any]) -> None:
    """Refuses a config whose data settings differ from what ``paths.prepared`` holds (its
    ``meta.json``): the run would train on other data than its record says.

    Raises:
        ConfigError: naming the key, its value and the prepared one.
    """
    for key, field in PREPARED_AS.items():
        value, prepared = OmegaConf.select(cfg, key), meta.get(field)
        if field in meta and value != prepared:
            raise ConfigError(key, value, f"{format_override_value(prepared)}, what "
                              f"{cfg.paths.prepared}/meta.json says was prepared; prepare again "
                              "first (`dvc repro prepare`, or `python -m l2sweep.prepare` with "
                              "the same overrides)")
    path = cfg.dataset.path
    if path and meta.get("source") and Path(str(path)).resolve() != Path(meta["source"]).resolve():
        raise ConfigError("dataset.path", path, f"{meta['source']}, what {cfg.paths.prepared}/"
                          "meta.json says was prepared from; prepare again first (`dvc repro prepare`)")


def configure_threads(cfg: DictConfig) -> None:
    """Sets TensorFlow's intra-op threads for this process and its launcher's workers, before
    TensorFlow starts: ``train.threads``, or when null 1 for the compiled loop of one model (its
    GEMMs are too small to split; the other cores stay free), else TensorFlow's default (every
    core). A ``TF_NUM_INTRAOP_THREADS`` the user set wins over the null default."""
    threads = cfg.train.threads
    if threads is not None:
        os.environ["TF_NUM_INTRAOP_THREADS"] = str(int(threads))
    elif (not cfg.train.fused and len(cfg.sweep.seeds or [cfg.train.seed]) == 1
          and training_loop(cfg) == "compiled"):
        os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")


@contextmanager
def hydra_argv(args: list[str]) -> Iterator[None]:
    """Runs the block with ``sys.argv`` set to the Hydra app's ``args`` and Hydra's errors
    raised, not printed (``HYDRA_FULL_ERROR=1``: the entry point reports them in one line)."""
    saved = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = [sys.argv[0], *args]
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    finally:
        sys.argv = saved[0]
        if saved[1] is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved[1]


def _grid_overrides(cfg: Any, overrides: list[str], swept: dict[str, list[Any]], multirun: bool,
                    searching: bool) -> list[str]:
    """How a multirun covers the grid (``swept`` is updated): a job per λ (``regularizer.strength``
    swept over :func:`sweep_grid`, unless given or searched); a comparison (``sweep.compare``) a
    job per kind, each training its own grid; a fused or cross-validated sweep one job.

    Raises:
        ConfigError: a comparison beside a regularizer or λ sweep or a search.
    """
    kinds = list(compared_kinds(cfg))
    if kinds and multirun:
        given = [k for k in ("regularizer", STRENGTH) if k in swept] or (["hydra/sweeper"] if searching else [])
        if given:
            raise ConfigError("sweep.compare", cfg.sweep.compare, f"null with a {given[0]} sweep "
                              "(a comparison sweeps each kind over its own entry's grid)")
        overrides = [o for o in overrides if override_key(o) != "regularizer"]
        overrides.append("regularizer=" + ",".join(kinds))
        swept["regularizer"] = kinds
        if not any(override_key(o) == "hydra.sweep.subdir" for o in overrides):
            overrides.append("hydra.sweep.subdir=${regularizer.name}")
        return overrides
    if cfg.train.fused or cfg.data.folds:
        return _fused_overrides(cfg, overrides, swept, multirun)
    if STRENGTH in swept:
        validate_strengths([_number(STRENGTH, v) for v in swept[STRENGTH]], STRENGTH,
                           cfg.regularizer.name)
    elif multirun and not searching and not any(override_key(o) == STRENGTH for o in overrides):
        grid = sweep_grid(cfg)
        overrides.append(f"{STRENGTH}=" + ",".join(repr(v) for v in grid))
        swept[STRENGTH] = grid
    return overrides


def _fused_overrides(cfg: Any, overrides: list[str], swept: dict[str, list[Any]],
                     multirun: bool) -> list[str]:
    """A fused or cross-validated sweep trains its whole grid in one job: a swept
    ``regularizer.strength=a,b`` becomes that job's ``sweep.strengths=[a,b]`` (``swept`` is
    updated), and the job's folder is named for what it holds."""
    if STRENGTH in swept:
        grid = validate_strengths([_number(STRENGTH, v) for v in swept.pop(STRENGTH)], STRENGTH,
                                  cfg.regularizer.name)
        overrides = [o for o in overrides if override_key(o) != STRENGTH]
        overrides.append("sweep.strengths=" + format_override_value(grid))
    else:
        sweep_grid(cfg)
    if multirun and not any(override_key(o) == "hydra.sweep.subdir" for o in overrides):
        kind = "cv" if cfg.data.folds else "fused"
        overrides.append(f"hydra.sweep.subdir=${{regularizer.name}}-{kind}-${{hydra.job.num}}")
    return overrides


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, value, "a number >= 0")
    return float(value)


# --- the jobs' side --------------------------------------------------------------------


def job_label(cfg: DictConfig) -> str:
    """``job 2/3 l2-0.001`` in a multirun, else the run name (the prefix of progress lines)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or HydraConfig.get().mode.name != "MULTIRUN":
        return cfg.run_name
    total = os.environ.get(JOBS_ENV)
    grid = cfg.train.fused or cfg.data.folds or compared_kinds(cfg)  # the job trains a grid
    return f"job {HydraConfig.get().job.num + 1}/{total or '?'} {cfg.regularizer.name if grid else cfg.run_name}"


class JobError(RuntimeError):
    """A job of the sweep that ran elsewhere (a SLURM node) failed; the message names its λ,
    where it ran and its log."""


@contextmanager
def cluster_job(cfg: DictConfig) -> Iterator[None]:
    """Inside a job that submitit runs (``hydra/launcher=slurm``; also ``submitit_local``):
    SIGTERM (``scancel``) ends its runs KILLED, as on the command line (submitit itself ignores
    SIGTERM), and an error is logged with its traceback to the job's log and raised as a
    :class:`JobError` naming the λ, the node and that log. Elsewhere it does nothing.
    """
    if "SUBMITIT_FOLDER" not in os.environ:  # set by submitit for the job it runs
        yield
        return
    import socket

    import submitit

    previous = signals.install_handlers()
    try:
        yield
    except Exception as exc:
        log.exception("%s failed", job_label(cfg))
        grid = f"sweep.strengths={sweep_grid(cfg)}" if cfg.train.fused else \
            f"regularizer.strength={cfg.regularizer.strength}"
        raise JobError(f"{job_label(cfg)} ({grid}) failed on {socket.gethostname()}: "
                       f"{cli.describe(exc)}; its log: {submitit.JobEnvironment().paths.stdout}") from None
    finally:
        signals.restore_handlers(previous)


def cluster_error(error: BaseException) -> BaseException:
    """submitit's error for a job that ended without a result (cancelled, killed), which carries
    the job's whole stderr, as one line: the job, its state and its log."""
    submitit = sys.modules.get("submitit")
    if submitit is None or not isinstance(error, submitit.core.utils.UncompletedJobError):
        return error
    found = re.search(r"Job (\S+) \(task: (\d+)\) with path (.+?)\s+has not produced any output "
                      r"\(state: ([^)]*)\)", str(error))
    if found is None:
        return error
    job, task, result, state = found.groups()
    return JobError(f"job {job} ended {state} without a result; its log: "
                    f"{Path(result).with_name(f'{job}_{task}_log.out')}")
