"""Typed configuration: the schema, composing it (:func:`compose_config`) and :func:`validate`.

Layering, lowest first: the dataclass defaults below, ``conf/``, ``params.yaml``, then
command-line overrides. A misspelt key (also one added with ``+key=``) or a wrong type fails at
compose time with the key named; well-typed values out of range fail in :func:`validate`.
The params file must exist: ``./params.yaml``, or the file ``L2SWEEP_PARAMS`` names; set
``L2SWEEP_PARAMS=`` (empty) to run on ``conf/`` defaults alone (:func:`params_setting`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from l2sweep.base.config_errors import ConfigError, check_declared, explained, override_key
from l2sweep.base.grid import (finite_number, sweep_grid, validate_compare, validate_folds, validate_seeds,
                               validate_strength, validate_strengths)  # noqa: F401 (re-exported)

#: The repository's ``conf/`` folder (the package is installed editable).
CONF_DIR = Path(__file__).resolve().parents[3] / "conf"
#: Where entry points look for the DVC-tracked values, in the current folder, unless
#: :data:`PARAMS_ENV` names another file (set empty: ``conf/`` defaults alone).
DEFAULT_PARAMS_FILE = "params.yaml"
#: The environment variable that names the params file (:func:`params_setting`).
PARAMS_ENV = "L2SWEEP_PARAMS"
#: Config groups whose ``name`` key selects a file in ``conf/<group>/``.
GROUPS = ("dataset", "model", "regularizer")

DATASETS = ("fashion_mnist", "mnist", "idx_dir", "npz")
MODELS = ("mlp", "cnn")
REGULARIZERS = ("l2", "l1", "l1_l2", "weight_decay", "adamw", "dropout", "none")
LOOPS = ("auto", "compiled", "keras")
#: Models the compiled loop (and so the fused sweep) can run.
FUSABLE_MODELS = ("mlp",)


@dataclass
class DatasetConfig:
    """Which images to train on and where they may be found."""

    name: str = MISSING  # fashion_mnist, mnist, idx_dir or npz
    format: str = "idx"  # idx (four IDX files, gzipped or not) or npz (one archive)
    path: Optional[str] = None  # idx_dir/npz: the user's folder or file
    files: dict[str, str] = field(default_factory=dict)  # role (x_train... or archive) -> name
    sha256: dict[str, str] = field(default_factory=dict)  # role -> pinned SHA-256 (IDX: unzipped)
    search: list[str] = field(default_factory=list)  # folders tried in order before downloading
    url: Optional[str] = None  # base URL of ``files`` (IDX as <name>.gz); null = never download


@dataclass
class DataConfig:
    """How the official training set is split and trimmed."""

    val_fraction: float = 1 / 6  # share held out for validation (stratified)
    limit: Optional[int] = None  # cap on the training examples after the split; null = all
    seed: int = 42  # seed of the split (and of the cross-validation folds)
    # k-fold cross-validation of the training pool (train + validation splits): every strength
    # trains on k-1 folds and validates on the other; null: off (l2sweep.base.data.stratified_folds)
    folds: Optional[int] = None


@dataclass
class ModelConfig:
    """The network."""

    name: str = "mlp"  # mlp (the seeds' model) or cnn (seed 004's small CNN)
    hidden_units: int = 128  # width of the regularized hidden Dense layer
    conv_filters: list[int] = field(default_factory=list)  # cnn: filters of each 3x3 conv layer


@dataclass
class RegularizerConfig:
    """The regularizer under study (each kind's formula: its file in conf/regularizer/)."""

    # l2, l1, l1_l2, weight_decay (coupled: lambda * w added to the gradient), adamw (decoupled:
    # AdamW's w -= lr * lambda * w), dropout (strength = the rate) or none
    name: str = "l2"
    strength: float = 0.001  # lambda of one run (dropout: the rate, in [0, 1); none: 0)
    # the kind's own lambda grid, swept when sweep.strengths is null; []: no grid, `strength`
    # trains once (none)
    strengths: list[float] = field(default_factory=list)
    l1_ratio: float = 0.5  # l1_l2 only: share of lambda given to the L1 term


@dataclass
class TrainConfig:
    """Optimisation settings (the seeds': Adam, batch 32, 10 epochs)."""

    epochs: int = 10  # passes over the training split
    batch_size: int = 32  # examples per gradient step
    learning_rate: float = 0.001  # Adam's (or AdamW's)
    seed: int = 42  # seeds weights, shuffling and TF ops of a run (sweep.seeds, if set, gives each its own)
    steps_per_execution: int = 32  # keras loop: batches per compiled call (speed only)
    # keras loop: examples per validation step (speed only); null: batch_size
    validation_batch_size: Optional[int] = 1000
    jit_compile: bool = True  # compile the train step with XLA (Keras' "auto": off on CPU)
    deterministic: bool = True  # TensorFlow op determinism (same seed -> same metrics)
    fused: bool = False  # train every lambda of the grid at once as one vectorized model
    # compiled (l2sweep.engine.compiled: fit's results, one call per epoch; mlp only),
    # keras (Model.fit) or auto (compiled for mlp)
    loop: str = "auto"
    threads: Optional[int] = None  # TF intra-op threads; null: 1 for one compiled model, else all


@dataclass
class SweepConfig:
    """The lambda grid (:func:`sweep_grid`)."""

    # the values of regularizer.strength one sweep trains; null: the regularizer's own grid
    # (regularizer.strengths)
    strengths: Optional[list[float]] = None
    # the seeds every lambda trains with, one run each (replicates: the report's intervals come
    # from them); null: train.seed alone, the seeds' single-run experiment
    seeds: Optional[list[int]] = None
    # a comparison of kinds in one multirun, a job per kind: kind -> its grid (null: the kind's own,
    # regularizer.strengths; none: []), e.g. {l2: null, dropout: null, l1: null, none: []}; it
    # wins over regularizer and sweep.strengths. null: one kind
    compare: Any = None


@dataclass
class TrackingConfig:
    """MLflow."""

    uri: str = "sqlite:///mlruns/mlflow.db"  # tracking URI; MLFLOW_TRACKING_URI wins
    experiment: str = "l2-sweep"  # experiment name
    enabled: bool = True  # log to MLflow at all (off only for benchmarks)
    log_model: bool = True  # log the trained model as an MLflow model
    registered_model: str = "l2sweep-${model.name}"  # evaluate registers the best λ's model here, alias champion
    system_metrics: bool = False  # log CPU/memory/GPU use (system/*) to each run, every 10 s
    histogram_bins: int = 50  # bins of the per-epoch weight histograms


@dataclass
class PathsConfig:
    """Where stages read and write, relative to the repository root (dvc.yaml: the same keys)."""

    raw: str = "data/raw"  # downloaded or user-placed raw datasets
    prepared: str = "data/prepared"  # split data and meta.json written by prepare
    models: str = "models"  # one folder per run (models/<run_name>/) written by train
    metrics: str = "metrics/eval.json"  # the DVC metrics file written by evaluate (few numbers)
    plots: str = "plots"  # DVC plot data written by evaluate
    reports: str = "reports"  # evaluation.json (what the gate reads), the report and its figures
    outputs: str = "outputs"  # Hydra's run/sweep folders (logs, resolved configs)


@dataclass
class GateConfig:
    """The CI regression gate."""

    baseline: str = "metrics/baseline.json"  # an evaluation.json to compare reports/evaluation.json with
    max_accuracy_drop: float = 0.005  # largest allowed drop of any lambda's test accuracy
    max_loss_increase: float = 0.05  # largest allowed relative rise of any lambda's test loss


@dataclass
class Config:
    """The whole configuration of one run."""

    run_name: str = MISSING
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    gate: GateConfig = field(default_factory=GateConfig)


# conf/config.yaml's defaults list starts with this schema.
ConfigStore.instance().store(name="schema", node=Config)


class ParamsFileError(ConfigError):
    """The params file is missing or holds no mapping: ``<file>: <problem>; <what to do>``
    (not ``key=value``: a file is no config key). Bad input, like any ConfigError (exit 2)."""

    def __init__(self, path: str, problem: str, allowed: str) -> None:
        super().__init__(PARAMS_ENV, path, allowed)
        self.args = (f"{path}: {problem}; {allowed}",)


def params_setting() -> Optional[Path]:
    """The params file entry points layer over ``conf/``: ``$L2SWEEP_PARAMS``, else
    ``./params.yaml``. None when ``L2SWEEP_PARAMS`` is set empty (``L2SWEEP_PARAMS= python -m
    l2sweep.train``): the deliberate way to run on ``conf/`` defaults alone. A file that is not
    there is an error (:func:`load_params`), never a silent fall-back to those defaults."""
    value = os.environ.get(PARAMS_ENV)
    if value is None:
        return Path(DEFAULT_PARAMS_FILE)
    return Path(value) if value.strip() else None


def params_file() -> Optional[Path]:
    """The params file if it exists, else None (for naming it in error messages)."""
    path = params_setting()
    return path if path is not None and path.is_file() else None


def format_override_value(value: Any) -> str:
    """Renders a YAML value in Hydra's override grammar (quoted where needed)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_override_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{format_override_value(v)}" for k, v in value.items()) + "}"
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


#: Keys whose value is a mapping of its own (not schema keys below it): overridden whole.
WHOLE_VALUES = ("sweep.compare",)


def params_overrides(params: dict[str, Any]) -> list[str]:
    """params.yaml's values as Hydra overrides: group choices first (``dataset: {name: mnist}``
    -> ``dataset=mnist``), then every other leaf as ``key=value``."""
    choices: list[str] = []
    values: list[str] = []

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node and prefix not in WHOLE_VALUES:
            for key, child in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), child)
        else:
            values.append(f"{prefix}={format_override_value(node)}")

    for key, node in (params or {}).items():
        if key in GROUPS and isinstance(node, dict):
            node = dict(node)
            if "name" in node:
                choices.append(f"{key}={node.pop('name')}")
            if node:
                walk(key, node)
        elif key in GROUPS and isinstance(node, str):
            choices.append(f"{key}={node}")
        else:
            walk(str(key), node)
    return choices + values


def merge_overrides(base: list[str], top: list[str]) -> list[str]:
    """Overrides of ``base`` that ``top`` does not set again, followed by ``top``."""
    top_keys = {override_key(o) for o in top}
    return [o for o in base if override_key(o) not in top_keys] + list(top)


def load_params(path: Optional[Path] = None) -> dict[str, Any]:
    """Reads the params file: ``path``, else :func:`params_setting`'s; {} for an empty file, or
    when ``L2SWEEP_PARAMS=`` (empty) asks for ``conf/`` defaults alone.

    Raises:
        ParamsFileError: the file does not exist, or holds something other than a mapping.
        yaml.YAMLError: it is not valid YAML.
    """
    from_env = path is None and os.environ.get(PARAMS_ENV) is not None
    path = path if path is not None else params_setting()
    if path is None:
        return {}
    if not path.is_file():
        raise missing_params(path, from_env)
    with open(path, encoding="utf-8") as f:
        params = yaml.safe_load(f)
    if params is not None and not isinstance(params, dict):
        raise ParamsFileError(str(path), f"holds a {type(params).__name__} ({str(params)[:40]}), "
                              "not a mapping", "expected sections such as `train: {epochs: 10}`")
    return params or {}


def missing_params(path: Path, from_env: bool) -> ParamsFileError:
    """The error for the params file ``path`` that is not there (or is a folder), saying how to
    name another one or to run on ``conf/`` defaults alone; ``from_env``: L2SWEEP_PARAMS named it."""
    where = "is a folder" if path.is_dir() else f"no such file (in {Path.cwd()})"
    if from_env:
        return ParamsFileError(f"{PARAMS_ENV}={path}", where, f"point {PARAMS_ENV} at a params "
                               f"file, or set it empty ({PARAMS_ENV}=) to run on conf/ defaults alone")
    if path == Path(DEFAULT_PARAMS_FILE):
        return ParamsFileError(str(path), where, "run from the repository root (where params.yaml "
                               f"is), point {PARAMS_ENV} at a params file, or set {PARAMS_ENV}= "
                               "(empty) to run on conf/ defaults alone")
    return ParamsFileError(str(path), where, "a params file")


def project_overrides(cli: list[str], params_path: Optional[Path] = None) -> list[str]:
    """params.yaml's overrides, then ``cli`` (which wins)."""
    return merge_overrides(params_overrides(load_params(params_path)), cli)


def compose_config(overrides: list[str] | None = None, *, with_params: bool = True,
                   params_path: Optional[Path] = None) -> DictConfig:
    """Composes ``conf/`` + params.yaml (``params_path`` or :func:`params_file`; if ``with_params``)
    + ``overrides`` outside a Hydra app, with interpolations resolved."""
    overrides = list(overrides or [])
    if with_params:
        overrides = project_overrides(overrides, params_path)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"), \
            explained(overrides, Config):
        cfg = compose(config_name="config", overrides=overrides)
    check_declared(cfg, Config)  # a ``+key=...`` the schema lacks
    OmegaConf.resolve(cfg)
    return cfg


def _positive_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(key, value, "a positive integer")


def _non_empty(key: str, value: Any, allowed: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, value, allowed)


def validate(cfg: DictConfig | Config) -> None:
    """Checks value ranges the schema's types cannot express.

    Raises:
        ConfigError: naming the first bad key, its value and what is allowed.
    """
    choice = {"dataset.name": (cfg.dataset.name, DATASETS), "model.name": (cfg.model.name, MODELS),
              "regularizer.name": (cfg.regularizer.name, REGULARIZERS),
              "train.loop": (cfg.train.loop, LOOPS)}
    for key, (value, allowed) in choice.items():
        if value not in allowed:
            raise ConfigError(key, value, f"one of {', '.join(allowed)}")
    if cfg.dataset.name in ("idx_dir", "npz") and not cfg.dataset.path:
        raise ConfigError("dataset.path", cfg.dataset.path, f"the path of your {cfg.dataset.name} data")
    vf = cfg.data.val_fraction
    if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0 < vf < 1:
        raise ConfigError("data.val_fraction", vf, "a number strictly between 0 and 1")
    if cfg.data.limit is not None:
        _positive_int("data.limit", cfg.data.limit)
    validate_strength("regularizer.strength", cfg.regularizer.strength, cfg.regularizer.name)
    if not 0 <= cfg.regularizer.l1_ratio <= 1:
        raise ConfigError("regularizer.l1_ratio", cfg.regularizer.l1_ratio, "a number in [0, 1]")
    _positive_int("train.epochs", cfg.train.epochs)
    _positive_int("train.batch_size", cfg.train.batch_size)
    _positive_int("train.steps_per_execution", cfg.train.steps_per_execution)
    if cfg.train.validation_batch_size is not None:
        _positive_int("train.validation_batch_size", cfg.train.validation_batch_size)
    finite_number("train.learning_rate", cfg.train.learning_rate, minimum=0.0, inclusive=False)
    if cfg.train.threads is not None:
        _positive_int("train.threads", cfg.train.threads)
    validate_compare(cfg.sweep.compare, REGULARIZERS)
    sweep_grid(cfg)
    seeds = cfg.sweep.seeds
    validate_seeds(None if seeds is None else list(seeds))
    if validate_folds(cfg.data.folds) and cfg.sweep.compare:
        raise ConfigError("data.folds", cfg.data.folds, "null with sweep.compare (cross-validation "
                          "runs one kind's grid; compare kinds with data.folds=null)")
    _positive_int("model.hidden_units", cfg.model.hidden_units)
    if cfg.train.loop == "compiled" and cfg.model.name not in FUSABLE_MODELS:
        raise ConfigError("train.loop", cfg.train.loop,
                          f"auto or keras for model.name={cfg.model.name} (the compiled loop runs "
                          f"only {' or '.join(FUSABLE_MODELS)})")
    if cfg.train.fused and cfg.model.name not in FUSABLE_MODELS:
        raise ConfigError("model.name", cfg.model.name,
                          f"{' or '.join(FUSABLE_MODELS)} with train.fused=true (the fused sweep "
                          "trains only the MLP at once); run this model with train.fused=false")
    # An empty URI would track into a stray ./mlflow.db, an empty name fail after training.
    _non_empty("tracking.uri", cfg.tracking.uri, "a tracking URI such as sqlite:///mlruns/mlflow.db,"
               " a folder or http://host:5000 (MLFLOW_TRACKING_URI wins over it)")
    _non_empty("tracking.experiment", cfg.tracking.experiment, "a non-empty experiment name")
    finite_number("gate.max_accuracy_drop", cfg.gate.max_accuracy_drop, minimum=0.0)
    finite_number("gate.max_loss_increase", cfg.gate.max_loss_increase, minimum=0.0)


def training_loop(cfg: DictConfig | Config) -> str:
    """``compiled`` or ``keras``: what ``train.loop`` picks for ``cfg.model``."""
    if cfg.train.loop == "compiled" or (cfg.train.loop == "auto" and cfg.model.name in FUSABLE_MODELS):
        return "compiled"  # validate() refused compiled for a model it cannot run
    return "keras"


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, Any]:
    """Flattens a config to ``{"a.b.c": value}`` (lists kept as values), e.g. for MLflow params."""
    node = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
