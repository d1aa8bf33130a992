"""l2sweep.base.idx and .data: IDX files, dataset loading (local and download), splitting, saving."""

from __future__ import annotations

import functools
import gzip
import http.server
import re
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from omegaconf import DictConfig, OmegaConf

from conftest import IDX_FILES, make_images, write_idx_dir
from l2sweep.base import data
from l2sweep.base.config import ConfigError, DatasetConfig, compose_config
from l2sweep.base.data import (DataError, apply_limit, load_dataset, load_split, save_prepared,
                               stratified_split, to_float)
from l2sweep.base.idx import idx_bytes, read_idx, sha256_bytes, sha256_file, write_idx

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def tiny_ds(name: str = "tiny", fmt: str = "idx", **kw) -> DictConfig:
    """A built-in-style dataset config (typed like the real one) for the tiny data."""
    files = dict(IDX_FILES) if fmt == "idx" else {"archive": f"{name}.npz"}
    return OmegaConf.structured(DatasetConfig(name=name, format=fmt, files=files, **kw))


def idx_checksums(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    return {role: sha256_bytes(idx_bytes(arrays[role].astype(np.uint8))) for role in IDX_FILES}


def assert_same(raw: data.RawData, arrays: dict[str, np.ndarray]) -> None:
    for role in IDX_FILES:
        np.testing.assert_array_equal(getattr(raw, role), arrays[role])
    assert raw.x_train.dtype == np.uint8 and raw.y_train.dtype == np.int64


# --- IDX --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, dtype, compress):
    array = (np.arange(2 * 3 * 4) - 5).reshape(2, 3, 4).astype(dtype)
    if dtype == "uint8":
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / "a.idx", array, compress=compress)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == compress
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.shape == (2, 3, 4)
    np.testing.assert_array_equal(back, array)
    back[0, 0, 0] = 1  # writable, native byte order


def test_gzip_is_detected_by_content_not_name(tmp_path):
    array = np.arange(10, dtype=np.uint8)
    write_idx(tmp_path / "plain.gz", array)  # a .gz name holding plain bytes
    write_idx(tmp_path / "packed", array, compress=True)  # gzip bytes without .gz
    np.testing.assert_array_equal(read_idx(tmp_path / "plain.gz"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "packed"), array)


def test_write_idx_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(ValueError, match="int64.*allowed: uint8"):
        write_idx(tmp_path / "a", np.zeros(3, dtype=np.int64))


GOOD = bytes([0, 0, 0x08, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(range(6))

MALFORMED = {
    "empty": (b"", "is empty"),
    "short": (b"\x00\x00\x08", "too short for an IDX header"),
    "magic": (b"\x01\x02" + GOOD[2:], "not an IDX file"),
    "text": (b"hello world, not idx", "not an IDX file"),
    "type_code": (GOOD[:2] + b"\x07" + GOOD[3:], "unknown IDX type code 0x07"),
    "zero_dims": (b"\x00\x00\x08\x00", "0 dimensions"),
    "header": (GOOD[:9], "truncated IDX header"),
    "truncated": (GOOD[:-1], "truncated IDX payload"),
    "over_long": (GOOD + b"\x00", "over-long IDX payload"),
    "bad_gzip": (gzip.compress(GOOD)[:-6], "corrupt or truncated gzip"),
    "gzip_not_idx": (gzip.compress(b"plain text"), "not an IDX file"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_idx_names_file_and_problem(tmp_path, case):
    content, expected = MALFORMED[case]
    path = tmp_path / f"{case}-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(DataError, match=expected) as info:
        read_idx(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_good_fixture_bytes_parse(tmp_path):
    (tmp_path / "good").write_bytes(GOOD)
    np.testing.assert_array_equal(read_idx(tmp_path / "good"), np.arange(6).reshape(2, 3))


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / "nope")


# --- user datasets: idx_dir and npz -------------------------------------------------------


def test_idx_dir_dataset(tiny_idx_dir, tiny_arrays, tmp_path):
    cfg = compose_config(["dataset=idx_dir", f"dataset.path='{tiny_idx_dir}'"], with_params=False)
    raw = load_dataset(cfg.dataset, tmp_path / "raw")
    assert_same(raw, tiny_arrays)
    assert raw.name == "idx_dir" and raw.source == str(tiny_idx_dir)
    assert raw.checksums == idx_checksums(tiny_arrays)  # of the decompressed content


def test_npz_dataset(tiny_npz, tiny_arrays, tmp_path):
    cfg = compose_config(["dataset=npz", f"dataset.path='{tiny_npz}'"], with_params=False)
    raw = load_dataset(cfg.dataset, tmp_path / "raw")
    assert_same(raw, tiny_arrays)
    assert raw.checksums == {"archive": sha256_file(tiny_npz)}


def test_user_dataset_without_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="dataset.path"):
        load_dataset({"name": "npz", "format": "npz", "path": None}, tmp_path)


def test_npz_missing_keys_listed(tmp_path, tiny_arrays):
    path = tmp_path / "partial.npz"
    np.savez(path, x_train=tiny_arrays["x_train"], y_train=tiny_arrays["y_train"], extra=np.zeros(1))
    with pytest.raises(DataError) as info:
        load_dataset({"name": "npz", "format": "npz", "path": str(path)}, tmp_path)
    msg = str(info.value)
    assert str(path) in msg and "missing keys x_test, y_test" in msg
    assert "required: x_train, y_train, x_test, y_test" in msg


def test_npz_not_an_archive(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_dataset({"name": "npz", "format": "npz", "path": str(path)}, tmp_path)


def _bad(arrays, **changes):
    out = dict(arrays)
    out.update(changes)
    return out


BAD_ARRAYS = {
    "length": (lambda a: _bad(a, y_train=a["y_train"][:-3]), "y_train", "497 labels for 500 images"),
    "label_range": (lambda a: _bad(a, y_test=np.where(a["y_test"] == 3, 10, a["y_test"])), "y_test",
                    "labels outside 0-9"),
    "shape": (lambda a: _bad(a, x_test=a["x_test"][:, :, :27]), "x_test", "expected (N, 28, 28)"),
    "float_images": (lambda a: _bad(a, x_train=a["x_train"] / 255.0), "x_train",
                     "not uint8-compatible"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARRAYS))
def test_inconsistent_npz_names_array(tmp_path, tiny_arrays, case):
    change, role, expected = BAD_ARRAYS[case]
    path = tmp_path / "bad.npz"
    np.savez(path, **change(tiny_arrays))
    with pytest.raises(DataError, match=re.escape(expected)) as info:
        load_dataset({"name": "npz", "format": "npz", "path": str(path)}, tmp_path)
    assert f"{path}[{role}]" in str(info.value)


def test_inconsistent_idx_names_file(tmp_path, tiny_arrays):
    folder = write_idx_dir(tmp_path / "d", _bad(tiny_arrays, y_test=tiny_arrays["y_test"][:50]))
    with pytest.raises(DataError, match="50 labels for 100 images") as info:
        load_dataset({"name": "idx_dir", "format": "idx", "path": str(folder), "files": IDX_FILES},
                     tmp_path)
    assert IDX_FILES["y_test"] in str(info.value)


def test_integer_images_in_range_are_accepted(tmp_path, tiny_arrays):
    path = tmp_path / "int.npz"
    np.savez(path, **_bad(tiny_arrays, x_train=tiny_arrays["x_train"].astype(np.int32)))
    raw = load_dataset({"name": "npz", "format": "npz", "path": str(path)}, tmp_path)
    assert raw.x_train.dtype == np.uint8


def test_idx_dir_missing_file_listed(tiny_idx_dir, tmp_path):
    (tiny_idx_dir / IDX_FILES["y_train"]).unlink()
    with pytest.raises(DataError, match=f"missing {IDX_FILES['y_train']}"):
        load_dataset({"name": "idx_dir", "format": "idx", "path": str(tiny_idx_dir),
                      "files": IDX_FILES}, tmp_path)


def test_checksum_mismatch_names_file_expected_and_actual(tiny_idx_dir, tiny_arrays, tmp_path):
    pinned = idx_checksums(tiny_arrays)
    actual = pinned["y_train"]
    pinned["y_train"] = "0" * 64
    ds = tiny_ds(search=[str(tiny_idx_dir)], sha256=pinned)
    with pytest.raises(DataError) as info:
        load_dataset(ds, tmp_path / "raw")
    msg = str(info.value)
    assert str(tiny_idx_dir / IDX_FILES["y_train"]) in msg
    assert f"expected {'0' * 64}" in msg and f"got {actual}" in msg


# --- built-in datasets: search folders ------------------------------------------------------


def test_search_folders_in_order_with_home_expanded(tmp_path, tiny_arrays, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    write_idx_dir(tmp_path / "home" / "ds", tiny_arrays, gz=("y_train",))
    (tmp_path / "partial").mkdir()
    write_idx(tmp_path / "partial" / IDX_FILES["x_train"], tiny_arrays["x_train"])
    ds = tiny_ds(search=[str(tmp_path / "absent"), str(tmp_path / "partial"), "~/ds"],
                 sha256=idx_checksums(tiny_arrays))
    raw = load_dataset(ds, tmp_path / "raw")
    assert raw.source == "~/ds"
    assert_same(raw, tiny_arrays)


# --- built-in datasets: download ------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def http_dir(tmp_path, monkeypatch):
    """(folder served, base URL) of a real HTTP server on 127.0.0.1, in a thread."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    served = tmp_path / "www"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_idx(folder: Path, arrays) -> None:
    for role, name in IDX_FILES.items():
        write_idx(folder / f"{name}.gz", arrays[role].astype(np.uint8), compress=True)


def test_download_idx_then_reuse_local_copy(http_dir, tmp_path, tiny_arrays):
    served, url = http_dir
    serve_idx(served, tiny_arrays)
    raw_dir = tmp_path / "raw"
    ds = tiny_ds(search=[str(tmp_path / "nowhere")], url=url, sha256=idx_checksums(tiny_arrays))
    raw = load_dataset(ds, raw_dir)
    assert raw.source == url
    assert_same(raw, tiny_arrays)
    assert sorted(p.name for p in (raw_dir / "tiny").iterdir()) == sorted(
        f"{n}.gz" for n in IDX_FILES.values())
    # Second time: found in <raw>/<name>/ without the network.
    ds.url = f"http://127.0.0.1:{unused_port()}/"
    again = load_dataset(ds, raw_dir)
    assert again.source == str(raw_dir / "tiny")
    assert again.checksums == raw.checksums


def test_download_npz_archive(http_dir, tmp_path, tiny_arrays):
    served, url = http_dir
    np.savez(served / "tinymnist.npz", **tiny_arrays)
    ds = tiny_ds("tinymnist", fmt="npz", url=url,
                 sha256={"archive": sha256_file(served / "tinymnist.npz")})
    raw = load_dataset(ds, tmp_path / "raw")
    assert_same(raw, tiny_arrays)
    assert (tmp_path / "raw" / "tinymnist" / "tinymnist.npz").is_file()


def test_download_with_wrong_hash_is_deleted(http_dir, tmp_path, tiny_arrays):
    served, url = http_dir
    serve_idx(served, tiny_arrays)
    pinned = idx_checksums(tiny_arrays)
    pinned["x_test"] = "f" * 64
    ds = tiny_ds(url=url, sha256=pinned)
    with pytest.raises(DataError) as info:
        load_dataset(ds, tmp_path / "raw")
    msg = str(info.value)
    assert f"{url}{IDX_FILES['x_test']}.gz" in msg
    assert f"expected {'f' * 64}" in msg and f"got {idx_checksums(tiny_arrays)['x_test']}" in msg
    left = sorted(p.name for p in (tmp_path / "raw" / "tiny").iterdir())
    assert f"{IDX_FILES['x_test']}.gz" not in left and not [n for n in left if n.endswith(".part")]


def test_download_404_says_where_it_looked(http_dir, tmp_path, tiny_arrays):
    served, url = http_dir
    serve_idx(served, tiny_arrays)
    (served / f"{IDX_FILES['y_test']}.gz").unlink()
    ds = tiny_ds(url=url, sha256=idx_checksums(tiny_arrays))
    with pytest.raises(DataError) as info:
        load_dataset(ds, tmp_path / "raw")
    msg = str(info.value)
    assert "HTTP 404" in msg and f"{IDX_FILES['y_test']}.gz" in msg
    assert str(tmp_path / "raw" / "tiny") in msg


def test_offline_and_nothing_local_is_one_clear_error(tmp_path):
    cfg = compose_config(["dataset.search=[]", f"dataset.url='http://127.0.0.1:{unused_port()}/'",
                          f"paths.raw='{tmp_path / 'raw'}'"], with_params=False)
    with pytest.raises(DataError) as info:
        load_dataset(cfg.dataset, cfg.paths.raw)
    msg = str(info.value)
    assert "\n" not in msg
    assert "'fashion_mnist' not found locally" in msg
    assert f"Looked in: {tmp_path / 'raw' / 'fashion_mnist'} (missing)" in msg
    assert f"into {tmp_path / 'raw' / 'fashion_mnist'}/" in msg
    assert "train-images-idx3-ubyte[.gz]" in msg
    assert "dataset=idx_dir dataset.path=" in msg and "dataset=npz dataset.path=" in msg


def test_no_url_means_no_download(tmp_path):
    ds = tiny_ds(search=[str(tmp_path / "x")], url=None)
    with pytest.raises(DataError, match=r"Download: off \(dataset.url is null\)"):
        load_dataset(ds, tmp_path / "raw")


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Debian's dataset-fashion-mnist not installed")
def test_real_fashion_mnist_matches_pinned_checksums(tmp_path):
    cfg = compose_config([f"dataset.search=['{FASHION_DIR}']", "dataset.url=null",
                          f"paths.raw='{tmp_path}'"], with_params=False)
    raw = load_dataset(cfg.dataset, cfg.paths.raw)
    assert raw.checksums == dict(cfg.dataset.sha256)
    assert raw.x_train.shape == (60000, 28, 28) and raw.x_test.shape == (10000, 28, 28)
    assert np.bincount(raw.y_train).tolist() == [6000] * 10


# --- splitting ------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [1 / 6, 0.1, 0.25, 0.5, 0.9])
def test_stratified_split_shares(fraction):
    y = np.repeat(np.arange(10), [7, 13, 50, 21, 9, 100, 33, 12, 48, 5])
    train, val = stratified_split(y, fraction, seed=0)
    assert len(np.intersect1d(train, val)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(len(y)))
    assert len(val) == round(fraction * len(y))
    for c in range(10):
        exact = fraction * np.sum(y == c)
        assert abs(np.sum(y[val] == c) - exact) < 1


def test_stratified_split_exact_on_fashion_sized_labels():
    y = np.repeat(np.arange(10), 6000)
    _, val = stratified_split(y, 0.16666666666666666, seed=42)
    assert np.bincount(y[val]).tolist() == [1000] * 10


def test_stratified_split_seeded():
    y = make_images(300, seed=3)[1]
    a, b, c = (stratified_split(y, 0.2, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_split_leaving_a_class_without_validation_is_a_config_error():
    y = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    with pytest.raises(ConfigError, match=r"data.val_fraction.*class 1 has 2 examples"):
        stratified_split(y, 0.2, seed=0)


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1])
def test_split_fraction_out_of_range(fraction):
    with pytest.raises(ConfigError, match="data.val_fraction"):
        stratified_split(np.arange(10), fraction, seed=0)


def test_apply_limit():
    y = make_images(500, seed=4)[1]
    idx = apply_limit(y, 50, seed=7)
    assert len(idx) == 50 and len(np.unique(idx)) == 50 and idx.max() < len(y)
    assert np.bincount(y[idx], minlength=10).tolist() == [5] * 10
    np.testing.assert_array_equal(idx, apply_limit(y, 50, seed=7))
    assert not np.array_equal(idx, apply_limit(y, 50, seed=8))
    np.testing.assert_array_equal(apply_limit(y, None, seed=7), np.arange(500))
    np.testing.assert_array_equal(apply_limit(y, 10_000, seed=7), np.arange(500))


def test_apply_limit_keeps_every_class():
    y = np.repeat(np.arange(10), [91, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    idx = apply_limit(y, 12, seed=0)
    assert len(idx) == 12 and set(y[idx]) == set(range(10))


def test_limit_below_number_of_classes_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data.limit=9 .*>= 10"):
        apply_limit(np.arange(100) % 10, 9, seed=0)


# --- saving ---------------------------------------------------------------------------------


def _splits(n=30, seed=0):
    return {s: make_images(n, seed=seed + i) for i, s in enumerate(("train", "val", "test"))}


def test_save_and_load_prepared(tmp_path):
    out = tmp_path / "prepared"
    splits = _splits()
    save_prepared(out, splits, {"dataset": "tiny"})
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.npz", "train.npz", "val.npz"]
    for name, (x, y) in splits.items():
        xs, ys = load_split(out, name)
        np.testing.assert_array_equal(xs, x)
        np.testing.assert_array_equal(ys, y)
        assert xs.dtype == np.uint8 and ys.dtype == np.int64
    assert data.load_meta(out) == {"dataset": "tiny"}
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]  # no temp folders left


@pytest.mark.parametrize("had_outputs", [True, False])
def test_interrupted_save_keeps_old_outputs(tmp_path, monkeypatch, had_outputs):
    out = tmp_path / "prepared"
    if had_outputs:
        save_prepared(out, _splits(seed=0), {"run": 1})
    before = {p.name: p.read_bytes() for p in out.iterdir()} if had_outputs else None
    real_savez, calls = np.savez, []

    def failing_savez(file, **arrays):
        calls.append(file)
        if len(calls) == 2:
            raise KeyboardInterrupt  # interrupted midway, after one split was written
        real_savez(file, **arrays)

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(KeyboardInterrupt):
        save_prepared(out, _splits(seed=10), {"run": 2})
    if had_outputs:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    else:
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["prepared"] if had_outputs else [])


def test_load_split_errors(tmp_path):
    with pytest.raises(DataError, match="dvc repro prepare"):
        load_split(tmp_path, "train")
    with pytest.raises(DataError, match="'dev' is not one of train, val, test"):
        load_split(tmp_path, "dev")


def test_to_float():
    x = np.array([[0, 128, 255]], dtype=np.uint8)
    f = to_float(x)
    assert f.dtype == np.float32 and f.min() == 0.0 and f.max() == 1.0
