"""Datasets, the Parquet schema, determinism, atomicity and clear errors for bad user files."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import importlib.abc
import json
import os
import stat
import sys
import threading
import tracemalloc
import types

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from mnist_files import IDX_FILES, idx_bytes, tiny_idx, write_raw

from diffenc_core import config, data
from diffenc_core.errors import DataError
from diffenc_core.toys import Bimodal, LinearGaussian, toy_from_manifest


def _prepare(tmp_path, *sets):
    cfg = config.load(None, [f"data.root={tmp_path / 'prepared'}", *sets])
    return cfg, data.prepare(cfg.data)


def test_digits(tmp_path):
    _, out = _prepare(tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(manifest["sizes"].values()) == 1797
    assert manifest["image_shape"] == [1, 8, 8]
    train = data.load_split(out, "train")
    assert train.x.dtype == torch.float32 and train.x.shape[1] == 64
    assert 0.0 <= float(train.x.min()) and float(train.x.max()) <= 1.0
    assert set(np.unique(train.label)) == set(range(10))
    schema = pq.read_schema(out / "train.parquet")
    xtype = schema.field("x").type
    assert xtype.list_size == 64 and str(xtype.value_type) == "float"


def test_sprites_factors_and_images(tmp_path):
    _, out = _prepare(tmp_path, "data.dataset=sprites", "data.count=300", "data.image_size=16")
    split = data.load_split(out, "train")
    assert split.image_shape == (1, 16, 16)
    assert list(split.factors.columns) == ["shape", "scale", "rotation", "pos_x", "pos_y"]
    ink = split.x.sum(1)
    assert (ink > 1).all(), "every sprite draws something"
    # a larger sprite covers more pixels: ink grows with the scale factor
    corr = np.corrcoef(ink.numpy(), split.factors["scale"].to_numpy())[0, 1]
    assert corr > 0.5


def test_deterministic_for_a_seed(tmp_path):
    _, a = _prepare(tmp_path / "a", "data.dataset=bimodal", "data.count=200")
    _, b = _prepare(tmp_path / "b", "data.dataset=bimodal", "data.count=200")
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma["sha256"] == mb["sha256"]
    _, c = _prepare(tmp_path / "c", "data.dataset=bimodal", "data.count=200", "data.seed=1")
    assert json.loads((c / "manifest.json").read_text())["sha256"] != ma["sha256"]


def test_is_prepared_follows_the_recipe(tmp_path):
    cfg, out = _prepare(tmp_path, "data.dataset=sprites", "data.count=60", "data.image_size=16")
    assert data.is_prepared(cfg.data)
    moved = config.with_overrides(cfg, {"data.root": str(tmp_path / "elsewhere")})
    assert not data.is_prepared(moved.data)  # nothing there
    for change in ({"data.count": 80}, {"data.seed": 1}, {"data.image_size": 24}, {"data.val_fraction": 0.2},
                   {"data.binarize": "fixed"}):
        assert not data.is_prepared(config.with_overrides(cfg, change).data), change
    assert data.is_prepared(config.with_overrides(cfg, {"data.download": True}).data)  # fetching changes no data
    np.save(tmp_path / "a.npy", np.zeros((20, 3), np.float32))
    np.save(tmp_path / "b.npy", np.ones((20, 3), np.float32))
    cfg_a, _ = _prepare(tmp_path, "data.dataset=file", f"data.path={tmp_path / 'a.npy'}")
    cfg_b = config.with_overrides(cfg_a, {"data.path": str(tmp_path / "b.npy")})
    assert data.is_prepared(cfg_a.data) and not data.is_prepared(cfg_b.data)  # another file: prepare again


def test_toys_record_their_ground_truth(tmp_path):
    _, out = _prepare(tmp_path, "data.dataset=linear_gaussian", "data.count=400")
    model = toy_from_manifest(data.read_manifest(out))
    assert isinstance(model, LinearGaussian)
    split = data.load_split(out, "test")
    assert list(split.factors.columns) == ["z0", "z1"]
    # the stored x really come from the stored decoder: residuals have the stated noise level
    z = torch.tensor(split.factors.to_numpy())
    resid = split.x - model.mean(z)
    assert abs(float(resid.std()) - model.noise) < 0.02
    _, out = _prepare(tmp_path, "data.dataset=bimodal", "data.count=400")
    assert isinstance(toy_from_manifest(data.read_manifest(out)), Bimodal)


def test_splits_are_disjoint_and_cover():
    parts = data.split_indices(100, 0.1, 0.2, seed=3)
    allidx = np.concatenate(list(parts.values()))
    assert sorted(allidx) == list(range(100))
    assert [len(parts[k]) for k in ("train", "val", "test")] == [70, 10, 20]


# ------------------------------------------------------------------------------- user files
def test_user_npz_parquet_npy_png(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.random((40, 5)).astype(np.float32)
    np.savez(tmp_path / "mine.npz", x=arr, y=np.arange(40) % 3)
    _, out = _prepare(tmp_path, "data.dataset=file", f"data.path={tmp_path / 'mine.npz'}")
    assert out.name == "file"  # the folder DVC's prepare stage declares, whatever the file is called
    assert data.read_manifest(out)["has_label"]
    np.save(tmp_path / "arr.npy", arr)
    _, out = _prepare(tmp_path, "data.dataset=file", f"data.path={tmp_path / 'arr.npy'}")
    assert data.read_manifest(out)["x_dim"] == 5
    pd.DataFrame(arr, columns=list("abcde")).assign(label=np.arange(40) % 2).to_parquet(
        tmp_path / "t.parquet"
    )
    _, out = _prepare(tmp_path, "data.dataset=file", f"data.path={tmp_path / 't.parquet'}")
    assert data.load_split(out, "train").x.shape[1] == 5

    from PIL import Image

    for cls in ("cats", "dogs"):
        (tmp_path / "png" / cls).mkdir(parents=True)
        for i in range(6):
            img = (rng.random((6, 7)) * 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / "png" / cls / f"{i}.png")
    _, out = _prepare(tmp_path, "data.dataset=file", f"data.path={tmp_path / 'png'}")
    manifest = data.read_manifest(out)
    assert manifest["image_shape"] == [1, 6, 7] and manifest["classes"] == ["cats", "dogs"]


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: np.save(p / "f.npy", np.full((20, 3), np.nan)), "NaN or infinite"),
        (lambda p: np.save(p / "f.npy", np.ones((3, 3))), "at least 10 are needed"),
        (lambda p: np.save(p / "f.npy", np.array(["a"] * 20)), "expected numeric data"),
        (lambda p: (p / "f.npy").write_bytes(b"not numpy"), "not a readable NumPy file"),
        # an object array is a pickle: refused without numpy's advice to unpickle it
        (lambda p: np.save(p / "f.npy", np.array([{"a": 1}] * 20, dtype=object), allow_pickle=True),
         "pickled objects are never loaded"),
        (lambda p: (p / "f.parquet").write_bytes(b"garbage"), "not a readable Parquet file"),
        (lambda p: pd.DataFrame({"a": ["x"] * 20}).to_parquet(p / "f.parquet"), "non-numeric"),
        (lambda p: (p / "f.csv").write_text("1,2\n"), "unsupported file type"),
        (lambda p: (p / "f").mkdir(), "found 0 PNG images"),
        # issue 12 #10: float labels name the dtype (the shape alone looked right)
        (lambda p: np.savez(p / "f.npz", x=np.ones((20, 3)), y=np.linspace(0, 1, 20)), "got dtype float64"),
        (lambda p: pd.DataFrame({"a": np.ones(20), "label": np.linspace(0, 1, 20)}).to_parquet(p / "f.parquet"),
         "got dtype float64"),
    ],
)
def test_bad_user_files_are_named_and_nothing_is_written(tmp_path, make, needle):
    make(tmp_path)
    path = next(p for p in tmp_path.iterdir() if p.name.startswith("f"))
    cfg = config.load(None, [f"data.root={tmp_path / 'prepared'}", "data.dataset=file", f"data.path={path}"])
    with pytest.raises(DataError) as err:
        data.prepare(cfg.data)
    assert needle in str(err.value) and str(path) in str(err.value)
    assert not (tmp_path / "prepared").exists() or not any((tmp_path / "prepared").iterdir())


def test_missing_file_and_mismatched_png_sizes(tmp_path):
    cfg = config.load(None, ["data.dataset=file", f"data.path={tmp_path / 'none.npz'}"])
    with pytest.raises(DataError, match="file not found"):
        data.prepare(cfg.data)
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for i in range(12):
        Image.fromarray(np.zeros((4, 4 + (i == 5)), np.uint8)).save(tmp_path / "imgs" / f"{i:02d}.png")
    cfg = config.load(None, ["data.dataset=file", f"data.path={tmp_path / 'imgs'}"])
    with pytest.raises(DataError, match="differs from"):
        data.prepare(cfg.data)


def test_failed_prepare_keeps_the_previous_dataset(tmp_path, monkeypatch):
    cfg, out = _prepare(tmp_path, "data.dataset=bimodal", "data.count=100")
    before = (out / "manifest.json").read_text()

    def broken(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(data, "_sha256", broken)
    with pytest.raises(OSError):
        data.prepare(cfg.data)
    assert (out / "manifest.json").read_text() == before
    assert [p.name for p in out.parent.iterdir()] == ["bimodal"], "no temporary folder left behind"


def test_corrupt_prepared_split_is_reported(tmp_path):
    _, out = _prepare(tmp_path, "data.dataset=bimodal", "data.count=100")
    (out / "val.parquet").write_bytes(b"torn")
    with pytest.raises(DataError, match="val.parquet: not a readable Parquet file"):
        data.load_split(out, "val")
    (out / "manifest.json").unlink()
    with pytest.raises(DataError, match="run `diffenc prepare`"):
        data.load_split(out, "train")


def test_large_splits_are_written_and_read_a_row_group_at_a_time(tmp_path):
    """Issue 13: more rows than one row group; what is read back is exactly the source's rows."""
    count = 3 * data.ROWS_PER_GROUP
    cfg, out = _prepare(tmp_path, "data.dataset=bimodal", f"data.count={count}")
    parts = data.split_indices(count, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.seed)
    source = data.load_source(cfg.data)
    train = data.load_split(out, "train")
    assert pq.ParquetFile(out / "train.parquet").num_row_groups > 1
    assert torch.equal(train.x, torch.from_numpy(source.x[parts["train"]]))
    assert list(pq.read_table(out / "train.parquet").column("index").to_numpy()) == list(range(len(train)))
    assert np.array_equal(train.factors["z0"].to_numpy(), source.factors["z0"][parts["train"]])
    for rank in range(3):  # a rank of a 3-process job reads its own rows alone
        mine = data.load_split(out, "train", (rank, 3))
        assert torch.equal(mine.x, train.x[rank::3])
        assert np.array_equal(mine.factors["z0"].to_numpy(), train.factors["z0"].to_numpy()[rank::3])


def test_a_parquet_list_column_of_images(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.random((30, 12))
    pd.DataFrame({"x": list(images), "label": np.arange(30) % 3}).to_parquet(tmp_path / "imgs.parquet")
    cfg, out = _prepare(tmp_path, "data.dataset=file", f"data.path={tmp_path / 'imgs.parquet'}")
    arrays = data.load_source(cfg.data)
    assert arrays.x.dtype == np.float32 and np.array_equal(arrays.x, images.astype(np.float32))
    assert list(arrays.label) == [i % 3 for i in range(30)]
    ragged = [np.ones(12)] * 29 + [np.ones(11)]
    pd.DataFrame({"x": ragged}).to_parquet(tmp_path / "ragged.parquet")
    sets = [f"data.root={tmp_path / 'p2'}", "data.dataset=file", f"data.path={tmp_path / 'ragged.parquet'}"]
    cfg = config.load(None, sets)
    with pytest.raises(DataError, match="ragged.parquet: column 'x' must hold equal-length numeric lists"):
        data.prepare(cfg.data)


# ------------------------------------------------------------------ issue 19 #2: ambiguous user files
@pytest.mark.parametrize(
    ("make", "needle"),
    [
        # an .npz is read by its array names, never by position
        (lambda p: np.savez(p / "f.npz", features=np.ones((20, 3))), "no array 'x'; found ['features']"),
        (lambda p: np.savez(p / "f.npz", np.ones((20, 3))), "no array 'x'; found ['arr_0']"),
        (lambda p: np.savez(p / "f.npz", x=np.ones((20, 3)), y=np.arange(20), label=np.arange(20)),
         "both 'y' and 'label'"),
        (lambda p: np.savez(p / "f.npz", x=np.ones((20, 3)), mean=np.ones(3)), "unexpected array 'mean'"),
        # image stacks are (N, H, W) or (N, C, H, W); anything else is not guessed at
        (lambda p: np.save(p / "f.npy", np.ones((20, 2, 3, 4, 5))), "got a 5-D array of shape (20, 2, 3, 4, 5)"),
        (lambda p: np.savez(p / "f.npz", x=np.ones((20, 1, 3, 4, 5))), "got a 5-D array"),
        (lambda p: np.save(p / "f.npy", np.ones((20, 8, 8, 3))), "channels last"),
        (lambda p: np.save(p / "f.npy", np.ones((20, 7, 8, 8))), "channels last"),
    ],
)
def test_ambiguous_user_files_are_refused_and_the_prepared_data_kept(tmp_path, make, needle):
    """Issue 19 #2: refused in one line naming what was expected, and data/prepared/file untouched."""
    good = tmp_path / "good.npz"
    np.savez(good, x=np.random.default_rng(0).random((30, 4)), y=np.arange(30) % 3)
    _, out = _prepare(tmp_path, "data.dataset=file", f"data.path={good}")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    make(tmp_path)
    path = next(p for p in tmp_path.iterdir() if p.name.startswith("f."))
    cfg = config.load(None, [f"data.root={tmp_path / 'prepared'}", "data.dataset=file", f"data.path={path}"])
    with pytest.raises(DataError) as err:
        data.prepare(cfg.data)
    msg = str(err.value)
    assert needle in msg and str(path) in msg and "\n" not in msg
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in out.parent.iterdir()] == ["file"]


def test_npz_labels_under_any_of_the_three_names(tmp_path):
    for name in ("y", "label", "labels"):
        np.savez(tmp_path / f"{name}.npz", x=np.ones((20, 3)), **{name: np.arange(20) % 4})
        arrays = data.user_file(str(tmp_path / f"{name}.npz"))
        assert list(arrays.label) == [i % 4 for i in range(20)]
    np.save(tmp_path / "rgb.npy", np.ones((20, 3, 5, 6)))
    assert data.user_file(str(tmp_path / "rgb.npy")).image_shape == (3, 5, 6)


# ------------------------------------------------------------------ issue 19 #9: the umask
def test_prepared_folder_and_files_follow_the_umask(tmp_path):
    """Issue 19 #9: a prepared folder was 0700 (mkdtemp's mode survived the rename)."""
    old = os.umask(0o022)
    try:
        _, out = _prepare(tmp_path, "data.dataset=bimodal", "data.count=100")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {
        name: 0o644 for name in ("train.parquet", "val.parquet", "test.parquet", "manifest.json")
    }
    old = os.umask(0o077)
    try:
        _, out = _prepare(tmp_path, "data.dataset=bimodal", "data.count=100", "data.seed=1")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o700


# ------------------------------------------------------------------ MNIST / Fashion-MNIST (torchvision)
@pytest.mark.parametrize(("dataset", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_standard_datasets_read_through_torchvision(tmp_path, dataset, folder):
    raw = write_raw(tmp_path / "raw", folder)
    sets = [f"data.dataset={dataset}", f"data.raw_dir={tmp_path / 'raw'}", f"data.val_fraction={1 / 12}"]
    cfg, out = _prepare(tmp_path, *sets)
    assert out == tmp_path / "prepared" / dataset
    manifest = data.read_manifest(out)
    assert manifest["sizes"] == {"train": 33, "val": 3, "test": 12}  # val: 1/12 of the official training set
    assert manifest["image_shape"] == [1, 28, 28] and manifest["x_dim"] == 784 and manifest["has_label"]
    assert manifest["binarize"] == "none"
    test = data.load_split(out, "test")  # the official test set, in its order
    expected = torch.from_numpy(raw["t10k-images-idx3-ubyte"].reshape(12, 784)).float() / 255
    assert torch.equal(test.x, expected)
    assert list(test.label) == list(raw["t10k-labels-idx1-ubyte"])
    train, val = data.load_split(out, "train"), data.load_split(out, "val")
    images = torch.from_numpy(raw["train-images-idx3-ubyte"].reshape(36, 784)).float() / 255
    rows = np.concatenate([pq.read_table(out / f"{s}.parquet").column("source_row").to_numpy()
                           for s in ("train", "val")])
    assert sorted(rows) == list(range(36))  # train and val partition the official training set
    assert torch.equal(torch.cat([train.x, val.x]), images[rows])
    assert list(np.concatenate([train.label, val.label])) == list(raw["train-labels-idx1-ubyte"][rows])
    assert float(train.x.min()) == 0.0 and float(train.x.max()) == 1.0
    # test_fraction and count do not apply to a dataset with its own test set; the seed draws val
    again = config.with_overrides(cfg, {"data.test_fraction": 0.3, "data.count": 99, "data.root": str(tmp_path / "b")})
    assert data.read_manifest(data.prepare(again.data))["sha256"] == manifest["sha256"]
    other = config.with_overrides(cfg, {"data.seed": 1, "data.root": str(tmp_path / "c")})
    assert data.read_manifest(data.prepare(other.data))["sha256"]["val.parquet"] != manifest["sha256"]["val.parquet"]


def test_standard_dataset_missing_files_are_one_line(tmp_path):
    cfg = config.load(None, [f"data.root={tmp_path / 'prepared'}", "data.dataset=mnist",
                             f"data.raw_dir={tmp_path / 'raw'}"])
    with pytest.raises(DataError) as err:
        data.prepare(cfg.data)
    msg = str(err.value)
    folder = tmp_path / "raw" / "MNIST" / "raw"
    assert str(folder) in msg and all(name in msg for name in IDX_FILES) and "\n" not in msg
    assert "data.download=true" in msg
    write_raw(tmp_path / "raw")
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"missing t10k-labels-idx1-ubyte\b") as err:
        data.prepare(cfg.data)
    assert "train-images" not in str(err.value).split(";")[0]
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"")  # the files as they are distributed
    with pytest.raises(DataError, match=r"\(found t10k-labels-idx1-ubyte.gz: torchvision reads the files uncompressed, "
                       r"gunzip them\)"):
        data.prepare(cfg.data)
    for name in IDX_FILES:  # the four .gz files as distributed, copied without gunzip
        (folder / f"{name}.gz").write_bytes(b"")
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(DataError, match=r"raw: no files \(found train-images-idx3-ubyte.gz, .*gunzip them\)"):
        data.prepare(cfg.data)
    assert not (tmp_path / "prepared").exists() or not any((tmp_path / "prepared").iterdir())


@pytest.mark.parametrize(
    ("spoil", "needle"),
    [
        (lambda f: f.write_bytes(f.read_bytes()[:-100]), "train-images-idx3-ubyte: truncated"),
        (lambda f: f.write_bytes(b"\x00\x00\x08\x01" + f.read_bytes()[4:]), "train-images-idx3-ubyte: not an IDX"),
        (lambda f: f.write_bytes(idx_bytes(np.zeros((36, 14, 14), np.uint8))), "28x28"),
        (lambda f: f.write_bytes(idx_bytes(np.zeros((35, 28, 28), np.uint8))), "35 images but 36 labels"),
    ],
)
def test_a_corrupt_raw_file_is_named_and_the_prepared_data_kept(tmp_path, spoil, needle):
    sets = ["data.dataset=mnist", f"data.raw_dir={tmp_path / 'raw'}"]
    write_raw(tmp_path / "raw")
    cfg, out = _prepare(tmp_path, *sets)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    spoil(tmp_path / "raw" / "MNIST" / "raw" / "train-images-idx3-ubyte")
    with pytest.raises(DataError) as err:
        data.prepare(cfg.data)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


class _RaisingFinder(importlib.abc.MetaPathFinder):
    """An import of torchvision that fails for a reason other than its missing compiled operators."""

    def find_spec(self, name, path, target=None):
        if name == "torchvision":
            raise RuntimeError("CUDA driver version is insufficient")
        return None


def test_the_torchvision_workaround_applies_only_to_its_own_failure(monkeypatch):
    before = data._TORCHVISION_OPS
    fake, fake_datasets = types.ModuleType("torchvision"), types.ModuleType("torchvision.datasets")
    fake.datasets = fake_datasets
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", fake_datasets)
    assert data.torchvision_datasets() is fake_datasets  # a torchvision that imports is used as it is
    assert data._TORCHVISION_OPS is before
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        monkeypatch.delitem(sys.modules, name)  # restored after the test
    monkeypatch.setattr(sys, "meta_path", [_RaisingFinder(), *sys.meta_path])
    with pytest.raises(RuntimeError, match="CUDA driver version is insufficient"):
        data.torchvision_datasets()
    assert data._TORCHVISION_OPS is before


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the test's output stays clean
        pass


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """An HTTP server on 127.0.0.1 (a free port) serving ``tmp_path/mirror``; stopped by the test."""
    root = tmp_path / "mirror"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=root))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_download_fetches_the_files_through_torchvision(tmp_path, mirror, monkeypatch):
    """``data.download=true``: torchvision's downloader (mirrors, MD5 check, gunzip), here from a local mirror."""
    served, url = mirror
    raw = tiny_idx()
    resources = []
    for name, arr in raw.items():
        blob = gzip.compress(idx_bytes(arr))
        (served / f"{name}.gz").write_bytes(blob)
        resources.append((f"{name}.gz", hashlib.md5(blob).hexdigest()))
    tv = data.torchvision_datasets()
    monkeypatch.setattr(tv.FashionMNIST, "mirrors", [url])
    monkeypatch.setattr(tv.FashionMNIST, "resources", resources)
    sets = ["data.dataset=fashion_mnist", f"data.raw_dir={tmp_path / 'raw'}"]
    with pytest.raises(DataError, match="data.download=true"):
        _prepare(tmp_path, *sets)  # offline by default: nothing is fetched
    assert not (tmp_path / "raw").exists()
    _, out = _prepare(tmp_path, *sets, "data.download=true")
    assert sorted(p.name for p in (tmp_path / "raw" / "FashionMNIST" / "raw").glob("*-ubyte")) == sorted(IDX_FILES)
    assert list(data.load_split(out, "test").label) == list(raw["t10k-labels-idx1-ubyte"])

    # the files there: nothing is fetched again (the mirror is gone)
    monkeypatch.setattr(tv.FashionMNIST, "mirrors", [url + "nowhere/"])
    _prepare(tmp_path, *sets, "data.download=true")

    # a mirror that fails: one line naming the file and the folder, nothing prepared replaced
    before = (out / "manifest.json").read_text()
    monkeypatch.setattr(tv.MNIST, "mirrors", [url + "nowhere/"])
    monkeypatch.setattr(tv.MNIST, "resources", resources)
    with pytest.raises(DataError) as err:
        _prepare(tmp_path, "data.dataset=mnist", f"data.raw_dir={tmp_path / 'raw'}", "data.download=true")
    msg = str(err.value)
    assert "could not download train-images-idx3-ubyte.gz" in msg and "MNIST" in msg and "\n" not in msg
    assert (out / "manifest.json").read_text() == before


# ------------------------------------------------------------------ binarised data
def test_dynamic_binarisation_keeps_training_intensities_and_fixes_val_and_test(tmp_path):
    _, plain = _prepare(tmp_path / "plain")
    _, out = _prepare(tmp_path / "dyn", "data.binarize=dynamic")
    assert data.read_manifest(out)["binarize"] == "dynamic" and data.read_manifest(plain)["binarize"] == "none"
    assert torch.equal(data.load_split(out, "train").x, data.load_split(plain, "train").x)  # the trainer samples
    for split in ("val", "test"):
        x, p = data.load_split(out, split).x, data.load_split(plain, split).x
        assert set(x.unique().tolist()) == {0.0, 1.0}
        assert torch.equal(x[p == 0], p[p == 0]) and torch.equal(x[p == 1], p[p == 1])
        # a Bernoulli sample of the intensities: the mean of x - p is 0 within sampling error
        assert abs(float((x - p).mean())) < 4 * float((p * (1 - p)).sum().sqrt()) / p.numel()
    _, again = _prepare(tmp_path / "again", "data.binarize=dynamic")
    assert data.read_manifest(again)["sha256"] == data.read_manifest(out)["sha256"]  # seeded by data.seed
    _, other = _prepare(tmp_path / "other", "data.binarize=dynamic", "data.seed=1")
    assert data.read_manifest(other)["sha256"]["test.parquet"] != data.read_manifest(out)["sha256"]["test.parquet"]


def test_fixed_binarisation_binarises_the_training_set_once(tmp_path):
    write_raw(tmp_path / "raw")
    _, out = _prepare(tmp_path, "data.dataset=mnist", f"data.raw_dir={tmp_path / 'raw'}", "data.binarize=fixed")
    assert data.read_manifest(out)["binarize"] == "fixed"
    for split in data.SPLITS:
        assert set(data.load_split(out, split).x.unique().tolist()) == {0.0, 1.0}
    _, dyn = _prepare(tmp_path / "d", "data.dataset=mnist", f"data.raw_dir={tmp_path / 'raw'}",
                      "data.binarize=dynamic")
    assert torch.equal(data.load_split(dyn, "test").x, data.load_split(out, "test").x)  # the same seeded test set


def test_binarising_features_outside_0_1_is_refused(tmp_path):
    _, out = _prepare(tmp_path, "data.dataset=bimodal", "data.count=100")
    before = (out / "manifest.json").read_text()
    cfg = config.load(None, [f"data.root={tmp_path / 'prepared'}", "data.dataset=bimodal", "data.count=100",
                             "data.binarize=dynamic"])
    with pytest.raises(DataError) as err:
        data.prepare(cfg.data)
    msg = str(err.value)
    assert "data.binarize" in msg and "[0, 1]" in msg and "found [" in msg and "\n" not in msg
    assert (out / "manifest.json").read_text() == before


def test_binarising_is_a_row_group_at_a_time(tmp_path, monkeypatch):
    """The same draws whatever the row-group size, and no full-size temporary (memory stays flat)."""
    monkeypatch.setattr(data, "ROWS_PER_GROUP", 64)
    rng = np.random.default_rng(0)
    arrays = data.Arrays(x=rng.random((2048, 256), dtype=np.float32))
    idx = np.arange(2048)
    tracemalloc.start()
    try:
        data._write_split(arrays, idx, tmp_path / "small.parquet", data.binarizer(0, "test"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < arrays.x.nbytes / 4, f"peak {peak} bytes for a {arrays.x.nbytes}-byte array"
    monkeypatch.setattr(data, "ROWS_PER_GROUP", 4096)
    data._write_split(arrays, idx, tmp_path / "large.parquet", data.binarizer(0, "test"))
    small, large = (pq.read_table(tmp_path / f"{n}.parquet").column("x").combine_chunks() for n in ("small", "large"))
    assert small.equals(large)
