"""DVC stage ``prepare``: load and verify the dataset, split it, write ``paths.prepared``.

Run it as ``dvc repro prepare`` or on its own::

    python -m l2sweep.prepare                                   # params.yaml over conf/
    python -m l2sweep.prepare data.limit=2000 data.seed=1       # Hydra overrides win
    python -m l2sweep.prepare dataset=idx_dir dataset.path=/my/idx/folder
    python -m l2sweep.prepare dataset=npz dataset.path=/my/data.npz

It writes ``train.npz``, ``val.npz``, ``test.npz`` and ``meta.json`` (provenance) into
``paths.prepared``. Bad input prints one ``error:`` line and exits 2; ``--verbose`` shows the
traceback.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from omegaconf import DictConfig

from l2sweep.base.cli import entry_point
from l2sweep.base.config import compose_config, validate
from l2sweep.base.data import apply_limit, class_counts, load_dataset, save_prepared, stratified_split


def prepare(cfg: DictConfig) -> dict[str, Any]:
    """Loads ``cfg.dataset``, splits it per ``cfg.data``, saves it to ``cfg.paths.prepared`` and
    returns the provenance written as ``meta.json``.

    Raises:
        DataError: the dataset is unobtainable or malformed.
        ConfigError: ``data.*`` cannot be honoured by this dataset.
    """
    raw = load_dataset(cfg.dataset, cfg.paths.raw)
    data = cfg.data
    train_idx, val_idx = stratified_split(raw.y_train, data.val_fraction, data.seed)
    train_idx = train_idx[apply_limit(raw.y_train[train_idx], data.limit, data.seed)]
    splits = {
        "train": (raw.x_train[train_idx], raw.y_train[train_idx]),
        "val": (raw.x_train[val_idx], raw.y_train[val_idx]),
        "test": (raw.x_test, raw.y_test),
    }
    meta = {
        "dataset": raw.name,
        "format": cfg.dataset.format,
        "source": raw.source,
        "checksums": raw.checksums,
        "val_fraction": data.val_fraction,
        "seed": data.seed,
        "limit": data.limit,
        "image_shape": list(raw.x_train.shape[1:]),
        "splits": {name: {"size": int(len(y)), "class_counts": class_counts(y)}
                   for name, (_, y) in splits.items()},
    }
    save_prepared(cfg.paths.prepared, splits, meta)
    return meta


def summary(meta: dict[str, Any], out_dir: str) -> str:
    """A short human summary of what :func:`prepare` wrote."""
    sizes = "  ".join(f"{name} {info['size']}" for name, info in meta["splits"].items())
    return f"prepared {meta['dataset']} from {meta['source']}\n  {sizes}  ->  {out_dir}"


@entry_point()
def main(overrides: list[str]) -> int:
    """``python -m l2sweep.prepare [--verbose] [overrides...]``."""
    cfg = compose_config(overrides)
    validate(cfg)
    start = time.perf_counter()
    meta = prepare(cfg)
    print(f"{summary(meta, cfg.paths.prepared)}  ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
