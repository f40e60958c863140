"""Small reference models used by the CLI, the examples and the benchmarks.

``MLPClassifier`` is LeNet-300-100 style (784-300-100-10 on 28x28 inputs); ``LeNet5Classifier`` is
a LeNet-5-style CNN. Both are ordinary LightningModules: cross-entropy, Adam/AdamW/SGD, and
``val/acc``, ``val/loss``, ``test/acc`` logged with torchmetrics. ``CausalLM`` wraps a Hugging Face
``LlamaForCausalLM`` built from a config (random init, no download) and logs ``val/ppl``; its training
logic is ``CausalLMBase``, which ``lightning_prune.app.hf.HFCausalLM`` (a pretrained checkpoint) shares.
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

    @torch.no_grad()
    def round_metric(self, dataloader) -> tuple[str, float]:
        """Validation accuracy, measured right after a pruning round (the CLI's ``RoundEvaluator``)."""
        correct = total = 0
        for x, y in dataloader:
            x, y = x.to(self.device), y.to(self.device)
            correct += int((self(x).argmax(1) == y).sum())
            total += len(y)
        return "val_acc", correct / max(total, 1)

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


class CausalLMBase(pl.LightningModule):
    """Training, evaluation and optimizer of a Hugging Face causal LM held in ``self.model``.

    Shared by :class:`CausalLM` (built from a config) and :class:`~lightning_prune.app.hf.HFCausalLM`
    (loaded from a checkpoint), so both train, log and get pruned alike: ``self.model`` is the
    ``transformers`` model (pruning sees ``model.model.layers.3.mlp.down_proj.weight``). Batches are
    dicts ``{"input_ids", "labels"}``; ``model(**batch).loss`` is the mean next-token cross-entropy.
    AdamW with linear warm-up and cosine decay to a tenth over the run (per optimizer step).
    Logs ``train/loss``, ``val/loss``, ``val/ppl``, ``test/loss`` and ``test/ppl``.
    """

    def __init__(self, model: nn.Module, lr: float, weight_decay: float, warmup_steps: int) -> None:
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        from torchmetrics import MeanMetric

        self.val_nll, self.test_nll = MeanMetric(), MeanMetric()

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, **kwargs):
        return self.model(input_ids=input_ids, labels=labels, **kwargs)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self(**batch).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _eval(self, batch: dict[str, Tensor], metric, stage: str) -> None:
        loss = self(**batch).loss
        metric.update(loss, weight=batch["input_ids"].numel())
        self.log(f"{stage}/loss", metric)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval(batch, self.val_nll, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval(batch, self.test_nll, "test")

    @torch.no_grad()
    def round_metric(self, dataloader) -> tuple[str, float]:
        """Validation perplexity, measured right after a pruning round (the CLI's ``RoundEvaluator``)."""
        return "val_ppl", perplexity(self.model, dataloader)

    def on_validation_epoch_end(self) -> None:
        self.log("val/ppl", torch.exp(self.val_nll.compute()), prog_bar=True)

    def on_test_epoch_end(self) -> None:
        self.log("test/ppl", torch.exp(self.test_nll.compute()))

    def configure_optimizers(self):
        decay = [p for n, p in self.named_parameters() if p.dim() >= 2]
        rest = [p for n, p in self.named_parameters() if p.dim() < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": rest, "weight_decay": 0.0}],
            lr=self.lr,
            betas=(0.9, 0.95),
            fused=True,
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1) if self._trainer is not None else 1000
        warmup = min(self.warmup_steps, max(total // 10, 1))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class CausalLM(CausalLMBase):
    """A LLaMA-architecture ``transformers`` model trained from scratch, as LLM users train theirs.

    Its own ``lm_head`` (untied unless ``tie_embeddings``); training and logging as :class:`CausalLMBase`.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int = 192,
        num_layers: int = 8,
        num_heads: int = 4,
        intermediate_size: int = 512,
        max_positions: int = 512,
        tie_embeddings: bool = False,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 100,
    ) -> None:
        try:
            from transformers import LlamaConfig, LlamaForCausalLM
        except ImportError as err:  # transformers is an optional dependency
            raise ImportError("CausalLM needs transformers: pip install 'lightning-prune[lm]'") from err
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=max_positions,
            tie_word_embeddings=tie_embeddings,
        )
        super().__init__(LlamaForCausalLM(config), lr, weight_decay, warmup_steps)
        self.save_hyperparameters()


@torch.no_grad()
def perplexity(model: nn.Module, dataloader) -> float:
    """``exp`` of the mean next-token cross-entropy over every predicted token of ``dataloader``.

    ``model(input_ids=..., labels=...)`` must return an output with ``.loss`` (a Hugging Face
    causal LM); batches are ``{"input_ids", "labels"}`` dicts of equal-length windows.
    """
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for batch in dataloader:
        ids = batch["input_ids"].to(device)
        n = ids.numel() - ids.shape[0]  # one prediction fewer than tokens per window
        total += float(model(input_ids=ids, labels=ids).loss) * n
        tokens += n
    return math.exp(total / max(tokens, 1))
