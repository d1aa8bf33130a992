"""From a user's command line to the Hydra app's: params.yaml, the lambda grid, early checks.

``python -m l2sweep.train -m`` sweeps ``sweep.strengths`` (from params.yaml) in one Hydra
multirun; an explicit ``regularizer.strength=a,b`` or another sweeper (``hydra/sweeper=...``)
replaces that grid. Everything is validated here, before Hydra starts any job, so a typo
costs nothing.
"""

from __future__ import annotations

import os
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf

from l2sweep.config import (ConfigError, compose_config, format_override_value, override_key,
                            project_overrides, validate, validate_strengths)
from l2sweep.tracking import JOBS_ENV

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


def _sweep_values(overrides: list[str]) -> dict[str, list[Any]]:
    """Key -> list of values for every choice sweep (``a=1,2``) among ``overrides``."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ConfigError("override", " ".join(overrides), f"Hydra's override grammar ({exc})") from None
    return {o.get_key_element().lstrip("+~"): list(o.sweep_iterator()) for o in parsed
            if o.is_sweep_override() and o.is_choice_sweep()}


def launch_argv(args: list[str]) -> list[str]:
    """The Hydra app's argv for a user's ``args``.

    Layers params.yaml under the command-line overrides, fills in ``sweep.strengths`` as the
    multirun grid when none is given, and composes + validates the config of the first job
    (and every swept lambda) so a bad value fails here with the key named.

    Raises:
        ConfigError: a value is out of range or the grid is empty, repeated or not numeric.
    """
    flags, cli = split_args(args)
    overrides = project_overrides(cli)
    multirun = bool(_MULTIRUN_FLAGS & set(flags)) or "hydra.mode=MULTIRUN" in overrides
    keys = {override_key(o) for o in cli}
    swept = _sweep_values(overrides)
    custom_sweeper = any(k.startswith("hydra/sweeper") or k.startswith("hydra.sweeper") for k in keys)

    first = [o for o in overrides if override_key(o) not in swept]
    first += [f"{k}={format_override_value(v[0])}" for k, v in swept.items()]
    try:
        cfg = compose_config(first, with_params=False)
    except HydraException as exc:
        raise ConfigError("override", " ".join(cli) or "(params.yaml)", str(exc).splitlines()[0]) from None
    validate(cfg)

    if STRENGTH in swept:
        validate_strengths([_number(STRENGTH, v) for v in swept[STRENGTH]], key=STRENGTH)
    elif multirun and STRENGTH not in keys and not custom_sweeper and not cfg.train.fused:
        grid = validate_strengths(list(OmegaConf.to_container(cfg.sweep.strengths)))
        overrides.append(f"{STRENGTH}=" + ",".join(repr(v) for v in grid))
        swept[STRENGTH] = grid
    jobs = 1
    for values in swept.values():
        jobs *= len(values)
    os.environ[JOBS_ENV] = str(jobs)
    return flags + overrides


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, value, "a number >= 0")
    return float(value)
