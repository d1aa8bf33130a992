"""The grid a sweep trains: each strength, the λ grid (:func:`sweep_grid`), the replicate seeds,
a comparison of kinds (``sweep.compare``) and k-fold cross-validation (``data.folds``): checks
that name the key, the bad value and what is allowed (:class:`ConfigError`)."""

from __future__ import annotations

import math
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from l2sweep.base.config_errors import ConfigError


def finite_number(key: str, value: Any, *, minimum: float, inclusive: bool = True) -> None:
    op = ">=" if inclusive else ">"
    allowed = f"a finite number {op} {minimum:g}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(key, value, allowed)
    if value < minimum or (not inclusive and value == minimum):
        raise ConfigError(key, value, allowed)


def validate_strength(key: str, value: Any, kind: str) -> None:
    """Checks one strength of regularizer ``kind``: a finite number >= 0; for dropout a rate in
    [0, 1); for none 0 (it has no strength: another value would train the same model again)."""
    finite_number(key, value, minimum=0.0)
    if kind == "dropout" and not value < 1:
        raise ConfigError(key, value, "a dropout rate in [0, 1)")
    if kind == "none" and value != 0:
        raise ConfigError(key, value, "0 for regularizer=none (it has no strength to vary; "
                          "sweep.strengths=null trains it once)")


def validate_strengths(strengths: Any, key: str = "sweep.strengths", kind: str = "l2") -> list[float]:
    """Checks a lambda grid of regularizer ``kind``: non-empty, each strength valid
    (:func:`validate_strength`), no duplicates. Returns it as floats."""
    if not isinstance(strengths, (list, tuple)) or not strengths:
        raise ConfigError(key, strengths, "a non-empty list of numbers >= 0 (null: the "
                          "regularizer's own grid, regularizer.strengths)")
    for value in strengths:
        validate_strength(key, value, kind)
    floats = [float(v) for v in strengths]
    if len(set(floats)) != len(floats):
        dupes = sorted({v for v in floats if floats.count(v) > 1})
        raise ConfigError(key, list(strengths), f"each lambda once (repeated: {dupes})")
    return floats


def sweep_grid(cfg: Any) -> list[float]:
    """The strengths one sweep (or one kind's job of a comparison) trains, validated for its
    regularizer: in a comparison (``sweep.compare``) the kind's entry; else ``sweep.strengths``
    when set (it wins), else the regularizer's own grid ``regularizer.strengths``; where that is
    empty (``none``) ``regularizer.strength`` alone: one configuration, trained once per seed.

    Raises:
        ConfigError: naming the key of the grid used, the bad value and what is allowed.
    """
    kind, explicit, key = cfg.regularizer.name, cfg.sweep.strengths, "sweep.strengths"
    compare = compared_kinds(cfg)
    if compare:
        explicit, key = compare.get(kind), f"sweep.compare.{kind}"
        if kind == "none" or kind not in compare:  # none: []; a kind outside it trains its own grid
            explicit = None
    if explicit is not None:
        return validate_strengths(list(explicit), key, kind)
    own = list(cfg.regularizer.strengths)
    if not own:
        validate_strength("regularizer.strength", cfg.regularizer.strength, kind)
        return [float(cfg.regularizer.strength)]
    return validate_strengths(own, "regularizer.strengths", kind)


def validate_seeds(seeds: Any, key: str = "sweep.seeds") -> Optional[list[int]]:
    """Checks the replicate seeds: null, or a non-empty list of distinct integers >= 0."""
    if seeds is None:
        return None
    allowed = "null or a non-empty list of distinct integers >= 0, e.g. [42, 43, 44]"
    if not isinstance(seeds, (list, tuple)) or not seeds or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ConfigError(key, seeds, allowed)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(key, list(seeds), f"{allowed} (each seed once)")
    return [int(s) for s in seeds]


def compared_kinds(cfg: Any) -> dict[str, Optional[list[float]]]:
    """``sweep.compare`` as kind -> its grid (None: the kind's own); {} when no comparison is set."""
    sweep = getattr(cfg, "sweep", None)  # (a config of an older sweep may lack it)
    compare = getattr(sweep, "compare", None) if sweep is not None else None
    if compare is None:
        return {}
    if isinstance(compare, DictConfig):
        compare = OmegaConf.to_container(compare)
    return dict(compare)


def validate_compare(compare: Any, kinds: tuple[str, ...]) -> dict[str, Optional[list[float]]]:
    """Checks ``sweep.compare``: null, or a mapping of at least two kinds of ``kinds`` to a grid
    each (:func:`validate_strengths`; null: the kind's own grid; ``none`` only [] or null)."""
    if compare is None:
        return {}
    if isinstance(compare, DictConfig):
        compare = OmegaConf.to_container(compare)
    example = "e.g. {l2: [0.0001, 0.001], dropout: null, none: []} (null: the kind's own grid)"
    if not isinstance(compare, dict) or len(compare) < 2:
        raise ConfigError("sweep.compare", compare, f"null or a mapping of two or more regularizer "
                          f"kinds to their grids, {example}")
    for kind, grid in compare.items():
        key = f"sweep.compare.{kind}"
        if kind not in kinds:
            raise ConfigError("sweep.compare", kind, f"kinds among {', '.join(kinds)}")
        if kind == "none":
            if grid not in (None, []):
                raise ConfigError(key, grid, "[] or null (none has no strength: it trains once per seed)")
        elif grid is not None:
            validate_strengths(grid, key, kind)
    return dict(compare)


def validate_folds(folds: Any) -> Optional[int]:
    """Checks ``data.folds``: null (no cross-validation) or an integer >= 2."""
    if folds is not None and (isinstance(folds, bool) or not isinstance(folds, int) or folds < 2):
        raise ConfigError("data.folds", folds, "null (no cross-validation) or an integer >= 2, e.g. 5")
    return folds
