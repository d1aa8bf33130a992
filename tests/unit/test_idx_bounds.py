"""A gzipped IDX file is decompressed no further than its header (or MAX_IDX_BYTES) allows:
a gzip bomb fails with one line naming the file, without ever being held in memory."""

from __future__ import annotations

import gzip
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import IDX_FILES, write_idx_dir
from l2sweep.base import idx
from l2sweep.base.idx import DataError, load_idx_folder, read_bytes, write_idx

ZEROS = 50 * 2**20  #: what the bombs expand to (they are ~50 KB)


def bomb(path: Path, head: bytes = b"") -> Path:
    """``head`` then 50 MB of zeros, gzipped in chunks (the test never holds the 50 MB either)."""
    packer, chunk = zlib.compressobj(9, zlib.DEFLATED, 31), bytes(1 << 20)
    with open(path, "wb") as out:
        out.write(packer.compress(head))
        for _ in range(ZEROS // len(chunk)):
            out.write(packer.compress(chunk))
        out.write(packer.flush())
    return path


def header(*shape: int) -> bytes:
    return bytes([0, 0, 0x08, len(shape)]) + np.asarray(shape, dtype=">u4").tobytes()


def peak_bytes(call) -> tuple[int, str]:
    """The most memory Python allocated while ``call()`` ran, and its DataError's message."""
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as info:
            call()
        return tracemalloc.get_traced_memory()[1], str(info.value)
    finally:
        tracemalloc.stop()


def test_a_payload_longer_than_its_header_declares_stops_at_the_declared_size(tmp_path):
    path = bomb(tmp_path / "train-images-idx3-ubyte.gz", header(10, 28, 28))
    assert path.stat().st_size < 200_000
    peak, message = peak_bytes(lambda: read_bytes(path))
    assert message == (f"{path}: decompresses to more than 7856 bytes, what its IDX header declares "
                       "(shape (10, 28, 28) of uint8); a corrupt file or a gzip bomb, not read further")
    assert peak < 2**20  # not the 50 MB


def test_without_an_idx_header_decompression_stops_at_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(idx, "MAX_IDX_BYTES", 2**20)
    path = bomb(tmp_path / "zeros.gz")
    peak, message = peak_bytes(lambda: read_bytes(path))
    assert message.startswith(f"{path}: decompresses to more than 1048576 bytes, the most an IDX "
                              "file may hold (MAX_IDX_BYTES)")
    assert peak < 4 * 2**20


def test_a_header_declaring_more_than_the_limit_fails_before_decompressing(tmp_path, monkeypatch):
    monkeypatch.setattr(idx, "MAX_IDX_BYTES", 2**20)
    path = tmp_path / "big.gz"
    path.write_bytes(gzip.compress(header(60000, 28, 28)))
    with pytest.raises(DataError, match=r"its IDX header declares shape \(60000, 28, 28\) of uint8, "
                                        r"47040016 bytes, more than the 1048576"):
        read_bytes(path)
    (tmp_path / "plain").write_bytes(bytes(2**20 + 1))  # uncompressed: its size says it
    with pytest.raises(DataError, match="plain: 1048577 bytes, more than the 1048576"):
        read_bytes(tmp_path / "plain")


def test_a_bomb_in_a_dataset_folder_names_its_file(tmp_path, tiny_arrays):
    write_idx_dir(tmp_path, tiny_arrays)  # x_train gzipped
    x_train = tmp_path / f"{IDX_FILES['x_train']}.gz"
    n = len(tiny_arrays["x_train"])
    bomb(x_train, header(n, 28, 28))
    with pytest.raises(DataError, match=f"^{x_train}: decompresses to more than {16 + n * 784} bytes"):
        load_idx_folder(tmp_path, IDX_FILES)


def test_files_within_their_bounds_read_as_before(tmp_path):
    array = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    for compress in (False, True):
        path = write_idx(tmp_path / f"x{compress}", array, compress=compress)
        assert read_bytes(path) == idx.idx_bytes(array)
    multi = tmp_path / "multi.gz"  # two gzip members, as `cat a.gz b.gz` makes
    data = idx.idx_bytes(array)
    multi.write_bytes(gzip.compress(data[:100]) + gzip.compress(data[100:]))
    assert read_bytes(multi) == data
