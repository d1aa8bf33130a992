"""Where a run writes: into DVC's stage outputs under ``dvc repro``, into a folder of its own
otherwise, so an ad-hoc run never mixes into what ``dvc.lock`` records.

DVC sets ``DVC_STAGE`` for every stage command (``dvc repro``, ``dvc exp run``). Outside a stage,
``python -m l2sweep.train`` that would write into params.yaml's ``paths.models`` goes to Hydra's
usual timestamped folder instead (``multirun/<date>/<time>/``, or ``outputs/<date>/<time>/``
without ``-m``), models in its ``models/``; and ``python -m l2sweep.evaluate
paths.models=<that>/models`` writes its metrics, plots and report beside those models. A path
given on the command line is always used as given.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from l2sweep.base.config import format_override_value

#: Set by DVC for every stage command.
DVC_STAGE_ENV = "DVC_STAGE"
#: The ``paths.*`` keys whose params.yaml values dvc.yaml declares as stage outputs
#: (tests/unit/test_dvc_deps.py checks dvc.yaml against it).
DVC_OUTPUTS = ("prepared", "models", "metrics", "plots", "reports")
#: The files, beside each other, that make a folder a DVC project with our pipeline.
PROJECT_FILES = ("dvc.yaml", "params.yaml")
#: Evaluate's outputs, relative to the sweep folder of an ad-hoc run.
EVALUATE_OUTPUTS = {"metrics": "metrics/eval.json", "plots": "plots", "reports": "reports"}


def in_dvc_stage() -> bool:
    """Whether this process is a DVC stage command."""
    return bool(os.environ.get(DVC_STAGE_ENV))


def dvc_outputs() -> dict[str, Path]:
    """``paths.<key>`` -> the folder or file DVC tracks for it (params.yaml's values, resolved),
    when this folder is the project's (dvc.yaml beside params.yaml); else empty."""
    if not all(Path(name).is_file() for name in PROJECT_FILES):
        return {}
    try:
        paths = (yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8")) or {}).get("paths")
    except (OSError, yaml.YAMLError, AttributeError):
        return {}  # the config checks report an unreadable params.yaml
    if not isinstance(paths, dict):
        return {}
    return {key: Path(paths[key]).resolve() for key in DVC_OUTPUTS if isinstance(paths.get(key), str)}


def is_dvc_output(key: str, value: Any) -> bool:
    """Whether ``paths.<key>`` = ``value`` is the output DVC tracks for that key."""
    tracked = dvc_outputs().get(key)
    return tracked is not None and Path(str(value)).resolve() == tracked


def adhoc_train_folder(models: str, given: set[str], multirun: bool, outputs: str) -> Optional[Path]:
    """The timestamped folder of an ad-hoc ``train`` (see the module doc), or None: under
    ``dvc repro``, when the command line sets ``paths.models``, or when it is not DVC's.

    Args:
        models: ``paths.models`` as composed.
        given: the keys the command line sets.
        multirun: whether Hydra runs a multirun (``-m``): ``multirun/<date>/<time>``, else
            ``<outputs>/<date>/<time>``, as Hydra names its folders.
        outputs: ``paths.outputs``.
    """
    if in_dvc_stage() or "paths.models" in given or not is_dvc_output("models", models):
        return None
    return Path("multirun" if multirun else outputs) / time.strftime("%Y-%m-%d/%H-%M-%S")


def train_overrides(folder: Path, given: set[str], multirun: bool) -> list[str]:
    """``paths.models`` under ``folder``, and Hydra's run or sweep folder there (unless given)."""
    hydra_dir = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    overrides = [f"paths.models={format_override_value((folder / 'models').as_posix())}"]
    if hydra_dir not in given:
        overrides.append(f"{hydra_dir}={format_override_value(folder.as_posix())}")
    return overrides


def adhoc_evaluate_paths(paths: Any, given: set[str]) -> dict[str, str]:
    """``paths.<key>`` -> where ``evaluate`` of an ad-hoc sweep (models outside DVC's) writes it:
    beside its models, for each of its outputs that is DVC's and not set on the command line."""
    if in_dvc_stage() or is_dvc_output("models", paths.models) or not dvc_outputs():
        return {}
    sweep = Path(str(paths.models)).parent
    return {key: (sweep / rel).as_posix() for key, rel in EVALUATE_OUTPUTS.items()
            if f"paths.{key}" not in given and is_dvc_output(key, paths[key])}
