"""Small reference classifiers used by the CLI, the examples and the benchmarks.

``MLPClassifier`` is LeNet-300-100 style (784-300-100-10 on 28x28 inputs); ``LeNet5Classifier`` is
a LeNet-5-style CNN. Both are ordinary LightningModules: cross-entropy, Adam/AdamW/SGD, and
``val/acc``, ``val/loss``, ``test/acc`` logged with torchmetrics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

OPTIMIZERS = ("adam", "adamw", "sgd")


class ImageClassifier(pl.LightningModule):
    """Shared training logic; subclasses build ``self.net`` from ``input_shape``/``num_classes``."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"`optimizer` must be one of {OPTIMIZERS}, got {optimizer!r}")
        self.input_shape, self.num_classes = tuple(input_shape), int(num_classes)
        self.optimizer_name, self.lr, self.weight_decay, self.momentum = optimizer, lr, weight_decay, momentum
        self.val_acc = MulticlassAccuracy(num_classes=self.num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=self.num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.test_acc(logits, y)
        self.log("test/loss", F.cross_entropy(logits, y))
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = self.parameters()
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        cls = torch.optim.AdamW if self.optimizer_name == "adamw" else torch.optim.Adam
        # fused: one kernel per step; the unfused CPU path takes sqrt() of every exp_avg_sq entry,
        # which is ~4.5x slower on exact zeros, i.e. on every pruned weight
        return cls(params, lr=self.lr, weight_decay=self.weight_decay, fused=True)


class MLPClassifier(ImageClassifier):
    """Fully connected classifier; ``hidden=(300, 100)`` gives LeNet-300-100."""

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (300, 100), **kwargs
    ) -> None:
        super().__init__(input_shape, num_classes, **kwargs)
        self.save_hyperparameters()
        sizes = [math.prod(self.input_shape), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], self.num_classes))
        self.net = nn.Sequential(*layers)


class LeNet5Classifier(ImageClassifier):
    """LeNet-5 style: conv(6) - pool - conv(16) - pool - fc(120) - fc(84) - fc(classes).

    ``kernel_size=5`` with padding 2 on the first conv fits 28x28 inputs as in LeCun et al.;
    smaller images (8x8 digits) work with ``kernel_size=3``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        kernel_size: int = 5,
        channels: Sequence[int] = (6, 16),
        hidden: Sequence[int] = (120, 84),
        **kwargs,
    ) -> None:
        super().__init__(input_shape, num_classes, **kwargs)
        self.save_hyperparameters()
        c_in = self.input_shape[0]
        layers: list[nn.Module] = [
            nn.Conv2d(c_in, channels[0], kernel_size, padding=kernel_size // 2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels[0], channels[1], kernel_size),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        ]
        try:
            with torch.no_grad():
                flat = nn.Sequential(*layers)(torch.zeros(1, *self.input_shape)).shape[1]
        except RuntimeError as err:  # checked when the model is built, with the data's shape
            raise ValueError(
                f"LeNet5Classifier(kernel_size={kernel_size}) does not fit {'x'.join(map(str, self.input_shape[1:]))} "
                "images (two convolutions and two 2x2 poolings): lower kernel_size (model.kernel_size=3 fits 8x8 "
                "digits, as experiment=digits_lenet5 does) or use larger images (data=fashion_mnist)"
            ) from err
        sizes = [flat, *hidden]
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], self.num_classes))
        self.net = nn.Sequential(*layers)
