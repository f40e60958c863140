"""In-memory image-classification data modules, with no torchvision.

* :class:`DigitsDataModule`: scikit-learn's bundled 8x8 digits (1,797 images), no download.
* :class:`IDXDataModule`: any MNIST-format folder of IDX files (``.gz`` or raw).
* :class:`FashionMNISTDataModule`: IDX files where Debian's ``dataset-fashion-mnist`` puts them.
* :class:`SyntheticDataModule`: Gaussian inputs labelled by a random teacher network.

Every module exposes ``input_shape`` and ``num_classes`` before ``setup`` so a model can be built
from them, standardises inputs with the training split's mean and std, and splits deterministically
from ``seed``.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4]!r})")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=_IDX_DTYPES[data[2]], offset=4 + 4 * ndim).copy()  # writable, for torch
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {array.size} values")
    return array.reshape(shape)


def find_idx_files(root: str | os.PathLike, install_hint: str | None = None) -> dict[str, Path]:
    """Locate the four MNIST-style IDX files in ``root`` (``.gz`` or raw); say what is missing."""
    root = Path(root)
    found, missing = {}, []
    for key, stem in IDX_FILES.items():
        for candidate in (root / f"{stem}.gz", root / stem):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            missing.append(f"{stem}[.gz]")
    if missing:
        hint = f" Install them with: {install_hint}" if install_hint else ""
        raise FileNotFoundError(f"IDX dataset incomplete in {root}: missing {', '.join(missing)}.{hint}")
    return found


class ArrayDataModule(pl.LightningDataModule):
    """Train/val/test tensors held in memory; subclasses implement :meth:`load_arrays`."""

    def __init__(
        self,
        batch_size: int = 128,
        val_size: float | int = 0.1,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
        train_subset: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
        self.batch_size, self.val_size, self.seed = batch_size, val_size, seed
        self.shuffle, self.num_workers, self.train_subset = shuffle, num_workers, train_subset
        self._splits: dict[str, TensorDataset] | None = None

    # subclasses -------------------------------------------------------------
    input_shape: tuple[int, ...]
    num_classes: int

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(train_x, train_y, test_x, test_y); test may be None to carve it from train."""
        raise NotImplementedError

    # -----------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        x, y, test_x, test_y = self.load_arrays()
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(len(x))
        n_val = round(self.val_size * len(x)) if isinstance(self.val_size, float) else int(self.val_size)
        if test_x is None:
            n_test = n_val
            test_idx, order = order[:n_test], order[n_test:]
            test_x, test_y = x[test_idx], y[test_idx]
        val_idx, train_idx = order[:n_val], order[n_val:]
        if self.train_subset is not None:
            train_idx = train_idx[: self.train_subset]
        train_x = torch.as_tensor(x[train_idx], dtype=torch.float32)
        mean, std = train_x.mean(), train_x.std().clamp_min(1e-8)

        def prep(a: np.ndarray) -> Tensor:
            t = torch.as_tensor(a, dtype=torch.float32)
            return ((t - mean) / std).reshape(len(a), *self.input_shape)

        def labels(a: np.ndarray) -> Tensor:
            return torch.as_tensor(np.asarray(a), dtype=torch.long)

        self._splits = {
            "train": TensorDataset(prep(x[train_idx]), labels(y[train_idx])),
            "val": TensorDataset(prep(x[val_idx]), labels(y[val_idx])),
            "test": TensorDataset(prep(test_x), labels(test_y)),
        }

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        assert self._splits is not None
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            self._splits[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)


class DigitsDataModule(ArrayDataModule):
    """scikit-learn's 8x8 handwritten digits: 1,797 images bundled with the package, no download."""

    input_shape = (1, 8, 8)
    num_classes = 10

    def __init__(self, batch_size: int = 64, val_size: float | int = 0.15, seed: int = 0, **kwargs) -> None:
        super().__init__(batch_size=batch_size, val_size=val_size, seed=seed, **kwargs)

    def load_arrays(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images.astype(np.float32), digits.target, None, None


class IDXDataModule(ArrayDataModule):
    """An MNIST-format folder (``train-images-idx3-ubyte[.gz]`` etc.): MNIST, Fashion-MNIST, KMNIST..."""

    install_hint: str | None = None

    def __init__(self, root: str, batch_size: int = 128, val_size: float | int = 5000, seed: int = 0, **kwargs) -> None:
        super().__init__(batch_size=batch_size, val_size=val_size, seed=seed, **kwargs)
        self.root = root
        self._files: dict[str, Path] | None = None
        self.input_shape, self.num_classes = self._peek()

    def _peek(self) -> tuple[tuple[int, ...], int]:
        self._files = find_idx_files(self.root, self.install_hint)
        with (
            gzip.open(self._files["train_images"], "rb")
            if self._files["train_images"].suffix == ".gz"
            else open(self._files["train_images"], "rb") as f
        ):
            head = f.read(16)
        rows, cols = struct.unpack(">II", head[8:16])
        return (1, rows, cols), 10

    def load_arrays(self):
        assert self._files is not None
        return tuple(read_idx(self._files[k]) for k in ("train_images", "train_labels", "test_images", "test_labels"))


class FashionMNISTDataModule(IDXDataModule):
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (or any folder of its IDX files)."""

    install_hint = FASHION_MNIST_INSTALL

    def __init__(
        self, root: str = FASHION_MNIST_DIR, batch_size: int = 128, val_size: float | int = 5000, **kwargs
    ) -> None:
        super().__init__(root=root, batch_size=batch_size, val_size=val_size, **kwargs)


class SyntheticDataModule(ArrayDataModule):
    """Gaussian inputs labelled by a random two-layer teacher: learnable, instant, any shape."""

    def __init__(
        self,
        num_samples: int = 2048,
        input_shape: tuple[int, ...] | list[int] = (1, 8, 8),
        num_classes: int = 10,
        batch_size: int = 64,
        val_size: float | int = 0.15,
        seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(batch_size=batch_size, val_size=val_size, seed=seed, **kwargs)
        self.num_samples, self.input_shape, self.num_classes = num_samples, tuple(input_shape), num_classes

    def load_arrays(self):
        g = torch.Generator().manual_seed(self.seed)
        d = int(np.prod(self.input_shape))
        x = torch.randn(self.num_samples, d, generator=g)
        w1 = torch.randn(d, 64, generator=g) / d**0.5
        w2 = torch.randn(64, self.num_classes, generator=g) / 8
        y = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
        return x.numpy(), y.numpy(), None, None
