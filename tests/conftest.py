"""Shared fixtures: tiny learnable data and the real config shrunk to it (all under tmp_path)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from omegaconf import DictConfig

from l2sweep.base.config import compose_config, format_override_value, merge_overrides
from l2sweep.base.idx import write_idx

#: File names of the four IDX files (as in conf/dataset/idx_dir.yaml).
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
TINY_TRAIN, TINY_TEST = 500, 100


def make_images(n: int, seed: int = 0, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Tiny learnable data: class ``c`` lights a 7x7 block at its own place, plus noise.

    Args:
        n: number of examples (classes are balanced, in random order).
        seed: seeds labels and noise.
        num_classes: at most 16 (one block position each).

    Returns:
        (images uint8 (n, 28, 28), labels int64 (n,)).
    """
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    x = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
    for c in range(num_classes):
        r, col = (c // 4) * 7, (c % 4) * 7
        idx = np.flatnonzero(y == c)
        x[idx, r:r + 7, col:col + 7] = rng.integers(180, 256, size=(len(idx), 7, 7), dtype=np.uint8)
    return x, y


@pytest.fixture(scope="session")
def tiny_arrays() -> dict[str, np.ndarray]:
    """``x_train y_train x_test y_test`` of the tiny dataset (500 train, 100 test)."""
    x_train, y_train = make_images(TINY_TRAIN, seed=0)
    x_test, y_test = make_images(TINY_TEST, seed=1)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def write_idx_dir(folder: Path, arrays: dict[str, np.ndarray],
                  gz: tuple[str, ...] = ("x_train", "y_test")) -> Path:
    """Writes the four IDX files into ``folder``; roles in ``gz`` as ``<name>.gz``."""
    folder.mkdir(parents=True, exist_ok=True)
    for role, name in IDX_FILES.items():
        array = arrays[role].astype(np.uint8)
        compress = role in gz
        write_idx(folder / (name + (".gz" if compress else "")), array, compress=compress)
    return folder


@pytest.fixture(scope="session")
def tiny_xy(tiny_arrays: dict[str, np.ndarray]):
    """((x, y), (x_val, y_val)): float32 images in [0, 1] from the tiny set, 256 train, 64 val."""
    x = tiny_arrays["x_train"].astype("float32") / 255.0
    y = tiny_arrays["y_train"]
    return (x[:256], y[:256]), (x[256:320], y[256:320])


def model_cfg(*overrides: str) -> DictConfig:
    """The real config (conf/, no params.yaml) with ``overrides``; XLA off unless asked for
    (compiling costs more than a tiny fit)."""
    return compose_config(["train.jit_compile=false", *overrides], with_params=False)


@pytest.fixture
def tiny_idx_dir(tmp_path: Path, tiny_arrays: dict[str, np.ndarray]) -> Path:
    """A folder with the four tiny IDX files, two gzipped and two plain."""
    return write_idx_dir(tmp_path / "tiny_idx", tiny_arrays)


@pytest.fixture
def tiny_npz(tmp_path: Path, tiny_arrays: dict[str, np.ndarray]) -> Path:
    """The tiny dataset as one ``.npz`` with keys ``x_train y_train x_test y_test``."""
    path = tmp_path / "tiny.npz"
    np.savez(path, **tiny_arrays)
    return path


def override(key: str, value: object) -> str:
    """``key=value`` in Hydra's grammar, the value quoted where needed (paths, URIs)."""
    return f"{key}={format_override_value(value)}"


@pytest.fixture
def tiny_cfg(tmp_path: Path, tiny_idx_dir: Path) -> Callable[..., DictConfig]:
    """Factory: the real config (conf/, no params.yaml) shrunk to the tiny data under tmp_path.

    ``tiny_cfg("train.epochs=2", ...)`` adds or replaces overrides.
    """

    def make(*overrides: str) -> DictConfig:
        base = [
            "dataset=idx_dir",
            override("dataset.path", str(tiny_idx_dir)),
            "train.epochs=1",
            override("tracking.uri", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"),
        ]
        base += [override(f"paths.{key}", str(tmp_path / rel)) for key, rel in (
            ("raw", "data/raw"), ("prepared", "data/prepared"), ("models", "models"),
            ("metrics", "metrics/eval.json"), ("plots", "plots"), ("reports", "reports"),
            ("outputs", "outputs"))]
        return compose_config(merge_overrides(base, list(overrides)), with_params=False)

    return make


@pytest.fixture
def prepared_tiny(tiny_cfg: Callable[..., DictConfig]) -> DictConfig:
    """The tiny config after ``prepare`` ran on it (``cfg.paths.prepared`` is filled)."""
    from l2sweep.prepare import prepare

    cfg = tiny_cfg()
    prepare(cfg)
    return cfg


@pytest.fixture
def prepared_project(tmp_path: Path, tiny_arrays: dict[str, np.ndarray], monkeypatch) -> Path:
    """A throwaway project as the current directory: the tiny data as an ``idx_dir`` dataset,
    params.yaml (helpers.write_project_params), ``prepare`` run in-process, no MLflow store.

    For entry points called in-process (``train.main([...])``) that fail before Hydra starts.
    """
    from helpers import write_project_params
    from l2sweep.prepare import main as prepare_main

    monkeypatch.chdir(tmp_path)
    for name in ("L2SWEEP_PARAMS", "HYDRA_FULL_ERROR", "MLFLOW_TRACKING_URI", "L2SWEEP_JOBS"):
        monkeypatch.setenv(name, "")  # restored (or removed) after the test
        monkeypatch.delenv(name)
    write_project_params(tmp_path, write_idx_dir(tmp_path / "raw_tiny", tiny_arrays))
    assert prepare_main([]) == 0
    return tmp_path
