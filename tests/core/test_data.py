"""Datasets, the Parquet schema, determinism, atomicity and clear errors for bad user files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

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
    for change in ({"data.count": 80}, {"data.seed": 1}, {"data.image_size": 24}, {"data.val_fraction": 0.2}):
        assert not data.is_prepared(config.with_overrides(cfg, change).data), change
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
