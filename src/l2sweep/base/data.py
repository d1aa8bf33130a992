"""Datasets: find or download them (:func:`load_dataset`), split them, save and read the splits."""

from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf

from l2sweep.base import progress
from l2sweep.base.config import ConfigError
from l2sweep.base.files import replace_folder
from l2sweep.base.idx import (NUM_CLASSES, ROLES, DataError, check_images, check_labels, find_idx,
                              load_idx_folder, load_npz_file, read_bytes, sha256_bytes, sha256_file,
                              verify_sha256)

log = logging.getLogger(__name__)

#: The splits ``prepare`` writes.
SPLITS = ("train", "val", "test")
DOWNLOAD_TIMEOUT = 30.0
_USER_DATASETS = ("idx_dir", "npz")


@dataclass(frozen=True, eq=False)
class RawData:
    """A dataset as loaded and verified, before splitting: uint8 images (N, 28, 28) and int64
    labels 0-9, the folder, file or URL they came from, and role -> SHA-256."""

    name: str
    source: str
    checksums: dict[str, str]
    x_train: np.ndarray = field(repr=False)
    y_train: np.ndarray = field(repr=False)
    x_test: np.ndarray = field(repr=False)
    y_test: np.ndarray = field(repr=False)


def _get(ds: Any, key: str, default: Any = None) -> Any:
    """Reads ``ds.key`` from a DictConfig, dataclass or mapping; missing (``???``) -> default."""
    if isinstance(ds, DictConfig):
        value = OmegaConf.select(ds, key, default=default, throw_on_missing=False)
        return OmegaConf.to_container(value) if isinstance(value, DictConfig) or \
            OmegaConf.is_list(value) else value
    if isinstance(ds, Mapping):
        return ds.get(key, default)
    value = getattr(ds, key, default)
    return default if value == "???" else value


def _fetch(url: str, dest: Path, role: str, expected: Optional[str], decompress: bool,
           timeout: float) -> None:
    """Downloads ``url`` to ``dest`` (via a temp file) if its checksum matches; else deletes it."""
    log.info("downloading %s", url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            size = int(response.headers.get("Content-Length") or 0) or None
            with progress.byte_writer(out, size, dest.name) as writer:  # a bar on a terminal
                shutil.copyfileobj(response, writer, 1 << 20)
        actual = sha256_bytes(read_bytes(tmp, f"{url} (downloaded)")) if decompress else sha256_file(tmp)
        verify_sha256(f"{url} (downloaded)", role, actual, expected)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _download_error(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return str(e) or type(e).__name__


def _nothing_found(name: str, looked: Sequence[str], tried: str, wanted: str, target: Path) -> DataError:
    return DataError(
        f"dataset {name!r} not found locally and not downloadable. Looked in: {'; '.join(looked)}. "
        f"Download: {tried}. Put {wanted} into {target}/, or choose another dataset: "
        "dataset=idx_dir dataset.path=/folder/with/the/four/idx/files "
        "or dataset=npz dataset.path=/your/data.npz")


def _settings(ds: Any) -> tuple[str, str, dict[str, str], dict[str, str]]:
    """``ds``'s name, format, files and pinned checksums, once they make sense together."""
    name, fmt, path = _get(ds, "name"), _get(ds, "format", "idx"), _get(ds, "path")
    files = dict(_get(ds, "files") or {})
    if fmt not in ("idx", "npz"):
        raise ConfigError("dataset.format", fmt, "idx or npz")
    if not path and name in _USER_DATASETS:
        raise ConfigError("dataset.path", path, f"the path of your {name} data")
    if fmt == "idx" and any(r not in files for r in ROLES):
        raise ConfigError("dataset.files", files, f"a file name for each of {', '.join(ROLES)}")
    return name, fmt, files, dict(_get(ds, "sha256") or {})


def _read(name: str, source: str, fmt: str, location: str | os.PathLike, files: Mapping[str, str],
          pinned: Mapping[str, str]) -> RawData:
    """The dataset at ``location`` (a folder of IDX files, or an npz file)."""
    if fmt == "idx":
        arrays, checksums = load_idx_folder(location, files, pinned)
    else:
        arrays, checksums = load_npz_file(location, pinned.get("archive"))
    return RawData(name=name, source=source, checksums=checksums, **arrays)


def _search(folders: Sequence[str], fmt: str, files: Mapping[str, str], archive: str
            ) -> tuple[Optional[tuple[str, Path]], list[str]]:
    """The first folder holding the dataset, ``(source, location)`` or None; what the others lacked."""
    looked = []
    for entry in folders:
        folder = Path(os.path.expanduser(entry))
        if fmt == "idx":
            missing = find_idx(folder, files)[1]
            if not missing:
                return (entry, folder), looked
            state = "missing" if not folder.is_dir() else (
                "empty" if len(missing) == len(ROLES) else f"lacks {', '.join(missing)}")
        elif (folder / archive).is_file():
            return (str(Path(entry) / archive), folder / archive), looked
        else:
            state = "missing" if not folder.is_dir() else f"no {archive}"
        looked.append(f"{entry} ({state})")
    return None, looked


def _download_missing(url: Optional[str], target: Path, remote: Sequence[tuple[str, str]],
                      pinned: Mapping[str, str], decompress: bool, timeout: float,
                      not_found: Callable[[str], DataError]) -> str:
    """Downloads each ``(role, file name)`` of ``remote`` missing from ``target``; returns the base URL."""
    if not url:
        raise not_found("off (dataset.url is null)")
    base = url if url.endswith("/") else url + "/"
    for role, file_name in remote:
        dest = target / file_name
        if dest.is_file():
            continue
        try:
            _fetch(base + file_name, dest, role, pinned.get(role), decompress, timeout)
        except DataError:
            raise
        except (OSError, ValueError, http.client.HTTPException) as e:
            raise not_found(f"{base + file_name} failed: {_download_error(e)}") from e
    return base


def load_dataset(ds: Any, raw_dir: str | os.PathLike, *, timeout: float = DOWNLOAD_TIMEOUT) -> RawData:
    """Loads and verifies the dataset ``ds`` describes: ``ds.path``, else the first of ``ds.search``
    and ``<raw_dir>/<name>/`` holding it, else ``ds.url`` downloaded there.

    Raises:
        DataError: files missing, malformed, mismatching or unobtainable.
        ConfigError: ``dataset.format`` unknown, or no ``dataset.path`` for ``idx_dir``/``npz``.
    """
    name, fmt, files, pinned = _settings(ds)
    path = _get(ds, "path")
    if path:
        return _read(name, str(path), fmt, os.path.expanduser(str(path)), files, pinned)
    target = Path(raw_dir) / name
    archive = files.get("archive", f"{name}.npz")
    folders = [str(s) for s in (_get(ds, "search") or [])]
    if not any(Path(os.path.expanduser(f)).resolve() == target.resolve() for f in folders):
        folders.append(str(target))
    found, looked = _search(folders, fmt, files, archive)
    if found:
        return _read(name, found[0], fmt, found[1], files, pinned)
    wanted = archive if fmt == "npz" else ", ".join(f"{files[r]}[.gz]" for r in ROLES)
    remote = [(role, f"{files[role]}.gz") for role in ROLES] if fmt == "idx" else [("archive", archive)]
    base = _download_missing(_get(ds, "url"), target, remote, pinned, fmt == "idx", timeout,
                             lambda tried: _nothing_found(name, looked, tried, wanted, target))
    return _read(name, base, fmt, target if fmt == "idx" else target / archive, files, pinned)


def _allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """Splits ``total`` over classes in proportion to ``counts`` (largest remainder method)."""
    exact = counts * (total / counts.sum())
    # Guard against float noise (0.1666... * 6000 = 999.9999...) before taking floors.
    exact = np.where(np.isclose(exact, np.round(exact), rtol=0, atol=1e-9), np.round(exact), exact)
    share = np.floor(exact).astype(np.int64)
    rest = total - int(share.sum())
    order = np.argsort(-(exact - share), kind="stable")  # ties: lower class first
    share[order[:rest]] += 1
    return share


def stratified_split(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, validation) indices of ``y``, stratified by class, random in ``seed``;
    ConfigError when ``val_fraction`` is out of (0, 1) or leaves a class empty on one side."""
    y = np.asarray(y)
    if isinstance(val_fraction, bool) or not 0 < val_fraction < 1:
        raise ConfigError("data.val_fraction", val_fraction, "a number strictly between 0 and 1")
    classes, counts = np.unique(y, return_counts=True)
    if len(y) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    n_val = _allocate(counts, int(round(val_fraction * len(y))))
    for c, n, v in zip(classes, counts, n_val):
        if v == 0 or v == n:
            side = "validation" if v == 0 else "training"
            raise ConfigError("data.val_fraction", val_fraction,
                              f"a share that leaves every class a {side} example "
                              f"(class {c} has {n} examples, {v} would go to validation)")
    rng = np.random.default_rng(seed)
    val = [rng.permutation(np.flatnonzero(y == c))[:v] for c, v in zip(classes, n_val)]
    val_idx = np.sort(np.concatenate(val)) if val else np.empty(0, np.int64)
    mask = np.ones(len(y), bool)
    mask[val_idx] = False
    return np.flatnonzero(mask), val_idx


def apply_limit(y: np.ndarray, limit: Optional[int], seed: int) -> np.ndarray:
    """Sorted indices of at most ``limit`` examples of ``y`` (None: all), stratified, at least one
    per class, random in ``seed``; ConfigError for a non-integer or too small ``limit``."""
    y = np.asarray(y)
    if limit is None or (not isinstance(limit, bool) and isinstance(limit, (int, np.integer))
                         and limit >= len(y)):
        return np.arange(len(y))
    classes, counts = np.unique(y, return_counts=True)
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < len(classes):
        raise ConfigError("data.limit", limit,
                          f"null or an integer >= {len(classes)} (one example per class)")
    keep = np.maximum(_allocate(counts, int(limit)), 1)
    while keep.sum() > limit:  # the minimum of one per class came out of the largest classes
        keep[np.argmax(keep)] -= 1
    rng = np.random.default_rng([seed, 1])
    picked = [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, keep)]
    return np.sort(np.concatenate(picked))


def stratified_folds(y: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """``k`` disjoint validation folds of ``y``'s examples (sorted int64 indices), stratified by
    class, all of exactly ``len(y) // k`` examples (so that they train together), random in ``seed``.

    Each class's examples, shuffled, give each fold ``n_c // k`` of class c's ``n_c``; the
    classes' remaining ``n_c % k`` (< k each), one class after another, are dealt to the folds in
    turn, so a fold holds ``n_c // k`` or ``n_c // k + 1`` of class c (within one example of its
    share). The last ``len(y) % k`` examples dealt (at most k - 1) belong to no fold: they always train.

    Raises:
        ConfigError: ``k`` not an integer from 2 to the smallest class's count (``data.folds``).

    Example:
        >>> val = stratified_folds(y_pool, 5, seed=42)[0]
        >>> train = np.setdiff1d(np.arange(len(y_pool)), val)
    """
    y = np.asarray(y)
    classes, counts = np.unique(y, return_counts=True)
    smallest = int(counts.min()) if len(counts) else 0
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 2 <= k <= smallest:
        raise ConfigError("data.folds", k, f"null (no cross-validation) or an integer from 2 to {smallest}, "
                          "the smallest class's examples in the training pool (train + val splits)")
    rng = np.random.default_rng([seed, 2])
    shuffled = [rng.permutation(np.flatnonzero(y == c)) for c in classes]
    # Rows of k examples, column i to fold i.
    rows = [s[:len(s) // k * k].reshape(-1, k) for s in shuffled]
    rest = np.concatenate([s[len(s) // k * k:] for s in shuffled])
    rows.append(rest[:len(rest) // k * k].reshape(-1, k))
    return [np.sort(np.concatenate([r[:, i] for r in rows])).astype(np.int64) for i in range(k)]


def class_counts(y: np.ndarray) -> dict[str, int]:
    """``{"0": n0, ..., "9": n9}``: examples per class (JSON-friendly keys)."""
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=NUM_CLASSES)
    return {str(c): int(n) for c, n in enumerate(counts)}


def _fsync_write(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _write_npz(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    # Uncompressed: loads fast for training, and DVC's cache deduplicates anyway.
    _fsync_write(path, lambda f: np.savez(f, x=x, y=y))


def save_prepared(out_dir: str | os.PathLike, splits: Mapping[str, tuple[np.ndarray, np.ndarray]],
                  meta: Mapping[str, Any]) -> Path:
    """Atomically replaces ``out_dir`` with ``<split>.npz`` (``x``, ``y``) per split and ``meta.json``."""
    def fill(tmp: Path) -> None:
        for split, (x, y) in splits.items():
            _write_npz(tmp / f"{split}.npz", check_images(x, split), np.asarray(y, dtype=np.int64))
        text = json.dumps(meta, indent=2) + "\n"
        _fsync_write(tmp / "meta.json", lambda f: f.write(text.encode("utf-8")))

    replace_folder(Path(out_dir), fill)
    return Path(out_dir)


def load_split(prepared_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads one prepared split as (uint8 images, int64 labels); DataError if unknown or bad."""
    if split not in SPLITS:
        raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    path = Path(prepared_dir) / f"{split}.npz"
    if not path.is_file():
        raise DataError(f"{path}: not found; run `dvc repro prepare` "
                        "(or `python -m l2sweep.prepare`) first")
    try:
        with np.load(path, allow_pickle=False) as f:
            x, y = f["x"], f["y"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a prepared split with keys x, y ({e})") from e
    x = check_images(x, str(path))
    return x, check_labels(y, str(path), len(x), str(path))


def load_meta(prepared_dir: str | os.PathLike) -> dict[str, Any]:
    """Reads ``meta.json`` of the prepared data."""
    path = Path(prepared_dir) / "meta.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the prepared data's meta.json ({e})") from e


def to_float(x: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 in [0, 1] (the seeds' ``x / 255.0``)."""
    return np.asarray(x, dtype=np.float32) / np.float32(255.0)
