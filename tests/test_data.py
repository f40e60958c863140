import gzip
import struct

import numpy as np
import pytest
import torch

from lightning_prune.app.data import (
    DigitsDataModule,
    FashionMNISTDataModule,
    IDXDataModule,
    SyntheticDataModule,
    read_idx,
)


def write_idx(path, array, gz):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip_and_datamodule(tmp_path, gz):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (50, 6, 5), dtype=np.uint8)
    labels = rng.integers(0, 10, 50, dtype=np.uint8)
    suffix = ".gz" if gz else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", imgs, gz)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, gz)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", imgs[:10], gz)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels[:10], gz)
    assert np.array_equal(read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}"), imgs)
    dm = IDXDataModule(str(tmp_path), batch_size=8, val_size=10)
    assert dm.input_shape == (1, 6, 5)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 6, 5) and y.dtype == torch.long
    assert len(dm.val_dataloader().dataset) == 10 and len(dm.test_dataloader().dataset) == 10


def test_missing_dataset_names_files_and_install_command(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        FashionMNISTDataModule(root=str(tmp_path))
    msg = str(err.value)
    assert "train-images-idx3-ubyte[.gz]" in msg and "t10k-labels-idx1-ubyte[.gz]" in msg
    assert "apt-get install -y dataset-fashion-mnist" in msg


def test_not_an_idx_file(tmp_path):
    (tmp_path / "f").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "f")


def test_digits_and_synthetic_are_deterministic_and_standardised():
    a, b = DigitsDataModule(seed=3), DigitsDataModule(seed=3)
    a.setup()
    b.setup()
    xa = a._splits["train"].tensors[0]
    assert torch.equal(xa, b._splits["train"].tensors[0])
    assert abs(float(xa.mean())) < 1e-4 and abs(float(xa.std()) - 1) < 1e-3
    s = SyntheticDataModule(num_samples=300, input_shape=(4,), num_classes=3)
    s.setup()
    assert s._splits["train"].tensors[0].shape[1:] == (4,)
    assert len(set(s._splits["train"].tensors[1].tolist())) == 3
