"""The curves of a language-model run that its model and callbacks do not log already.

The model logs ``train/loss`` and ``val/ppl`` (at each validation), :class:`~lightning_prune.Distillation` the
student's task loss and the KD term (``distill/task``, ``distill/kd``), the pruner ``prune/sparsity`` at its
rounds. :class:`SizeCurve` adds the size of the model at every step: its non-embedding parameters counting
masked heads and neurons (and any zero) as removed, and that count as a fraction of the parent's (density: of the
dense model a student was shrunk from, else of the model at fit start), so a pruning schedule and a shrunk student
read on one axis. It also keeps the training batches' shape, which
the model card's token count needs.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_prune.app.card import count_params


class SizeCurve(Callback):
    """Log ``size/params_non_embedding`` and ``size/density`` after every training batch (listed after the
    pruners, so a round's result is seen the step it happens); ``batch_shape``: the first batch's ``input_ids``.
    ``reference``: the non-embedding parameters density is a fraction of (default: the model's at fit start)."""

    def __init__(self, reference: int | None = None) -> None:
        self.reference = reference
        self.batch_shape: tuple[int, ...] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.reference is None:
            self.reference = count_params(pl_module.model, nonzero=True)["non_embedding"]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if self.batch_shape is None and isinstance(batch, dict) and "input_ids" in batch:
            self.batch_shape = tuple(batch["input_ids"].shape)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        params = count_params(pl_module.model, nonzero=True)["non_embedding"]
        values = {"size/params_non_embedding": float(params), "size/density": params / max(self.reference or 1, 1)}
        pl_module.log_dict(values, on_step=True, on_epoch=False)
