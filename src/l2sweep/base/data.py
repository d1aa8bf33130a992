"""Pure data functions: read IDX/npz, verify checksums, download, split, save atomically.

Nothing here knows about stages or Hydra apps: :mod:`l2sweep.prepare` wires these together,
``train``/``evaluate`` read the result with :func:`load_split` and :func:`to_float`.

Checksums are SHA-256 of the *decompressed* IDX bytes (so a Debian ``.gz`` and the upstream
``.gz`` of the same data agree) and of the file itself for an ``.npz`` archive.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import logging
import math
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import uuid
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf

from l2sweep.base.config import ConfigError

log = logging.getLogger(__name__)

#: The four arrays every dataset provides, in this order.
ROLES = ("x_train", "y_train", "x_test", "y_test")
#: The splits ``prepare`` writes.
SPLITS = ("train", "val", "test")
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28)
#: Seconds before a download attempt gives up.
DOWNLOAD_TIMEOUT = 30.0

#: IDX type code -> dtype (big-endian, as the format stores it).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_NAMES = {0x08: "uint8", 0x09: "int8", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32",
              0x0E: "float64"}
_GZIP_MAGIC = b"\x1f\x8b"
_USER_DATASETS = ("idx_dir", "npz")


class DataError(ValueError):
    """A data file is missing, malformed or not the expected one; the message names the file."""


@dataclass(frozen=True, eq=False)
class RawData:
    """A dataset as loaded and verified, before splitting.

    Attributes:
        name: the dataset's config name (``fashion_mnist``, ``idx_dir``, ...).
        source: the folder, file or URL the arrays came from.
        checksums: role -> SHA-256 (decompressed IDX content, or the npz file as ``archive``).
        x_train: uint8 images, shape (N, 28, 28).
        y_train: int64 labels in 0-9, shape (N,).
        x_test: uint8 images, shape (M, 28, 28).
        y_test: int64 labels in 0-9, shape (M,).
    """

    name: str
    source: str
    checksums: dict[str, str]
    x_train: np.ndarray = field(repr=False)
    y_train: np.ndarray = field(repr=False)
    x_test: np.ndarray = field(repr=False)
    y_test: np.ndarray = field(repr=False)


# --- IDX ----------------------------------------------------------------------------------


def read_bytes(path: str | os.PathLike) -> bytes:
    """Reads a file, gunzipping it when it starts with the gzip magic bytes (not by extension).

    Raises:
        DataError: the file cannot be read, or its gzip stream is corrupt or truncated.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt or truncated gzip data ({e})") from e
    return data


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parses the bytes of an IDX file (already decompressed).

    Args:
        data: header (``0x00 0x00 <type code> <ndim>``, then ndim big-endian uint32 sizes)
            followed by exactly prod(sizes) items.
        name: what to call the data in error messages (usually the file's path).

    Returns:
        A writable array in native byte order with the file's shape.

    Raises:
        DataError: empty, not IDX, unknown type code, truncated or over-long.
    """
    if not data:
        raise DataError(f"{name}: file is empty, expected an IDX file")
    if len(data) < 4:
        raise DataError(f"{name}: {len(data)} bytes is too short for an IDX header (4 bytes)")
    if data[0] != 0 or data[1] != 0:
        raise DataError(f"{name}: not an IDX file (magic bytes {data[:4].hex(' ')}, "
                        "expected 00 00 <type> <ndim>)")
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        allowed = ", ".join(f"0x{c:02X} {n}" for c, n in _IDX_NAMES.items())
        raise DataError(f"{name}: unknown IDX type code 0x{code:02X} (allowed: {allowed})")
    if ndim == 0:
        raise DataError(f"{name}: IDX header declares 0 dimensions, expected at least 1")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: truncated IDX header: {ndim} dimensions need {header} bytes, "
                        f"the file has {len(data)}")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    actual = len(data) - header
    if actual != expected:
        what = "truncated" if actual < expected else "over-long"
        raise DataError(f"{name}: {what} IDX payload: shape {shape} of {_IDX_NAMES[code]} needs "
                        f"{expected} bytes after the header, the file has {actual}")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file, gzipped or not.

    Args:
        path: the file; gzip is detected from its first bytes, whatever its name.

    Returns:
        The array, in native byte order.

    Raises:
        DataError: naming the file and what is wrong with it.
    """
    return parse_idx(read_bytes(path), str(path))


def idx_bytes(array: np.ndarray) -> bytes:
    """Encodes an array as IDX bytes (header + big-endian payload).

    Raises:
        ValueError: the dtype has no IDX type code or a dimension does not fit the header.
    """
    array = np.asarray(array)
    codes = {np.dtype(dt).newbyteorder("=").str: c for c, dt in IDX_DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("=").str)
    if code is None:
        raise ValueError(f"dtype {array.dtype} has no IDX type code; allowed: "
                         f"{', '.join(_IDX_NAMES.values())}")
    if not 1 <= array.ndim <= 255 or any(d >= 2**32 for d in array.shape):
        raise ValueError(f"shape {array.shape} does not fit an IDX header "
                         "(1-255 dimensions, each < 2**32)")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool = False) -> Path:
    """Writes an array as an IDX file (atomically: a temp file renamed into place).

    Args:
        path: destination; the name is used as given (add ``.gz`` yourself when compressing).
        array: uint8, int8, int16, int32, float32 or float64, 1-255 dimensions.
        compress: gzip the file (with a fixed timestamp, so the bytes are reproducible).

    Returns:
        The path written.
    """
    data = idx_bytes(array)
    if compress:
        data = gzip.compress(data, mtime=0)
    path = Path(path)
    _atomic_write_bytes(path, data)
    return path


# --- checksums ----------------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes as stored (not decompressed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(name: str, role: str, actual: str, expected: Optional[str]) -> None:
    """Raises DataError when a pinned checksum (``expected``) differs from ``actual``."""
    if expected and actual.lower() != expected.lower():
        raise DataError(f"{name}: SHA-256 mismatch for {role}: expected {expected}, got {actual} "
                        "(a corrupt or different file; delete it to download it again)")


# --- validation ---------------------------------------------------------------------------


def check_images(x: Any, name: str) -> np.ndarray:
    """Returns ``x`` as uint8 (N, 28, 28), or raises DataError naming ``name``.

    Integer or float arrays holding whole numbers 0-255 are accepted and cast.
    """
    x = np.asarray(x)
    if x.ndim != 3 or x.shape[1:] != IMAGE_SHAPE or x.shape[0] == 0:
        raise DataError(f"{name}: images have shape {x.shape}, expected (N, 28, 28) with N > 0")
    if x.dtype == np.uint8:
        return x
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"{name}: images have dtype {x.dtype}, expected uint8 (whole numbers 0-255)")
    lo, hi = x.min(), x.max()
    if lo < 0 or hi > 255 or (np.issubdtype(x.dtype, np.floating) and not np.all(x == np.round(x))):
        raise DataError(f"{name}: images of dtype {x.dtype} with values in [{lo}, {hi}] are not "
                        "uint8-compatible (whole numbers 0-255)")
    return x.astype(np.uint8)


def check_labels(y: Any, name: str, n_images: int, images_name: str) -> np.ndarray:
    """Returns ``y`` as int64 (N,) with values 0-9 and N == ``n_images``, or raises DataError."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{name}: labels have shape {y.shape}, expected (N,)")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise DataError(f"{name}: labels have dtype {y.dtype}, expected integers 0-{NUM_CLASSES - 1}")
    if len(y) != n_images:
        raise DataError(f"{name}: {len(y)} labels for {n_images} images in {images_name}")
    if np.issubdtype(y.dtype, np.floating) and not np.all(y == np.round(y)):
        raise DataError(f"{name}: labels are not whole numbers, expected integers 0-{NUM_CLASSES - 1}")
    bad = (y < 0) | (y >= NUM_CLASSES)
    if bad.any():
        found = sorted({int(v) for v in np.unique(y[bad])[:5]})
        raise DataError(f"{name}: {int(bad.sum())} labels outside 0-{NUM_CLASSES - 1} "
                        f"(e.g. {found})")
    return y.astype(np.int64)


# --- loading ------------------------------------------------------------------------------


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


def _idx_candidates(folder: Path, file_name: str) -> list[Path]:
    return [folder / file_name, folder / f"{file_name}.gz"]


def _find_idx(folder: Path, files: Mapping[str, str]) -> tuple[dict[str, Path], list[str]]:
    """Role -> existing file in ``folder`` (plain or .gz), and the names of the missing ones."""
    found, missing = {}, []
    for role in ROLES:
        hit = next((p for p in _idx_candidates(folder, files[role]) if p.is_file()), None)
        if hit is None:
            missing.append(files[role])
        else:
            found[role] = hit
    return found, missing


def _load_idx_files(paths: Mapping[str, Path], pinned: Mapping[str, str]
                    ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    arrays, checksums = {}, {}
    for role in ROLES:
        data = read_bytes(paths[role])
        checksums[role] = sha256_bytes(data)
        verify_sha256(str(paths[role]), role, checksums[role], pinned.get(role))
        arrays[role] = parse_idx(data, str(paths[role]))
    return arrays, checksums


def _checked(arrays: Mapping[str, np.ndarray], names: Mapping[str, str]) -> dict[str, np.ndarray]:
    out = {}
    for split in ("train", "test"):
        x_role, y_role = f"x_{split}", f"y_{split}"
        out[x_role] = check_images(arrays[x_role], names[x_role])
        out[y_role] = check_labels(arrays[y_role], names[y_role], len(out[x_role]), names[x_role])
    return out


def load_idx_folder(folder: str | os.PathLike, files: Mapping[str, str],
                    pinned: Optional[Mapping[str, str]] = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Loads the four IDX files of ``folder`` (each as ``name`` or ``name.gz``).

    Args:
        folder: where the files are.
        files: role -> file name (without ``.gz``).
        pinned: role -> expected SHA-256 of the decompressed content; roles left out are not checked.

    Returns:
        (role -> validated array, role -> SHA-256 of the decompressed content).

    Raises:
        DataError: a file is missing, malformed, mismatching its checksum or inconsistent.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; expected a folder with the four IDX files "
                        f"({', '.join(files[r] for r in ROLES)}, each optionally .gz)")
    found, missing = _find_idx(folder, files)
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)} (each may also be .gz); required: "
                        f"{', '.join(files[r] for r in ROLES)}")
    arrays, checksums = _load_idx_files(found, pinned or {})
    return _checked(arrays, {r: str(p) for r, p in found.items()}), checksums


def load_npz_file(path: str | os.PathLike, pinned: Optional[str] = None
                  ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Loads an ``.npz`` archive holding ``x_train y_train x_test y_test``.

    Args:
        path: the archive.
        pinned: expected SHA-256 of the file, or None.

    Returns:
        (role -> validated array, ``{"archive": SHA-256 of the file}``).

    Raises:
        DataError: missing file or keys, not an npz, checksum mismatch or inconsistent arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; expected an .npz with keys {', '.join(ROLES)}")
    checksum = sha256_file(path)
    verify_sha256(str(path), "archive", checksum, pinned)
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = set(archive.files)
            missing = [r for r in ROLES if r not in keys]
            if missing:
                raise DataError(f"{path}: missing keys {', '.join(missing)}; required: "
                                f"{', '.join(ROLES)} (found: {', '.join(sorted(keys)) or 'none'})")
            arrays = {r: archive[r] for r in ROLES}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # truncated: BadZipFile
        raise DataError(f"{path}: not a readable .npz archive ({e})") from e
    return _checked(arrays, {r: f"{path}[{r}]" for r in ROLES}), {"archive": checksum}


def _download(url: str, dest: Path, timeout: float) -> Path:
    """Downloads ``url`` to a temp file next to ``dest`` and returns the temp path."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out, 1 << 20)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _fetch(url: str, dest: Path, role: str, expected: Optional[str], decompress: bool,
           timeout: float) -> None:
    """Downloads ``url`` to ``dest`` if its checksum matches; a mismatching download is deleted."""
    log.info("downloading %s", url)
    tmp = _download(url, dest, timeout)
    try:
        actual = sha256_bytes(read_bytes(tmp)) if decompress else sha256_file(tmp)
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


def load_dataset(ds: Any, raw_dir: str | os.PathLike, *, timeout: float = DOWNLOAD_TIMEOUT) -> RawData:
    """Loads and verifies a dataset as its config describes.

    ``idx_dir``/``npz`` (or any dataset with ``path`` set) read ``ds.path``. Built-in datasets
    are looked up in ``ds.search`` (in order, ``~`` expanded) and in ``<raw_dir>/<name>/``, and
    otherwise downloaded from ``ds.url`` into ``<raw_dir>/<name>/`` (IDX files as ``<name>.gz``).
    Pinned ``ds.sha256`` values are verified; the computed ones are always returned.

    Args:
        ds: the ``dataset`` config section (DictConfig, :class:`~l2sweep.base.config.DatasetConfig`
            or a mapping with the same keys).
        raw_dir: ``paths.raw``; downloads land in ``<raw_dir>/<name>/``.
        timeout: seconds per download attempt.

    Returns:
        The verified arrays, where they came from and their checksums.

    Raises:
        DataError: files missing, malformed, mismatching or unobtainable; the message says where
            it looked and what to do.
        ConfigError: ``dataset.name``/``dataset.format`` unknown, or ``dataset.path`` missing
            for ``idx_dir``/``npz``.
    """
    name, fmt, path = _get(ds, "name"), _get(ds, "format", "idx"), _get(ds, "path")
    files = dict(_get(ds, "files") or {})
    pinned = dict(_get(ds, "sha256") or {})
    if fmt not in ("idx", "npz"):
        raise ConfigError("dataset.format", fmt, "idx or npz")
    if not path and name in _USER_DATASETS:
        raise ConfigError("dataset.path", path, f"the path of your {name} data")
    if fmt == "idx":
        missing_roles = [r for r in ROLES if r not in files]
        if missing_roles:
            raise ConfigError("dataset.files", files, f"a file name for each of {', '.join(ROLES)}")

    if path:
        local = os.path.expanduser(str(path))
        if fmt == "idx":
            arrays, checksums = load_idx_folder(local, files, pinned)
        else:
            arrays, checksums = load_npz_file(local, pinned.get("archive"))
        return RawData(name=name, source=str(path), checksums=checksums, **arrays)

    target = Path(raw_dir) / name
    archive = files.get("archive", f"{name}.npz")
    folders = [str(s) for s in (_get(ds, "search") or [])]
    if not any(Path(os.path.expanduser(f)).resolve() == target.resolve() for f in folders):
        folders.append(str(target))
    looked = []
    for entry in folders:
        folder = Path(os.path.expanduser(entry))
        if fmt == "idx":
            found, missing = _find_idx(folder, files)
            if not missing:
                arrays, checksums = _load_idx_files(found, pinned)
                arrays = _checked(arrays, {r: str(p) for r, p in found.items()})
                return RawData(name=name, source=entry, checksums=checksums, **arrays)
            state = "missing" if not folder.is_dir() else (
                "empty" if len(missing) == len(ROLES) else f"lacks {', '.join(missing)}")
        else:
            if (folder / archive).is_file():
                arrays, checksums = load_npz_file(folder / archive, pinned.get("archive"))
                return RawData(name=name, source=str(Path(entry) / archive), checksums=checksums,
                               **arrays)
            state = "missing" if not folder.is_dir() else f"no {archive}"
        looked.append(f"{entry} ({state})")

    wanted = (f"{archive}" if fmt == "npz" else
              ", ".join(f"{files[r]}[.gz]" for r in ROLES))
    url = _get(ds, "url")
    if not url:
        raise _nothing_found(name, looked, "off (dataset.url is null)", wanted, target)
    base = url if url.endswith("/") else url + "/"
    remote = [(role, f"{files[role]}.gz") for role in ROLES] if fmt == "idx" else [("archive", archive)]
    for role, file_name in remote:
        dest = target / file_name
        if dest.is_file():  # fetched by an earlier, interrupted run; verified below
            continue
        try:
            _fetch(base + file_name, dest, role, pinned.get(role), fmt == "idx", timeout)
        except (OSError, ValueError, http.client.HTTPException) as e:
            if isinstance(e, DataError):
                raise
            raise _nothing_found(name, looked, f"{base + file_name} failed: {_download_error(e)}",
                                 wanted, target) from e
    if fmt == "idx":
        arrays, checksums = load_idx_folder(target, files, pinned)
    else:
        arrays, checksums = load_npz_file(target / archive, pinned.get("archive"))
    return RawData(name=name, source=base, checksums=checksums, **arrays)


# --- splitting ----------------------------------------------------------------------------


def _allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """Splits ``total`` over classes in proportion to ``counts`` (largest remainder method).

    Every share is the floor or the ceiling of its exact value, and the shares sum to ``total``.
    """
    exact = counts * (total / counts.sum())
    # Guard against float noise (0.1666... * 6000 = 999.9999...) before taking floors.
    exact = np.where(np.isclose(exact, np.round(exact), rtol=0, atol=1e-9), np.round(exact), exact)
    share = np.floor(exact).astype(np.int64)
    rest = total - int(share.sum())
    order = np.argsort(-(exact - share), kind="stable")  # ties: lower class first
    share[order[:rest]] += 1
    return share


def stratified_split(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits indices of ``y`` into train and validation, stratified by class.

    Each class gives round-ish ``val_fraction`` of its examples to validation (within one of
    its exact share; the total is ``round(val_fraction * len(y))``), chosen at random with
    ``seed``.

    Args:
        y: labels.
        val_fraction: share held out for validation, strictly between 0 and 1.
        seed: same seed -> same split.

    Returns:
        (train indices, validation indices), each sorted, disjoint, together ``range(len(y))``.

    Raises:
        ConfigError: ``data.val_fraction`` out of range or leaving a class without a
            validation or training example.
    """
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
    """Picks at most ``limit`` examples of ``y``, stratified by class and deterministic in ``seed``.

    Args:
        y: labels of the training split.
        limit: how many to keep (``data.limit``); None, or >= len(y), keeps all.
        seed: ``data.seed`` (drawn on a stream separate from the split's).

    Returns:
        Sorted indices into ``y``; every class present in ``y`` keeps at least one example.

    Raises:
        ConfigError: ``data.limit`` is not a positive integer or smaller than the number of classes.
    """
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


def class_counts(y: np.ndarray) -> dict[str, int]:
    """``{"0": n0, ..., "9": n9}``: examples per class (JSON-friendly keys)."""
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=NUM_CLASSES)
    return {str(c): int(n) for c, n in enumerate(counts)}


# --- saving and reading the prepared splits ----------------------------------------------


def _fsync_write(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _write_npz(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    # Uncompressed: loads fast for training, and DVC's cache deduplicates anyway.
    _fsync_write(path, lambda f: np.savez(f, x=x, y=y))


def save_prepared(out_dir: str | os.PathLike, splits: Mapping[str, tuple[np.ndarray, np.ndarray]],
                  meta: Mapping[str, Any]) -> Path:
    """Writes ``<split>.npz`` (keys ``x`` uint8 (N,28,28), ``y`` int64) and ``meta.json``.

    Everything goes to a temp folder next to ``out_dir`` which then replaces ``out_dir``, so
    an interrupted run leaves the old outputs (or none), never a half-written file.

    Args:
        out_dir: ``paths.prepared``.
        splits: split name (``train``, ``val``, ``test``) -> (images, labels).
        meta: JSON-serialisable provenance, written as ``meta.json``.

    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp) so the folder gets the umask's permissions, not 0700.
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    old = None
    try:
        for split, (x, y) in splits.items():
            _write_npz(tmp / f"{split}.npz", check_images(x, split), np.asarray(y, dtype=np.int64))
        text = json.dumps(meta, indent=2) + "\n"
        _fsync_write(tmp / "meta.json", lambda f: f.write(text.encode("utf-8")))
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))  # no reader sees it
            os.replace(out, old / out.name)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:  # put the previous outputs back
                os.replace(old / out.name, out)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out


def load_split(prepared_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads one prepared split.

    Args:
        prepared_dir: ``paths.prepared``.
        split: ``train``, ``val`` or ``test``.

    Returns:
        (images uint8 (N, 28, 28), labels int64 (N,)).

    Raises:
        DataError: unknown split, or the file is missing or malformed.
    """
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
