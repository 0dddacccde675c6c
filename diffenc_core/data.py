"""Datasets, splits and the prepared-data Parquet format.

``prepare(cfg.data)`` writes ``<root>/<name>/{train,val,test}.parquet`` and ``manifest.json``;
``load_split`` reads one split back with its schema checked. Features are flattened float32
vectors (images in [0, 1], row-major ``C x H x W``); labels and generating factors are optional.
With ``data.binarize`` the splits it names hold Bernoulli samples (0 or 1) of the intensities.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import secrets
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from diffenc_core.config import DataConfig
from diffenc_core.errors import DataError, DiffencError, writing
from diffenc_core.toys import Bimodal, LinearGaussian

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
MIN_ROWS = 10
FEATURES = "x"
LABEL = "label"
FACTOR_PREFIX = "factor_"
SPRITE_SHAPES = ("square", "ellipse", "heart")
SPRITE_CHUNK = 256  # sprites drawn per vectorised batch: its temporaries are the memory beyond the images
ROWS_PER_GROUP = 4096
"""Rows per Parquet row group written, and per batch read or checked: memory beyond the float32 array of a
dataset stays this many rows, so a 60 000-image dataset is prepared and loaded in about its own size."""
NPZ_LABELS = ("y", "label", "labels")  # the names an .npz may give its integer labels (one of them)
IMAGE_CHANNELS = (1, 2, 3, 4)  # grey, grey + alpha, RGB, RGBA: a 4-D array's second axis
STANDARD = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}  # data.dataset -> torchvision.datasets class
STANDARD_SIDE = 28  # MNIST and Fashion-MNIST images are 28 x 28
BINARIZE_STREAM = 0xB1  # the binarising draws' stream, apart from the split's permutation (seeded by data.seed)


@dataclass
class Arrays:
    """An in-memory dataset before splitting."""

    x: np.ndarray  # (N, D) float32
    label: np.ndarray | None = None  # (N,) int64
    factors: dict[str, np.ndarray] = field(default_factory=dict)
    image_shape: tuple[int, int, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    test_from: int | None = None  # rows from here on are the dataset's own test set (MNIST's t10k files)


@dataclass
class Split:
    """One prepared split, ready for training."""

    x: torch.Tensor  # (N, D) float32
    label: np.ndarray | None
    factors: pd.DataFrame
    image_shape: tuple[int, int, int] | None
    manifest: dict[str, Any]

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def x_dim(self) -> int:
        return self.x.shape[1]


# ------------------------------------------------------------------------------------ sources
def digits() -> Arrays:
    """sklearn's bundled 8x8 handwritten digits, scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    return Arrays(x=x, label=d.target.astype(np.int64), image_shape=(1, 8, 8))


def sprites(count: int, size: int, seed: int) -> Arrays:
    """dSprites-like images: a square, ellipse or heart at a random scale, rotation and position.

    Drawn by point-in-shape tests on a 2x2 supersampled grid (anti-aliased), all factors kept.
    """
    rng = np.random.default_rng(seed)
    shape = rng.integers(0, len(SPRITE_SHAPES), count)
    scale = rng.uniform(0.5, 1.0, count)
    rotation = rng.uniform(0.0, 2 * math.pi, count)
    pos_x = rng.uniform(0.25, 0.75, count)
    pos_y = rng.uniform(0.25, 0.75, count)
    sub = 2
    n = size * sub
    coords = (np.arange(n) + 0.5) / n
    gy, gx = np.meshgrid(coords, coords, indexing="ij")
    images = np.empty((count, size, size), dtype=np.float32)
    radius = 0.18  # half-width of a unit-scale sprite, as a fraction of the canvas
    for start in range(0, count, SPRITE_CHUNK):
        sl = slice(start, min(start + SPRITE_CHUNK, count))
        dx = gx[None] - pos_x[sl, None, None]
        dy = gy[None] - pos_y[sl, None, None]
        c, s = np.cos(rotation[sl])[:, None, None], np.sin(rotation[sl])[:, None, None]
        r = radius * scale[sl, None, None]
        u = (c * dx + s * dy) / r
        v = (-s * dx + c * dy) / r
        sq = (np.abs(u) <= 1) & (np.abs(v) <= 1)
        el = (u / 1.0) ** 2 + (v / 0.6) ** 2 <= 1
        # the heart curve (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, scaled to fit the unit box
        hu, hv = u * 1.2, -v * 1.2 + 0.2
        he = (hu**2 + hv**2 - 1) ** 3 - hu**2 * hv**3 <= 0
        which = shape[sl, None, None]
        mask = np.where(which == 0, sq, np.where(which == 1, el, he)).astype(np.float32)
        images[sl] = mask.reshape(-1, size, sub, size, sub).mean(axis=(2, 4))
    return Arrays(
        x=images.reshape(count, -1),
        label=shape.astype(np.int64),
        factors={
            "shape": shape.astype(np.float32),
            "scale": scale.astype(np.float32),
            "rotation": rotation.astype(np.float32),
            "pos_x": pos_x.astype(np.float32),
            "pos_y": pos_y.astype(np.float32),
        },
        image_shape=(1, size, size),
        extra={"shapes": list(SPRITE_SHAPES)},
    )


def _toy(model: LinearGaussian | Bimodal, kind: str, count: int, seed: int) -> Arrays:
    g = torch.Generator().manual_seed(seed)
    x, z = model.sample(count, generator=g)
    factors = {f"z{i}": z[:, i].numpy().astype(np.float32) for i in range(z.shape[1])}
    truth = {"kind": kind, **model.to_dict()}
    return Arrays(x=x.numpy().astype(np.float32), factors=factors, extra={"ground_truth": truth})


def bimodal(cfg: DataConfig) -> Arrays:
    """Samples of the fixed non-injective decoder whose exact posterior is bimodal."""
    model = Bimodal(shift=tuple(cfg.bimodal.shift), noise=cfg.bimodal.noise)
    return _toy(model, "bimodal", cfg.count, cfg.seed)


def linear_gaussian(cfg: DataConfig) -> Arrays:
    """Probabilistic PCA with known W, b, noise (exact posterior and evidence in closed form)."""
    lg = cfg.linear_gaussian
    model = LinearGaussian.from_posterior_std(lg.x_dim, lg.posterior_std, lg.noise, seed=cfg.seed)
    return _toy(model, "linear_gaussian", cfg.count, cfg.seed + 1)


# ---------------------------------------------------------------------------------- user files
def _check_array(x: np.ndarray, where: str) -> np.ndarray:
    if x.dtype == object or not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{where}: expected numeric data, got dtype {x.dtype}")
    _check_layout(x.shape, where)
    if x.shape[0] < MIN_ROWS:
        raise DataError(f"{where}: only {x.shape[0]} rows; at least {MIN_ROWS} are needed")
    x = x.astype(np.float32, copy=False)
    bad = _non_finite_rows(x.reshape(x.shape[0], -1))
    if bad:
        raise DataError(f"{where}: {bad} rows contain NaN or infinite values")
    return x


def _check_layout(shape: tuple[int, ...], where: str) -> None:
    """One row per example: (N, D) vectors, (N, H, W) or (N, C, H, W) images; no other layout is guessed at."""
    if not 2 <= len(shape) <= 4:
        raise DataError(f"{where}: expected rows (N, D) or images (N, H, W) or (N, C, H, W), "
                        f"got a {len(shape)}-D array of shape {shape}")
    if len(shape) == 4 and shape[1] not in IMAGE_CHANNELS:
        raise DataError(f"{where}: a 4-D array must hold images (N, C, H, W) with 1 to 4 channels first, got shape "
                        f"{shape}; for channels last (N, H, W, C) save x.transpose(0, 3, 1, 2)")


def _non_finite_rows(x: np.ndarray) -> int:
    """Rows of ``x`` (N, D) with a NaN or infinity, checked a row group at a time (no full-size mask)."""
    groups = range(0, len(x), ROWS_PER_GROUP)
    return sum(int((~np.isfinite(x[i : i + ROWS_PER_GROUP])).any(axis=1).sum()) for i in groups)


def _image_shape(x: np.ndarray) -> tuple[int, int, int] | None:
    if x.ndim == 3:
        return (1, x.shape[1], x.shape[2])
    if x.ndim == 4:
        return (x.shape[1], x.shape[2], x.shape[3])
    return None


def _from_array(x: np.ndarray, label: np.ndarray | None, where: str) -> Arrays:
    x = _check_array(x, where)
    shape = _image_shape(x)
    if label is not None:
        label = np.asarray(label)
        if label.shape != (x.shape[0],) or not np.issubdtype(label.dtype, np.integer):
            raise DataError(f"{where}: labels must be integers, one per row ({x.shape[0]}), "
                            f"got dtype {label.dtype} with shape {label.shape}")
    return Arrays(x=x.reshape(x.shape[0], -1), label=label, image_shape=shape)


def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def _read_parquet_file(path: Path) -> Arrays:
    """A user's Parquet file: a ``x`` column of equal-length numeric lists (e.g. flattened images) or
    numeric columns, and an optional integer ``label``; read a row group at a time into one
    preallocated float32 array (no per-row Python objects)."""
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
        n = pf.metadata.num_rows
        index_columns = {c for c in ((schema.pandas_metadata or {}).get("index_columns") or []) if isinstance(c, str)}
        label = _parquet_label(pf, path) if LABEL in schema.names else None
        if FEATURES in schema.names:
            x = _parquet_lists(pf, path, n)
        else:
            columns = [c for c in schema.names if c != LABEL and c not in index_columns]
            non_numeric = [c for c in columns if not _numeric(schema.field(c).type)]
            if non_numeric:
                raise DataError(
                    f"{path}: non-numeric columns {non_numeric}; expected numbers or a '{FEATURES}' list column"
                )
            if not columns:
                raise DataError(f"{path}: no feature columns")
            x = np.empty((n, len(columns)), dtype=np.float32)
            row = 0
            for batch in pf.iter_batches(batch_size=ROWS_PER_GROUP, columns=columns):
                for j in range(batch.num_columns):  # a missing value reads as NaN, reported as such below
                    x[row : row + batch.num_rows, j] = batch.column(j).cast(pa.float32()).to_numpy(zero_copy_only=False)
                row += batch.num_rows
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{path}: not a readable Parquet file ({err.__class__.__name__})") from None
    return _from_array(x, label, str(path))


def _parquet_label(pf: pq.ParquetFile, path: Path) -> np.ndarray:
    col = pf.read(columns=[LABEL]).column(LABEL)
    if col.null_count or not pa.types.is_integer(col.type):
        dtype = np.dtype(col.type.to_pandas_dtype()).name
        raise DataError(f"{path}: column '{LABEL}' must hold integers without gaps, got dtype {dtype}")
    return col.to_numpy()


def _parquet_lists(pf: pq.ParquetFile, path: Path, n: int) -> np.ndarray:
    """The ``x`` list column as an (N, D) float32 array, filled one row group at a time."""
    bad = DataError(f"{path}: column '{FEATURES}' must hold equal-length numeric lists")
    kind = pf.schema_arrow.field(FEATURES).type
    list_kind = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    if not list_kind or not _numeric(kind.value_type):
        raise bad
    x: np.ndarray | None = None
    row = 0
    for batch in pf.iter_batches(batch_size=ROWS_PER_GROUP, columns=[FEATURES]):
        col = batch.column(0)
        if col.null_count:
            raise bad
        lengths = np.unique(pc.list_value_length(col).to_numpy(zero_copy_only=False))
        if x is None and len(lengths):
            x = np.empty((n, int(lengths[0])), dtype=np.float32)
        if len(lengths) > 1 or (x is not None and len(lengths) and lengths[0] != x.shape[1]):
            raise bad
        values = col.flatten().cast(pa.float32()).to_numpy(zero_copy_only=False)
        if x is not None:
            x[row : row + len(col)] = values.reshape(len(col), x.shape[1])
        row += len(col)
    if x is None:
        raise DataError(f"{path}: no rows")
    return x


def _read_numpy_file(path: Path) -> Arrays:
    try:
        if path.suffix == ".npy":
            return _from_array(np.load(path, allow_pickle=False), None, str(path))
        with np.load(path, allow_pickle=False) as npz:
            ykey = _npz_names(path, list(npz.keys()))
            return _from_array(npz[FEATURES], npz[ykey] if ykey else None, f"{path}[{FEATURES}]")
    except DataError:
        raise
    except Exception as err:
        if "pickle" in str(err) or "Object arrays" in str(err):  # numpy's advice to unpickle is not ours to give
            raise DataError(f"{path}: not a readable NumPy file of numbers (pickled objects are never loaded; save "
                            "numeric arrays, e.g. np.savez(path, x=...))") from None
        raise DataError(f"{path}: not a readable NumPy file ({err.__class__.__name__}: {err})") from None


def _npz_names(path: Path, names: list[str]) -> str | None:
    """Check an .npz holds ``x`` and at most one label array (nothing read by position); its label's name."""
    expected = f"expected '{FEATURES}' (features) and optionally integer labels named one of {list(NPZ_LABELS)}"
    if FEATURES not in names:
        raise DataError(f"{path}: no array '{FEATURES}'; found {names}; {expected}")
    labels = [k for k in NPZ_LABELS if k in names]
    if len(labels) > 1:
        raise DataError(f"{path}: holds both '{labels[0]}' and '{labels[1]}' as labels; keep one")
    others = [k for k in names if k != FEATURES and k not in NPZ_LABELS]
    if others:
        listed = ", ".join(repr(k) for k in others)
        raise DataError(f"{path}: unexpected array{'s' if len(others) > 1 else ''} {listed}; {expected}")
    return labels[0] if labels else None


def _read_png(p: Path) -> np.ndarray:
    """One image in grey levels in [0, 1], float32."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as im:
            return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError):
        raise DataError(f"{p}: not a readable PNG image") from None


def _read_png_folder(path: Path) -> Arrays:
    """A folder of equal-size PNG images (sub-folders name classes), read into one preallocated array."""
    files = sorted(p for p in path.rglob("*.png") if p.is_file())
    if len(files) < MIN_ROWS:
        raise DataError(f"{path}: found {len(files)} PNG images; at least {MIN_ROWS} are needed")
    classes = sorted({p.parent.name for p in files if p.parent != path})
    class_of = {name: i for i, name in enumerate(classes)}
    first = _read_png(files[0])
    images = np.empty((len(files), *first.shape), dtype=np.float32)
    labels = np.full(len(files), -1, dtype=np.int64)
    for i, p in enumerate(files):
        arr = first if i == 0 else _read_png(p)
        if arr.shape != first.shape:
            raise DataError(f"{p}: size {arr.shape[::-1]} differs from {first.shape[::-1]} of {files[0]}")
        images[i] = arr
        if p.parent != path:
            labels[i] = class_of[p.parent.name]
    label = labels if classes and labels.min() >= 0 else None
    arrays = _from_array(images, label, str(path))
    if classes:
        arrays.extra["classes"] = classes
    return arrays


def user_file(path: str) -> Arrays:
    """The user's own data: ``.parquet``, ``.npz``/``.npy`` or a folder of PNG images."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: file not found (data.path)")
    if p.is_dir():
        return _read_png_folder(p)
    if p.suffix == ".parquet":
        return _read_parquet_file(p)
    if p.suffix in (".npz", ".npy"):
        return _read_numpy_file(p)
    raise DataError(f"{p}: unsupported file type '{p.suffix}'; expected .parquet, .npz, .npy or a PNG folder")


# ------------------------------------------------------------------------ MNIST, Fashion-MNIST
_TORCHVISION_OPS: torch.library.Library | None = None  # kept for the process's lifetime (see below)


def torchvision_datasets() -> Any:
    """``torchvision.datasets``, also where torchvision's compiled extension cannot load.

    A torchvision wheel built for CUDA beside a CPU-only torch fails on import with ``operator
    torchvision::nms does not exist``: its meta registrations look up two operators the extension would
    have defined. Defining their schemas (no kernels; only the dataset classes are used here, never
    ``torchvision.ops``) lets the import finish. A torchvision that imports is left untouched.
    """
    global _TORCHVISION_OPS
    try:
        import torchvision.datasets
    except RuntimeError as err:
        if "torchvision::" not in str(err) or _TORCHVISION_OPS is not None:
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]  # the half-imported package, so the second import starts afresh
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_OPS = lib  # the definitions last as long as the library object
        import torchvision.datasets
    return torchvision.datasets


def _raw_files(cls: Any) -> list[str]:
    """The uncompressed IDX files torchvision reads, in its order (train images, labels, test images, labels)."""
    return [name.removesuffix(".gz") for name, _ in cls.resources]


def _download(cls: Any, root: str, folder: Path) -> None:
    """torchvision's download (its mirrors, MD5 checks, gunzip) into ``folder``; one line if it fails."""
    try:
        with writing(folder, "check data.raw_dir"), contextlib.redirect_stderr(io.StringIO()):  # its progress bar
            cls(root, train=False, download=True)
    except DiffencError:
        raise
    except (RuntimeError, OSError) as err:  # every mirror failed (several lines), or no network at all
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [err.__class__.__name__]
        what = lines[0].removeprefix("Error downloading ").rstrip(":") if len(lines) > 1 else "the files"
        raise DataError(f"{folder}: could not download {what} ({lines[-1]}); check the network, or copy the "
                        f"four files {', '.join(_raw_files(cls))} there") from None


def _idx_dims(path: Path, ndim: int) -> tuple[int, ...]:
    """The dims of an IDX file of unsigned bytes (magic ``00 00 08 <ndim>``), its size checked against them."""
    try:
        with open(path, "rb") as f:
            head = f.read(4 + 4 * ndim)
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    magic = bytes([0, 0, 0x08, ndim])
    if len(head) < len(magic) + 4 * ndim or head[:4] != magic:
        raise DataError(f"{path}: not an IDX file of {ndim}-D unsigned bytes (magic {head[:4].hex() or 'missing'}, "
                        f"expected {magic.hex()}); replace it with the original file")
    dims = tuple(int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size, expected = path.stat().st_size, len(head) + math.prod(dims)
    if size != expected:
        how = "truncated" if size < expected else "longer than its header says"
        raise DataError(f"{path}: {how} ({size} bytes, its header gives {expected}); delete it and copy or "
                        "download it again")
    return dims


def _check_raw(folder: Path, cls: Any, dataset: str) -> None:
    """Every raw file present and whole, images 28 x 28 and one label per image, before anything is read."""
    files = _raw_files(cls)
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        zipped = [f"{f}.gz" for f in missing if (folder / f"{f}.gz").is_file()]
        found = f" (found {', '.join(zipped)}: torchvision reads the files uncompressed, gunzip them)" if zipped else ""
        what = "no files" if len(missing) == len(files) else f"missing {', '.join(missing)}"
        raise DataError(f"{folder}: {what}{found}; data.dataset={dataset} reads the four "
                        f"uncompressed IDX files {', '.join(files)} there: set data.download=true to fetch them, "
                        "or copy them there")
    for images, labels in (files[0:2], files[2:4]):
        n, h, w = _idx_dims(folder / images, 3)
        (m,) = _idx_dims(folder / labels, 1)
        if (h, w) != (STANDARD_SIDE, STANDARD_SIDE):
            raise DataError(f"{folder / images}: {h}x{w} images; {dataset} images are "
                            f"{STANDARD_SIDE}x{STANDARD_SIDE}")
        if n != m or n == 0:
            raise DataError(f"{folder / images}: {n} images but {m} labels in {labels}")


def standard(cfg: DataConfig) -> Arrays:
    """MNIST or Fashion-MNIST through torchvision's dataset classes, from ``<raw_dir>/<Class>/raw/`` (offline
    unless ``data.download``): the official training set, then its test set (``test_from``), in [0, 1]."""
    cls = getattr(torchvision_datasets(), STANDARD[cfg.dataset])
    folder = Path(cfg.raw_dir) / cls.__name__ / "raw"  # torchvision's layout (its ``raw_folder``)
    if cfg.download:
        _download(cls, cfg.raw_dir, folder)
    _check_raw(folder, cls, cfg.dataset)
    try:
        parts = [cls(cfg.raw_dir, train=train) for train in (True, False)]
    except (RuntimeError, ValueError, TypeError, AssertionError, OSError) as err:
        raise DataError(f"{folder}: unreadable by torchvision ({err.__class__.__name__}: {err})") from None
    n = sum(len(p.data) for p in parts)
    x = np.empty((n, STANDARD_SIDE * STANDARD_SIDE), dtype=np.float32)
    label = np.empty(n, dtype=np.int64)
    row = 0
    for part in parts:
        images = part.data.numpy().reshape(len(part.data), -1)
        np.divide(images, np.float32(255), out=x[row : row + len(images)])  # uint8 -> [0, 1], no float64 copy
        label[row : row + len(images)] = part.targets.numpy()
        row += len(images)
    return Arrays(x=x, label=label, image_shape=(1, STANDARD_SIDE, STANDARD_SIDE),
                  extra={"classes": list(cls.classes)}, test_from=len(parts[0].data))


def load_source(cfg: DataConfig) -> Arrays:
    """The full dataset named by ``cfg.dataset``."""
    if cfg.dataset in STANDARD:
        return standard(cfg)
    if cfg.dataset == "digits":
        return digits()
    if cfg.dataset == "sprites":
        return sprites(cfg.count, cfg.image_size, cfg.seed)
    if cfg.dataset == "bimodal":
        return bimodal(cfg)
    if cfg.dataset == "linear_gaussian":
        return linear_gaussian(cfg)
    return user_file(cfg.path or "")


# ---------------------------------------------------------------------------------- splitting
def split_indices(
    n: int, val_fraction: float, test_fraction: float, seed: int, test_from: int | None = None
) -> dict[str, np.ndarray]:
    """A seeded permutation cut into train / val / test (each non-empty). With ``test_from`` the rows from
    there on are the dataset's own test set and val is cut from the rows before it (no test_fraction)."""
    pool = n if test_from is None else test_from
    perm = np.random.default_rng(seed).permutation(pool)
    n_val = max(1, round(pool * val_fraction))
    n_test = max(1, round(n * test_fraction)) if test_from is None else 0
    n_train = pool - n_val - n_test
    if n_train < 1 or (test_from is not None and test_from >= n):
        raise DataError(f"{n} rows are too few to split into train/val/test")
    test = perm[n_train + n_val :] if test_from is None else np.arange(test_from, n)
    return {"train": np.sort(perm[:n_train]), "val": np.sort(perm[n_train : n_train + n_val]), "test": np.sort(test)}


def binarizer(seed: int, split: str) -> np.random.Generator:
    """The stream that binarises one split, from ``data.seed``: the same pixels whatever the row groups."""
    return np.random.default_rng([seed, BINARIZE_STREAM, SPLITS.index(split)])


def binarized_splits(mode: str) -> tuple[str, ...]:
    """The splits prepared as 0/1 samples: val and test for ``dynamic`` (the trainer samples every
    training batch afresh from the intensities), every split for ``fixed``."""
    return {"none": (), "dynamic": ("val", "test"), "fixed": SPLITS}[mode]


def _check_unit_range(x: np.ndarray, cfg: DataConfig) -> None:
    """Binarising reads features as Bernoulli probabilities: they must lie in [0, 1]."""
    lo, hi = float(x.min()), float(x.max())  # reductions: no temporary the size of x
    if lo < 0.0 or hi > 1.0:
        raise DataError(f"data.binarize: '{cfg.binarize}' needs features in [0, 1] (pixel intensities), found "
                        f"[{lo:.4g}, {hi:.4g}] in data.dataset={cfg.dataset}; use data.binarize=none")


def to_table(arrays: Arrays, idx: np.ndarray, start: int = 0, binarize: np.random.Generator | None = None) -> pa.Table:
    """The checked schema: ``index``, ``x`` (fixed-size list<float32>), optional label and factors;
    rows ``idx`` of ``arrays``, the ``start``-th row of their split onwards; with ``binarize`` the
    features are one Bernoulli sample of them (0 or 1) drawn from that stream."""
    x = arrays.x[idx]
    if binarize is not None:
        x = (binarize.random(x.shape, dtype=np.float32) < x).astype(np.float32)
    flat = pa.array(x.reshape(-1), type=pa.float32())
    cols: dict[str, pa.Array] = {
        "index": pa.array(np.arange(start, start + len(idx), dtype=np.int64)),
        "source_row": pa.array(idx.astype(np.int64)),
        FEATURES: pa.FixedSizeListArray.from_arrays(flat, x.shape[1]),
    }
    if arrays.label is not None:
        cols[LABEL] = pa.array(arrays.label[idx].astype(np.int64))
    for name, values in arrays.factors.items():
        cols[FACTOR_PREFIX + name] = pa.array(values[idx].astype(np.float32))
    return pa.table(cols)


def _write_split(arrays: Arrays, idx: np.ndarray, path: Path, binarize: np.random.Generator | None = None) -> None:
    """Rows ``idx`` of ``arrays`` as a Parquet file, a row group at a time (binarised from that stream)."""
    writer: pq.ParquetWriter | None = None
    try:
        for start in range(0, len(idx), ROWS_PER_GROUP):
            table = to_table(arrays, idx[start : start + ROWS_PER_GROUP], start, binarize)
            writer = writer or pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def recipe(cfg: DataConfig) -> dict[str, Any]:
    """Everything in ``cfg`` that decides the prepared data (not where it is written, nor whether the raw
    files were downloaded); a user file's path is made absolute so the same file named two ways is the
    same recipe."""
    out = cfg.model_dump(mode="json", exclude={"root", "download"})
    if cfg.dataset == "file" and cfg.path:
        out["path"] = str(Path(cfg.path).resolve())
    return out


def is_prepared(cfg: DataConfig) -> bool:
    """True when ``cfg.prepared_dir`` holds data prepared from exactly this recipe."""
    try:
        manifest = read_manifest(cfg.prepared_dir)
    except DataError:
        return False
    return manifest.get("recipe") == recipe(cfg)


def _new_folder(parent: Path, prefix: str) -> Path:
    """A fresh uniquely named folder with the umask's permissions (``mkdtemp`` makes it 0700 and the mode
    survives the rename, so a dashboard or DVC under another account could not read the data)."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def prepare(cfg: DataConfig) -> Path:
    """Build the prepared dataset folder atomically and return its path.

    The source is read and checked whole first; everything is then written into a temporary sibling
    folder that replaces the target only once complete, so a refused, interrupted or failed prepare
    leaves the previous state untouched.
    """
    arrays = load_source(cfg)
    if cfg.binarize != "none":
        _check_unit_range(arrays.x, cfg)
    rec = recipe(cfg)
    parts = split_indices(arrays.x.shape[0], cfg.val_fraction, cfg.test_fraction, cfg.seed, arrays.test_from)
    target = cfg.prepared_dir
    with writing(target, "check data.root"):  # a read-only or full disk: one line, nothing replaced
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_folder(target.parent, f".{target.name}.")
        try:
            hashes = {}
            for split, idx in parts.items():
                path = tmp / f"{split}.parquet"
                binarize = binarizer(cfg.seed, split) if split in binarized_splits(cfg.binarize) else None
                _write_split(arrays, idx, path, binarize)
                hashes[f"{split}.parquet"] = _sha256(path)
            manifest = {
                "dataset": cfg.dataset,
                "source": rec["path"] if cfg.dataset == "file" else cfg.dataset,
                "seed": cfg.seed,
                "sizes": {k: int(len(v)) for k, v in parts.items()},
                "x_dim": int(arrays.x.shape[1]),
                "image_shape": list(arrays.image_shape) if arrays.image_shape else None,
                "has_label": arrays.label is not None,
                "factors": list(arrays.factors),
                "official_test": arrays.test_from is not None,  # the dataset's own test set, not a random cut
                "binarize": cfg.binarize,
                "sha256": hashes,
                "recipe": rec,
                **arrays.extra,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            old = None
            if target.exists():
                old = target.with_name(f".{target.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(target, old)
            os.replace(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ------------------------------------------------------------------------------------ reading
def read_manifest(prepared_dir: str | Path) -> dict[str, Any]:
    p = Path(prepared_dir) / MANIFEST
    if not p.is_file():
        raise DataError(f"{p}: missing — run `diffenc prepare` for this dataset first")
    try:
        manifest = json.loads(p.read_text())
    except json.JSONDecodeError:
        raise DataError(f"{p}: not valid JSON (re-run `diffenc prepare`)") from None
    for key in ("x_dim", "sizes"):
        if key not in manifest:
            raise DataError(f"{p}: missing key '{key}' (re-run `diffenc prepare`)")
    return manifest


def load_split(prepared_dir: str | Path, split: str, shard: tuple[int, int] | None = None) -> Split:
    """Read one split, checking its schema against the manifest; with ``shard = (rank, size)`` only
    rows ``rank, rank + size, ...`` (a rank of a training job holds its own examples alone)."""
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'; expected one of {SPLITS}")
    manifest = read_manifest(prepared_dir)
    path = Path(prepared_dir) / f"{split}.parquet"
    if not path.is_file():
        raise DataError(f"{path}: missing (re-run `diffenc prepare`)")
    dim = manifest["x_dim"]
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if FEATURES not in names:
            raise DataError(f"{path}: no '{FEATURES}' column")
        kind = pf.schema_arrow.field(FEATURES).type
        if not pa.types.is_fixed_size_list(kind) or kind.list_size != dim:
            raise DataError(f"{path}: column '{FEATURES}' must be fixed_size_list<float32>[{dim}], got {kind}")
        rank, size = shard or (0, 1)
        n = pf.metadata.num_rows
        x = torch.empty((len(range(rank, n, size)), dim), dtype=torch.float32)  # filled a row group at a time
        rows = x.numpy()
        row = 0
        for batch in pf.iter_batches(batch_size=ROWS_PER_GROUP, columns=[FEATURES]):
            col = batch.column(0)
            first = (rank - row) % size  # this batch's first row of the shard
            mine = col.slice(first)[::size] if size > 1 else col
            at = len(range(rank, row, size))
            rows[at : at + len(mine)] = mine.flatten().to_numpy(zero_copy_only=False).reshape(len(mine), dim)
            row += len(col)
        table = pf.read(columns=[c for c in names if c != FEATURES])[rank::size]
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{path}: not a readable Parquet file ({err.__class__.__name__})") from None
    if _non_finite_rows(rows):
        raise DataError(f"{path}: contains NaN or infinite features")
    label = table.column(LABEL).to_numpy() if LABEL in table.column_names else None
    factors = pd.DataFrame(
        {c[len(FACTOR_PREFIX) :]: table.column(c).to_numpy() for c in table.column_names if c.startswith(FACTOR_PREFIX)}
    )
    shape = tuple(manifest["image_shape"]) if manifest.get("image_shape") else None
    return Split(x=x, label=label, factors=factors, image_shape=shape, manifest=manifest)
