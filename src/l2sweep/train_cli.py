"""From a user's command line to the Hydra app's: params.yaml, the lambda grid, early checks.

``python -m l2sweep.train -m`` sweeps ``sweep.strengths`` (from params.yaml) in one Hydra
multirun; an explicit ``regularizer.strength=a,b`` or another sweeper (``hydra/sweeper=...``)
replaces that grid. Everything is validated here, before Hydra starts any job, so a typo
costs nothing.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from l2sweep.base.config import (ConfigError, compose_config, format_override_value, override_key,
                            project_overrides, validate, validate_strengths)
from l2sweep.tracking.runs import JOBS_ENV

#: Hydra's own command-line flags that take a value.
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name",
                "-cn", "--config-dir", "-cd", "--experimental-rerun"}
_MULTIRUN_FLAGS = {"-m", "--multirun"}
STRENGTH = "regularizer.strength"
#: ``hydra/launcher=fused`` is an alias of ``train.fused=true`` (l2sweep.engine.compiled), not a plugin.
FUSED_ALIAS = ("hydra/launcher=fused", "train.fused=true")


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


def launch_argv(args: list[str], check: Optional[Callable[[DictConfig], None]] = None) -> list[str]:
    """The Hydra app's argv for a user's ``args``.

    Layers params.yaml under the command-line overrides, fills in ``sweep.strengths`` as the
    multirun grid when none is given, and composes + validates the config of the first job
    (and every swept lambda) so a bad value fails here with the key named. ``check`` (e.g.
    :func:`l2sweep.preflight.preflight`) then gets that validated config.

    Raises:
        ConfigError: a value is out of range or the grid is empty, repeated or not numeric.
    """
    flags, cli = split_args(args)
    cli = [FUSED_ALIAS[1] if o == FUSED_ALIAS[0] else o for o in cli]
    overrides = project_overrides(cli)
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
    if cfg.train.fused:
        overrides = _fused_overrides(cfg, overrides, swept, multirun)
    if STRENGTH in swept:
        validate_strengths([_number(STRENGTH, v) for v in swept[STRENGTH]], key=STRENGTH)
    elif multirun and STRENGTH not in keys and not custom_sweeper and not cfg.train.fused:
        grid = validate_strengths(list(OmegaConf.to_container(cfg.sweep.strengths)))
        overrides.append(f"{STRENGTH}=" + ",".join(repr(v) for v in grid))
        swept[STRENGTH] = grid
    jobs = 1
    for values in swept.values():
        jobs *= len(values)
    if custom_sweeper or searched:  # a search sweeper decides how many jobs (n_trials)
        os.environ.pop(JOBS_ENV, None)
    else:
        os.environ[JOBS_ENV] = str(jobs)
    if check is not None:  # after every validation: bad input writes nothing
        check(cfg)
    return flags + overrides


def _fused_overrides(cfg: Any, overrides: list[str], swept: dict[str, list[Any]],
                     multirun: bool) -> list[str]:
    """A fused sweep trains its whole grid in one job: a swept ``regularizer.strength=a,b``
    becomes that job's ``sweep.strengths=[a,b]`` (``swept`` is updated), and the job's folder
    is named for what it holds."""
    from l2sweep.engine.compiled import check_fusable

    check_fusable(cfg)
    if STRENGTH in swept:
        grid = validate_strengths([_number(STRENGTH, v) for v in swept.pop(STRENGTH)], key=STRENGTH)
        overrides = [o for o in overrides if override_key(o) != STRENGTH]
        overrides.append("sweep.strengths=" + format_override_value(grid))
    else:
        validate_strengths(list(OmegaConf.to_container(cfg.sweep.strengths)))
    if multirun and not any(override_key(o) == "hydra.sweep.subdir" for o in overrides):
        overrides.append("hydra.sweep.subdir=${regularizer.name}-fused-${hydra.job.num}")
    return overrides


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, value, "a number >= 0")
    return float(value)
