"""Shared fixtures: a tiny LightningModule on random data and a quiet Trainer factory."""

from __future__ import annotations

import os
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")
# under pytest-xdist (the README's `-n 2`) the cores are shared by the workers: a worker's torch threads that wait
# for cores the other worker holds make a test many times slower (README), so each takes its share
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads()) // _workers))


def make_data(n: int = 256, d: int = 12, classes: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, classes, generator=g)
    return TensorDataset(x, (x @ w).argmax(1))


class TinyNet(pl.LightningModule):
    """Linear-ReLU-Linear(-ReLU-Linear) classifier with a configurable optimizer."""

    def __init__(
        self,
        d: int = 12,
        hidden: int = 32,
        classes: int = 4,
        optimizer: str = "adam",
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        norm: bool = False,
        batch_size: int = 32,
        n: int = 256,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers = [nn.Linear(d, hidden)]
        if norm:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        h = self.hparams
        if h.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=h.lr, momentum=0.9, weight_decay=h.weight_decay)
        if h.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=h.lr, weight_decay=h.weight_decay)
        return torch.optim.Adam(self.parameters(), lr=h.lr, weight_decay=h.weight_decay)

    def train_dataloader(self):
        return DataLoader(
            make_data(self.hparams.n, self.hparams.d, self.hparams.classes),
            batch_size=self.hparams.batch_size,
            shuffle=False,
        )

    def val_dataloader(self):
        return DataLoader(make_data(64, self.hparams.d, self.hparams.classes, seed=1), batch_size=32)


def make_trainer(tmp_path=None, **kwargs) -> pl.Trainer:
    defaults = dict(
        max_epochs=4,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path) if tmp_path else None,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


@pytest.fixture
def tiny():
    pl.seed_everything(0, verbose=False)
    return TinyNet()


@pytest.fixture(autouse=True)
def _no_leaked_function_modes():
    """A test that leaves a torch function mode (a pruner's loss-term watch) pushed breaks later ones."""
    before = len(torch.overrides._get_current_function_mode_stack())
    yield
    after = torch.overrides._get_current_function_mode_stack()
    assert len(after) == before, f"torch function modes left pushed: {after[before:]}"


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> dict:
    """A tiny local corpus: ``{"txt": [3 .txt files], "jsonl": [docs.jsonl]}`` (tests/lm_fixtures.py)."""
    from lm_fixtures import write_text_corpus

    return write_text_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """A folder with a saved tokenizer and random tiny ``LlamaForCausalLM`` (tests/lm_fixtures.py)."""
    from lm_fixtures import write_hf_checkpoint

    return write_hf_checkpoint(tmp_path_factory.mktemp("hf_checkpoint"))
