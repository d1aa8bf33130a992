"""IDX and npz files: read, write, verify checksums (of the *decompressed* IDX bytes, of an
``.npz`` file itself), and check what they hold."""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from l2sweep.base.files import write_text

#: The four arrays every dataset provides, in this order.
ROLES = ("x_train", "y_train", "x_test", "y_test")
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28)

#: IDX type code -> dtype (big-endian, as the format stores it).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_NAMES = {code: dtype.name for code, dtype in IDX_DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"
#: The most an IDX file may hold (decompressed), whatever its header says: 20x the largest file
#: of (Fashion-)MNIST (60,000 images, 47 MB), ~1.3 million 28x28 images.
MAX_IDX_BYTES = 1 << 30


class DataError(ValueError):
    """A data file is missing, malformed or not the expected one; the message names the file."""


def read_bytes(path: str | os.PathLike, name: Optional[str] = None) -> bytes:
    """Reads a file, gunzipped when it starts with the gzip magic bytes: never more than an IDX
    header at its start declares, nor :data:`MAX_IDX_BYTES` (a gzip bomb stops there, not in
    memory). DataError naming the file (or ``name``) if it is unreadable, corrupt or larger."""
    name = name or str(path)
    try:
        with open(path, "rb") as f:
            if f.read(2) != _GZIP_MAGIC:
                size = os.fstat(f.fileno()).st_size
                if size > MAX_IDX_BYTES:
                    raise DataError(f"{name}: {size} bytes, more than the {MAX_IDX_BYTES} an IDX file "
                                    "may hold (MAX_IDX_BYTES)")
                f.seek(0)
                return f.read()  # an over-long IDX payload: parse_idx says so
            f.seek(0)
            try:
                with gzip.GzipFile(fileobj=f) as unzipped:
                    return _read_declared(unzipped, name)
            except (OSError, EOFError, zlib.error) as e:
                raise DataError(f"{name}: corrupt or truncated gzip data ({e})") from e
    except OSError as e:
        raise DataError(f"{name}: cannot read ({e.strerror or e})") from e


def _read_declared(stream: Any, name: str) -> bytes:
    """Reads ``stream`` in chunks up to the size the IDX header at its start declares (else up to
    :data:`MAX_IDX_BYTES`); DataError as soon as it holds more."""
    head = stream.read(4)
    bound, what = MAX_IDX_BYTES, "the most an IDX file may hold (MAX_IDX_BYTES)"
    if len(head) == 4 and head[:2] == b"\0\0" and head[2] in IDX_DTYPES and head[3]:
        head += stream.read(4 * head[3])
        if len(head) == 4 + 4 * head[3]:
            shape = tuple(int(d) for d in np.frombuffer(head, dtype=">u4", offset=4))
            bound = len(head) + math.prod(shape) * IDX_DTYPES[head[2]].itemsize
            what = f"what its IDX header declares (shape {shape} of {_IDX_NAMES[head[2]]})"
            if bound > MAX_IDX_BYTES:
                raise DataError(f"{name}: its IDX header declares shape {shape} of {_IDX_NAMES[head[2]]}"
                                f", {bound} bytes, more than the {MAX_IDX_BYTES} an IDX file may hold "
                                "(MAX_IDX_BYTES)")
    chunks, size = [head], len(head)
    while size <= bound:
        chunk = stream.read(min(bound + 1 - size, 1 << 24))  # GzipFile allocates what is asked
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
    raise DataError(f"{name}: decompresses to more than {bound} bytes, {what}; a corrupt file or a "
                    "gzip bomb, not read further")


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parses decompressed IDX bytes into a writable native-order array; DataError naming ``name``."""
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
    """Reads an IDX file, gzipped or not; raises DataError naming the file and the fault."""
    return parse_idx(read_bytes(path), str(path))


def idx_bytes(array: np.ndarray) -> bytes:
    """Encodes an array as IDX bytes; ValueError for a dtype or shape IDX cannot hold."""
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
    """Writes ``array`` as an IDX file atomically (``compress``: gzipped, reproducibly)."""
    data = idx_bytes(array)
    if compress:
        data = gzip.compress(data, mtime=0)
    path = Path(path)
    write_text(path, data)
    return path


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


def check_images(x: Any, name: str) -> np.ndarray:
    """``x`` (whole numbers 0-255, any numeric dtype) as uint8 (N, 28, 28); else DataError."""
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


def find_idx(folder: Path, files: Mapping[str, str]) -> tuple[dict[str, Path], list[str]]:
    """Role -> existing file in ``folder`` (plain or .gz), and the names of the missing ones."""
    found, missing = {}, []
    for role in ROLES:
        name = files[role]
        hit = next((p for p in (folder / name, folder / f"{name}.gz") if p.is_file()), None)
        if hit is None:
            missing.append(name)
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
    """Loads the IDX files ``files`` (role -> name, or ``name.gz``) of ``folder``, verified against
    ``pinned``: (role -> checked array, role -> SHA-256); DataError when one is missing or bad."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; expected a folder with the four IDX files "
                        f"({', '.join(files[r] for r in ROLES)}, each optionally .gz)")
    found, missing = find_idx(folder, files)
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)} (each may also be .gz); required: "
                        f"{', '.join(files[r] for r in ROLES)}")
    arrays, checksums = _load_idx_files(found, pinned or {})
    return _checked(arrays, {r: str(p) for r, p in found.items()}), checksums


def load_npz_file(path: str | os.PathLike, pinned: Optional[str] = None
                  ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Loads an ``.npz`` holding the four roles: (role -> checked array, ``{"archive": SHA-256}``);
    DataError when it is missing, unreadable, mismatching ``pinned`` or holds bad arrays."""
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
