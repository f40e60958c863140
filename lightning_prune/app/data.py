"""In-memory data modules, with no torchvision and no download.

* :class:`DigitsDataModule`: scikit-learn's bundled 8x8 digits (1,797 images), no download.
* :class:`IDXDataModule`: any MNIST-format folder of IDX files (``.gz`` or raw).
* :class:`FashionMNISTDataModule`: IDX files where Debian's ``dataset-fashion-mnist`` puts them.
* :class:`SyntheticDataModule`: Gaussian inputs labelled by a random teacher network.
* :class:`TextDataModule`: language modelling on Python's own standard-library sources.

Every module says what a model needs before ``setup`` (image modules ``input_shape`` and
``num_classes``, the text module ``model_args``) and splits deterministically; image modules
standardise inputs with the training split's mean and std.
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


def seeded_loader(dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int) -> DataLoader:
    """A DataLoader whose shuffling depends on ``seed`` only (the same order in every run)."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


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
        return seeded_loader(self._splits[split], self.batch_size, shuffle, self.seed, self.num_workers)

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


# ---------------------------------------------------------------------------------------------- text
EXCLUDED_STDLIB_DIRS = ("test", "tests", "site-packages", "dist-packages", "idlelib", "lib2to3", "turtledemo")
EOS = "<|endoftext|>"


def stdlib_sources(root: str | os.PathLike | None = None) -> list[Path]:
    """The ``.py`` files of Python's standard library (no tests, no installed packages), sorted.

    A real corpus every machine already has: about 580 files, 11 MB of text on CPython 3.11.
    """
    import sysconfig

    base = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise FileNotFoundError(f"`root` ({str(base)!r}) is not a folder of Python sources")
    files = sorted(
        p for p in base.rglob("*.py") if not any(part in EXCLUDED_STDLIB_DIRS for part in p.relative_to(base).parts)
    )
    if not files:
        raise FileNotFoundError(f"`root` ({str(base)!r}) holds no .py files")
    return files


def _split_of(relative: str, val_every: int, test_every: int) -> str:
    """Deterministic, file-level split (no sequence is shared between splits)."""
    import zlib

    h = zlib.crc32(relative.encode())
    if h % test_every == 0:
        return "test"
    return "val" if h % val_every == 1 else "train"


class TextDataModule(pl.LightningDataModule):
    """Language modelling on a real corpus available offline: Python's own standard-library sources.

    Files are split train/val/test by a hash of their path (about 1 in ``val_every`` / ``test_every``),
    a byte-level BPE tokenizer (Hugging Face ``tokenizers``) is trained on the training files only,
    and every split is cut into non-overlapping ``seq_len``-token windows of documents joined by
    ``<|endoftext|>``. Batches are dicts ``{"input_ids", "labels"}`` (labels = inputs; the model
    shifts), so a Hugging Face causal LM takes them as ``model(**batch)``.

    Tokenising the whole library takes about half a minute on 2 cores, so the tokenizer and token
    ids are cached under ``cache_dir`` (default ``~/.cache/lightning-prune/text``), keyed by the
    corpus files, their sizes and the settings. ``max_files`` takes every k-th file for quick runs.
    """

    def __init__(
        self,
        root: str | None = None,
        vocab_size: int = 4096,
        seq_len: int = 128,
        batch_size: int = 16,
        max_files: int | None = None,
        val_every: int = 20,
        test_every: int = 20,
        seed: int = 0,
        cache_dir: str | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("vocab_size", vocab_size, 260),
            ("seq_len", seq_len, 2),
            ("batch_size", batch_size, 1),
            ("val_every", val_every, 2),
            ("test_every", test_every, 2),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}")
        if max_files is not None and (isinstance(max_files, bool) or not isinstance(max_files, int) or max_files < 3):
            raise ValueError(f"`max_files` must be None or an integer >= 3, got {max_files!r}")
        self.root, self.vocab_size, self.seq_len, self.batch_size = root, vocab_size, seq_len, batch_size
        self.max_files, self.val_every, self.test_every, self.seed = max_files, val_every, test_every, seed
        self.cache_dir = Path(cache_dir or Path.home() / ".cache" / "lightning-prune" / "text")
        self.num_workers = num_workers
        self.tokenizer = None
        self._splits: dict[str, Tensor] | None = None

    @property
    def model_args(self) -> dict[str, int]:
        """What a model needs from the data before ``setup``."""
        return {"vocab_size": self.vocab_size}

    def _files(self) -> tuple[Path, list[Path]]:
        import sysconfig

        files = stdlib_sources(self.root)
        base = Path(self.root) if self.root else Path(sysconfig.get_paths()["stdlib"])
        if self.max_files is not None and len(files) > self.max_files:
            step = len(files) / self.max_files
            files = [files[int(i * step)] for i in range(self.max_files)]
        return base, files

    def _key(self, base: Path, files: list[Path]) -> str:
        import hashlib

        h = hashlib.sha256()
        for p in files:
            h.update(f"{p.relative_to(base)}:{p.stat().st_size}\n".encode())
        h.update(f"{self.vocab_size}:{self.val_every}:{self.test_every}".encode())
        return h.hexdigest()[:16]

    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        from tokenizers import Tokenizer

        base, files = self._files()
        folder = self.cache_dir / self._key(base, files)
        if (folder / "tokenizer.json").is_file() and (folder / "ids.pt").is_file():
            self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            ids = torch.load(folder / "ids.pt", weights_only=True)
        else:
            self.tokenizer, ids = self._tokenize(base, files)
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f"ids.pt.{os.getpid()}"
            torch.save(ids, tmp)
            self.tokenizer.save(str(folder / "tokenizer.json"))
            os.replace(tmp, folder / "ids.pt")  # atomic: parallel jobs never read half a file
        for split, stream in ids.items():
            if len(stream) < self.seq_len * 2:
                raise ValueError(
                    f"the {split} split has {len(stream)} tokens, fewer than two windows of seq_len={self.seq_len}: "
                    f"raise `max_files` ({self.max_files}) or lower `seq_len`"
                )
        self._splits = {
            split: stream[: len(stream) // self.seq_len * self.seq_len].view(-1, self.seq_len)
            for split, stream in ids.items()
        }

    def _tokenize(self, base: Path, files: list[Path]):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        texts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
        for p in files:
            split = _split_of(str(p.relative_to(base)), self.val_every, self.test_every)
            texts[split].append(p.read_text(encoding="utf-8", errors="replace"))
        for split, docs in texts.items():
            if not docs:
                raise ValueError(f"no file fell into the {split} split: raise `max_files` ({self.max_files})")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=self.vocab_size,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts["train"], trainer)
        eos = tok.token_to_id(EOS)
        ids = {}
        for split, docs in texts.items():
            stream: list[int] = []
            for enc in tok.encode_batch(docs):
                stream += enc.ids
                stream.append(eos)
            ids[split] = torch.tensor(stream, dtype=torch.int32)
        return tok, ids

    def split(self, name: str) -> Tensor:
        """The ``(windows, seq_len)`` token ids of ``"train"``, ``"val"`` or ``"test"``."""
        self.setup()
        assert self._splits is not None
        return self._splits[name].long()

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return seeded_loader(_LMWindows(self.split(split)), self.batch_size, shuffle, self.seed, self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)


class _LMWindows(torch.utils.data.Dataset):
    def __init__(self, ids: Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}
