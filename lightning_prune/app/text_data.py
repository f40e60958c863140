"""Language modelling on any text, tokenised by a Hugging Face tokenizer (``data=text_files``, ``data=hf_dataset``).

* :class:`PackedTextDataModule`: the shared part. Documents are tokenised without special tokens,
  each followed by the tokenizer's eos token, concatenated in order, and cut into non-overlapping
  ``seq_len``-token windows (the tail shorter than a window is dropped). The windows are split by
  position: the first ones train, then ``val_size`` windows validate, and the last ``test_size`` windows
  test (a float is a fraction of the windows, at least one; an integer a count), so the split is the
  same in every run and no window is in two splits. ``calibration_dataloader()`` gives the first
  ``calibration_windows`` training windows, in order, for one-shot pruning.
* :class:`TextFilesDataModule`: plain-text files (one document each) and JSON-lines files (one
  document per line, from a ``field``), by path or glob.
* :class:`HFDatasetDataModule`: a ``datasets`` dataset: ``load_dataset(path, name, data_files=...,
  split=...)`` (e.g. ``path=json`` on local files) or a folder written by ``save_to_disk``.

The tokenizer comes from ``tokenizer`` (a folder or Hub id; the configs default it to ``model.path``,
so the checkpoint's own tokenizer is used). Batches are ``{"input_ids", "labels"}`` dicts, as
:class:`~lightning_prune.app.data.TextDataModule` gives, so a Hugging Face causal LM takes ``model(**batch)``.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_prune.app.data import _LMWindows, seeded_loader

FORMATS = ("auto", "text", "jsonl")
SPLITS = ("train", "val", "test")
# `datasets` builders that read local files (their data_files must exist here)
LOCAL_BUILDERS = ("json", "csv", "text", "parquet", "arrow")


def _plain(value: Any) -> Any:
    """Hydra's ListConfig/DictConfig as plain lists and dicts (``datasets`` and ``glob`` want those)."""
    if isinstance(value, (str, Path)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value]


def expand_files(patterns: str | Sequence[str], argument: str) -> list[Path]:
    """Paths and globs (``**`` recursive) to existing files, in order, globs sorted, each file once."""
    patterns = [patterns] if isinstance(patterns, (str, Path)) else list(patterns)
    if not patterns:
        raise ValueError(f"{argument} is empty: give files or globs, e.g. {argument}=[docs/*.txt]")
    found: dict[Path, None] = {}
    for pattern in map(str, patterns):
        expanded = str(Path(pattern).expanduser())
        matches = sorted(glob.glob(expanded, recursive=True)) if glob.has_magic(expanded) else [expanded]
        files = [Path(m) for m in matches if Path(m).is_file()]
        if not files:
            what = "is a folder (give a glob such as DIR/*.txt)" if Path(expanded).is_dir() else "matches no file"
            raise FileNotFoundError(f"{argument}: {pattern!r} {what}")
        found.update(dict.fromkeys(files))
    return list(found)


def _size(value: float | int, argument: str) -> float | int:
    ok = (isinstance(value, float) and 0 < value < 1) or (
        isinstance(value, int) and not isinstance(value, bool) and value >= 1
    )
    if not ok:
        raise ValueError(f"{argument} must be a fraction in (0, 1) or a number of windows >= 1, got {value!r}")
    return value


class PackedTextDataModule(pl.LightningDataModule):
    """Documents tokenised, joined by eos and packed into ``seq_len``-token windows (see the module docstring).

    Subclasses give :meth:`documents`; everything else (tokenizer, packing, splits, loaders, the check
    of a model's vocabulary) is here.
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        seq_len: int = 128,
        batch_size: int = 8,
        val_size: float | int = 0.05,
        test_size: float | int = 0.05,
        calibration_windows: int = 128,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not tokenizer:
            raise ValueError("data.tokenizer is not set: give a tokenizer folder or Hub id (it defaults to model.path)")
        for name, value, low in (
            ("seq_len", seq_len, 2),
            ("batch_size", batch_size, 1),
            ("calibration_windows", calibration_windows, 1),
            ("num_workers", num_workers, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"data.{name} must be an integer >= {low}, got {value!r}")
        self.tokenizer_name = str(tokenizer)
        self.seq_len, self.batch_size, self.seed, self.num_workers = seq_len, batch_size, seed, num_workers
        self.val_size, self.test_size = _size(val_size, "data.val_size"), _size(test_size, "data.test_size")
        self.calibration_windows = calibration_windows
        self._tokenizer = None
        self._splits: dict[str, Tensor] | None = None

    def documents(self) -> Iterator[str]:
        """The documents, in a fixed order; errors name the file (and line) that is wrong."""
        raise NotImplementedError

    @property
    def model_args(self) -> dict[str, Any]:
        """Nothing: the model brings its own vocabulary (checked by :meth:`check_model`)."""
        return {}

    @property
    def tokenizer(self):
        """``AutoTokenizer.from_pretrained(tokenizer)``, loaded once, on first use."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained(self.tokenizer_name)
            except (OSError, ValueError) as err:
                raise ValueError(
                    f"data.tokenizer={self.tokenizer_name!r}: no tokenizer could be loaded ({err})"
                ) from err
            if tok.eos_token_id is None:
                raise ValueError(
                    f"data.tokenizer={self.tokenizer_name!r} has no eos token, which separates the documents"
                )
            self._tokenizer = tok
        return self._tokenizer

    def check_model(self, model: Any) -> None:
        """Refuse a model whose vocabulary is smaller than the tokenizer's, or whose positions are fewer
        than ``seq_len`` (``model`` is a ``transformers`` model; anything without a ``config`` passes)."""
        config = getattr(model, "config", None)
        if config is None:
            return
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        vocab, n = getattr(config, "vocab_size", None), len(self.tokenizer)
        if vocab is not None and n > vocab:
            raise ValueError(
                f"data.tokenizer={self.tokenizer_name!r} has {n} tokens, more than the model's vocabulary "
                f"(config.vocab_size={vocab}): use the model's own tokenizer (data.tokenizer=<model.path>)"
            )
        positions = getattr(config, "max_position_embeddings", None)
        if positions is not None and self.seq_len > positions:
            raise ValueError(
                f"data.seq_len={self.seq_len} is longer than the model's max_position_embeddings={positions}"
            )

    def _stream(self) -> Tensor:
        """Every document's ids followed by eos, concatenated (int64)."""
        tok, parts, batch = self.tokenizer, [], []
        eos = np.array([tok.eos_token_id], dtype=np.int64)

        def flush() -> None:
            for ids in tok(batch, add_special_tokens=False, verbose=False)["input_ids"]:
                parts.extend((np.asarray(ids, dtype=np.int64), eos))
            batch.clear()

        for doc in self.documents():
            batch.append(doc)
            if len(batch) == 1000:
                flush()
        flush()
        return torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.long)

    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        stream = self._stream()
        windows = stream[: len(stream) // self.seq_len * self.seq_len].view(-1, self.seq_len)
        n = len(windows)
        counts = [max(1, round(s * n)) if isinstance(s, float) else s for s in (self.val_size, self.test_size)]
        if n - sum(counts) < 1:
            need = (sum(counts) + 1) * self.seq_len
            raise ValueError(
                f"the documents give {len(stream)} tokens ({n} windows of data.seq_len={self.seq_len}), fewer than "
                f"the {need} needed for at least one window to train, {counts[0]} to validate and {counts[1]} to test: "
                "add text or lower data.seq_len, data.val_size or data.test_size"
            )
        n_train = n - sum(counts)
        self._splits = {
            "train": windows[:n_train],
            "val": windows[n_train : n_train + counts[0]],
            "test": windows[n_train + counts[0] :],
        }

    def split(self, name: str) -> Tensor:
        """The ``(windows, seq_len)`` token ids of ``"train"``, ``"val"`` or ``"test"``."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        self.setup()
        assert self._splits is not None
        return self._splits[name]

    def _loader(self, windows: Tensor, shuffle: bool) -> DataLoader:
        return seeded_loader(_LMWindows(windows), self.batch_size, shuffle, self.seed, self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.split("train"), True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.split("val"), False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.split("test"), False)

    def calibration_dataloader(self) -> DataLoader:
        """The first ``calibration_windows`` training windows, in order: the calibration set of one-shot pruning."""
        train = self.split("train")
        if self.calibration_windows > len(train):
            raise ValueError(
                f"data.calibration_windows={self.calibration_windows} is more than the {len(train)} training windows"
            )
        return self._loader(train[: self.calibration_windows], False)


class TextFilesDataModule(PackedTextDataModule):
    """Local files: plain text (one document per file) or JSON lines (one document per line, its ``field``).

    ``files``: paths or globs (``**`` recursive), taken in the order given, each glob sorted.
    ``format``: ``auto`` (``.jsonl``/``.json`` files are JSON lines, others text), ``text`` or ``jsonl``.
    """

    def __init__(self, files: str | Sequence[str], format: str = "auto", field: str = "text", **kwargs) -> None:
        if format not in FORMATS:
            raise ValueError(f"data.format must be one of {FORMATS}, got {format!r}")
        if not isinstance(field, str) or not field:
            raise ValueError(f"data.field must be a non-empty string, got {field!r}")
        self.files = expand_files(_plain(files), "data.files")
        self.format, self.field = format, field
        super().__init__(**kwargs)

    def _is_jsonl(self, path: Path) -> bool:
        return self.format == "jsonl" or (self.format == "auto" and path.suffix.lower() in (".jsonl", ".json"))

    def documents(self) -> Iterator[str]:
        for path in self.files:
            if not self._is_jsonl(path):
                try:
                    yield path.read_text(encoding="utf-8")
                except UnicodeDecodeError as err:
                    raise ValueError(f"data.files: {str(path)!r} is not UTF-8 text ({err})") from err
                continue
            with path.open(encoding="utf-8") as lines:
                for number, line in enumerate(lines, 1):
                    if line.strip():
                        yield self._field(path, number, line)

    def _field(self, path: Path, number: int, line: str) -> str:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON line ({err})") from err
        if not isinstance(record, dict) or self.field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(
                f"{path}:{number}: no {self.field!r} field (data.field={self.field!r}; the line has {keys})"
            )
        if not isinstance(record[self.field], str):
            raise ValueError(f"{path}:{number}: {self.field!r} is a {type(record[self.field]).__name__}, not text")
        return record[self.field]


class HFDatasetDataModule(PackedTextDataModule):
    """A ``datasets`` dataset: a folder written by ``save_to_disk`` (read with ``load_from_disk``), or
    ``load_dataset(path, name, data_files=data_files, split=split)`` (``path=json`` with local files, or
    a Hub dataset where the network allows). One document per row, its ``field``."""

    def __init__(
        self,
        path: str,
        name: str | None = None,
        data_files: str | Sequence[str] | Mapping[str, Any] | None = None,
        split: str = "train",
        field: str = "text",
        cache_dir: str | None = None,
        **kwargs,
    ) -> None:
        if not path:
            raise ValueError("data.path is not set: a saved dataset folder, or a builder such as json with data_files")
        self.path, self.name, self.split_name, self.field = str(path), name, split, field
        self.data_files, self.cache_dir = _plain(data_files), cache_dir
        local = Path(self.path).expanduser()
        self.from_disk = local.is_dir() and any(
            (local / f).is_file() for f in ("state.json", "dataset_dict.json", "dataset_info.json")
        )
        if self.path in LOCAL_BUILDERS:
            if self.data_files is None:
                raise ValueError(f"data.path={self.path!r} reads local files: give data.data_files=[...]")
            files = self.data_files.values() if isinstance(self.data_files, dict) else [self.data_files]
            for group in files:
                expand_files(group, "data.data_files")
        elif not self.from_disk and local.exists():
            raise ValueError(
                f"data.path={self.path!r} is not a dataset folder written by save_to_disk "
                "(no state.json or dataset_dict.json); for files use data.path=json data.data_files=[...]"
            )
        super().__init__(**kwargs)

    def _dataset(self):
        import datasets

        if self.from_disk:
            ds = datasets.load_from_disk(str(Path(self.path).expanduser()))
            if isinstance(ds, datasets.DatasetDict):
                if self.split_name not in ds:
                    raise ValueError(f"data.split={self.split_name!r} is not in {self.path!r}: it has {sorted(ds)}")
                ds = ds[self.split_name]
        else:
            ds = datasets.load_dataset(
                self.path, self.name, data_files=self.data_files, split=self.split_name, cache_dir=self.cache_dir
            )
        if self.field not in ds.column_names:
            raise ValueError(f"data.field={self.field!r} is not a column of {self.path!r}: it has {ds.column_names}")
        return ds

    def documents(self) -> Iterator[str]:
        for batch in self._dataset().select_columns([self.field]).iter(batch_size=1000):
            yield from batch[self.field]
