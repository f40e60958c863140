"""Add OBS pruning to your own LightningModule: one line in the Trainer.

python examples/plain_python.py                 # digits, 20 epochs, 80% sparsity
python examples/plain_python.py --epochs 3      # tiny smoke run
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import OBSPruning


class MyModel(L.LightningModule):
    """An ordinary LightningModule: nothing pruning-specific in it."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(inplace=True), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=1e-4)


def loaders() -> tuple[DataLoader, DataLoader]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    train, val = perm[:1500], perm[1500:]
    return (
        DataLoader(TensorDataset(x[train], y[train]), batch_size=64, shuffle=True, generator=g),
        DataLoader(TensorDataset(x[val], y[val]), batch_size=256),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--target", type=float, default=0.8)
    args = parser.parse_args()
    L.seed_everything(0)
    train, val = loaders()
    pruner = OBSPruning(target=args.target)  # <- the one line
    trainer = L.Trainer(max_epochs=args.epochs, callbacks=[pruner], logger=False, enable_checkpointing=False)
    model = MyModel()
    trainer.fit(model, train, val)
    print(f"sparsity {pruner.sparsity:.2%}, val accuracy {float(trainer.callback_metrics['val_acc']):.2%}")
    for record in pruner.history:
        print(
            f"round {record['round']}: sparsity {record['sparsity']:.2%}, "
            f"predicted +{record['predicted_loss_increase']:.4f}, actual {record['actual_loss_increase']:+.4f}"
        )


if __name__ == "__main__":
    main()
